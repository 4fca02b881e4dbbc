"""Trainable ViT students: any timm ``VisionTransformer`` by name with size overrides.

``build_student(name, pretrained=False, **overrides)`` returns a :class:`Student`, which implements
:class:`teachers.base.DenseEncoder` (so evaluation treats teachers and students alike) plus
``forward(pixels, mask=None)`` with a learned iBOT mask token.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import timm
import torch
from torch import nn

from tipsdistill.teachers.base import VALUE_READOUTS, DenseEncoder, DenseFeatures, check_pixels
from tipsdistill.teachers.vit import vit_dense_forward

from .variants import resolve_student_name

logger = logging.getLogger(__name__)

#: keys of ``Student.config``; ``build_student(**config)`` rebuilds the architecture.
CONFIG_KEYS = (
    "name",
    "overrides",
    "num_global_tokens",
    "mean",
    "std",
    "pos_interp",
    "text",
    "text_dim",
    "check_inputs",
    "adaptors",  # per-teacher adaptor heads (students.adaptors), several-teacher runs
)


class Student(DenseEncoder):
    """A trainable dense encoder around a timm ViT.

    Attributes:
        vit: the timm ``VisionTransformer`` (classifier head removed).
        mask_token: learned ``(D,)`` embedding that replaces masked patch embeddings before the
            position embedding is added (iBOT). Initialised to zeros (DINOv2).
        text: optional text tower (``students.text``) mapping ``list[str] -> (B, text_dim)``.
        text_proj: the student's text interface when its text space is wider or narrower than its
            tokens: ``nn.Linear(embed_dim, text_dim, bias=False)`` learned against the teacher's caption
            embeddings (``None``: the tokens live in the text space, ``text_dim == embed_dim``).
            :meth:`project_to_text` applies it to global, patch and value-trick tokens alike.
        config: JSON-serialisable dict; ``build_student(**student.config)`` rebuilds the same
            architecture (weights are not included).
    """

    def __init__(
        self,
        vit: nn.Module,
        *,
        num_global_tokens: int,
        mean: Sequence[float] = (0.0, 0.0, 0.0),
        std: Sequence[float] = (1.0, 1.0, 1.0),
        text: nn.Module | None = None,
        text_dim: int | None = None,
        pos_interp: str = "bicubic",
        check_inputs: bool = True,
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not hasattr(vit, "blocks") or not hasattr(vit, "patch_embed"):
            raise ValueError(f"student backbone must be a timm VisionTransformer, got {type(vit).__name__}")
        self.vit = vit
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.embed_dim = int(vit.embed_dim)
        self.num_layers = len(vit.blocks)
        prefix = int(vit.num_prefix_tokens)
        if not 1 <= num_global_tokens <= max(prefix, 1) or prefix == 0:
            raise ValueError(
                f"num_global_tokens={num_global_tokens} but the ViT has {prefix} prefix tokens (cls + registers); "
                "pick a value in [1, num_prefix_tokens] or a model with class_token=True"
            )
        self.num_global_tokens = int(num_global_tokens)
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"mean/std must be 3 values each with std > 0, got mean={mean}, std={std}")
        self.register_buffer(
            "pixel_mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.mask_token = nn.Parameter(torch.zeros(self.embed_dim))
        self.text = text
        self.has_text = text is not None
        self._text_dim = self.embed_dim
        self.text_proj: nn.Module | None = None
        self.pos_interp = pos_interp
        self.check_inputs = check_inputs
        self.config: dict[str, Any] = dict(config or {})
        if text_dim is not None:
            self.set_text_dim(text_dim)

    # ------------------------------------------------------------------ image
    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` [0, 1] -> normalised pixels ``(pixels - mean) / std`` in the weights' dtype."""
        x = (pixels - self.pixel_mean.to(pixels.dtype)) / self.pixel_std.to(pixels.dtype)
        return x.to(self.vit.patch_embed.proj.weight.dtype)

    def forward(
        self,
        pixels: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        value_trick: bool = False,
        value_readout: str = "tips",
        layer: int | None = None,
    ) -> DenseFeatures:
        """Training forward.

        Args:
            pixels: ``(B, 3, H, W)`` RGB in [0, 1]; H, W multiples of ``patch_size``.
            mask: optional bool ``(B, h*w)`` or ``(B, h, w)``; True patches are replaced by
                ``mask_token`` before position embeddings (iBOT). ``None``: no masking.
            value_trick / value_readout / layer: as in :meth:`encode_image`.
        Returns:
            :class:`DenseFeatures` with ``cls (B, C, D)``, ``patch (B, h, w, D)`` and optional
            ``value_patch (B, h, w, D)``; gradients flow.
        """
        if self.check_inputs:
            check_pixels(pixels, self.patch_size)
        if value_readout not in VALUE_READOUTS:
            raise ValueError(f"unknown value readout {value_readout!r}; choose one of {VALUE_READOUTS}")
        if mask is not None:
            if mask.dtype != torch.bool:
                raise ValueError(f"mask must be a bool tensor (True = masked), got dtype {mask.dtype}")
            mask = mask.to(pixels.device)
        return vit_dense_forward(
            self.vit,
            self.normalise(pixels),
            num_global_tokens=self.num_global_tokens,
            mask=mask,
            mask_token=self.mask_token if mask is not None else None,
            value_trick=value_trick,
            value_readout=value_readout,
            layer=layer,
            pos_interp=self.pos_interp,
        )

    def encode_image(
        self,
        pixels: torch.Tensor,
        *,
        value_trick: bool = False,
        value_readout: str = "tips",
        layer: int | None = None,
    ) -> DenseFeatures:
        """DenseEncoder readout (no mask); same as ``forward(pixels, None, ...)``."""
        return self.forward(pixels, None, value_trick=value_trick, value_readout=value_readout, layer=layer)

    # ------------------------------------------------------------------- text
    @property
    def text_dim(self) -> int:
        return self._text_dim

    def set_text_dim(self, text_dim: int) -> None:
        """Align the student with a text space of width ``text_dim``: a new (randomly initialised, as
        ``nn.Linear``) projection ``text_proj`` when it differs from ``embed_dim``, none when equal;
        ``config["text_dim"]`` records it so the student is rebuilt with it."""
        if isinstance(text_dim, bool) or not isinstance(text_dim, int) or text_dim <= 0:
            raise ValueError(
                f"text_dim must be a positive int (the width of the text space), got {text_dim!r}"
            )
        if self.text is not None and getattr(self.text, "out_dim", text_dim) != text_dim:
            raise ValueError(
                f"the student's text tower embeds to width {self.text.out_dim}, not text_dim={text_dim}; "
                "a student with its own text tower is aligned with that tower's space"
            )
        self._text_dim = int(text_dim)
        if text_dim == self.embed_dim:
            self.text_proj = None
            self.config.pop("text_dim", None)
            return
        if self.text_proj is None or self.text_proj.out_features != text_dim:
            weight = next(self.parameters())
            self.text_proj = nn.Linear(self.embed_dim, text_dim, bias=False).to(weight.device, weight.dtype)
        self.config["text_dim"] = int(text_dim)

    def project_to_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(..., embed_dim)`` tokens -> ``(..., text_dim)`` through :attr:`text_proj` (identity without one),
        computed in the projection's dtype."""
        if self.text_proj is None:
            return tokens
        return self.text_proj(tokens.to(self.text_proj.weight.dtype))

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """``list[str]`` -> ``(B, text_dim)`` unnormalised text embeddings (needs a text tower)."""
        if self.text is None:
            return super().encode_text(texts)
        return self.text(texts)

    # ------------------------------------------------------------- adaptors (several teachers)
    def adaptor(self, name: str) -> DenseEncoder:
        """The student seen through teacher ``name``'s adaptor (:class:`students.adaptors.AdaptedEncoder`)."""
        from .adaptors import AdaptedEncoder

        return AdaptedEncoder(self, name)

    def identity(self) -> dict[str, Any]:
        ident = super().identity()
        ident.update(
            {
                "num_layers": self.num_layers,
                "has_text": self.has_text,
                "text_dim": self.text_dim,
                "config": copy.deepcopy(self.config),
            }
        )
        return ident


