"""Reading a feature cache: ``open_cache(path, expect=None) -> FeatureCache`` (a torch Dataset).

The h5py file is opened lazily in each process that reads (h5py handles cannot be pickled), so a
``FeatureCache`` works in DataLoader workers under both fork and spawn.

One reading path, :meth:`FeatureCache.read_batch`: a batch of rows in the storage dtype (float16, or
  int8 + ``*_scale``) straight into one preallocated (pinned with CUDA) buffer, :class:`FeatureBatch`.
  Each row's byte offset is looked up once per shard and dataset (contiguous datasets:
  ``get_offset``; chunked ones: ``chunk_iter``), checked once against an h5py read, and the rows are
  read with ``os.preadv`` from a small thread pool, outside the HDF5 library and its global lock.
  A filtered (compressed) or otherwise unmappable dataset falls back to h5py reads (logged once).
Stage 2 reads these rows (``distill.feeder``); ``cache[i]`` / ``cache.__getitems__`` return them decoded to
float32 item dicts (inspection, evaluation).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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

logger = logging.getLogger(__name__)

IOV_MAX = 1024  # buffers per preadv call (POSIX minimum of IOV_MAX)
ALIGN = 64  # byte alignment of each field inside a FeatureBatch buffer
PARALLEL_BYTES = 4 << 20  # read_batch splits its reads over threads only with >= this many bytes per thread


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
        self._offsets: dict[str, tuple[np.ndarray | None, str]] = {}
        self._fd: int | None = None

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

    def row_offsets(self, name: str) -> tuple[np.ndarray | None, str]:
        """Byte offset in the shard file of every row of dataset ``name`` (``(rows,)`` int64), looked up
        once, or ``(None, why)`` when the rows cannot be read as raw bytes (then h5py reads them).

        Contiguous datasets: ``get_offset() + row * row_bytes``; chunked ones whose chunks hold whole
        rows: the chunk's ``byte_offset`` (``chunk_iter``) plus the row's place in it. Checked against an
        h5py read of one row before it is trusted."""
        got = self._offsets.get(name)
        if got is not None:
            return got
        ds = self.ds(name)
        got = self._offsets[name] = _map_rows(ds, self.path)
        offs, _why = got
        if offs is not None and len(offs):
            r = len(offs) // 2
            want = np.empty(ds.shape[1:], ds.dtype)
            ds.read_direct(want, np.s_[r])
            have = os.pread(self.fd(), want.nbytes, int(offs[r]))
            if have != want.tobytes():
                got = self._offsets[name] = (None, f"the raw bytes at row {r} differ from h5py's read")
        return got

    def fd(self) -> int:
        """An OS file descriptor of the shard (opened once, read with ``os.preadv``)."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def close(self) -> None:
        self.file.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _map_rows(ds: h5py.Dataset, path: Path) -> tuple[np.ndarray | None, str]:
    """``(offsets (rows,) int64, "")`` of the rows of ``ds`` in its file, or ``(None, reason)``."""
    n = int(ds.shape[0])
    row_bytes = int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize
    if ds.dtype.byteorder == ">" or ds.dtype.kind not in "fiub":
        return None, f"dtype {ds.dtype} is not a native numeric type"
    dcpl = ds.id.get_create_plist()
    if dcpl.get_nfilters():
        return None, "it is filtered (compressed)"
    layout = dcpl.get_layout()
    if layout == h5py.h5d.CONTIGUOUS:
        base = ds.id.get_offset()
        if base is None:
            return None, "its storage is not allocated"
        return int(base) + np.arange(n, dtype=np.int64) * row_bytes, ""
    if layout != h5py.h5d.CHUNKED:
        return None, f"its layout ({layout}) is neither contiguous nor chunked"
    if tuple(ds.chunks[1:]) != tuple(ds.shape[1:]):
        return None, f"its chunks {ds.chunks} split a row of shape {ds.shape[1:]}"
    per = int(ds.chunks[0])
    nchunks = -(-n // per) if n else 0
    chunk_off = np.full(nchunks, -1, np.int64)

    def visit(info: Any) -> None:
        chunk_off[int(info.chunk_offset[0]) // per] = int(info.byte_offset)

    ds.id.chunk_iter(visit)
    if (chunk_off < 0).any():
        return None, f"{int((chunk_off < 0).sum())} of its {nchunks} chunks are not allocated"
    rows = np.arange(n, dtype=np.int64)
    return chunk_off[rows // per] + (rows % per) * row_bytes, ""


@dataclass
class FeatureBatch:
    """A batch of cache rows in the storage dtype, in one flat (pinned with CUDA) byte buffer.

    ``tensors``: name -> host tensor ``(B, ...)``, views into ``flat`` (``patch (B, [V,] h*w, D)``
    float16/int8, ``patch_scale (B, [V,] h*w)``, ``cls``, ``boxes (B, V, 4)``, ``flips (B, V)``,
    ``text/<g> (B, Dt)``, ``text_valid/<g> (B,)`` ...; the view axis is gone when ``views`` was given).
    ``indices``: the cache item indices of the rows, in order. Reused by the next read into it: copy
    out (:meth:`to`) before reading into the same buffer again.
    """

    flat: torch.Tensor
    layout: dict[str, tuple[int, tuple[int, ...], torch.dtype]]
    tensors: dict[str, torch.Tensor]
    capacity: int
    indices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    event: Any = None  # CUDA event of the last copy out of this buffer (reuse waits on it)
    epoch: int = -1  # set by readers that track epochs (distill.feeder)
    views: Any = None  # the view read of each row (read_batch's views), None for all views / one view

    @property
    def size(self) -> int:
        return len(self.indices)

    def flat_np(self) -> np.ndarray:
        """``flat`` as a numpy byte array (the same memory)."""
        arr = self.__dict__.get("_np")
        if arr is None:
            arr = self._np = self.flat.numpy()
        return arr

    def host(self) -> dict[str, torch.Tensor]:
        """The filled rows ``(size, ...)`` of every field (views of the buffer)."""
        n = self.size
        return {k: t[:n] for k, t in self.tensors.items()}

    def to(self, device: torch.device, *, stream: Any = None) -> dict[str, torch.Tensor]:
        """The filled rows on ``device`` after ONE copy of the whole buffer (no copy on the CPU). With CUDA
        and ``stream``, the copy runs on that side stream; the current stream waits on its event."""
        device = torch.device(device)
        if device.type == "cpu":
            return self.host()
        nbytes = self._used_bytes()
        if stream is not None:
            current = torch.cuda.current_stream(device)
            with torch.cuda.stream(stream):  # the host bytes are ready: the copy waits on nothing
                dflat = self.flat[:nbytes].to(device, non_blocking=True)
                self.event = torch.cuda.Event()
                self.event.record(stream)
            current.wait_event(self.event)
            dflat.record_stream(current)
        else:
            dflat = self.flat[:nbytes].to(device, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        n = self.size
        out = {}
        for k, (off, shape, dt) in self.layout.items():
            if off >= nbytes:
                continue
            cnt = int(np.prod(shape[1:], dtype=np.int64)) * n
            out[k] = dflat[off : off + cnt * _itemsize(dt)].view(dt).view(n, *shape[1:])
        return out

    def _used_bytes(self) -> int:
        end = 0
        for off, shape, dt in self.layout.values():
            end = max(end, off + int(np.prod(shape, dtype=np.int64)) * _itemsize(dt))
        return end

    def to_device(self, device: torch.device) -> dict[str, torch.Tensor]:
        """:meth:`to` on a side CUDA stream of ``device`` (one per device, made once); on the CPU, no copy."""
        device = torch.device(device)
        stream = None
        if device.type == "cuda":
            stream = _SIDE_STREAMS.get(device)
            if stream is None:
                stream = _SIDE_STREAMS[device] = torch.cuda.Stream(device)
        return self.to(device, stream=stream)

    def wait(self) -> None:
        """Block until the last device copy out of this buffer finished (before refilling it)."""
        if self.event is not None:
            self.event.synchronize()
            self.event = None


_SIDE_STREAMS: dict[torch.device, Any] = {}


def _itemsize(dt: torch.dtype) -> int:
    return torch.empty((), dtype=dt).element_size()


_TORCH_DTYPES = {
    np.dtype(np.float16): torch.float16,
    np.dtype(np.float32): torch.float32,
    np.dtype(np.int8): torch.int8,
    np.dtype(np.uint8): torch.uint8,
    np.dtype(np.bool_): torch.bool,
    np.dtype(np.int64): torch.int64,
}


class FeatureCache(Dataset):
    """The cached teacher features, one item per usable sample (skipped images are left out).

    ``spec`` (:class:`cache.spec.CacheSpec`) holds its facts (dim, grid, global tokens, views,
    granularities, storage), worked out once from ``meta``.

    Item dict: ``index`` (source dataset index), ``key``, ``patch`` float32 ``(h, w, D)`` (or
    ``(V, h, w, D)`` with ``boxes (V, 4)`` and ``flips (V,)`` when several views are stored),
    ``cls`` ``(C, D)`` (or ``(V, C, D)``), optional ``value_patch``, and when captions were embedded
    ``text`` dict granularity -> ``(Dt,)`` with ``text_valid`` dict granularity -> bool.

    Reading: the index's virtual datasets are resolved to the shard files once (per process); every
    read is a :meth:`read_batch` of the shard files' rows. ``__getitems__`` (used by the torch
    DataLoader for a whole batch) is one :meth:`read_batch` of every field, decoded.
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
        self.read_threads = min(4, os.cpu_count() or 1)  # os.preadv threads of read_batch
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
        for k in ("_pool", "_pool_pid"):
            state.pop(k, None)
        return state

    def _item_fields(self) -> tuple[str, ...]:
        """Every field of an item: the features, the stored views' boxes and flips, the caption embeddings."""
        fields = tuple(self._names)
        if self.spec.has_views:
            fields += ("boxes", "flips")
        return fields + (("text",) if self.granularities else ())

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        """Items ``indices`` (any order, repeats allowed): one :meth:`read_batch` of every field, decoded to
        float32 (:func:`cache.codec.decode`, the PCA basis of a reduced cache). The items' tensors are views
        of per-batch tensors. For inspection and evaluation; stage 2 reads :meth:`read_batch` rows."""
        fb = self.read_batch(indices, self._item_fields(), out=None, pin=False)
        raw = fb.host()
        red = self.reduction.bases if self.reduction is not None else {}
        feats: dict[str, torch.Tensor] = {}
        for name in self._names:
            mean, basis = red.get(name, (None, None))
            x = decode(raw[name], raw.get(name + "_scale"), basis=basis, mean=mean)
            if name != "cls":  # (B, ..., h*w, D) -> (B, ..., h, w, D)
                x = x.reshape(x.shape[:-2] + self.grid + x.shape[-1:])
            feats[name] = x
        text = {g: decode(raw[f"text/{g}"]) for g in self.granularities}
        valid = {g: raw[f"text_valid/{g}"].bool().tolist() for g in self.granularities}
        items = []
        for k, j in enumerate(self.valid[fb.indices].tolist()):
            item: dict[str, Any] = {"index": j, "key": self._keys[j]}
            for name in self._names:
                item[name] = feats[name][k]
            if self.spec.has_views:
                item["boxes"], item["flips"] = raw["boxes"][k], raw["flips"][k].bool()
            if self.granularities:
                item["text"] = {g: text[g][k] for g in self.granularities}
                item["text_valid"] = {g: valid[g][k] for g in self.granularities}
            items.append(item)
        return items

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a cache of {len(self)} samples")
        return self.__getitems__([i])[0]

    # ------------------------------------------------------------------------------ batch reader
    def _batch_names(self, fields: tuple[str, ...] | list[str]) -> list[str]:
        """Datasets behind ``fields``: ``patch``/``cls``/``value_patch`` (+ ``*_scale`` for int8),
        ``boxes``, ``flips``, ``text`` (every granularity's ``text/<g>`` and ``text_valid/<g>``)."""
        names: list[str] = []
        for f in fields:
            if f == "text":
                if not self.granularities:
                    raise ValueError(
                        f"cache {self.path} holds no caption embeddings; drop 'text' from fields"
                    )
                for g in self.granularities:
                    names += [f"text/{g}", f"text_valid/{g}"]
            elif f in FEATURES:
                if f not in self._names:
                    raise ValueError(
                        f"cache {self.path} has no {f!r} dataset (it holds {self._names}); "
                        + ("cache it with --value-trick" if f == "value_patch" else "rebuild the cache")
                    )
                names += [f] + ([f + "_scale"] if self.int8 else [])
            elif f in ("boxes", "flips"):
                if not self.spec.has_views:
                    raise ValueError(f"cache {self.path} stores one view per sample: it has no {f!r}")
                names.append(f)
            else:
                raise ValueError(
                    f"unknown field {f!r}; choose from patch, cls, value_patch, boxes, flips, text"
                )
        return names

    def _has_view_axis(self, name: str) -> bool:
        """``name`` is a feature (or its scale) with a leading view axis."""
        base = name[: -len("_scale")] if name.endswith("_scale") else name
        return self.spec.has_views and base in FEATURES

    def alloc_batch(
        self,
        capacity: int,
        fields: tuple[str, ...] | list[str] = ("patch", "cls"),
        *,
        views: bool = False,
        pin: bool | None = None,
        extra: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None,
    ) -> FeatureBatch:
        """An empty :class:`FeatureBatch` of ``capacity`` rows for ``fields`` (``views``: one view per
        row, see :meth:`read_batch`), in one byte buffer, pinned when CUDA is present (``pin=None``).
        ``extra``: name -> (per-row shape, dtype) of further per-row fields the caller fills (they travel
        in the same buffer, so in the same device copy)."""
        names = self._batch_names(fields)
        specs = [(n, *self._spec[n]) for n in names]
        specs += [(n, shape, dt) for n, (shape, dt) in (extra or {}).items()]
        layout: dict[str, tuple[int, tuple[int, ...], torch.dtype]] = {}
        off = 0
        for name, tail, npdt in specs:
            tail = tuple(tail[1:]) if views and self._has_view_axis(name) else tuple(tail)
            dt = npdt if isinstance(npdt, torch.dtype) else _TORCH_DTYPES[np.dtype(npdt)]
            layout[name] = (off, (int(capacity), *tail), dt)
            nbytes = int(np.prod((capacity, *tail), dtype=np.int64)) * _itemsize(dt)
            off += -(-nbytes // ALIGN) * ALIGN
        pin = torch.cuda.is_available() if pin is None else pin
        flat = torch.empty(max(off, ALIGN), dtype=torch.uint8, pin_memory=pin)
        tensors = {}
        for name, (o, shape, dt) in layout.items():
            nbytes = int(np.prod(shape, dtype=np.int64)) * _itemsize(dt)
            tensors[name] = flat[o : o + nbytes].view(dt).view(shape)
        return FeatureBatch(flat=flat, layout=layout, tensors=tensors, capacity=int(capacity))

    def read_batch(
        self,
        indices: Any,
        fields: tuple[str, ...] | list[str] = ("patch", "cls"),
        *,
        views: Any = None,
        out: FeatureBatch | None = None,
        pin: bool | None = None,
    ) -> FeatureBatch:
        """Rows ``indices`` (cache item indices, any order, repeats allowed) of ``fields`` in the storage
        dtype, into ``out`` (reused; a new :func:`alloc_batch` buffer when ``None``).

        Only what is asked is read: ``fields`` from ``patch``, ``cls``, ``value_patch`` (int8 caches add
        ``*_scale``), ``boxes``, ``flips``, ``text``; ``views`` (``(B,)`` ints, caches with several views)
        reads one view of each row's features and drops the view axis. Rows are grouped by shard and
        read in file order with ``os.preadv`` (consecutive rows in one call) from a thread pool of
        ``self.read_threads``; datasets that cannot be read as raw bytes go through h5py (logged once).
        Decode with :func:`cache.codec.decode` (the items of ``cache[i]`` are these rows decoded).
        ``pin``: of a new buffer (:meth:`alloc_batch`).
        """
        n = len(self)
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        bad = (idx < -n) | (idx >= n)
        if bad.any():
            raise IndexError(f"index {int(idx[bad][0])} out of range for a cache of {n} samples")
        idx = np.where(idx < 0, idx + n, idx)
        js = self.valid[idx]
        select = views is not None
        if select:
            if not self.spec.has_views:
                raise ValueError(f"cache {self.path} stores one view per sample; read it with views=None")
            views = np.asarray(views, dtype=np.int64).reshape(-1)
            if views.shape != idx.shape or ((views < 0) | (views >= self.num_views)).any():
                raise ValueError(
                    f"views must be {len(idx)} view indices in [0, {self.num_views}), got {views.tolist()}"
                )
        if out is None:
            out = self.alloc_batch(len(idx), fields, views=select, pin=pin)
        names = self._batch_names(fields)
        if not set(names) <= set(out.layout) or out.capacity < len(idx):
            raise ValueError(
                f"the buffer holds {sorted(out.layout)} x {out.capacity} rows, the read asks for {names} x "
                f"{len(idx)}; allocate it with alloc_batch(capacity, fields) for the same fields"
            )
        out.wait()
        out.indices = idx.copy()
        if not len(idx):
            return out
        shards = self._open()
        if len(shards) == 1:
            groups = [(shards[0], slice(None))]
        else:
            starts = np.array([sh.start for sh in shards], dtype=np.int64)
            shard_of = np.searchsorted(starts, js, side="right") - 1
            groups = [(shards[s], np.flatnonzero(shard_of == s)) for s in np.unique(shard_of).tolist()]
        flat = out.flat_np()
        rows_at = np.arange(len(idx), dtype=np.int64)
        runs: list[tuple[_Shard, int, list[memoryview], int]] = []
        for name in names:
            off0 = out.layout[name][0]
            tail, npdt = self._spec[name]
            row_bytes = int(np.prod(tail, dtype=np.int64)) * np.dtype(npdt).itemsize
            viewed = select and self._has_view_axis(name)
            piece = row_bytes // self.num_views if viewed else row_bytes
            dest = off0 + rows_at * piece
            for sh, sel in groups:
                local = js[sel] - sh.offset
                offs, why = sh.row_offsets(name)
                if offs is None:
                    self._note_fallback(sh, name, why)
                    uniq, inv = np.unique(local, return_inverse=True)
                    tmp = np.empty((len(uniq), *tail), npdt)
                    sh.read(name, uniq, tmp)
                    rows = tmp[inv]
                    if viewed:
                        rows = rows[np.arange(len(rows)), views[sel]]
                    out.tensors[name].numpy()[sel] = rows
                    continue
                fo = offs[local] + (views[sel] * piece if viewed else 0)
                runs += _runs(sh, fo.tolist(), dest[sel].tolist(), piece, flat)
        self._preadv(runs)
        return out

    def _note_fallback(self, sh: _Shard, name: str, why: str) -> None:
        noted = self.__dict__.setdefault("_fallbacks", set())
        if (sh.path, name) not in noted:
            noted.add((sh.path, name))
            logger.info(
                "%s: dataset %s is read through h5py (one call per batch, under the HDF5 lock), not with "
                "parallel raw reads: %s",
                sh.path.name,
                name,
                why,
            )

    def _preadv(self, runs: list[tuple[_Shard, int, list[memoryview], int]]) -> None:
        """Execute the reads, split into ``read_threads`` groups of about equal bytes."""
        threads = max(1, int(self.read_threads))
        total = sum(r[3] for r in runs)
        # a thread hand-off costs tens of microseconds (milliseconds on a busy machine): only batches of
        # several MiB per thread are split (a real-size batch: 32 x 3.2 MB)
        threads = min(threads, total // PARALLEL_BYTES)
        if threads <= 1 or len(runs) < 2:
            _read_runs(runs)
            return
        groups: list[list[Any]] = [[]]
        acc = 0
        for r in runs:
            if acc >= total * len(groups) / threads and len(groups) < threads:
                groups.append([])
            groups[-1].append(r)
            acc += r[3]
        pool = self.__dict__.get("_pool")
        if pool is None or self.__dict__.get("_pool_pid") != os.getpid():
            pool = self._pool = ThreadPoolExecutor(threads, thread_name_prefix="cache-read")
            self._pool_pid = os.getpid()
        futures = [pool.submit(_read_runs, g) for g in groups[1:]]
        _read_runs(groups[0])  # the caller's thread reads a share too
        for fut in futures:
            fut.result()

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


def _runs(
    sh: _Shard, fo: list[int], dest: list[int], piece: int, flat: np.ndarray
) -> list[tuple[_Shard, int, list[memoryview], int]]:
    """``(shard, file offset, buffers, bytes)`` preadv calls reading pieces of ``piece`` bytes at file
    offsets ``fo`` into ``flat[dest:dest + piece]``: in file order, consecutive pieces merged into one
    call (and consecutive destinations into one buffer), at most ``IOV_MAX`` buffers each. Plain Python
    over a batch's few rows (cheaper than numpy calls at this size)."""
    sh.fd()  # opened here, in the calling thread
    order = (
        range(len(fo))
        if all(a < b for a, b in zip(fo, fo[1:]))
        else sorted(range(len(fo)), key=fo.__getitem__)
    )
    out: list[tuple[_Shard, int, list[memoryview], int]] = []
    segs: list[list[int]] = []  # [dest start, length] of the current call's buffers
    start = end = -1
    for k in order:
        f, d = fo[k], dest[k]
        if f == end and len(segs) <= IOV_MAX:
            last = segs[-1]
            if last[0] + last[1] == d:
                last[1] += piece
            elif len(segs) < IOV_MAX:
                segs.append([d, piece])
            else:
                out.append((sh, start, [memoryview(flat[x : x + n]) for x, n in segs], end - start))
                start, segs = f, [[d, piece]]
        else:
            if segs:
                out.append((sh, start, [memoryview(flat[x : x + n]) for x, n in segs], end - start))
            start, segs = f, [[d, piece]]
        end = f + piece
    if segs:
        out.append((sh, start, [memoryview(flat[x : x + n]) for x, n in segs], end - start))
    return out


def _read_runs(runs: list[tuple[_Shard, int, list[memoryview], int]]) -> None:
    for sh, start, bufs, total in runs:
        got = os.preadv(sh.fd(), bufs, start)
        if got != total:
            raise OSError(
                f"{sh.path}: read {got} of {total} bytes at offset {start}: the shard is shorter than its "
                "index says (truncated?); check it with tipsdistill-cache --verify, then --repair"
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
