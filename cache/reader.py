"""Reading a feature cache: ``open_cache(path, expect=None) -> FeatureCache`` (a torch Dataset).

The h5py file is opened lazily in each process that reads (h5py handles cannot be pickled), so a
``FeatureCache`` works in DataLoader workers under both fork and spawn.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from .codec import decode
from .format import FEATURES, INDEX_NAME, decode_attrs, read_skipped
from .reduce import Reduction
from .spec import CacheSpec


def _resolve(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir():
        idx = p / INDEX_NAME
        if idx.exists():
            return idx
        shards = sorted(p.glob("shard-*-of-*.h5"))
        if len(shards) == 1 and shards[0].name.endswith("-of-00001.h5"):
            return shards[0]
        if shards:
            raise ValueError(
                f"cache {p} is incomplete: {INDEX_NAME} is missing ({len(shards)} shard file(s) present); "
                f"rerun the extraction command to finish it{_writer_note(shards)}"
            )
        raise ValueError(
            f"{p} holds no feature cache ({INDEX_NAME} or shard-*.h5); run tipsdistill-cache first"
        )
    if not p.exists():
        raise ValueError(f"feature cache {p} does not exist; run tipsdistill-cache first")
    return p


def _writer_note(shards: list[Path]) -> str:
    """``"; it is being written now by pid P on host H"`` when a run holds a shard's lock, else ``""``."""
    from .lock import describe, live_writer

    for sh in shards:
        holder = live_writer(sh)
        if holder is not None:
            return f"; it is being written now by {describe(holder)}: wait for that run to finish"
    return ""


def _open_for_reading(path: Path) -> h5py.File:
    """``h5py.File(path, "r")``; a file a writer holds (HDF5 errno 11) is reported as incomplete, not damaged."""
    try:
        return h5py.File(path, "r")
    except OSError as e:
        from .lock import is_hdf5_lock_error

        if not is_hdf5_lock_error(e):
            raise
        raise ValueError(
            f"cache {path} is incomplete: a process has it open for writing ({e}){_writer_note([path])}. "
            "It is not damaged; stage 2 reads only complete caches"
        ) from e


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple, np.ndarray)) or isinstance(b, (list, tuple, np.ndarray)):
        try:
            return np.array_equal(np.asarray(a), np.asarray(b))
        except Exception:  # noqa: BLE001
            return False
    return a == b


class _Shard:
    """One shard's rows ``[start, stop)`` of the cache, read straight from the shard file.

    Datasets are opened once (handles cached) with no HDF5 chunk cache: a read of whole one-sample
    chunks then goes from the file into the caller's array, with no copy through the cache."""

    def __init__(self, path: Path, start: int, stop: int, offset: int) -> None:
        self.path, self.start, self.stop, self.offset = path, start, stop, offset
        self.file = h5py.File(path, "r")
        self._dsets: dict[str, h5py.Dataset] = {}

    def ds(self, name: str) -> h5py.Dataset:
        d = self._dsets.get(name)
        if d is None:
            dapl = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
            dapl.set_chunk_cache(0, 0, 1.0)
            d = self._dsets[name] = h5py.Dataset(h5py.h5d.open(self.file.id, name.encode(), dapl=dapl))
        return d

    def read(self, name: str, rows: np.ndarray, out: np.ndarray) -> None:
        """Rows (sorted, unique, shard-local) of ``name`` into ``out`` (``(len(rows), ...)``, C order):
        one HDF5 read per call, the file selection being the union of the runs of consecutive rows."""
        ds = self.ds(name)
        tail = ds.shape[1:]
        fspace = ds.id.get_space()
        brk = np.flatnonzero(np.diff(rows) != 1) + 1
        a0 = np.concatenate([[0], brk])
        a1 = np.append(brk, rows.size)
        op = h5py.h5s.SELECT_SET
        for a, b in zip(a0.tolist(), a1.tolist()):
            fspace.select_hyperslab((int(rows[a]),) + (0,) * len(tail), (b - a,) + tail, op=op)
            op = h5py.h5s.SELECT_OR
        mspace = h5py.h5s.create_simple(out.shape)
        ds.id.read(mspace, fspace, out, h5py.h5t.py_create(out.dtype))

    def close(self) -> None:
        self.file.close()


