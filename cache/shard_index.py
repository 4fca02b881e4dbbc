"""The index of a set of webdataset shards, built once and memory-mapped by every later process.

Building walks each tar once (:func:`walk_shard`: member offsets and sizes, the small caption members;
no image is read from a local file, a remote one is streamed once) and produces flat arrays. Saved
(:meth:`ShardIndex.save`, a folder of ``.npy`` files and ``meta.json``), they are opened with
``np.load(mmap_mode="r")``: every process of a node (ranks and DataLoader workers) shares the page cache's
one copy, nothing is unpickled or copied into Python lists, and start-up costs a few ``open`` calls.

Arrays (``N`` samples, ``S`` shards; bytes per sample in brackets):

    ``shard_start (S + 1,)`` int64      first sample of each shard (the shard of a sample: searchsorted)
    ``img (N, 2)`` int64 [16]           image member (offset, size) in its tar; (-1, -1) when none
    ``ext (N,)`` int8 [1]               image extension (index into ``meta["image_exts"]``), -1 when none
    ``bad (N,)`` int8 [1]               0, or the reason the sample is skipped (:data:`BAD_KINDS`)
    ``key_off (N + 1,)`` int64 [8]      ``key_bytes[key_off[i]:key_off[i+1]]``: the key inside its shard
    ``key_bytes`` uint8                 UTF-8 keys, concatenated
    ``key_hash (N,)`` uint64, ``key_order (N,)`` int64 [16]   full keys' 64-bit hashes, sorted: key -> index
    ``cap<j>_off (N + 1,)`` int64 [8], ``cap<j>`` uint8       caption of granularity ``j``, UTF-8 (empty: none)
    ``dup (M, 2)`` int64                the duplicates (index, index of the first copy)

``meta.json`` names the shards (URLs without secrets), their sizes, the caption fields, the image
extensions and the format version; ``problems.jsonl`` lists what the walk found (truncated shards, bad
captions, ...). An index that does not match the dataset asked for is refused, naming the difference.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from webdataset.tariterators import base_plus_ext

from .datasets import escape_name
from .locations import ByteReader, SourceUnavailableError, is_pipe, public_url

logger = logging.getLogger(__name__)

INDEX_VERSION = 1
BAD_KINDS = ("", "truncated", "no_image", "duplicate")
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members (__key__/, __index__)


@dataclass
class Sample:
    """One sample met while walking a tar."""

    shard: int
    key: str  # key inside the shard
    members: dict[str, tuple[int, int]] = field(default_factory=dict)  # ext -> (offset, size)
    truncated: list[str] = field(default_factory=list)  # extensions cut off by a truncated tar
    texts: dict[str, bytes] = field(default_factory=dict)  # the members read whole (captions)


def problem(shard: str, kind: str, message: str, key: str | None = None) -> dict[str, Any]:
    return {"shard": shard, "key": key, "kind": kind, "message": message}


def walk_shard(
    url: str, shard: int, reader: ByteReader, read_exts: set[str]
) -> tuple[list[Sample], list[dict[str, Any]]]:
    """Walk one tar: ``(samples in tar order, problems)``. Members whose extension is in ``read_exts`` (the
    captions) are read whole; of the others only the headers (local files: seeks; remote: one sequential
    stream; ``pipe:``: the command's output). Never raises for a bad tar: it becomes a problem."""
    where = public_url(url)
    try:
        size = reader.size(url)
    except SourceUnavailableError:  # the server, not this shard: indexing stops (resumable)
        raise
    except (OSError, ValueError) as e:
        return [], [problem(where, "unreadable", f"{where}: cannot read ({e}); no sample read from it")]
    samples: dict[str, Sample] = {}
    problems: list[dict[str, Any]] = []
    end = 0  # end of the last whole member's data
    last: tuple[Sample, str] | None = None
    try:
        fh = reader.open(url)
    except (OSError, ValueError) as e:
        return [], [problem(where, "unreadable", f"{where}: cannot open ({e}); no sample read from it")]
    with fh:
        try:
            # member names as bytes the OS would give (undecodable bytes as surrogates), escaped into keys below
            mode = "r|" if is_pipe(url) else "r:"
            tf = tarfile.open(fileobj=fh, mode=mode, encoding="utf-8", errors="surrogateescape")
        except (tarfile.ReadError, OSError, EOFError) as e:
            return [], [
                problem(where, "unreadable", f"not a readable tar file ({e}); no sample read from it")
            ]
        while True:
            try:
                ti = tf.next()
            except (tarfile.ReadError, EOFError, OSError) as e:
                if last is not None and size is None:  # a stream: the member before the cut may be short
                    s, ext = last
                    s.members.pop(ext, None)
                    s.texts.pop(ext, None)
                    s.truncated.append(ext)
                problems.append(
                    problem(
                        where,
                        "truncated",
                        f"{where}: truncated tar (unreadable header after byte {end}"
                        f"{f' of {size}' if size is not None else ''}: {e}); what lies before the cut is read "
                        f"({len(samples)} sample(s) indexed), any sample after it is lost (re-download this shard "
                        "to recover them)",
                    )
                )
                break
            if ti is None:
                break
            if not ti.isreg() or _META.match(ti.name):
                continue
            parts = base_plus_ext(ti.name)
            if parts is None or parts[0] is None:
                problems.append(
                    problem(where, "no_key", f"member {escape_name(ti.name)!r} has no key.ext name; ignored")
                )
                continue
            key, ext = escape_name(parts[0]), escape_name(parts[1]).lower()
            if key != parts[0]:
                problems.append(
                    problem(
                        where,
                        "escaped_name",
                        f"member {key}.{ext}: the name is not valid UTF-8; kept under the escaped key {key!r}",
                        key,
                    )
                )
            s = samples.setdefault(key, Sample(shard, key))
            if size is not None and ti.offset_data + ti.size > size:
                s.truncated.append(ext)
                continue
            if ext in s.members:
                problems.append(
                    problem(where, "duplicate_member", f"{ti.name!r} appears twice; the first kept", key)
                )
                continue
            if ext in read_exts:
                try:
                    data = tf.extractfile(ti).read()  # type: ignore[union-attr]
                except (tarfile.ReadError, OSError, EOFError):
                    s.truncated.append(ext)
                    continue
                if len(data) < ti.size:
                    s.truncated.append(ext)
                    continue
                s.texts[ext] = data
            s.members[ext] = (ti.offset_data, ti.size)
            end = ti.offset_data + ti.size
            last = (s, ext)
    # a whole tar ends with two zero blocks after its last member; a cut at a header boundary leaves none
    cut = any(s.truncated for s in samples.values())
    marker_ok = True
    if size is not None:
        tail = (end + 511) // 512 * 512
        marker = reader.read(url, tail, 1024) if tail < size else b""
        marker_ok = len(marker) == 1024 and not marker.strip(b"\0")
    if (cut or not marker_ok) and not any(p["kind"] == "truncated" for p in problems):
        problems.append(
            problem(
                where,
                "truncated",
                f"{where}: the tar is truncated after byte {end}{f' of {size}' if size is not None else ''}: the "
                "samples before the cut are read, any after it are lost (re-download this shard to recover them)",
            )
        )
    return list(samples.values()), problems


_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


def fnv1a(off: np.ndarray, data: np.ndarray, start: np.ndarray | None = None) -> np.ndarray:
    """64-bit FNV-1a of packed strings (:func:`pack_strings`), all at once: one vectorised pass per byte
    position. ``start`` continues from given states (the hash of a prefix): ``(N,)`` uint64."""
    n = len(off) - 1
    lens = np.diff(off)
    h = np.full(n, _FNV_OFFSET, np.uint64) if start is None else np.array(start, np.uint64)
    first = np.asarray(off[:-1])
    with np.errstate(over="ignore"):
        for p in range(int(lens.max(initial=0))):
            m = np.nonzero(lens > p)[0]
            h[m] = (h[m] ^ data[first[m] + p].astype(np.uint64)) * _FNV_PRIME
    return h


def key_hash(keys: Sequence[str] | str) -> np.ndarray:
    """64-bit hashes of full keys (FNV-1a of the UTF-8 bytes, stable across processes and runs): ``(N,)`` uint64."""
    items = [keys] if isinstance(keys, str) else keys
    return fnv1a(*pack_strings([k.encode("utf-8", "surrogateescape") for k in items]))


def index_hashes(
    shard_start: np.ndarray, shard_names: list[str], key_off: np.ndarray, key_bytes: np.ndarray
) -> np.ndarray:
    """:func:`key_hash` of every full key ``<shard>/<key>`` of an index, from its arrays (no string built)."""
    prefix = key_hash([f"{n}/" for n in shard_names])
    counts = np.diff(shard_start)
    return fnv1a(key_off, key_bytes, np.repeat(prefix, counts))


def pack_strings(values: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Strings as ``(offsets (N + 1,) int64, bytes (total,) uint8)``."""
    off = np.zeros(len(values) + 1, np.int64)
    np.cumsum([len(v) for v in values], out=off[1:])
    data = np.frombuffer(b"".join(values), np.uint8) if off[-1] else np.zeros(0, np.uint8)
    return off, data


class ShardIndex:
    """The arrays of an index (see the module docstring), in memory or memory-mapped from a folder."""

    def __init__(
        self, arrays: dict[str, np.ndarray], meta: dict[str, Any], problems: list[dict[str, Any]]
    ) -> None:
        # plain ndarray views of the maps (indexing an np.memmap builds a memmap object each time: slow)
        arrays = {k: v.view(np.ndarray) if isinstance(v, np.memmap) else v for k, v in arrays.items()}
        self.arrays, self.meta, self.problems = arrays, meta, problems
        a = arrays
        self.shard_start, self.img, self.ext, self.bad = a["shard_start"], a["img"], a["ext"], a["bad"]
        self.key_off, self.key_bytes = a["key_off"], a["key_bytes"]
        self.granularities: list[str] = list(meta["caption_fields"])
        self.shard_names: list[str] = list(meta["shard_names"])
        self.path: Path | None = None

    def __getstate__(self) -> dict[str, Any]:
        if self.path is not None:  # saved: a worker maps the same files, nothing is copied
            return {"path": str(self.path)}
        return {
            "arrays": {k: np.asarray(v) for k, v in self.arrays.items()},
            "meta": self.meta,
            "problems": self.problems,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "path" in state:
            other = ShardIndex.load(state["path"], with_problems=False)
            self.__dict__.update(other.__dict__)
        else:
            self.__init__(state["arrays"], state["meta"], state["problems"])  # type: ignore[misc]

    def __len__(self) -> int:
        return int(self.shard_start[-1])

    def shard_of(self, i: int) -> int:
        return int(np.searchsorted(self.shard_start, i, side="right")) - 1

    def inner_key(self, i: int) -> str:
        a, b = self.key_off[i : i + 2].tolist()
        return self.key_bytes[a:b].tobytes().decode("utf-8")

    def key(self, i: int) -> str:
        """The full key ``<shard>/<key>`` of sample ``i``."""
        return f"{self.shard_names[self.shard_of(i)]}/{self.inner_key(i)}"

    def keys_range(self, start: int, stop: int) -> list[str]:
        """The full keys ``<shard>/<key>`` of samples ``[start, stop)``, one decode per shard touched (the
        only Python strings made are the ones returned)."""
        out: list[str] = []
        if stop <= start:
            return out
        first, last = self.shard_of(start), self.shard_of(stop - 1)
        for s in range(first, last + 1):
            a, b = max(start, int(self.shard_start[s])), min(stop, int(self.shard_start[s + 1]))
            o = self.key_off[a : b + 1].tolist()
            raw = self.key_bytes[o[0] : o[-1]].tobytes()
            base, prefix = o[0], self.shard_names[s] + "/"
            out += [prefix + raw[o[i] - base : o[i + 1] - base].decode("utf-8") for i in range(b - a)]
        return out

    def caption(self, j: int, i: int) -> str | None:
        a, b = self.arrays[f"cap{j}_off"][i : i + 2].tolist()
        return self.arrays[f"cap{j}"][a:b].tobytes().decode("utf-8") if b > a else None

    def captions(self, i: int) -> dict[str, str]:
        out = {}
        for j, g in enumerate(self.granularities):
            c = self.caption(j, i)
            if c:
                out[g] = c
        return out

    def duplicate_of(self, i: int) -> int:
        dup = self.arrays["dup"]
        hit = np.nonzero(dup[:, 0] == i)[0]
        return int(dup[hit[0], 1]) if len(hit) else -1

    def index_of(self, keys: Sequence[str]) -> np.ndarray:
        """The sample index of each full key, -1 for keys not in the index: ``(len(keys),)`` int64."""
        h = key_hash(keys)
        sorted_h, order = self.arrays["key_hash"], self.arrays["key_order"]
        pos = np.searchsorted(sorted_h, h)
        out = np.full(len(keys), -1, np.int64)
        for q, (k, p) in enumerate(zip(keys, pos)):
            while p < len(sorted_h) and sorted_h[p] == h[q]:  # equal hashes: compare the keys themselves
                cand = int(order[p])
                if self.key(cand) == k:
                    out[q] = cand
                    break
                p += 1
        return out

    # ------------------------------------------------------------------ build / save / load
    @classmethod
    def build(
        cls,
        urls: list[str],
        shard_names: list[str],
        read_exts: set[str],
        image_exts: tuple[str, ...],
        caption_fields: dict[str, str],
        decode_captions: Any,
        reader: ByteReader,
        pattern: Any,
    ) -> ShardIndex:
        """Walk every shard once. ``decode_captions(sample, where) -> dict[granularity, str]`` turns a sample's
        text members into captions (listing its own problems)."""
        problems: list[dict[str, Any]] = []
        starts = [0]
        img: list[tuple[int, int]] = []
        ext: list[int] = []
        bad: list[int] = []
        inner: list[bytes] = []
        full_keys: list[str] = []
        caps: list[list[bytes]] = [[] for _ in caption_fields]
        dups: list[tuple[int, int]] = []
        first_of: dict[str, int] = {}
        sizes: list[int | None] = []
        walked: list[Sample] = []
        for s, url in enumerate(urls):
            samples, probs = walk_shard(url, s, reader, read_exts)
            problems += probs
            sizes.append(None if is_pipe(url) else _size_or_none(reader, url))
            walked = samples
            for smp in walked:
                i = len(img)
                full = f"{shard_names[s]}/{smp.key}"
                got = decode_captions(smp, full, problems)
                e = next((x for x in image_exts if x in smp.members), None)
                kind = 0
                if e is None and any(x in image_exts for x in smp.truncated):
                    kind = 1
                elif e is None:
                    kind = 2
                elif smp.key in first_of:
                    kind = 3
                    dups.append((i, first_of[smp.key]))
                else:
                    first_of[smp.key] = i
                img.append(smp.members[e] if e is not None else (-1, -1))
                ext.append(image_exts.index(e) if e is not None else -1)
                bad.append(kind)
                inner.append(smp.key.encode("utf-8"))
                full_keys.append(full)
                for j, g in enumerate(caption_fields):
                    caps[j].append(got.get(g, "").encode("utf-8"))
                if kind == 0 and not got and caption_fields:
                    problems.append(
                        problem(
                            public_url(url),
                            "no_caption",
                            f"{full}: image without caption ({', '.join(f'{g}={f}' for g, f in caption_fields.items())}); "
                            "kept, its text embeddings are marked missing",
                            smp.key,
                        )
                    )
            starts.append(len(img))
        n = len(img)
        if len(set(full_keys)) != n:
            raise ValueError(
                f"shard names collide in {public_url(str(pattern))!r}: give shards distinct paths"
            )
        arrays: dict[str, np.ndarray] = {
            "shard_start": np.asarray(starts, np.int64),
            "img": np.asarray(img, np.int64).reshape(n, 2),
            "ext": np.asarray(ext, np.int8),
            "bad": np.asarray(bad, np.int8),
            "dup": np.asarray(dups, np.int64).reshape(-1, 2),
        }
        arrays["key_off"], arrays["key_bytes"] = pack_strings(inner)
        h = index_hashes(arrays["shard_start"], list(shard_names), arrays["key_off"], arrays["key_bytes"])
        order = np.argsort(h, kind="stable")
        arrays["key_hash"], arrays["key_order"] = h[order], order.astype(np.int64)
        for j in range(len(caption_fields)):
            arrays[f"cap{j}_off"], arrays[f"cap{j}"] = pack_strings(caps[j])
        meta = {
            "version": INDEX_VERSION,
            "pattern": _public(pattern),
            "shards": [public_url(u) for u in urls],
            "shard_names": list(shard_names),
            "shard_sizes": sizes,
            "caption_fields": dict(caption_fields),
            "image_exts": list(image_exts),
            "num_samples": n,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        return cls(arrays, meta, problems)

    def save(self, path: str | Path) -> Path:
        """Write the folder atomically (a temporary folder renamed into place)."""
        path = Path(path)
        tmp = path.with_name(f"{_TMP_PREFIX.format(name=path.name)}{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, arr in self.arrays.items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(arr), allow_pickle=False)
        (tmp / "problems.jsonl").write_text("".join(json.dumps(p, default=str) + "\n" for p in self.problems))
        (tmp / "meta.json").write_text(json.dumps(self.meta, indent=1))
        if path.exists():
            shutil.rmtree(path)
        os.rename(tmp, path)
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | Path, mmap: bool = True, with_problems: bool = True) -> ShardIndex:
        """Open a saved index; the arrays memory-mapped (never unpickled: ``allow_pickle=False``); the problems
        list is read when ``with_problems``."""
        path = Path(path)
        try:
            meta = json.loads((path / "meta.json").read_text())
        except (OSError, ValueError) as e:
            raise ValueError(
                f"{path} is not a shard index (meta.json: {e}); delete it to build it again"
            ) from e
        if meta.get("version") != INDEX_VERSION:
            raise ValueError(
                f"{path}: shard index version {meta.get('version')}, this toolkit reads {INDEX_VERSION}; "
                "delete it (or run tipsdistill-index) to build it again"
            )
        arrays = {}
        for f in path.glob("*.npy"):
            arrays[f.stem] = np.load(f, mmap_mode="r" if mmap else None, allow_pickle=False)
        problems = []
        if with_problems:
            problems = [
                json.loads(line) for line in (path / "problems.jsonl").read_text().splitlines() if line
            ]
        ix = cls(arrays, meta, problems)
        ix.path = path
        return ix


_TMP_PREFIX = ".{name}.tmp-"  # + the saving process's pid


def remove_partial_saves(path: str | Path) -> list[Path]:
    """Remove the temporary folders of saves of ``path`` that never finished (their builder was killed with
    ``kill -9`` while writing) and return them. Call it holding ``path``'s :class:`IndexLock`: the one process
    that may be saving holds it, so any such folder then is a leftover."""
    path = Path(path)
    stale = sorted(path.parent.glob(f"{_TMP_PREFIX.format(name=path.name)}*"))
    for tmp in stale:
        shutil.rmtree(tmp, ignore_errors=True)
    if stale:
        logger.info("removed %d unfinished save(s) of the shard index %s: %s", len(stale), path, stale)
    return stale


def _size_or_none(reader: ByteReader, url: str) -> int | None:
    try:
        return reader.size(url)
    except (OSError, ValueError):
        return None


def _public(pattern: Any) -> Any:
    return [public_url(p) for p in pattern] if isinstance(pattern, list) else public_url(str(pattern))


class IndexLock:
    """An exclusive lock beside an index folder (``fcntl.flock``): the first process builds, the others wait
    and then read what it wrote."""

    def __init__(self, path: Path) -> None:
        self.path = path.with_name(path.name + ".lock")

    def __enter__(self) -> IndexLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: Any) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
