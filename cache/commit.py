"""Stage 1, a shard on disk: resume or repair it, check the disk, create it, write and commit its rows.

- :func:`adopt_existing_shard`: a shard already on disk must be readable and made with this run's
  settings (:func:`cache.format.check_resume`); a damaged one is repaired first, keeping every intact
  write block (:mod:`cache.repair`); its layout is adopted (e.g. its write block size);
- :func:`check_disk_space` prints the size estimate and refuses a run that cannot fit;
- :func:`create_shard_file` writes an empty shard (and, rank 0, ``cache_config.json``);
- :func:`write_shard` runs the teacher loop (:mod:`cache.run`) into a :class:`~cache.writer.ShardWriter`
  over the blocks not yet done, then finalises the shard (keys, skipped rows, completion marker);
  a full disk is reported with what is safe and how much space the rest needs.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import h5py
from torch.utils.data import Dataset
from tqdm import tqdm

from .basis import resolve_reduction
from .format import (
    H5_ERRORS,
    Layout,
    check_resume,
    chunk_map_path,
    create_shard,
    layout_from_meta,
    read_chunk_map,
    read_meta,
)
from .lock import CacheBusyError, busy_message, is_hdf5_lock_error
from .plan import ShardPlan, ShardState
from .repair import ShardReport, check_hdf5, data_end, repair_shard, verify_shard
from .run import extract_blocks, todo_blocks
from .writer import CacheWriteError, ShardWriter, is_disk_full

logger = logging.getLogger(__name__)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def adopt_existing_shard(plan: ShardPlan) -> Layout:
    """Resume: the shard on disk must be readable and made with this run's settings; its layout.

    A damaged shard (HDF5 cannot open it, truncated, or with ``repair`` any done sample whose bytes
    fail their checksum) is repaired first, keeping every intact write block (:mod:`cache.repair`).
    Another process holding the file open (HDF5 errno 11) is reported as that, never as damage."""
    path = plan.shard_path
    stored: dict[str, Any] | None = None
    try:
        stored = read_meta(path)
    except H5_ERRORS as e:
        if is_hdf5_lock_error(e):
            raise CacheBusyError(busy_message(path, e)) from e
    if stored is not None:
        check_resume(path, stored, plan.attrs)
    report = verify_shard(path) if plan.config.repair or stored is None else _quick_check(path)
    if report is not None and not report.ok:
        stored = _repair(plan, report, metadata_checked=stored is not None)
    elif plan.config.repair:
        msg = f"verified {report.line()}"
        logger.info(msg)
        print(msg, flush=True)
    assert stored is not None
    if stored.get("block_size") != plan.config.batch_size:
        logger.info(
            "resuming with the cache's write block size %s (batch_size %s ignored)",
            stored.get("block_size"),
            plan.config.batch_size,
        )
    return layout_from_meta(stored, plan.count)


def _repair(plan: ShardPlan, report: ShardReport, *, metadata_checked: bool) -> dict[str, Any]:
    """Repair a damaged shard in place (the damaged file kept aside); its new attributes."""
    path = plan.shard_path
    if not metadata_checked and report.kept_rows == 0 and not chunk_map_path(path).exists():
        logger.warning(
            "%s cannot be read at all (%s): none of its %d samples can be recovered; it is kept aside "
            "and the shard redone",
            path.name,
            "; ".join(report.problems),
            plan.count,
        )
    else:
        logger.warning("%s is damaged: %s", path.name, report.line())
    layout = dataclasses.replace(plan.layout, block_size=report.block_size or plan.layout.block_size)
    red = resolve_reduction(plan, plan.layout) if layout.reduce_dim else None
    repair_shard(
        path,
        layout,
        plan.attrs_with(red),
        plan.shard_keys,
        report,
        reduction=red,
        metadata_checked=metadata_checked,
    )
    return read_meta(path)


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


def _remaining_rows(plan: ShardPlan) -> int:
    if not plan.shard_path.exists():
        return plan.count
    with h5py.File(plan.shard_path, "r") as f:
        return int((~f["done"][()].astype(bool)).sum())


def check_disk_space(plan: ShardPlan, layout: Layout) -> None:
    """Print the size estimate; refuse when the rows still to write do not fit on the disk."""
    bps = layout.bytes_per_sample()
    remaining = _remaining_rows(plan)
    world, margin = plan.world, plan.config.space_margin
    need = bps * remaining * world * margin  # all ranks share the disk; slices are balanced
    free = shutil.disk_usage(plan.out_dir).free
    if plan.is_main:
        msg = (
            f"cache estimate: {_fmt_bytes(bps)} per image x {plan.num_samples} images = "
            f"{_fmt_bytes(bps * plan.num_samples)} in total; {_fmt_bytes(bps * remaining * world)} still to "
            f"write; {_fmt_bytes(free)} free on {plan.out_dir}"
        )
        logger.info(msg)
        print(msg, flush=True)
    if need > free:
        raise OSError(
            f"not enough disk space for the cache in {plan.out_dir}: needs about {_fmt_bytes(need)} "
            f"({_fmt_bytes(bps)} per image x {remaining} images x {world} rank(s) x margin {margin}), "
            f"only {_fmt_bytes(free)} free. Free space, write elsewhere (--out), use --storage int8, or a smaller image size."
        )


def create_shard_file(plan: ShardPlan, state: ShardState) -> None:
    """The empty shard (its PCA basis stored first); rank 0 also writes ``cache_config.json``."""
    attrs = plan.attrs_with(state.reduction)
    create_shard(plan.shard_path, state.layout, attrs, plan.shard_keys, reduction=state.reduction)
    if plan.is_main:
        (plan.out_dir / "cache_config.json").write_text(
            json.dumps(attrs["config"] | {"git_revision": attrs["git_revision"]}, indent=2)
        )


def _open_writer(plan: ShardPlan, layout: Layout) -> ShardWriter:
    cfg = plan.config
    try:
        return ShardWriter(
            plan.shard_path,
            layout,
            queue_size=cfg.queue_size,
            flush_interval_s=cfg.flush_interval_s,
            fsync=cfg.fsync,
        )
    except OSError as e:
        if is_hdf5_lock_error(e):
            raise CacheBusyError(busy_message(plan.shard_path, e)) from e
        raise


def write_shard(plan: ShardPlan, state: ShardState) -> dict[str, Any]:
    """Run the teacher over the shard's remaining write blocks and finalise the shard; the figures
    of the summary (``done``, ``skipped``, ``complete``, seconds and bytes)."""
    cfg, count = plan.config, plan.count
    writer = _open_writer(plan, state.layout)
    todo = todo_blocks(plan, state.layout, writer.done)
    todo_n = sum(len(i) for _, i in todo)
    if todo_n < count and todo_n and plan.is_main:
        logger.info(
            "resuming: %d of %d samples of %s already written", count - todo_n, count, plan.shard_path.name
        )
    bar = tqdm(
        total=todo_n,
        unit="img",
        disable=not (cfg.progress and plan.is_main),
        desc=f"cache {plan.out_dir.name}",
        dynamic_ncols=True,
    )
    t_loop = time.perf_counter()
    try:
        extract_blocks(plan, state, writer, todo, bar)
    except CacheWriteError as e:
        if is_disk_full(e):
            raise _disk_full(plan, state.layout, e) from e
        raise
    loop_s = time.perf_counter() - t_loop  # includes draining the writer queue
    try:
        res = writer.finalize(plan.shard_keys, plan.start)
    except OSError as e:
        if is_disk_full(e):
            raise _disk_full(plan, state.layout, e) from e
        raise
    _log_skipped(plan.shard_path, res["skipped"], plan.dataset, res.get("captions_missing", {}))
    if not res["complete"]:
        raise RuntimeError(
            f"{plan.shard_path} is incomplete ({res['done']} of {count} done); rerun the same command to resume"
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


def _disk_full(plan: ShardPlan, layout: Layout, e: BaseException) -> OSError:
    """The full-disk error: what is safe, how much space the rest needs, and that a rerun resumes."""
    remaining = _remaining_rows(plan)
    bps = layout.bytes_per_sample()
    margin, count = plan.config.space_margin, plan.count
    need = bps * remaining * margin
    free = shutil.disk_usage(plan.out_dir).free
    return OSError(
        errno.ENOSPC,
        f"the disk of {plan.out_dir} is full ({getattr(e, 'cause', e)}): {count - remaining} of {count} "
        f"samples of {plan.shard_path.name} are written and safe; the other {remaining} need about "
        f"{_fmt_bytes(need)} ({_fmt_bytes(bps)} per image x {remaining} x margin {margin}), "
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
