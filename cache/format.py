"""The HDF5 cache format (the contract between stage 1 and stage 2): layout, attributes, index.

One shard file per writer rank (``shard-00000-of-00002.h5``) plus ``index.h5``, which presents all
shards as one dataset in the original order through h5py virtual datasets. Per shard, rows are the
contiguous slice ``[shard_start, shard_start + shard_count)`` of the source dataset:

- ``keys (N,)`` str; ``done (N,)`` bool; ``skip_reason (N,)`` bytes (empty = not skipped);
- ``checksum (N,)`` uint32: CRC-32 of the sample's stored bytes (:func:`row_checksum`), written with
  the sample, before its ``done`` flag; ``--verify`` / ``--repair`` check every done sample against it;
- ``patch (N, [V,] h*w, D)`` float16 or int8 (+ ``patch_scale (N, [V,] h*w)`` float32 when int8);
- ``cls (N, [V,] C, D)`` (+ ``cls_scale``); optional ``value_patch`` (+ ``value_patch_scale``);
- ``boxes (N, V, 4)`` float32 and ``flips (N, V)`` bool when ``num_views > 1``;
- ``text/<gran> (N, Dt)`` float16 and ``text_valid/<gran> (N,)`` bool per caption granularity;
- ``block_stats (num_blocks, 2 + 2C, D)`` float64 and ``block_count (num_blocks,)``: per write block,
  the sums of per-sample patch mean, patch mean square, cls mean, cls mean square (feature statistics
  computed over the data while it is written, exactly reproducible after a resume);
- after completion: ``skipped`` (index, key, reason) records and attributes ``complete``,
  ``patch_mean/patch_std (D,)``, ``cls_mean/cls_std (C, D)``, ``num_done``, ``num_skipped``.

Every per-sample dataset is contiguous (format 3; format 2 used one-sample chunks, still read and
resumed) and allocated when the file is created, so writing a block of samples only writes raw bytes
into place, one write per dataset: a killed writer never leaves the file's metadata half updated.
Because the storage never moves, its byte offsets are saved next to the shard when it is created
(``<shard>.chunks.npz``, :func:`chunk_map`; a contiguous dataset is one "chunk" of all its rows, row
``r`` at ``offset + r * row_bytes``): a damaged shard (truncated, metadata bytes flipped) is read back
row by row from those offsets, without HDF5, by :mod:`cache.repair`; readers may ``preadv`` rows from
them (or from ``ds.id.get_offset()``).

Reduced-dimension caches (``reduce_dim K``, :mod:`cache.reduce`) store ``patch`` / ``value_patch`` as
``(N, [V,] h*w, K)`` PCA coefficients with ``reduce/<name>/mean (D,)`` and ``reduce/<name>/basis
(D, K)``; :func:`cache.codec.decode` reconstructs the tokens.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

try:  # ISA-L's CRC-32: the same values as zlib.crc32 (format unchanged), ~4x faster (setup.cfg requires it)
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - an install without isal stays correct, only slower
    from zlib import crc32

logger = logging.getLogger(__name__)

# 2: per-sample checksum + chunk map next to each shard; 3: contiguous per-sample datasets (no chunk
# index: a write block is one write), optional reduced-dimension storage (reduce/ datasets)
FORMAT_VERSION = 3
RESUMABLE_VERSIONS = (2, 3)  # shards this code resumes (it writes rows through HDF5 in either layout)
INDEX_NAME = "index.h5"
REASON_BYTES = 256


def fit_reason(reason: str, limit: int = REASON_BYTES) -> bytes:
    """``reason`` as UTF-8 in at most ``limit`` bytes. A longer one keeps its start (the kind and the
    key, a quarter) and its end (the fix the message ends with, the rest) around ``" ... "``: long
    absolute paths in the middle must not cut the advice off."""
    raw = reason.encode("utf-8", "replace")
    if len(raw) <= limit:
        return raw
    head = (limit - 5) // 4
    tail = limit - 5 - head
    cut = raw[:head].decode("utf-8", "ignore") + " ... " + raw[-tail:].decode("utf-8", "ignore")
    return cut.encode("utf-8")


# what h5py raises on a damaged file: OSError (truncated, bad signature), KeyError / RuntimeError
# (object header checksum), ValueError (an attribute that no longer decodes)
H5_ERRORS = (OSError, KeyError, RuntimeError, ValueError)
# superblock v2 + object header v2: every metadata block carries a checksum (HDF5 >= 1.8 reads it).
# Not v110: its superblock v3 keeps a "file open for write" flag that a killed writer leaves set, and
# HDF5 then refuses to open the file until h5clear is run
LIBVER = ("v108", "latest")
JSON_ATTRS = (
    "teacher",
    "teacher_spec",
    "views",
    "granularities",
    "dataset",
    "dataset_spec",
    "config",
    "shards",
    "caption_problems",
    "captions_missing",
    "reduce",
    "reduce_fit",
)
# who wrote a cache's features, from what and how: compared by a stage-1 resume, across the shards of
# an index, against a damaged shard's chunk map before a repair keeps its rows, against the PCA basis
# file, and by a stage-2 resume (the cache a checkpoint was trained on); see :func:`cache_identity`
IDENTITY_FIELDS = (
    "teacher",
    "teacher_spec",
    "teacher_weights",  # a digest of the teacher's weights (new weights at the same path or hub name)
    "image_size",
    "resize",
    "min_side",
    "autocast",  # the teacher's precision (fp32 vs bf16 features)
    "dataset",
    "num_samples",
    "keys_sha1",
    "storage_dtype",
    "value_trick",
    "value_readout",
    "layer",
    "views",
    "granularities",
    "reduce",
)
# what must match between a cache on disk and a run that wants to resume it, in the order checked
RESUME_FIELDS = ("format_version", "toolkit_version", *IDENTITY_FIELDS, "shard_world")
# fields a cache made before they were recorded lacks: not compared then (said once, as a warning)
LATER_FIELDS = ("teacher_weights", "min_side", "autocast", "toolkit_version")
FEATURES = ("patch", "cls", "value_patch")
BOOKKEEPING = ("done", "skip_reason", "checksum")  # per-sample arrays that are not the sample's data
CHUNK_MAP_SUFFIX = ".chunks.npz"


def shard_name(rank: int, world: int) -> str:
    return f"shard-{rank:05d}-of-{world:05d}.h5"


def shard_range(num_samples: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous, balanced slice of the dataset written by ``rank``: ``(start, count)``."""
    start = rank * num_samples // world
    return start, (rank + 1) * num_samples // world - start


