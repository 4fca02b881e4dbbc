"""Projection heads and width adapters, in a registry: ``build_head(name, in_dim, out_dim, **kw)``.

- ``"dino"``: DINOv2's ``DINOHead``: MLP ``in -> hidden -> hidden -> bottleneck`` (GELU), L2
  normalisation, then weight-normalised prototypes ``bottleneck -> out_dim`` (no bias). Output: logits
  over ``out_dim`` prototypes.
- ``"linear"``: one ``nn.Linear(in_dim, out_dim)`` (width adapter for head-free feature losses).
- ``"mlp"``: ``Linear(in, hidden) -> GELU -> Linear(hidden, out)`` adapter.

Every head maps ``(..., in_dim)`` to ``(..., out_dim)`` and works on CLS ``(B, D)`` and patch tokens
``(B, N, D)`` alike.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

logger = logging.getLogger(__name__)

_HEADS: dict[str, Callable[..., nn.Module]] = {}


def register_head(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a head factory ``fn(in_dim, out_dim, **kw) -> nn.Module`` under ``name``."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _HEADS:
            raise ValueError(f"head {name!r} registered twice")
        _HEADS[name] = fn
        return fn

    return deco


def list_heads() -> list[str]:
    return sorted(_HEADS)


def build_head(name: str, in_dim: int, out_dim: int, **kwargs: Any) -> nn.Module:
    """Build a projection head / adapter by registry name (``"dino"``, ``"linear"``, ``"mlp"``).

    Args:
        in_dim: width of the tokens fed to the head.
        out_dim: number of prototypes (``dino``) or output width (adapters).
        kwargs: head specific (``hidden_dim``, ``bottleneck_dim``, ``nlayers``, ``norm_last_layer``...).
    Returns:
        a module mapping ``(..., in_dim) -> (..., out_dim)``.
    """
    if name not in _HEADS:
        raise ValueError(f"unknown head {name!r}; known heads: {', '.join(list_heads())}")
    for k, v in (("in_dim", in_dim), ("out_dim", out_dim)):
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"head {name!r}: {k} must be a positive int, got {v!r}")
    return _HEADS[name](in_dim, out_dim, **kwargs)


# DINOHead(weight_init=...): "trunc_normal" = DINOv2's (MLP weights trunc_normal_(std=0.02), biases 0);
# "skip" = keep PyTorch's own nn.Linear init (timm's weight_init="skip"), as the embedded teacher's
# original pretraining script did
HEAD_WEIGHT_INITS = ("trunc_normal", "skip")


class DINOHead(nn.Module):
    """DINOv2 projection head: MLP, L2 normalisation, weight-normalised prototypes.

    ``(..., in_dim) -> (..., out_dim)`` logits. ``norm_last_layer=True`` freezes the prototype norms
    at 1 (weight_g fixed), as in DINO/DINOv2. ``weight_init``: the MLP's init, ``"trunc_normal"``
    (DINOv2) or ``"skip"`` (PyTorch's ``nn.Linear`` default); the prototypes keep PyTorch's in both.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = True,
        use_bn: bool = False,
        weight_init: str = "trunc_normal",
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"DINOHead needs nlayers >= 1, got {nlayers}")
        if weight_init not in HEAD_WEIGHT_INITS:
            raise ValueError(f"DINOHead weight_init must be one of {HEAD_WEIGHT_INITS}, got {weight_init!r}")
        self.in_dim, self.out_dim = in_dim, out_dim
        layers: list[nn.Module] = []
        if nlayers == 1:
            layers.append(nn.Linear(in_dim, bottleneck_dim))
        else:
            layers.append(nn.Linear(in_dim, hidden_dim))
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            for _ in range(nlayers - 2):
                layers.append(nn.Linear(hidden_dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        if weight_init == "trunc_normal":
            self.apply(self._init_weights)
        self.last_layer = nn.utils.parametrizations.weight_norm(
            nn.Linear(bottleneck_dim, out_dim, bias=False)
        )
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)
        if norm_last_layer:
            self.last_layer.parametrizations.weight.original0.requires_grad_(False)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        x = self.mlp(x.reshape(-1, x.shape[-1]))
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x).reshape(*shape, self.out_dim)


class MLPAdapter(nn.Module):
    """``Linear(in, hidden) -> GELU -> Linear(hidden, out)``; ``(..., in) -> (..., out)``."""

    def __init__(self, in_dim: int, out_dim: int, *, hidden_dim: int | None = None) -> None:
        super().__init__()
        hidden_dim = hidden_dim or max(in_dim, out_dim)
        self.in_dim, self.out_dim = in_dim, out_dim
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LinearAdapter(nn.Linear):
    """``nn.Linear(in_dim, out_dim)`` with ``in_dim``/``out_dim`` attributes."""

    def __init__(self, in_dim: int, out_dim: int, *, bias: bool = True) -> None:
        super().__init__(in_dim, out_dim, bias=bias)
        self.in_dim, self.out_dim = in_dim, out_dim


@register_head("dino")
def _dino(in_dim: int, out_dim: int, **kw: Any) -> nn.Module:
    return DINOHead(in_dim, out_dim, **kw)


@register_head("linear")
def _linear(in_dim: int, out_dim: int, **kw: Any) -> nn.Module:
    return LinearAdapter(in_dim, out_dim, **kw)


@register_head("mlp")
def _mlp(in_dim: int, out_dim: int, **kw: Any) -> nn.Module:
    return MLPAdapter(in_dim, out_dim, **kw)


def frozen_projection(in_dim: int, out_dim: int, seed: int = 0) -> nn.Linear:
    """A frozen random (semi-)orthogonal width adapter ``(..., in_dim) -> (..., out_dim)``, bias-free.

    Identity when ``in_dim == out_dim``. Used to feed teacher tokens to an EMA copy of a student head.
    """
    lin = nn.Linear(in_dim, out_dim, bias=False)
    with torch.no_grad():
        if in_dim == out_dim:
            lin.weight.copy_(torch.eye(out_dim))
        else:
            g = torch.Generator().manual_seed(seed)
            w = torch.randn(max(in_dim, out_dim), min(in_dim, out_dim), generator=g)
            q, _ = torch.linalg.qr(w)
            w = q if out_dim >= in_dim else q.T  # (out, in)
            lin.weight.copy_(w * math.sqrt(in_dim / out_dim) if out_dim < in_dim else w)
    lin.requires_grad_(False)
    return lin
