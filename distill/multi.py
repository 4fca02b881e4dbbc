"""Several teachers into one student (agglomerative distillation, AM-RADIO / RADIOv2.5 style), with the
patch-text alignment of the text-aligned teacher kept.

A run names several stage-1 caches made by different teachers over the same dataset (``teachers:
[{name, path, weight, ...}]``, or ``cache.paths=[a, b]`` with default settings); widths, patch grids,
resolutions, storage dtypes and PCA reduction may differ. Pieces:

- :func:`resolve_teachers`: the config's teacher entries, named and checked (one text-aligned teacher);
- :func:`join_keys`: the caches joined by sample key. The student's samples are the union of the
  caches' keys; a sample a cache lacks (skipped in its stage 1) contributes only the terms of the
  teachers that have it (counted, logged and listed in the run's ``run_info.json``). Caches whose keys
  do not overlap are refused, naming both and the overlap;
- :class:`JoinedDataset`: the student's crops of those samples (:class:`distill.data.DistillDataset`
  without a cache: images, crops, captions, masks);
- :class:`MultiFeeder`: one batch reader per cache (:class:`distill.feeder.FeatureFeeder`, its own
  thread, storage dtype), the rows of the batch's keys; the crop geometry of each teacher's grid is
  worked out here from the student's crop box (``batch["teachers"][name]``);
- :func:`teacher_statistics` / :func:`load_statistics`: each teacher's token mean and covariance
  (patch tokens and the first global token), computed from its cache once and stored beside it
  (``teacher-stats-<identity hash>.safetensors``; see :mod:`students.adaptors` for PHI-S);
- :class:`MultiTaskModule`: per teacher, the student's adaptor heads (``student.adaptors[name]``) against
  that teacher's standardised tokens, a patch and a global feature loss, each with its weight; the
  image-text term on the text-aligned teacher's caption embeddings through the student's own text
  interface (``Student.project_to_text``); KoLeo as configured.

Hook points: :func:`distill.train.train` builds a config with ``teachers`` / ``cache.paths`` with
:func:`build_multi_task` (not :func:`distill.task.build_task`); :func:`distill.feeder.feeder_for` asks the dataset for its feeder
(:meth:`JoinedDataset.make_feeder`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tipsdistill.cache import FeatureBatch, FeatureCache, open_cache
from tipsdistill.cache.codec import decode
from tipsdistill.cache.dataset_spec import source_for_cache
from tipsdistill.cache.format import cache_identity
from tipsdistill.students.adaptors import standardisation

from .config import TeacherEntry, TrainConfig
from .data import DistillDataset, ResumableSampler, align_teacher_maps, build_sampler, crop_roi, ratio_order
from .ema import EMAHeads
from .feeder import FeatureFeeder
from .losses import FEATURE_LOSSES, PatchFeatureLoss, PatchPrototypeLoss, token_weights, weighted_token_mean
from .targets import CachedText, Targets
from .task import (
    BuiltTask,
    TaskModule,
    _align_text_width,
    _build_text,
    _head_dtype,
    _scalar_params_as_vectors,
    build_student_from_config,
    move_task,
)

logger = logging.getLogger(__name__)

STATS_FORMAT = "tipsdistill-teacher-stats/1"
MISSING_LISTED = 1000  # missing keys listed per teacher in run_info.json (all are counted)
# a teacher's patch_loss / cls_loss: a feature loss on the standardised tokens, or "proto": the prototype
# cross-entropy through a head of that teacher (its EMA copy scores the teacher's tokens; iBOT++ / DINO's)
TEACHER_LOSSES = (*FEATURE_LOSSES, "proto")


# ------------------------------------------------------------------------------------------ teachers
@dataclass
class Teacher:
    """A resolved teacher of the run: its config entry, its open cache and its key -> row map."""

    entry: TeacherEntry
    cache: FeatureCache
    rows: np.ndarray = field(
        default_factory=lambda: np.zeros(0, np.int64)
    )  # joined index -> row, -1 = missing

    @property
    def name(self) -> str:
        return self.entry.name


def teachers_override(entries: list[dict[str, Any]]) -> str:
    """The ``teachers=[...]`` command-line override of ``entries`` (:class:`TeacherEntry` fields: ``name``,
    ``path``, ``weight``...), as ``tipsdistill-train`` reads it (JSON is YAML flow syntax)."""
    unknown = sorted({k for e in entries for k in e} - set(TeacherEntry.__dataclass_fields__))
    if unknown:
        raise ValueError(
            f"teachers override: unknown field(s) {unknown}; known: {list(TeacherEntry.__dataclass_fields__)}"
        )
    return "teachers=" + json.dumps(
        [{k: str(v) if isinstance(v, Path) else v for k, v in e.items()} for e in entries]
    )


def resolve_teachers(cfg: TrainConfig) -> list[TeacherEntry]:
    """The run's teacher entries: ``teachers`` as given, or one default entry per ``cache.paths``; each
    named (``""`` = the cache's teacher name), names unique, losses known, exactly one text-aligned
    teacher when the CLIP term is on (``text: true``, else the first whose cache holds captions)."""
    if cfg.teachers and cfg.cache.paths:
        raise ValueError(
            "give the caches of a several-teacher run once: either teachers: [{name, path, ...}] or "
            "cache.paths=[...], not both"
        )
    if cfg.teacher.source != "cache":
        raise ValueError(
            f"several teachers are read from their caches: teacher.source=cache (got {cfg.teacher.source!r})"
        )
    if cfg.cache.path:
        raise ValueError(
            f"cache.path={cfg.cache.path} and several teachers are both set; list every cache in teachers "
            "(or cache.paths) and drop cache.path"
        )
    entries = [copy.deepcopy(e) for e in cfg.teachers] or [TeacherEntry(path=p) for p in cfg.cache.paths]
    if len(entries) < 1:
        raise ValueError("teachers: [] is empty; list at least one cache")
    for i, e in enumerate(entries):
        if not e.path:
            raise ValueError(f"teachers[{i}] has no path: set teachers[{i}].path=<stage-1 cache>")
        for key, val in (("patch_loss", e.patch_loss), ("cls_loss", e.cls_loss)):
            if val not in TEACHER_LOSSES:
                raise ValueError(f"teachers[{i}].{key}={val!r}; choose one of {list(TEACHER_LOSSES)}")
        if e.standardize not in ("phi-s", "channel", "none"):
            raise ValueError(f"teachers[{i}].standardize={e.standardize!r}; choose phi-s, channel or none")
        if min(e.weight, e.patch_weight, e.cls_weight) < 0:
            raise ValueError(f"teachers[{i}]: weights must be >= 0")
    return entries


def _teacher_name(cache: FeatureCache) -> str:
    t = cache.spec.teacher or {}
    return str(t.get("name") or t.get("class") or Path(cache.path).parent.name).replace("/", "_")


def open_teachers(cfg: TrainConfig) -> list[Teacher]:
    """Open each entry's cache, name the unnamed ones, pick the text-aligned teacher."""
    teachers = []
    for e in resolve_teachers(cfg):
        cache = open_cache(e.path)
        if len(cache) == 0:
            raise ValueError(f"cache {e.path} has no completed samples; finish its stage 1 first")
        if cache.spec.has_views:
            raise ValueError(
                f"cache {e.path} stores {cache.spec.num_views} views per sample; a several-teacher run cuts each "
                "teacher's targets out of its full-image map: build the caches with one view (--views 1)"
            )
        if not e.name:
            e.name = _teacher_name(cache)
        teachers.append(Teacher(entry=e, cache=cache))
    names = [t.name for t in teachers]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(
            f"teachers named {dup} more than once ({[t.entry.path for t in teachers if t.name in dup]}); "
            "give each a name: teachers: [{name: ..., path: ...}, ...]"
        )
    if cfg.loss.clip_weight > 0:
        asked = [t for t in teachers if t.entry.text]
        if len(asked) > 1:
            raise ValueError(f"text: true on several teachers ({[t.name for t in asked]}); mark one")
        if not asked:
            asked = [t for t in teachers if t.entry.text is None and t.cache.spec.has_text][:1]
        if not asked:
            raise ValueError(
                f"loss.clip_weight={cfg.loss.clip_weight} needs caption embeddings, and none of the caches "
                f"{[t.entry.path for t in teachers]} holds them; cache captions with the text-aligned teacher or "
                "set loss.clip_weight=0"
            )
        if not asked[0].cache.spec.has_text:
            raise ValueError(
                f"teacher {asked[0].name} (text: true): cache {asked[0].entry.path} has no captions"
            )
        for t in teachers:
            t.entry.text = t is asked[0]
    else:
        for t in teachers:
            t.entry.text = bool(t.entry.text)
    return teachers


def join_keys(teachers: list[Teacher]) -> list[str]:
    """The union of the caches' keys (first cache's order, then the others' new keys); fills each
    teacher's ``rows`` (joined index -> its cache row, ``-1`` where it lacks the sample). Two caches
    with no key in common are refused, naming both and the overlap."""
    keys: list[str] = []
    seen: dict[str, int] = {}
    per = []
    for t in teachers:
        ks = t.cache.keys()
        per.append(set(ks))
        for k in ks:
            if k not in seen:
                seen[k] = len(keys)
                keys.append(k)
    for i in range(len(teachers)):
        for j in range(i + 1, len(teachers)):
            shared = len(per[i] & per[j])
            if shared == 0:
                a, b = teachers[i], teachers[j]
                raise ValueError(
                    f"caches {a.entry.path} ({a.name}, {len(per[i])} keys, e.g. {sorted(per[i])[:3]}) and "
                    f"{b.entry.path} ({b.name}, {len(per[j])} keys, e.g. {sorted(per[j])[:3]}) share 0 sample "
                    "keys (overlap 0); several teachers must be cached over the same dataset (same names, "
                    "split and kwargs)"
                )
    for t in teachers:
        rows = np.full(len(keys), -1, np.int64)
        for r, k in enumerate(t.cache.keys()):
            rows[seen[k]] = r
        t.rows = rows
    return keys


# ------------------------------------------------------------------------------------- statistics
def teacher_statistics(
    cache: FeatureCache, max_samples: int = 0, batch_size: int = 64
) -> dict[str, torch.Tensor]:
    """Mean and covariance (float64, population) of a cache's decoded tokens: ``patch_mean (D,)``,
    ``patch_cov (D, D)`` over every patch token, ``cls_mean`` / ``cls_cov`` over the first global token;
    on ``max_samples`` evenly spaced samples (0 = all). Read with the batch reader."""
    n = len(cache)
    rows = np.arange(n) if not max_samples or max_samples >= n else np.linspace(0, n - 1, max_samples).round()
    rows = np.unique(rows.astype(np.int64))
    basis = cache.reduction.tensors("cpu") if cache.reduction is not None else {}
    acc: dict[str, list[Any]] = {}
    for start in range(0, len(rows), batch_size):
        fb = cache.read_batch(rows[start : start + batch_size], ("patch", "cls"))
        got = fb.host()
        patch = decode(got["patch"], got.get("patch_scale"), **basis.get("patch", {}))
        cls = decode(got["cls"], got.get("cls_scale"))[:, 0]
        for which, x in (("patch", patch.reshape(-1, patch.shape[-1])), ("cls", cls)):
            x = x.double()
            s = acc.setdefault(which, [0, 0.0, 0.0])
            s[0] += x.shape[0]
            s[1] = s[1] + x.sum(0)
            s[2] = s[2] + x.T @ x
    out = {}
    for which, (count, total, outer) in acc.items():
        mean = total / count
        out[f"{which}_mean"] = mean
        out[f"{which}_cov"] = outer / count - torch.outer(mean, mean)
    out["samples"] = torch.tensor([len(rows)], dtype=torch.int64)
    return out


def stats_path(cache: FeatureCache, max_samples: int = 0) -> Path:
    """Where the statistics of ``cache`` live: beside its index, keyed by its identity (and sample count)."""
    ident = json.dumps(
        {**cache_identity(cache.meta), "stats_samples": int(max_samples)}, sort_keys=True, default=str
    )
    digest = hashlib.sha1(ident.encode()).hexdigest()[:16]
    return Path(cache.path).parent / f"teacher-stats-{digest}.safetensors"


def load_statistics(
    cache: FeatureCache, max_samples: int = 0, fallback_dir: str | Path | None = None
) -> dict[str, torch.Tensor]:
    """The statistics of :func:`teacher_statistics`, read from their file beside the cache (computed and
    written there once; into ``fallback_dir`` when the cache's folder is read-only). A stored file of
    another cache identity, or one that cannot be read, is recomputed (logged), never trusted."""
    ident = json.dumps(cache_identity(cache.meta), sort_keys=True, default=str)
    candidates = [stats_path(cache, max_samples)]
    if fallback_dir is not None:
        candidates.append(Path(fallback_dir) / candidates[0].name)
    for path in candidates:
        if not path.is_file():
            continue
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            if meta.get("format") == STATS_FORMAT and meta.get("identity") == ident:
                return load_file(str(path))
            logger.warning("%s: statistics of another cache (identity differs); recomputing", path)
        except Exception as exc:  # noqa: BLE001 - a bad file someone left there is recomputed, never fatal
            logger.warning("%s: unreadable statistics (%s); recomputing", path, exc)
    stats = teacher_statistics(cache, max_samples)
    meta = {"format": STATS_FORMAT, "identity": ident, "cache": str(cache.path)}
    for path in candidates:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
            save_file({k: v.contiguous() for k, v in stats.items()}, str(tmp), metadata=meta)
            os.replace(tmp, path)
            logger.info("teacher statistics of %s written to %s", cache.path, path)
            break
        except OSError as exc:
            logger.warning("cannot write teacher statistics to %s (%s)", path, exc)
    return stats


# ------------------------------------------------------------------------------------------- data
class _KeyedCache:
    """A cache seen through the joined index: ``read_batch`` of joined indices reads the teacher's rows
    (a sample it lacks reads its first row, masked out later by ``teacher_valid``)."""

    def __init__(self, cache: FeatureCache, rows: np.ndarray) -> None:
        self.cache, self.rows = cache, rows
        self.num_views = cache.num_views
        self.granularities = cache.granularities

    def alloc_batch(self, *args: Any, **kwargs: Any) -> FeatureBatch:
        return self.cache.alloc_batch(*args, **kwargs)

    def read_batch(self, indices: Any, fields: Any, *, views: Any = None, out: FeatureBatch | None = None):
        idx = np.asarray(indices, dtype=np.int64)
        rows = self.rows[idx]
        out = self.cache.read_batch(np.where(rows >= 0, rows, 0), fields, views=views, out=out)
        out.indices = idx.copy()
        return out


class JoinedDataset(DistillDataset):
    """The student's crops of the joined samples (no teacher data in the items: :class:`MultiFeeder`
    reads each cache in the training process). Source images are matched by key; keys of a cache
    missing from the source are an error, source images in no cache are counted and listed."""

    def __init__(
        self,
        source: Any,
        cfg: TrainConfig,
        student_grid: tuple[int, int],
        teachers: list[Teacher],
        keys: list[str],
    ) -> None:
        data = copy.deepcopy(cfg.data)
        data.local_crops = 0  # the per-teacher terms use the global crop only
        super().__init__(
            source,
            data,
            student_grid,
            cache=None,
            seed=cfg.seed,
            mask_ratio=cfg.loss.mask_ratio,
            mask_prob=cfg.loss.mask_prob,
        )
        self.teachers = teachers
        self.train_cfg = cfg
        src_keys = list(source.keys()) if hasattr(source, "keys") else [str(i) for i in range(len(source))]
        lookup = {k: i for i, k in enumerate(src_keys)}
        missing = [k for k in keys if k not in lookup]
        if missing:
            raise ValueError(
                f"{len(missing)} of {len(keys)} cached keys are not in the source dataset (first: {missing[:5]}); "
                "point data.dataset at the dataset the caches were built from"
            )
        self.src_index = [lookup[k] for k in keys]
        self.cache_keys = keys
        joined = set(keys)
        self.skipped_keys = [k for k in src_keys if k not in joined]
        first = teachers[0].cache.spec
        for t in teachers[1:]:
            if t.cache.spec.resize != first.resize:
                raise ValueError(
                    f"cache {t.entry.path} resized the images with {t.cache.spec.resize!r}, cache "
                    f"{teachers[0].entry.path} with {first.resize!r}: the teachers saw different regions of the "
                    "images; build the caches with the same --resize"
                )
        # the student's crops come from the largest teacher base image (normalised boxes are shared)
        sizes = [t.cache.spec.image_size for t in teachers if t.cache.spec.image_size is not None]
        self.base_size = max(sizes, key=lambda s: s[0] * s[1]) if sizes else None
        self.base_resize = first.resize
        self.target = "crop"

    def make_feeder(self, sampler: ResumableSampler, batch_size: int, depth: int) -> MultiFeeder:
        """The feature reader of this dataset (asked for by :func:`distill.feeder.feeder_for`)."""
        return MultiFeeder(self, sampler, batch_size, depth=depth)


def _fields(t: Teacher, cfg: TrainConfig) -> tuple[str, ...]:
    return ("patch", "cls") + (("text",) if t.entry.text and cfg.loss.clip_weight > 0 else ())


class MultiFeeder:
    """One :class:`FeatureFeeder` per teacher over the joined index, read ahead in their threads; the
    same interface as a single feeder (``seek``, ``next``, ``attach``, ``close``, ``wait_s``)."""

    def __init__(
        self, dataset: JoinedDataset, sampler: ResumableSampler, batch_size: int, *, depth: int
    ) -> None:
        self.dataset = dataset
        self.teachers = dataset.teachers
        self.grid = tuple(dataset.student_grid)
        self.feeders = [
            FeatureFeeder(
                _KeyedCache(t.cache, t.rows),  # type: ignore[arg-type]
                sampler,
                batch_size,
                fields=_fields(t, dataset.train_cfg),
                seed=dataset.seed,
                depth=depth,
            )
            for t in self.teachers
        ]
        self.missing = {t.name: 0 for t in self.teachers}  # training rows each teacher lacked
        self.rows = 0

    @property
    def wait_s(self) -> float:
        return sum(f.wait_s for f in self.feeders)

    def seek(self, epoch: int, consumed: int) -> None:
        for f in self.feeders:
            f.seek(epoch, consumed)

    def next(self) -> list[FeatureBatch]:
        return [f.next() for f in self.feeders]

    def attach(self, batch: dict[str, Any], fbs: list[FeatureBatch], epoch: int) -> dict[str, Any]:
        """Put each teacher's feature batch into ``batch["teachers"][name]`` with the crop geometry on its
        grid; ``batch["host"]["teacher_valid"][name]`` says which rows that teacher has."""
        want = batch["index"].tolist()
        host = batch.setdefault("host", {})
        boxes = batch["box"].tolist()
        flips = batch["flip"]
        valid_all: dict[str, list[bool]] = {}
        out: dict[str, FeatureBatch] = {}
        for t, fb in zip(self.teachers, fbs, strict=True):
            if fb.indices.tolist() != want or fb.epoch != epoch:
                raise RuntimeError(
                    f"teacher {t.name}: feature batch (epoch {fb.epoch}, samples {fb.indices.tolist()[:8]}...) does "
                    f"not match the image batch (epoch {epoch}, samples {want[:8]}...)"
                )
            n = fb.size
            geo = [crop_roi(b, t.cache.spec.grid, self.grid) for b in boxes]
            ratios = [r for _, r in geo]
            fb.tensors["t_roi"][:n] = torch.tensor([roi for roi, _ in geo], dtype=torch.float32)
            fb.tensors["t_flip"][:n] = flips
            if len(set(ratios)) > 1:
                fb.tensors["t_order"][:n] = torch.tensor(ratio_order(ratios), dtype=torch.int64)
            host[f"t_ratio/{t.name}"] = ratios
            valid = (t.rows[np.asarray(want)] >= 0).tolist()
            valid_all[t.name] = valid
            lacking = n - sum(valid)
            self.missing[t.name] += lacking
            if t.entry.text and "text_valid/alt" in fb.tensors:
                keep = torch.tensor(valid, dtype=torch.bool)
                for g in t.cache.granularities:
                    fb.tensors[f"text_valid/{g}"][:n] &= keep
                host["text_valid"] = {
                    g: fb.tensors[f"text_valid/{g}"][:n].tolist() for g in t.cache.granularities
                }
            out[t.name] = fb
        self.rows += len(want)
        host["teacher_valid"] = valid_all
        batch["teachers"] = out
        return batch

    def close(self) -> None:
        for f in self.feeders:
            f.close()
        lacking = {k: v for k, v in self.missing.items() if v}
        if lacking:
            logger.info(
                "several teachers: of %d training rows, teachers lacked %s (only the other teachers' terms counted)",
                self.rows,
                ", ".join(f"{k}: {v}" for k, v in lacking.items()),
            )


# ------------------------------------------------------------------------------------------ targets
class MultiTargets(Targets):
    """Each teacher's tokens of a batch on the student's grid (:meth:`per_teacher`); ``dim`` is the
    student's width (the base task's frozen projection is then the identity)."""

    def __init__(self, teachers: list[Teacher], width: int, device: torch.device) -> None:
        self.dim = int(width)
        self.names = [t.name for t in teachers]
        self.grids = {t.name: t.cache.spec.grid for t in teachers}
        self.bases = {
            t.name: (t.cache.reduction.tensors(device) if t.cache.reduction is not None else {})
            for t in teachers
        }

    def per_teacher(
        self, batch: Mapping[str, Any], name: str, grid: tuple[int, int], adaptor: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher ``name``'s ``patch (B, h, w, D_t)`` aligned to the student's crop and ``cls (B, C_t, D_t)``;
        with ``adaptor`` (:class:`students.adaptors.TeacherAdaptor`) standardised by it, on the teacher's own
        grid before the alignment (the standardisation is affine and the alignment a convex interpolation,
        so the order does not change the targets; the teacher's grid is usually the smaller)."""
        feats = batch["teachers"][name]
        patch = decode(feats["patch"], feats.get("patch_scale"), **self.bases[name].get("patch", {}))
        cls = decode(feats["cls"], feats.get("cls_scale"))
        if adaptor is not None:
            patch, cls = adaptor.standardise("patch", patch), adaptor.standardise("cls", cls)
        patch = patch.view(patch.shape[0], *self.grids[name], patch.shape[-1])
        ratios = batch["host"][f"t_ratio/{name}"]
        order = feats["t_order"] if len(set(ratios)) > 1 else None
        t_patch = align_teacher_maps(patch, feats["t_roi"], ratios, feats["t_flip"], grid, order)
        return t_patch, cls

    def __call__(self, batch: Mapping[str, Any], grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The first teacher's tokens (the task reads every teacher with :meth:`per_teacher`)."""
        return self.per_teacher(batch, self.names[0], grid)


# --------------------------------------------------------------------------------------------- task
class MultiTaskModule(TaskModule):
    """The task of a several-teacher run: per teacher ``{name}/patch`` and ``{name}/cls`` terms (the
    student's adaptor heads vs the standardised teacher tokens, over the samples that teacher has), the
    CLIP term on the text-aligned teacher's captions, KoLeo. Loss weights: ``weight * patch_weight`` and
    ``weight * cls_weight`` per teacher, ``loss.clip_weight``, ``loss.koleo_weight``."""

    def __init__(
        self,
        cfg: TrainConfig,
        student: nn.Module,
        *,
        teachers: list[Teacher],
        targets: MultiTargets,
        text: tuple[Any, int] | None,
    ) -> None:
        base = copy.deepcopy(cfg)
        base.loss.patch_weight = 0.0  # replaced by the per-teacher terms
        base.loss.dino_weight = 0.0
        super().__init__(base, student, targets=targets, text=text)
        self.entries = {t.name: t.entry for t in teachers}
        self.text_teacher = next((t.name for t in teachers if t.entry.text), None)
        terms = [
            (t, which, getattr(t.entry, f"{which}_loss")) for t in teachers for which in ("patch", "cls")
        ]
        self.feature_losses = nn.ModuleDict(
            {f"{t.name}/{w}": PatchFeatureLoss(kind, adapter=None) for t, w, kind in terms if kind != "proto"}
        )
        # "proto" terms: a prototype head on the adaptor's output (the teacher's standardised space), the
        # teacher's tokens scored by the head's EMA copy (head-only EMA, outside the engine), centred
        weights = {
            "masked_weight": cfg.loss.patch_masked_weight,
            "visible_weight": cfg.loss.patch_visible_weight,
        }
        protos = [(f"{t.name}/{w}", int(t.cache.spec.dim)) for t, w, kind in terms if kind == "proto"]
        self.proto_heads = nn.ModuleDict({key: self._head(dim) for key, dim in protos})
        self.proto_losses = nn.ModuleDict(
            {key: PatchPrototypeLoss(cfg.head.out_dim, **weights, **self._centering()) for key, _ in protos}
        )
        _scalar_params_as_vectors(self.proto_heads)
        self.ema_heads = EMAHeads(None, None, named={f"ema_{key}": h for key, h in self.proto_heads.items()})

    def forward(self, batch: dict[str, Any], *, teacher_temp: float) -> dict[str, torch.Tensor]:
        loss = self.cfg.loss
        pixels = batch["global"]
        patch_size = self.student.patch_size
        grid = (pixels.shape[-2] // patch_size, pixels.shape[-1] // patch_size)
        mask = batch["mask"].bool() if loss.mask_ratio > 0 else None
        feats = self.student(pixels, mask)
        terms: dict[str, torch.Tensor] = {}
        valid = batch["host"]["teacher_valid"]
        for name, entry in self.entries.items():
            adaptor = self.student.adaptors[name]
            t_patch, t_cls = self.targets.per_teacher(batch, name, grid, adaptor)  # standardised
            ok = torch.tensor(valid[name], dtype=torch.bool, device=pixels.device)
            dtype = adaptor.patch.fc1.weight.dtype
            s_patch = adaptor.patch(feats.patch.to(dtype)).float()  # (B, h, w, D_t)
            s_cls = adaptor.cls(feats.cls[:, :1].to(dtype)).float()  # (B, 1, D_t)
            pairs = (
                ("patch", s_patch, t_patch, mask, entry.patch_weight),
                ("cls", s_cls, t_cls[:, :1], None, entry.cls_weight),
            )
            for which, s, t, m, w in pairs:
                if w <= 0 or entry.weight <= 0:
                    continue
                key = f"{name}/{which}"
                s, t = s.reshape(s.shape[0], -1, s.shape[-1]), t.reshape(t.shape[0], -1, t.shape[-1])
                if key in self.proto_heads:
                    per_token = self._proto(key, s, t, ok, teacher_temp)
                else:
                    per_token = self.feature_losses[key].per_token(s, t)
                tw = token_weights(
                    m if which == "patch" else None,
                    tuple(per_token.shape),
                    loss.patch_masked_weight,
                    loss.patch_visible_weight,
                    per_token.device,
                )
                terms[f"{name}/{which}"] = entry.weight * w * weighted_token_mean(per_token, tw * ok[:, None])
        if self.clip_loss is not None:
            tb = {**batch, "features": batch["teachers"][self.text_teacher]}
            terms["clip"] = loss.clip_weight * self._clip(feats.cls, tb, pixels.device)
        if self.koleo_loss is not None:
            terms["koleo"] = loss.koleo_weight * self.koleo_loss(feats.cls[:, 0].float())["koleo"]
        return terms

    def _proto(
        self, key: str, s: torch.Tensor, t: torch.Tensor, ok: torch.Tensor, teacher_temp: float
    ) -> torch.Tensor:
        """The prototype cross-entropy of every token ``(B, N)`` of term ``key``: the adaptor's tokens ``s``
        through the head vs the standardised teacher tokens ``t`` through its EMA copy; the center moves
        with the rows the teacher has (``ok``) only."""
        head, ema, fl = self.proto_heads[key], self.ema_heads.named[f"ema_{key}"], self.proto_losses[key]
        s_logits = head(s.to(_head_dtype(head))).float()
        t_logits = ema(t.to(_head_dtype(ema))).float()
        per_token = fl.per_token(s_logits, t_logits, teacher_temp=teacher_temp)
        if self.training and fl.centering == "center":
            fl.update_center(t_logits[ok])
        return per_token


# ------------------------------------------------------------------------------------------ building
def adaptor_specs(cfg: TrainConfig, teachers: list[Teacher]) -> dict[str, dict[str, Any]]:
    """``student.kwargs.adaptors``: one spec per teacher (:class:`students.adaptors.TeacherAdaptor`)."""
    return {
        t.name: {
            "teacher_dim": int(t.cache.spec.dim),
            "hidden_dim": int(t.entry.hidden_dim),
            "nlayers": int(t.entry.nlayers),
            "standardize": t.entry.standardize,
            "text": bool(t.entry.text),
            "text_dim": int(t.cache.spec.text_dim),
        }
        for t in teachers
    }


def build_multi_task(cfg: TrainConfig, *, device: torch.device, rank: int = 0, world: int = 1) -> BuiltTask:
    """:func:`distill.task.build_task` of a several-teacher run."""
    teachers = open_teachers(cfg)
    keys = join_keys(teachers)
    cfg.student.kwargs["adaptors"] = adaptor_specs(cfg, teachers)  # checkpoints and exports rebuild them
    torch.manual_seed(cfg.seed)
    student = build_student_from_config(cfg)
    patch_size = student.patch_size
    if cfg.data.image_size % patch_size:
        raise ValueError(
            f"data.image_size={cfg.data.image_size} must be a multiple of the student's patch size {patch_size}"
        )
    grid = (cfg.data.image_size // patch_size, cfg.data.image_size // patch_size)
    if cfg.loss.dino_weight > 0 or (cfg.loss.patch_weight > 0 and cfg.loss.patch == "proto"):
        logger.info(
            "several teachers: the per-teacher adaptor terms (teachers[*].patch_loss / cls_loss) replace "
            "loss.patch and the DINO term of the recipe"
        )
    info: dict[str, Any] = {
        "student": getattr(student, "config", {}),
        "student_grid": list(grid),
        "teachers": {},
    }
    for t in teachers:
        stats = load_statistics(
            t.cache, t.entry.stats_samples, fallback_dir=Path(cfg.output_dir) / "teacher_stats"
        )
        adaptor = student.adaptors[t.name]
        for which in ("patch", "cls"):
            adaptor.set_statistics(
                which, standardisation(t.entry.standardize, stats[f"{which}_mean"], stats[f"{which}_cov"])
            )
        lacking = [keys[i] for i in np.flatnonzero(t.rows < 0)]
        info["teachers"][t.name] = {
            "path": str(t.entry.path),
            "cache": t.cache.spec.summary(),
            "cache_identity": cache_identity(t.cache.meta),
            "text": bool(t.entry.text),
            "samples": int((t.rows >= 0).sum()),
            "missing": len(lacking),
            "missing_keys": lacking[:MISSING_LISTED],
        }
        if lacking:
            logger.warning(
                "teacher %s lacks %d of the %d joined samples (skipped in its cache; first: %s): they count "
                "only the other teachers' terms",
                t.name,
                len(lacking),
                len(keys),
                lacking[:5],
            )
    text_teacher = next((t for t in teachers if t.entry.text), None)
    targets = MultiTargets(teachers, student.embed_dim, device)
    text = None
    if cfg.loss.clip_weight > 0:
        text = _build_text(cfg, student, targets, text_teacher.cache)
        if not isinstance(text[0], CachedText):
            raise ValueError(
                "several teachers: the CLIP term reads the text-aligned teacher's cached captions"
            )
        _align_text_width(cfg, student, text[1])
    info["text_source"] = f"cache:{text_teacher.name}" if text is not None else "none"
    info["text_dim"] = student.text_dim
    task = MultiTaskModule(cfg, student, teachers=teachers, targets=targets, text=text)
    move_task(task, device)
    source = source_for_cache(teachers[0].cache, cfg.data.dataset or None, cfg.data.dataset_kwargs)
    dataset = JoinedDataset(source, cfg, grid, teachers, keys)
    sampler = build_sampler(dataset, cfg.data, rank=rank, world=world, seed=cfg.seed)
    info["num_samples"] = len(dataset)
    info["skipped"] = len(dataset.skipped_keys)
    info["trainable_params"] = sum(p.numel() for p in task.parameters() if p.requires_grad)
    return BuiltTask(
        task=task,
        student=student,
        dataset=dataset,
        sampler=sampler,
        info=info,
        text_cache_meta=text_teacher.cache.meta if text_teacher is not None else None,
    )
