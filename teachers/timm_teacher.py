"""Any timm ``VisionTransformer`` as a frozen teacher, weights from a local checkpoint file.

``build_teacher("timm", model_name="vit_base_patch16_224", checkpoint="weights.safetensors")``.
Dense features come from :func:`teachers.vit.vit_dense_forward`, the readout students use too.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .base import DenseFeatures, Teacher, check_pixels, normalise, register_teacher, strict_load
from .hub import hub_file, resolve_file
from .vit import vit_dense_forward

logger = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` / ``.pth`` / ``.bin`` state dict, unwrapping ``state_dict``/``model``/``module``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"checkpoint file {path!r} does not exist; pass the path of a local weights file"
        )
    if not path.endswith(CHECKPOINT_SUFFIXES):
        raise ValueError(
            f"checkpoint {path!r} has an unknown suffix; expected one of {', '.join(CHECKPOINT_SUFFIXES)}"
        )
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd: Any = load_file(path, device="cpu")
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module", "model_ema"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict):
        raise ValueError(f"checkpoint {path!r} does not hold a state dict (got {type(sd).__name__})")
    return {k.removeprefix("module."): v for k, v in sd.items()}


class TimmViTTeacher(Teacher):
    """A frozen timm ViT read out by :func:`vit_dense_forward`.

    Args:
        model: a timm ``VisionTransformer`` (patch_embed, blocks, norm, prefix tokens).
        num_global_tokens: prefix tokens returned as ``cls``; 0 means "no class token": ``cls`` is then the
            mean of the patch tokens ``(B, 1, D)``.
        mean, std: per-channel normalisation applied to [0, 1] pixels.
        pos_interp: interpolation of the position table to other grids (``bicubic``/``bilinear``).
    """

    name = "timm"

    def __init__(
        self,
        model: nn.Module,
        *,
        num_global_tokens: int,
        mean: Sequence[float],
        std: Sequence[float],
        pos_interp: str = "bicubic",
        identity_extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        for attr in ("patch_embed", "blocks", "norm", "num_prefix_tokens"):
            if not hasattr(model, attr):
                raise ValueError(
                    f"{type(model).__name__} is not a timm VisionTransformer (no {attr!r}); the timm teacher "
                    "reads ViTs only (vit_*, deit_*, eva/dinov2-style models built on VisionTransformer)"
                )
        if num_global_tokens > model.num_prefix_tokens:
            raise ValueError(
                f"num_global_tokens={num_global_tokens} but the model has only {model.num_prefix_tokens} prefix tokens"
            )
        self.model = model
        self.patch_size = int(model.patch_embed.patch_size[0])
        self.embed_dim = int(model.embed_dim)
        self._num_prefix_global = int(num_global_tokens)
        self.num_global_tokens = max(1, int(num_global_tokens))
        self.num_layers = len(model.blocks)
        self.pos_interp = pos_interp
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32), persistent=False)
        self._identity_extra = dict(identity_extra or {})

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        return normalise(pixels, self.mean, self.std)

    @torch.no_grad()
    def encode_image(
        self,
        pixels: torch.Tensor,
        *,
        value_trick: bool = False,
        value_readout: str = "tips",
        layer: int | None = None,
    ) -> DenseFeatures:
        """``(B, 3, H, W)`` [0, 1] pixels -> cls ``(B, C, D)``, patch ``(B, H/p, W/p, D)``."""
        check_pixels(pixels, self.patch_size)
        x = self.normalise(pixels).to(next(self.model.parameters()).dtype)
        feats = vit_dense_forward(
            self.model,
            x,
            num_global_tokens=self._num_prefix_global,
            value_trick=value_trick,
            value_readout=value_readout,
            layer=layer,
            pos_interp=self.pos_interp,
        )
        if self._num_prefix_global == 0:
            feats.cls = feats.patch.mean(dim=(1, 2)).unsqueeze(1)
        return feats

    def identity(self) -> dict[str, Any]:
        out = super().identity()
        out.update(
            mean=[float(v) for v in self.mean],
            std=[float(v) for v in self.std],
            num_layers=self.num_layers,
            pos_interp=self.pos_interp,
        )
        out.update(self._identity_extra)
        return out


def _hub_architecture(repo_id: str, revision: str | None) -> tuple[str, dict[str, Any]]:
    """``(timm architecture, model kwargs)`` from a timm hub repo's ``config.json``."""
    import json

    with open(hub_file(repo_id, "config.json", revision)) as fh:
        cfg = json.load(fh)
    arch = cfg.get("architecture")
    if not arch:
        raise ValueError(
            f"hf-hub:{repo_id}: config.json names no timm 'architecture'; is it a timm model repo?"
        )
    return arch, dict(cfg.get("model_args") or {})


