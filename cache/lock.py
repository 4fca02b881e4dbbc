"""One writer per shard: a lock file next to it (``<shard>.lock``) held with ``fcntl.flock``.

The lock file records who holds it (pid, host, start time, command line). The kernel releases a
``flock`` when the last descriptor of it closes, so a run killed with ``kill -9`` frees its lock at
once, unless processes it forked live on holding the descriptor (the extraction starts its
DataLoader workers with ``forkserver``, so they never do). A second run on the same cache:

- holder alive (same host) or on another host: refused, naming its pid, host and start time;
- holder dead (same host) but the lock still held by leftovers of it: waits up to ``wait_s`` for
  them to exit, says so, then takes over; still held after that: refused, naming the processes.

Two runs therefore never both write a shard. ``flock`` on NFS is emulated with POSIX locks by Linux
(since 2.6.12), which also hold across hosts.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"


class CacheBusyError(RuntimeError):
    """Another live process writes (or holds open) this cache."""


def lock_path(shard: Path) -> Path:
    return shard.with_name(shard.name + LOCK_SUFFIX)


def read_holder(path: Path) -> dict[str, Any]:
    """The JSON record in a lock file (``{}`` when empty or unreadable)."""
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def processes_holding(path: Path) -> list[int]:
    """Pids (this user's, Linux ``/proc``) with ``path`` open; empty where that cannot be seen."""
    target = os.path.realpath(path)
    found = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            for fd in (d / "fd").iterdir():
                if os.path.realpath(fd) == target:
                    found.append(int(d.name))
                    break
        except OSError:
            continue
    return sorted(p for p in found if p != os.getpid())


def describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "an unknown process (the lock file records none)"
    return (
        f"pid {holder.get('pid')} on host {holder.get('host')} (started {holder.get('started')}: "
        f"{holder.get('command', '?')})"
    )


class ShardLock:
    """``with ShardLock(shard):`` holds the shard's lock file for the block (see the module docs)."""

    def __init__(self, shard: Path, wait_s: float = 30.0, poll_s: float = 0.1) -> None:
        self.shard, self.path, self.wait_s, self.poll_s = Path(shard), lock_path(Path(shard)), wait_s, poll_s
        self.fd: int | None = None
        self.took_over: dict[str, Any] | None = None
        self.waited_s = 0.0

    def _try(self) -> bool:
        assert self.fd is not None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            raise

    def acquire(self) -> ShardLock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        if not self._try():
            self._wait_for_dead_holder()
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv)[:500],
        }
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(record).encode(), 0)
        os.fsync(self.fd)
        return self

    def _wait_for_dead_holder(self) -> None:
        holder = read_holder(self.path)
        here = socket.gethostname()
        pid = int(holder.get("pid", -1)) if holder else -1
        if not holder or holder.get("host") != here or pid_alive(pid):
            self.release()
            where = (
                ""
                if holder.get("host", here) == here
                else " (another machine: its liveness cannot be checked from here)"
            )
            raise CacheBusyError(
                f"{self.shard} is being written by another run: {describe(holder)}{where}. Two runs never "
                f"write one cache: wait for that run to finish (rerun this command then: it resumes or "
                f"confirms), stop it, or write elsewhere (--out). Lock file: {self.path}"
            )
        msg = (
            f"{self.shard.name}: the run that held it ({describe(holder)}) is dead, but processes it "
            f"left behind still hold its lock; waiting up to {self.wait_s:.0f} s for them to exit"
        )
        logger.warning(msg)
        print(msg, file=sys.stderr, flush=True)
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.wait_s:
            time.sleep(self.poll_s)
            if self._try():
                self.waited_s = time.monotonic() - t0
                self.took_over = holder
                msg = f"{self.shard.name}: took over from dead run pid {pid} after {self.waited_s:.1f} s"
                logger.warning(msg)
                print(msg, file=sys.stderr, flush=True)
                return
        left = processes_holding(self.path)
        self.release()
        raise CacheBusyError(
            f"{self.shard} is still locked {self.wait_s:.0f} s after its run (pid {pid}) died, by processes "
            f"it left behind: {left or 'not visible from here'}. End them (kill {' '.join(map(str, left)) or 'PID'}) "
            "and rerun the same command: it resumes; the shard itself is not damaged by this."
        )

    def release(self) -> None:
        if self.fd is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = None

    def __enter__(self) -> ShardLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def live_writer(shard: Path) -> dict[str, Any] | None:
    """The record of the run writing ``shard`` now, or None when no process holds its lock."""
    path = lock_path(shard)
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return read_holder(path) or {"pid": "?", "host": "?"}
            raise
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def is_hdf5_lock_error(e: BaseException) -> bool:
    """HDF5's "unable to lock file" (errno 11): another process has the file open, not damage."""
    s = str(e)
    return "unable to lock file" in s or (
        isinstance(e, OSError) and e.errno in (errno.EAGAIN, errno.EWOULDBLOCK)
    )


def busy_message(path: Path, e: BaseException) -> str:
    pids = processes_holding(path)
    who = f"processes {pids}" if pids else "another process (not visible from here: another user or machine)"
    return (
        f"{path} is open in {who} ({e}). The file is not damaged: HDF5 refuses to write a file another "
        "process has open. Close that process (a stage-2 run, a notebook, h5py, leftover workers of a "
        "killed run) and rerun the same command: it resumes."
    )