def toolkit_version() -> str:
    try:
        from importlib.metadata import version

        return version("tipsdistill")
    except Exception:  # noqa: BLE001 - not installed: report unknown rather than fail
        return "unknown"


def git_revision() -> str:
    """The toolkit checkout's ``HEAD`` commit, ``-dirty`` when it has local changes; ``"unknown"`` outside git."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        if rev.returncode != 0 or not rev.stdout.strip():
            return "unknown"
        status = subprocess.run(
            ["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=10
        )
        return rev.stdout.strip() + ("-dirty" if status.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def keys_digest(keys: Iterable[str]) -> str:
    """SHA-1 of the keys in order (each UTF-8, NUL-terminated); read once, in order, never held."""
    h = hashlib.sha1()
    for k in keys:
        h.update(k.encode("utf-8", "surrogateescape"))
        h.update(b"\0")
    return h.hexdigest()


@dataclass
class Layout:
    """Shapes of one shard (or of the whole cache when ``count == num_samples``)."""

    count: int
    grid: tuple[int, int]
    dim: int
    num_global_tokens: int
    num_views: int = 1
    value_patch: bool = False
    storage_dtype: str = "float16"
    text_dim: int = 0
    granularities: list[str] = field(default_factory=list)
    block_size: int = 32
    reduce_dim: int = 0  # > 0: patch / value_patch stored as this many PCA coefficients (cache.reduce)

    @property
    def num_blocks(self) -> int:
        return max(1, -(-self.count // self.block_size))

    def _v(self) -> tuple[int, ...]:
        return (self.num_views,) if self.num_views > 1 else ()

    def per_sample(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Name -> (shape of one sample, dtype) of every per-sample array."""
        hw, D, C, v = self.grid[0] * self.grid[1], self.dim, self.num_global_tokens, self._v()
        sdt = np.dtype(self.storage_dtype)
        out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        feats = [("patch", hw), ("cls", C)] + ([("value_patch", hw)] if self.value_patch else [])
        for name, n in feats:
            width = self.reduce_dim if self.reduce_dim and name in ("patch", "value_patch") else D
            out[name] = (v + (n, width), sdt)
            if self.storage_dtype == "int8":
                out[name + "_scale"] = (v + (n,), np.dtype("float32"))
        if self.num_views > 1:
            out["boxes"] = ((self.num_views, 4), np.dtype("float32"))
            out["flips"] = ((self.num_views,), np.dtype("bool"))
        for g in self.granularities:
            out[f"text/{g}"] = ((self.text_dim,), np.dtype("float16"))
            out[f"text_valid/{g}"] = ((), np.dtype("bool"))
        out["done"] = ((), np.dtype("bool"))
        out["skip_reason"] = ((), np.dtype(f"S{REASON_BYTES}"))
        out["checksum"] = ((), np.dtype("uint32"))
        return out

    def checked(self) -> list[str]:
        """The per-sample arrays covered by ``checksum``, in checksum order."""
        return [n for n in self.per_sample() if n not in BOOKKEEPING]

    def bytes_per_sample(self) -> int:
        return int(sum(int(np.prod(s)) * dt.itemsize for s, dt in self.per_sample().values()))


