"""Finding and repairing damaged shards, keeping every intact sample.

A shard is read back here without HDF5: every chunk was allocated when the shard was created and
never moves, and ``create_shard`` saved the chunk byte offsets next to it (``<shard>.chunks.npz``).
So a shard whose HDF5 metadata is unreadable (bytes flipped, file truncated) still gives back each
sample's bytes, ``done`` flag and ``checksum``. A sample is **intact** when it is flagged done and
its bytes are present and match its checksum (a skipped sample, flagged done with a reason, has no
bytes to check). Feature statistics are kept per write block, so repair keeps the write blocks whose
samples are all intact and redoes the others (at most ``block_size - 1`` intact samples are
recomputed per damaged one).

:func:`verify_shard` only reads. :func:`repair_shard` writes a fresh shard with the kept blocks,
renames the damaged file aside (``<shard>.damaged-<time>``, never deleted) and moves the fresh one
into place; the extraction then redoes the rest.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .format import (
    H5_ERRORS,
    INDEX_NAME,
    Layout,
    cache_identity,
    chunk_map,
    chunk_map_path,
    create_shard,
    decode_attrs,
    fsync_dir,
    fsync_file,
    identity_differences,
    layout_from_meta,
    read_chunk_map,
    read_meta,
    row_checksum,
)
from .writer import nonfinite_rows

logger = logging.getLogger(__name__)

SMALL = ("done", "skip_reason", "checksum", "block_count")


@dataclass
class ShardReport:
    """What :func:`verify_shard` found in one shard file."""

    path: Path
    rows: int = 0
    done: int = 0  # rows flagged done (skipped ones included)
    intact: int = 0  # done rows whose bytes are present and match their checksum
    damaged: list[int] = field(default_factory=list)  # done rows that are not intact
    nonfinite: list[int] = field(default_factory=list)  # of those: bytes as written, values NaN/inf
    kept_blocks: list[int] = field(default_factory=list)
    kept_rows: int = 0  # rows of the kept blocks (what a repair keeps)
    block_size: int = 0
    problems: list[str] = field(default_factory=list)  # file-level findings
    complete: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems and not self.damaged

    def line(self) -> str:
        state = "ok" if self.ok else "DAMAGED"
        s = (
            f"{self.path.name}: {state}; {self.rows} rows, {self.done} done, {self.intact} intact, "
            f"{len(self.damaged)} damaged"
        )
        if self.damaged:
            s += f" (rows {self.damaged[:8]}{' ...' if len(self.damaged) > 8 else ''})"
        if self.nonfinite:
            s += (
                f"; {len(self.nonfinite)} of them hold non-finite values (NaN/inf; rows {self.nonfinite[:8]}"
                f"{' ...' if len(self.nonfinite) > 8 else ''}), which stop stage 2"
            )
        if not self.ok:
            s += f"; a repair keeps {self.kept_rows} and redoes {self.rows - self.kept_rows}"
        if self.complete:
            s += "; complete"
        if self.problems:
            s += "; " + "; ".join(self.problems)
        return s


class _Raw:
    """Rows of a shard file read from the chunk offsets (no HDF5); rows past the end read as None."""

    def __init__(self, path: Path, cmap: dict[str, np.ndarray]) -> None:
        self.cmap = cmap
        self.fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size

    def spec(self, name: str) -> tuple[tuple[int, ...], np.dtype, int]:
        shape = tuple(int(x) for x in self.cmap[name + "@shape"])
        return shape, np.dtype(str(self.cmap[name + "@dtype"])), int(self.cmap[name + "@rows"])

    def row(self, name: str, r: int) -> np.ndarray | None:
        shape, dt, per = self.spec(name)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        off = int(self.cmap[name][r // per]) + (r % per) * nbytes
        if off + nbytes > self.size:
            return None
        buf = os.pread(self.fd, nbytes, off)
        return np.frombuffer(buf, dt).reshape(shape) if len(buf) == nbytes else None

    def column(self, name: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        """All ``n`` rows of a small dataset, read chunk by chunk: ``(values, present (n,) bool)``."""
        shape, dt, per = self.spec(name)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        vals = np.zeros((n, *shape), dt)
        present = np.zeros(n, bool)
        for c, off in enumerate(self.cmap[name].tolist()):
            lo, hi = c * per, min((c + 1) * per, n)
            if hi <= lo:
                continue
            buf = os.pread(self.fd, (hi - lo) * nbytes, int(off))
            k = len(buf) // nbytes if nbytes else 0
            if k:
                vals[lo : lo + k] = np.frombuffer(buf[: k * nbytes], dt).reshape((k, *shape))
                present[lo : lo + k] = True
        return vals, present

    def close(self) -> None:
        os.close(self.fd)


def _load_map(path: Path, report: ShardReport) -> dict[str, np.ndarray] | None:
    try:
        return read_chunk_map(path)
    except (OSError, ValueError, KeyError) as e:
        report.problems.append(f"its chunk map {chunk_map_path(path).name} is unreadable ({e})")
    try:  # a missing map: take the offsets from the file itself when HDF5 can open it
        with h5py.File(path, "r") as f:
            meta = decode_attrs(f.attrs)
            layout = layout_from_meta(meta, int(f["done"].shape[0]))
            m = chunk_map(f, [*layout.per_sample(), "block_stats", "block_count"])
    except H5_ERRORS as e:
        report.problems.append(f"HDF5 cannot read its chunk offsets either ({e})")
        return None
    logger.warning("%s: no chunk map, read the chunk offsets from the file", path.name)
    m["@checked"] = np.array(layout.checked())
    m["@count"] = np.array(layout.count, np.int64)
    m["@block_size"] = np.array(layout.block_size, np.int64)
    return m


def check_hdf5(path: Path, report: ShardReport) -> None:
    """Open the file and every object in it (their metadata blocks carry checksums: format.LIBVER)."""
    from .lock import is_hdf5_lock_error

    try:
        with h5py.File(path, "r") as f:
            report.complete = bool(decode_attrs(f.attrs).get("complete", False))
            names: list[str] = []
            f.visit(names.append)
            for n in names:
                obj = f[n]
                dict(obj.attrs)
                if isinstance(obj, h5py.Dataset):
                    obj.id.get_space()
    except H5_ERRORS as e:
        if is_hdf5_lock_error(e):
            raise
        report.complete = False
        report.problems.append(f"HDF5 cannot read it ({type(e).__name__}: {e})")


def verify_shard(path: Path) -> ShardReport:
    """Check one shard: every done sample's bytes against its checksum; HDF5 readability; size."""
    path = Path(path)
    report = ShardReport(path=path)
    if not path.exists():
        report.problems.append("the file is missing")
        return report
    check_hdf5(path, report)
    cmap = _load_map(path, report)
    if cmap is None:
        return report
    raw = _Raw(path, cmap)
    try:
        _verify_rows(raw, cmap, report)
    finally:
        raw.close()
    return report


