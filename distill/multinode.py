"""Multi-node launch support: SLURM's task variables -> the ``torch.distributed`` ones.

Under ``srun`` with one task per process (``#SBATCH --ntasks-per-node=G``, no ``torchrun``), each task
gets ``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_NTASKS``, ``SLURM_NTASKS_PER_NODE`` and the job's node
list; :func:`slurm_env` turns them into ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR`` (the first node of the step's node list) and ``MASTER_PORT`` (from the job id, so every
task of a job agrees without talking). Variables already set win (a ``MASTER_PORT`` exported in the
sbatch script, or everything when ``srun`` starts ``torchrun``, which sets ``RANK`` itself).
docs/training.md ("Multi-node") has the sbatch example.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

logger = logging.getLogger(__name__)

_NODELIST_KEYS = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")


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

    Keys already in ``environ`` are not returned (they win)."""
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