def _create_dataset(
    group: h5py.Group,
    name: str,
    shape: tuple[int, ...],
    dtype: np.dtype,
    chunk: tuple[int, ...] | None,
    fill: bool = True,
) -> None:
    """A dataset whose storage is all allocated now (writes then never touch metadata): contiguous
    (``chunk=None``: one extent, row ``r`` at ``offset + r * row_bytes``, no chunk index at all) or chunked.

    ``fill``: write zeros now (small bookkeeping arrays such as ``done``). Feature arrays are not
    filled (creating a 1 TB cache must not write 1 TB of zeros); rows never written are never read.
    """
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    if chunk is not None:
        dcpl.set_chunk(chunk)
    else:
        dcpl.set_layout(h5py.h5d.CONTIGUOUS)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_ALLOC if fill else h5py.h5d.FILL_TIME_NEVER)
    parent = group
    if "/" in name:
        gname, name = name.rsplit("/", 1)
        parent = group.require_group(gname)
    h5py.h5d.create(
        parent.id, name.encode(), h5py.h5t.py_create(dtype), h5py.h5s.create_simple(shape), dcpl=dcpl
    )


def row_checksum(rows: dict[str, np.ndarray], i: int, names: list[str]) -> int:
    """CRC-32 of sample ``i``'s stored bytes: ``rows[name][i]`` for ``name`` in ``names`` order
    (arrays in their on-disk dtype, C-contiguous)."""
    crc = 0
    for name in names:
        crc = crc32(np.ascontiguousarray(rows[name][i]).view(np.uint8).reshape(-1), crc)
    return crc


def fsync_file(f: h5py.File) -> None:
    """Flush ``f`` and ask the OS to put its bytes on the disk (``fsync``), not only in the page cache."""
    f.flush()
    handle = f.id.get_vfd_handle()
    if isinstance(handle, int):
        os.fsync(handle)


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def chunk_map_path(shard: Path) -> Path:
    return shard.with_name(shard.name + CHUNK_MAP_SUFFIX)


