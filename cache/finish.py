"""Stage 1, finishing: is the cache already complete, and the index that presents the shards as one.

Rank 0 (with a process group) writes ``index.h5`` once every shard is complete, watching the others
through their files and locks (:func:`wait_for_shards`); without a group (independent jobs, one per
shard) the last rank to finish writes it. A rerun of a complete cache is a no-op on every rank.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from .format import INDEX_NAME, build_index, read_meta, shard_complete
from .lock import live_writer
from .plan import ShardPlan

logger = logging.getLogger(__name__)

# rank 0 waiting for the other shards before the index: a shard incomplete with no process holding its
# lock for this long means its rank is dead; rank 0 stops and says so (the rerun resumes it)
INDEX_DEAD_WRITER_S = 120.0
INDEX_POLL_S = 1.0


def note_missing_shards(plan: ShardPlan) -> None:
    """An index that lists this rank's shard while the file is gone: say what is redone."""
    if plan.index_path.exists() and not plan.shard_path.exists():
        msg = (
            f"{INDEX_NAME} lists {plan.shard_path.name}, which is missing: its {plan.count} samples are redone "
            f"(samples {plan.start}..{plan.start + plan.count - 1}); the index is rebuilt afterwards"
        )
        logger.warning(msg)
        print(msg, flush=True)


def cache_already_complete(plan: ShardPlan) -> bool:
    """The index and every shard are complete (a rerun is then a no-op on every rank: each rank reads
    the same files, and no rank waits for another)."""
    if not (plan.index_path.exists() and shard_complete(plan.shard_path)):
        return False
    return bool(read_meta(plan.index_path).get("complete")) and all(
        shard_complete(p) for p in plan.shard_paths()
    )


def complete_message(plan: ShardPlan) -> str:
    m = read_meta(plan.index_path)
    return (
        f"cache {plan.out_dir} is already complete: {m.get('num_done')} cached, {m.get('num_skipped')} skipped "
        f"(of {plan.num_samples} samples); nothing to do"
    )


def write_index(plan: ShardPlan) -> str | None:
    """The index. With a process group: rank 0, once every shard is complete (it waits through the files,
    watching each unfinished shard's writer: :func:`wait_for_shards`); the other ranks return once
    their shard is complete (no collective: a rank that died or returned early never hangs the others).
    Without one (independent jobs, one per shard): the last rank to finish."""
    group = torch.distributed.is_available() and torch.distributed.is_initialized()
    if plan.world == 1 or (group and plan.is_main):
        if plan.world > 1:
            wait_for_shards(plan)
        return str(build_index(plan.out_dir, plan.world))
    if not group and all(shard_complete(p) for p in plan.shard_paths()):
        return str(build_index(plan.out_dir, plan.world))
    who = "rank 0" if group else "the last rank to finish"
    logger.info("shard %s complete; index.h5 is written by %s", plan.shard_path.name, who)
    return None


def wait_for_shards(plan: ShardPlan) -> None:
    """Rank 0: wait until every shard is complete. A shard that is incomplete while no process holds its
    lock (:func:`cache.lock.live_writer`) for :data:`INDEX_DEAD_WRITER_S` has lost its writer: stop,
    naming it (the same command resumes it and writes the index)."""
    orphaned: dict[Path, float] = {}
    last_note = time.monotonic()
    while True:
        todo = [p for p in plan.shard_paths() if not shard_complete(p)]
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
                f"cannot write {plan.index_path.name}: {', '.join(p.name for p in dead)} incomplete and no process "
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


def announce_index(plan: ShardPlan, index: str) -> None:
    """Say what the finished cache holds (a warning when nothing could be cached)."""
    m = read_meta(plan.index_path)
    msg = (
        f"cache complete: {index}: {m.get('num_done')} cached, {m.get('num_skipped')} skipped "
        f"(of {plan.num_samples} samples)"
    )
    (logger.warning if not m.get("num_done") else logger.info)(msg)
    print(msg, flush=True)