class FeatureCache(Dataset):
    """The cached teacher features, one item per usable sample (skipped images are left out).

    ``spec`` (:class:`cache.spec.CacheSpec`) holds its facts (dim, grid, global tokens, views,
    granularities, storage), worked out once from ``meta``.

    Item dict: ``index`` (source dataset index), ``key``, ``patch`` float32 ``(h, w, D)`` (or
    ``(V, h, w, D)`` with ``boxes (V, 4)`` and ``flips (V,)`` when several views are stored),
    ``cls`` ``(C, D)`` (or ``(V, C, D)``), optional ``value_patch``, and when captions were embedded
    ``text`` dict granularity -> ``(Dt,)`` with ``text_valid`` dict granularity -> bool.

    Reading: the index's virtual datasets are resolved to the shard files once (per process); each
    read goes to the shard datasets directly, into preallocated arrays. ``__getitems__`` (used by the
    torch DataLoader for a whole batch) reads every dataset with one HDF5 call per shard, so a batch
    of consecutive samples costs a handful of calls instead of several per sample.
    """

    def __init__(
        self, path: str | Path, expect: dict[str, Any] | None = None, allow_incomplete: bool = False
    ) -> None:
        self.path = _resolve(path)
        with _open_for_reading(self.path) as f:
            self.meta: dict[str, Any] = decode_attrs(f.attrs)
            self.spec = CacheSpec.from_meta(self.meta, str(self.path))
            done = f["done"][()].astype(bool)
            ok = f["skip_reason"][()] == b""
            self._keys = [k.decode() if isinstance(k, bytes) else k for k in f["keys"][()]]
            self.skipped: list[tuple[int, str, str]] = read_skipped(f)
            self._names = [n for n in FEATURES if n in f]
            self._sources = _sources(self.path, f)
            self._spec = {n: (f[n].shape[1:], f[n].dtype) for n in self._datasets(f)}
            # reduced-dimension cache: patch tokens stored as PCA coefficients, decoded on reading
            self.reduction: Reduction | None = Reduction.read_h5(f, self.meta)
        # converted to new float32 tensors after reading: their raw arrays can be reused staging buffers
        self._staged = {
            n for n in self._spec if n in FEATURES or n.endswith("_scale") or n.startswith("text/")
        }
        if not self.meta.get("complete", False) and not allow_incomplete:
            raise ValueError(
                f"cache {self.path} is incomplete ({int(done.sum())} of {done.size} samples written); rerun the "
                "extraction command to finish it (or pass allow_incomplete=True to read the finished samples)"
                + _writer_note([self.path])
            )
        self.valid = np.flatnonzero(done & ok)
        self.grid: tuple[int, int] = self.spec.grid
        self.num_views = self.spec.num_views
        self.granularities: list[str] = list(self.spec.granularities)
        self.int8 = self.spec.storage_dtype == "int8"
        self._shards: list[_Shard] | None = None
        self._pid = -1
        if expect:
            self.check(expect)

    def _datasets(self, f: h5py.File) -> list[str]:
        names = list(self._names)
        if self.spec.storage_dtype == "int8":
            names += [n + "_scale" for n in self._names]
        if self.spec.has_views:
            names += ["boxes", "flips"]
        for g in self.spec.granularities:
            names += [f"text/{g}", f"text_valid/{g}"]
        return [n for n in names if n in f]

    def check(self, expect: dict[str, Any]) -> None:
        """Raise a ValueError naming both values when the cache's metadata differs from ``expect``."""
        for k, want in expect.items():
            if k not in self.meta:
                raise ValueError(
                    f"cache {self.path} has no metadata field {k!r} (fields: {sorted(self.meta)})"
                )
            have = self.meta[k]
            if not _same(have, want):
                raise ValueError(f"cache {self.path}: {k} is {_show(have)} but {_show(want)} was expected")

    def keys(self) -> list[str]:
        return [self._keys[i] for i in self.valid]

    def __len__(self) -> int:
        return len(self.valid)

    def _open(self) -> list[_Shard]:
        """The shard files, opened once per process (h5py handles do not survive fork/pickle)."""
        if self._shards is None or self._pid != os.getpid():
            self._shards = [_Shard(p, a, b, off) for p, a, b, off in self._sources]
            self._pid = os.getpid()
        return self._shards

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_shards"], state["_pid"] = None, -1
        state.pop("_bufs", None)
        return state

    def _buffer(self, name: str, n: int) -> np.ndarray:
        """A per-thread staging array ``(n, ...)`` for ``name``, reused across calls (no fresh pages, no
        page faults per batch); only for datasets whose values are copied out (converted) afterwards."""
        bufs = self.__dict__.get("_bufs")
        if bufs is None:
            bufs = self._bufs = threading.local()
        d = bufs.__dict__
        shape, dt = self._spec[name]
        b = d.get(name)
        if b is None or len(b) < n:
            b = d[name] = np.empty((max(n, 1), *shape), dt)
        return b[:n]

    def _read(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Every per-sample dataset at cache rows ``rows`` (sorted, unique) as ``(len(rows), ...)`` arrays
        (features, scales and text embeddings in reused staging arrays: convert them before the next call)."""
        n = len(rows)
        out = {
            name: self._buffer(name, n) if name in self._staged else np.empty((n, *shape), dt)
            for name, (shape, dt) in self._spec.items()
        }
        for sh in self._open():
            lo, hi = np.searchsorted(rows, [sh.start, sh.stop])
            if lo == hi:
                continue
            local = rows[lo:hi] - sh.offset
            for n, arr in out.items():
                if lo == 0 and hi == len(rows):
                    sh.read(n, local, arr)
                else:
                    part = np.empty((hi - lo, *arr.shape[1:]), arr.dtype)
                    sh.read(n, local, part)
                    arr[lo:hi] = part
        return out

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        """Items ``indices`` (any order, repeats allowed), read together: one HDF5 call per dataset
        per shard touched. The items' tensors are views of per-batch tensors."""
        n = len(self)
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        bad = (idx < -n) | (idx >= n)
        if bad.any():
            raise IndexError(f"index {int(idx[bad][0])} out of range for a cache of {n} samples")
        js = self.valid[np.where(idx < 0, idx + n, idx)]
        rows, inv = np.unique(js, return_inverse=True)
        raw = self._read(rows)
        same = len(rows) == len(js) and bool((rows == js).all())
        take = (lambda a: a) if same else (lambda a: a[inv])  # back to the order asked for
        feats: dict[str, torch.Tensor] = {}
        red = self.reduction.bases if self.reduction is not None else {}
        for name in self._names:
            mean, basis = red.get(name, (None, None))
            x = decode(raw[name], raw[name + "_scale"] if self.int8 else None, basis=basis, mean=mean)
            if name != "cls":  # (B, ..., h*w, D) -> (B, ..., h, w, D)
                x = x.reshape(x.shape[:-2] + self.grid + x.shape[-1:])
            feats[name] = take(x)
        if self.num_views > 1:
            boxes = take(torch.from_numpy(raw["boxes"]))
            flips = take(torch.from_numpy(raw["flips"].astype(bool)))
        if self.granularities:
            text = {g: take(torch.from_numpy(raw[f"text/{g}"]).float()) for g in self.granularities}
            valid = {g: take(raw[f"text_valid/{g}"].astype(bool)).tolist() for g in self.granularities}
        items = []
        for k, j in enumerate(js.tolist()):
            item: dict[str, Any] = {"index": j, "key": self._keys[j]}
            for name in self._names:
                item[name] = feats[name][k]
            if self.num_views > 1:
                item["boxes"], item["flips"] = boxes[k], flips[k]
            if self.granularities:
                item["text"] = {g: text[g][k] for g in self.granularities}
                item["text_valid"] = {g: valid[g][k] for g in self.granularities}
            items.append(item)
        return items

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a cache of {len(self)} samples")
        return self.__getitems__([i])[0]

    def close(self) -> None:
        if self._shards is not None:
            for sh in self._shards:
                sh.close()
            self._shards = None

    def __repr__(self) -> str:
        sp = self.spec
        return (
            f"FeatureCache({self.path}, {len(self)} samples, grid {sp.grid}, dim {sp.dim}, "
            f"{sp.num_global_tokens} global tokens, {sp.storage_dtype}, views {sp.num_views})"
        )


def _sources(path: Path, f: h5py.File) -> list[tuple[Path, int, int, int]]:
    """``(file, first cache row, stop row, row offset of the file)`` of every file holding rows of ``f``.

    An index file's virtual ``patch`` dataset is resolved to its shards (all per-sample datasets share
    one mapping, written by :func:`cache.format.build_index`); a shard opened directly is its own source.
    """
    ds = f["patch"]
    if not ds.is_virtual:
        return [(path, 0, int(ds.shape[0]), 0)]
    out = []
    for m in ds.virtual_sources():
        lo, hi = m.vspace.get_select_bounds()
        src = Path(m.file_name)
        if not src.is_absolute():
            src = path.parent / src
        if not src.exists():
            raise ValueError(
                f"cache index {path} points at {src.name}, which is missing (samples {int(lo[0])}..{int(hi[0])}); "
                "rerun the extraction command: it redoes that shard and rebuilds the index"
            )
        out.append((src, int(lo[0]), int(hi[0]) + 1, int(lo[0])))
    return sorted(out, key=lambda s: s[1])


def _show(v: Any) -> str:
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if isinstance(v, tuple):
        v = list(v)
    return repr(v)


def open_cache(
    path: str | Path, expect: dict[str, Any] | None = None, allow_incomplete: bool = False
) -> FeatureCache:
    """Open a cache directory (its ``index.h5``) or one ``.h5`` file; check ``expect`` against its metadata."""
    return FeatureCache(path, expect=expect, allow_incomplete=allow_incomplete)