def chunk_map(f: h5py.File, names: list[str]) -> dict[str, np.ndarray]:
    """Byte offset of every chunk of the datasets ``names`` (chunk index order), plus rows per chunk:
    ``{name: offsets int64 (num_chunks,), name + "@rows": int64 ()}``. Early-allocated chunks never move.
    A contiguous dataset (format 3) is one chunk of all its rows: ``[offset]``, ``@rows`` = its length."""
    out: dict[str, np.ndarray] = {}
    for name in names:
        ds = f[name]
        if ds.chunks is None:
            off = ds.id.get_offset()
            if ds.shape[0] and off is None:
                raise RuntimeError(f"{f.filename}: contiguous dataset {name} has no storage allocated")
            out[name] = np.array([off] if ds.shape[0] else [], np.int64)
            out[name + "@rows"] = np.array(max(int(ds.shape[0]), 1), np.int64)
            out[name + "@shape"] = np.array(ds.shape[1:], np.int64)
            out[name + "@dtype"] = np.array(ds.dtype.str)
            continue
        per = int(ds.chunks[0])
        found: list[tuple[int, int]] = []
        ds.id.chunk_iter(lambda si, found=found: found.append((int(si.chunk_offset[0]), int(si.byte_offset))))
        found.sort()
        want = -(-int(ds.shape[0]) // per) if ds.shape[0] else 0
        if len(found) != want or any(c != k * per for k, (c, _) in enumerate(found)):
            raise RuntimeError(
                f"{f.filename}: dataset {name} has {len(found)} chunks allocated, expected {want}"
            )
        out[name] = np.array([o for _, o in found], np.int64)
        out[name + "@rows"] = np.array(per, np.int64)
        out[name + "@shape"] = np.array(ds.shape[1:], np.int64)
        out[name + "@dtype"] = np.array(ds.dtype.str)
    return out


def encode_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in attrs.items():
        if k in JSON_ATTRS:
            out[k] = json.dumps(v, sort_keys=True)
        elif v is None:
            out[k] = "none"
        elif isinstance(v, (list, tuple)):
            out[k] = np.asarray(v)
        else:
            out[k] = v
    return out


def decode_attrs(attrs: h5py.AttributeManager) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for k, v in attrs.items():
        if isinstance(v, bytes):
            v = v.decode()
        if k in JSON_ATTRS and isinstance(v, str):
            v = json.loads(v)
        elif isinstance(v, np.ndarray):
            v = v.tolist() if v.ndim == 1 and v.size <= 4 and v.dtype.kind in "iub" else v
        elif isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, str) and v == "none":
            v = None
        meta[k] = v
    if "image_size" in meta:
        meta["image_size"] = tuple(int(x) for x in meta["image_size"])
    if "grid" in meta:
        meta["grid"] = tuple(int(x) for x in meta["grid"])
    return meta


