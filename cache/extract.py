"""Stage 1 driver: run a frozen teacher over a dataset once and write the HDF5 feature cache.

One writer per rank (rank, world, device and mixed precision: :func:`cache.launch.launch_state`, so
``accelerate launch``, ``torchrun``, ``srun`` and a plain process all work), each over a contiguous
slice of the dataset into its own shard; the last rank to finish (or rank 0 after every shard is
complete when a process group exists) writes ``index.h5``. Rerunning the same command resumes.

:func:`extract_features` reads top to bottom; each step lives in the module of its concern:

- :mod:`cache.config` the settings (:class:`CacheConfig`); :mod:`cache.build` teachers and datasets
  from their specs;
- :mod:`cache.plan` what this rank writes, decided once (:class:`~cache.plan.ShardPlan`, frozen), and the
  small state learned afterwards (:class:`~cache.plan.ShardState`: the layout on disk, the PCA basis);
- :mod:`cache.commit` the shard on disk: resume or repair, disk space, creation, writing and committing rows;
- :mod:`cache.run` the teacher run loop (DataLoader workers, forward, encoding);
- :mod:`cache.basis` the PCA basis of a reduced-dimension cache;
- :mod:`cache.finish` already complete?, and the index.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import h5py
from torch.utils.data import Dataset

from tipsdistill.teachers.base import Teacher

from .basis import resolve_reduction
from .build import UntrustedCodeError, load_object, make_dataset, make_teacher
from .commit import adopt_existing_shard, check_disk_space, create_shard_file, write_shard
from .config import CacheConfig
from .finish import announce_index, cache_already_complete, complete_message, note_missing_shards, write_index
from .format import read_skipped, shard_complete
from .lock import ShardLock
from .plan import ShardPlan, ShardState, plan_shard

logger = logging.getLogger(__name__)

__all__ = [
    "CacheConfig",
    "UntrustedCodeError",
    "extract_features",
    "load_object",
    "make_dataset",
    "make_teacher",
]


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
    plan = plan_shard(config, teacher, dataset)
    with ShardLock(plan.shard_path, wait_s=config.lock_wait_s):
        summary = _run_shard(plan)
    summary["seconds"] = time.perf_counter() - t_start
    return summary


def _run_shard(plan: ShardPlan) -> dict[str, Any]:
    """Resume, repair, extract and index one rank's shard (holding its lock)."""
    summary = _new_summary(plan)
    note_missing_shards(plan)
    layout = adopt_existing_shard(plan) if plan.shard_path.exists() else plan.layout
    if cache_already_complete(plan):
        if plan.is_main:
            msg = complete_message(plan)
            logger.info(msg)
            print(msg, flush=True)
        summary.update(already_complete=True, complete=True, index=str(plan.index_path), done=plan.count)
        return summary
    check_disk_space(plan, layout)  # before the PCA basis: a refused run leaves no basis behind
    state = ShardState(layout, resolve_reduction(plan, layout) if layout.reduce_dim else None)
    if not plan.shard_path.exists():
        create_shard_file(plan, state)
    if shard_complete(plan.shard_path):
        logger.info("shard %s is already complete; nothing to extract", plan.shard_path.name)
        with h5py.File(plan.shard_path, "r") as f:
            summary.update(done=plan.count, complete=True, skipped=read_skipped(f))
    else:
        summary.update(write_shard(plan, state))
    summary["index"] = write_index(plan)
    if summary["index"]:
        announce_index(plan, summary["index"])
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


def _new_summary(plan: ShardPlan) -> dict[str, Any]:
    return {
        "out": str(plan.out_dir),
        "rank": plan.rank,
        "world": plan.world,
        "shard": str(plan.shard_path),
        "rows": plan.count,
        "done": 0,
        "skipped": [],
        "complete": False,
        "index": None,
        "already_complete": False,
        "forward_seconds": 0.0,
        "bytes_written": 0,
    }
