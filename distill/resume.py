"""Honest stage-2 resumes: what a resume compares, the run directory's lock, the log rewrite, preemption.

- :func:`config_changes` / :func:`check_resume`: a resume compares the checkpoint's config and the
  identity of the cache it was trained on (``cache.format.cache_identity``: teacher, its weights,
  dataset, settings) with this start's, and refuses naming every changed key; ``--allow-change KEY``
  (a key, a section such as ``loss``, or ``all``) accepts them explicitly. Keys that say where and how
  the run executes, not what it computes (:data:`OPERATIONAL`), may change freely; the per-process
  batch and accumulation may change when the global batch stays the same.
- :func:`record_start`: ``config.yaml`` is this start's config; every start's is kept under
  ``starts/`` (``NNN-step_XXXXXXXX.yaml``) with what it resumed from and which changes it accepted.
- :func:`lock_run_dir`: one run per ``output_dir`` (``<output_dir>/run.lock``, the stage-1 shard lock
  of ``cache.lock``): a second run (a requeued job overlapping the old one) is refused naming the holder.
- :func:`rewrite_log`: on resume ``log.jsonl`` keeps the lines up to the checkpoint's step; a torn line
  (power loss mid-write) is reported and dropped; the rewrite is atomic (temporary file, fsync, rename).
- :class:`PreemptionWatch`: SIGTERM / SIGUSR1 (SLURM preemption, ``scancel --signal``, Kubernetes)
  finish the current step, write a checkpoint and exit with ``128 + signal`` (143 / 138) so the
  scheduler requeues the job and ``--resume auto`` continues it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from tipsdistill.cache.lock import CacheBusyError, ShardLock
from tipsdistill.students.variants import canonical_spelling, expanded_spelling

from .checkpoint import fsync_dir

logger = logging.getLogger(__name__)

# config keys (dotted prefixes) a resume may change without --allow-change: where and how the run
# executes (paths, workers, logging, ZeRO stage, checkpoint cadence), not what it computes
OPERATIONAL = (
    "output_dir",
    "log",
    "cache.path",  # the cache itself is compared by its identity
    "cache.prefetch",
    "cache.reader",  # no longer read (one data path); older checkpoints hold it
    "data.num_workers",
    "data.prefetch_factor",
    "engine.zero_stage",
    "engine.cpu_threads",
    "engine.dist_backend",
    "engine.deepspeed_config",
    "checkpoint.every",
    "checkpoint.keep_last",
    "checkpoint.at_end",
)
GLOBAL_BATCH = "global batch (data.batch_size x optim.accum_steps x processes)"
STARTS_DIR = "starts"
LOG_NAME = "log.jsonl"
RUN_LOCK = "run"  # <output_dir>/run.lock
PREEMPT_SIGNALS = ("SIGTERM", "SIGUSR1")


class ResumeMismatch(ValueError):
    """The checkpoint was trained with another config or cache; the message names every changed key."""


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _covered(key: str, prefixes: tuple[str, ...] | list[str]) -> bool:
    return any(p == "all" or key == p or key.startswith(p + ".") for p in prefixes)


def _student_spelt_out(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with ``student.name``/``student.kwargs`` in one spelling of the model they build (a
    checkpoint written when recipes spelt a registered shape as the base name + kwargs resumes under its
    registered name: the same model)."""
    student = config.get("student")
    if not isinstance(student, dict) or not isinstance(student.get("name"), str):
        return config
    name, kwargs = expanded_spelling(*canonical_spelling(student["name"], student.get("kwargs") or {}))
    return {**config, "student": {**student, "name": name, "kwargs": kwargs}}


def config_changes(
    old: dict[str, Any], new: dict[str, Any], *, old_world: int, new_world: int
) -> list[tuple[str, Any, Any]]:
    """``[(key, checkpoint's value, this start's value)]`` of the config keys that change what the run
    computes (every key but :data:`OPERATIONAL`); the per-process batch and accumulation count as one
    key, the global batch."""
    a, b = flatten(_student_spelt_out(old)), flatten(_student_spelt_out(new))
    out = []
    for key in sorted(set(a) | set(b)):
        if _covered(key, OPERATIONAL) or key in ("data.batch_size", "optim.accum_steps"):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            out.append((key, a.get(key, "<absent>"), b.get(key, "<absent>")))

    def glob(c: dict[str, Any], world: int) -> int:
        return int(c.get("data.batch_size", 0)) * int(c.get("optim.accum_steps", 1)) * int(world)

    if "data.batch_size" in a and glob(a, old_world) != glob(b, new_world):
        out.append((GLOBAL_BATCH, glob(a, old_world), glob(b, new_world)))
    return out


