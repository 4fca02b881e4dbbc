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

Cluster filesystems without locks (Lustre mounted without ``-o flock``, NFS mounted ``nolock``) answer
``flock`` (and HDF5's own file locking) with ENOSYS / ENOLCK / EOPNOTSUPP: that is reported as what it
is (:class:`LockingUnsupportedError`, with the fix), never as "another process has it open". Where
``flock`` is host-local (Lustre ``-o localflock``, NFS ``local_lock=flock``), two hosts could both take
it: the holder refreshes its record every ``HEARTBEAT_S`` seconds, and a run on another host that
finds a record refreshed within ``STALE_S`` is refused even though it got the ``flock``.

The stage-2 run directory is locked the same way (``distill.resume``: ``<output_dir>/run.lock``).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"
# where flock is host-local, a holder on another host is recognised by its record's refresh time
HEARTBEAT_S = 30.0
STALE_S = 120.0
# errno values of a filesystem that does not implement file locks (Lustre without -o flock, NFS nolock)
NO_LOCKS = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP}
CACHE_ADVICE = (
    "Two runs never write one cache: wait for that run to finish (rerun this command then: it resumes or "
    "confirms), stop it, or write elsewhere (--out)."
)


class CacheBusyError(RuntimeError):
    """Another live process writes (or holds open) this cache (or, for stage 2, this run directory)."""


class LockingUnsupportedError(OSError):
    """The filesystem does not implement file locks (ENOSYS / ENOLCK / EOPNOTSUPP)."""


def no_locks_message(path: Path, e: BaseException) -> str:
    """What an ENOSYS / ENOLCK from a lock call means, and the fix."""
    return (
        f"file locks are not supported on the filesystem of {path} ({e}): this is not another process holding "
        "it. Typical causes: Lustre mounted without -o flock, NFS mounted with nolock. Fix: mount with -o flock "
        "(Lustre) or with locking (NFS), or write to a local disk; HDF5's own file locking also fails there: set "
        "HDF5_USE_FILE_LOCKING=FALSE (the toolkit's lock file <shard>.lock still keeps one writer per shard, "
        "once flock works)"
    )


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
    """``with ShardLock(shard):`` holds the shard's lock file for the block (see the module docs).

    ``what`` names the locked thing in messages (default: the shard's path) and ``advice`` says what to
    do when another run holds it (default: the cache's advice)."""

    def __init__(
        self, shard: Path, wait_s: float = 30.0, poll_s: float = 0.1, *, what: str = "", advice: str = ""
    ) -> None:
        self.shard, self.path, self.wait_s, self.poll_s = Path(shard), lock_path(Path(shard)), wait_s, poll_s
        self.what, self.advice = what or str(self.shard), advice or CACHE_ADVICE
        self.fd: int | None = None
        self.took_over: dict[str, Any] | None = None
        self.waited_s = 0.0
        self._record: dict[str, Any] = {}
        self._beat: threading.Thread | None = None
        self._stop = threading.Event()

    def _try(self) -> bool:
        assert self.fd is not None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            if e.errno in NO_LOCKS:
                os.close(self.fd)
                self.fd = None
                raise LockingUnsupportedError(e.errno, no_locks_message(self.path, e)) from e
            raise

    def acquire(self) -> ShardLock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        if not self._try():
            self._wait_for_dead_holder()
        self._refuse_fresh_holder_elsewhere()
        self._record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv)[:500],
        }
        self._write_record()
        self._stop.clear()
        self._beat = threading.Thread(
            target=self._heartbeat, name=f"lock-heartbeat {self.path.name}", daemon=True
        )
        self._beat.start()
        return self

    def _write_record(self) -> None:
        assert self.fd is not None
        data = json.dumps({**self._record, "heartbeat": time.time()}).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)
        os.fsync(self.fd)

    def _heartbeat(self) -> None:
        """Refresh the record every ``HEARTBEAT_S`` (a run on another host sees this holder as alive)."""
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if self.fd is None:
                    return
                self._write_record()
            except OSError as e:  # a full or unreachable disk: the lock itself stays held
                logger.warning("cannot refresh the lock record %s: %s", self.path, e)

    def _refuse_fresh_holder_elsewhere(self) -> None:
        """Got the ``flock``, but the record names a live-looking holder on another host: ``flock`` is
        host-local on this filesystem (Lustre ``localflock``, NFS ``local_lock``), so refuse."""
        holder = read_holder(self.path)
        here = socket.gethostname()
        beat = holder.get("heartbeat")
        if not holder or holder.get("host") in (None, here) or not isinstance(beat, (int, float)):
            return
        if holder.get("released"):
            return
        age = time.time() - float(beat)
        if age < STALE_S:
            self.release()
            raise CacheBusyError(
                f"{self.what} is held by a run on another host: {describe(holder)}, whose lock record was refreshed "
                f"{age:.0f} s ago; this host could take the file lock anyway, so file locks on this filesystem are "
                f"host-local (Lustre -o localflock, NFS local_lock). {self.advice} If that run is gone, wait "
                f"{STALE_S:.0f} s after its last refresh and rerun. Lock file: {self.path}"
            )

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
                f"{self.what} is being written by another run: {describe(holder)}{where}. {self.advice} "
                f"Lock file: {self.path}"
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
            f"{self.what} is still locked {self.wait_s:.0f} s after its run (pid {pid}) died, by processes "
            f"it left behind: {left or 'not visible from here'}. End them (kill {' '.join(map(str, left)) or 'PID'}) "
            "and rerun the same command: it resumes; the shard itself is not damaged by this."
        )

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None and self._beat is not threading.current_thread():
            self._beat.join(timeout=5)
        self._beat = None
        if self.fd is not None:
            try:
                if self._record:  # a clean exit: a run on another host need not wait for the record to age
                    data = json.dumps({**self._record, "released": time.time()}).encode()
                    os.ftruncate(self.fd, 0)
                    os.pwrite(self.fd, data, 0)
            except OSError:
                pass
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
    """HDF5's "unable to lock file" (errno 11: another process has the file open; errno 38/37/95: the
    filesystem has no locks): not damage."""
    s = str(e)
    return "unable to lock file" in s or (
        isinstance(e, OSError) and e.errno in (errno.EAGAIN, errno.EWOULDBLOCK, *NO_LOCKS)
    )


def _no_locks_error(e: BaseException) -> bool:
    """An HDF5 / OS lock error that says the filesystem implements no locks (ENOSYS, ENOLCK, EOPNOTSUPP)."""
    if isinstance(e, OSError) and e.errno in NO_LOCKS:
        return True
    s = str(e)
    return "unable to lock file" in s and any(f"errno = {n}" in s or os.strerror(n) in s for n in NO_LOCKS)


def busy_message(path: Path, e: BaseException) -> str:
    """Why HDF5 could not lock ``path``: another process has it open, or the filesystem has no locks."""
    if _no_locks_error(e):
        return no_locks_message(path, e)
    pids = processes_holding(path)
    who = f"processes {pids}" if pids else "another process (not visible from here: another user or machine)"
    return (
        f"{path} is open in {who} ({e}). The file is not damaged: HDF5 refuses to write a file another "
        "process has open. Close that process (a stage-2 run, a notebook, h5py, leftover workers of a "
        "killed run) and rerun the same command: it resumes."
    )
