"""Cache format versions: format 3 (contiguous datasets) rows sit at offset + r * row_bytes; a
format-2 cache (one-sample chunks, written by the previous code: ``tests/data/format2_cache``) is
still read, and an interrupted one is resumed in its own layout."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import torch

from tipsdistill.cache import extract_features, open_cache
from tipsdistill.cache.format import read_chunk_map

FORMAT2 = Path(__file__).resolve().parent / "data" / "format2_cache"
SHARD = "shard-00000-of-00001.h5"
SETTINGS = dict(
    teacher="tests.cache_helpers:build_tiny_teacher",
    dataset="synthetic",
    dataset_kwargs={"split": "train", "size": 12, "image_size": 32},
    image_size=32,
    batch_size=4,
    num_workers=0,
    progress=False,
)


def _items(path: Path) -> list[dict]:
    cache = open_cache(path)
    try:
        return cache.__getitems__(list(range(len(cache))))
    finally:
        cache.close()


# The fixture was computed on another day, maybe with another intra-op thread count (fitted to the idle
# cores, cache/resources.py), so a freshly computed float32 value can round to the neighbouring float16:
# rows computed now match it to one float16 step (2**-11 relative); rows read from the same bytes exactly.
FP16_STEP = dict(rtol=2.0**-10, atol=2.0**-24)


def _same_items(a: list[dict], b: list[dict], tol: dict | None = None) -> None:
    tol = tol or dict(atol=0, rtol=0)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["key"] == y["key"]
        for k in ("patch", "cls"):
            torch.testing.assert_close(x[k], y[k], **tol)
        for g in x["text"]:
            torch.testing.assert_close(x["text"][g], y["text"][g], **tol)


def test_format3_rows_at_contiguous_offsets(tmp_path):
    extract_features(out=str(tmp_path / "c"), **SETTINGS)
    cmap = read_chunk_map(tmp_path / "c" / SHARD)
    with h5py.File(tmp_path / "c" / SHARD) as f:
        assert f.attrs["format_version"] == 3
        fd = os.open(tmp_path / "c" / SHARD, os.O_RDONLY)
        try:
            for name in ("patch", "cls", "text/alt", "checksum", "done"):
                ds = f[name]
                assert ds.chunks is None and int(cmap[name + "@rows"]) == 12
                assert int(cmap[name][0]) == ds.id.get_offset()
                buf = np.empty((3, *ds.shape[1:]), ds.dtype)  # rows 5..7 with one preadv
                os.preadv(fd, [memoryview(buf).cast("B")], ds.id.get_offset() + 5 * buf[0].nbytes)
                np.testing.assert_array_equal(buf, ds[5:8])
        finally:
            os.close(fd)


def test_format2_cache_read_and_resumed(tmp_path):
    # the format-2 cache of the previous code reads back exactly as this code writes the same data
    extract_features(out=str(tmp_path / "new"), **SETTINGS)
    new = _items(tmp_path / "new")
    old = open_cache(FORMAT2)
    assert old.meta["format_version"] == 2 and old.spec.reduce_dim == 0
    old.close()
    _same_items(_items(FORMAT2), new, FP16_STEP)
    with h5py.File(FORMAT2 / SHARD) as f:  # the format-2 reader returns the stored values exactly
        stored = torch.from_numpy(f["patch"][:].astype(np.float32))
    got = torch.stack([x["patch"] for x in _items(FORMAT2)]).reshape(stored.shape)
    torch.testing.assert_close(got, stored, atol=0, rtol=0)
    # interrupted (the last 5 samples not done, no index): this code finishes it in its own layout
    out = tmp_path / "old"
    shutil.copytree(FORMAT2, out)
    with h5py.File(out / SHARD, "r+") as f:
        assert f["patch"].chunks == (1, 16, 32)
        f["done"][7:] = False
        f.attrs["complete"] = False
        f["patch"][7:] = 0  # what is redone must be written again, not left over
    (out / "index.h5").unlink()
    s = extract_features(out=str(out), **SETTINGS)
    assert s["complete"] and s["done"] == 12
    with h5py.File(out / SHARD) as f:
        assert f.attrs["format_version"] == 2 and f["patch"].chunks == (1, 16, 32)
    resumed = _items(out)
    _same_items(resumed, new, FP16_STEP)
    # the write blocks without a redone row keep the fixture's bytes (rows 0-3 at batch 4); rows 4-6 share a
    # block with the redone row 7, so they are recomputed and written again: equal to one float16 step above
    # (bitwise only where this CPU's kernels round as the fixture's machine did)
    untouched = 7 // SETTINGS["batch_size"] * SETTINGS["batch_size"]
    _same_items(resumed[:untouched], _items(FORMAT2)[:untouched])


def test_format2_cache_verified_and_repaired(tmp_path):
    from tipsdistill.cache.repair import verify_shard

    assert verify_shard(FORMAT2 / SHARD).ok
    out = tmp_path / "old"
    shutil.copytree(FORMAT2, out)
    cmap = read_chunk_map(out / SHARD)
    assert int(cmap["patch@rows"]) == 1  # format 2: one sample per chunk
    with open(out / SHARD, "r+b") as fh:  # flip bytes in the patch data of row 5 (block 1 of 3)
        fh.seek(int(cmap["patch"][5]) + 100)
        b = bytearray(fh.read(8))
        fh.seek(int(cmap["patch"][5]) + 100)
        fh.write(bytes(x ^ 0xFF for x in b))
    rep = verify_shard(out / SHARD)
    assert rep.damaged == [5] and rep.kept_rows == 8, rep.line()
    s = extract_features(out=str(out), repair=True, **SETTINGS)
    assert s["complete"]
    new = tmp_path / "new"
    extract_features(out=str(new), **SETTINGS)
    _same_items(_items(out), _items(new), FP16_STEP)  # the repaired (now format-3) shard: the same samples
    assert verify_shard(out / SHARD).ok


def test_a_long_skip_reason_keeps_its_kind_and_its_fix():
    from tipsdistill.cache.format import REASON_BYTES, fit_reason

    assert fit_reason("corrupt: a.png: bad") == b"corrupt: a.png: bad"
    long = (
        "outside_root: t.csv/2: /"
        + "deep/" * 80
        + "b.png' is outside the folder, refused (allow_root=FOLDER)"
    )
    cut = fit_reason(long)
    assert len(cut) <= REASON_BYTES and cut.startswith(b"outside_root: t.csv/2: /deep/")
    assert cut.endswith(b"refused (allow_root=FOLDER)") and b" ... " in cut
    wide = "é" * 300  # two bytes each: never split inside a character
    assert len(fit_reason(wide)) <= REASON_BYTES and fit_reason(wide).decode("utf-8").startswith("é")
