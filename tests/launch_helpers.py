"""Helpers for the tests that start several processes: a free port and the torchrun command line."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A free TCP port on 127.0.0.1: the ranks of one job meet there (port 0 cannot be shared)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun(nproc: int = 2, port: int | None = None) -> list[str]:
    """``python -m torch.distributed.run --nproc_per_node N --master_port P`` (a free port unless given)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(port or free_port()),
    ]


LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def subprocess_env() -> dict[str, str]:
    """The environment of a training subprocess: offline, CPU DeepSpeed, one intra-op thread, this
    checkout importable, and none of the launcher variables a test process may have inherited.

    DeepSpeed JIT-builds a CPU op at start-up: one build folder per virtualenv, so runs from other
    checkouts on the same machine neither rebuild it nor hold its lock for minutes."""
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    }
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    for k in LAUNCHER_VARS:
        env.pop(k, None)
    return env
