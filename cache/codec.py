"""Decoding stored feature values to float32: the one place the cache's storage dtypes are undone.

``decode(values, scale=None, *, basis=None, mean=None)`` runs on whatever device its tensors are on:
the item reader (:meth:`cache.FeatureCache.__getitems__`, CPU) and stage 2's device-side targets
(:mod:`distill.targets`, the training device) both call it, so a value decodes the same everywhere.
"""

from __future__ import annotations

import torch


def decode(
    values: torch.Tensor,
    scale: torch.Tensor | None = None,
    *,
    basis: torch.Tensor | None = None,
    mean: torch.Tensor | None = None,
) -> torch.Tensor:
    """Stored values -> float32 features.

    Args:
        values: ``(..., N, K)`` as stored: float16 (``K = D``), or int8 with ``scale``; with ``basis``,
            ``K`` is the number of stored components.
        scale: ``(..., N)`` float32 per-token scale of int8 storage (``x = q * scale``); ``None`` otherwise.
        basis: ``(K, D)`` reduced-dimension basis; the features are ``x @ basis + mean``.
        mean: ``(D,)`` added after the basis (``None``: no offset).
    Returns:
        ``(..., N, D)`` float32 on ``values.device`` (a new tensor, never a view of ``values``).
    """
    if values.dtype == torch.int8 and scale is None:
        raise ValueError(
            "int8 feature values need their per-token scale (the cache's '<name>_scale' dataset)"
        )
    x = values.to(torch.float32, copy=True)
    if scale is not None:
        if scale.shape != values.shape[:-1]:
            raise ValueError(
                f"scale of shape {tuple(scale.shape)} does not match values of shape {tuple(values.shape)} "
                "(one scale per token expected)"
            )
        x.mul_(scale.to(torch.float32).unsqueeze(-1))
    if basis is not None:
        if basis.shape[0] != x.shape[-1]:
            raise ValueError(
                f"basis of shape {tuple(basis.shape)} does not match {x.shape[-1]} stored components"
            )
        x = x @ basis.to(x.device, torch.float32)
    if mean is not None:
        x = x + mean.to(x.device, torch.float32)
    return x