def data_end(cmap: dict[str, np.ndarray]) -> int:
    """The byte where the shard's last allocated chunk ends (a shorter file is truncated)."""
    ends = [
        int(offs.max())
        + int(cmap[k + "@rows"])
        * int(np.prod(cmap[k + "@shape"], dtype=np.int64))
        * np.dtype(str(cmap[k + "@dtype"])).itemsize
        for k, offs in cmap.items()
        if "@" not in k and offs.size
    ]
    return max(ends, default=0)


def _verify_rows(raw: _Raw, cmap: dict[str, np.ndarray], report: ShardReport) -> None:
    n = int(cmap["@count"])
    report.rows = n
    checked = [str(x) for x in cmap["@checked"]]
    if raw.size < data_end(cmap):
        report.problems.append(f"truncated: {raw.size} bytes, its data extend to {data_end(cmap)}")
    done, dp = raw.column("done", n)
    reason, rp = raw.column("skip_reason", n)
    crc, cp = raw.column("checksum", n)
    done = done.astype(bool) & dp
    report.done = int(done.sum())
    intact = np.zeros(n, bool)
    for r in np.flatnonzero(done).tolist():
        if not (rp[r] and cp[r]):
            continue
        if reason[r] != b"":
            intact[r] = True
            continue
        rows: dict[str, Any] = {}
        for name in checked:
            v = raw.row(name, r)
            if v is None:
                break
            rows[name] = v[None]
        else:
            intact[r] = row_checksum(rows, 0, checked) == int(crc[r])
            if intact[r] and nonfinite_rows(rows)[0].any():  # written as computed, but NaN/inf: not usable
                intact[r] = False
                report.nonfinite.append(r)
    report.intact = int(intact.sum())
    report.damaged = np.flatnonzero(done & ~intact).tolist()
    B = report.block_size = int(cmap["@block_size"])
    nb = max(
        1, -(-n // B)
    )  # write blocks (Layout.num_blocks); format 2 had one chunk each, format 3 one extent
    _, cnp = raw.column("block_count", nb)
    for b in range(min(nb, -(-n // B))):
        lo, hi = b * B, min((b + 1) * B, n)
        if intact[lo:hi].all() and cnp[b] and raw.row("block_stats", b) is not None:
            report.kept_blocks.append(b)
            report.kept_rows += hi - lo


def repair_shard(
    path: Path,
    layout: Layout,
    attrs: dict[str, Any],
    keys: list[str],
    report: ShardReport | None = None,
    reduction: Any = None,
    metadata_checked: bool = False,
) -> ShardReport:
    """Write a fresh shard holding the intact write blocks of the damaged ``path``; rename the damaged
    file aside (kept, never deleted) and put the fresh one in its place. Returns the report used.
    ``reduction``: the cache's PCA basis (:class:`cache.reduce.Reduction`) for a reduced-dimension shard.

    Rows are kept only when who wrote them is known to be this run's teacher, dataset and settings: the
    identity the chunk map records (``@identity``) must equal ``attrs``' (else refused, nothing changed);
    a chunk map without one (an older cache) is trusted only when ``metadata_checked`` (the shard's own
    HDF5 attributes were read and compared by the caller), else every row is redone."""
    path = Path(path)
    report = report or verify_shard(path)
    cmap = read_chunk_map(path) if chunk_map_path(path).exists() else None
    if cmap is not None and "@identity" in cmap:
        recorded = json.loads(str(cmap["@identity"]))
        diff = identity_differences(recorded, attrs)
        if diff:
            said = "; ".join(
                f"{k}: {json.dumps(recorded.get(k), default=str)[:70]} on disk, "
                f"{json.dumps(cache_identity(attrs).get(k), default=str)[:70]} in this run"
                for k in diff
            )
            raise ValueError(
                f"the damaged shard {path} was written by another run ({said}; from its chunk map "
                f"{chunk_map_path(path).name}), so this run cannot keep its samples: rerun with the settings it was "
                "made with, or write elsewhere (--out). Nothing was changed."
            )
    elif report.kept_blocks and not metadata_checked:
        logger.warning(
            "%s: neither its metadata nor its chunk map says who wrote its rows (a chunk map of an older toolkit); "
            "keeping none of its %d intact samples: all are redone",
            path.name,
            report.kept_rows,
        )
        report.kept_blocks, report.kept_rows = [], 0
    if cmap is not None:
        for name, (shape, dt) in layout.per_sample().items():
            had = (
                tuple(int(x) for x in cmap.get(name + "@shape", [-1])),
                str(cmap.get(name + "@dtype", "?")),
            )
            if had != (tuple(shape), dt.str):
                raise ValueError(
                    f"the damaged shard {path} was made with other settings ({name}: {had} on disk, {(tuple(shape), dt.str)} "
                    "in this run), so this run cannot reuse its samples; rerun with the settings it was made with, "
                    "or write elsewhere (--out). Nothing was changed."
                )
    fresh = path.with_name(path.name + ".repair")
    create_shard(fresh, layout, attrs, keys, reduction=reduction)
    if report.kept_blocks and cmap is not None:
        raw = _Raw(path, cmap)
        try:
            with h5py.File(fresh, "r+") as f:
                _copy_blocks(raw, f, layout, report)
                fsync_file(f)
        finally:
            raw.close()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = path.with_name(f"{path.name}.damaged-{stamp}")
    os.replace(path, aside)
    if chunk_map_path(path).exists():
        os.replace(chunk_map_path(path), chunk_map_path(aside))
    os.replace(chunk_map_path(fresh), chunk_map_path(path))
    os.replace(fresh, path)
    fsync_dir(path.parent)
    msg = (
        f"repaired {path.name}: kept {report.kept_rows} of {report.rows} samples ({report.intact} intact, "
        f"{len(report.damaged)} damaged; {report.rows - report.kept_rows} to redo); the damaged file is kept as "
        f"{aside.name}"
    )
    logger.warning(msg)
    print(msg, flush=True)
    return report


def _copy_blocks(raw: _Raw, f: h5py.File, layout: Layout, report: ShardReport) -> None:
    n, B = report.rows, report.block_size
    names = [k for k in layout.per_sample() if k != "done"]
    for b in report.kept_blocks:
        lo, hi = b * B, min((b + 1) * B, n)
        for name in names:
            vals = [raw.row(name, r) for r in range(lo, hi)]
            f[name][lo:hi] = np.stack(vals)  # every row of a kept block is present (checked)
        f["block_stats"][b] = raw.row("block_stats", b)
        f["block_count"][b] = raw.row("block_count", b)
        f["done"][lo:hi] = True


def verify_cache(out_dir: Path) -> tuple[list[ShardReport], list[str]]:
    """Every shard of a cache directory, and the index: ``(reports, problems of the index)``."""
    out_dir = Path(out_dir)
    shards = sorted(out_dir.glob("shard-*-of-*.h5"))
    index_problems: list[str] = []
    index = out_dir / INDEX_NAME
    if index.exists():
        try:
            listed = read_meta(index).get("shards") or []
        except H5_ERRORS as e:
            listed = []
            index_problems.append(f"{INDEX_NAME} cannot be opened ({e}); the next run rebuilds it")
        for name in listed:
            if not (out_dir / name).exists():
                index_problems.append(
                    f"{INDEX_NAME} lists {name}, which is missing; rerun the same command to redo that shard's samples"
                )
                shards.append(out_dir / name)
    elif not shards:
        index_problems.append(f"{out_dir} holds no cache ({INDEX_NAME} or shard-*.h5)")
    reports = [verify_shard(p) for p in sorted(set(shards))]
    return reports, index_problems
