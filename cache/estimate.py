"""Disk estimate of a cache before anything runs: ``tipsdistill-cache --estimate``.

Bytes per image are :meth:`cache.format.Layout.bytes_per_sample` (the writer's own layout: patch and
global tokens, int8 scales, PCA coefficients, caption embeddings, views, the per-sample bookkeeping),
for a teacher's shapes taken without loading weights:

- a known shape (:data:`KNOWN_SHAPES`: ``vit-b/14`` ... ``vit-g/14``, the TIPSv2 sizes, and their
  patch-16 counterparts), or ``tips:B`` ... ``tips:g`` (the TIPS variants' dims);
- ``timm:MODEL_NAME`` (the model built on the ``meta`` device: shapes, no weights, no download);
- explicit ``dim`` / ``patch_size`` / ``global_tokens`` / ``text_dim``.

Dataset sizes: a count, a named dataset (:data:`KNOWN_DATASETS`, nominal counts), or a dataset spec
counted by building it (``--data`` / ``--images``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from .format import Layout

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherShape:
    """What the cache's size depends on: feature dim, patch size, global tokens, text embedding dim."""

    name: str
    dim: int
    patch_size: int
    global_tokens: int = 2
    text_dim: int = 0

    def grid(self, image_size: int) -> tuple[int, int]:
        if image_size % self.patch_size:
            raise ValueError(
                f"image size {image_size} is not a multiple of {self.name}'s patch size {self.patch_size}; "
                f"use e.g. {image_size // self.patch_size * self.patch_size}"
            )
        return image_size // self.patch_size, image_size // self.patch_size


def _tips(letter: str, patch: int, label: str) -> TeacherShape:
    from tipsdistill.teachers.tips import VARIANTS  # dims only; nothing is loaded

    d = VARIANTS[letter].embed_dim
    return TeacherShape(label, d, patch, 2, d)


# TIPSv2-style teachers (two global tokens, a text tower of the image width); the /16 rows are the
# same widths at patch 16 (e.g. SigLIP2 So400m/16, ViT-B/16 CLIP-style towers)
KNOWN_SHAPES: dict[str, TeacherShape] = {
    "vit-b/14": _tips("B", 14, "ViT-B/14"),
    "vit-b/16": _tips("B", 16, "ViT-B/16"),
    "vit-l/14": _tips("L", 14, "ViT-L/14"),
    "vit-l/16": _tips("L", 16, "ViT-L/16"),
    "so400m/14": _tips("SO", 14, "SO400M/14"),
    "so400m/16": _tips("SO", 16, "SO400M/16"),
    "vit-g/14": _tips("g", 14, "ViT-g/14"),
}
# nominal sizes (images as published; downloads of the URL datasets are typically 10-20 % smaller)
KNOWN_DATASETS: dict[str, int] = {
    "cc3m": 3_318_333,
    "cc12m": 12_423_374,
    "imagenet-1k": 1_281_167,
    "datacomp-1b": 1_400_000_000,
}


def teacher_shape(spec: str, kwargs: dict[str, Any] | None = None) -> TeacherShape:
    """A teacher's shapes from a known name, ``tips:VARIANT``, ``timm:MODEL`` or ``timm`` with
    ``model_name=`` in ``kwargs`` (built on the meta device), without loading weights."""
    kwargs = dict(kwargs or {})
    key = spec.lower()
    if key in KNOWN_SHAPES:
        return KNOWN_SHAPES[key]
    if key.startswith("tips:") or (key == "tips" and "variant" in kwargs):
        from tipsdistill.teachers.tips import PATCH_SIZE, resolve_variant

        v = resolve_variant(spec.split(":", 1)[1] if ":" in spec else kwargs["variant"])
        return TeacherShape(f"TIPS-{v.name}", v.embed_dim, PATCH_SIZE, 2, v.embed_dim if v.text else 0)
    if key.startswith("timm:") or (key == "timm" and "model_name" in kwargs):
        import timm
        import torch

        name = spec.split(":", 1)[1] if ":" in spec else str(kwargs["model_name"])
        with torch.device("meta"):
            m = timm.create_model(name, pretrained=False, num_classes=0)
        patch = m.patch_embed.patch_size
        return TeacherShape(
            name,
            int(m.embed_dim),
            int(patch[0] if isinstance(patch, (tuple, list)) else patch),
            int(getattr(m, "num_prefix_tokens", 1)),
            0,
        )
    raise ValueError(
        f"cannot tell the shapes of teacher {spec!r} without building it: use one of {sorted(KNOWN_SHAPES)}, "
        "tips:B|L|SO|g, timm:MODEL_NAME, or give --teacher-dim D --patch-size P [--global-tokens C --text-dim Dt]"
    )


