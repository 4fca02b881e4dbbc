"""The facts of a feature cache, worked out once from its metadata: :class:`CacheSpec`.

The reader (:class:`cache.FeatureCache`), stage 2's cache check and its dataset all read the same
frozen spec instead of each re-deriving widths and shapes from the attributes or from a first item.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


def _size(value: Any) -> tuple[int, int] | None:
    """``image_size`` attribute -> ``(H, W)`` (an int is square); ``None`` when the cache has none."""
    if value is None:
        return None
    if isinstance(value, int | float):
        return int(value), int(value)
    h, w = (int(v) for v in value)
    return h, w


@dataclass(frozen=True)
class CacheSpec:
    """What a cache holds, per sample: ``patch (V, h, w, dim)`` / ``(h, w, dim)``, ``cls (V, C, dim)`` /
    ``(C, dim)`` with ``C = num_global_tokens`` and ``V = num_views`` (the view axis only when ``V > 1``),
    caption embeddings ``(text_dim,)`` per granularity.

    Build it with :meth:`from_meta` from the file attributes (``FeatureCache.meta``);
    ``FeatureCache.spec`` is one.
    """

    path: str
    dim: int
    grid: tuple[int, int]
    patch_size: int
    num_global_tokens: int
    num_views: int
    granularities: tuple[str, ...]
    text_dim: int
    storage_dtype: str
    image_size: tuple[int, int] | None  # the base image the boxes and crops refer to
    resize: str  # how source images were brought to image_size (cache.datasets.resize_image)
    teacher: Mapping[str, Any] = field(default_factory=dict, compare=False)
    reduce_dim: int = (
        0  # > 0: patch tokens stored as this many PCA coefficients, decoded to ``dim`` on reading
    )

    @property
    def stored_dim(self) -> int:
        """Width of the stored patch tokens: ``reduce_dim`` for a reduced-dimension cache, else ``dim``."""
        return self.reduce_dim or self.dim

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], path: str = "") -> CacheSpec:
        """The spec of a cache from its decoded attributes; a missing required field raises naming it."""
        missing = [k for k in ("dim", "grid", "num_global_tokens") if meta.get(k) is None]
        if missing:
            raise ValueError(
                f"cache {path or '(unnamed)'} lacks the metadata field(s) {missing}; it was not written by "
                "tipsdistill-cache (or by an older format): rebuild it with tipsdistill-cache"
            )
        grans = tuple(str(g) for g in (meta.get("granularities") or []))
        h, w = (int(v) for v in meta["grid"])
        return cls(
            path=str(path),
            dim=int(meta["dim"]),
            grid=(h, w),
            patch_size=int(meta.get("patch_size") or 0),
            num_global_tokens=int(meta["num_global_tokens"]),
            num_views=int(meta.get("num_views") or 1),
            granularities=grans,
            text_dim=int(meta.get("text_dim") or 0) if grans else 0,
            storage_dtype=str(meta.get("storage_dtype") or "float16"),
            image_size=_size(meta.get("image_size")),
            resize=str(meta.get("resize") or "exact"),
            teacher=dict(meta.get("teacher") or {}),
            reduce_dim=int(meta.get("reduce_dim") or 0),
        )

    @property
    def has_views(self) -> bool:
        """Several stored views per sample (``boxes (V, 4)``, ``flips (V,)``; a leading view axis)."""
        return self.num_views > 1

    @property
    def has_text(self) -> bool:
        """Caption embeddings usable by the CLIP term (the alt-text at least)."""
        return self.text_dim > 0 and "alt" in self.granularities

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable facts (what a run records about the cache it read)."""
        return {
            "dim": self.dim,
            "grid": list(self.grid),
            "num_global_tokens": self.num_global_tokens,
            "text_dim": self.text_dim,
            "granularities": sorted(self.granularities),
            "views": self.num_views,
            "reduce_dim": self.reduce_dim,
            "meta_teacher": dict(self.teacher) or None,
        }
