"""Image sources that stage 1 (and stage 2, and evaluation) read: a registry of named datasets.

Every dataset is a ``torch.utils.data.Dataset`` whose items are dicts:
    ``key``      str, stable source identifier (relative path or ``<name>/<split>/<index>``)
    ``image``    float tensor ``(3, H, W)`` RGB in [0, 1]
    ``captions`` dict granularity -> str (``alt``, ``short``, ``detailed``; any may be missing)
    ``label``    optional int64 ``(H, W)`` per-pixel class map (255 = ignore), for segmentation sets
and expose ``identity() -> dict`` (what a cache records to match data) and ``keys() -> list[str]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils.data import Dataset

_DATASETS: dict[str, Callable[..., Dataset]] = {}


def register_dataset(name: str) -> Callable[[Callable[..., Dataset]], Callable[..., Dataset]]:
    def deco(fn: Callable[..., Dataset]) -> Callable[..., Dataset]:
        if name in _DATASETS:
            raise ValueError(f"dataset {name!r} registered twice")
        _DATASETS[name] = fn
        return fn

    return deco


def list_datasets() -> list[str]:
    return sorted(_DATASETS)


def build_dataset(name: str, **kwargs: Any) -> Dataset:
    """Build a registered dataset by name (for example ``"synthetic"``)."""
    if name not in _DATASETS:
        raise ValueError(f"unknown dataset {name!r}; registered datasets: {', '.join(list_datasets()) or 'none'}")
    return _DATASETS[name](**kwargs)
