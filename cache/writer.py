"""One shard writer: a background thread converts, quantises and writes batches so the forward never
waits on the disk (only a full queue makes it wait; the queue is bounded to bound memory)."""

from __future__ import annotations

import errno
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from .format import FEATURES, Layout, fit_reason, fsync_file, row_checksum, summarise_stats, write_skipped

logger = logging.getLogger(__name__)


def quantise_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-token int8: ``x (..., D)`` -> ``(q int8 (..., D), scale float32 (...))``, x ~ q * scale."""
    q, scale = quantise_int8_torch(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
    return q.numpy(), scale.numpy()


def quantise_int8_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantise_int8` on a tensor, on its device (run next to the forward, so only int8 bytes
    cross to the host). Bit-identical to the numpy definition: ``scale = max(absmax / 127, 1e-12)``
    in float32, ``q = clip(round_half_even(x / scale), -127, 127)``."""
    x = x.float()
    scale = (x.abs().amax(dim=-1) / 127.0).clamp_min_(1e-12)
    q = torch.div(x, scale.unsqueeze(-1)).round_().clamp_(-127, 127).to(torch.int8)
    return q, scale


def to_float16(x: np.ndarray) -> np.ndarray:
    """float -> float16 (round to nearest even, as numpy), vectorised by torch (~4x numpy's ``astype``)."""
    if x.dtype == np.float16:
        return np.ascontiguousarray(x)
    return torch.from_numpy(np.ascontiguousarray(x)).to(torch.float16).numpy()


