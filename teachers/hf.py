"""transformers models as frozen teachers: ``Tipsv2Model``, ``CLIPModel``, ``SiglipModel``,
``Siglip2Model`` and ``Dinov2Model`` (vision only).

``build_teacher("hf", model="/path/to/local/model_dir")`` or ``build_teacher("hf", model=config)``
(a transformers config object: random weights, for tests). The dense readout runs the model's own
modules layer by layer: global tokens and patch tokens after the model's final norm (CLIP: post-layernorm
then the visual projection, so patches live in the text space; SigLIP/SigLIP2: post-layernorm, ``cls`` is
the attention-pooling head), and the value trick through the chosen layer's own attention block.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from . import hub
from .base import VALUE_READOUTS, DenseFeatures, Teacher, check_pixels, normalise, register_teacher

logger = logging.getLogger(__name__)

# model family -> (image mean, image std) used when no preprocessor_config.json sits next to the weights
FAMILY_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "tipsv2": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "siglip2": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
MODEL_CLASSES = {
    "Tipsv2Model": "tipsv2",
    "CLIPModel": "clip",
    "SiglipModel": "siglip",
    "Siglip2Model": "siglip2",
    "Dinov2Model": "dinov2",
}
CONFIG_TO_MODEL = {
    "Tipsv2Config": "Tipsv2Model",
    "CLIPConfig": "CLIPModel",
    "SiglipConfig": "SiglipModel",
    "Siglip2Config": "Siglip2Model",
    "Dinov2Config": "Dinov2Model",
}
TEXT_MAX_LEN = {"tipsv2": 64, "clip": 77, "siglip": 64, "siglip2": 64}


def _offline() -> bool:
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
    except Exception:  # pragma: no cover
        pass
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or os.environ.get(
        "TRANSFORMERS_OFFLINE", "0"
    ).lower() in ("1", "true", "yes")


def _call_layer(layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
    out = layer(h, None)
    return out[0] if isinstance(out, tuple) else out


def text_embeddings(
    family: str,
    text_model: nn.Module,
    tokenizer: Any,
    texts: list[str],
    projection: nn.Module | None = None,
    max_len: int | None = None,
) -> torch.Tensor:
    """The text side of an image-text model (``family`` of :data:`TEXT_MAX_LEN`): strings -> ``(B, D)``
    unnormalised embeddings in its image-text space (the model's own pooled output, then ``projection``:
    CLIP's ``text_projection``). Gradients flow when the caller allows them (a student's copy trains)."""
    max_len = int(max_len or TEXT_MAX_LEN[family])
    padding = "max_length" if family in ("siglip", "siglip2", "tipsv2") else True
    tok = tokenizer(list(texts), padding=padding, max_length=max_len, truncation=True, return_tensors="pt")
    device = next(text_model.parameters()).device
    ids = tok["input_ids"].to(device)
    mask = tok.get("attention_mask")
    mask = None if mask is None else mask.to(device)
    if family == "siglip":
        return text_model(input_ids=ids).pooler_output  # SigLIP was trained without a text attention mask
    out = text_model(input_ids=ids, attention_mask=mask).pooler_output
    return projection(out) if projection is not None else out


def resolve_model_dir(model: str | os.PathLike[str], revision: str | None = None) -> tuple[str, str]:
    """``(local folder, portable name)`` of a transformers model given as a local folder, a hub repo id
    (``org/name``, also ``hf-hub:org/name``; ``revision`` pins it; from the HF cache when offline). The
    name is the repo id (``@revision``) for hub models, the folder as given otherwise."""
    path = os.fspath(model)
    repo_id = path[len("hf-hub:") :] if path.startswith("hf-hub:") else path
    name = path
    if not os.path.isdir(path) and hub.looks_like_repo_id(repo_id):
        path = hub.snapshot(repo_id, revision)
        name = f"{repo_id}@{revision}" if revision else repo_id
    if not os.path.isdir(path):
        if os.path.exists(path):
            raise ValueError(
                f"{path!r} is a file; a transformers model is a directory (config.json + weights)"
            )
        raise ValueError(
            f"{path!r} is neither a hub repo id (org/name) nor an existing local model directory: pass a repo "
            "id such as google/tipsv2-l14 (revision= pins it) or the folder of a saved model (config.json + weights)"
        )
    return path, name


class HFTeacher(Teacher):
    """A frozen transformers model read out token by token; see the module docstring."""

    name = "hf"

    def __init__(
        self,
        model: nn.Module,
        family: str,
        *,
        tokenizer: Any = None,
        mean: Sequence[float],
        std: Sequence[float],
        source: str = "(config)",
    ) -> None:
        super().__init__()
        self.model = model
        self.family = family
        self.tokenizer = tokenizer
        self.source = source
        cfg = model.config
        vcfg = cfg if family == "dinov2" else cfg.vision_config
        ps = vcfg.patch_size
        self.patch_size = int(ps[0] if isinstance(ps, (tuple, list)) else ps)
        self.vision = model if family == "dinov2" else model.vision_model
        self.layers = (
            self.vision.encoder.layer if family in ("dinov2", "tipsv2") else self.vision.encoder.layers
        )
        self.num_layers = len(self.layers)
        self.embed_dim = int(cfg.projection_dim) if family == "clip" else int(vcfg.hidden_size)
        self.num_global_tokens = 1 + int(getattr(vcfg, "num_register_tokens", 0)) if family == "tipsv2" else 1
        self.has_text = family != "dinov2"
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32), persistent=False)

    # ---- vision -------------------------------------------------------------------------------
    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        p = self.patch_size
        H, W = x.shape[-2:]
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}; resize or pad it")
        grid = (H // p, W // p)
        v = self.vision
        if self.family in ("dinov2", "tipsv2"):
            return v.embeddings(x), grid
        if self.family == "clip":
            return v.pre_layrnorm(v.embeddings(x, interpolate_pos_encoding=True)), grid
        if self.family == "siglip":
            return v.embeddings(x, interpolate_pos_encoding=True), grid
        # siglip2: patchify as its image processor does, (B, h*w, p*p*C), every patch valid
        B, C = x.shape[:2]
        patches = (
            x.reshape(B, C, grid[0], p, grid[1], p)
            .permute(0, 2, 4, 3, 5, 1)
            .reshape(B, grid[0] * grid[1], -1)
        )
        shapes = torch.tensor([grid] * B, dtype=torch.long, device=x.device)
        return v.embeddings(patches, shapes), grid

    def _parts(self, layer: nn.Module) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        if self.family in ("dinov2", "tipsv2"):
            return dict(
                norm1=layer.norm1,
                v=layer.attention.v_proj,
                o=layer.attention.o_proj,
                ls1=layer.layer_scale1,
                norm2=layer.norm2,
                mlp=layer.mlp,
                ls2=layer.layer_scale2,
            )
        ident = nn.Identity()
        return dict(
            norm1=layer.layer_norm1,
            v=layer.self_attn.v_proj,
            o=layer.self_attn.out_proj,
            ls1=ident,
            norm2=layer.layer_norm2,
            mlp=layer.mlp,
            ls2=ident,
        )

    def value_trick_layer(self, layer: nn.Module, h: torch.Tensor, readout: str = "tips") -> torch.Tensor:
        """The MaskCLIP value trick through one of this model's attention blocks (before the final norm)."""
        if readout not in VALUE_READOUTS:
            raise ValueError(f"unknown value readout {readout!r}; choose one of {VALUE_READOUTS}")
        m = self._parts(layer)
        v = m["o"](m["v"](m["norm1"](h)))
        if readout == "maskclip":
            return v
        xv = h + m["ls1"](v)
        return xv + m["ls2"](m["mlp"](m["norm2"](xv)))

    def _final(self, h: torch.Tensor) -> torch.Tensor:
        v = self.vision
        if self.family in ("dinov2", "tipsv2"):
            return v.layernorm(h)
        h = v.post_layernorm(h)
        if self.family == "clip":
            h = self.model.visual_projection(h)
        return h

    @torch.no_grad()
    def encode_image(
        self,
        pixels: torch.Tensor,
        *,
        value_trick: bool = False,
        value_readout: str = "tips",
        layer: int | None = None,
    ) -> DenseFeatures:
        """``(B, 3, H, W)`` [0, 1] -> cls ``(B, C, D)``, patch ``(B, H/p, W/p, D)`` (optional value_patch)."""
        check_pixels(pixels, self.patch_size)
        x = normalise(pixels, self.mean, self.std).to(next(self.model.parameters()).dtype)
        h, (gh, gw) = self._embed(x)
        L = self.num_layers
        k = L - 1 if layer is None else (layer if layer >= 0 else L + layer)
        if not 0 <= k < L:
            raise ValueError(f"layer {layer} out of range for a model with {L} layers")
        for lyr in self.layers[:k]:
            h = _call_layer(lyr, h)
        value = self.value_trick_layer(self.layers[k], h, value_readout) if value_trick else None
        h = _call_layer(self.layers[k], h)
        out = self._final(h)
        B, D = out.shape[0], out.shape[-1]
        P = 0 if self.family in ("siglip", "siglip2") else self.num_global_tokens
        patch = out[:, P:].reshape(B, gh, gw, D)
        if P:
            cls = out[:, :P]
        else:  # SigLIP has no class token: its attention-pooling head gives the global embedding
            normed = self.vision.post_layernorm(h)
            cls = (
                self.vision.head(normed).reshape(B, 1, -1)
                if getattr(self.vision, "head", None) is not None
                else patch.mean((1, 2)).unsqueeze(1)
            )
        vp = None if value is None else self._final(value)[:, P:].reshape(B, gh, gw, D)
        return DenseFeatures(cls=cls, patch=patch, value_patch=vp, extras={"family": self.family})

    # ---- text ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Strings -> ``(B, D)`` unnormalised embeddings in the image embedding space."""
        if not self.has_text:
            return super().encode_text(texts)
        if self.tokenizer is None:
            raise ValueError(
                f"this {self.family} teacher has no tokenizer: build it from a local model directory that holds "
                "the tokenizer files, or pass tokenizer=..."
            )
        if isinstance(texts, str):
            texts = [texts]
        projection = self.model.text_projection if self.family == "clip" else None
        return text_embeddings(self.family, self.model.text_model, self.tokenizer, list(texts), projection)

    def identity(self) -> dict[str, Any]:
        out = super().identity()
        out.update(
            name="hf",
            family=self.family,
            model_class=type(self.model).__name__,
            source=self.source,
            num_layers=self.num_layers,
            has_text=self.has_text,
            mean=[float(v) for v in self.mean],
            std=[float(v) for v in self.std],
        )
        return out


