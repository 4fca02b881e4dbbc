"""Stage-2 data: crops of source images and the teacher targets that match what the student sees.

One global crop plus ``N`` local crops per image (resize, crop, flip only; seeded per
``(seed, epoch, index)`` so a sample's crops do not depend on worker count or on resuming).

Teacher targets (cached mode) come in two ways:
- ``replay``: the cache stored several views (``boxes (V, 4)``, ``flips (V,)``); one is picked and the
  student's global crop is that exact view;
- ``crop``: the cache stored the full-image feature map; the student's random crop box is cut out of
  the teacher token grid with :func:`torchvision.ops.roi_align` (token centres at ``j + 0.5``),
  flipped when the crop is, and resampled to the student's grid. Teacher and student grids may differ.

The items carry the crop geometry only (``t_roi``, ``t_ratio``, ``t_flip``, ``t_view``); the cached
features of a batch are read in the training process (:mod:`distill.feeder`) and the targets built
from them on the device (:class:`distill.targets.CachedTargets`, :func:`align_teacher_maps`).

Source images are matched to the cache by key; cache keys missing from the source are an error,
source images absent from the cache are counted and listed (``skipped_keys``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler, default_collate
from torchvision.ops import roi_align

from tipsdistill.cache import FeatureCache
from tipsdistill.cache.datasets import resize_image
from tipsdistill.cache.views import apply_view

from .config import DATA_ORDERS, DataConfig
from .masking import random_mask

logger = logging.getLogger(__name__)

Box = tuple[float, float, float, float]  # normalised x0, y0, x1, y1


def sample_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python versions)."""
    return int(
        np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts])
        .generate_state(2, np.uint32)
        .view(np.uint64)[0]
        >> 1
    )