def build_student(
    name: str,
    pretrained: bool = False,
    *,
    num_global_tokens: int | None = None,
    mean: Sequence[float] = (0.0, 0.0, 0.0),
    std: Sequence[float] = (1.0, 1.0, 1.0),
    text: dict[str, Any] | None = None,
    text_dim: int | None = None,
    pos_interp: str = "bicubic",
    check_inputs: bool = True,
    overrides: dict[str, Any] | None = None,
    adaptors: dict[str, dict[str, Any]] | None = None,
    **kw_overrides: Any,
) -> Student:
    """Build a student from any timm ViT name (random init by default).

    Args:
        name: timm model name, e.g. ``"vit_w96d4_patch8_reg1_tipsv2_64"`` (the small TIPSv2 shapes of
            :mod:`students.variants`), ``"vit_base_patch14_reg1_tipsv2"``, ``"vit_small_patch16_224"``;
            the base name with overrides that make a registered shape is that name (warned).
        pretrained: load timm's pretrained weights (needs them cached locally when offline).
        num_global_tokens: how many prefix tokens are returned as ``cls``; default all prefix tokens
            (cls + registers: 2 for the TIPSv2 architecture).
        mean, std: input normalisation applied to [0, 1] pixels (default mean 0, std 1, like TIPS).
        text: optional text tower config, passed to :func:`students.text.build_text_tower` with
            ``out_dim = text_dim`` (e.g. ``{"kind": "tips", "tokenizer": "spm.model", "depth": 2}``,
            ``{"kind": "tips", "init": "tips_v2_b14_text.npz", "tokenizer": "tokenizer.model"}``,
            ``{"kind": "hf", "path": "org/name"}`` or ``{"kind": "teacher", "teacher": "embedded"}``).
            ``config["text"]`` records the tower's architecture (``tower.arch()``), not its source.
        text_dim: width of the text space the student is aligned with (the teacher's caption
            embeddings); when it differs from the ViT's width the student carries a learned projection
            ``text_proj`` (its text interface). ``None``: a pretrained text tower's own width (a TIPS
            checkpoint's, the teacher's), else the ViT's width.
        overrides / **kw_overrides: timm ``create_model`` kwargs (``embed_dim``, ``depth``,
            ``num_heads``, ``img_size``, ``patch_size``, ``mlp_ratio``, ``reg_tokens``...).
        adaptors: per-teacher adaptor heads, name -> spec (:func:`students.adaptors.attach_adaptors`).
    Returns:
        :class:`Student`; ``student.config`` holds all of the above so ``build_student(**config)``
        rebuilds it.
    """
    ov = dict(overrides or {})
    ov.update(kw_overrides)
    name, ov = resolve_student_name(name, ov)  # an old spelling of a registered shape: its name, warned
    if "num_classes" in ov and ov["num_classes"] != 0:
        raise ValueError("students have no classifier; drop num_classes from the overrides")
    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}; see timm.list_models('vit_*')")
    try:
        vit = timm.create_model(name, pretrained=pretrained, num_classes=0, **ov)
    except TypeError as e:
        raise ValueError(
            f"bad overrides for timm model {name!r}: {e}; valid ones are VisionTransformer kwargs"
        ) from e
    if not hasattr(vit, "blocks") or not hasattr(vit, "num_prefix_tokens"):
        raise ValueError(f"timm model {name!r} is not a VisionTransformer (no blocks / prefix tokens)")
    ngt = int(vit.num_prefix_tokens) if num_global_tokens is None else int(num_global_tokens)
    tower = None
    if text is not None:
        from .text import build_text_tower

        text = dict(text)
        if text_dim is not None:
            if text.get("out_dim") not in (None, text_dim):
                raise ValueError(
                    f"student text_dim={text_dim} but its text tower's out_dim={text['out_dim']}; set one of them"
                )
            text["out_dim"] = int(text_dim)
        tower = build_text_tower(default_dim=int(vit.embed_dim), **text)
        text_dim = int(tower.out_dim)  # a pretrained tower brings its own text space
    config = {
        "name": name,
        "overrides": ov,
        "num_global_tokens": ngt,
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "pos_interp": pos_interp,
        # the architecture only (no pretrained source): build_student(**config) + the trained weights
        "text": tower.arch() if tower is not None else None,
        "check_inputs": check_inputs,
    }
    student = Student(
        vit,
        num_global_tokens=ngt,
        mean=mean,
        std=std,
        text=tower,
        text_dim=text_dim,  # recorded in config["text_dim"] when it differs from the ViT's width
        pos_interp=pos_interp,
        check_inputs=check_inputs,
        config=config,
    )
    if adaptors:
        from .adaptors import attach_adaptors

        attach_adaptors(student, adaptors)
    logger.info(
        "student %s: %d blocks x %d dims, patch %d, %d global tokens, %.1fM params",
        name,
        student.num_layers,
        student.embed_dim,
        student.patch_size,
        ngt,
        sum(p.numel() for p in student.parameters()) / 1e6,
    )
    return student


def student_from_config(config: dict[str, Any]) -> Student:
    """Rebuild a student (random weights) from ``Student.config``; unknown keys are an error."""
    unknown = set(config) - set(CONFIG_KEYS)
    if unknown:
        raise ValueError(f"unknown student config keys {sorted(unknown)}; known: {list(CONFIG_KEYS)}")
    cfg = copy.deepcopy(config)
    return build_student(cfg.pop("name"), **cfg)