def create_shard(
    path: Path, layout: Layout, attrs: dict[str, Any], keys: list[str], reduction: Any = None
) -> None:
    """Create a shard file with every dataset allocated; written to a temporary name, then renamed.

    ``reduction`` (a :class:`cache.reduce.Reduction`, required when ``layout.reduce_dim``): its PCA
    mean and basis are stored in the shard (``reduce/<name>/...``) before any sample."""
    if layout.reduce_dim and (reduction is None or reduction.dim != layout.reduce_dim):
        raise ValueError(
            f"{path}: a reduce_dim={layout.reduce_dim} shard needs its PCA basis (cache.reduce.Reduction)"
        )
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    n = layout.count
    with h5py.File(tmp, "w", libver=LIBVER) as f:  # checksummed metadata: flipped bytes are detected
        # every per-sample dataset contiguous (format 3): a write block of rows is one write, with no
        # per-chunk index lookups (format 2's one-sample chunks cost a B-tree entry and a write each)
        for name, (shape, dt) in layout.per_sample().items():
            big = name in FEATURES or name.endswith("_scale")
            _create_dataset(f, name, (n, *shape), dt, None, fill=not big)
        nb, C, D = layout.num_blocks, layout.num_global_tokens, layout.dim
        _create_dataset(f, "block_stats", (nb, 2 + 2 * C, D), np.dtype("float64"), None)
        _create_dataset(f, "block_count", (nb,), np.dtype("int64"), None)
        f.create_dataset("keys", data=np.array(keys, dtype=object), dtype=h5py.string_dtype())
        if layout.reduce_dim:
            reduction.write_h5(f)
        f.attrs.update(encode_attrs(attrs))
        f.attrs["block_size"] = layout.block_size
        f.attrs["complete"] = False
        cmap = chunk_map(f, [*layout.per_sample(), "block_stats", "block_count"])
        cmap["@checked"] = np.array(layout.checked())
        cmap["@count"] = np.array(n, np.int64)
        # who wrote the rows, outside the HDF5 metadata: a repair of a shard whose metadata is unreadable
        # checks it before keeping any row (cache.repair)
        cmap["@identity"] = np.array(json.dumps(cache_identity(attrs), sort_keys=True))
        cmap["@block_size"] = np.array(layout.block_size, np.int64)
        fsync_file(f)
    tmp_map = chunk_map_path(tmp)
    with open(tmp_map, "wb") as fh:
        np.savez(fh, **{k.replace("/", "|"): v for k, v in cmap.items()})
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp_map, chunk_map_path(path))
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_chunk_map(shard: Path) -> dict[str, np.ndarray]:
    """The chunk offsets saved by :func:`create_shard` (raises OSError / ValueError when unreadable)."""
    with np.load(chunk_map_path(shard)) as z:
        return {k.replace("|", "/"): z[k] for k in z.files}


def layout_from_meta(meta: dict[str, Any], count: int) -> Layout:
    return Layout(
        count=count,
        grid=tuple(meta["grid"]),
        dim=int(meta["dim"]),
        num_global_tokens=int(meta["num_global_tokens"]),
        num_views=int(meta.get("num_views", 1)),
        value_patch=bool(meta.get("value_trick", False)),
        storage_dtype=str(meta["storage_dtype"]),
        text_dim=int(meta.get("text_dim", 0)),
        granularities=list(meta.get("granularities") or []),
        block_size=int(meta.get("block_size", 32)),
        reduce_dim=int(meta.get("reduce_dim") or 0),
    )