def sample_box(
    gen: torch.Generator,
    height: int,
    width: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    region: tuple[int, int, int, int] | None = None,
) -> tuple[int, int, int, int]:
    """RandomResizedCrop parameters ``(top, left, h, w)`` in pixels, inside ``region`` (top, left, h, w)."""
    rt, rl, rh, rw = region if region is not None else (0, 0, height, width)
    area = rh * rw
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(2, generator=gen).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        ar = math.exp(log_r[0] + (log_r[1] - log_r[0]) * u[1])
        w = int(round(math.sqrt(target * ar)))
        h = int(round(math.sqrt(target / ar)))
        if 0 < w <= rw and 0 < h <= rh:
            top = rt + int(torch.randint(0, rh - h + 1, (1,), generator=gen))
            left = rl + int(torch.randint(0, rw - w + 1, (1,), generator=gen))
            return top, left, h, w
    # fallback: central crop at the clamped ratio
    in_ratio = rw / rh
    if in_ratio < ratio[0]:
        w, h = rw, int(round(rw / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = rh, int(round(rh * ratio[1]))
    else:
        w, h = rw, rh
    return rt + (rh - h) // 2, rl + (rw - w) // 2, h, w


def crop_resize(image: torch.Tensor, box: tuple[int, int, int, int], size: int, flip: bool) -> torch.Tensor:
    """Crop ``image (3, H, W)`` at pixel ``box`` (top, left, h, w), resize to ``(3, size, size)`` (bilinear,
    antialiased), flip horizontally when asked; values stay in [0, 1]."""
    top, left, h, w = box
    x = image[:, top : top + h, left : left + w].unsqueeze(0).float()
    if (h, w) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    x = x.squeeze(0).clamp_(0.0, 1.0)
    return x.flip(-1) if flip else x


def pixel_box_to_norm(box: tuple[int, int, int, int], height: int, width: int) -> Box:
    top, left, h, w = box
    return (left / width, top / height, (left + w) / width, (top + h) / height)


def norm_box_to_pixel(box: Sequence[float], height: int, width: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = (float(v) for v in box)
    left, top = int(round(x0 * width)), int(round(y0 * height))
    right, bottom = int(round(x1 * width)), int(round(y1 * height))
    left, top = min(max(left, 0), width - 1), min(max(top, 0), height - 1)
    right, bottom = max(min(right, width), left + 1), max(min(bottom, height), top + 1)
    return top, left, bottom - top, right - left


def align_teacher_map(
    feat: torch.Tensor,
    box: Sequence[float],
    grid: tuple[int, int],
    *,
    flip: bool = False,
    source_box: Sequence[float] = (0.0, 0.0, 1.0, 1.0),
    sampling_ratio: int = 0,
) -> torch.Tensor:
    """Cut the region ``box`` (normalised image coordinates) out of a teacher token map and resample it.

    Args:
        feat: teacher tokens ``(h_t, w_t, D)`` covering ``source_box`` of the image.
        box: the student's crop ``(x0, y0, x1, y1)`` in normalised image coordinates.
        grid: the student's token grid ``(h_s, w_s)``.
        flip: the student's crop is flipped horizontally (the output is flipped to match).
        sampling_ratio: bilinear samples per output token and axis; 0 = one at the token centre when the
            student token covers at most one teacher token (upsampling: plain bilinear interpolation, and
            the identity for an unchanged grid), ``ceil(cover)`` when downsampling (antialiasing).
    Returns:
        ``(h_s, w_s, D)`` float32 targets, token ``(i, j)`` aligned with the student's token ``(i, j)``.
    """
    h_t, w_t, _d = feat.shape
    roi, ratio = crop_roi(box, (h_t, w_t), grid, source_box=source_box, sampling_ratio=sampling_ratio)
    rois = torch.tensor([[0.0, *roi]])
    inp = feat.permute(2, 0, 1).unsqueeze(0).float()  # (1, D, h_t, w_t)
    out = roi_align(inp, rois, output_size=tuple(grid), spatial_scale=1.0, sampling_ratio=ratio, aligned=True)
    out = out[0].permute(1, 2, 0)  # (h_s, w_s, D)
    return out.flip(1) if flip else out


def crop_roi(
    box: Sequence[float],
    teacher_grid: tuple[int, int],
    grid: tuple[int, int],
    *,
    source_box: Sequence[float] = (0.0, 0.0, 1.0, 1.0),
    sampling_ratio: int = 0,
) -> tuple[tuple[float, float, float, float], int]:
    """The roi of :func:`align_teacher_map` in teacher-token coordinates ``(x0, y0, x1, y1)`` and its
    sampling ratio (``sampling_ratio <= 0``: 1 when upsampling, ``ceil(cover)`` when downsampling)."""
    h_t, w_t = teacher_grid
    sx0, sy0, sx1, sy1 = (float(v) for v in source_box)
    x0, y0, x1, y1 = (float(v) for v in box)
    fx = w_t / max(sx1 - sx0, 1e-12)
    fy = h_t / max(sy1 - sy0, 1e-12)
    roi = ((x0 - sx0) * fx, (y0 - sy0) * fy, (x1 - sx0) * fx, (y1 - sy0) * fy)
    if sampling_ratio <= 0:
        cover = max((y1 - y0) * fy / grid[0], (x1 - x0) * fx / grid[1])
        sampling_ratio = max(1, math.ceil(cover - 1e-6))
    return roi, int(sampling_ratio)


def align_teacher_maps(
    feat: torch.Tensor,
    rois: torch.Tensor,
    ratios: Sequence[int],
    flips: torch.Tensor,
    grid: tuple[int, int],
    order: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`align_teacher_map` for a whole batch on ``feat``'s device, with no host sync.

    Args:
        feat: teacher tokens ``(B, h_t, w_t, D)`` float32.
        rois: ``(B, 4)`` per-sample roi in teacher-token coordinates (:func:`crop_roi`).
        ratios: ``B`` host ints, each sample's sampling ratio; 0 = the identity (no resampling, the
            teacher grid is the student's: :func:`resample_grid` of an unchanged grid).
        flips: ``(B,)`` bool, flip the sample's output horizontally.
        grid: the student's grid ``(h_s, w_s)``.
        order: ``(B,)`` int64 on the device, the samples sorted by ratio (stable), needed when the
            ratios differ (one ``roi_align`` call per ratio over consecutive sorted samples).
    Returns:
        ``(B, h_s, w_s, D)`` float32; sample ``b`` equals ``align_teacher_map(feat[b], ...)``.
    """
    B = feat.shape[0]
    inp = feat.permute(0, 3, 1, 2)  # (B, D, h_t, w_t)
    index = torch.arange(B, device=feat.device, dtype=rois.dtype).unsqueeze(1)
    full = torch.cat([index, rois], 1)  # (B, 5): batch index, x0, y0, x1, y1
    ratios = [int(r) for r in ratios]
    kinds = sorted(set(ratios))

    def resample(rows: torch.Tensor, ratio: int) -> torch.Tensor:
        if ratio == 0:
            if tuple(inp.shape[-2:]) != tuple(grid):
                raise ValueError(
                    f"ratio 0 (identity) needs the teacher grid {tuple(inp.shape[-2:])} == {grid}"
                )
            return inp[rows[:, 0].long()] if rows.shape[0] != B else inp
        return roi_align(
            inp, rows, output_size=tuple(grid), spatial_scale=1.0, sampling_ratio=ratio, aligned=True
        )

    if len(kinds) == 1:
        out = resample(full, kinds[0])
    else:
        if order is None:
            raise ValueError("samples with different sampling ratios need their order by ratio (order=...)")
        sorted_rows = full[order]
        parts, a = [], 0
        for ratio in kinds:
            b = a + ratios.count(ratio)
            parts.append(resample(sorted_rows[a:b], ratio))
            a = b
        stacked = torch.cat(parts)
        out = torch.empty_like(stacked).index_copy_(0, order, stacked)
    out = torch.where(flips.view(B, 1, 1, 1), out.flip(-1), out)
    return out.permute(0, 2, 3, 1)  # (B, h_s, w_s, D)


def ratio_order(ratios: Sequence[int]) -> list[int]:
    """The samples sorted (stably) by sampling ratio: the ``order`` of :func:`align_teacher_maps`."""
    return sorted(range(len(ratios)), key=lambda b: int(ratios[b]))


def replay_views(seed: int, epoch: int, indices: Sequence[int], num_views: int) -> np.ndarray:
    """The stored view each sample's global crop replays (``cache.target=replay``): the first draw of the
    sample's generator, as :class:`DistillDataset` draws it, so the training process can read just
    that view before the worker's batch arrives."""
    out = np.empty(len(indices), np.int64)
    for k, i in enumerate(indices):
        gen = torch.Generator().manual_seed(sample_seed(seed, epoch, int(i)))
        out[k] = int(torch.randint(0, num_views, (1,), generator=gen))
    return out


def resample_grid(feat: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``(h, w, D)`` -> ``(*grid, D)``: the identity when the grids match, roi_align over the whole map otherwise."""
    if tuple(feat.shape[:2]) == tuple(grid):
        return feat.float()
    return align_teacher_map(feat, (0.0, 0.0, 1.0, 1.0), grid)


class DistillDataset(Dataset):
    """Crops of a source dataset, with cached teacher targets aligned to the student's global crop.

    Item dict:
        ``key`` str, ``index`` int (position in this dataset),
        ``global`` ``(3, S, S)``, ``locals`` ``(N, 3, s, s)`` (``N`` may be 0), ``box`` ``(4,)`` normalised
        crop of the global view, ``flip`` bool, ``captions`` gran -> str (``""`` when missing),
        ``caption_valid`` gran -> bool, ``caption_u`` float in [0, 1) (the per-sample draw of CLS2's
        caption granularity); ``mask`` ``(h_s * w_s,)`` bool when ``mask_ratio > 0`` (True = masked);
        cached mode: the crop geometry of the targets, ``t_roi`` ``(4,)`` (the student's crop in teacher
        tokens, :func:`crop_roi`), ``t_ratio`` int (its sampling ratio, 0 = identity), ``t_flip`` bool,
        ``t_view`` int (the stored view replayed, 0 for crops); the features themselves are read by
        :class:`distill.feeder.FeatureFeeder` (the fields ``batch_features``);
        online mode with a teacher input size != S: ``t_image`` ``(3, S_t, S_t)`` (same box and flip).
    """

    def __init__(
        self,
        source: Dataset,
        data_cfg: DataConfig,
        student_grid: tuple[int, int],
        *,
        cache: FeatureCache | None = None,
        target: str = "auto",
        teacher_image_size: int = 0,
        seed: int = 0,
        mask_ratio: float = 0.0,
        mask_prob: float = 1.0,
        batch_features: Sequence[str] = ("patch", "cls"),
    ) -> None:
        self.source = source
        # the cache fields the training process's feeder (distill.feeder) reads for each batch
        self.batch_features = tuple(batch_features) if cache is not None else ()
        if cache is not None and not self.batch_features:
            raise ValueError(
                "a DistillDataset over a cache needs the fields its feeder reads: batch_features=('patch', "
                "'cls') for teacher targets, ('text',) for caption embeddings, or both"
            )
        self.mask_ratio = float(mask_ratio)
        self.mask_prob = float(mask_prob)
        self.cfg = data_cfg
        self.student_grid = tuple(student_grid)
        self.cache = cache
        self.seed = int(seed)
        self.epoch = 0
        self.teacher_image_size = int(teacher_image_size or 0)
        self.skipped_keys: list[str] = []
        self.base_size: tuple[int, int] | None = None
        self.base_resize = "exact"
        self.views = False  # the cache stores several views per sample (a leading view axis)
        src_keys = list(source.keys()) if hasattr(source, "keys") else [str(i) for i in range(len(source))]
        if cache is None:
            self.src_index = list(range(len(source)))
            self.target = "none"
            return
        cache_keys = cache.keys()
        if src_keys == cache_keys and isinstance(getattr(source, "left_out", None), list):
            # the cache's samples in its order, matched by cache.dataset_spec.source_for_cache (stage 2)
            self.src_index = list(range(len(cache_keys)))
            self.skipped_keys = list(source.left_out)
        else:
            self.src_index, self.skipped_keys = _match_keys(source, src_keys, cache_keys)
        if self.skipped_keys:
            logger.warning(
                "%d source images are not in the cache and are skipped (first: %s)",
                len(self.skipped_keys),
                self.skipped_keys[:5],
            )
        spec = cache.spec
        self.cache_keys = cache_keys
        self.teacher_grid = spec.grid
        self.base_size, self.base_resize = spec.image_size, spec.resize
        self.views = spec.has_views
        if target == "auto":
            target = "replay" if spec.has_views else "crop"
        if target == "replay" and not spec.has_views:
            raise ValueError(
                "cache.target=replay needs a cache with several stored views (boxes); use cache.target=crop"
            )
        self.target = target
        if target == "crop" and min(data_cfg.global_scale) < 1.0:
            logger.info(
                "cache.target=crop: the student's crops (data.global_scale=%s) get teacher tokens resampled "
                "from the cached full-image grid, not the teacher's view of the crop; for exact targets use "
                "data.global_scale=[1, 1] or a cache with several views (docs/training.md)",
                list(data_cfg.global_scale),
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.src_index)

    def _epoch_index(self, index: int | tuple[int, int]) -> tuple[int, int]:
        if isinstance(index, tuple | list):  # (epoch, index) from ResumableSampler
            return int(index[0]), int(index[1])
        return self.epoch, int(index)

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = self._epoch_index(index)
        return self._item(epoch, index, self._geometry([index])[0] if self.cache is not None else None)

    def _geometry(self, indices: list[int]) -> list[dict[str, Any]]:
        """What a worker needs of the cache (the features come from the feeder): the key, and the stored
        view boxes and flips when the cache has several views (read in the storage dtype)."""
        out: list[dict[str, Any]] = [{"key": self.cache_keys[i]} for i in indices]
        if self.views:
            fields = ("boxes", "flips")  # not pinned: no CUDA in a worker process
            buf = self.cache.alloc_batch(len(indices), fields, pin=False)
            got = self.cache.read_batch(indices, fields, out=buf).host()
            for k, item in enumerate(out):
                item["boxes"], item["flips"] = got["boxes"][k].clone(), got["flips"][k].clone()
        return out

    def __getitems__(self, indices: list[int | tuple[int, int]]) -> list[dict[str, Any]]:
        """A batch of items (what ``DataLoader`` asks for): the stored views' geometry is read together
        (one :meth:`cache.FeatureCache.read_batch`); the same items as ``[self[i] for i in indices]``."""
        pairs = [self._epoch_index(i) for i in indices]
        if self.cache is None:
            titems: list[Any] = [None] * len(pairs)
        else:
            titems = self._geometry([i for _, i in pairs])
        return [self._item(e, i, t) for (e, i), t in zip(pairs, titems, strict=True)]

    def _item(self, epoch: int, index: int, titem: dict[str, Any] | None) -> dict[str, Any]:
        gen = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
        src = self.source[self.src_index[index]]
        image = src["image"]
        if self.base_size is not None:  # crops and cached boxes refer to the cache's base image
            image = resize_image(image.float(), self.base_size, self.base_resize)
        H, W = int(image.shape[-2]), int(image.shape[-1])
        c = self.cfg
        item: dict[str, Any] = {"index": index, "key": str(src["key"])}
        if titem is not None and str(titem["key"]) != item["key"]:
            raise RuntimeError(f"cache item {index} has key {titem['key']!r}, source has {item['key']!r}")
        # ---- global crop (+ teacher targets)
        if self.target == "replay":
            v = int(torch.randint(0, self.cache.num_views, (1,), generator=gen))
            nbox = [float(x) for x in titem["boxes"][v]]
            flip = bool(titem["flips"][v]) if "flips" in titem else False
            pbox = None
            item["global"] = apply_view(image, titem["boxes"][v], flip, (c.image_size, c.image_size))
            # resample_grid of the stored view, on the device
            same = tuple(self.teacher_grid) == self.student_grid
            roi, ratio = crop_roi((0.0, 0.0, 1.0, 1.0), self.teacher_grid, self.student_grid)
            item["t_roi"] = torch.tensor(roi, dtype=torch.float32)
            item["t_ratio"], item["t_flip"], item["t_view"] = 0 if same else ratio, False, v
        else:
            src_box = (0.0, 0.0, 1.0, 1.0)
            region = None
            if titem is not None and "boxes" in titem:
                b = titem["boxes"]
                src_box = tuple(float(x) for x in (b[0] if b.ndim == 2 else b))
                region = norm_box_to_pixel(src_box, H, W)
            pbox = sample_box(gen, H, W, c.global_scale, c.ratio, region)
            flip = bool(c.flip) and bool(torch.rand(1, generator=gen) < 0.5)
            nbox = list(pixel_box_to_norm(pbox, H, W))
            if (
                titem is not None
            ):  # align_teacher_map of the first stored view (the full image), on the device
                roi, ratio = crop_roi(nbox, self.teacher_grid, self.student_grid, source_box=src_box)
                item["t_roi"] = torch.tensor(roi, dtype=torch.float32)
                item["t_ratio"], item["t_flip"], item["t_view"] = ratio, flip, 0
        if pbox is None:
            pbox = norm_box_to_pixel(nbox, H, W)
        else:
            item["global"] = crop_resize(image, pbox, c.image_size, flip)
        item["box"] = torch.tensor(nbox, dtype=torch.float32)
        item["flip"] = flip
        if self.teacher_image_size and self.teacher_image_size != c.image_size:
            item["t_image"] = crop_resize(image, pbox, self.teacher_image_size, flip)
        # ---- local crops
        locs = []
        for _ in range(c.local_crops):
            b = sample_box(gen, H, W, c.local_scale, c.ratio)
            f = bool(c.flip) and bool(torch.rand(1, generator=gen) < 0.5)
            locs.append(crop_resize(image, b, c.local_size, f))
        item["locals"] = torch.stack(locs) if locs else torch.zeros(0, 3, c.local_size, c.local_size)
        caps = src.get("captions", {}) or {}
        item["captions"] = {g: str(caps.get(g) or "") for g in c.granularities}
        item["caption_valid"] = {g: bool(caps.get(g)) for g in c.granularities}
        item["caption_u"] = float(torch.rand(1, generator=gen))  # CLS2 caption granularity draw
        if self.mask_ratio > 0:  # iBOT mask of the global crop, drawn per sample
            item["mask"] = random_mask(1, self.student_grid, self.mask_ratio, generator=gen)[0]
            # a fraction mask_prob of the images is masked (the draw only exists below 1, so mask_prob=1
            # keeps every other random number of the sample where it was)
            if self.mask_prob < 1.0 and float(torch.rand(1, generator=gen)) >= self.mask_prob:
                item["mask"] = torch.zeros_like(item["mask"])
        return item


def _match_keys(source: Dataset, src_keys: list[str], cache_keys: list[str]) -> tuple[list[int], list[str]]:
    """The source index of every cache key, and the source keys absent from the cache (skipped); a cache
    key missing from the source is an error naming the dataset and the fix."""
    lookup = {k: i for i, k in enumerate(src_keys)}
    missing = [k for k in cache_keys if k not in lookup]
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(cache_keys)} cache keys are not in the source dataset "
            f"{getattr(source, 'identity', lambda: {})()} (first: {missing[:5]}); build the cache from this "
            "dataset (same name, split and kwargs) or point data.dataset at the one the cache was built from"
        )
    cached = set(cache_keys)
    return [lookup[k] for k in cache_keys], [k for k in src_keys if k not in cached]


class ResumableSampler(Sampler[tuple[int, int]]):
    """Per-epoch seeded permutation, sharded ``rank::world`` (equal length per rank), resumable mid-epoch.

    Yields ``(epoch, index)`` so each sample's augmentation seed travels with it into the workers.

        With ``world`` ranks of batch ``b``, the ranks' ``k``-th batches together are exactly the ``k``-th
        batch of size ``world * b`` of a single process (rank ``r`` holds positions ``r, r + world, ...``).
    """

    def __init__(self, n: int, *, rank: int = 0, world: int = 1, seed: int = 0, shuffle: bool = True) -> None:
        self.n, self.rank, self.world, self.seed, self.shuffle = n, rank, world, seed, shuffle
        self.epoch = 0
        self.start = 0  # samples of this rank already consumed in this epoch
        self.endless_batch = 0  # > 0: iterate epoch after epoch in full batches of this size (endless)

    def endless(self, batch_size: int) -> ResumableSampler:
        """Iterate without end: from ``(epoch, start)`` the full batches of ``batch_size`` of each epoch
        (its last partial batch dropped, as ``drop_last`` does), then the next epoch's. A DataLoader over
        it never stops, so its workers keep prefetching across epoch boundaries."""
        self.endless_batch = int(batch_size)
        return self

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def permutation(self, epoch: int) -> torch.Tensor:
        """The epoch's order of all ``n`` samples, ``(n,)`` int64, the same for every rank and world size."""
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(sample_seed(self.seed, 7777, epoch))
        return torch.randperm(self.n, generator=g)

    def order(self, epoch: int | None = None) -> list[int]:
        """This rank's sample order in ``epoch`` (default: the current one); thread-safe (no state)."""
        epoch = self.epoch if epoch is None else int(epoch)
        per_rank = self.n // self.world
        return self.permutation(epoch)[: per_rank * self.world][self.rank :: self.world].tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.endless_batch:
            return self._endless(self.epoch, self.start, self.endless_batch)
        return iter([(self.epoch, i) for i in self.order()[self.start :]])

    def _endless(self, epoch: int, start: int, batch: int) -> Iterator[tuple[int, int]]:
        while True:
            order = self.order(epoch)
            stop = start + (len(order) - start) // batch * batch
            for i in order[start:stop]:
                yield epoch, i
            epoch, start = epoch + 1, 0

    def __len__(self) -> int:
        return self.n // self.world - self.start


class ShardSampler(ResumableSampler):
    """:class:`ResumableSampler` in a shard-aware order (``data.order=shards``): few tar files per stretch.

    Per epoch (seeded by ``(seed, epoch)``): a permutation of the shards; the shards of that permutation
    taken ``window`` at a time; the samples of each window (all the samples of its shards) shuffled among
    themselves; the windows one after the other. Any stretch of the epoch then reads at most ``window``
    shards (``2 * window`` across a window's edge), where the global permutation reads a different shard
    for almost every sample. Mixing: a batch holds samples of those few shards only. Memory: 8 bytes per
    sample (the samples grouped by shard); an epoch's order costs about 0.6 s at 10M samples.

    Everything else is :class:`ResumableSampler`'s: the epoch's order is world-size independent and split
    ``rank::world`` after dropping its last ``n % world`` samples, so every rank has ``n // world`` samples,
    no sample is seen twice in an epoch, the ranks' ``k``-th batches together are the ``k``-th batch of a
    single process, and a run resumed at ``(epoch, start)`` (or on another world size,
    :mod:`distill.reshard`) continues the same sequence.

    Args:
        shards: the shard of each sample, ``(n,)`` ints (any labels; samples of one label are one shard);
            within a shard the samples keep their dataset order until the window shuffle.
        window: shards per window (>= 1; 1 is wids' ``ShardedSampler``: one shard at a time).
    """

    def __init__(
        self,
        shards: Sequence[int] | np.ndarray,
        *,
        window: int = 4,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        labels = np.asarray(shards)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"shards must be one integer label per sample, got {labels.dtype} {labels.shape}"
            )
        if int(window) < 1:
            raise ValueError(f"data.shard_window={window} must be >= 1 (shards shuffled together)")
        super().__init__(len(labels), rank=rank, world=world, seed=seed, shuffle=shuffle)
        self.window = int(window)
        _, dense = np.unique(labels, return_inverse=True)  # labels -> 0..S-1
        dense = dense.reshape(-1)
        self.num_shards = int(dense.max()) + 1 if len(dense) else 0
        self._members = np.argsort(dense, kind="stable")  # samples grouped by shard, dataset order within
        self._sizes = np.bincount(dense, minlength=self.num_shards)  # (S,)
        # shard s holds the samples _members[_starts[s] : _starts[s + 1]]
        self._starts = np.concatenate([[0], np.cumsum(self._sizes)])

    def permutation(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.from_numpy(self._members.copy())
        rng = np.random.default_rng(sample_seed(self.seed, 7778, epoch))
        shard_perm = rng.permutation(self.num_shards)
        order = np.concatenate([self._members[self._starts[s] : self._starts[s + 1]] for s in shard_perm])
        ends = np.cumsum(self._sizes[shard_perm])  # where each shard of the permutation ends in ``order``
        lo = 0
        for w in range(self.window - 1, self.num_shards + self.window - 1, self.window):
            hi = int(ends[min(w, self.num_shards - 1)])
            rng.shuffle(order[lo:hi])  # a window: its shards' samples shuffled together, in place
            lo = hi
        return torch.from_numpy(order)


def build_sampler(
    dataset: Any, data_cfg: DataConfig, *, rank: int = 0, world: int = 1, seed: int = 0
) -> ResumableSampler:
    """Stage 2's sampler for ``data.order``: ``global`` (:class:`ResumableSampler`, one permutation of all
    samples) or ``shards`` (:class:`ShardSampler` over the shards of ``dataset``'s source,
    ``data.shard_window`` at a time). A source without shards (a folder, a synthetic set) is one shard:
    ``shards`` is then a full shuffle, logged."""
    order = data_cfg.order
    if order not in DATA_ORDERS:
        raise ValueError(f"config data.order={order!r} is invalid; choose one of {list(DATA_ORDERS)}")
    if order == "global":
        return ResumableSampler(len(dataset), rank=rank, world=world, seed=seed)
    shards = dataset_shards(dataset)
    if shards is None:
        logger.info(
            "data.order=shards: the source (%s) has no shards; all its samples are one shard, so the order is a "
            "full shuffle (as data.order=global mixes)",
            type(getattr(dataset, "source", dataset)).__name__,
        )
        shards = np.zeros(len(dataset), np.int64)
    sampler = ShardSampler(shards, window=data_cfg.shard_window, rank=rank, world=world, seed=seed)
    logger.info(
        "data.order=shards: %d samples in %d shards, %d shard(s) per window",
        sampler.n,
        sampler.num_shards,
        sampler.window,
    )
    return sampler


def dataset_shards(dataset: Any) -> np.ndarray | None:
    """The shard of each item of a :class:`DistillDataset`, ``(len(dataset),)`` int64, from its source's
    ``shard_of`` (webdataset tars, table files); ``None`` when the source has none."""
    source = getattr(dataset, "source", dataset)
    shard_of = getattr(source, "shard_of", None)
    if not callable(shard_of):
        return None
    index = np.asarray(getattr(dataset, "src_index", range(len(dataset))), np.int64)
    return shard_of(index)


HOST_KEYS = ("t_ratio", "t_view")  # per-sample ints the training process needs on the host


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Default collation of :class:`DistillDataset` items (strings become lists); the per-sample ints of
    ``HOST_KEYS`` and ``caption_u`` are also kept as host lists in ``batch["host"]`` (no device sync to
    read them back)."""
    host: dict[str, Any] = {}
    if items and "caption_u" in items[0]:
        host["caption_u"] = [float(it["caption_u"]) for it in items]
    for k in HOST_KEYS:
        if items and k in items[0]:
            host[k] = [int(it.pop(k)) for it in items]
    batch = default_collate(items)
    if host:
        batch["host"] = host
    return batch


# ------------------------------------------------------------------------------ worker -> trainer transport
PACK_ALIGN = 64  # byte alignment of each tensor in a packed batch (any dtype's elements stay aligned)


class _Slot:
    """Where tensor ``i`` of a packed batch was (:func:`pack_tensors`)."""

    __slots__ = ("i",)

    def __init__(self, i: int) -> None:
        self.i = i


def _map_leaves(x: Any, leaf: type, fn: Any) -> Any:
    """``x`` (nested dicts, lists, tuples) with every ``leaf``-typed value replaced by ``fn(value)``;
    lists of plain values (strings, numbers) are kept as they are, not walked."""
    if isinstance(x, leaf):
        return fn(x)
    if isinstance(x, dict):
        return {k: _map_leaves(v, leaf, fn) for k, v in x.items()}
    if isinstance(x, (list, tuple)) and not _plain(x):
        return type(x)(_map_leaves(v, leaf, fn) for v in x)
    return x


def pack_tensors(batch: Any) -> dict[str, Any]:
    """``batch`` (nested dicts, lists, tuples) with all its tensors copied into ONE contiguous byte
    buffer, for a DataLoader worker to hand over.

    A worker's batch crosses to the training process tensor by tensor, each its own shared-memory
    segment whose file descriptor travels over a socket (torch's ``file_descriptor`` sharing strategy):
    ~0.2 ms per tensor, on the training process's main thread. A batch of stage 2 holds about ten
    (images, crops, boxes, flips, indices, caption draws), so packing them costs the worker one copy
    and saves the trainer ~2 ms per step. :func:`unpack_tensors` restores the batch (views of the
    buffer)."""
    metas: list[tuple[torch.dtype, tuple[int, ...], int, int]] = []
    tensors: list[torch.Tensor] = []
    total = 0

    def slot(t: torch.Tensor) -> _Slot:
        nonlocal total
        nbytes = t.numel() * t.element_size()
        metas.append((t.dtype, tuple(t.shape), total, nbytes))
        tensors.append(t)
        total += -(-nbytes // PACK_ALIGN) * PACK_ALIGN
        return _Slot(len(metas) - 1)

    skeleton = _map_leaves(batch, torch.Tensor, slot)
    size = max(total, 1)
    if torch.utils.data.get_worker_info() is not None:
        # in a worker: allocate in shared memory right away (as default_collate does), or pickling the
        # batch for the trip would copy the buffer into shared memory once more
        buf = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(size))
    else:
        buf = torch.empty(size, dtype=torch.uint8)
    for meta, t in zip(metas, tensors):
        _view(buf, *meta).copy_(t)
    return {"packed_buffer": buf, "packed_meta": metas, "packed_batch": skeleton}


def _plain(x: list | tuple) -> bool:
    """A list of plain values (strings, numbers): nothing to pack inside, copied as it is."""
    return all(isinstance(v, (str, bytes, int, float, bool)) or v is None for v in x)


def _view(
    buf: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], off: int, nbytes: int
) -> torch.Tensor:
    return buf[off : off + nbytes].view(dtype).view(shape)


def unpack_tensors(packed: Any) -> Any:
    """The batch :func:`pack_tensors` packed (its tensors are views of the one buffer; a batch that was
    not packed is returned as it is)."""
    if not (isinstance(packed, dict) and "packed_buffer" in packed):
        return packed
    buf, metas = packed["packed_buffer"], packed["packed_meta"]
    return _map_leaves(packed["packed_batch"], _Slot, lambda s: _view(buf, *metas[s.i]))


def collate_packed(items: list[dict[str, Any]]) -> dict[str, Any]:
    """:func:`collate`, then :func:`pack_tensors`: the collate function of stage 2's DataLoader workers."""
    return pack_tensors(collate(items))