def _hub_weights(repo_id: str, revision: str | None) -> str:
    """The weights file of a timm hub repo (``model.safetensors``, else ``pytorch_model.bin``)."""
    try:
        return hub_file(repo_id, "model.safetensors", revision)
    except ValueError as first:
        try:
            return hub_file(repo_id, "pytorch_model.bin", revision)
        except ValueError:
            raise first from None


@register_teacher("timm")
def build_timm_teacher(
    model_name: str,
    checkpoint: str | os.PathLike[str] | None = None,
    num_global_tokens: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    img_size: int | None = None,
    pos_interp: str | None = None,
    pretrained: bool = False,
    revision: str | None = None,
    **model_kwargs: Any,
) -> TimmViTTeacher:
    """Build a timm ViT by name and load ``checkpoint`` (``.safetensors``/``.pth``/``.bin``, a local path, an
    ``hf-hub:org/name/file`` or a URL), or its released weights from the Hub: ``model_name="hf-hub:timm/<name>"``
    or ``pretrained=True`` (the model's ``hf_hub_id``); from the HF cache when ``HF_HUB_OFFLINE=1``
    (:mod:`teachers.hub`). ``revision`` pins the hub revision.

    ``num_global_tokens`` defaults to 2 for TIPSv2 models (CLS + register), else 1 with a class token
    and 0 without one. ``mean``/``std`` default to the model's ``pretrained_cfg``. ``img_size`` sets the
    size of the position table (must match the checkpoint). Without ``checkpoint`` the model keeps its
    random init (a warning is logged): useful for tests only.
    """
    import timm

    hub_repo = None
    if model_name.startswith("hf-hub:"):
        hub_repo = model_name[len("hf-hub:") :]
        model_name, hub_kwargs = _hub_architecture(hub_repo, revision)
        hub_kwargs.pop("num_classes", None)  # the teacher has no classifier head
        model_kwargs = {**hub_kwargs, **model_kwargs}
    if not timm.is_model(model_name):
        raise ValueError(f"unknown timm model {model_name!r}; see timm.list_models('vit_*')")
    if pretrained and hub_repo is None and checkpoint is None:
        cfg = timm.models.get_pretrained_cfg(model_name)
        hub_repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
        if not hub_repo:
            raise ValueError(
                f"timm model {model_name!r} has no Hub weights (pretrained_cfg.hf_hub_id); pass checkpoint=FILE"
            )
    if hub_repo is not None and checkpoint is None:
        checkpoint = _hub_weights(hub_repo, revision)
    elif checkpoint is not None:
        checkpoint = resolve_file(checkpoint, "timm checkpoint")
    if img_size is not None:
        model_kwargs["img_size"] = img_size
    model = timm.create_model(model_name, pretrained=False, num_classes=0, **model_kwargs)
    source = "(random init)"
    if checkpoint is not None:
        sd = load_state_dict_file(checkpoint)
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}  # classifier heads are not used
        try:
            from timm.models.vision_transformer import checkpoint_filter_fn

            sd = checkpoint_filter_fn(sd, model)
        except (
            Exception
        ) as exc:  # the filter adapts foreign layouts; a failure here is reported by strict_load
            logger.debug("timm checkpoint filter failed on %s: %s", checkpoint, exc)
        strict_load(model, sd, repr(os.fspath(checkpoint)))
        source = (
            f"hf-hub:{hub_repo}" + (f"@{revision}" if revision else "") if hub_repo else os.fspath(checkpoint)
        )
    else:
        logger.warning("timm teacher %s built without a checkpoint: random weights", model_name)
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    mean = tuple(mean if mean is not None else cfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(std if std is not None else cfg.get("std", (0.229, 0.224, 0.225)))
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got mean={mean}, std={std}")
    is_tips = "tipsv2" in model_name
    if num_global_tokens is None:
        if is_tips:
            num_global_tokens = 2
        else:
            num_global_tokens = 1 if getattr(model, "cls_token", None) is not None else 0
    if pos_interp is None:
        pos_interp = "bilinear" if is_tips else "bicubic"
    return TimmViTTeacher(
        model,
        num_global_tokens=num_global_tokens,
        mean=mean,
        std=std,
        pos_interp=pos_interp,
        identity_extra={"name": "timm", "model_name": model_name, "checkpoint": source},
    )
