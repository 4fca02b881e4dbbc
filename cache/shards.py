"""Webdataset tar shards (what img2dataset writes) as a map-style dataset with random access by key.

Shards are local files, remote objects (``s3://``, ``gs://``, ``https://``, ``hf://``, through fsspec) or
``pipe:`` commands (:mod:`cache.locations`). Each shard is indexed once: the tar headers are walked with
:mod:`tarfile` (member offsets and sizes), members are grouped into samples with webdataset's own rule
(``webdataset.tariterators.base_plus_ext``: ``dir/key.ext``), and the small caption members are read
(:mod:`cache.shard_index`). With ``index=FOLDER`` (stage 1 passes ``OUT/data_index``) that index is
written once and memory-mapped by every later process, which then walks no tar header. Items are read
by offset: ``os.pread`` locally, one HTTP ``Range`` request remotely (sequential reads, as stage 1 makes
them, fetch a window of following samples in one request), so the dataset is map-style: stage 1 splits
it across ranks and DataLoader workers by index exactly like a folder (no sample read twice or
skipped), and stage 2 reads the images of a cache again by key.

Keys are ``<shard>/<key>`` where ``<shard>`` is the shard's path relative to the shards' common
folder without ``.tar`` (``00000/000000012``; for a URL its path, for a ``pipe:`` command the last
``*.tar`` word of the command), so a cache is matched back to its shards wherever they are read from.

Captions: ``caption_fields`` maps a granularity to a member extension (its text) or to
``json.<key>`` (a key, dotted for nesting, of the sample's ``.json`` member). Default
``{"alt": "txt"}``: the ``.txt`` member is the alt text; add e.g.
``{"short": "json.short_caption", "detailed": "json.detailed_caption"}``.

Bad input is never fatal and never silent:
  * a truncated tar keeps the members that are whole; a sample cut short becomes a skipped row
    (``truncated``), and the shard is listed in :attr:`problems` with the byte offset of the cut;
  * a corrupt image is a skipped row (``corrupt``, from the decoder) at extraction time;
  * a sample with captions but no image is a skipped row (``no_image``); an image without any caption
    is kept (``text_valid`` False) and listed; a caption that is not valid text in
    ``captions_encoding`` (or bad JSON) counts as missing and is listed;
  * a key found again in a later shard is a skipped row (``duplicate``) naming the first one;
  * a caption field that no sample has fails at construction, listing the extensions and JSON keys
    that exist.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from .datasets import BadImageError, _as_size, load_image_bytes, log_problems, register_dataset
from .locations import (
    ByteReader,
    SourceUnavailableError,
    expand_pattern,
    is_pipe,
    is_remote,
    public_pattern,
    public_url,
)
from .shard_index import BAD_KINDS, IndexLock, Sample, ShardIndex, problem, remove_partial_saves

logger = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
DEFAULT_CAPTION_FIELDS = {"alt": "txt"}
MAX_OPEN_SHARDS = 64
READAHEAD_BYTES = 8 << 20  # a sequential remote read fetches the following samples of its shard up to this
READAHEAD_SAMPLES = 256
_TAR_WORD = re.compile(r"[^\s'\"]+\.tar\b")


def expand_urls(urls: str | list[str]) -> list[str]:
    """Shard locations from a pattern: braces expanded (``{00000..00009}``, like webdataset), ``::``-separated
    lists, globs and folders (every ``.tar`` under it); local files must exist; remote URLs and ``pipe:``
    commands are kept (:func:`cache.locations.expand_pattern`)."""
    return expand_pattern(urls, (".tar",), what="shard")


def absolute_pattern(urls: str | list[str]) -> str | list[str]:
    """``urls`` with each ``::``-separated local pattern made absolute and each URL without secrets."""
    return public_pattern(urls)


def shard_names(paths: list[str]) -> list[str]:
    """The ``<shard>`` part of keys: each shard's path relative to the shards' common folder, without
    ``.tar`` (local files and URLs alike; a ``pipe:`` command by the last ``*.tar`` word it holds)."""
    parts = []
    for i, p in enumerate(paths):
        p = public_url(p)  # never a user name, password or token in a key
        if is_pipe(p):
            words = _TAR_WORD.findall(p)
            p = words[-1] if words else f"pipe{i:05d}.tar"
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", p):
            p = "/" + p.split("://", 1)[1]  # host and path: names stay distinct across hosts
        parts.append(p)
    root = (
        os.path.commonpath([os.path.dirname(p) for p in parts])
        if len(parts) > 1
        else os.path.dirname(parts[0])
    )
    names = [str(Path(os.path.relpath(p, root)).with_suffix("")) for p in parts]
    return names


def _json_get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


@register_dataset("webdataset")
class WebDatasetShards(Dataset):
    """Webdataset tar shards (see the module docstring).

    Args:
        urls: shard pattern(s): ``/data/{00000..00009}.tar``, ``s3://bucket/cc12m/{00000..01242}.tar``,
            ``https://host/shards/{0..9}.tar``, ``'pipe:aws s3 cp s3://b/{0..9}.tar -'``, a list,
            ``a.tar::b.tar``, a glob or a folder.
        caption_fields: granularity -> member extension or ``json.<key>`` (default ``{"alt": "txt"}``).
        image_exts: member extensions tried for the image, in order (default jpg, jpeg, png, webp).
        image_size / resize / min_side / max_pixels: as :class:`cache.datasets.ImageFolderDataset`.
        captions_encoding: text encoding of the caption members.
        index: a folder for the shard index (:mod:`cache.shard_index`): read when it exists (it must match
            these shards and settings), else built once and written there (one process builds, the others
            wait on a lock). ``None``: built in memory by this process.
    Member names that are not valid UTF-8 are kept, their keys escaped (:func:`cache.datasets.escape_name`)
    and listed in :attr:`problems`.
    """

    def __init__(
        self,
        urls: str | list[str],
        caption_fields: dict[str, str] | None = None,
        image_exts: list[str] | tuple[str, ...] = IMAGE_EXTS,
        image_size: int | tuple[int, int] | None = None,
        resize: str = "short_crop",
        min_side: int = 1,
        captions_encoding: str = "utf-8",
        max_pixels: int | None = None,
        index: str | None = None,
    ) -> None:
        self.urls = urls
        self.max_pixels = max_pixels
        self.paths = [p if is_remote(p) else str(Path(p).resolve()) for p in expand_urls(urls)]
        self.caption_fields = dict(DEFAULT_CAPTION_FIELDS if caption_fields is None else caption_fields)
        self.image_exts = tuple(e.lower().lstrip(".") for e in image_exts)
        self.image_size, self.resize, self.min_side = _as_size(image_size), resize, int(min_side)
        self.encoding = captions_encoding
        self.shard_names = shard_names(self.paths)
        self._reader = ByteReader(MAX_OPEN_SHARDS)
        self._buf: tuple[int, int, bytes] | None = None  # (shard, offset, bytes) of the last readahead
        self._last = -2
        self.index_path = None if index is None else str(Path(index).resolve())
        if self.index_path is None:
            self._ix = self._build()
        else:
            self._ix = self._open_or_build(Path(self.index_path))
        self.problems: list[dict[str, Any]] = list(self._ix.problems)
        self._n = len(self._ix)
        if not self._n:
            raise ValueError(
                f"no sample found in the {len(self.paths)} shard(s) of {public_pattern(urls)!r}; problems: "
                f"{self.problems[:3]}"
            )
        log_problems(str(public_pattern(urls)), self.problems)

    # ------------------------------------------------------------------ the index
    def _build(self) -> ShardIndex:
        self._exts_seen: set[str] = set()
        self._json_keys: set[str] = set()
        self._json_seen = 0
        read = set(self.caption_fields.values()) | {f.split(".", 1)[0] for f in self.caption_fields.values()}
        ix = ShardIndex.build(
            self.paths,
            self.shard_names,
            read,
            self.image_exts,
            self.caption_fields,
            self._decode_captions,
            self._reader,
            self.urls,
        )
        self._check_fields()
        self._reader.close()
        return ix

    def _open_or_build(self, path: Path) -> ShardIndex:
        with IndexLock(path):
            remove_partial_saves(path)
            if (path / "meta.json").exists():
                ix = ShardIndex.load(path)
                self._check_index(ix, path)
                logger.info(
                    "shard index %s: %d samples in %d shards (no tar walked)", path, len(ix), len(self.paths)
                )
                return ix
            ix = self._build()
            ix.save(path)
            logger.info("shard index written to %s: %d samples in %d shards", path, len(ix), len(self.paths))
            return ShardIndex.load(path)

    def _check_index(self, ix: ShardIndex, path: Path) -> None:
        """Refuse an index made for other shards or settings, naming the difference."""
        m = ix.meta
        diffs = []
        shards = [public_url(p) for p in self.paths]
        if m["shards"] != shards:
            diffs.append(
                f"shards: the index has {len(m['shards'])} (first {m['shards'][:1]}), asked {len(shards)} (first {shards[:1]})"
            )
        if m["caption_fields"] != self.caption_fields:
            diffs.append(f"caption_fields: index {m['caption_fields']}, asked {self.caption_fields}")
        if tuple(m["image_exts"]) != self.image_exts:
            diffs.append(f"image_exts: index {m['image_exts']}, asked {list(self.image_exts)}")
        if not diffs:
            for p, size in zip(self.paths, m["shard_sizes"]):
                if size is not None and not is_remote(p) and os.stat(p).st_size != size:
                    diffs.append(f"{p} is {os.stat(p).st_size} bytes, it was {size} when indexed")
                    break
        if diffs:
            raise ValueError(
                f"the shard index {path} does not match this dataset: {'; '.join(diffs)}. Delete it to build it "
                "again (tipsdistill-index), or give another index= folder"
            )

    def _decode_captions(self, s: Sample, where: str, problems: list[dict[str, Any]]) -> dict[str, str]:
        """A walked sample's text members -> captions per granularity; bad text listed in ``problems``."""
        self._exts_seen |= set(s.members)
        caps: dict[str, str] = {}
        parsed: dict[str, Any] = {}
        shard = public_url(self.paths[s.shard])
        for g, f in self.caption_fields.items():
            ext, key = (f, "") if f in s.members or "." not in f else f.split(".", 1)
            if ext not in s.texts:
                continue
            try:
                text = s.texts[ext].decode(self.encoding)
            except UnicodeDecodeError:
                problems.append(
                    problem(
                        shard,
                        "bad_encoding",
                        f"{where}.{ext} is not valid {self.encoding}; caption {g!r} treated as missing (pass "
                        "captions_encoding, e.g. latin-1, if the shards use another encoding)",
                        s.key,
                    )
                )
                continue
            if key:
                if ext not in parsed:
                    try:
                        parsed[ext] = json.loads(text)
                    except json.JSONDecodeError as e:
                        problems.append(
                            problem(
                                shard,
                                "bad_json",
                                f"{where}.{ext} is not valid JSON ({e.msg}); its captions treated as missing",
                                s.key,
                            )
                        )
                        parsed[ext] = None
                    if self._json_seen < 20 and isinstance(parsed[ext], dict):  # named in a field error
                        self._json_keys |= set(parsed[ext])
                        self._json_seen += 1
                val = _json_get(parsed[ext], key)
                text = val if isinstance(val, str) else ""
            if text.strip():
                caps[g] = text.strip()
        return caps

    def _check_fields(self) -> None:
        exts = sorted(self._exts_seen)
        need_json = {f.split(".", 1)[0] for f in self.caption_fields.values() if "." in f and f not in exts}
        for g, f in self.caption_fields.items():
            if f in exts:
                continue
            ext, _, key = f.partition(".")
            if key and ext in exts and key.split(".")[0] in self._json_keys:
                continue
            raise ValueError(
                f"caption field {f!r} (granularity {g!r}) is in no sample of {public_pattern(self.urls)!r}: member "
                f"extensions found: {exts}; JSON keys found{' in ' + '/'.join(sorted(need_json)) if need_json else ''}: "
                f"{sorted(self._json_keys) or 'none'}. Map granularities to these, e.g. caption_fields={{'alt': 'txt', "
                "'short': 'json.<key>'}"
            )

    # ------------------------------------------------------------------ reading
    def _read_image(self, index: int, shard: int, off: int, size: int) -> bytes:
        """The image member's bytes; a remote read right after the previous sample of the same shard
        fetches the following samples too (one request per window instead of one per image)."""
        url = self.paths[shard]
        if not is_remote(url) or is_pipe(url):
            return self._reader.read(url, off, size)
        buf = self._buf
        if buf is not None and buf[0] == shard and buf[1] <= off and off + size <= buf[1] + len(buf[2]):
            return buf[2][off - buf[1] : off - buf[1] + size]
        end = off + size
        if index == self._last + 1:  # sequential: read ahead within the shard
            stop = min(int(self._ix.shard_start[shard + 1]), index + READAHEAD_SAMPLES)
            rows = np.asarray(self._ix.img[index:stop])
            ends = rows[:, 0] + rows[:, 1]
            ok = (rows[:, 0] >= 0) & (ends - off <= READAHEAD_BYTES)
            if ok.any():
                end = max(end, int(ends[ok].max()))
        data = self._reader.read(url, off, end - off)
        self._buf = (shard, off, data)
        return data[:size]

    def close(self) -> None:
        """Close the shard files this process opened (they reopen on the next read)."""
        self._reader.close()
        self._buf = None

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_buf"] = None
        d["problems"] = []  # listed by the process that built the dataset; workers only read items
        return d

    # ------------------------------------------------------------------ Dataset API
    def __len__(self) -> int:
        return self._n

    def key(self, index: int) -> str:
        return self._ix.key(index)

    def keys(self) -> list[str]:
        return self._ix.keys_range(0, self._n)

    def keys_range(self, start: int, stop: int) -> list[str]:
        """The keys of samples ``[start, stop)``, read from the index's flat arrays (stage 1 keeps no key
        list: :class:`cache.plan.DatasetKeys`)."""
        return self._ix.keys_range(start, stop)

    def index_of(self, keys: list[str]) -> np.ndarray:
        """The index of each key, -1 for keys not in these shards: ``(len(keys),)`` int64 (no key list built)."""
        return self._ix.index_of(keys)

    def shard_of(self, indices: np.ndarray) -> np.ndarray:
        """The shard (index into :attr:`paths`) of each sample of ``indices``: ``(len(indices),)`` int64,
        from the index's shard bounds (stage 2's shard-aware order, ``data.order=shards``)."""
        return np.searchsorted(self._ix.shard_start, np.asarray(indices, np.int64), side="right") - 1

    @property
    def caption_problems(self) -> list[str]:
        return [p["message"] for p in self.problems]

    def identity(self) -> dict[str, Any]:
        return {
            "name": "webdataset",
            "shards": len(self.paths),
            "first_shard": public_url(self.paths[0]),
            "num_samples": self._n,
            "caption_fields": self.caption_fields,
            "image_size": None if self.image_size is None else list(self.image_size),
            "resize": self.resize,
        }

    def source_spec(self) -> dict[str, Any]:
        """The pattern as given with its local paths made absolute and its URLs without secrets (not the
        expanded list: a cache attribute holding thousands of shard paths would outgrow HDF5's compact
        attribute storage), and the index folder."""
        kw: dict[str, Any] = {
            "urls": absolute_pattern(self.urls),
            "caption_fields": self.caption_fields,
            "image_exts": list(self.image_exts),
            "captions_encoding": self.encoding,
        }
        if self.index_path is not None:
            kw["index"] = self.index_path
        return {"name": "webdataset", "kwargs": kw}

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self._n:
            raise IndexError(f"sample {index} out of range for {self._n} samples")
        ix = self._ix
        key = ix.key(index)
        shard = ix.shard_of(index)
        bad = int(ix.bad[index])
        if bad:
            kind = BAD_KINDS[bad]
            if kind == "truncated":
                why = f"the image member is cut off by the truncated shard {public_url(self.paths[shard])}"
            elif kind == "no_image":
                why = f"no image member ({'/'.join(self.image_exts)}) in this sample"
            else:
                first = ix.duplicate_of(index)
                why = f"key {ix.inner_key(index)!r} was already read from {ix.key(first)}; this copy is not used"
            raise BadImageError(f"{key}: {why}", kind)
        off, size = (int(v) for v in ix.img[index])
        where = f"{public_url(self.paths[shard])}:{ix.inner_key(index)}.{self.image_exts[int(ix.ext[index])]}"
        try:
            data = self._read_image(index, shard, off, size)
        except SourceUnavailableError:  # the server, not this sample: the run stops (resumable)
            raise
        except (OSError, ValueError) as err:
            raise BadImageError(f"{where}: cannot read: {err}", "unreadable") from err
        finally:
            self._last = index
        if len(data) != size:
            raise BadImageError(
                f"{where}: read {len(data)} of {size} bytes (the shard changed?)", "unreadable"
            )
        try:
            image = load_image_bytes(
                data, self.min_side, size=self.image_size, resize=self.resize, max_pixels=self.max_pixels
            )
        except BadImageError as err:
            raise BadImageError(f"{where}: {err}", err.kind) from err
        return {"key": key, "image": image, "captions": ix.captions(index)}
