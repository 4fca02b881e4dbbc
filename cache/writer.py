"""One shard writer: a background thread converts, quantises and writes batches so the forward never
waits on the disk (only a full queue makes it wait; the queue is bounded to bound memory)."""

from __future__ import annotations

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

from .format import FEATURES, REASON_BYTES, Layout, summarise_stats, write_skipped

logger = logging.getLogger(__name__)


def quantise_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-token int8: ``x (..., D)`` -> ``(q int8 (..., D), scale float32 (...))``, x ~ q * scale."""
    scale = np.abs(x).max(axis=-1) / 127.0
    scale = np.maximum(scale, 1e-12).astype(np.float32)
    q = np.rint(x / scale[..., None])
    return np.clip(q, -127, 127).astype(np.int8), scale


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
    """

    block: int
    rows: np.ndarray
    arrays: dict[str, np.ndarray]
    skipped: list[tuple[int, str]] = field(default_factory=list)


def _runs(rows: np.ndarray) -> list[tuple[int, int, int]]:
    """Split sorted rows into runs of consecutive numbers: (position in rows, first row, length)."""
    out, i = [], 0
    while i < len(rows):
        j = i
        while j + 1 < len(rows) and rows[j + 1] == rows[j] + 1:
            j += 1
        out.append((i, int(rows[i]), j - i + 1))
        i = j + 1
    return out


class ShardWriter:
    """Writes :class:`WriteBatch` es into an existing shard file from a background thread.

    Order of durability: feature rows are written and flushed before their ``done`` flags are set
    and flushed, at most every ``flush_interval_s`` seconds; ``done`` therefore never claims a row
    whose bytes are not in the file. ``finalize`` marks the shard complete only when every row is done.
    """

    def __init__(
        self, path: Path, layout: Layout, queue_size: int = 4, flush_interval_s: float = 2.0
    ) -> None:
        self.path = Path(path)
        self.layout = layout
        self.flush_interval_s = flush_interval_s
        self.file = h5py.File(self.path, "r+")
        self.done = self.file["done"][()].astype(bool)
        self._dsets: dict[str, h5py.Dataset] = {}
        self.queue: queue.Queue[WriteBatch | None] = queue.Queue(maxsize=queue_size)
        self.bytes_written = 0
        self.write_seconds = 0.0
        self.submit_wait_seconds = 0.0
        self._pending_done: list[np.ndarray] = []
        self._last_flush = time.monotonic()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"cache-writer-{self.path.name}", daemon=True)
        self._thread.start()

    # ---- main thread -------------------------------------------------------------------------
    def submit(self, batch: WriteBatch) -> None:
        if self._error is not None:
            raise RuntimeError(f"the cache writer for {self.path} failed: {self._error}") from self._error
        t0 = time.perf_counter()
        while True:
            try:
                self.queue.put(batch, timeout=1.0)
                break
            except queue.Full:
                if self._error is not None or not self._thread.is_alive():
                    raise RuntimeError(
                        f"the cache writer for {self.path} failed: {self._error}"
                    ) from self._error
        self.submit_wait_seconds += time.perf_counter() - t0

    def close(self) -> None:
        """Drain the queue, flush, mark written rows done; re-raise a writer error."""
        if self._thread.is_alive():
            self.queue.put(None)
            self._thread.join()
        if self._error is None:
            self._flush_and_mark()
        err = self._error
        if err is not None:
            self.file.close()
            raise RuntimeError(f"the cache writer for {self.path} failed: {err}") from err

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
            f.flush()
            f.attrs["complete"] = True  # last: only after every sample is written and flushed
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
        if name not in self._dsets:
            self._dsets[name] = self.file[name]
        return self._dsets[name]

    def _write(self, b: WriteBatch) -> None:
        f, L = self._ds, self.layout
        C = L.num_global_tokens
        stats = np.zeros((2 + 2 * C, L.dim), np.float64)
        if len(b.rows):
            # per-sample statistics (B, 2 + 2C, D), computed next to the forward; summed here in float64
            stats[:] = b.arrays["_stats"].astype(np.float64).sum(0)
            out: dict[str, np.ndarray] = {}
            for name, arr in b.arrays.items():
                if name == "_stats":
                    continue
                if name in FEATURES and L.storage_dtype == "int8":
                    out[name], out[name + "_scale"] = quantise_int8(arr.astype(np.float32, copy=False))
                else:
                    out[name] = np.ascontiguousarray(arr, dtype=f(name).dtype)
            for pos, row, n in _runs(b.rows):
                for name, arr in out.items():
                    f(name)[row : row + n] = arr[pos : pos + n]
                    self.bytes_written += arr[pos : pos + n].nbytes
        for row, reason in b.skipped:
            f("skip_reason")[row] = reason.encode("utf-8", "replace")[:REASON_BYTES]
        f("block_stats")[b.block] = stats
        f("block_count")[b.block] = len(b.rows)
        rows = np.sort(
            np.concatenate([np.asarray(b.rows, np.int64), np.array([r for r, _ in b.skipped], np.int64)])
        )
        self._pending_done.append(rows)

    def _flush_and_mark(self) -> None:
        if not self._pending_done:
            return
        self.file.flush()  # feature bytes reach the file before their done flags
        rows = np.unique(np.concatenate(self._pending_done))
        for _, row, n in _runs(rows):
            self._ds("done")[row : row + n] = True
        self.done[rows] = True
        self.file.flush()
        self._pending_done = []
        self._last_flush = time.monotonic()
