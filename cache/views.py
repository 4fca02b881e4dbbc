"""Several views (crops + flips) per image, stored so stage 2 replays exactly what the teacher saw.

A view is a box ``(x0, y0, x1, y1)`` normalised to the *base image* (the dataset image after the
cache's resize rule, ``meta["image_size"]``/``meta["resize"]``) plus a horizontal flip flag. Boxes
are snapped to whole pixels of the base image, so :func:`apply_view` reproduces the teacher input
bit for bit: crop, resize to the cache's image size (bicubic, antialias, clamp), flip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class ViewSpec:
    """How views are drawn. ``num_views=1`` with ``first_view_full`` is the plain image."""

    num_views: int = 1
    scale: tuple[float, float] = (0.4, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    first_view_full: bool = True
    seed: int = 0


def sample_views(spec: ViewSpec, index: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic views of sample ``index`` on a ``height x width`` base image.

    Returns boxes ``(V, 4)`` float32 normalised x0, y0, x1, y1 (whole pixels) and flips ``(V,)`` bool.
    Depends only on ``(spec.seed, index)``, never on rank, batch or resume point.
    """
    rng = np.random.default_rng([spec.seed, index])
    boxes = np.zeros((spec.num_views, 4), np.float32)
    flips = np.zeros((spec.num_views,), bool)
    area = height * width
    for v in range(spec.num_views):
        if v == 0 and spec.first_view_full:
            boxes[v] = (0.0, 0.0, 1.0, 1.0)
            continue
        for _ in range(10):  # RandomResizedCrop's rule
            target = area * rng.uniform(*spec.scale)
            ar = math.exp(rng.uniform(math.log(spec.ratio[0]), math.log(spec.ratio[1])))
            w = int(round(math.sqrt(target * ar)))
            h = int(round(math.sqrt(target / ar)))
            if 0 < w <= width and 0 < h <= height:
                break
        else:
            h, w = height, width
        y0 = int(rng.integers(0, height - h + 1))
        x0 = int(rng.integers(0, width - w + 1))
        boxes[v] = (x0 / width, y0 / height, (x0 + w) / width, (y0 + h) / height)
        flips[v] = bool(rng.uniform() < spec.flip_prob)
    return boxes, flips


def apply_view(
    image: torch.Tensor, box: np.ndarray | torch.Tensor, flip: bool, size: tuple[int, int]
) -> torch.Tensor:
    """Crop normalised ``box`` from base image ``(3, H, W)``, resize to ``size`` (h, w), flip if asked."""
    H, W = image.shape[-2:]
    x0, y0, x1, y1 = (float(b) for b in box)
    px0, py0 = int(round(x0 * W)), int(round(y0 * H))
    px1, py1 = max(px0 + 1, int(round(x1 * W))), max(py0 + 1, int(round(y1 * H)))
    crop = image[:, py0:py1, px0:px1]
    if tuple(crop.shape[-2:]) != tuple(size):
        crop = F.interpolate(
            crop[None].float(), size=tuple(size), mode="bicubic", antialias=True, align_corners=False
        )
        crop = crop[0].clamp_(0.0, 1.0)
    if flip:
        crop = crop.flip(-1)
    return crop.contiguous()
