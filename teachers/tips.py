"""Official TIPS / TIPSv2 checkpoints (google-deepmind/tips ``pytorch/``) as a frozen teacher.

``build_teacher("tips", vision_ckpt="tips_v2_b14_vision.npz", text_ckpt="tips_v2_b14_text.npz",
tokenizer="tokenizer.model", variant="B", version=2)``

* Vision ``*_vision.npz``: DINOv2 key names (``cls_token``, ``register_tokens``, ``mask_token``,
  ``pos_embed`` with the CLS position first, ``patch_embed.proj``, ``blocks.{i}.{norm1,attn.qkv,attn.proj,
  ls1.gamma,norm2,mlp.fc1|w12,mlp.fc2|w3,ls2.gamma}``, ``norm``). Loaded, with strict key matching,
  into timm's ``vit_*_patch14_reg1_tipsv2`` layout (register token = CLS2, no position on prefix tokens).
* Text ``*_text.npz``: the text tower's own names plus ``temperature`` -> :class:`TipsTextTower`.
* Inputs: RGB in [0, 1] with mean 0 / std 1; position table (16x16 in v1, 32x32 in v2) resized
  bilinearly with antialias. Outputs: ``cls = [CLS1, CLS2]``, patch tokens after the final norm.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .base import DenseFeatures, Teacher, check_key_set, check_pixels, register_teacher
from .hub import resolve_file
from .tips_text import TEXT_CONFIGS, TextTowerConfig, TipsTextTower, TipsTokenizer
from .vit import vit_dense_forward

logger = logging.getLogger(__name__)

PATCH_SIZE = 14
GRID_BY_VERSION = {1: 16, 2: 32}  # side of the stored patch position grid


@dataclass(frozen=True)
class TipsVariant:
    """Vision (and matching text) tower size of a TIPS model. ``mlp_dim`` is fc1's width (w12's for SwiGLU)."""

    name: str
    embed_dim: int
    depth: int
    num_heads: int
    mlp_dim: int
    swiglu: bool = False
    text: TextTowerConfig | None = field(default=None, compare=False)
    timm_name: str | None = field(default=None, compare=False)


VARIANTS: dict[str, TipsVariant] = {
    "S": TipsVariant("S", 384, 12, 6, 1536, False, TEXT_CONFIGS["S"], None),
    "B": TipsVariant("B", 768, 12, 12, 3072, False, TEXT_CONFIGS["B"], "vit_base_patch14_reg1_tipsv2"),
    "L": TipsVariant("L", 1024, 24, 16, 4096, False, TEXT_CONFIGS["L"], "vit_large_patch14_reg1_tipsv2"),
    "SO": TipsVariant("SO", 1152, 27, 16, 4304, False, TEXT_CONFIGS["SO"], "vit_so400m_patch14_reg1_tipsv2"),
    "g": TipsVariant("g", 1536, 40, 24, 8192, True, TEXT_CONFIGS["g"], "vit_giant_patch14_reg1_tipsv2"),
}
_ALIASES = {"s": "S", "b": "B", "l": "L", "so": "SO", "so400m": "SO", "so400": "SO", "g": "g", "giant": "g"}


def resolve_variant(variant: str | TipsVariant | dict[str, Any]) -> TipsVariant:
    """A variant letter (``S/B/L/SO/g``), a :class:`TipsVariant`, or a dict of its fields (custom sizes).

    A dict may carry ``text`` as a dict of :class:`TextTowerConfig` fields.
    """
    if isinstance(variant, TipsVariant):
        return variant
    if isinstance(variant, dict):
        kw = dict(variant)
        kw.setdefault("name", "custom")
        if isinstance(kw.get("text"), dict):
            kw["text"] = TextTowerConfig(**kw["text"])
        return TipsVariant(**kw)
    key = _ALIASES.get(str(variant).lower())
    if key is None:
        raise ValueError(
            f"unknown TIPS variant {variant!r}; choose one of {list(VARIANTS)} (or pass explicit dims)"
        )
    return VARIANTS[key]


def load_npz(path: str | os.PathLike[str], kind: str) -> dict[str, torch.Tensor]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"TIPS {kind} checkpoint {path!r} not found; pass the path of the released *_{kind}.npz"
        )
    if not path.endswith(".npz"):
        raise ValueError(
            f"TIPS {kind} checkpoint {path!r} is not an .npz file (the official PyTorch release format)"
        )
    with np.load(path, allow_pickle=False) as data:
        return {k: torch.from_numpy(np.array(data[k])) for k in data.files}


def _block_count(sd: dict[str, Any], pattern: str) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(pattern, k))}
    return max(idx) + 1 if idx else 0


def describe_vision_checkpoint(
    sd: dict[str, torch.Tensor], source: str = "checkpoint"
) -> tuple[TipsVariant, int]:
    """Architecture (a published variant when the shapes match one, else ``custom``) and version of an official vision state dict."""
    if "token_embedding.weight" in sd:
        raise ValueError(
            f"{source} is a TIPS *text* checkpoint (it has token_embedding.weight); pass it as text_ckpt"
        )
    required = (
        "cls_token",
        "register_tokens",
        "pos_embed",
        "patch_embed.proj.weight",
        "norm.weight",
        "blocks.0.attn.qkv.weight",
    )
    missing = [k for k in required if k not in sd]
    if missing:
        hint = ""
        if any(k.startswith(("vision_model.", "embeddings.", "vision_encoder.")) for k in sd):
            hint = " It looks like a transformers checkpoint: use build_teacher('hf', ...)."
        elif "reg_token" in sd:
            hint = " It looks like a timm checkpoint: use build_teacher('timm', ...)."
        raise ValueError(
            f"{source} is not an official TIPS vision checkpoint: missing keys {missing} "
            f"(found e.g. {sorted(sd)[:5]}).{hint}"
        )
    D = int(sd["cls_token"].shape[-1])
    depth = _block_count(sd, r"blocks\.(\d+)\.")
    swiglu = "blocks.0.mlp.w12.weight" in sd
    mlp = int(sd["blocks.0.mlp.w12.weight" if swiglu else "blocks.0.mlp.fc1.weight"].shape[0])
    n = int(sd["pos_embed"].shape[1]) - 1
    side = int(round(n**0.5))
    version = {v: k for k, v in GRID_BY_VERSION.items()}.get(side, 0) if side * side == n else 0
    for var in VARIANTS.values():
        if (var.embed_dim, var.depth, var.mlp_dim, var.swiglu) == (D, depth, mlp, swiglu):
            return var, version
    heads = max(1, D // 64)
    return TipsVariant("custom", D, depth, heads, mlp, swiglu), version


def _describe(v: TipsVariant) -> str:
    return f"{v.name} (dim {v.embed_dim}, depth {v.depth}, mlp {v.mlp_dim}{', SwiGLU' if v.swiglu else ''})"


def build_vision_tower(variant: TipsVariant, grid: int = 32) -> nn.Module:
    """timm ViT with the TIPS vision architecture and a ``grid x grid`` position table (random init)."""
    import timm
    from timm.layers import SwiGLUPacked
    from timm.models.vision_transformer import VisionTransformer

    kw: dict[str, Any] = dict(img_size=grid * PATCH_SIZE, num_classes=0)
    if variant.timm_name is not None and variant == VARIANTS.get(variant.name):
        return timm.create_model(variant.timm_name, pretrained=False, **kw)
    extra: dict[str, Any] = {}
    if variant.swiglu:
        extra = dict(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)
    return VisionTransformer(
        patch_size=PATCH_SIZE,
        embed_dim=variant.embed_dim,
        depth=variant.depth,
        num_heads=variant.num_heads,
        mlp_ratio=(variant.mlp_dim + 0.5) / variant.embed_dim,  # +0.5: int() gives mlp_dim exactly
        init_values=1.0,
        reg_tokens=1,
        no_embed_class=True,
        **kw,
        **extra,
    )


def official_to_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official (DINOv2-named) TIPS vision state dict -> timm ``vit_*_reg1_tipsv2`` names (mask_token dropped)."""
    out: dict[str, torch.Tensor] = {}
    pos = sd["pos_embed"]
    out["cls_token"] = sd["cls_token"] + pos[:, :1]  # DINOv2 adds the first position to CLS only
    out["reg_token"] = sd["register_tokens"]
    out["pos_embed"] = pos[:, 1:]
    for k, v in sd.items():
        if k in ("cls_token", "register_tokens", "pos_embed", "mask_token"):
            continue
        out[k.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")] = v
    return out


def timm_to_official(
    sd: dict[str, torch.Tensor], mask_token: torch.Tensor | None = None, swiglu: bool = False
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`official_to_timm` (CLS position set to zero); used to write official-layout files."""
    out: dict[str, torch.Tensor] = {}
    D = sd["cls_token"].shape[-1]
    out["cls_token"] = sd["cls_token"].clone()
    out["register_tokens"] = sd["reg_token"].clone()
    out["pos_embed"] = torch.cat([torch.zeros(1, 1, D, dtype=sd["pos_embed"].dtype), sd["pos_embed"]], dim=1)
    out["mask_token"] = mask_token if mask_token is not None else torch.zeros(1, D)
    for k, v in sd.items():
        if k in ("cls_token", "reg_token", "pos_embed"):
            continue
        if swiglu:
            k = k.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.")
        out[k] = v.clone()
    return out


def describe_text_checkpoint(sd: dict[str, torch.Tensor], source: str = "checkpoint") -> TextTowerConfig:
    """The size of an official TIPS text state dict, read from its shapes: vocabulary and width from
    ``token_embedding.weight``, depth from the ``transformer.resblocks.{i}`` count, MLP width from
    ``mlp.c_fc``; heads (not in the shapes) from the published tower of that size, else width / 64."""
    if "cls_token" in sd or "pos_embed" in sd:
        raise ValueError(
            f"{source} is a TIPS *vision* checkpoint; pass it as vision_ckpt, the *_text.npz as text_ckpt"
        )
    if "token_embedding.weight" not in sd or "temperature" not in sd:
        raise ValueError(
            f"{source} is not an official TIPS text checkpoint: it needs token_embedding.weight and temperature "
            f"(found e.g. {sorted(sd)[:5]})"
        )
    vocab, width = (int(s) for s in sd["token_embedding.weight"].shape)
    depth = _block_count(sd, r"transformer\.resblocks\.(\d+)\.")
    mlp = int(sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]) if depth else 0
    for cfg in TEXT_CONFIGS.values():
        if (cfg.width, cfg.depth, cfg.mlp_dim) == (width, depth, mlp):
            return TextTowerConfig(width, depth, cfg.num_heads, mlp, vocab)
    return TextTowerConfig(width, depth, max(1, width // 64), mlp, vocab)


def load_text_tower(
    path: str | os.PathLike[str] | dict[str, torch.Tensor], variant: TipsVariant, source: str | None = None
) -> TipsTextTower:
    """Build a :class:`TipsTextTower` for ``variant`` and load an official ``*_text.npz`` strictly."""
    sd = path if isinstance(path, dict) else load_npz(path, "text")
    source = source or repr(os.fspath(path) if not isinstance(path, dict) else "text state dict")
    found = describe_text_checkpoint(sd, source)
    vocab, width, depth, mlp = found.vocab_size, found.width, found.depth, found.mlp_dim
    cfg = variant.text
    if cfg is None:
        cfg = found
    if (cfg.width, cfg.depth, cfg.mlp_dim) != (width, depth, mlp):
        raise ValueError(
            f"{source} is a text tower of width {width}, depth {depth}, mlp {mlp}; variant {variant.name!r} "
            f"expects width {cfg.width}, depth {cfg.depth}, mlp {cfg.mlp_dim}: pass the text file of the same variant"
        )
    tower = TipsTextTower(vocab, cfg.width, cfg.depth, cfg.num_heads, cfg.mlp_dim, cfg.max_len)
    load_text_state(tower, sd, source)
    return tower


def load_text_state(tower: TipsTextTower, sd: dict[str, torch.Tensor], source: str) -> None:
    """Load an official text state dict into ``tower`` strictly (same keys and shapes, else an error
    listing them); ``temperature`` may be stored with any shape of one element."""
    sd = dict(sd)
    sd["temperature"] = sd["temperature"].reshape(())
    check_key_set(sd, tower.state_dict(), f"{source} does not match the official TIPS key set")
    tower.load_state_dict(sd, strict=True)


class TipsTeacher(Teacher):
    """Frozen official TIPS model: two global tokens ``[CLS1, CLS2]``, patch 14, optional text tower."""

    name = "tips"
    patch_size = PATCH_SIZE
    num_global_tokens = 2

    def __init__(
        self,
        vision: nn.Module,
        variant: TipsVariant,
        version: int,
        text: TipsTextTower | None = None,
        tokenizer: TipsTokenizer | None = None,
        mask_token: torch.Tensor | None = None,
        sources: dict[str, str | None] | None = None,
    ) -> None:
        super().__init__()
        self.model = vision
        self.text = text
        self.tokenizer = tokenizer
        self.variant = variant
        self.version = version
        self.embed_dim = variant.embed_dim
        self.num_layers = variant.depth
        self.has_text = text is not None
        self.register_buffer(
            "mask_token", mask_token if mask_token is not None else torch.zeros(1, variant.embed_dim)
        )
        self._sources = dict(sources or {})

    @property
    def temperature(self) -> float | None:
        return None if self.text is None else float(self.text.temperature)

    @torch.no_grad()
    def encode_image(
        self,
        pixels: torch.Tensor,
        *,
        value_trick: bool = False,
        value_readout: str = "tips",
        layer: int | None = None,
    ) -> DenseFeatures:
        """``(B, 3, H, W)`` [0, 1] -> cls ``(B, 2, D)`` ([CLS1, CLS2]), patch ``(B, H/14, W/14, D)``."""
        check_pixels(pixels, self.patch_size)
        x = pixels.to(self.mask_token.dtype)  # TIPS: mean 0, std 1
        return vit_dense_forward(
            self.model,
            x,
            num_global_tokens=2,
            value_trick=value_trick,
            value_readout=value_readout,
            layer=layer,
            pos_interp="bilinear",
        )

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Strings -> ``(B, D)`` unnormalised text embeddings."""
        if self.text is None or self.tokenizer is None:
            raise ValueError(
                "this TIPS teacher has no text tower: build it with text_ckpt=... and tokenizer=..."
            )
        if isinstance(texts, str):
            texts = [texts]
        empty = [i for i, t in enumerate(texts) if isinstance(t, str) and not t.strip()]
        if empty:
            raise ValueError(f"empty text at positions {empty[:10]}; drop missing captions before encoding")
        ids, pad = self.tokenizer(texts)
        return self.text(ids.to(self.mask_token.device), pad.to(self.mask_token.device))

    def identity(self) -> dict[str, Any]:
        out = super().identity()
        out.update(
            name="tips",
            variant=self.variant.name,
            version=self.version,
            num_layers=self.num_layers,
            has_text=self.has_text,
            mean=[0.0, 0.0, 0.0],
            std=[1.0, 1.0, 1.0],
            **self._sources,
        )
        return out


@register_teacher("tips")
def build_tips_teacher(
    vision_ckpt: str | os.PathLike[str],
    text_ckpt: str | os.PathLike[str] | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    variant: str | TipsVariant | dict[str, Any] = "B",
    version: int = 2,
) -> TipsTeacher:
    """Load official TIPS v1/v2 ``.npz`` checkpoints (vision, optionally text + SentencePiece tokenizer).

    ``variant``: ``S``, ``B``, ``L``, ``SO`` (So400m) or ``g``; or explicit dims (a dict of
    :class:`TipsVariant` fields) for custom sizes. ``version``: 1 (16x16 position grid) or 2 (32x32).
    """
    if version not in GRID_BY_VERSION:
        raise ValueError(f"TIPS version must be 1 or 2, got {version!r}")
    # local paths, hub files (hf-hub:org/name/file.npz) or URLs; from the HF cache when offline. The names
    # as given are the teacher's identity (the same on every machine), not the resolved cache paths.
    given = {
        "vision_ckpt": os.fspath(vision_ckpt),
        "text_ckpt": None if text_ckpt is None else os.fspath(text_ckpt),
        "tokenizer": None if tokenizer is None else os.fspath(tokenizer),
    }
    vision_ckpt = resolve_file(vision_ckpt, "TIPS vision checkpoint")
    text_ckpt = None if text_ckpt is None else resolve_file(text_ckpt, "TIPS text checkpoint")
    tokenizer = None if tokenizer is None else resolve_file(tokenizer, "TIPS tokenizer")
    want = resolve_variant(variant)
    if text_ckpt is not None and tokenizer is None:
        raise ValueError(
            "text_ckpt was given without tokenizer: pass tokenizer=path/to/tokenizer.model (the SentencePiece "
            "model released with TIPS) to encode text"
        )
    src = repr(os.fspath(vision_ckpt))
    sd = load_npz(vision_ckpt, "vision")
    found, found_version = describe_vision_checkpoint(sd, src)
    if want.name != "custom" and found != want:
        raise ValueError(
            f"{src} holds TIPS variant {_describe(found)}, but variant={want.name!r} {_describe(want)} was "
            f"requested; pass variant={found.name!r}"
            + (" (or explicit dims)" if found.name == "custom" else "")
        )
    if want.name == "custom" and (want.embed_dim, want.depth, want.mlp_dim, want.swiglu) != (
        found.embed_dim,
        found.depth,
        found.mlp_dim,
        found.swiglu,
    ):
        raise ValueError(
            f"{src} holds a TIPS model {_describe(found)}, which does not match the given dims {_describe(want)}"
        )
    if found_version != version:
        n = int(sd["pos_embed"].shape[1]) - 1
        what = f"TIPS v{found_version}" if found_version else "neither TIPS v1 (16x16) nor v2 (32x32)"
        raise ValueError(
            f"{src} has a position table of {n} patches, i.e. {what}; version={version} was requested"
        )
    grid = GRID_BY_VERSION[version]
    vision = build_vision_tower(want, grid)
    expected = timm_to_official(vision.state_dict(), swiglu=want.swiglu)
    check_key_set(sd, expected, f"{src} does not match the official TIPS key set")
    vision.load_state_dict(official_to_timm(sd), strict=True)
    text = tok = None
    if text_ckpt is not None:
        tok = TipsTokenizer(tokenizer)  # type: ignore[arg-type]
        text = load_text_tower(text_ckpt, want)
        if text.width != want.embed_dim:
            raise ValueError(f"text tower width {text.width} differs from the vision width {want.embed_dim}")
        n_emb = text.token_embedding.num_embeddings
        if tok.vocab_size > n_emb:
            raise ValueError(
                f"tokenizer {os.fspath(tokenizer)!r} has {tok.vocab_size} pieces but the text tower embeds only {n_emb}; "
                "pass the tokenizer released with this checkpoint"
            )
    elif tokenizer is not None:
        logger.warning("tokenizer given without text_ckpt: the TIPS teacher will have no text tower")
    return TipsTeacher(
        vision,
        want,
        version,
        text=text,
        tokenizer=tok,
        mask_token=sd["mask_token"].float(),
        sources=given,
    )