def identity_changes(old: dict[str, Any] | None, new: dict[str, Any] | None) -> list[tuple[str, Any, Any]]:
    """``[("cache.<field>", checkpoint's, this start's)]`` between two cache identities."""
    old, new = old or {}, new or {}
    return [
        (f"cache.{k}", old.get(k), new.get(k))
        for k in sorted(set(old) | set(new))
        if json.dumps(old.get(k), sort_keys=True, default=str)
        != json.dumps(new.get(k), sort_keys=True, default=str)
    ]


def _short(v: Any, n: int = 80) -> str:
    s = json.dumps(v, sort_keys=True, default=str) if not isinstance(v, str) else v
    return s if len(s) <= n else s[: n - 3] + "..."


def check_resume(
    where: str | Path,
    client: dict[str, Any],
    config: dict[str, Any],
    cache_identity: dict[str, Any] | None,
    *,
    world: int,
    allow: tuple[str, ...] | list[str] = (),
) -> list[tuple[str, Any, Any]]:
    """Compare a checkpoint's client state (its ``config``, ``cache_identity``, ``world_size``) with this
    start; raise :class:`ResumeMismatch` naming every changed key not covered by ``allow``. Returns the
    accepted changes (logged as warnings)."""
    old_cfg = client.get("config")
    if not old_cfg:
        logger.warning("%s records no config (an older checkpoint): the resume cannot compare configs", where)
        return []
    changes = config_changes(old_cfg, config, old_world=int(client.get("world_size", world)), new_world=world)
    if "cache_identity" in client:
        changes += identity_changes(client["cache_identity"], cache_identity)
    elif cache_identity:
        logger.warning(
            "%s records no cache identity (an older checkpoint): the cache cannot be compared", where
        )
    refused = [c for c in changes if not _covered(c[0].split(" ")[0], allow)]
    if refused:
        lines = "\n".join(f"  {k}: checkpoint {_short(a)} -> now {_short(b)}" for k, a, b in refused)
        keys = " ".join(f"--allow-change {k.split(' ')[0]}" for k, _, _ in refused)
        raise ResumeMismatch(
            f"refusing to resume {where}: {len(refused)} setting(s) differ from the run that wrote it:\n{lines}\n"
            f"Resume with the checkpoint's settings (its config is {Path(where).parent.parent / 'config.yaml'} "
            f"and {Path(where).parent.parent / STARTS_DIR}/), start a new run in another output_dir, or accept "
            f"the change(s) explicitly: {keys} (or --allow-change all)"
        )
    for k, a, b in changes:
        logger.warning("resume: %s changed (%s -> %s), accepted by --allow-change", k, _short(a), _short(b))
    return changes


def record_start(
    out: Path,
    config: dict[str, Any],
    *,
    step: int,
    resumed_from: str | None,
    accepted: list[tuple[str, Any, Any]],
) -> Path:
    """Keep this start's config under ``out/starts/NNN-step_XXXXXXXX.yaml`` (rank 0); returns its path."""
    d = out / STARTS_DIR
    d.mkdir(parents=True, exist_ok=True)
    n = len(list(d.glob("[0-9][0-9][0-9]-step_*.yaml")))
    path = d / f"{n:03d}-step_{step:08d}.yaml"
    doc = {
        "start": n,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "step": step,
        "resumed_from": resumed_from,
        "accepted_changes": [{"key": k, "checkpoint": a, "now": b} for k, a, b in accepted],
        "config": config,
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(json.loads(json.dumps(doc, default=str)), sort_keys=False))
    tmp.replace(path)
    return path


# ------------------------------------------------------------------------------------------ lock


