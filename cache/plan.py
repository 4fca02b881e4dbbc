"""Stage 1, planning: what this rank writes, decided once and never changed.

:func:`plan_shard` builds the teacher and the dataset, finds this process's place in the job
(:func:`cache.launch.launch_state`), fits threads and workers to the machine, probes the teacher's
shapes and returns a frozen :class:`ShardPlan`: the resolved config, the shard's slice of the dataset
(``[start, start + count)``), its :class:`~cache.format.Layout` and its file attributes (what a
resume must match). What can change while the run goes on (the layout adopted from a shard on disk,
the PCA basis) is the small :class:`ShardState` beside it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import torch
from torch.utils.data import Dataset

from tipsdistill.teachers.base import Teacher

from .build import make_dataset, make_teacher
from .config import IMAGE_SOURCES, CacheConfig
from .dataset_spec import recorded_spec, registry_name, remember_spec
from .datasets import GRANULARITIES, _as_size, write_problems
from .format import (
    FORMAT_VERSION,
    INDEX_NAME,
    Layout,
    git_revision,
    keys_digest,
    shard_name,
    shard_range,
    toolkit_version,
    weights_digest,
)
from .launch import MIXED_PRECISION_AUTOCAST, LaunchState, check_shared_out, launch_state
from .locations import redact
from .reduce import Reduction
from .resources import apply_threads, fit_threads
from .views import ViewSpec

logger = logging.getLogger(__name__)


def _dataset_identity(ds: Dataset, spec: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    if hasattr(ds, "identity"):
        return json.loads(json.dumps(ds.identity(), default=str))
    return {"spec": spec, "kwargs": json.loads(json.dumps(kwargs, default=str)), "len": len(ds)}


class DatasetKeys(Sequence[str]):
    """The keys of a dataset that reads them from flat arrays (``dataset.keys_range(start, stop)``: a
    webdataset's shard index, :class:`cache.shards.WebDatasetShards`), made on demand: a rank holds the
    keys of its own shard while it creates and finalises it, never the whole dataset's as Python strings
    (about 100 bytes a key). Iteration (the keys' digest) reads :data:`CHUNK` keys at a time."""

    CHUNK = 65536

    def __init__(self, dataset: Any) -> None:
        self._ds, self._n = dataset, len(dataset)

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...
    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            start, stop, step = i.indices(self._n)
            if step == 1:
                return self._ds.keys_range(start, max(start, stop))
            return [self[j] for j in range(start, stop, step)]
        j = i + self._n if i < 0 else i
        if not 0 <= j < self._n:
            raise IndexError(f"key {i} of a dataset of {self._n}")
        return self._ds.keys_range(j, j + 1)[0]

    def __iter__(self) -> Iterator[str]:
        for a in range(0, self._n, self.CHUNK):
            yield from self._ds.keys_range(a, min(self._n, a + self.CHUNK))


def _dataset_keys(ds: Dataset) -> Sequence[str]:
    """The dataset's keys: read on demand for a dataset with flat key arrays (:class:`DatasetKeys`),
    else ``keys()`` (or ``"0"``, ``"1"``, ...) as a list."""
    if hasattr(ds, "keys_range"):
        return DatasetKeys(ds)
    if hasattr(ds, "keys"):
        keys = [str(k) for k in ds.keys()]
        if len(keys) != len(ds):
            raise ValueError(f"dataset keys() returned {len(keys)} keys for {len(ds)} items")
        return keys
    return [str(i) for i in range(len(ds))]


@dataclass(frozen=True)
class ShardPlan:
    """What one rank writes: the resolved config, the teacher and dataset, and its shard's layout.

    Rows of the shard are the dataset items ``[start, start + count)``; ``attrs`` are the shard's
    file attributes (also what a resume must match), never changed after planning."""

    config: CacheConfig
    teacher: Teacher
    dataset: Dataset
    device: torch.device
    out_dir: Path
    rank: int
    world: int
    keys: Sequence[str]  # a list, or read on demand from the dataset's index (:class:`DatasetKeys`)
    start: int
    count: int
    size: tuple[int, int]
    min_side: int
    spec: ViewSpec
    granularities: list[str]
    layout: Layout  # as planned; a resume adopts the shard's own (:class:`ShardState`)
    attrs: dict[str, Any]

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def num_samples(self) -> int:
        return len(self.keys)

    @property
    def shard_path(self) -> Path:
        return self.out_dir / shard_name(self.rank, self.world)

    @property
    def index_path(self) -> Path:
        return self.out_dir / INDEX_NAME

    @property
    def shard_keys(self) -> list[str]:
        """The keys of this shard's rows (a new list)."""
        return list(self.keys[self.start : self.start + self.count])

    def reduction_names(self) -> list[str]:
        """The token features stored as PCA coefficients (``patch``, and ``value_patch`` when stored)."""
        return ["patch"] + (["value_patch"] if self.config.value_trick else [])

    def shard_paths(self) -> list[Path]:
        return [self.out_dir / shard_name(r, self.world) for r in range(self.world)]

    def attrs_with(self, reduction: Reduction | None) -> dict[str, Any]:
        """The file attributes with the PCA basis's fit facts (``reduce_fit``) of a reduced cache."""
        return self.attrs if reduction is None else {**self.attrs, "reduce_fit": reduction.fit}


@dataclass(frozen=True)
class ShardState:
    """What the run learns after planning: the shard's layout (the planned one, or a resumed shard's own,
    e.g. its write block size) and the cache's PCA basis (``None`` at full dimension)."""

    layout: Layout
    reduction: Reduction | None = None


def plan_shard(config: CacheConfig, teacher: Teacher | None, dataset: Dataset | None) -> ShardPlan:
    """Build the teacher and dataset, probe the teacher's shapes, and describe this rank's shard."""
    state = launch_state()
    config, device = _resolve_runtime(config, state)
    out_dir = Path(config.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    # every rank must see the others' files in --out (rank 0's index and PCA basis): fail now, not later
    check_shared_out(out_dir, config.out, state.rank, state.world, config.shared_out_wait_s)
    size = _as_size(config.image_size)
    assert size is not None
    teacher, teacher_spec = _resolve_teacher(config, teacher, device, size)
    min_side = config.min_side if config.min_side is not None else int(teacher.patch_size)
    if dataset is None:
        dataset = _build_dataset(config, size, min_side)
    if state.rank == 0:  # every problem the dataset found while indexing (truncated shards, bad captions)
        write_problems(out_dir, dataset)
    keys = _dataset_keys(dataset)
    start, count = shard_range(len(keys), state.rank, state.world)
    spec = _view_spec(config)
    layout = _plan_layout(config, teacher, size, device, count)
    plan = ShardPlan(
        config=config,
        teacher=teacher,
        dataset=dataset,
        device=device,
        out_dir=out_dir,
        rank=state.rank,
        world=state.world,
        keys=keys,
        start=start,
        count=count,
        size=size,
        min_side=min_side,
        spec=spec,
        granularities=layout.granularities,
        layout=layout,
        attrs={},
    )
    return dataclasses.replace(plan, attrs=shard_attrs(plan, teacher_spec))


def resolve_autocast(requested: str, device_type: str, mixed_precision: str, bf16_supported: bool) -> str:
    """The teacher's autocast: ``none`` | ``bf16`` | ``fp16``. An explicit ``requested`` value wins;
    ``auto`` is accelerate's mixed precision when it says ``bf16``/``fp16`` (``accelerate launch
    --mixed_precision``, or its config file), else ``bf16`` on a CUDA device that supports it (Ampere
    and later), else ``none`` (float32: the CPU, or an older GPU where fp16 could overflow)."""
    if requested != "auto":
        return requested
    from_accelerate = MIXED_PRECISION_AUTOCAST[mixed_precision]
    if from_accelerate != "none":
        return from_accelerate
    return "bf16" if device_type == "cuda" and bf16_supported else "none"


def resolve_tf32(requested: bool | None, device_type: str, autocast: str) -> bool:
    """Whether the teacher's float32 matmuls and convolutions may use TF32 (CUDA only: always ``False``
    elsewhere). An explicit ``requested`` value wins; by default on, unless ``autocast`` is ``none``
    (the float32 path then stays IEEE float32 end to end)."""
    if device_type != "cuda":
        return False
    return requested if requested is not None else autocast != "none"


def apply_tf32(enabled: bool) -> None:
    """Set CUDA's float32 matmul and cuDNN convolution precision for this process: TF32 or IEEE float32
    (cuDNN convolutions default to TF32 in torch; off makes the float32 path exact). Through the API every
    torch version reads back (``set_float32_matmul_precision``, ``cudnn.allow_tf32``): setting torch 2.9's
    ``fp32_precision`` would make any later read of ``allow_tf32`` (other libraries) raise."""
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled


def _resolve_runtime(config: CacheConfig, state: LaunchState) -> tuple[CacheConfig, torch.device]:
    """The config with its automatic values resolved (autocast and TF32 for the device, workers fitted
    to the cores; threads and TF32 set) and the device."""
    device = torch.device(config.device) if config.device else state.device
    cuda = device.type == "cuda"
    autocast = resolve_autocast(
        config.autocast, device.type, state.mixed_precision, cuda and torch.cuda.is_bf16_supported()
    )
    tf32 = resolve_tf32(config.tf32, device.type, autocast)
    if cuda:
        apply_tf32(tf32)
    logger.info(
        "teacher precision on %s: autocast %s (asked: %s; accelerate's mixed precision: %s), TF32 %s",
        device,
        autocast,
        config.autocast,
        state.mixed_precision,
        "on" if tf32 else "off",
    )
    threads = fit_threads(workers=config.num_workers, threads=config.num_threads, cuda=cuda)
    apply_threads(threads)
    return dataclasses.replace(config, autocast=autocast, tf32=tf32, num_workers=threads.workers), device


def _resolve_teacher(
    config: CacheConfig, teacher: Teacher | None, device: torch.device, size: tuple[int, int]
) -> tuple[Teacher, dict[str, Any] | None]:
    """The teacher on ``device`` in eval mode and the spec it was built from (``None``: an object passed
    in); refuses an image size that is not a multiple of its patch size."""
    teacher_spec = None
    if teacher is None:
        teacher = make_teacher(config.teacher, dict(config.teacher_kwargs), trust_code=True)  # the user's own
        teacher_spec = {
            "teacher": config.teacher,
            "kwargs": json.loads(json.dumps(config.teacher_kwargs, default=str)),
        }
    teacher = teacher.to(device).eval()
    patch = int(teacher.patch_size)
    if size[0] % patch or size[1] % patch:
        raise ValueError(
            f"image_size {size} is not a multiple of the teacher's patch size {patch}; use e.g. {size[0] // patch * patch}"
        )
    return teacher, teacher_spec


def _view_spec(config: CacheConfig) -> ViewSpec:
    return ViewSpec(
        num_views=config.views,
        scale=tuple(config.view_scale),
        ratio=tuple(config.view_ratio),
        flip_prob=config.flip_prob,
        first_view_full=config.first_view_full,
        seed=config.view_seed,
    )


def _plan_layout(
    config: CacheConfig, teacher: Teacher, size: tuple[int, int], device: torch.device, count: int
) -> Layout:
    """The shard's layout from one probe forward of the teacher (and of its text tower)."""
    grid, dim, C = _probe_image(teacher, config, size, device)
    grans, text_dim = _probe_text(teacher, config)
    if config.reduce_dim >= dim:
        raise ValueError(
            f"reduce_dim {config.reduce_dim} is not below the teacher's feature dim {dim}: nothing to reduce; "
            f"use e.g. --reduce-dim {max(dim // 4, 1)} (or 0 for full dimension)"
        )
    return Layout(
        count=count,
        grid=grid,
        dim=dim,
        num_global_tokens=C,
        num_views=config.views,
        value_patch=bool(config.value_trick),
        storage_dtype=config.storage,
        text_dim=text_dim,
        granularities=grans,
        block_size=config.batch_size,
        reduce_dim=config.reduce_dim,
    )


def _build_dataset(config: CacheConfig, size: tuple[int, int], min_side: int) -> Dataset:
    kw = dict(config.dataset_kwargs)
    if registry_name(config.dataset) in IMAGE_SOURCES:  # decode + resize in the workers, skip < one patch
        kw.setdefault("min_side", min_side)
        kw.setdefault("image_size", list(size))
        kw.setdefault("resize", config.resize)
        if config.max_pixels is not None:
            kw.setdefault("max_pixels", int(config.max_pixels))
    if registry_name(config.dataset) == "webdataset":  # the shard index: built once, read by every later run
        kw.setdefault("index", str(Path(config.out).resolve() / "data_index"))
    return remember_spec(make_dataset(config.dataset, kw), config.dataset, config.dataset_kwargs)


def _probe_image(
    teacher: Teacher, config: CacheConfig, size: tuple[int, int], device: torch.device
) -> tuple[tuple[int, int], int, int]:
    """One forward of a black image: the patch grid ``(h, w)``, the feature dim and the global tokens."""
    with torch.inference_mode():
        probe = teacher.encode_image(
            torch.zeros(1, 3, *size, device=device),
            value_trick=config.value_trick,
            value_readout=config.value_readout,
            layer=config.layer,
        )
    return probe.grid, int(probe.patch.shape[-1]), int(probe.cls.shape[1])


def _probe_text(teacher: Teacher, config: CacheConfig) -> tuple[list[str], int]:
    """The caption granularities to embed and the text embedding dim (0 without a text tower)."""
    if not getattr(teacher, "has_text", False):
        if config.granularities:
            raise ValueError(
                f"granularities {config.granularities} asked for but teacher {type(teacher).__name__} has no text tower"
            )
        return [], 0
    grans = list(GRANULARITIES) if config.granularities is None else list(config.granularities)
    if not grans:
        return [], 0
    with torch.inference_mode():
        return grans, int(teacher.encode_text(["a photo"]).shape[-1])


def shard_attrs(plan: ShardPlan, teacher_spec: dict[str, Any] | None) -> dict[str, Any]:
    """The shard file's attributes (docs/cache.md lists them)."""
    config, teacher, dataset, layout, keys = plan.config, plan.teacher, plan.dataset, plan.layout, plan.keys
    return {
        "format_version": FORMAT_VERSION,
        "toolkit_version": toolkit_version(),
        "git_revision": git_revision(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "teacher": json.loads(json.dumps(teacher.identity(), default=str)),
        "teacher_spec": teacher_spec,
        "teacher_weights": weights_digest(teacher),
        "image_size": list(plan.size),
        "resize": config.resize,
        "min_side": int(plan.min_side),
        "autocast": "off" if config.autocast == "none" else config.autocast,  # ("none" reads back as None)
        "tf32": bool(config.tf32),  # recorded, not compared: below float16 storage's own rounding
        "patch_size": int(teacher.patch_size),
        "grid": list(layout.grid),
        "dim": layout.dim,
        "num_global_tokens": layout.num_global_tokens,
        "num_views": config.views,
        "views": dataclasses.asdict(plan.spec) if config.views > 1 else None,
        "value_trick": bool(config.value_trick),
        "value_readout": config.value_readout if config.value_trick else None,
        "layer": -1 if config.layer is None else int(config.layer),
        "storage_dtype": config.storage,
        "quantisation": "int8_per_token_absmax" if config.storage == "int8" else "none",
        "reduce_dim": int(config.reduce_dim),
        "reduce": reduce_settings(config),
        "granularities": layout.granularities,
        "text_dim": layout.text_dim,
        "dataset": _dataset_identity(dataset, config.dataset, config.dataset_kwargs),
        "dataset_spec": recorded_spec(dataset),
        "num_samples": len(keys),
        "keys_sha1": keys_digest(keys),
        "shard_rank": plan.rank,
        "shard_world": plan.world,
        "shard_start": plan.start,
        "shard_count": layout.count,
        "config": redact(json.loads(json.dumps(dataclasses.asdict(config), default=str))),  # no URL secrets
        "caption_problems": list(getattr(dataset, "caption_problems", []) or [])[:100],
    }


def reduce_settings(config: CacheConfig) -> dict[str, Any] | None:
    """What a resume of a reduced-dimension cache must match (``None`` at full dimension)."""
    if not config.reduce_dim:
        return None
    return {
        "dim": int(config.reduce_dim),
        "fit_images": int(config.reduce_fit_images),
        "fit_tokens": int(config.reduce_fit_tokens),
        "seed": int(config.reduce_seed),
        "features": [n for n in ("patch", "value_patch") if n == "patch" or config.value_trick],
    }
