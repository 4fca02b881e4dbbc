"""Reading a feature cache: ``open_cache(path, expect=None) -> FeatureCache`` (a torch Dataset).

The h5py file is opened lazily in each process that reads (h5py handles cannot be pickled), so a
``FeatureCache`` works in DataLoader workers under both fork and spawn.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from .format import FEATURES, INDEX_NAME, decode_attrs, read_skipped
from .writer import dequantise_int8


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
                "rerun the extraction command to finish it"
            )
        raise ValueError(
            f"{p} holds no feature cache ({INDEX_NAME} or shard-*.h5); run tipsdistill-cache first"
        )
    if not p.exists():
        raise ValueError(f"feature cache {p} does not exist; run tipsdistill-cache first")
    return p


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple, np.ndarray)) or isinstance(b, (list, tuple, np.ndarray)):
        try:
            return np.array_equal(np.asarray(a), np.asarray(b))
        except Exception:  # noqa: BLE001
            return False
    return a == b


class FeatureCache(Dataset):
    """The cached teacher features, one item per usable sample (skipped images are left out).

    Item dict: ``index`` (source dataset index), ``key``, ``patch`` float32 ``(h, w, D)`` (or
    ``(V, h, w, D)`` with ``boxes (V, 4)`` and ``flips (V,)`` when several views are stored),
    ``cls`` ``(C, D)`` (or ``(V, C, D)``), optional ``value_patch``, and when captions were embedded
    ``text`` dict granularity -> ``(Dt,)`` with ``text_valid`` dict granularity -> bool.
    """

    def __init__(
        self, path: str | Path, expect: dict[str, Any] | None = None, allow_incomplete: bool = False
    ) -> None:
        self.path = _resolve(path)
        with h5py.File(self.path, "r") as f:
            self.meta: dict[str, Any] = decode_attrs(f.attrs)
            done = f["done"][()].astype(bool)
            ok = f["skip_reason"][()] == b""
            self._keys = [k.decode() if isinstance(k, bytes) else k for k in f["keys"][()]]
            self.skipped: list[tuple[int, str, str]] = read_skipped(f)
            self._names = [n for n in FEATURES if n in f]
        if not self.meta.get("complete", False) and not allow_incomplete:
            raise ValueError(
                f"cache {self.path} is incomplete ({int(done.sum())} of {done.size} samples written); rerun the "
                "extraction command to finish it (or pass allow_incomplete=True to read the finished samples)"
            )
        self.valid = np.flatnonzero(done & ok)
        self.grid: tuple[int, int] = tuple(self.meta["grid"])
        self.num_views = int(self.meta.get("num_views", 1))
        self.granularities: list[str] = list(self.meta.get("granularities") or [])
        self.int8 = self.meta.get("storage_dtype") == "int8"
        self._h5: h5py.File | None = None
        self._pid = -1
        if expect:
            self.check(expect)

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

    def _file(self) -> h5py.File:
        if self._h5 is None or self._pid != os.getpid():
            self._h5 = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._h5

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_h5"], state["_pid"] = None, -1
        return state

    def _feature(self, f: h5py.File, name: str, j: int) -> torch.Tensor:
        x = f[name][j]
        x = dequantise_int8(x, f[name + "_scale"][j]) if self.int8 else x.astype(np.float32)
        if name != "cls":  # (..., h*w, D) -> (..., h, w, D)
            x = x.reshape(x.shape[:-2] + self.grid + x.shape[-1:])
        return torch.from_numpy(x)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a cache of {len(self)} samples")
        j = int(self.valid[i])
        f = self._file()
        item: dict[str, Any] = {"index": j, "key": self._keys[j]}
        for name in self._names:
            item[name] = self._feature(f, name, j)
        if self.num_views > 1:
            item["boxes"] = torch.from_numpy(f["boxes"][j])
            item["flips"] = torch.from_numpy(f["flips"][j].astype(bool))
        if self.granularities:
            item["text"] = {
                g: torch.from_numpy(f[f"text/{g}"][j].astype(np.float32)) for g in self.granularities
            }
            item["text_valid"] = {g: bool(f[f"text_valid/{g}"][j]) for g in self.granularities}
        return item

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None

    def __repr__(self) -> str:
        m = self.meta
        return (
            f"FeatureCache({self.path}, {len(self)} samples, grid {self.grid}, dim {m.get('dim')}, "
            f"{m.get('num_global_tokens')} global tokens, {m.get('storage_dtype')}, views {self.num_views})"
        )


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