def lock_run_dir(out: Path, *, wait_s: float = 30.0) -> ShardLock | None:
    """Rank 0 takes ``out/run.lock``; every rank learns whether it got it. Returns the held lock (rank 0)
    or None; raises :class:`cache.lock.CacheBusyError` on every rank when another run holds it."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    lock, err = None, ""
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        try:
            lock = ShardLock(
                out / RUN_LOCK,
                wait_s=wait_s,
                what=f"output_dir {out}",
                advice=(
                    "Two training runs never write one output_dir (checkpoints, log): wait for that run to end "
                    "(a requeued job: until the old one has exited), stop it, or choose another output_dir."
                ),
            ).acquire()
        except (CacheBusyError, OSError) as e:
            err = str(e)
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [err]
        dist.broadcast_object_list(box, src=0)
        err = box[0]
    if err:
        raise CacheBusyError(err)
    return lock


# ------------------------------------------------------------------------------------------- log


def read_log(path: Path) -> tuple[list[dict[str, Any]], list[tuple[int, str]]]:
    """``(records, torn)`` of a ``log.jsonl``: every line that parses as a JSON object with a step;
    ``torn`` lists ``(line number, its start)`` of the others (a write cut by a power loss)."""
    records, torn = [], []
    raw = path.read_bytes() if path.exists() else b""
    for i, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line.decode("utf-8"))
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
                raise ValueError("not a record with a step")
        except (UnicodeDecodeError, ValueError) as e:
            torn.append((i, f"{line[:60]!r} ({type(e).__name__})"))
            continue
        records.append(rec)
    return records, torn


def rewrite_log(path: Path, step: int) -> tuple[int, int, list[tuple[int, str]]]:
    """Keep the lines of ``log.jsonl`` up to ``step`` (atomically: a temporary file, fsynced, renamed).
    Returns ``(kept, dropped, torn)``; torn lines are reported (warning) and dropped."""
    records, torn = read_log(path)
    kept = [r for r in records if r["step"] <= step]
    for line, start in torn:
        logger.warning(
            "%s line %d is torn (a write cut by a crash or power loss): %s; dropped (the replayed steps log "
            "their values again)",
            path,
            line,
            start,
        )
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in kept))
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
    fsync_dir(path.parent)
    return len(kept), len(records) - len(kept), torn


# ------------------------------------------------------------------------------------ preemption


def preempt_exit_code(signame: str) -> int:
    """The exit code of a run stopped by ``signame``: 128 + its number (143 for SIGTERM, 138 for
    SIGUSR1), what a shell reports for a process ended by that signal; schedulers treat it as
    "terminated", not "completed", so a requeue (``#SBATCH --requeue``, a Kubernetes restart policy)
    starts the job again and ``--resume auto`` continues it."""
    return 128 + int(getattr(signal, signame))


class PreemptionWatch:
    """SIGTERM / SIGUSR1 set a flag; :meth:`poll` at every step boundary says when every rank should stop.

    With several processes the ranks agree through an all-reduce (MAX) of the flag started at one step
    and read at the next (a gloo group on CPU tensors: no device sync), so every rank stops after the
    same step: one step after the first rank saw the signal."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.signame: str | None = None
        self._old: dict[int, Any] = {}
        self._work: Any = None
        self._flag = torch.zeros(1, dtype=torch.int32)
        self._group: Any = None
        if threading.current_thread() is threading.main_thread():
            for name in PREEMPT_SIGNALS:
                num = getattr(signal, name)
                self._old[num] = signal.signal(num, self._handler)
        else:
            logger.warning(
                "not in the main thread: SIGTERM / SIGUSR1 are not watched (no checkpoint on preemption)"
            )
        if world > 1:
            self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None

    def _handler(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signame is None:
            self.signame = name
            logger.warning("%s received: finishing this step, writing a checkpoint, then exiting", name)

    def poll(self) -> str | None:
        """At a step boundary: the signal's name when every rank stops now, else None."""
        if self.world == 1:
            return self.signame
        stop = None
        if self._work is not None:
            self._work.wait()
            got = int(self._flag.item())
            if got > 0:  # some rank got a signal by the previous step (the highest number wins)
                stop = signal.Signals(got).name
        self._flag = torch.tensor([signal_number(self.signame)], dtype=torch.int32)
        self._work = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        if stop is not None:
            self._work.wait()
            self._work = None
        return stop

    def close(self) -> None:
        """Wait for an outstanding agreement and restore the previous handlers."""
        if self._work is not None:
            try:
                self._work.wait()
            except RuntimeError:
                pass
            self._work = None
        for num, old in self._old.items():
            signal.signal(num, old)
        self._old.clear()


def signal_number(name: str | None) -> int:
    return int(getattr(signal, name)) if name else 0
