"""Where this process sits in a job: rank, world size and local rank, one answer for every stage.

- :func:`process_place` reads them from the launcher's variables: ``torchrun``, ``accelerate launch``
  and the ``deepspeed`` launcher set ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; under ``srun`` with one
  task per process (no ``torchrun``), SLURM's task variables are translated into those
  (:func:`slurm_env`) and exported, so torch.distributed, accelerate and DeepSpeed read the same; with
  none of them, one process (rank 0 of 1). Stage 1 (:func:`launch_state`), stage 2
  (``distill.train.setup_env``) and evaluation (``tipsdistill-eval``) all ask it.
- :func:`launch_state` is stage 1's use of it: the place plus the device and mixed precision from
  accelerate's state, or, with ``RANK``/``WORLD_SIZE`` and no ``MASTER_ADDR``, independent jobs (one
  shard each, no process group).
- :func:`check_shared_out`: stage 1's ranks meet through files in ``--out`` (rank 0 waits for every
  shard before the index, the others for rank 0's PCA basis), so ``--out`` must be one folder every
  node sees; checked at start, before any rank waits on another's file.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_NODELIST_KEYS = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
# a process group exists under a launcher, but no collective of stage 1 waits for another rank's work:
# rank 0 waits for the other shards through their files (a resumed run can leave one rank with hours
# of work after the others finished), so a collective that hangs on a dead rank fails within this time
PROCESS_GROUP_TIMEOUT_S = 30 * 60
MIXED_PRECISION_AUTOCAST = {"no": "none", "bf16": "bf16", "fp16": "fp16"}


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu-[003-004,010],cpu1`` -> ``gpu-003`` (what ``scontrol show
    hostnames`` prints first), ``node7,node8`` -> ``node7``."""
    text = nodelist.strip()
    if not text:
        raise ValueError(
            "empty SLURM node list; run inside a SLURM allocation (srun/sbatch) or set MASTER_ADDR"
        )
    m = re.match(r"^([^,\[]+)(?:\[([^\]]+)\])?", text)
    if m is None:
        raise ValueError(
            f"cannot read SLURM node list {nodelist!r}; set MASTER_ADDR to the first node's name"
        )
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return f"{prefix}{first}"


def _per_node(value: str) -> str:
    """``SLURM_NTASKS_PER_NODE`` / ``SLURM_TASKS_PER_NODE`` as one number: ``4`` or ``4(x2)`` -> ``4``."""
    return re.split(r"[(,]", value.strip())[0]


