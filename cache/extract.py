"""Stage 1 driver: run a frozen teacher over a dataset once and write the HDF5 feature cache.

One writer per rank (rank, world, device and mixed precision from accelerate's state, so ``accelerate
launch``, ``torchrun`` and a plain process all work),
each over a contiguous slice of the dataset into its own shard; the last rank to finish (or rank 0
after a barrier when a process group exists) writes ``index.h5``. Rerunning the same command resumes.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import importlib
import json
import logging
import os
import select
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from tipsdistill import teachers  # noqa: F401  (importing the package registers every teacher adapter)
from tipsdistill.teachers.base import Teacher, build_teacher, list_teachers

from . import synthetic  # noqa: F401  (registers the "synthetic" dataset)
from .dataset_spec import build_from_spec, is_shorthand, recorded_spec, registry_name, remember_spec
from .datasets import (
    GRANULARITIES,
    RESIZE_MODES,
    BadImageError,
    _as_size,
    build_dataset,
    resize_image,
    write_problems,
)
from .format import (
    FORMAT_VERSION,
    H5_ERRORS,
    INDEX_NAME,
    Layout,
    build_index,
    cache_identity,
    check_resume,
    chunk_map_path,
    create_shard,
    git_revision,
    identity_differences,
    keys_digest,
    layout_from_meta,
    read_chunk_map,
    read_meta,
    read_skipped,
    shard_complete,
    shard_name,
    shard_range,
    toolkit_version,
    weights_digest,
)
from .locations import redact
from .lock import CacheBusyError, ShardLock, busy_message, is_hdf5_lock_error, live_writer
from .reduce import BASIS_FILE, PCAFitter, Reduction, explained
from .repair import ShardReport, check_hdf5, data_end, repair_shard, verify_shard
from .resources import apply_threads, fit_threads
from .views import ViewSpec, apply_view, sample_views
from .writer import (
    CacheWriteError,
    ShardWriter,
    WriteBatch,
    is_disk_full,
    nonfinite_rows,
    quantise_int8_torch,
    sample_stats,
)

logger = logging.getLogger(__name__)

STORAGE_DTYPES = ("float16", "int8")
# "fork" would hand the writer's open HDF5 file and its lock to the workers: a killed run's
# leftover workers would then keep the shard locked (docs/cache.md "What happens when it crashes")
WORKER_STARTS = ("forkserver", "spawn", "fork")
AUTOCASTS = ("auto", "none", "bf16", "fp16")
IMAGE_SOURCES = ("folder", "webdataset", "table", "hf")  # datasets that decode + resize to the cache's rule


@dataclass
class CacheConfig:
    """Everything stage 1 needs; written next to the cache (``cache_config.json``)."""

    out: str = "cache"
    teacher: str = "timm"  # registry name (teachers.list_teachers()) or "package.module:factory"
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)
    dataset: str = "folder"  # registry name (cache.datasets.list_datasets()) or "package.module:factory"
    dataset_kwargs: dict[str, Any] = field(default_factory=dict)
    image_size: int | list[int] = 224
    resize: str = "short_crop"  # short_crop | exact | none
    storage: str = "float16"  # float16 | int8 (per-token scale)
    # reduced-dimension storage (cache/reduce.py): patch tokens as reduce_dim PCA coefficients (0: full dim),
    # the basis fitted on the first reduce_fit_images images (at most reduce_fit_tokens tokens, seeded)
    reduce_dim: int = 0
    reduce_fit_images: int = 1024
    reduce_fit_tokens: int = 262144
    reduce_seed: int = 0
    reduce_wait_s: float = 3600.0  # ranks > 0: how long to wait for rank 0's basis file
    value_trick: bool = False
    value_readout: str = "tips"
    layer: int | None = None
    views: int = 1
    view_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])
    view_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    flip_prob: float = 0.5
    first_view_full: bool = True
    view_seed: int = 0
    granularities: list[str] | None = None  # None: alt/short/detailed when the teacher has text; []: none
    batch_size: int = 32
    num_workers: int = -1  # DataLoader workers decoding images; -1: fitted to the cores (cache/resources.py)
    num_threads: int = 0  # torch intra-op threads; 0: fitted to the free cores (or OMP_NUM_THREADS)
    queue_size: int = 4
    flush_interval_s: float = 2.0
    device: str | None = None  # default accelerate's device for this process (cuda:LOCAL_RANK, else cpu)
    autocast: str = "auto"  # auto (accelerate's mixed precision) | none | bf16 | fp16 (CUDA only)
    min_side: int | None = None  # images with a shorter side are skipped; default one patch
    # images with more pixels are skipped before they are decoded (too_large); None: Pillow's
    # Image.MAX_IMAGE_PIXELS (cache.datasets.pixel_cap), 0: no cap
    max_pixels: int | None = None
    space_margin: float = 1.05  # refuse when estimate * margin exceeds the free disk space
    progress: bool = True
    # faults (docs/cache.md "What happens when it crashes")
    worker_start: str = "forkserver"  # DataLoader workers: forkserver | spawn never inherit the shard / lock
    fsync: bool = True  # fsync features before their done flags (survives a machine crash, not only a kill)
    lock_wait_s: float = 30.0  # a dead run's leftover processes holding the shard lock: wait this long
    repair: bool = (
        False  # check every done sample's checksum first; repair a damaged shard, keeping intact samples
    )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CacheConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown cache config key(s) {unknown}; known keys: {sorted(names)}")
        return cls(**d)

    def validate(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if self.storage not in STORAGE_DTYPES:
            raise ValueError(f"storage must be one of {STORAGE_DTYPES}, got {self.storage!r}")
        if self.views < 1:
            raise ValueError(f"views must be >= 1, got {self.views}")
        if self.num_workers < -1 or self.num_threads < 0:
            raise ValueError(
                f"num_workers must be >= -1 (-1: auto) and num_threads >= 0 (0: auto), got {self.num_workers}, {self.num_threads}"
            )
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.reduce_dim < 0:
            raise ValueError(f"reduce_dim must be >= 0 (0: full dimension), got {self.reduce_dim}")
        if self.reduce_dim and (self.reduce_fit_images < 1 or self.reduce_fit_tokens < 2):
            raise ValueError(
                f"reduce_fit_images ({self.reduce_fit_images}) must be >= 1 and reduce_fit_tokens "
                f"({self.reduce_fit_tokens}) >= 2 to fit a PCA basis"
            )
        if self.autocast not in AUTOCASTS:
            raise ValueError(f"autocast must be one of {AUTOCASTS}, got {self.autocast!r}")
        if self.worker_start not in WORKER_STARTS:
            raise ValueError(f"worker_start must be one of {WORKER_STARTS}, got {self.worker_start!r}")


def load_object(spec: str) -> Callable[..., Any]:
    """``"package.module:attr"`` -> the attribute (a factory)."""
    mod, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(mod)
    except ImportError as e:
        raise ValueError(f"cannot import module {mod!r} of {spec!r}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {mod!r} has no attribute {attr!r} (from {spec!r})")
        obj = getattr(obj, part)
    return obj


class UntrustedCodeError(ValueError):
    """A teacher spec names Python code (``package.module:factory``) where only registry names are trusted."""


def make_teacher(spec: str, kwargs: dict[str, Any], *, trust_code: bool = False, where: str = "") -> Teacher:
    """Build a teacher from a registry name (``teachers.list_teachers()``) or, only with ``trust_code``,
    from ``"package.module:factory"``.

    Importing a module and calling a factory runs code, so a spec that comes from a file someone else
    made (a cache's ``teacher_spec`` attribute) is rebuilt from registry names only unless the user
    opts in, as transformers asks for ``trust_remote_code``; ``where`` names that file and the opt-in
    in the error. A spec the user typed (stage 1's ``--teacher``) passes ``trust_code=True``.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"teacher spec {spec!r}{' in ' + where if where else ''} is not a name")
    if not isinstance(kwargs, dict):
        raise ValueError(
            f"teacher kwargs {kwargs!r}{' in ' + where if where else ''} are not a mapping of keyword arguments"
        )
    if ":" in spec:
        if not trust_code:
            raise UntrustedCodeError(
                f"teacher {spec!r}{' recorded in ' + where if where else ''} is a Python import path: rebuilding "
                "it would import that module and call it, running code named by a file. Only registry teachers "
                f"({', '.join(list_teachers())}) are rebuilt from such files. If you trust the file and the module, "
                "opt in explicitly (eval.trust_remote_code=true for stage 2, like transformers' trust_remote_code), "
                "or name a text model yourself (eval.text_model=SPEC / eval.text_embeddings=FILE)"
            )
        teacher = load_object(spec)(**kwargs)
        if not isinstance(teacher, Teacher):
            raise ValueError(f"{spec} returned {type(teacher).__name__}, not a teachers.Teacher")
        return teacher.freeze()
    return build_teacher(spec, **kwargs)


def make_dataset(spec: str, kwargs: dict[str, Any]) -> Dataset:
    if is_shorthand(spec):  # wds:..., parquet:..., hf:..., name:{json}
        return build_from_spec(spec, **kwargs)
    if ":" in spec:
        return load_object(spec)(**kwargs)
    return build_dataset(spec, **kwargs)


# a process group exists under a launcher, but no collective waits for another rank's work: rank 0
# waits for the other shards through their files (a resumed run can leave one rank with hours of work
# after the others finished), so a collective that hangs on a dead rank fails within this time
PROCESS_GROUP_TIMEOUT_S = 30 * 60
# rank 0 waiting for the other shards before the index: a shard incomplete with no process holding its
# lock for this long means its rank is dead; rank 0 stops and says so (the rerun resumes it)
INDEX_DEAD_WRITER_S = 120.0
INDEX_POLL_S = 1.0
MIXED_PRECISION_AUTOCAST = {"no": "none", "bf16": "bf16", "fp16": "fp16"}


@dataclass(frozen=True)
class LaunchState:
    """This process's place in the job, from accelerate's state (``accelerate.Accelerator``)."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    mixed_precision: str  # accelerate's: "no" | "bf16" | "fp16" (``accelerate launch --mixed_precision``)


def launch_state() -> LaunchState:
    """Rank, world size, local rank, device and mixed precision from accelerate's state.

    Works under ``accelerate launch`` (any config in ``configs/accelerate/``), ``torchrun`` and with no
    launcher (one process); under a launcher accelerate creates the process group (gloo on CPU, nccl
    on CUDA). The state is a per-process singleton: a second call returns the same values. Without a
    launcher, ``RANK``/``WORLD_SIZE`` set and no ``MASTER_ADDR`` mean independent jobs, one per shard
    (no process group; the last to finish writes the index)."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, parse_choice_from_env

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and "MASTER_ADDR" not in os.environ:
        # no launcher, no rendezvous: independent jobs, one per shard (e.g. a SLURM array with RANK and
        # WORLD_SIZE set per job); each writes its shard and the last to finish writes the index
        rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        if not 0 <= rank < world:
            raise ValueError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
        logger.info("RANK=%d of WORLD_SIZE=%d without MASTER_ADDR: writing this shard alone", rank, world)
        return LaunchState(
            rank=rank,
            world=world,
            local_rank=local,
            device=torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu"),
            mixed_precision=parse_choice_from_env("ACCELERATE_MIXED_PRECISION", "no"),
        )
    if world > 1 and os.environ.get("MASTER_PORT") == "0":
        raise ValueError(
            "MASTER_PORT=0 (torchrun --master_port 0): the processes cannot meet on a port chosen by each; "
            "pass a free port, e.g. --master_port 29500 (accelerate launch --main_process_port 29500)"
        )
    acc = Accelerator(
        cpu=not torch.cuda.is_available(),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=PROCESS_GROUP_TIMEOUT_S))],
    )
    mp = str(acc.mixed_precision)
    if mp not in MIXED_PRECISION_AUTOCAST:
        raise ValueError(
            f"accelerate's mixed precision is {mp!r}; stage 1 runs the teacher in one of "
            f"{sorted(MIXED_PRECISION_AUTOCAST)} (accelerate launch --mixed_precision no|bf16|fp16)"
        )
    return LaunchState(
        rank=acc.process_index,
        world=acc.num_processes,
        local_rank=acc.local_process_index,
        device=acc.device,
        mixed_precision=mp,
    )