def _norm(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    if isinstance(v, np.generic):
        return v.item()
    return v


def cache_identity(meta: dict[str, Any]) -> dict[str, Any]:
    """The identity of a cache (or shard) from its attributes: :data:`IDENTITY_FIELDS`, JSON-normalised."""
    return {k: json.loads(json.dumps(_norm(meta.get(k)), default=str)) for k in IDENTITY_FIELDS}


def identity_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The :data:`IDENTITY_FIELDS` on which two identities (or attribute dicts) differ; a field one of them
    lacks (made before it was recorded) and a missing ``teacher_spec`` (a teacher object passed directly)
    are not compared."""
    out = []
    for k in IDENTITY_FIELDS:
        x, y = _norm(a.get(k)), _norm(b.get(k))
        if (k == "teacher_spec" or k in LATER_FIELDS) and (x is None or y is None):
            continue
        if json.dumps(x, sort_keys=True, default=str) != json.dumps(y, sort_keys=True, default=str):
            out.append(k)
    return out


def shard_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Fields on which two shards of one cache disagree: the identity, and the layout every shard shares."""
    out = identity_differences(a, b)
    for k in (
        "format_version",
        "toolkit_version",
        "grid",
        "dim",
        "num_global_tokens",
        "shard_world",
        "reduce_dim",
    ):
        x, y = _norm(a.get(k)), _norm(b.get(k))
        if k in LATER_FIELDS and (x is None or y is None):
            continue
        if x != y:
            out.append(k)
    return out


def _brief(v: Any, n: int = 70) -> str:
    s = json.dumps(_norm(v), sort_keys=True, default=str)
    return s if len(s) <= n else s[: n - 3] + "..."


def weights_digest(module: Any) -> str:
    """SHA-256 of a module's state (names, dtypes, shapes and bytes of every tensor, in name order)."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_resume(path: Path, stored: dict[str, Any], wanted: dict[str, Any]) -> None:
    """Refuse to continue a cache made with other settings, naming the first differing field."""
    for k in RESUME_FIELDS:
        a, b = _norm(stored.get(k)), _norm(wanted.get(k))
        if k == "teacher_spec" and (a is None or b is None):
            continue  # a teacher object passed directly has no spec; its identity is still compared
        if k in LATER_FIELDS and a is None and b is not None:
            logger.warning("%s records no %s (made by an older toolkit): not compared", path.name, k)
            continue
        if k == "format_version" and a in RESUMABLE_VERSIONS and b == FORMAT_VERSION:
            continue  # an older shard is finished in its own layout (rows are written through HDF5)
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict):
                diff = sorted(x for x in set(a) | set(b) if a.get(x) != b.get(x))
                a = {x: a.get(x) for x in diff}
                b = {x: b.get(x) for x in diff}
            # --autocast auto is bf16 on CUDA: a float32 cache ("off") resumes with --autocast none
            hint = f" (--autocast {'none' if a == 'off' else a})" if k == "autocast" else ""
            raise ValueError(
                f"refusing to resume {path}: {k} differs: the cache has {a!r}, this run has {b!r}. "
                f"Write to another output directory (--out), or rerun with the cache's settings{hint}."
            )


def read_meta(path: Path) -> dict[str, Any]:
    with h5py.File(path, "r") as f:
        return decode_attrs(f.attrs)


def shard_complete(path: Path) -> bool:
    """True when ``path`` exists and its writer finished (safe to call while another rank writes it)."""
    if not path.exists():
        return False
    try:
        with h5py.File(path, "r") as f:
            return bool(f.attrs.get("complete", False))
    except H5_ERRORS:
        return False


def summarise_stats(block_stats: np.ndarray, block_count: np.ndarray, C: int) -> dict[str, np.ndarray]:
    """Mean/std of patch and cls features from per-block sums (summed in block order: deterministic)."""
    total = max(int(block_count.sum()), 1)
    s = block_stats.sum(axis=0) / total  # (2 + 2C, D)
    pm, psq = s[0], s[1]
    cm, csq = s[2 : 2 + C], s[2 + C : 2 + 2 * C]
    return {
        "patch_mean": pm.astype(np.float32),
        "patch_std": np.sqrt(np.maximum(psq - pm**2, 0)).astype(np.float32),
        "cls_mean": cm.astype(np.float32),
        "cls_std": np.sqrt(np.maximum(csq - cm**2, 0)).astype(np.float32),
    }


def _skipped_dtype() -> np.dtype:
    s = h5py.string_dtype()
    return np.dtype([("index", np.int64), ("key", s), ("reason", s)])


def write_skipped(f: h5py.File, records: list[tuple[int, str, str]]) -> None:
    arr = np.array([(i, k, r) for i, k, r in records], dtype=_skipped_dtype())
    if "skipped" in f:
        del f["skipped"]
    f.create_dataset("skipped", data=arr, maxshape=(None,))


def read_skipped(f: h5py.File) -> list[tuple[int, str, str]]:
    if "skipped" not in f:
        return []
    out = []
    for rec in f["skipped"][()]:
        key, reason = rec["key"], rec["reason"]
        out.append(
            (
                int(rec["index"]),
                key.decode() if isinstance(key, bytes) else key,
                reason.decode() if isinstance(reason, bytes) else reason,
            )
        )
    return out


def _copy_reduction(paths: list[Path], metas: list[dict[str, Any]], f: h5py.File) -> None:
    """The PCA basis of a reduced-dimension cache into the index; every shard must hold the same one."""
    from .reduce import Reduction

    first: Any = None
    for p, m in zip(paths, metas):
        with h5py.File(p, "r") as s:
            red = Reduction.read_h5(s, m)
        if first is None:
            first = red
            continue
        for n, (mean, basis) in first.bases.items():
            other = red.bases.get(n) if red else None
            if other is None or not (np.array_equal(mean, other[0]) and np.array_equal(basis, other[1])):
                raise ValueError(
                    f"cannot build the index: {p.name} holds another PCA basis for {n} than {paths[0].name}; the "
                    "shards of one cache must share OUT/reduce_basis.npz. Rewrite that shard with the same command"
                )
    first.write_h5(f)


def build_index(out_dir: Path, world: int) -> Path:
    """Write ``index.h5``: every shard's per-sample arrays as one virtual dataset, in original order."""
    paths = [out_dir / shard_name(r, world) for r in range(world)]
    missing = [p.name for p in paths if not shard_complete(p)]
    if missing:
        raise ValueError(f"cannot build the index of {out_dir}: shards not complete: {', '.join(missing)}")
    metas = [read_meta(p) for p in paths]
    meta0 = metas[0]
    for p, m in zip(paths[1:], metas[1:]):
        diff = shard_differences(meta0, m)
        if diff:
            said = "; ".join(
                f"{k}: {_brief(meta0.get(k))} in {paths[0].name}, {_brief(m.get(k))} here" for k in diff
            )
            raise ValueError(
                f"cannot build the index of {out_dir}: {p.name} was written with other settings than {paths[0].name} "
                f"({said}); the shards of one cache must come from one teacher, dataset and settings. Move the odd "
                "shard aside and rerun the command that wrote the others (it rewrites that shard)"
            )
    N = int(meta0["num_samples"])
    layout = layout_from_meta(meta0, N)
    keys: list[str] = []
    skipped: list[tuple[int, str, str]] = []
    stats, counts = [], []
    for p in paths:
        with h5py.File(p, "r") as f:
            keys += [k.decode() if isinstance(k, bytes) else k for k in f["keys"][()]]
            skipped += read_skipped(f)
            stats.append(f["block_stats"][()])
            counts.append(f["block_count"][()])
    tmp = out_dir / f"{INDEX_NAME}.tmp-{os.getpid()}"
    with h5py.File(tmp, "w") as f:
        for name, (shape, dt) in layout.per_sample().items():
            vl = h5py.VirtualLayout(shape=(N, *shape), dtype=dt)
            for p, m in zip(paths, metas):
                s, c = int(m["shard_start"]), int(m["shard_count"])
                if c:
                    vl[s : s + c] = h5py.VirtualSource("./" + p.name, name, shape=(c, *shape))
            f.create_virtual_dataset(name, vl)
        f.create_dataset("keys", data=np.array(keys, dtype=object), dtype=h5py.string_dtype())
        if layout.reduce_dim:
            _copy_reduction(paths, metas, f)
        write_skipped(f, skipped)
        attrs = {
            k: v
            for k, v in meta0.items()
            if not k.startswith("shard_") and k not in ("block_size", "created")
        }
        attrs["shards"] = [p.name for p in paths]
        attrs["created"] = min(str(m.get("created", "")) for m in metas)
        attrs["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        attrs["num_done"] = sum(int(m.get("num_done", 0)) for m in metas)
        attrs["num_skipped"] = len(skipped)
        attrs.update(summarise_stats(np.concatenate(stats), np.concatenate(counts), layout.num_global_tokens))
        attrs["complete"] = True
        f.attrs.update(encode_attrs(attrs))
        fsync_file(f)
    os.replace(tmp, out_dir / INDEX_NAME)
    fsync_dir(out_dir)
    return out_dir / INDEX_NAME
