"""Stage 1 driver: run a frozen teacher over a dataset once and write the HDF5 feature cache.

One writer per rank (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` from ``torchrun`` or ``accelerate``),
each over a contiguous slice of the dataset into its own shard; the last rank to finish (or rank 0
after a barrier when a process group exists) writes ``index.h5``. Rerunning the same command resumes.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import shutil
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

from teachers.base import Teacher, build_teacher

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
    INDEX_NAME,
    Layout,
    build_index,
    check_resume,
    create_shard,
    git_revision,
    keys_digest,
    layout_from_meta,
    read_meta,
    read_skipped,
    shard_complete,
    shard_name,
    shard_range,
    toolkit_version,
)
from .spec import build_from_spec, is_shorthand, recorded_spec, registry_name
from .views import ViewSpec, apply_view, sample_views
from .writer import ShardWriter, WriteBatch, quantise_int8_torch, sample_stats

logger = logging.getLogger(__name__)

STORAGE_DTYPES = ("float16", "int8")
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
    num_workers: int = 4
    queue_size: int = 4
    flush_interval_s: float = 2.0
    device: str | None = None  # default cuda:LOCAL_RANK when available, else cpu
    autocast: str = "none"  # none | bf16 | fp16 (CUDA only)
    min_side: int | None = None  # images with a shorter side are skipped; default one patch
    space_margin: float = 1.05  # refuse when estimate * margin exceeds the free disk space
    progress: bool = True

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
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


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


def _import_registries() -> None:
    """Import the modules that register teachers and datasets (missing optional ones are fine)."""
    for mod in ("teachers.timm_teacher", "teachers.hf_teacher", "teachers.tips_npz", "cache.synthetic"):
        try:
            importlib.import_module(mod)
        except ImportError as e:
            logger.debug("optional module %s not importable: %s", mod, e)


def make_teacher(spec: str, kwargs: dict[str, Any]) -> Teacher:
    if ":" in spec:
        teacher = load_object(spec)(**kwargs)
        if not isinstance(teacher, Teacher):
            raise ValueError(f"{spec} returned {type(teacher).__name__}, not a teachers.Teacher")
        return teacher.freeze()
    _import_registries()
    return build_teacher(spec, **kwargs)


def make_dataset(spec: str, kwargs: dict[str, Any]) -> Dataset:
    if is_shorthand(spec):  # wds:..., parquet:..., hf:..., name:{json}
        return build_from_spec(spec, **kwargs)
    if ":" in spec:
        return load_object(spec)(**kwargs)
    _import_registries()
    return build_dataset(spec, **kwargs)


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the launcher's environment (torchrun, accelerate)."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", rank))
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    return rank, world, local


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
    t_start = time.perf_counter()
    rank, world, local_rank = dist_env()
    is_main = rank == 0
    out_dir = Path(config.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    shard_path = out_dir / shard_name(rank, world)
    size = _as_size(config.image_size)
    assert size is not None

    index_path = out_dir / INDEX_NAME
    device = torch.device(config.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
    teacher_spec = None
    if teacher is None:
        teacher = make_teacher(config.teacher, dict(config.teacher_kwargs))
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
        kw = dict(config.dataset_kwargs)
        if registry_name(config.dataset) in IMAGE_SOURCES:  # decode + resize in the workers, skip < one patch
            kw.setdefault("min_side", min_side)
            kw.setdefault("image_size", list(size))
            kw.setdefault("resize", config.resize)
        dataset = make_dataset(config.dataset, kw)
    ds_identity = _dataset_identity(dataset, config.dataset, config.dataset_kwargs)
    if is_main:  # every problem the dataset found while indexing (truncated shards, bad captions, ...)
        write_problems(out_dir, dataset)
    keys = _dataset_keys(dataset)
    N = len(keys)
    start, count = shard_range(N, rank, world)

    # probe the teacher once for shapes
    with torch.inference_mode():
        probe = teacher.encode_image(
            torch.zeros(1, 3, *size, device=device),
            value_trick=config.value_trick,
            value_readout=config.value_readout,
            layer=config.layer,
        )
    grid, dim, C = probe.grid, int(probe.patch.shape[-1]), int(probe.cls.shape[1])
    grans: list[str] = []
    text_dim = 0
    if getattr(teacher, "has_text", False):
        grans = list(GRANULARITIES) if config.granularities is None else list(config.granularities)
        if grans:
            with torch.inference_mode():
                text_dim = int(teacher.encode_text(["a photo"]).shape[-1])
    elif config.granularities:
        raise ValueError(
            f"granularities {config.granularities} asked for but teacher {type(teacher).__name__} has no text tower"
        )

    spec = ViewSpec(
        num_views=config.views,
        scale=tuple(config.view_scale),
        ratio=tuple(config.view_ratio),
        flip_prob=config.flip_prob,
        first_view_full=config.first_view_full,
        seed=config.view_seed,
    )
    attrs: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "toolkit_version": toolkit_version(),
        "git_revision": git_revision(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "teacher": json.loads(json.dumps(teacher.identity(), default=str)),
        "teacher_spec": teacher_spec,
        "image_size": list(size),
        "resize": config.resize,
        "patch_size": patch,
        "grid": list(grid),
        "dim": dim,
        "num_global_tokens": C,
        "num_views": config.views,
        "views": dataclasses.asdict(spec) if config.views > 1 else None,
        "value_trick": bool(config.value_trick),
        "value_readout": config.value_readout if config.value_trick else None,
        "layer": -1 if config.layer is None else int(config.layer),
        "storage_dtype": config.storage,
        "quantisation": "int8_per_token_absmax" if config.storage == "int8" else "none",
        "granularities": grans,
        "text_dim": text_dim,
        "dataset": ds_identity,
        "dataset_spec": recorded_spec(dataset, config.dataset, config.dataset_kwargs),
        "num_samples": N,
        "keys_sha1": keys_digest(keys),
        "shard_rank": rank,
        "shard_world": world,
        "shard_start": start,
        "shard_count": count,
        "config": json.loads(json.dumps(dataclasses.asdict(config), default=str)),
        "caption_problems": list(getattr(dataset, "caption_problems", []) or [])[:100],
    }
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
    )
    summary: dict[str, Any] = {
        "out": str(out_dir),
        "rank": rank,
        "world": world,
        "shard": str(shard_path),
        "rows": count,
        "done": 0,
        "skipped": [],
        "complete": False,
        "index": None,
        "already_complete": False,
        "forward_seconds": 0.0,
        "bytes_written": 0,
    }

    # resume or create
    if shard_path.exists():
        try:
            stored = read_meta(shard_path)
        except OSError as e:
            raise ValueError(
                f"cannot open the existing shard {shard_path} ({e}); it was probably interrupted while being "
                "finalised. Delete it and rerun the same command to redo this shard."
            ) from e
        check_resume(shard_path, stored, attrs)
        layout = layout_from_meta(stored, count)
        if stored.get("block_size") != config.batch_size:
            logger.info(
                "resuming with the cache's write block size %s (batch_size %s ignored)",
                stored.get("block_size"),
                config.batch_size,
            )
    if is_main and index_path.exists() and shard_complete(shard_path):
        idx_meta = read_meta(index_path)
        if idx_meta.get("complete") and all(
            shard_complete(out_dir / shard_name(r, world)) for r in range(world)
        ):
            msg = f"cache {out_dir} is already complete ({idx_meta.get('num_done')} samples, {idx_meta.get('num_skipped')} skipped); nothing to do"
            logger.info(msg)
            print(msg, flush=True)
            summary.update(already_complete=True, complete=True, index=str(index_path), done=count)
            summary["seconds"] = time.perf_counter() - t_start
            return summary

    bps = layout.bytes_per_sample()
    if shard_path.exists():
        with h5py.File(shard_path, "r") as f:
            remaining = int((~f["done"][()].astype(bool)).sum())
    else:
        remaining = count
    need = bps * remaining * world * config.space_margin  # all ranks share the disk; slices are balanced
    free = shutil.disk_usage(out_dir).free
    if is_main:
        msg = (
            f"cache estimate: {_fmt_bytes(bps)} per image x {N} images = {_fmt_bytes(bps * N)} in total; "
            f"{_fmt_bytes(bps * remaining * world)} still to write; {_fmt_bytes(free)} free on {out_dir}"
        )
        logger.info(msg)
        print(msg, flush=True)
    if need > free:
        raise OSError(
            f"not enough disk space for the cache in {out_dir}: needs about {_fmt_bytes(need)} "
            f"({_fmt_bytes(bps)} per image x {remaining} images x {world} rank(s) x margin {config.space_margin}), "
            f"only {_fmt_bytes(free)} free. Free space, write elsewhere (--out), use --storage int8, or a smaller image size."
        )
    if not shard_path.exists():
        create_shard(shard_path, layout, attrs, keys[start : start + count])
        if is_main:
            (out_dir / "cache_config.json").write_text(
                json.dumps(attrs["config"] | {"git_revision": attrs["git_revision"]}, indent=2)
            )

    if shard_complete(shard_path):
        logger.info("shard %s is already complete; nothing to extract", shard_path.name)
        with h5py.File(shard_path, "r") as f:
            summary.update(done=count, complete=True, skipped=read_skipped(f))
    else:
        summary.update(
            _extract_shard(
                config,
                teacher,
                dataset,
                device,
                shard_path,
                layout,
                keys,
                start,
                count,
                spec,
                size,
                min_side,
                grans,
                is_main,
            )
        )

    # the index: rank 0 after a barrier when a process group exists, else the last rank to finish
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        if is_main:
            summary["index"] = str(build_index(out_dir, world))
        torch.distributed.barrier()
    elif all(shard_complete(out_dir / shard_name(r, world)) for r in range(world)):
        summary["index"] = str(build_index(out_dir, world))
    else:
        logger.info("shard %s complete; index.h5 is written by the last rank to finish", shard_path.name)
    summary["seconds"] = time.perf_counter() - t_start
    if summary["index"]:
        msg = f"cache complete: {summary['index']} ({N} samples)"
        logger.info(msg)
        print(msg, flush=True)
    return summary


def _extract_shard(
    config: CacheConfig,
    teacher: Teacher,
    dataset: Dataset,
    device: torch.device,
    shard_path: Path,
    layout: Layout,
    keys: list[str],
    start: int,
    count: int,
    spec: ViewSpec,
    size: tuple[int, int],
    min_side: int,
    grans: list[str],
    is_main: bool,
) -> dict[str, Any]:
    """Run the teacher over the shard's remaining write blocks and finalise the shard."""
    dim, C, text_dim = layout.dim, layout.num_global_tokens, layout.text_dim
    out_dir = shard_path.parent
    writer = ShardWriter(
        shard_path, layout, queue_size=config.queue_size, flush_interval_s=config.flush_interval_s
    )
    B = layout.block_size
    blocks = [
        (b, list(range(start + b * B, start + min((b + 1) * B, count))))
        for b in range(layout.num_blocks)
        if b * B < count
    ]
    todo = [(b, idx) for b, idx in blocks if not writer.done[b * B : b * B + len(idx)].all()]
    todo_n = sum(len(i) for _, i in todo)
    if todo_n < count and todo_n and is_main:
        logger.info(
            "resuming: %d of %d samples of %s already written", count - todo_n, count, shard_path.name
        )

    items = _Items(dataset, size, config.resize, spec, min_side)
    loader = DataLoader(
        items,
        batch_sampler=[idx for _, idx in todo],
        num_workers=config.num_workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if config.num_workers > 0 else None,
    )
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.autocast)
    bar = tqdm(
        total=todo_n,
        unit="img",
        disable=not (config.progress and is_main),
        desc=f"cache {out_dir.name}",
        dynamic_ncols=True,
    )
    t_loop = time.perf_counter()
    forward_s = 0.0
    try:
        for (block, _), batch in zip(todo, loader):
            rows = np.asarray(batch["index"], np.int64) - start
            skipped = [(i - start, f"{kind}: {err}") for i, err, kind in batch["bad"]]
            arrays: dict[str, np.ndarray] = {}
            if len(rows):
                t0 = time.perf_counter()
                views = batch["views"].to(device, non_blocking=True)
                nb, V = views.shape[:2]
                with (
                    torch.inference_mode(),
                    torch.autocast(
                        device.type,
                        dtype=amp or torch.float32,
                        enabled=amp is not None and device.type == "cuda",
                    ),
                ):
                    feats = teacher.encode_image(
                        views.flatten(0, 1),
                        value_trick=config.value_trick,
                        value_readout=config.value_readout,
                        layer=config.layer,
                    )
                    vshape = (nb, V) if config.views > 1 else (nb,)
                    arrays["patch"] = feats.patch.reshape(*vshape, -1, dim)
                    arrays["cls"] = feats.cls.reshape(*vshape, C, dim)
                    if config.value_trick:
                        arrays["value_patch"] = feats.value_patch.reshape(*vshape, -1, dim)
                    for g in grans:
                        texts = [c.get(g) for c in batch["captions"]]
                        ok = [isinstance(t, str) and t.strip() != "" for t in texts]
                        emb = torch.zeros(nb, text_dim, device=device)
                        if any(ok):
                            # encode each distinct caption once (short captions repeat a lot)
                            kept = [t for t, o in zip(texts, ok) if o]
                            uniq = list(dict.fromkeys(kept))
                            enc = teacher.encode_text(uniq).float()
                            pos = {t: i for i, t in enumerate(uniq)}
                            which = torch.tensor([pos[t] for t in kept], device=enc.device)
                            emb[torch.tensor(ok, device=device)] = enc[which].to(device)
                        arrays[f"text/{g}"] = emb
                        arrays[f"text_valid/{g}"] = torch.tensor(ok)
                    arrays["_stats"] = sample_stats(arrays["patch"], arrays["cls"])
                    # encode to the storage dtype here, once per batch, vectorised (on the GPU when there
                    # is one: halves / quarters the copy to the host); the writer thread then only writes
                    for k in ("patch", "cls", "value_patch"):
                        if k in arrays:
                            if config.storage == "int8":
                                arrays[k], arrays[k + "_scale"] = quantise_int8_torch(arrays[k])
                            else:
                                arrays[k] = arrays[k].half()
                    for g in grans:
                        arrays[f"text/{g}"] = arrays[f"text/{g}"].half()
                arrays = {
                    k: (v.float() if v.dtype == torch.bfloat16 else v).cpu().numpy()
                    for k, v in arrays.items()
                }
                forward_s += time.perf_counter() - t0
                if config.views > 1:
                    arrays["boxes"], arrays["flips"] = batch["boxes"], batch["flips"]
            writer.submit(WriteBatch(block=block, rows=rows, arrays=arrays, skipped=skipped))
            bar.update(len(rows) + len(skipped))
            el = max(time.perf_counter() - t_loop, 1e-9)
            bar.set_postfix_str(f"{writer.bytes_written / el / 2**20:.1f} MB/s", refresh=False)
    finally:
        bar.close()
        writer.close()
    loop_s = time.perf_counter() - t_loop  # includes draining the writer queue
    res = writer.finalize(keys[start : start + count], start)
    _log_skipped(shard_path, res["skipped"], dataset, res.get("captions_missing", {}))
    if not res["complete"]:
        raise RuntimeError(
            f"{shard_path} is incomplete ({res['done']} of {count} done); rerun the same command to resume"
        )
    return dict(
        done=res["done"],
        skipped=res["skipped"],
        complete=res["complete"],
        forward_seconds=forward_s,
        loop_seconds=loop_s,
        bytes_written=writer.bytes_written,
        writer_seconds=writer.write_seconds,
        submit_wait_seconds=writer.submit_wait_seconds,
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