def sample_stats(patch: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """Per-sample feature statistics ``(B, 2 + 2C, D)`` float32 from ``patch (B, [V,] N, D)`` and
    ``cls (B, [V,] C, D)``: mean and mean square over patch tokens (and views), then per global
    token mean and mean square (over views)."""
    p = patch.float().flatten(1, -2)
    c = cls.float()
    if c.ndim == 4:
        cm, csq = c.mean(1), c.square().mean(1)
    else:
        cm, csq = c, c.square()
    return torch.cat([p.mean(1, keepdim=True), p.square().mean(1, keepdim=True), cm, csq], dim=1)


def nonfinite_rows(arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[int, list[str]]]:
    """Which samples of a write block hold a value that is not finite, in the arrays as they would be
    stored (a float16 overflow is already inf there; an int8 array's ``<name>_scale`` carries its NaN/inf).

    ``arrays``: name -> ``(B, ...)`` (as :class:`WriteBatch`). Returns ``(bad (B,) bool, {row: [names]})``.
    Integer and boolean arrays are always finite."""
    sizes = {v.shape[0] for v in arrays.values() if getattr(v, "ndim", 0)}
    n = sizes.pop() if len(sizes) == 1 else 0
    bad = np.zeros(n, bool)
    which: dict[int, list[str]] = {}
    for name, arr in arrays.items():
        a = np.asarray(arr)
        if a.ndim == 0 or a.shape[0] != n or not np.issubdtype(a.dtype, np.floating):
            continue
        rows = ~np.isfinite(a.reshape(n, -1)).all(axis=1)
        for r in np.flatnonzero(rows).tolist():
            which.setdefault(r, []).append(name.removesuffix("_scale"))
        bad |= rows
    return bad, {r: sorted(set(v)) for r, v in which.items()}


def dequantise_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale[..., None].astype(np.float32)


@dataclass
class WriteBatch:
    """One write block: ``rows`` are shard-local row numbers (sorted) of the samples computed.

    ``arrays``: name -> ``(len(rows), ...)`` for ``patch`` ``(B, [V,] h*w, D)``, ``cls``,
    optional ``value_patch``, ``boxes``, ``flips``, ``text/<g>``, ``text_valid/<g>``, and ``_stats``
    ``(B, 2 + 2C, D)`` per-sample patch mean, patch mean square, cls mean, cls mean square
    (see :func:`sample_stats`).
    ``skipped``: (row, reason) of the block's samples that could not be used.
    Features may come as floats (the writer converts / quantises them) or already encoded in the
    storage dtype (float16; int8 together with ``<name>_scale``), which is what the extraction driver
    does next to the forward (on the GPU when there is one).
    """

    block: int
    rows: np.ndarray
    arrays: dict[str, np.ndarray]
    skipped: list[tuple[int, str]] = field(default_factory=list)


def _runs(rows: np.ndarray) -> list[tuple[int, int, int]]:
    """Split sorted rows into runs of consecutive numbers: (position in rows, first row, length)."""
    rows = np.asarray(rows, np.int64)
    if rows.size == 0:
        return []
    starts = np.concatenate([[0], np.flatnonzero(np.diff(rows) != 1) + 1])
    ends = np.append(starts[1:], rows.size)
    return [(int(a), int(rows[a]), int(b - a)) for a, b in zip(starts, ends)]


def _uncached(f: h5py.File, name: str) -> h5py.Dataset:
    """Open ``name`` with no chunk cache: whole one-sample chunks then go from the caller's buffer
    straight to the file (one pwrite per chunk) instead of being copied through HDF5's 1 MiB chunk
    cache and evicted later (measured ~1.6x faster on page-cache writes of 75 KB chunks)."""
    dapl = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
    dapl.set_chunk_cache(0, 0, 1.0)
    return h5py.Dataset(h5py.h5d.open(f.id, name.encode(), dapl=dapl))


class CacheWriteError(RuntimeError):
    """The writer thread failed; ``cause`` is the original exception (e.g. an ``OSError`` ENOSPC)."""

    def __init__(self, path: Path, cause: BaseException) -> None:
        super().__init__(f"the cache writer for {path} failed: {cause}")
        self.path, self.cause = path, cause


def is_disk_full(e: BaseException | None) -> bool:
    """``e`` (or what caused it) is a full disk (ENOSPC / EDQUOT), also as reported through HDF5."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e) or "errno = 28," in str(e):
            return True
        e = getattr(e, "cause", None) or e.__cause__
    return False


class ShardWriter:
    """Writes :class:`WriteBatch` es into an existing shard file from a background thread.

    Order of durability, at most every ``flush_interval_s`` seconds: the feature rows, their
    checksums and the block statistics are written, flushed and ``fsync`` ed; only then are their
    ``done`` flags written, flushed and ``fsync`` ed. ``done`` therefore never claims a row whose
    bytes are not on the disk, also after a machine crash (``fsync=False`` keeps the order but only up
    to the OS page cache: safe against a killed process, not a lost machine). ``finalize`` marks the
    shard complete, last, only when every row is done.
    """

    def __init__(
        self,
        path: Path,
        layout: Layout,
        queue_size: int = 4,
        flush_interval_s: float = 2.0,
        fsync: bool = True,
    ) -> None:
        self.path = Path(path)
        self.layout = layout
        self.flush_interval_s = flush_interval_s
        self.fsync = fsync
        self.fsync_seconds = 0.0
        self.forward_seconds = 0.0  # the producer's teacher time, kept here for the summary
        self._checked = layout.checked()
        self.file = h5py.File(self.path, "r+")
        self.done = self.file["done"][()].astype(bool)
        self._dsets: dict[str, h5py.Dataset] = {}
        self.queue: queue.Queue[WriteBatch | None] = queue.Queue(maxsize=queue_size)
        self.bytes_written = 0
        self.write_seconds = 0.0
        self.submit_wait_seconds = 0.0
        self._pending_done: list[np.ndarray] = []
        self._pending_stats: dict[int, tuple[np.ndarray, int]] = {}
        self._last_flush = time.monotonic()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"cache-writer-{self.path.name}", daemon=True)
        self._thread.start()

    # ---- main thread -------------------------------------------------------------------------
    def submit(self, batch: WriteBatch) -> None:
        if self._error is not None:
            raise CacheWriteError(self.path, self._error) from self._error
        t0 = time.perf_counter()
        while True:
            try:
                self.queue.put(batch, timeout=1.0)
                break
            except queue.Full:
                if self._error is not None or not self._thread.is_alive():
                    raise CacheWriteError(self.path, self._error) from self._error
        self.submit_wait_seconds += time.perf_counter() - t0

    def close(self) -> None:
        """Drain the queue, flush, mark written rows done; re-raise a writer error."""
        if self._thread.is_alive():
            self.queue.put(None)
            self._thread.join()
        if self._error is None:
            try:
                self._flush_and_mark()
            except Exception as e:  # noqa: BLE001 - e.g. the disk filled up on the last flush
                self._error = e
        err = self._error
        if err is not None:
            try:  # rows written but not flagged done are redone by the next run
                self.file.close()
            except Exception as e2:  # noqa: BLE001 - the first error is the one to report
                logger.warning("closing %s after a writer error also failed: %s", self.path, e2)
            raise CacheWriteError(self.path, err) from err

    def finalize(self, keys: list[str], start: int) -> dict[str, Any]:
        """After :meth:`close`: if every row is done, write statistics and the skip list, mark complete."""
        f = self.file
        done = f["done"][()].astype(bool)
        reasons = f["skip_reason"][()]
        skipped = [
            (start + int(i), keys[i], reasons[i].decode("utf-8", "replace"))
            for i in np.flatnonzero(reasons != b"")
        ]
        summary = {"rows": int(done.size), "done": int(done.sum()), "skipped": skipped, "complete": False}
        if done.all():
            stats = summarise_stats(f["block_stats"][()], f["block_count"][()], self.layout.num_global_tokens)
            write_skipped(f, skipped)
            for k, v in stats.items():
                f.attrs[k] = v
            f.attrs["num_done"] = int(done.sum() - len(skipped))
            f.attrs["num_skipped"] = len(skipped)
            valid = reasons == b""
            missing = {}
            for g in self.layout.granularities:
                missing[g] = int((~f[f"text_valid/{g}"][()].astype(bool) & valid).sum())
            f.attrs["captions_missing"] = json.dumps(missing)
            summary["captions_missing"] = missing
            f.attrs["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            self._sync()
            f.attrs["complete"] = True  # last: only after every sample is written and on the disk
            self._sync()
            summary["complete"] = True
        f.close()
        return summary

    # ---- writer thread ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                item = self.queue.get()
                if item is None:
                    return
                t0 = time.perf_counter()
                self._write(item)
                if time.monotonic() - self._last_flush >= self.flush_interval_s:
                    self._flush_and_mark()
                self.write_seconds += time.perf_counter() - t0
        except BaseException as e:  # noqa: BLE001 - reported to the main thread
            logger.exception("cache writer failed")
            self._error = e
            while True:  # unblock a producer waiting on a full queue
                try:
                    if self.queue.get_nowait() is None:
                        return
                except queue.Empty:
                    return

    def _ds(self, name: str) -> h5py.Dataset:
        ds = self._dsets.get(name)
        if ds is None:
            big = name in FEATURES or name.endswith("_scale")  # one-sample chunks
            ds = self._dsets[name] = _uncached(self.file, name) if big else self.file[name]
        return ds

    def _encode(self, b: WriteBatch) -> dict[str, np.ndarray]:
        """The block's arrays in their on-disk dtype, C-contiguous (no-op for pre-encoded arrays)."""
        out: dict[str, np.ndarray] = {}
        int8 = self.layout.storage_dtype == "int8"
        for name, arr in b.arrays.items():
            if name == "_stats" or name in out:
                continue
            dt = self._ds(name).dtype
            if name in FEATURES and int8 and arr.dtype != np.int8:
                out[name], out[name + "_scale"] = quantise_int8(arr)
            elif dt == np.float16:
                out[name] = to_float16(arr)
            else:
                out[name] = np.ascontiguousarray(arr, dtype=dt)
        return out

    def _write_rows(self, name: str, arr: np.ndarray, row: int) -> None:
        """``arr (n, ...)`` (C-contiguous, on-disk dtype) into rows ``[row, row + n)``: one H5Dwrite,
        straight through the low-level API (h5py's high-level selection code cost more than the write)."""
        ds = self._ds(name)
        fspace = ds.id.get_space()
        fspace.select_hyperslab((row,) + (0,) * (arr.ndim - 1), arr.shape)
        ds.id.write(h5py.h5s.create_simple(arr.shape), fspace, arr)

    def _write(self, b: WriteBatch) -> None:
        L = self.layout
        C = L.num_global_tokens
        stats = np.zeros((2 + 2 * C, L.dim), np.float64)
        if len(b.rows):
            # per-sample statistics (B, 2 + 2C, D), computed next to the forward; summed here in float64
            stats[:] = b.arrays["_stats"].astype(np.float64).sum(0)
            out = self._encode(b)
            if sorted(out) != sorted(self._checked):
                raise ValueError(
                    f"write block {b.block} has arrays {sorted(out)}, the shard stores {sorted(self._checked)}"
                )
            out["checksum"] = np.array(
                [row_checksum(out, i, self._checked) for i in range(len(b.rows))], np.uint32
            )
            runs = _runs(b.rows)
            for name, arr in out.items():
                for pos, row, n in runs:  # one HDF5 write per dataset per run (a whole block when no skips)
                    self._write_rows(name, arr[pos : pos + n], row)
                    if name != "checksum":  # bookkeeping, like done: not counted as feature bytes
                        self.bytes_written += arr[pos : pos + n].nbytes
        for row, reason in b.skipped:
            self._ds("skip_reason")[row] = fit_reason(reason)
        # block statistics are written with the next flush, before that flush and the done flags
        self._pending_stats[b.block] = (stats, len(b.rows))
        rows = np.sort(
            np.concatenate([np.asarray(b.rows, np.int64), np.array([r for r, _ in b.skipped], np.int64)])
        )
        self._pending_done.append(rows)

    def _write_block_stats(self) -> None:
        blocks = np.array(sorted(self._pending_stats), np.int64)
        for pos, block, n in _runs(blocks):
            ks = blocks[pos : pos + n].tolist()
            self._write_rows("block_stats", np.stack([self._pending_stats[k][0] for k in ks]), block)
            self._write_rows(
                "block_count", np.array([self._pending_stats[k][1] for k in ks], np.int64), block
            )
        self._pending_stats = {}

    def _flush_and_mark(self) -> None:
        if not self._pending_done:
            return
        self._write_block_stats()
        self._sync()  # feature bytes, checksums and block statistics reach the disk before their done flags
        rows = np.unique(np.concatenate(self._pending_done))
        for _, row, n in _runs(rows):
            self._write_rows("done", np.ones(n, np.bool_), row)
        self.done[rows] = True
        self._sync()
        self._pending_done = []
        self._last_flush = time.monotonic()

    def _sync(self) -> None:
        if not self.fsync:
            self.file.flush()
            return
        t0 = time.perf_counter()
        fsync_file(self.file)
        self.fsync_seconds += time.perf_counter() - t0