def slurm_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The ``torch.distributed`` variables of this SLURM task (``{}`` outside SLURM or with one task).

    ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``NODE_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` (the first
    node of the step's node list) and ``MASTER_PORT`` (from the job id, so every task of a job agrees
    without talking). Keys already in ``environ`` are not returned (they win: a ``MASTER_PORT`` exported
    in the sbatch script)."""
    if "SLURM_PROCID" not in environ or int(environ.get("SLURM_NTASKS", "1")) <= 1:
        return {}
    nodelist = next((environ[k] for k in _NODELIST_KEYS if environ.get(k)), "")
    per_node = environ.get("SLURM_NTASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE") or ""
    want = {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": environ["SLURM_NTASKS"],
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "NODE_RANK": environ.get("SLURM_NODEID", "0"),
        "MASTER_PORT": str(20000 + int(environ.get("SLURM_JOB_ID", "0")) % 20000),
    }
    if per_node:
        want["LOCAL_WORLD_SIZE"] = _per_node(per_node)
    if "MASTER_ADDR" not in environ:
        want["MASTER_ADDR"] = first_host(nodelist)
    return {k: v for k, v in want.items() if k not in environ}


@dataclass(frozen=True)
class ProcessPlace:
    """This process's place in its job (:func:`process_place`)."""

    rank: int
    world: int
    local_rank: int
    launcher: str  # "env" (RANK / WORLD_SIZE set: torchrun, accelerate launch, deepspeed), "slurm", "none"
    group: bool  # the processes meet in one process group (MASTER_ADDR known, or the stage always forms one)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_var(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(
            f"{name}={raw!r} is not an integer; unset it or let the launcher (torchrun, accelerate launch, srun) set it"
        ) from None


def process_place(
    environ: MutableMapping[str, str] | None = None, *, group: bool | None = None
) -> ProcessPlace:
    """Rank, world size and local rank of this process (module docstring): the one answer of every stage.

    ``environ`` (default ``os.environ``) receives SLURM's translated variables when ``srun`` started the
    process and ``RANK`` is not set yet. ``group``: whether the processes form one process group
    (default: ``MASTER_ADDR`` is known); a missing ``LOCAL_RANK`` is then ``RANK`` (processes started by
    hand on one node), else ``0`` (independent jobs, each with its own devices)."""
    env = os.environ if environ is None else environ
    launcher = "env" if ("RANK" in env or "WORLD_SIZE" in env) else "none"
    if "RANK" not in env and (slurm := slurm_env(env)):  # srun, one task per process
        env.update(slurm)
        launcher = "slurm"
        logger.info("SLURM task: %s", ", ".join(f"{k}={v}" for k, v in sorted(slurm.items())))
    world, rank = _int_var(env, "WORLD_SIZE", 1), _int_var(env, "RANK", 0)
    if group is None:
        group = "MASTER_ADDR" in env
    local = _int_var(env, "LOCAL_RANK", rank if group else 0)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(
            f"RANK={rank} is not in [0, WORLD_SIZE={world}): set both (a launcher does: torchrun, accelerate "
            "launch, srun) or neither (one process)"
        )
    return ProcessPlace(rank=rank, world=world, local_rank=local, launcher=launcher, group=group)


@dataclass(frozen=True)
class LaunchState:
    """Stage 1's place in the job: :func:`process_place` plus the device and accelerate's mixed precision."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    mixed_precision: str  # accelerate's: "no" | "bf16" | "fp16" (``accelerate launch --mixed_precision``)


def launch_state() -> LaunchState:
    """Stage 1: this process's place (:func:`process_place`), device and mixed precision.

    Works under ``accelerate launch`` (any config in ``configs/accelerate/``), ``torchrun``, ``srun`` and
    with no launcher (one process); under a launcher accelerate creates the process group (gloo on CPU,
    nccl on CUDA). ``RANK``/``WORLD_SIZE`` set and no ``MASTER_ADDR`` mean independent jobs, one per shard
    (a SLURM array with ``RANK`` and ``WORLD_SIZE`` set per job; no process group; the last to finish
    writes the index)."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, parse_choice_from_env

    place = process_place()
    if place.world > 1 and not place.group:
        logger.info(
            "RANK=%d of WORLD_SIZE=%d without MASTER_ADDR: writing this shard alone", place.rank, place.world
        )
        cuda = torch.cuda.is_available()
        return LaunchState(
            rank=place.rank,
            world=place.world,
            local_rank=place.local_rank,
            device=torch.device(f"cuda:{place.local_rank}" if cuda else "cpu"),
            mixed_precision=parse_choice_from_env("ACCELERATE_MIXED_PRECISION", "no"),
        )
    if place.world > 1 and os.environ.get("MASTER_PORT") == "0":
        raise ValueError(
            "MASTER_PORT=0 (torchrun --master_port 0): the processes cannot meet on a port chosen by each; "
            "pass a free port, e.g. --master_port 29500 (accelerate launch --main_process_port 29500)"
        )
    acc = Accelerator(
        cpu=not torch.cuda.is_available(),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=PROCESS_GROUP_TIMEOUT_S))],
    )
    if (acc.process_index, acc.num_processes) != (place.rank, place.world):
        raise RuntimeError(
            f"accelerate places this process at rank {acc.process_index} of {acc.num_processes}, the launcher's "
            f"variables at RANK={place.rank} of WORLD_SIZE={place.world}: launch with torchrun, accelerate "
            "launch or srun (which set RANK, WORLD_SIZE and LOCAL_RANK)"
        )
    mp = str(acc.mixed_precision)
    if mp not in MIXED_PRECISION_AUTOCAST:
        raise ValueError(
            f"accelerate's mixed precision is {mp!r}; stage 1 runs the teacher in one of "
            f"{sorted(MIXED_PRECISION_AUTOCAST)} (accelerate launch --mixed_precision no|bf16|fp16)"
        )
    return LaunchState(
        rank=place.rank, world=place.world, local_rank=place.local_rank, device=acc.device, mixed_precision=mp
    )


SHARED_OUT_CHECK = ".shared_out_check"  # rank 0's token in --out, read by every other rank at start


class SharedOutError(RuntimeError):
    """A rank cannot see the files rank 0 writes into ``--out`` (no shared filesystem path)."""


def node_label(environ: Mapping[str, str] | None = None) -> str:
    """This process's node for messages: the host name and, under a launcher, the node rank
    (torchrun's ``GROUP_RANK``, SLURM's ``NODE_RANK``): ``gpu-003 (node 1)``."""
    env = os.environ if environ is None else environ
    node = env.get("GROUP_RANK") or env.get("NODE_RANK")
    return socket.gethostname() + (f" (node {node})" if node else "")


def _sees_token(path: Path, token: str, wait_s: float) -> bool:
    """Whether ``path`` holds ``token`` within ``wait_s`` seconds (polled; listing the folder first
    makes an NFS client revalidate its cached view of it, so a new file shows without waiting for
    the attribute cache to expire)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if path.name in os.listdir(path.parent) and path.read_text().strip() == token:
                return True
        except OSError:  # the folder or the file not there (yet), or being replaced
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def check_shared_out(out_dir: Path, given: str, rank: int, world: int, wait_s: float) -> None:
    """Every rank of a process group must see the same ``--out`` folder (module docstring): rank 0
    writes a fresh token into ``out_dir/.shared_out_check`` and sends it to every rank (a collective of
    ``torch.distributed``, the one stage 1 makes); each rank looks for the file holding it for up to
    ``wait_s`` seconds, then all share what they saw. When any rank did not see it, every rank raises
    :class:`SharedOutError` naming the ranks, their nodes and the paths they looked at, so no rank
    waits for files that never come. ``given``: ``--out`` as the user wrote it (a relative path is
    named as the likely cause). Nothing to check for one process or without a process group."""
    import torch.distributed as dist

    if world <= 1 or not (dist.is_available() and dist.is_initialized()):
        return
    path = out_dir.resolve() / SHARED_OUT_CHECK
    token: list[str | None] = [None]
    if rank == 0:
        token[0] = f"{secrets.token_hex(16)} {node_label()}"
        tmp = path.with_name(f"{SHARED_OUT_CHECK}.{os.getpid()}.tmp")
        tmp.write_text(token[0] + "\n")
        os.replace(tmp, path)
    dist.broadcast_object_list(token, src=0)
    seen = rank == 0 or _sees_token(path, str(token[0]), wait_s)
    mine = {"rank": rank, "node": node_label(), "path": str(path), "seen": seen}
    everyone: list[dict[str, object] | None] = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        path.unlink(missing_ok=True)
    blind = [p for p in everyone if p is not None and not p["seen"]]
    if not blind:
        logger.info("--out %s: every one of the %d ranks sees rank 0's files", out_dir, world)
        return
    writer = next(p for p in everyone if p is not None and p["rank"] == 0)
    who = "; ".join(f"rank {p['rank']} on {p['node']} looked for {p['path']}" for p in blind)
    hint = (
        f" --out {given!r} is a relative path: each node resolved it against its own working directory."
        if not Path(given).expanduser().is_absolute()
        else ""
    )
    raise SharedOutError(
        f"--out must be one shared filesystem path seen by every node: rank 0 on {writer['node']} wrote "
        f"{writer['path']}, and {len(blind)} of {world} ranks did not see it within {wait_s:g} s ({who}).{hint} "
        "Rank 0 writes index.h5 from the shards every rank writes there, and the other ranks read the PCA "
        "basis rank 0 writes there: give every node the same absolute path on a filesystem they all mount "
        "(NFS, Lustre, GPFS, ...), or run one job per shard without a process group (docs/cache.md, "
        '"Multi-node stage 1"). A slow shared filesystem: raise shared_out_wait_s'
    )
