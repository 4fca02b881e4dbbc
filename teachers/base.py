"""The one interface every frozen teacher (and every student) presents to the rest of the toolkit.

Inputs are always RGB pixels in [0, 1], shape ``(B, 3, H, W)``; each model applies its own
normalisation. Outputs are :class:`DenseFeatures`.
"""

from __future__ import annotations

import inspect
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

VALUE_READOUTS = ("tips", "maskclip")


@dataclass
class DenseFeatures:
    """Dense features of a batch of images.

    Attributes:
        cls: global tokens ``(B, C, D)`` (C = number of global tokens; TIPS has two).
        patch: patch tokens ``(B, h, w, D)`` of the requested layer after the final norm.
        value_patch: value-trick patch tokens ``(B, h, w, D)`` when asked for, else ``None``.
        extras: anything model specific (for example pooled logits), never needed by callers.
    """

    cls: torch.Tensor
    patch: torch.Tensor
    value_patch: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.patch.shape[1]), int(self.patch.shape[2])

    def to(self, *args: Any, **kwargs: Any) -> DenseFeatures:
        vp = None if self.value_patch is None else self.value_patch.to(*args, **kwargs)
        return DenseFeatures(self.cls.to(*args, **kwargs), self.patch.to(*args, **kwargs), vp, self.extras)


def check_pixels(pixels: torch.Tensor, patch_size: int, name: str = "pixels") -> None:
    """Validate a batch of [0, 1] RGB pixels; raise a ValueError naming the problem and the fix."""
    if not isinstance(pixels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, 3, H, W), got {type(pixels).__name__}")
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(
            f"{name} must have shape (B, 3, H, W) with 3 RGB channels, got {tuple(pixels.shape)}; "
            "convert grayscale/RGBA images to RGB first (PIL: image.convert('RGB'))"
        )
    if not pixels.is_floating_point():
        raise ValueError(
            f"{name} must be floating point in [0, 1], got dtype {pixels.dtype}; divide uint8 images by 255"
        )
    if pixels.numel():
        lo, hi = float(pixels.min()), float(pixels.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(
                f"{name} must be RGB in [0, 1], got values in [{lo:.3f}, {hi:.3f}]; pass raw pixels "
                "divided by 255 (each model applies its own normalisation)"
            )
    h, w = pixels.shape[-2:]
    if h < patch_size or w < patch_size:
        raise ValueError(
            f"{name} is {h}x{w}, smaller than one patch ({patch_size}x{patch_size}); upsample it first"
        )


class DenseEncoder(nn.Module, ABC):
    """Common surface of teachers and students: what caching, training and evaluation rely on."""

    patch_size: int
    embed_dim: int
    num_global_tokens: int
    has_text: bool = False
    num_layers: int = 0

    @abstractmethod
    def encode_image(
        self,
        pixels: torch.Tensor,
        *,
        value_trick: bool = False,
        value_readout: str = "tips",
        layer: int | None = None,
    ) -> DenseFeatures:
        """Encode ``(B, 3, H, W)`` [0, 1] pixels into :class:`DenseFeatures`.

        ``layer`` (block index, negative from the end) picks an intermediate block whose tokens go
        through the final norm; ``value_trick`` also returns ``value_patch`` computed with the
        MaskCLIP value trick in that block (``value_readout``: ``"tips"`` keeps residual and MLP,
        ``"maskclip"`` is the value projection alone).
        """

    @property
    def text_dim(self) -> int:
        """Width of the text space the tokens are compared with (:meth:`project_to_text`'s output width):
        ``embed_dim`` unless the model carries a projection into another text space (a student of
        another width than its teacher's text embeddings)."""
        return int(self.embed_dim)

    def project_to_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Map image tokens ``(..., embed_dim)`` (global, patch or value-trick tokens, unnormalised) into
        the text space, ``(..., text_dim)``. Identity for a model whose tokens already live there (TIPS:
        one shared space, no projection head)."""
        return tokens

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Embed a list of strings to ``(B, D)`` (unnormalised)."""
        raise ValueError(
            f"{type(self).__name__} has no text tower (has_text=False); use a text model of its own"
        )

    def identity(self) -> dict[str, Any]:
        """What identifies this model in cache metadata and reports (JSON serialisable)."""
        return {
            "class": type(self).__name__,
            "patch_size": self.patch_size,
            "embed_dim": self.embed_dim,
            "num_global_tokens": self.num_global_tokens,
        }


class Teacher(DenseEncoder):
    """A frozen teacher: eval mode, no gradients."""

    name: str = "teacher"

    def freeze(self) -> Teacher:
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> Teacher:  # teachers stay in eval mode
        return super().train(False)


_REGISTRY: dict[str, Callable[..., Teacher]] = {}


def register_teacher(name: str) -> Callable[[Callable[..., Teacher]], Callable[..., Teacher]]:
    def deco(fn: Callable[..., Teacher]) -> Callable[..., Teacher]:
        if name in _REGISTRY:
            raise ValueError(f"teacher {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn

    return deco


def list_teachers() -> list[str]:
    return sorted(_REGISTRY)


def location_kwarg(name: str) -> str:
    """The keyword a teacher spec's value fills (``timm:MODEL`` -> ``model_name``): the first parameter of
    the registered builder (timm ``model_name``, hf ``model``, tips ``vision_ckpt``, embedded ``path``)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown teacher {name!r}; known teachers: {', '.join(list_teachers())}")
    params = list(inspect.signature(_REGISTRY[name]).parameters.values())
    if not params or params[0].kind not in (params[0].POSITIONAL_OR_KEYWORD, params[0].KEYWORD_ONLY):
        raise ValueError(f"teacher {name!r} takes no location argument; give its kwargs as key=value")
    return params[0].name


def build_teacher(name: str, **kwargs: Any) -> Teacher:
    """Build a frozen teacher by registry name (see :func:`list_teachers`)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown teacher {name!r}; known teachers: {', '.join(list_teachers())}")
    teacher = _REGISTRY[name](**kwargs)
    return teacher.freeze()


def normalise(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(pixels - mean) / std`` per channel; ``mean``/``std`` are ``(3,)`` buffers."""
    return (pixels - mean.to(pixels).view(1, -1, 1, 1)) / std.to(pixels).view(1, -1, 1, 1)


def check_key_set(sd: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    """Raise ``ValueError("{what}: missing N keys (e.g. ...); unexpected ...; N wrong shapes ...")``
    unless ``sd`` has exactly the keys and shapes of ``expected``."""
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and tuple(sd[k].shape) != tuple(v.shape)
    ]
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} keys (e.g. {missing[:5]})")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[:5]})")
    if shapes:
        parts.append(f"{len(shapes)} wrong shapes (e.g. {shapes[:3]})")
    if parts:
        raise ValueError(f"{what}: " + "; ".join(parts))


def strict_load(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with an error that lists missing/unexpected/mis-shaped keys."""
    check_key_set(sd, model.state_dict(), f"checkpoint {source} does not match the model key set")
    model.load_state_dict(sd, strict=True)