def _dataset_identity(ds: Dataset, spec: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    if hasattr(ds, "identity"):
        return json.loads(json.dumps(ds.identity(), default=str))
    return {"spec": spec, "kwargs": json.loads(json.dumps(kwargs, default=str)), "len": len(ds)}


def _dataset_keys(ds: Dataset) -> list[str]:
    if hasattr(ds, "keys"):
        keys = [str(k) for k in ds.keys()]
        if len(keys) != len(ds):
            raise ValueError(f"dataset keys() returned {len(keys)} keys for {len(ds)} items")
        return keys
    return [str(i) for i in range(len(ds))]


class _Items(Dataset):
    """Runs in the DataLoader workers: decode, resize to the cache's rule, cut the views."""

    def __init__(
        self, ds: Dataset, size: tuple[int, int], resize: str, spec: ViewSpec, min_side: int
    ) -> None:
        self.ds, self.size, self.resize, self.spec, self.min_side = ds, size, resize, spec, min_side

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            item = self.ds[index]
            image = item["image"]
            if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
                raise BadImageError(
                    f"dataset item image is not a (3, H, W) tensor: {getattr(image, 'shape', image)}",
                    "corrupt",
                )
            if min(image.shape[-2:]) < self.min_side:
                raise BadImageError(
                    f"image is {image.shape[-1]}x{image.shape[-2]} px, smaller than one patch ({self.min_side} px)",
                    "too_small",
                )
            base = resize_image(image.float(), self.size, self.resize)
        except BadImageError as e:
            return {"index": index, "error": str(e), "kind": e.kind}
        except Exception as e:  # noqa: BLE001 - whatever one sample raises is that sample's problem, not the run's
            logger.warning("sample %d: %s: %s", index, type(e).__name__, e)
            return {"index": index, "error": f"{type(e).__name__}: {e}", "kind": "error"}
        boxes, flips = sample_views(self.spec, index, *self.size)
        if self.spec.num_views == 1 and not flips[0] and tuple(boxes[0]) == (0.0, 0.0, 1.0, 1.0):
            views = base[None]
        else:
            views = torch.stack([apply_view(base, b, bool(f), self.size) for b, f in zip(boxes, flips)])
        caps = item.get("captions") or {}
        return {
            "index": index,
            "views": views,
            "boxes": boxes,
            "flips": flips,
            "captions": caps,
            "error": None,
        }


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    good = [it for it in items if it["error"] is None]
    bad = [(it["index"], it["error"], it["kind"]) for it in items if it["error"] is not None]
    out: dict[str, Any] = {"bad": bad, "index": [it["index"] for it in good]}
    if good:
        out["views"] = torch.stack([it["views"] for it in good])
        out["boxes"] = np.stack([it["boxes"] for it in good])
        out["flips"] = np.stack([it["flips"] for it in good])
        out["captions"] = [it["captions"] for it in good]
    return out


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@dataclass
class ShardJob:
    """What one rank writes: the resolved config, the teacher and dataset, and its shard's layout.

    Rows of the shard are the dataset items ``[start, start + count)``; ``attrs`` are the shard's
    file attributes (also what a resume must match)."""

    config: CacheConfig
    teacher: Teacher
    dataset: Dataset
    device: torch.device
    out_dir: Path
    shard_path: Path
    rank: int
    world: int
    keys: list[str]
    start: int
    count: int
    size: tuple[int, int]
    min_side: int
    spec: ViewSpec
    granularities: list[str]
    layout: Layout
    attrs: dict[str, Any]
    reduction: Reduction | None = None  # the PCA basis of a reduced-dimension cache (cache.reduce)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def num_samples(self) -> int:
        return len(self.keys)

    @property
    def index_path(self) -> Path:
        return self.out_dir / INDEX_NAME

    def reduction_names(self) -> list[str]:
        """The token features stored as PCA coefficients (``patch``, and ``value_patch`` when stored)."""
        return ["patch"] + (["value_patch"] if self.config.value_trick else [])

    def shard_paths(self) -> list[Path]:
        return [self.out_dir / shard_name(r, self.world) for r in range(self.world)]


def extract_features(
    config: CacheConfig | dict[str, Any] | None = None,
    *,
    teacher: Teacher | str | None = None,
    dataset: Dataset | str | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Write (or resume, or confirm) the feature cache described by ``config``.

    ``teacher``/``dataset`` objects may be passed instead of building them from the config's specs
    (strings are config overrides, like every other keyword).
    Returns a summary dict: ``out``, ``rank``, ``world``, ``shard``, ``rows``, ``done``, ``skipped``
    (list of (index, key, reason)), ``complete`` (this shard), ``index`` (path or None),
    ``already_complete``, ``seconds``, ``forward_seconds``, ``bytes_written``.
    """
    t_start = time.perf_counter()
    config, teacher, dataset = _resolve_config(config, teacher, dataset, overrides)
    job = _plan_job(config, teacher, dataset)
    with ShardLock(job.shard_path, wait_s=config.lock_wait_s):
        summary = _run_job(job)
    summary["seconds"] = time.perf_counter() - t_start
    return summary


def _run_job(job: ShardJob) -> dict[str, Any]:
    """Resume, repair, extract and index one rank's shard (holding its lock)."""
    summary = _new_summary(job)
    _note_missing_shards(job)
    if job.shard_path.exists():
        _check_existing_shard(job)
    if _cache_already_complete(job):
        if job.is_main:
            msg = _complete_message(job)
            logger.info(msg)
            print(msg, flush=True)
        summary.update(already_complete=True, complete=True, index=str(job.index_path), done=job.count)
        return summary
    _check_disk_space(job)  # before the PCA basis: a refused run leaves no basis behind
    if job.layout.reduce_dim:
        job.reduction = _resolve_reduction(job)
    if not job.shard_path.exists():
        _create_shard_file(job)
    if shard_complete(job.shard_path):
        logger.info("shard %s is already complete; nothing to extract", job.shard_path.name)
        with h5py.File(job.shard_path, "r") as f:
            summary.update(done=job.count, complete=True, skipped=read_skipped(f))
    else:
        summary.update(_extract_shard(job))
    summary["index"] = _write_index(job)
    if summary["index"]:
        m = read_meta(job.index_path)
        msg = (
            f"cache complete: {summary['index']}: {m.get('num_done')} cached, {m.get('num_skipped')} skipped "
            f"(of {job.num_samples} samples)"
        )
        (logger.warning if not m.get("num_done") else logger.info)(msg)
        print(msg, flush=True)
    return summary


def _resolve_config(
    config: CacheConfig | dict[str, Any] | None,
    teacher: Teacher | str | None,
    dataset: Dataset | str | None,
    overrides: dict[str, Any],
) -> tuple[CacheConfig, Teacher | None, Dataset | None]:
    """The validated config (string ``teacher``/``dataset`` become config overrides) and the objects."""
    overrides = dict(overrides)
    if isinstance(teacher, str):
        overrides["teacher"], teacher = teacher, None
    if isinstance(dataset, str):
        overrides["dataset"], dataset = dataset, None
    if config is None:
        config = CacheConfig()
    elif isinstance(config, dict):
        config = CacheConfig.from_dict(config)
    if overrides:
        config = dataclasses.replace(config, **overrides)
    config.validate()
    return config, teacher, dataset


def _plan_job(config: CacheConfig, teacher: Teacher | None, dataset: Dataset | None) -> ShardJob:
    """Build the teacher and dataset, probe the teacher's shapes, and describe this rank's shard."""
    state = launch_state()
    rank, world = state.rank, state.world
    if config.autocast == "auto":  # accelerate launch --mixed_precision (or its config file) decides
        config = dataclasses.replace(config, autocast=MIXED_PRECISION_AUTOCAST[state.mixed_precision])
    out_dir = Path(config.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = _as_size(config.image_size)
    assert size is not None
    device = torch.device(config.device) if config.device else state.device
    threads = fit_threads(workers=config.num_workers, threads=config.num_threads, cuda=device.type == "cuda")
    apply_threads(threads)
    config = dataclasses.replace(config, num_workers=threads.workers)
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
    min_side = config.min_side if config.min_side is not None else patch
    if dataset is None:
        dataset = _build_dataset(config, size, min_side)
    if rank == 0:  # every problem the dataset found while indexing (truncated shards, bad captions, ...)
        write_problems(out_dir, dataset)
    keys = _dataset_keys(dataset)
    start, count = shard_range(len(keys), rank, world)
    grid, dim, C = _probe_image(teacher, config, size, device)
    grans, text_dim = _probe_text(teacher, config)
    spec = ViewSpec(
        num_views=config.views,
        scale=tuple(config.view_scale),
        ratio=tuple(config.view_ratio),
        flip_prob=config.flip_prob,
        first_view_full=config.first_view_full,
        seed=config.view_seed,
    )
    layout = Layout(
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
    if config.reduce_dim >= dim:
        raise ValueError(
            f"reduce_dim {config.reduce_dim} is not below the teacher's feature dim {dim}: nothing to reduce; "
            f"use e.g. --reduce-dim {max(dim // 4, 1)} (or 0 for full dimension)"
        )
    attrs = _shard_attrs(
        config=config,
        teacher=teacher,
        teacher_spec=teacher_spec,
        dataset=dataset,
        keys=keys,
        layout=layout,
        spec=spec,
        size=size,
        patch=patch,
        min_side=min_side,
        rank=rank,
        world=world,
        start=start,
    )
    return ShardJob(
        config=config,
        teacher=teacher,
        dataset=dataset,
        device=device,
        out_dir=out_dir,
        shard_path=out_dir / shard_name(rank, world),
        rank=rank,
        world=world,
        keys=keys,
        start=start,
        count=count,
        size=size,
        min_side=min_side,
        spec=spec,
        granularities=grans,
        layout=layout,
        attrs=attrs,
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


def _shard_attrs(
    *,
    config: CacheConfig,
    teacher: Teacher,
    teacher_spec: dict[str, Any] | None,
    dataset: Dataset,
    keys: list[str],
    layout: Layout,
    spec: ViewSpec,
    size: tuple[int, int],
    patch: int,
    min_side: int,
    rank: int,
    world: int,
    start: int,
) -> dict[str, Any]:
    """The shard file's attributes (docs/cache.md lists them)."""
    return {
        "format_version": FORMAT_VERSION,
        "toolkit_version": toolkit_version(),
        "git_revision": git_revision(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "teacher": json.loads(json.dumps(teacher.identity(), default=str)),
        "teacher_spec": teacher_spec,
        "teacher_weights": weights_digest(teacher),
        "image_size": list(size),
        "resize": config.resize,
        "min_side": int(min_side),
        "autocast": "off" if config.autocast == "none" else config.autocast,  # ("none" reads back as None)
        "patch_size": patch,
        "grid": list(layout.grid),
        "dim": layout.dim,
        "num_global_tokens": layout.num_global_tokens,
        "num_views": config.views,
        "views": dataclasses.asdict(spec) if config.views > 1 else None,
        "value_trick": bool(config.value_trick),
        "value_readout": config.value_readout if config.value_trick else None,
        "layer": -1 if config.layer is None else int(config.layer),
        "storage_dtype": config.storage,
        "quantisation": "int8_per_token_absmax" if config.storage == "int8" else "none",
        "reduce_dim": int(config.reduce_dim),
        "reduce": _reduce_settings(config),
        "granularities": layout.granularities,
        "text_dim": layout.text_dim,
        "dataset": _dataset_identity(dataset, config.dataset, config.dataset_kwargs),
        "dataset_spec": recorded_spec(dataset),
        "num_samples": len(keys),
        "keys_sha1": keys_digest(keys),
        "shard_rank": rank,
        "shard_world": world,
        "shard_start": start,
        "shard_count": layout.count,
        "config": redact(json.loads(json.dumps(dataclasses.asdict(config), default=str))),  # no URL secrets
        "caption_problems": list(getattr(dataset, "caption_problems", []) or [])[:100],
    }


def _reduce_settings(config: CacheConfig) -> dict[str, Any] | None:
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


def _resolve_reduction(job: ShardJob) -> Reduction:
    """The cache's PCA basis: this shard's copy when it exists (a resume never refits), else
    ``OUT/reduce_basis.npz``, else (rank 0) fitted now and saved there; other ranks wait for that file."""
    if job.reduction is not None:
        return job.reduction
    red: Reduction | None = None
    if job.shard_path.exists():
        try:
            with h5py.File(job.shard_path, "r") as f:
                red = Reduction.read_h5(f, read_meta(job.shard_path))
        except H5_ERRORS as e:  # damaged metadata: the cache-level file below still has it
            logger.warning(
                "cannot read the PCA basis of %s (%s); using %s", job.shard_path.name, e, BASIS_FILE
            )
    path = job.out_dir / BASIS_FILE
    want = cache_identity(job.attrs)
    if red is None and path.exists():
        red = Reduction.load(path)
        diff = _basis_differences(red, want)
        if diff:  # left by another (refused, or other-teacher) run into this folder: never reused
            logger.warning(
                "%s was fitted for another cache (%s differ); fitting this run's basis", path, ", ".join(diff)
            )
            red = None
    if red is None:
        if job.rank == 0:
            red = _fit_reduction(job)
            red.fit["identity"] = want
            red.save(path)
        else:
            red = _wait_for_basis(job, path, want)
    if red.dim != job.layout.reduce_dim:
        raise ValueError(
            f"{path} holds a reduce_dim={red.dim} basis but this run asks for {job.layout.reduce_dim}: write to "
            "another output directory (--out) or rerun with the cache's --reduce-dim"
        )
    job.attrs["reduce_fit"] = red.fit
    return red


def _basis_differences(red: Reduction, want: dict[str, Any]) -> list[str]:
    """Why a basis file does not belong to this run (identity fields, or that it records none)."""
    have = red.fit.get("identity")
    if not isinstance(have, dict):
        return ["identity (none recorded)"]
    return identity_differences(have, want)


def _wait_for_basis(job: ShardJob, path: Path, want: dict[str, Any]) -> Reduction:
    """Ranks > 0: rank 0's basis for this run (a stale file of another run is waited past)."""
    t0 = time.monotonic()
    last = t0
    while True:
        if path.exists():
            try:
                red = Reduction.load(path)
                if not _basis_differences(red, want):
                    return red
            except ValueError:  # being replaced right now
                pass
        if time.monotonic() - t0 > job.config.reduce_wait_s:
            raise TimeoutError(
                f"rank {job.rank}: rank 0 has not written the PCA basis {path} after {job.config.reduce_wait_s:.0f} s; "
                "check rank 0's log, or raise reduce_wait_s"
            )
        if time.monotonic() - last > 30:
            logger.info("rank %d: waiting for rank 0's PCA basis %s", job.rank, path)
            last = time.monotonic()
        time.sleep(0.5)


def _fit_reduction(job: ShardJob) -> Reduction:
    """Fit the PCA basis on the teacher's patch tokens of the first ``reduce_fit_images`` images."""
    cfg = job.config
    n = min(cfg.reduce_fit_images, job.num_samples)
    idx = list(range(n))
    batches = [(b, idx[i : i + cfg.batch_size]) for b, i in enumerate(range(0, n, cfg.batch_size))]
    h, w = job.layout.grid
    tokens_per_image = h * w * job.layout.num_views
    keep = min(1.0, cfg.reduce_fit_tokens / max(n * tokens_per_image, 1))
    fitter = PCAFitter(keep, cfg.reduce_seed)
    used, bad = 0, 0
    t0 = time.perf_counter()
    for batch in _make_loader(job, batches):
        bad += len(batch["bad"])
        if not batch["index"]:
            continue
        feats = _teacher_forward(job, batch)
        # a non-finite sample must not bend the basis (it is skipped when written)
        finite = torch.stack(
            [torch.isfinite(feats[n].flatten(1)).all(1) for n in ("cls", *job.reduction_names())]
        ).all(0)
        bad += int((~finite).sum())
        if not bool(finite.any()):
            continue
        for name in job.reduction_names():
            fitter.add(name, feats[name][finite])
        used += int(finite.sum())
    if not used:
        raise ValueError(f"no usable image among the first {n} of the dataset to fit the PCA basis on")
    bases, facts = fitter.fit(cfg.reduce_dim)
    facts.update(images=used, skipped_images=bad, seed=cfg.reduce_seed, token_fraction=keep)
    red = Reduction(dim=cfg.reduce_dim, bases=bases, fit=facts)
    msg = (
        f"fitted the PCA basis (reduce_dim {cfg.reduce_dim} of {job.layout.dim}) on {used} images "
        f"({', '.join(f'{v} {k} tokens' for k, v in facts['tokens'].items())}) in {time.perf_counter() - t0:.1f}s; "
        f"variance kept: {explained(red)}"
    )
    logger.info(msg)
    print(msg, flush=True)
    return red


def _new_summary(job: ShardJob) -> dict[str, Any]:
    return {
        "out": str(job.out_dir),
        "rank": job.rank,
        "world": job.world,
        "shard": str(job.shard_path),
        "rows": job.count,
        "done": 0,
        "skipped": [],
        "complete": False,
        "index": None,
        "already_complete": False,
        "forward_seconds": 0.0,
        "bytes_written": 0,
    }


def _check_existing_shard(job: ShardJob) -> None:
    """Resume: the shard on disk must be readable and made with this run's settings; adopt its layout.

    A damaged shard (HDF5 cannot open it, truncated, or with ``repair`` any done sample whose bytes
    fail their checksum) is repaired first, keeping every intact write block (:mod:`cache.repair`).
    Another process holding the file open (HDF5 errno 11) is reported as that, never as damage."""
    path = job.shard_path
    stored: dict[str, Any] | None = None
    try:
        stored = read_meta(path)
    except H5_ERRORS as e:
        if is_hdf5_lock_error(e):
            raise CacheBusyError(busy_message(path, e)) from e
    if stored is not None:
        check_resume(path, stored, job.attrs)
    report = verify_shard(path) if job.config.repair or stored is None else _quick_check(path)
    if report is not None and not report.ok:
        if stored is None and report.kept_rows == 0 and not chunk_map_path(path).exists():
            logger.warning(
                "%s cannot be read at all (%s): none of its %d samples can be recovered; it is kept aside "
                "and the shard redone",
                path.name,
                "; ".join(report.problems),
                job.count,
            )
        else:
            logger.warning("%s is damaged: %s", path.name, report.line())
        layout = dataclasses.replace(job.layout, block_size=report.block_size or job.layout.block_size)
        red = _resolve_reduction(job) if layout.reduce_dim else None
        repair_shard(
            path,
            layout,
            job.attrs,
            job.keys[job.start : job.start + job.count],
            report,
            reduction=red,
            metadata_checked=stored is not None,
        )
        stored = read_meta(path)
    elif job.config.repair:
        msg = f"verified {report.line()}"
        logger.info(msg)
        print(msg, flush=True)
    assert stored is not None
    job.layout = layout_from_meta(stored, job.count)
    if stored.get("block_size") != job.config.batch_size:
        logger.info(
            "resuming with the cache's write block size %s (batch_size %s ignored)",
            stored.get("block_size"),
            job.config.batch_size,
        )


def _quick_check(path: Path) -> ShardReport | None:
    """The checks of every resume, reading no samples: HDF5 opens every object (checksummed
    metadata) and the file reaches the end of its allocated chunks. On a finding: the full report."""
    report = ShardReport(path=path)
    check_hdf5(path, report)
    try:
        truncated = path.stat().st_size < data_end(read_chunk_map(path))
    except (OSError, ValueError, KeyError):
        truncated = False  # no chunk map: verify_shard says so
    return verify_shard(path) if report.problems or truncated else None


def _note_missing_shards(job: ShardJob) -> None:
    """An index that lists this rank's shard while the file is gone: say what is redone."""
    if job.index_path.exists() and not job.shard_path.exists():
        msg = (
            f"{INDEX_NAME} lists {job.shard_path.name}, which is missing: its {job.count} samples are redone "
            f"(samples {job.start}..{job.start + job.count - 1}); the index is rebuilt afterwards"
        )
        logger.warning(msg)
        print(msg, flush=True)


def _cache_already_complete(job: ShardJob) -> bool:
    """The index and every shard are complete (a rerun is then a no-op on every rank: each rank reads
    the same files, and no rank waits for another)."""
    if not (job.index_path.exists() and shard_complete(job.shard_path)):
        return False
    return bool(read_meta(job.index_path).get("complete")) and all(
        shard_complete(p) for p in job.shard_paths()
    )


def _complete_message(job: ShardJob) -> str:
    m = read_meta(job.index_path)
    return (
        f"cache {job.out_dir} is already complete: {m.get('num_done')} cached, {m.get('num_skipped')} skipped "
        f"(of {job.num_samples} samples); nothing to do"
    )


def _remaining_rows(job: ShardJob) -> int:
    if not job.shard_path.exists():
        return job.count
    with h5py.File(job.shard_path, "r") as f:
        return int((~f["done"][()].astype(bool)).sum())


def _check_disk_space(job: ShardJob) -> None:
    """Print the size estimate; refuse when the rows still to write do not fit on the disk."""
    bps = job.layout.bytes_per_sample()
    remaining = _remaining_rows(job)
    world, margin = job.world, job.config.space_margin
    need = bps * remaining * world * margin  # all ranks share the disk; slices are balanced
    free = shutil.disk_usage(job.out_dir).free
    if job.is_main:
        msg = (
            f"cache estimate: {_fmt_bytes(bps)} per image x {job.num_samples} images = "
            f"{_fmt_bytes(bps * job.num_samples)} in total; {_fmt_bytes(bps * remaining * world)} still to "
            f"write; {_fmt_bytes(free)} free on {job.out_dir}"
        )
        logger.info(msg)
        print(msg, flush=True)
    if need > free:
        raise OSError(
            f"not enough disk space for the cache in {job.out_dir}: needs about {_fmt_bytes(need)} "
            f"({_fmt_bytes(bps)} per image x {remaining} images x {world} rank(s) x margin {margin}), "
            f"only {_fmt_bytes(free)} free. Free space, write elsewhere (--out), use --storage int8, or a smaller image size."
        )


def _create_shard_file(job: ShardJob) -> None:
    create_shard(
        job.shard_path,
        job.layout,
        job.attrs,
        job.keys[job.start : job.start + job.count],
        reduction=job.reduction,
    )
    if job.is_main:
        (job.out_dir / "cache_config.json").write_text(
            json.dumps(job.attrs["config"] | {"git_revision": job.attrs["git_revision"]}, indent=2)
        )


def _write_index(job: ShardJob) -> str | None:
    """The index. With a process group: rank 0, once every shard is complete (it waits through the files,
    watching each unfinished shard's writer: :func:`_wait_for_shards`); the other ranks return once
    their shard is complete (no collective: a rank that died or returned early never hangs the others).
    Without one (independent jobs, one per shard): the last rank to finish."""
    group = torch.distributed.is_available() and torch.distributed.is_initialized()
    if job.world == 1 or (group and job.is_main):
        if job.world > 1:
            _wait_for_shards(job)
        return str(build_index(job.out_dir, job.world))
    if not group and all(shard_complete(p) for p in job.shard_paths()):
        return str(build_index(job.out_dir, job.world))
    who = "rank 0" if group else "the last rank to finish"
    logger.info("shard %s complete; index.h5 is written by %s", job.shard_path.name, who)
    return None


def _wait_for_shards(job: ShardJob) -> None:
    """Rank 0: wait until every shard is complete. A shard that is incomplete while no process holds its
    lock (:func:`cache.lock.live_writer`) for :data:`INDEX_DEAD_WRITER_S` has lost its writer: stop,
    naming it (the same command resumes it and writes the index)."""
    orphaned: dict[Path, float] = {}
    last_note = time.monotonic()
    while True:
        todo = [p for p in job.shard_paths() if not shard_complete(p)]
        if not todo:
            return
        now = time.monotonic()
        for p in todo:
            if live_writer(p) is None:
                orphaned.setdefault(p, now)
            else:
                orphaned.pop(p, None)
        dead = [p for p in todo if p in orphaned and now - orphaned[p] > INDEX_DEAD_WRITER_S]
        if dead:
            raise RuntimeError(
                f"cannot write {job.index_path.name}: {', '.join(p.name for p in dead)} incomplete and no process "
                f"has written it for {INDEX_DEAD_WRITER_S:.0f} s (its rank stopped or died; see that rank's log). "
                "Rerun the same command: it resumes the unfinished shard(s) and writes the index"
            )
        if now - last_note > 60:
            logger.info(
                "rank 0: waiting for %d shard(s) before the index: %s",
                len(todo),
                ", ".join(p.name for p in todo),
            )
            last_note = now
        time.sleep(INDEX_POLL_S)


def _todo_blocks(job: ShardJob, done: np.ndarray) -> list[tuple[int, list[int]]]:
    """``[(block, dataset indices)]`` of the write blocks with at least one row not done."""
    B, start, count = job.layout.block_size, job.start, job.count
    blocks = [
        (b, list(range(start + b * B, start + min((b + 1) * B, count))))
        for b in range(job.layout.num_blocks)
        if b * B < count
    ]
    return [(b, idx) for b, idx in blocks if not done[b * B : b * B + len(idx)].all()]


def follow_main_process(main_pid: int, worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: end this worker as soon as the run's main process ends.

    torch's workers watch their parent, and under ``forkserver`` / ``spawn`` that parent is the fork
    server, not the run: after a ``kill -9`` of the main process alone (the OOM killer) they would
    wait on their queues forever, each holding its memory, and keep the fork server alive. A pidfd
    of the main process becomes readable when it exits; a daemon thread waits on it."""
    try:
        fd = os.pidfd_open(main_pid)
    except ProcessLookupError:
        os._exit(0)  # the run is already gone
    except (AttributeError, OSError):  # no pidfd (not Linux >= 5.3): torch's own watchdog only
        logger.debug("worker %d: no pidfd_open, cannot follow the main process %d", worker_id, main_pid)
        return

    def wait() -> None:
        select.select([fd], [], [])
        os._exit(0)

    threading.Thread(target=wait, name="follow-main-process", daemon=True).start()


def _make_loader(job: ShardJob, todo: list[tuple[int, list[int]]]) -> DataLoader:
    """Decode, resize and cut views in worker processes, one batch per write block."""
    cfg = job.config
    items = _Items(job.dataset, job.size, cfg.resize, job.spec, job.min_side)
    return DataLoader(
        items,
        batch_sampler=[idx for _, idx in todo],
        num_workers=cfg.num_workers,
        collate_fn=_collate,
        pin_memory=job.device.type == "cuda",
        prefetch_factor=4 if cfg.num_workers > 0 else None,
        multiprocessing_context=cfg.worker_start if cfg.num_workers > 0 else None,
        worker_init_fn=functools.partial(follow_main_process, os.getpid()),
    )


def _embed_captions(
    job: ShardJob, captions: list[dict[str, str]], g: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Granularity ``g`` of a batch's captions -> ``(emb (B, Dt), valid (B,))``; each distinct caption
    is encoded once (short captions repeat a lot); missing or blank captions get zeros, valid False."""
    device, nb = job.device, len(captions)
    texts = [c.get(g) for c in captions]
    ok = [isinstance(t, str) and t.strip() != "" for t in texts]
    emb = torch.zeros(nb, job.layout.text_dim, device=device)
    if any(ok):
        kept = [t for t, o in zip(texts, ok) if o]
        uniq = list(dict.fromkeys(kept))
        enc = job.teacher.encode_text(uniq).float()
        pos = {t: i for i, t in enumerate(uniq)}
        which = torch.tensor([pos[t] for t in kept], device=enc.device)
        emb[torch.tensor(ok, device=device)] = enc[which].to(device)
    return emb, torch.tensor(ok)


def _teacher_forward(job: ShardJob, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Teacher forward of one batch (on ``job.device``, inference mode): ``batch["views"] (B, V, 3, H, W)``
    -> ``patch (B, [V,] h*w, D)``, ``cls (B, [V,] C, D)``, optional ``value_patch``, as computed."""
    cfg, dim, C = job.config, job.layout.dim, job.layout.num_global_tokens
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.autocast)
    views = batch["views"].to(job.device, non_blocking=True)
    nb, V = views.shape[:2]
    arrays: dict[str, torch.Tensor] = {}
    with (
        torch.inference_mode(),
        torch.autocast(
            job.device.type,
            dtype=amp or torch.float32,
            enabled=amp is not None and job.device.type == "cuda",
        ),
    ):
        feats = job.teacher.encode_image(
            views.flatten(0, 1),
            value_trick=cfg.value_trick,
            value_readout=cfg.value_readout,
            layer=cfg.layer,
        )
        vshape = (nb, V) if cfg.views > 1 else (nb,)
        arrays["patch"] = feats.patch.reshape(*vshape, -1, dim)
        arrays["cls"] = feats.cls.reshape(*vshape, C, dim)
        if cfg.value_trick:
            arrays["value_patch"] = feats.value_patch.reshape(*vshape, -1, dim)
    return arrays


def _encode_batch(job: ShardJob, batch: dict[str, Any]) -> dict[str, np.ndarray]:
    """Teacher forward of one batch -> the arrays of a :class:`WriteBatch`, in the storage dtype.

    ``batch["views"] (B, V, 3, H, W)`` -> ``patch (B, [V,] h*w, D)`` (``(..., K)`` PCA coefficients
    with ``reduce_dim K``), ``cls (B, [V,] C, D)``, optional ``value_patch``, ``text/<g> (B, Dt)``,
    ``text_valid/<g> (B,)``, ``_stats (B, 2 + 2C, D)`` (of the full-dimension features)."""
    cfg = job.config
    arrays = _teacher_forward(job, batch)
    with torch.inference_mode():
        for g in job.granularities:
            arrays[f"text/{g}"], arrays[f"text_valid/{g}"] = _embed_captions(job, batch["captions"], g)
        arrays["_stats"] = sample_stats(arrays["patch"], arrays["cls"])
        if job.reduction is not None:  # PCA coefficients, on the device, before the storage dtype
            for k in job.reduction_names():
                arrays[k] = job.reduction.project(k, arrays[k])
        # encode to the storage dtype here, once per batch, vectorised (on the GPU when there is one:
        # halves / quarters the copy to the host); the writer thread then only writes
        for k in ("patch", "cls", "value_patch"):
            if k in arrays:
                if cfg.storage == "int8":
                    arrays[k], arrays[k + "_scale"] = quantise_int8_torch(arrays[k])
                else:
                    arrays[k] = arrays[k].half()
        for g in job.granularities:
            arrays[f"text/{g}"] = arrays[f"text/{g}"].half()
    out = {k: (v.float() if v.dtype == torch.bfloat16 else v).cpu().numpy() for k, v in arrays.items()}
    if cfg.views > 1:
        out["boxes"], out["flips"] = batch["boxes"], batch["flips"]
    return out


def _extract_shard(job: ShardJob) -> dict[str, Any]:
    """Run the teacher over the shard's remaining write blocks and finalise the shard."""
    cfg, start, count = job.config, job.start, job.count
    try:
        writer = ShardWriter(
            job.shard_path,
            job.layout,
            queue_size=cfg.queue_size,
            flush_interval_s=cfg.flush_interval_s,
            fsync=cfg.fsync,
        )
    except OSError as e:
        if is_hdf5_lock_error(e):
            raise CacheBusyError(busy_message(job.shard_path, e)) from e
        raise
    todo = _todo_blocks(job, writer.done)
    todo_n = sum(len(i) for _, i in todo)
    if todo_n < count and todo_n and job.is_main:
        logger.info(
            "resuming: %d of %d samples of %s already written", count - todo_n, count, job.shard_path.name
        )
    bar = tqdm(
        total=todo_n,
        unit="img",
        disable=not (cfg.progress and job.is_main),
        desc=f"cache {job.out_dir.name}",
        dynamic_ncols=True,
    )
    t_loop = time.perf_counter()
    try:
        _extract_blocks(job, writer, todo, bar)
    except CacheWriteError as e:
        if is_disk_full(e):
            raise _disk_full(job, e) from e
        raise
    loop_s = time.perf_counter() - t_loop  # includes draining the writer queue
    try:
        res = writer.finalize(job.keys[start : start + count], start)
    except OSError as e:
        if is_disk_full(e):
            raise _disk_full(job, e) from e
        raise
    _log_skipped(job.shard_path, res["skipped"], job.dataset, res.get("captions_missing", {}))
    if not res["complete"]:
        raise RuntimeError(
            f"{job.shard_path} is incomplete ({res['done']} of {count} done); rerun the same command to resume"
        )
    return dict(
        done=res["done"],
        skipped=res["skipped"],
        complete=res["complete"],
        forward_seconds=writer.forward_seconds,
        loop_seconds=loop_s,
        bytes_written=writer.bytes_written,
        writer_seconds=writer.write_seconds,
        submit_wait_seconds=writer.submit_wait_seconds,
        fsync_seconds=writer.fsync_seconds,
    )


def _extract_blocks(job: ShardJob, writer: ShardWriter, todo: list[tuple[int, list[int]]], bar: tqdm) -> None:
    """The loop: load a block, run the teacher, hand the arrays to the writer thread; always drains
    and closes the writer (re-raising its error)."""
    start = job.start
    t_loop = time.perf_counter()
    try:
        for (block, _), batch in zip(todo, _make_loader(job, todo)):
            rows = np.asarray(batch["index"], np.int64) - start
            skipped = [(i - start, f"{kind}: {err}") for i, err, kind in batch["bad"]]
            arrays: dict[str, np.ndarray] = {}
            if len(rows):
                t0 = time.perf_counter()
                arrays = _encode_batch(job, batch)
                writer.forward_seconds += time.perf_counter() - t0
                rows, arrays = _drop_nonfinite(rows, arrays, skipped, start)
            writer.submit(WriteBatch(block=block, rows=rows, arrays=arrays, skipped=skipped))
            bar.update(len(rows) + len(skipped))
            el = max(time.perf_counter() - t_loop, 1e-9)
            bar.set_postfix_str(f"{writer.bytes_written / el / 2**20:.1f} MB/s", refresh=False)
    finally:
        bar.close()
        writer.close()


def _drop_nonfinite(
    rows: np.ndarray, arrays: dict[str, np.ndarray], skipped: list[tuple[int, str]], start: int
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Leave out the samples whose stored values would not be finite (NaN/inf from the teacher, or beyond
    float16's range): each becomes a skipped row (``nonfinite``) naming the fields, never a stored one."""
    bad, which = nonfinite_rows(arrays)
    if not bad.any():
        return rows, arrays
    for pos in np.flatnonzero(bad).tolist():
        skipped.append(
            (
                int(rows[pos]),
                f"nonfinite: the teacher's {', '.join(which[pos])} hold NaN/inf (or exceed the storage dtype's "
                "range, float16: 65504); not stored",
            )
        )
        logger.warning("sample %d: non-finite %s; skipped", int(rows[pos]) + start, ", ".join(which[pos]))
    keep = ~bad
    return rows[keep], {k: (v[keep] if getattr(v, "ndim", 0) else v) for k, v in arrays.items()}


def _disk_full(job: ShardJob, e: BaseException) -> OSError:
    """The full-disk error: what is safe, how much space the rest needs, and that a rerun resumes."""
    remaining = _remaining_rows(job)
    bps = job.layout.bytes_per_sample()
    need = bps * remaining * job.config.space_margin
    free = shutil.disk_usage(job.out_dir).free
    return OSError(
        errno.ENOSPC,
        f"the disk of {job.out_dir} is full ({getattr(e, 'cause', e)}): {job.count - remaining} of {job.count} "
        f"samples of {job.shard_path.name} are written and safe; the other {remaining} need about "
        f"{_fmt_bytes(need)} ({_fmt_bytes(bps)} per image x {remaining} x margin {job.config.space_margin}), "
        f"{_fmt_bytes(free)} is free now. Free at least {_fmt_bytes(max(need - free, 0))} (or move the cache "
        "to a larger disk and point --out there), then rerun the same command: it resumes.",
    )


def _log_skipped(
    shard: Path, skipped: list[tuple[int, str, str]], dataset: Dataset, captions_missing: dict[str, int]
) -> None:
    kinds = Counter(r.split(":", 1)[0] for _, _, r in skipped)
    counts = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) or "none"
    problems = list(getattr(dataset, "caption_problems", []) or [])
    missing = ", ".join(f"{g} {n}" for g, n in captions_missing.items()) or "n/a"
    msg = (
        f"{shard.name}: skipped {len(skipped)} image(s) ({counts}); captions missing or empty (text_valid False): "
        f"{missing}; caption file problems: {len(problems)}"
    )
    if skipped:
        msg += "; e.g. " + "; ".join(f"[{i}] {k}: {r}" for i, k, r in skipped[:5])
    (logger.warning if skipped or problems else logger.info)(msg)
    print(msg, flush=True)
