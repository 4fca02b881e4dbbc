"""Threads and workers that fit the machine: one policy for stage 1 and stage 2.

torch's default (one intra-op thread per core of the machine) ignores the cores the process may
actually use: CPU affinity (``taskset``, SLURM, ``docker --cpuset-cpus``), a cgroup CPU quota
(``docker --cpus``, Kubernetes limits), the other ranks of the node, its own DataLoader workers,
and other processes keeping cores busy. OpenMP threads then wait for each other on shared cores
and a run slows far more than in proportion to the load (the demo's training: ~180 -> ~22
samples/s with one of two cores busy). :func:`fit_threads` decides, :func:`apply_threads` sets:

- ``cpus``: ``len(os.sched_getaffinity(0))``, capped by the cgroup quota (``cpu.max`` v2 or
  ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` v1), divided among the node's local ranks
  (``LOCAL_WORLD_SIZE``);
- ``idle``: of those, how many were idle over a short probe of ``/proc/stat`` (other processes'
  load) - the probe is skipped when ``probe_s=0``;
- intra-op threads: the explicit setting (config / CLI) if given, else ``OMP_NUM_THREADS`` if set,
  else ``max(1, min(cpus, idle) - busy workers)``;
- DataLoader workers: the explicit count if ``>= 0``; ``"auto"`` (or ``-1``): :func:`auto_workers`,
  ``min(8, cpus - 1)`` with a GPU (the main process only feeds the device), ``cpus // 2`` on the CPU
  (the forward needs the rest).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

CGROUP = Path("/sys/fs/cgroup")
AUTO_WORKERS_CAP = 8  # with a GPU: enough to decode for one device; more only adds memory per process


def _cgroup_quota(root: Path = CGROUP) -> float | None:
    """CPUs allowed by the cgroup quota (``None``: no quota)."""
    try:
        text = (root / "cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def _affinity() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return set(range(os.cpu_count() or 1))


def cores_per_process(affinity: int, quota: float | None, local_world: int) -> tuple[int, str]:
    """The cores of one process: ``affinity`` cores, capped by a cgroup ``quota`` (CPUs, ``None``: none),
    shared by the node's ``local_world`` ranks (at least 1); and how that was found."""
    n = float(affinity)
    why = [f"affinity {affinity}"]
    if quota is not None and quota < n:
        n = quota
        why.append(f"cgroup quota {quota:g}")
    if local_world > 1:
        n /= local_world
        why.append(f"{local_world} local ranks")
    return max(1, math.floor(n + 1e-9)), ", ".join(why)


def available_cpus(local_world: int | None = None) -> tuple[int, str]:
    """Cores this process may use and how that was found: affinity, cgroup quota, local ranks
    (``LOCAL_WORLD_SIZE`` unless given)."""
    lw = local_world if local_world is not None else int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return cores_per_process(len(_affinity()), _cgroup_quota(), lw)


def auto_workers(cpus: int, cuda: bool) -> int:
    """DataLoader workers for a process with ``cpus`` cores: ``min(8, cpus - 1)`` with a GPU (the main
    process only feeds the device), ``cpus // 2`` on the CPU (the forward needs the rest)."""
    return max(0, min(AUTO_WORKERS_CAP, cpus - 1)) if cuda else cpus // 2


def workers_setting(value: int | str, key: str = "num_workers") -> int:
    """A workers setting as :func:`fit_threads` takes it: ``"auto"`` -> ``-1``, an integer ``>= -1`` as
    is; anything else is refused naming ``key``."""
    number: int | None = None
    if isinstance(value, str):
        text = value.strip().lower()
        number = -1 if text == "auto" else (int(text) if text.lstrip("-").isdigit() else None)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    if number is None or number < -1:
        raise ValueError(
            f"{key}={value!r}: DataLoader workers must be a number >= 0 (0: load in the main process) "
            "or auto (-1: fitted to the cores of this process)"
        )
    return number


def _cpu_times(cpus: set[int]) -> dict[int, tuple[int, int]]:
    """``{cpu: (idle jiffies, total jiffies)}`` from ``/proc/stat``."""
    out: dict[int, tuple[int, int]] = {}
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *vals = line.split()
            c = int(name[3:])
            if c in cpus:
                v = [int(x) for x in vals]
                idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
                out[c] = (idle, sum(v[:8]))
    return out


def idle_cpus(probe_s: float = 0.2) -> float | None:
    """Idle cores among this process's affinity set over ``probe_s`` seconds (``None``: unknown)."""
    cpus = _affinity()
    a = _cpu_times(cpus)
    if not a:
        return None
    time.sleep(probe_s)
    b = _cpu_times(cpus)
    idle = 0.0
    for c, (i0, t0) in a.items():
        i1, t1 = b.get(c, (i0, t0))
        if t1 > t0:
            idle += (i1 - i0) / (t1 - t0)
    return idle


@dataclass(frozen=True)
class ThreadPlan:
    """What :func:`fit_threads` chose: intra-op threads, DataLoader workers, and why."""

    intra_op: int
    workers: int
    cpus: int
    idle: float | None
    reason: str

    def line(self) -> str:
        idle = "unknown" if self.idle is None else f"{self.idle:.1f}"
        return (
            f"threads: {self.intra_op} intra-op, {self.workers} DataLoader worker(s); {self.cpus} core(s) available "
            f"({self.reason}), {idle} idle; override with the config's thread setting or OMP_NUM_THREADS"
        )


def fit_threads(
    *,
    workers: int | str,
    threads: int = 0,
    cuda: bool = False,
    local_world: int | None = None,
    probe_s: float = 0.2,
) -> ThreadPlan:
    """The thread plan for this process (module docstring). ``workers``: ``>= 0`` explicit, ``"auto"``
    or ``-1`` fitted (:func:`auto_workers`); ``threads``: ``> 0`` explicit intra-op threads, ``0`` auto."""
    workers = workers_setting(workers, "workers")
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0: auto); got {threads}")
    cpus, why = available_cpus(local_world)
    if workers == -1:
        workers = auto_workers(cpus, cuda)
        why += "; workers auto"
    idle = idle_cpus(probe_s) if probe_s > 0 else None
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if threads > 0:
        n, src = threads, "set explicitly"
    elif env.isdigit() and int(env) > 0:
        n, src = int(env), "OMP_NUM_THREADS"
    else:
        free = float(cpus) if idle is None else min(float(cpus), idle)
        n, src = max(1, math.floor(free + 0.5) - workers), "fitted"
    return ThreadPlan(
        intra_op=n, workers=max(0, workers), cpus=cpus, idle=idle, reason=f"{why}; intra-op {src}"
    )


def apply_threads(plan: ThreadPlan) -> None:
    """Set torch's intra-op threads to the plan's and log the plan."""
    import torch

    if torch.get_num_threads() != plan.intra_op:
        torch.set_num_threads(plan.intra_op)
    logger.info(plan.line())
