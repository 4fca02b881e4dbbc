"""Stage 2's shard-aware order (``data.order=shards``, :class:`distill.data.ShardSampler`): exact across ranks,
resumable mid-epoch, deterministic, few tar files opened, validated in the config, and a training run with it.

The shards are webdataset tars in img2dataset's layout with bad samples (``tests/own_data_check.make_shards``:
a corrupt image, a caption without image, a duplicate key, a truncated shard), so the cached samples per shard
are unequal, as in real data.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.own_data_check import make_shards
from tests.test_train_support import base_overrides, tiny_teacher
from tipsdistill.distill.config import DataConfig, load_config
from tipsdistill.distill.data import ResumableSampler, ShardSampler, build_sampler, sample_seed

# unequal shards: 0..6 samples each, one empty label gap (labels need not be 0..S-1)
LABELS = np.repeat(np.array([3, 0, 7, 5, 1, 9, 2, 8]), [9, 7, 11, 1, 8, 10, 6, 9])


def _rank_orders(cls_kw: dict, world: int, epoch: int = 0) -> list[list[int]]:
    return [ShardSampler(LABELS, rank=r, world=world, seed=5, **cls_kw).order(epoch) for r in range(world)]


@pytest.mark.parametrize("window", [1, 2, 3])
def test_exact_across_1_2_3_ranks_and_the_same_batches_as_one_process(window):
    n = len(LABELS)
    single = ShardSampler(LABELS, window=window, seed=5).order(0)
    assert sorted(single) == list(range(n))  # one process: every sample once
    b = 4
    for world in (1, 2, 3):
        orders = _rank_orders({"window": window}, world)
        assert {len(o) for o in orders} == {n // world}  # equal counts per rank
        seen = [i for o in orders for i in o]
        assert len(seen) == len(set(seen)) == n // world * world  # no sample twice, n % world dropped
        assert set(seen) == set(single[: n // world * world])
        for k in range(n // world // b):  # the ranks' k-th batches = one process's k-th batch of world * b
            together = sorted(i for o in orders for i in o[k * b : (k + 1) * b])
            assert together == sorted(single[k * world * b : (k + 1) * world * b])
    # deterministic from the seed; another seed or epoch is another order; shards contiguous by window
    assert ShardSampler(LABELS, window=window, seed=5).order(0) == single
    assert ShardSampler(LABELS, window=window, seed=6).order(0) != single
    assert ShardSampler(LABELS, window=window, seed=5).order(1) != single
    segments = _segments(LABELS[single])
    assert all(len(seg) <= window for seg in segments) and len(segments) >= -(-8 // window)
    if window == 1:  # wids' ShardedSampler: one shard after the other
        assert len(segments) == 8


def _segments(labels: np.ndarray) -> list[set[int]]:
    """``labels`` (the shard of each sample in order) cut where every shard begun so far is complete: the
    stretches of whole shards the order is made of."""
    total = {int(s): int((LABELS == s).sum()) for s in set(LABELS.tolist())}
    out, cur, seen = [], set(), {}
    for x in labels.tolist():
        cur.add(x)
        seen[x] = seen.get(x, 0) + 1
        if all(seen[s] == total[s] for s in cur):
            out.append(cur)
            cur = set()
    assert not cur
    return out


def test_global_order_unchanged_and_shard_order_mixes_within_windows():
    """``data.order=global`` is today's permutation, bit for bit; ``shards`` shuffles within each window."""
    n = len(LABELS)
    g = torch.Generator().manual_seed(sample_seed(5, 7777, 0))
    assert ResumableSampler(n, seed=5).order(0) == torch.randperm(n, generator=g).tolist()
    order = ShardSampler(LABELS, window=2, seed=5).order(0)
    segments = _segments(LABELS[order])
    assert all(len(seg) <= 2 for seg in segments) and set().union(*segments) == set(LABELS.tolist())
    # within a window the samples are shuffled, not shard after shard: some stretch holds two shards
    assert any(len(seg) == 2 for seg in segments)


