"""Decoding stored feature values back to float32 tokens: the one place a cache's storage is undone.

A cache stores token features as float16, as int8 with a per-token scale, and optionally as ``K``
coefficients of a PCA basis fitted on the teacher's tokens (``--reduce-dim K``, :mod:`cache.reduce`)
in either dtype. Every reader (the item reader, the batch reader, targets built on the device)
reconstructs them with :func:`decode`, on whatever device the tensors are on.
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
    """Stored token values -> float32 tokens.

    ``values (..., S)`` float16 / float32, or int8 with ``scale (...)`` (per token: ``x ~ q * scale``);
    with ``basis (D, K)`` (orthonormal columns) and ``mean (D,)`` the values are PCA coefficients
    (``S = K``) and the result is ``values @ basis.T + mean`` ``(..., D)``; without them ``(..., S)``.
    Runs on the device of ``values`` (``basis``/``mean`` are moved there).
    """
    v = _tensor(values)
    if v.dtype == torch.int8:
        if scale is None:
            raise ValueError("int8 values need their per-token scale (the cache's <name>_scale dataset)")
        s = _tensor(scale).to(v.device, torch.float32)
        if s.shape != v.shape[:-1]:
            raise ValueError(
                f"scale has shape {tuple(s.shape)}, expected {tuple(v.shape[:-1])} for values {tuple(v.shape)}"
            )
        x = v.to(torch.float32).mul_(s.unsqueeze(-1))
    else:
        x = v.to(torch.float32)
    if basis is None:
        if mean is not None:
            raise ValueError("mean given without basis: a reduced-dimension cache stores both")
        return x
    b = _tensor(basis).to(x.device, torch.float32)
    if b.ndim != 2 or b.shape[1] != x.shape[-1]:
        raise ValueError(
            f"basis has shape {tuple(b.shape)}, expected (D, {x.shape[-1]}) for values {tuple(x.shape)}"
        )
    out = x @ b.T
    if mean is not None:
        out.add_(_tensor(mean).to(x.device, torch.float32))
    return out