def bytes_per_image(
    shape: TeacherShape,
    image_size: int,
    *,
    storage: str = "float16",
    reduce_dim: int = 0,
    views: int = 1,
    value_trick: bool = False,
    granularities: tuple[str, ...] | list[str] = ("alt", "short", "detailed"),
) -> int:
    """Bytes one image takes in the cache (the writer's :class:`Layout`)."""
    if reduce_dim and reduce_dim >= shape.dim:
        raise ValueError(f"reduce_dim {reduce_dim} is not below {shape.name}'s feature dim {shape.dim}")
    grans = list(granularities) if shape.text_dim else []
    return Layout(
        count=1,
        grid=shape.grid(image_size),
        dim=shape.dim,
        num_global_tokens=shape.global_tokens,
        num_views=views,
        value_patch=value_trick,
        storage_dtype=storage,
        text_dim=shape.text_dim,
        granularities=grans,
        reduce_dim=reduce_dim,
    ).bytes_per_sample()


def fmt_size(n: float) -> str:
    """Decimal units (what disks are sold in): ``3.2 MB``, ``9.5 TB``."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def storage_label(storage: str, reduce_dim: int) -> str:
    return f"pca{reduce_dim} {storage}" if reduce_dim else storage


def estimate_table(
    teachers: list[TeacherShape],
    sizes: list[int],
    storages: list[tuple[str, int]],
    datasets: dict[str, int],
    **layout_kw: Any,
) -> str:
    """A markdown table: one row per teacher x image size x storage, bytes per image and per dataset."""
    head = "| teacher | image | grid | storage | per image | " + " | ".join(datasets) + " |"
    lines = [head, "|" + "---|" * (5 + len(datasets))]
    for t in teachers:
        for s in sizes:
            for st, k in storages:
                b = bytes_per_image(t, s, storage=st, reduce_dim=k, **layout_kw)
                h, w = t.grid(s)
                cells = " | ".join(fmt_size(b * n) for n in datasets.values())
                lines.append(
                    f"| {t.name} (dim {t.dim}) | {s} | {h}x{w} | {storage_label(st, k)} | {fmt_size(b)} | {cells} |"
                )
    return "\n".join(lines)


def describe(
    shape: TeacherShape,
    image_size: int,
    num_images: int | None,
    dataset_label: str = "",
    *,
    storage: str = "float16",
    reduce_dim: int = 0,
    **layout_kw: Any,
) -> str:
    """One line: the teacher's shapes, bytes per image, and the total for ``num_images``."""
    b = bytes_per_image(shape, image_size, storage=storage, reduce_dim=reduce_dim, **layout_kw)
    h, w = shape.grid(image_size)
    full = bytes_per_image(shape, image_size, storage="float16", **layout_kw)
    line = (
        f"estimate: {shape.name} (dim {shape.dim}, patch {shape.patch_size}, {shape.global_tokens} global tokens, "
        f"text dim {shape.text_dim or '-'}) at {image_size} px (grid {h}x{w}), {storage_label(storage, reduce_dim)}: "
        f"{fmt_size(b)} per image ({b:,} bytes; {b / full:.3f}x of float16)"
    )
    if num_images is not None:
        line += f" x {num_images:,} images{f' ({dataset_label})' if dataset_label else ''} = {fmt_size(b * num_images)}"
    return line