def test_resume_mid_epoch_equals_the_uninterrupted_sequence():
    """The endless iteration stage 2 uses, started at a saved ``(epoch, start)``, continues the uninterrupted
    one exactly, also past epoch bounds (each epoch's last partial batch dropped, as drop_last does)."""
    for world in (1, 3):
        for r in range(world):
            ref = ShardSampler(LABELS, window=2, rank=r, world=world, seed=1).endless(4)
            per_epoch = len(ref.order(0)) // 4 * 4
            total = 2 * per_epoch + 8
            it = iter(ref)
            full = [next(it) for _ in range(total)]
            assert [e for e, _ in full] == [0] * per_epoch + [1] * per_epoch + [2] * 8
            assert [i for _, i in full[:per_epoch]] == ref.order(0)[:per_epoch]
            for k in (4, 8, per_epoch, per_epoch + 4):  # resumes at batch bounds, also after an epoch
                again = ShardSampler(LABELS, window=2, rank=r, world=world, seed=1).endless(4)
                again.set_epoch(k // per_epoch, k % per_epoch)
                it2 = iter(again)
                assert [next(it2) for _ in range(total - k)] == full[k:]


def _tiny_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_locality_tar_opens_per_1000_far_below_the_global_order(tmp_path, monkeypatch):
    """160 shards of 12 samples, read in both orders by one process: every ``open`` of a tar counted."""
    import webdataset as wds

    from tipsdistill.cache.shards import MAX_OPEN_SHARDS, WebDatasetShards

    jpg = _tiny_jpeg()
    shards = 160
    for s in range(shards):
        with wds.TarWriter(str(tmp_path / f"{s:05d}.tar")) as w:
            for i in range(12):
                w.write({"__key__": f"{s:05d}{i:03d}", "jpg": jpg, "txt": f"caption {s} {i}"})
    ds = WebDatasetShards(str(tmp_path / f"{{00000..{shards - 1:05d}}}.tar"))
    n = len(ds)
    assert shards > MAX_OPEN_SHARDS and n == shards * 12
    opened: list[str] = []
    real_open = os.open

    def counting_open(path, *a, **kw):  # noqa: ANN001, ANN202
        if str(path).endswith(".tar"):
            opened.append(str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(os, "open", counting_open)
    shard_of = ds.shard_of(np.arange(n))
    assert shard_of.tolist() == np.repeat(np.arange(shards), 12).tolist()
    per_1000 = {}
    for name, sampler in (
        ("global", ResumableSampler(n, seed=0)),
        ("shards", ShardSampler(shard_of, window=4, seed=0)),
    ):
        ds.close()
        opened.clear()
        for i in sampler.order(0):
            assert ds[i]["key"] == ds.key(i)
        per_1000[name] = 1000 * len(opened) / n
    # shards: each tar opened once (1000 / 12 per 1000); global: about 1000 * (1 - 64 / 160)
    assert per_1000["shards"] == pytest.approx(1000 / 12)
    assert per_1000["global"] > 5 * per_1000["shards"], per_1000


def test_config_key_validated_with_a_clear_error(tmp_path):
    with pytest.raises(
        ValueError, match=r"data\.order='window' is invalid; choose one of \['global', 'shards'\]"
    ):
        load_config("distill", base_overrides(tmp_path, tmp_path / "o") + ["data.order=window"])
    with pytest.raises(ValueError, match=r"data\.shard_window=0 must be >= 1"):
        load_config(
            "distill", base_overrides(tmp_path, tmp_path / "o") + ["data.order=shards", "data.shard_window=0"]
        )
    with pytest.raises(ValueError, match=r"data\.order='x' is invalid"):
        build_sampler(list(range(4)), DataConfig(order="x"))


def test_a_source_without_shards_is_one_shard(caplog):
    """A folder or synthetic source has no tar shards: ``shards`` is one window over everything (logged)."""
    from tipsdistill.cache import build_dataset

    source = build_dataset("synthetic", split="train", size=10, image_size=32)

    class Items:  # what build_sampler reads of a DistillDataset: its source and its items' source indices
        def __init__(self) -> None:
            self.source, self.src_index = source, list(range(10))

        def __len__(self) -> int:
            return 10

    with caplog.at_level(logging.INFO, logger="tipsdistill.distill.data"):
        s = build_sampler(Items(), DataConfig(order="shards", shard_window=3), seed=2)
    assert isinstance(s, ShardSampler) and s.num_shards == 1
    assert sorted(s.order(0)) == list(range(10)) and "has no shards" in caplog.text


def test_table_files_are_shards_through_the_cached_subset(tmp_path):
    """``parquet:`` over a folder of files (img2dataset's parquet output): each file is a shard; the cache's
    samples (a :class:`CachedSubset`, in the cache's order) keep their file's shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tipsdistill.cache.dataset_spec import CachedSubset
    from tipsdistill.cache.tables import TableDataset

    for s, n in enumerate([3, 5, 2]):
        rows = {"jpg": [_tiny_jpeg()] * n, "caption": [f"caption {s} {i}" for i in range(n)]}
        pq.write_table(pa.table(rows), tmp_path / f"{s:05d}.parquet")
    table = TableDataset(str(tmp_path), image_field="jpg")
    assert table.shard_of(np.arange(10)).tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 2, 2]
    cached = CachedSubset(table, ["00002.parquet/1", "00000.parquet/0", "00001.parquet/1"])
    assert cached.shard_of(np.arange(3)).tolist() == [2, 0, 1]


# --------------------------------------------------------------------------- stage 2 from a webdataset cache
@pytest.fixture(scope="module")
def wds_cache(tmp_path_factory) -> tuple[Path, dict]:
    """Stage 1 over 5 shards of 6 samples with bad ones (24 good samples, 3 to 6 a shard)."""
    from tipsdistill.cache import extract_features
    from tipsdistill.cache.shards import WebDatasetShards

    root = tmp_path_factory.mktemp("wds")
    expect = make_shards(root)
    data = WebDatasetShards(
        str(root / "shards" / "{00000..00004}.tar"),
        caption_fields={"alt": "txt", "short": "json.short"},
        index=str(root / "index"),
    )
    out = root / "cache"
    extract_features(
        dict(out=str(out), image_size=32, batch_size=16, num_workers=0, progress=False),
        teacher=tiny_teacher(),
        dataset=data,
    )
    return out, expect


def _shard_overrides(cache: Path, out: Path) -> list[str]:
    return [o for o in base_overrides(cache, out) if not o.startswith("data.dataset")] + [
        "data.order=shards",
        "data.shard_window=2",
        "loss.caption_probs={short: 1.0}",
    ]


def test_loader_resumed_mid_epoch_gives_the_same_batches(wds_cache):
    """Stage 2's loader over the cache's shards: the shard of every item comes from the shard index, and a
    loader sought to a saved position (what a resume does) continues with the same items."""
    from tipsdistill.distill.task import build_task
    from tipsdistill.distill.train import _Loader

    cache, expect = wds_cache
    cfg = load_config("distill", _shard_overrides(cache, cache.parent / "unused"))
    built = build_task(cfg, device=torch.device("cpu"))
    sampler = built.sampler
    assert isinstance(sampler, ShardSampler) and sampler.num_shards == 5 and sampler.n == len(expect["good"])
    keys = [built.dataset.cache_keys[i].split("/")[0] for i in sampler.order(0)]
    assert len(set(keys[:6])) <= 2  # the first window: two shards

    def take(loader, k):  # noqa: ANN001, ANN202 - snapshots (the feeder reuses its buffers)
        out = []
        for _ in range(k):
            b = loader.next()
            snap = {name: v.clone() for name, v in b.items() if isinstance(v, torch.Tensor)}
            fb = b["features"]
            snap |= {  # (t_order is only written when a batch mixes sampling ratios)
                f"features/{name}": v[: fb.size].clone()
                for name, v in fb.tensors.items()
                if name != "t_order"
            }
            out.append((b["key"], snap))
        return out

    ref = take(_Loader(built.dataset, sampler, cfg), 7)  # 3 batches an epoch: into epoch 2
    resumed = _Loader(built.dataset, sampler, cfg)
    resumed.seek(1, 8)  # after step 4: epoch 1, one batch in
    again = take(resumed, 3)
    for (keys_a, a), (keys_b, b) in zip(ref[4:], again, strict=True):
        assert keys_a == keys_b and a.keys() == b.keys() and "features/patch" in a
        for name, value in a.items():
            assert torch.equal(value, b[name]), name
    assert sorted(sum((keys for keys, _ in ref[:3]), [])) == sorted(expect["good"])  # epoch 0: each once


def test_stage2_trains_and_a_resume_equals_the_uninterrupted_run(wds_cache, tmp_path):
    """Stage 2 (in this process, one rank) with ``data.order=shards`` over 2 epochs and a bit: 7 steps straight,
    and 3 steps then a resume from the step-3 checkpoint to 7: the same loss at every step after the resume."""
    import json

    from tipsdistill.distill.train import train

    cache, _ = wds_cache

    def losses(out: Path) -> dict[int, float]:
        recs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in recs if "loss" in r and "step" in r}

    over = ["steps=7", "checkpoint.every=3", "log.every=1"]
    straight = load_config("distill", _shard_overrides(cache, tmp_path / "a") + over)
    r = train(straight)
    assert r["step"] == 7 and np.isfinite(r["final"]["loss"])
    broken = load_config("distill", _shard_overrides(cache, tmp_path / "b") + over)
    assert train(broken, max_steps=3)["step"] == 3
    assert train(broken, resume="auto")["step"] == 7
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(a) == list(range(1, 8)) and {4, 5, 6, 7} <= set(b)
    assert [b[k] for k in (4, 5, 6, 7)] == [a[k] for k in (4, 5, 6, 7)]
