"""Webdataset tar shards (what img2dataset writes) as a map-style dataset with random access by key.

Each shard is indexed once when the dataset is built: the tar headers are walked with
:mod:`tarfile` (member offsets and sizes, no image is read), members are grouped into samples with
webdataset's own rule (``webdataset.tariterators.base_plus_ext``: ``dir/key.ext``), and the small
caption members are read. Items are then read by offset (``os.pread``), so the dataset is map-style:
stage 1 splits it across ranks and DataLoader workers by index exactly like a folder (no sample read
twice or skipped), and stage 2 reads the images of a cache again by key.

Keys are ``<shard>/<key>`` where ``<shard>`` is the shard's path relative to the shards' common
folder without ``.tar`` (``00000/000000012``), so a cache is matched back to its shards.

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

import glob
import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import braceexpand
import numpy as np
from torch.utils.data import Dataset
from webdataset.tariterators import base_plus_ext

from .datasets import BadImageError, _as_size, escape_name, load_image_bytes, log_problems, register_dataset

logger = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
DEFAULT_CAPTION_FIELDS = {"alt": "txt"}
MAX_OPEN_SHARDS = 64
_META = re.compile(r"__[^/]*__($|/)")


def expand_urls(urls: str | list[str]) -> list[str]:
    """Shard paths from a pattern: braces expanded (``{00000..00009}``, like webdataset), ``::``-separated
    lists and globs; every shard must exist (remote URLs are refused: random access needs local files)."""
    items = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for item in items:
        for part in str(item).split("::"):
            for p in braceexpand.braceexpand(part):
                if re.match(r"^[a-z][a-z0-9+]*://|^pipe:", p):
                    raise ValueError(
                        f"shard {p!r} is not a local file: random access by key needs the shards on disk; "
                        "download them first (e.g. with img2dataset or `aws s3 sync`) and give the local pattern"
                    )
                if any(c in p for c in "*?["):
                    found = sorted(glob.glob(p))
                    if not found:
                        raise ValueError(f"no shard matches {p!r}")
                    out += found
                else:
                    out.append(p)
    missing = [p for p in out if not Path(p).is_file()]
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(out)} shard(s) of {urls!r} do not exist (first: {missing[:3]}); check the "
            "pattern (braces like {00000..00009} are expanded)"
        )
    if not out:
        raise ValueError(f"the shard pattern {urls!r} names no file")
    return out


def absolute_pattern(urls: str | list[str]) -> str | list[str]:
    """``urls`` with each ``::``-separated pattern made absolute (braces and globs kept)."""
    if isinstance(urls, str):
        return "::".join(os.path.abspath(u) for u in urls.split("::"))
    return [os.path.abspath(u) for u in urls]


@dataclass
class _Sample:
    shard: int
    key: str  # key inside the shard
    members: dict[str, tuple[int, int]] = field(default_factory=dict)  # ext -> (offset, size)
    truncated: list[str] = field(default_factory=list)  # extensions cut off by a truncated tar


def index_shard(path: str | Path, shard: int) -> tuple[list[_Sample], list[dict[str, Any]]]:
    """Walk one tar's headers: ``(samples in tar order, problems)``; nothing but headers is read."""
    path = Path(path)
    size = path.stat().st_size
    samples: dict[str, _Sample] = {}
    problems: list[dict[str, Any]] = []
    end = 0  # end of the last whole member's data
    try:
        # member names as bytes the OS would give (undecodable bytes as surrogates), escaped into keys below
        with tarfile.open(path, "r:", encoding="utf-8", errors="surrogateescape") as tf:
            while True:
                try:
                    ti = tf.next()
                except (tarfile.ReadError, EOFError, OSError) as e:
                    problems.append(
                        _problem(
                            path,
                            "truncated",
                            f"{path}: truncated tar (unreadable header after byte {end} of {size}: {e}); what lies "
                            f"before the cut is read ({len(samples)} sample(s) indexed), any sample after it is "
                            "lost (re-download this shard to recover them)",
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
                        _problem(
                            path, "no_key", f"member {escape_name(ti.name)!r} has no key.ext name; ignored"
                        )
                    )
                    continue
                key, ext = escape_name(parts[0]), escape_name(parts[1]).lower()
                if key != parts[0]:
                    problems.append(
                        _problem(
                            path,
                            "escaped_name",
                            f"member {key}.{ext}: the name is not valid UTF-8; kept under the escaped key {key!r}",
                            key,
                        )
                    )
                s = samples.setdefault(key, _Sample(shard, key))
                if ti.offset_data + ti.size > size:
                    s.truncated.append(ext)
                    continue
                if ext in s.members:
                    problems.append(
                        _problem(path, "duplicate_member", f"{ti.name!r} appears twice; the first kept", key)
                    )
                    continue
                s.members[ext] = (ti.offset_data, ti.size)
                end = ti.offset_data + ti.size
    except tarfile.ReadError as e:
        problems.append(
            _problem(path, "unreadable", f"not a readable tar file ({e}); no sample read from it")
        )
        return [], problems
    # a whole tar ends with two zero blocks after its last member; a cut at a header boundary leaves none
    tail = (end + 511) // 512 * 512
    with open(path, "rb") as fh:
        fh.seek(tail)
        marker = fh.read(1024)
    cut = any(s.truncated for s in samples.values())
    if cut or len(marker) < 1024 or marker.strip(b"\0"):
        if not any(p["kind"] == "truncated" for p in problems):
            problems.append(
                _problem(
                    path,
                    "truncated",
                    f"{path}: the tar is truncated after byte {end} of {size}: the samples before "
                    "the cut are read, any after it are lost (re-download this shard to recover them)",
                )
            )
    return list(samples.values()), problems


def _problem(path: Path, kind: str, message: str, key: str | None = None) -> dict[str, Any]:
    return {"shard": str(path), "key": key, "kind": kind, "message": message}


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
        urls: shard pattern(s): ``/data/{00000..00009}.tar``, a list, ``a.tar::b.tar`` or a glob.
        caption_fields: granularity -> member extension or ``json.<key>`` (default ``{"alt": "txt"}``).
        image_exts: member extensions tried for the image, in order (default jpg, jpeg, png, webp).
        image_size / resize / min_side / max_pixels: as :class:`cache.datasets.ImageFolderDataset`.
        captions_encoding: text encoding of the caption members.
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
    ) -> None:
        self.urls = urls
        self.max_pixels = max_pixels
        self.paths = [str(Path(p).resolve()) for p in expand_urls(urls)]
        self.caption_fields = dict(DEFAULT_CAPTION_FIELDS if caption_fields is None else caption_fields)
        self.image_exts = tuple(e.lower().lstrip(".") for e in image_exts)
        self.image_size, self.resize, self.min_side = _as_size(image_size), resize, int(min_side)
        self.encoding = captions_encoding
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()
        root = os.path.commonpath([os.path.dirname(p) for p in self.paths])
        self.shard_names = [str(Path(os.path.relpath(p, root)).with_suffix("")) for p in self.paths]
        self.problems: list[dict[str, Any]] = []
        all_samples: list[_Sample] = []
        for i, p in enumerate(self.paths):
            s, probs = index_shard(p, i)
            all_samples += s
            self.problems += probs
        self._check_fields(all_samples)
        self._samples = all_samples
        self._keys = [f"{self.shard_names[s.shard]}/{s.key}" for s in all_samples]
        if len(set(self._keys)) != len(self._keys):
            raise ValueError(f"shard names collide in {urls!r}: give shards distinct paths")
        self._bad: dict[int, tuple[str, str]] = {}
        self._captions: list[dict[str, str]] = []
        first_of: dict[str, str] = {}
        for i, s in enumerate(all_samples):
            self._captions.append(self._read_captions(s, i))
            img = self._image_ext(s)
            where = self._keys[i]
            if img is None and any(e in self.image_exts for e in s.truncated):
                self._bad[i] = (
                    "truncated",
                    f"the image member is cut off by the truncated shard {self.paths[s.shard]}",
                )
            elif img is None:
                have = ", ".join(sorted(s.members)) or "nothing whole"
                self._bad[i] = (
                    "no_image",
                    f"no image member ({'/'.join(self.image_exts)}); the sample has {have}",
                )
            elif s.key in first_of:  # the first usable copy of a key is kept
                self._bad[i] = (
                    "duplicate",
                    f"key {s.key!r} was already read from {first_of[s.key]}; this copy is not used",
                )
            else:
                first_of[s.key] = where
            if i not in self._bad and not self._captions[i] and self.caption_fields:
                self.problems.append(
                    _problem(
                        Path(self.paths[s.shard]),
                        "no_caption",
                        f"{where}: image without caption ({', '.join(f'{g}={f}' for g, f in self.caption_fields.items())}); "
                        "kept, its text embeddings are marked missing",
                        s.key,
                    )
                )
        if not self._samples:
            raise ValueError(
                f"no sample found in the {len(self.paths)} shard(s) of {urls!r}; problems: {self.problems[:3]}"
            )
        # compact per-sample index (a few dozen bytes a sample, not a Python object each): shard id,
        # image member (offset, size, extension id; -1 when none) and the captions per granularity
        n = len(all_samples)
        self._shard = np.fromiter((s.shard for s in all_samples), np.int32, n)
        self._img = np.full((n, 3), -1, np.int64)
        for i, s in enumerate(all_samples):
            ext = self._image_ext(s)
            if ext is not None:
                self._img[i] = (*s.members[ext], self.image_exts.index(ext))
        self._caps = {g: [c.get(g) for c in self._captions] for g in self.caption_fields}
        self._n = n
        del self._samples, self._captions
        self.close()
        log_problems(str(urls), self.problems)

    # ------------------------------------------------------------------ construction helpers
    def _image_ext(self, s: _Sample) -> str | None:
        return next((e for e in self.image_exts if e in s.members), None)

    def _check_fields(self, samples: list[_Sample]) -> None:
        exts = sorted({e for s in samples for e in s.members})
        need_json = {f.split(".", 1)[0] for f in self.caption_fields.values() if "." in f and f not in exts}
        json_keys: set[str] = set()
        for g, f in self.caption_fields.items():
            if f in exts:
                continue
            ext, _, key = f.partition(".")
            if key and ext in exts:
                if not json_keys:  # the keys of the first few JSON members, to name them in the error
                    for s in [s for s in samples if ext in s.members][:20]:
                        try:
                            obj = json.loads(self._read(s, ext))
                        except (ValueError, OSError):
                            continue
                        json_keys |= set(obj) if isinstance(obj, dict) else set()
                if key.split(".")[0] in json_keys:
                    continue
            raise ValueError(
                f"caption field {f!r} (granularity {g!r}) is in no sample of {self.urls!r}: member extensions found: "
                f"{exts}; JSON keys found{' in ' + '/'.join(sorted(need_json)) if need_json else ''}: "
                f"{sorted(json_keys) or 'none'}. Map granularities to these, e.g. caption_fields={{'alt': 'txt', "
                "'short': 'json.<key>'}"
            )

    def _read_captions(self, s: _Sample, i: int) -> dict[str, str]:
        caps: dict[str, str] = {}
        parsed: dict[str, Any] = {}
        for g, f in self.caption_fields.items():
            ext, key = (f, "") if f in s.members or "." not in f else f.split(".", 1)
            if ext not in s.members:
                continue
            try:
                raw = self._read(s, ext)
            except OSError as e:
                self.problems.append(
                    _problem(Path(self.paths[s.shard]), "unreadable", f"{self._key(s)}.{ext}: {e}", s.key)
                )
                continue
            try:
                text = raw.decode(self.encoding)
            except UnicodeDecodeError:
                self.problems.append(
                    _problem(
                        Path(self.paths[s.shard]),
                        "bad_encoding",
                        f"{self._key(s)}.{ext} is not valid {self.encoding}; caption {g!r} treated as missing (pass "
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
                        self.problems.append(
                            _problem(
                                Path(self.paths[s.shard]),
                                "bad_json",
                                f"{self._key(s)}.{ext} is not valid JSON ({e.msg}); its captions treated as missing",
                                s.key,
                            )
                        )
                        parsed[ext] = None
                val = _json_get(parsed[ext], key)
                text = val if isinstance(val, str) else ""
            if text.strip():
                caps[g] = text.strip()
        return caps

    def _key(self, s: _Sample) -> str:
        return f"{self.shard_names[s.shard]}/{s.key}"

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # forked into a DataLoader worker: do not share descriptors
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            if len(self._fds) >= MAX_OPEN_SHARDS:  # stay far below the open-file limit
                os.close(self._fds.pop(next(iter(self._fds))))
            fd = self._fds[shard] = os.open(self.paths[shard], os.O_RDONLY)
        return fd

    def close(self) -> None:
        """Close the shard files this process opened (they reopen on the next read)."""
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}

    def _read(self, s: _Sample, ext: str) -> bytes:
        off, n = s.members[ext]
        return os.pread(self._fd(s.shard), n, off)

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_fds"] = {}
        return d

    # ------------------------------------------------------------------ Dataset API
    def __len__(self) -> int:
        return self._n

    def keys(self) -> list[str]:
        return list(self._keys)

    @property
    def caption_problems(self) -> list[str]:
        return [p["message"] for p in self.problems]

    def identity(self) -> dict[str, Any]:
        return {
            "name": "webdataset",
            "shards": len(self.paths),
            "first_shard": self.paths[0],
            "num_samples": self._n,
            "caption_fields": self.caption_fields,
            "image_size": None if self.image_size is None else list(self.image_size),
            "resize": self.resize,
        }

    def source_spec(self) -> dict[str, Any]:
        """The pattern as given with its paths made absolute (not the expanded list: a cache attribute
        holding thousands of shard paths would outgrow HDF5's compact attribute storage)."""
        return {
            "name": "webdataset",
            "kwargs": {
                "urls": absolute_pattern(self.urls),
                "caption_fields": self.caption_fields,
                "image_exts": list(self.image_exts),
                "captions_encoding": self.encoding,
            },
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        key = self._keys[index]
        bad = self._bad.get(index)
        if bad is not None:
            raise BadImageError(f"{key}: {bad[1]}", bad[0])
        shard = int(self._shard[index])
        off, size, e = (int(v) for v in self._img[index])
        where = f"{self.paths[shard]}:{key.rsplit('/', 1)[-1]}.{self.image_exts[e]}"
        try:
            data = os.pread(self._fd(shard), size, off)
        except OSError as err:
            raise BadImageError(f"{where}: cannot read: {err}", "unreadable") from err
        try:
            image = load_image_bytes(
                data, self.min_side, size=self.image_size, resize=self.resize, max_pixels=self.max_pixels
            )
        except BadImageError as err:
            raise BadImageError(f"{where}: {err}", err.kind) from err
        caps = {g: c[index] for g, c in self._caps.items() if c[index]}
        return {"key": key, "image": image, "captions": caps}
