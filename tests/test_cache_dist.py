"""Stage 1 scale-out: two torchrun ranks write two shards read back as one dataset; reader workers."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import h5py
import pytest
import torch
from torch.utils.data import DataLoader

from tests.cache_helpers import write_captions, write_images
from tests.launch_helpers import torchrun
from tipsdistill.cache import extract_features, open_cache

REPO = Path(__file__).resolve().parents[1]
TEACHER = "tests.cache_helpers:build_tiny_teacher"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    rels = write_images(root / "img", 11, seed=7)
    write_captions(root / "caps.jsonl", rels)
    return root, rels


def test_two_ranks_two_shards_one_dataset_in_order(data, tmp_path):
    root, rels = data
    out = tmp_path / "c2"
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = torchrun()
    cmd += ["-m", "tipsdistill.scripts.cache_features", "--teacher", TEACHER, "--images", str(root / "img")]
    cmd += [
        "--captions",
        str(root / "caps.jsonl"),
        "--out",
        str(out),
        "--image-size",
        "32",
        "--batch-size",
        "4",
    ]
    cmd += ["--num-workers", "0", "--quiet"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "shard-00000-of-00002.h5").exists() and (out / "shard-00001-of-00002.h5").exists()
    with h5py.File(out / "shard-00001-of-00002.h5") as f:
        assert f.attrs["shard_start"] == 5 and f.attrs["shard_count"] == 6 and f.attrs["complete"]
    two = open_cache(out, expect={"num_samples": 11, "dim": 32})
    assert two.keys() == rels
    # the same data in one process: identical features, same order
    one = tmp_path / "c1"
    extract_features(
        out=str(one),
        teacher=TEACHER,
        dataset="folder",
        dataset_kwargs={"root": str(root / "img"), "captions": str(root / "caps.jsonl")},
        image_size=32,
        batch_size=4,
        num_workers=2,  # DataLoader workers decode (fork)
        progress=False,
    )
    single = open_cache(one)
    assert len(single) == len(two) == 11
    for i in range(11):
        a, b = two[i], single[i]
        assert a["index"] == b["index"] == i and a["key"] == b["key"]
        torch.testing.assert_close(a["patch"], b["patch"], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(a["text"]["short"], b["text"]["short"], atol=5e-3, rtol=2e-3)
    for k in ("patch_mean", "patch_std", "cls_mean"):
        torch.testing.assert_close(
            torch.as_tensor(two.meta[k]), torch.as_tensor(single.meta[k]), atol=1e-3, rtol=1e-3
        )
    # batched reads across both shards (any order, repeats, negative indices) equal single reads
    # and the index's virtual datasets (the presentation for external tools)
    order = [10, 0, 4, 5, 6, 5, -1, 3]
    batch = two.__getitems__(order)
    with h5py.File(out / "index.h5") as f:
        vds = f["patch"][()]
    for i, it in zip(order, batch):
        ref = two[i]
        assert it["index"] == ref["index"] and it["key"] == ref["key"]
        for k in ("patch", "cls"):
            torch.testing.assert_close(it[k], ref[k], rtol=0, atol=0)
        torch.testing.assert_close(it["text"]["alt"], ref["text"]["alt"], rtol=0, atol=0)
        assert it["text_valid"] == ref["text_valid"]
        torch.testing.assert_close(it["patch"].reshape(-1, 32), torch.from_numpy(vds[it["index"]]).float())
    with pytest.raises(IndexError):
        two.__getitems__([0, 11])


@pytest.mark.parametrize("context", ["spawn", "fork"])
def test_reader_workers(data, tmp_path, context):
    root, rels = data
    out = tmp_path / "c"
    extract_features(
        out=str(out),
        teacher=TEACHER,
        dataset="folder",
        dataset_kwargs={"root": str(root / "img")},
        image_size=32,
        batch_size=4,
        num_workers=0,
        storage="int8",
        granularities=[],
        progress=False,
    )
    cache = open_cache(out)
    cache[0]  # opened in the parent first: workers must reopen, not inherit the handle
    loader = DataLoader(cache, batch_size=3, num_workers=2, multiprocessing_context=context)
    batches = list(loader)
    got = torch.cat([b["patch"] for b in batches])
    keys = [k for b in batches for k in b["key"]]
    assert keys == rels
    ref = torch.stack([cache[i]["patch"] for i in range(len(cache))])
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
