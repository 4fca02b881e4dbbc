"""Decoding stored feature values to float32: the one place the cache's storage is undone.

A cache stores token features as float16, as int8 with a per-token scale, and optionally as ``K``
coefficients of a PCA basis fitted on the teacher's tokens (``--reduce-dim K``, :mod:`cache.reduce`)
in either dtype. ``decode(values, scale=None, *, basis=None, mean=None)`` runs on whatever device its
tensors are on: the items of :meth:`cache.FeatureCache.__getitems__` (CPU) and stage 2's
device-side targets (:mod:`distill.targets`, the training device) both call it, so a value decodes
the same everywhere.
"""

from __future__ import annotations

import numpy as np
import torch


def _tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))


def decode(
    values: torch.Tensor | np.ndarray,
    scale: torch.Tensor | np.ndarray | None = None,
    *,
    basis: torch.Tensor | np.ndarray | None = None,
    mean: torch.Tensor | np.ndarray | None = None,
) -> torch.Tensor:
    """Stored values -> float32 features.

    Args:
        values: ``(..., N, S)`` as stored: float16 / float32, or int8 with ``scale``; with ``basis``,
            ``S = K`` PCA coefficients.
        scale: ``(..., N)`` float32 per-token scale of int8 storage (``x = q * scale``); ``None`` otherwise.
        basis: ``(D, K)`` reduced-dimension basis (orthonormal columns, ``FeatureCache.reduction``);
            the features are ``x @ basis.T + mean``.
        mean: ``(D,)`` added after the basis (only with ``basis``).
    Returns:
        ``(..., N, D)`` (``(..., N, S)`` without a basis) float32 on ``values.device`` (a new tensor,
        never a view of ``values``); ``basis`` / ``mean`` are moved there.
    """
    v = _tensor(values)
    if v.dtype == torch.int8 and scale is None:
        raise ValueError(
            "int8 feature values need their per-token scale (the cache's '<name>_scale' dataset)"
        )
    x = v.to(torch.float32, copy=True)
    if scale is not None:
        s = _tensor(scale)
        if s.shape != v.shape[:-1]:
            raise ValueError(
                f"scale of shape {tuple(s.shape)} does not match values of shape {tuple(v.shape)} "
                "(one scale per token expected)"
            )
        x.mul_(s.to(x.device, torch.float32).unsqueeze(-1))
    if basis is None:
        if mean is not None:
            raise ValueError("mean given without basis: a reduced-dimension cache stores both")
        return x
    b = _tensor(basis).to(x.device, torch.float32)
    if b.ndim != 2 or b.shape[1] != x.shape[-1]:
        raise ValueError(
            f"basis has shape {tuple(b.shape)}, expected (D, {x.shape[-1]}) for {x.shape[-1]} stored components"
        )
    out = x @ b.T
    if mean is not None:
        out.add_(_tensor(mean).to(x.device, torch.float32))
    return out