def _stats_from_dir(path: str) -> tuple[list[float], list[float]] | None:
    f = os.path.join(path, "preprocessor_config.json")
    if not os.path.isfile(f):
        return None
    with open(f) as fh:
        cfg = json.load(fh)
    if "image_mean" in cfg and "image_std" in cfg:
        mean, std = cfg["image_mean"], cfg["image_std"]
        if isinstance(mean, (int, float)):
            mean = [mean] * 3
        if isinstance(std, (int, float)):
            std = [std] * 3
        return [float(v) for v in mean], [float(v) for v in std]
    return None


@register_teacher("hf")
def build_hf_teacher(
    model: str | os.PathLike[str] | Any,
    tokenizer: Any = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
) -> HFTeacher:
    """A transformers teacher from a hub repo id (``google/tipsv2-l14``; ``revision=`` pins it; from the HF
    cache when ``HF_HUB_OFFLINE=1``), a local model directory, a config object, or a model instance.

    ``tokenizer``: a tokenizer object or a local directory (default: the model directory). ``mean``/``std``
    override the image statistics (default: ``preprocessor_config.json`` next to the weights, else the
    family's known values).
    """
    import transformers

    source = "(config)"
    stats = None
    if isinstance(model, (str, os.PathLike)):
        path, model = resolve_model_dir(model, revision)
        config = transformers.AutoConfig.from_pretrained(path)
        cls_name = CONFIG_TO_MODEL.get(type(config).__name__)
        if cls_name is None:
            raise ValueError(
                f"{path!r} holds a {type(config).__name__}; the hf teacher supports {sorted(CONFIG_TO_MODEL)}"
            )
        net = getattr(transformers, cls_name).from_pretrained(path, dtype=dtype)
        source = os.fspath(model)  # the repo id (@revision) for hub models: the same on every machine
        stats = _stats_from_dir(path)
        if tokenizer is None and cls_name != "Dinov2Model":
            try:
                tokenizer = transformers.AutoTokenizer.from_pretrained(path)
            except Exception as exc:
                logger.warning(
                    "no tokenizer could be loaded from %s (%s); encode_text needs tokenizer=...", path, exc
                )
    elif isinstance(model, nn.Module):
        net = model
    else:
        cls_name = CONFIG_TO_MODEL.get(type(model).__name__)
        if cls_name is None:
            raise ValueError(
                f"hf teacher: model must be a local directory, a model or a config among {sorted(CONFIG_TO_MODEL)}, "
                f"got {type(model).__name__}"
            )
        net = getattr(transformers, cls_name)(model).to(dtype)
    family = MODEL_CLASSES.get(type(net).__name__)
    if family is None:
        raise ValueError(f"hf teacher supports {sorted(MODEL_CLASSES)}, got {type(net).__name__}")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = transformers.AutoTokenizer.from_pretrained(os.fspath(tokenizer))
    fam_mean, fam_std = stats or FAMILY_STATS[family]
    mean = tuple(mean if mean is not None else fam_mean)
    std = tuple(std if std is not None else fam_std)
    net.eval()
    return HFTeacher(net, family, tokenizer=tokenizer, mean=mean, std=std, source=source)


__all__ = ["FAMILY_STATS", "HFTeacher", "build_hf_teacher", "resolve_model_dir", "text_embeddings"]
