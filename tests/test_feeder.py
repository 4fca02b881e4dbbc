"""Stage 2's one data path for cached features: the batch reader (``FeatureCache.read_batch``), the
training process's feature feeder and the device-side targets, each equal to its reference
(``tests/item_reference.py``: rows read item by item with plain h5py, ``align_teacher_map`` per sample on
the CPU), across shard boundaries, under fork and spawn workers, and after a resume. CPU, tiny caches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from tests.cache_helpers import write_captions, write_images
from tests.item_reference import ReferenceRows, item_targets
from tests.test_train_support import base_overrides, make_cache
from tipsdistill.cache import extract_features, open_cache
from tipsdistill.cache.codec import decode

TEACHER = "tests.cache_helpers:build_tiny_teacher"


def _extract(out: Path, root: Path, **kw) -> None:
    extract_features(
        out=str(out),
        teacher=TEACHER,
        dataset="folder",
        dataset_kwargs={"root": str(root / "img"), "captions": str(root / "caps.jsonl")},
        image_size=32,
        batch_size=4,
        num_workers=0,
        progress=False,
        **kw,
    )


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict[str, Path]:
    """``two``: int8 + captions in 2 shards (written rank by rank); ``views``: float16, 3 views, 1 shard."""
    root = tmp_path_factory.mktemp("feeder")
    rels = write_images(root / "img", 11, seed=3)
    write_captions(root / "caps.jsonl", rels, skip=(2,))
    mp = pytest.MonkeyPatch()
    try:
        for rank in (0, 1):
            mp.setenv("RANK", str(rank))
            mp.setenv("WORLD_SIZE", "2")
            mp.setenv("LOCAL_RANK", str(rank))
            _extract(root / "two", root, storage="int8")
    finally:
        mp.undo()
    _extract(root / "views", root, views=3)
    return {"two": root / "two", "views": root / "views"}


def _reference(cache, indices: list[int]) -> dict[str, torch.Tensor]:
    """The reference float32 values of ``indices`` (h5py, item by item), stacked (patch (.., h*w, D))."""
    return ReferenceRows(cache).stacked(indices)


def _decoded(host: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {k: decode(host[k], host.get(k + "_scale")) for k in ("patch", "cls")}
    for k, v in host.items():
        if k.startswith("text/"):
            out[k] = decode(v)
        elif k.startswith("text_valid/"):
            out[k] = v.clone()
    return out


class _Batches(Dataset):
    """DataLoader workers calling the batch reader (each reopens the shards in its own process)."""

    def __init__(self, path: Path) -> None:
        self.cache = open_cache(path)

    def __len__(self) -> int:
        return len(self.cache)

    def __getitems__(self, idx: list[int]) -> dict[str, torch.Tensor]:
        got = self.cache.read_batch(idx, ("patch", "cls", "text")).host()
        return {k: v.clone() for k, v in got.items()} | {"index": torch.tensor(idx)}


def _first(batch: list) -> dict[str, torch.Tensor]:
    return batch  # __getitems__ already returns the whole batch


def _random_batches(n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    out = [rng.permutation(n)[:5].tolist() for _ in range(4)]
    return out + [[0, 5, 6, 10], [4, 5], [6, 6, 4, 4, 10]]  # across the shard boundary (5 | 6), repeats


def test_batch_reader_equals_the_reference_in_process(caches, monkeypatch, caplog):
    cache = open_cache(caches["two"])
    assert len(cache._open()) == 2 and cache.int8
    for idx in _random_batches(len(cache), 0):
        fb = cache.read_batch(idx, ("patch", "cls", "text"))
        host = fb.host()
        assert host["patch"].dtype == torch.int8 and host["patch_scale"].dtype == torch.float32
        assert host["text/alt"].dtype == torch.float16 and fb.indices.tolist() == idx
        want, got = _reference(cache, idx), _decoded(host)
        for k in want:
            assert torch.equal(got[k], want[k]), k
        # the items (cache[i]) are the same rows decoded
        items = cache.__getitems__(idx)
        assert [it["key"] for it in items] == [cache.keys()[i] for i in idx]
        assert torch.equal(torch.stack([it["patch"].flatten(0, 1) for it in items]), want["patch"])
        assert all(it["text_valid"]["alt"] == bool(want["text_valid/alt"][k]) for k, it in enumerate(items))
    # only the fields asked for; a reused buffer; a wrong one is refused naming the fix
    out = cache.alloc_batch(5, ("cls",))
    assert set(out.tensors) == {"cls", "cls_scale"}
    assert cache.read_batch([3, 7], ("cls",), out=out) is out and out.size == 2
    with pytest.raises(ValueError, match="alloc_batch"):
        cache.read_batch([1], ("patch",), out=out)
    with pytest.raises(ValueError, match="value-trick"):
        cache.read_batch([1], ("value_patch",))
    with pytest.raises(IndexError, match="out of range"):
        cache.read_batch([11])
    # the h5py fallback (e.g. a compressed dataset) gives the same values and says so once
    import tipsdistill.cache.reader as reader

    monkeypatch.setattr(reader, "_map_rows", lambda ds, path: (None, "it is filtered (compressed)"))
    slow = open_cache(caches["two"])
    with caplog.at_level("INFO", logger="tipsdistill.cache.reader"):
        for idx in _random_batches(len(slow), 1)[-3:]:
            got = _decoded(slow.read_batch(idx, ("patch", "cls", "text")).host())
            want = _reference(slow, idx)
            assert all(torch.equal(got[k], want[k]) for k in want)
    assert caplog.text.count("dataset patch is read through h5py") == 2  # once per shard


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_batch_reader_equals_the_reference_in_workers(caches, context):
    ds = _Batches(caches["two"])
    ds.cache.read_batch([0, 9])  # opened in the parent first: workers must reopen, not inherit
    batches = _random_batches(len(ds), 2)
    loader = DataLoader(
        ds, batch_sampler=batches, num_workers=2, collate_fn=_first, multiprocessing_context=context
    )
    seen = 0
    for idx, got in zip(batches, loader, strict=True):
        assert got["index"].tolist() == idx
        want = _reference(ds.cache, idx)
        dec = _decoded(got)
        for k in want:
            assert torch.equal(dec[k], want[k]), k
        seen += 1
    assert seen == len(batches)


def test_batch_reader_one_view_of_several(caches):
    cache = open_cache(caches["views"])
    assert cache.num_views == 3 and not cache.int8
    idx, views = [4, 0, 10, 4], [2, 0, 1, 0]
    host = cache.read_batch(idx, ("patch", "cls", "boxes", "flips"), views=views).host()
    assert host["patch"].shape == (4, 16, 32) and host["boxes"].shape == (4, 3, 4)
    ref = ReferenceRows(cache)
    for k, (i, v) in enumerate(zip(idx, views, strict=True)):
        it = ref.item(i)
        assert torch.equal(cache[i]["patch"], it["patch"]) and torch.equal(cache[i]["boxes"], it["boxes"])
        assert torch.equal(decode(host["patch"][k]), it["patch"][v].flatten(0, 1))
        assert torch.equal(decode(host["cls"][k]), it["cls"][v])
        assert torch.equal(host["boxes"][k], it["boxes"]) and torch.equal(host["flips"][k], it["flips"])
    with pytest.raises(ValueError, match=r"view indices in \[0, 3\)"):
        cache.read_batch([1], views=[3])


# --------------------------------------------------------------------------- stage 2: the feeder
def _loader(cache: Path, extra: list[str]):
    from tipsdistill.distill.config import load_config
    from tipsdistill.distill.task import build_task
    from tipsdistill.distill.train import _Loader

    cfg = load_config("distill", base_overrides(cache, "/tmp/unused") + extra)
    built = build_task(cfg, device=torch.device("cpu"))
    return built, _Loader(built.dataset, built.sampler, cfg), cfg


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_cache(tmp_path_factory.mktemp("tiny") / "c")


@pytest.fixture(scope="module")
def tiny_views(tmp_path_factory) -> Path:
    return make_cache(tmp_path_factory.mktemp("tiny_views") / "c", views=3)


@pytest.mark.parametrize(
    "which, extra",
    [
        ("tiny", []),  # crop targets, the student grid = the teacher's (4x4), flips
        ("tiny", ["data.image_size=24"]),  # 3x3 from 4x4: sampling ratios 1 and 2 in one batch
        ("tiny_views", ["cache.target=replay"]),  # replayed stored views, same grid (identity)
        ("tiny_views", ["cache.target=replay", "data.image_size=16"]),  # replayed views resampled to 2x2
        ("tiny_views", ["cache.target=crop"]),  # crops of the full-image view 0
    ],
)
def test_device_targets_equal_the_cpu_reference(which, extra, request):
    from tests.item_reference import ItemText
    from tipsdistill.distill.train import _to_device

    path = request.getfixturevalue(which)
    bb, lb, cfg = _loader(path, extra)
    assert lb.feeder is not None
    ref = ReferenceRows(path)
    ref_text = ItemText(ref, cfg.loss.caption_probs)
    grid = (cfg.data.image_size // 8,) * 2
    ratios, seen = set(), []
    try:
        for _ in range(7):  # 6 batches per epoch: crosses into epoch 1
            b = _to_device(lb.next(), torch.device("cpu"))
            assert "t_patch" not in b and "features" in b
            seen.append(b["index"].tolist())
            pb, cb = bb.task.targets(b, grid)
            pi, ci = item_targets(
                ref.rows(b["index"].tolist()), b, grid, replay=bb.dataset.target == "replay"
            )
            assert pb.shape == pi.shape == (8, *grid, 48)
            torch.testing.assert_close(pb, pi, rtol=1e-6, atol=1e-6)
            assert torch.equal(cb, ci)
            ratios |= set(b["host"]["t_ratio"])
            tb, vb = bb.task.text(b)
            ti, vi = ref_text(b)
            assert all(torch.equal(tb[k], ti[k]) for k in ti)
            assert all(torch.equal(vb[k].bool(), vi[k].bool()) for k in ti if vi[k] is not None)
    finally:
        lb.feeder.close()
    if extra == ["data.image_size=24"]:
        assert ratios == {1, 2}
    # the sampler's order, epoch 0 then epoch 1
    order = [bb.sampler.order(e) for e in (0, 1)]
    assert seen == [order[0][k : k + 8] for k in range(0, 48, 8)] + [order[1][:8]]
    assert lb.position() == {"epoch": 1, "consumed": 8}


def test_resumed_feature_order_unchanged(tiny):
    bb, lb, cfg = _loader(tiny, [])
    seq = []
    for _ in range(9):
        pos = lb.position()
        b = lb.next()
        seq.append((pos, b["index"].tolist(), b["features"].host()["cls"].clone()))
    lb.feeder.close()
    # the thread's own counters (what scripts/bench_cache.py reports): the 9 batches of 8 and at most
    # the batches it read ahead (the queue, the slot being filled)
    assert 9 * 8 <= lb.feeder.rows_read <= (9 + lb.feeder.depth + 1) * 8
    assert lb.feeder.read_s > 0 and lb.feeder.wait_s >= 0
    for k in (0, 4, 6):  # a fresh loader resumed at each recorded position continues identically
        _, again, _ = _loader(tiny, [])
        again.seek(**seq[k][0])
        try:
            for pos, idx, cls in seq[k:]:
                assert again.position() == pos
                b = again.next()
                assert b["index"].tolist() == idx and torch.equal(b["features"].host()["cls"], cls)
        finally:
            again.feeder.close()
    # a feature batch out of step with the image batch is refused
    fb = lb.feeder._slots[0]
    with pytest.raises(RuntimeError, match="does not match the image batch"):
        lb.feeder.attach({"index": torch.tensor(fb.indices[::-1].copy())}, fb, fb.epoch)


@pytest.mark.parametrize("layout", ["contiguous", "chunked-4-rows", "fixed-array", "gzip"])
def test_row_offsets_for_every_layout_the_writer_may_use(tmp_path, layout):
    """Raw row offsets for contiguous datasets, chunks of several rows and the libver-latest fixed-array
    chunk index; a compressed dataset has none (h5py fallback). Read back with os.pread: exact rows."""
    import os

    import h5py

    from tipsdistill.cache.reader import _map_rows

    data = np.random.default_rng(0).standard_normal((10, 3, 5)).astype(np.float16)
    path = tmp_path / "x.h5"
    kw: dict = {}
    if layout == "chunked-4-rows":
        kw = {"chunks": (4, 3, 5)}
    elif layout == "fixed-array":
        kw = {"chunks": (1, 3, 5)}
    elif layout == "gzip":
        kw = {"chunks": (1, 3, 5), "compression": "gzip"}
    libver = ("latest", "latest") if layout == "fixed-array" else None
    with h5py.File(path, "w", libver=libver) as f:
        f.create_dataset("patch", data=data, **kw)
    with h5py.File(path, "r") as f:
        offs, why = _map_rows(f["patch"], path)
    if layout == "gzip":
        assert offs is None and "compressed" in why
        return
    assert why == "" and len(offs) == 10
    fd = os.open(path, os.O_RDONLY)
    try:
        for r in range(10):
            assert os.pread(fd, data[r].nbytes, int(offs[r])) == data[r].tobytes(), r
    finally:
        os.close(fd)


# ------------------------------------------------------------------ worker -> trainer: one packed buffer
def test_pack_tensors_round_trip():
    from tipsdistill.distill.data import pack_tensors, unpack_tensors

    g = torch.Generator().manual_seed(0)
    batch = {
        "global": torch.rand(3, 3, 5, 5, generator=g),
        "half": torch.rand(2, 7, generator=g).half(),  # odd byte sizes: the next tensor stays aligned
        "flip": torch.tensor([True, False, True]),
        "index": torch.tensor([4, 0, 9]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "strided": torch.arange(12.0).reshape(3, 4).t(),  # not contiguous
        "key": ["a.jpg", "b.jpg", "c.jpg"],
        "captions": {"short": ["x", "y", "z"], "u": [torch.tensor([1, 2]), 3]},
        "host": {"t_ratio": [1, 2, 1]},
        "pair": (torch.ones(2), "s"),
    }
    packed = pack_tensors(batch)
    assert sum(isinstance(v, torch.Tensor) for v in packed.values()) == 1  # one buffer crosses
    got = unpack_tensors(packed)
    assert got.keys() == batch.keys()
    for k in ("global", "half", "flip", "index", "scalar", "empty", "strided"):
        assert got[k].dtype == batch[k].dtype and torch.equal(got[k], batch[k]), k
    assert got["key"] == batch["key"] and got["host"] == batch["host"]
    assert got["captions"]["short"] == ["x", "y", "z"] and torch.equal(
        got["captions"]["u"][0], torch.tensor([1, 2])
    )
    assert (
        got["captions"]["u"][1] == 3 and torch.equal(got["pair"][0], torch.ones(2)) and got["pair"][1] == "s"
    )
    # views of the one buffer, each aligned
    buf = packed["packed_buffer"]
    for k in ("global", "half", "index"):
        assert got[k].untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
        assert (got[k].data_ptr() - buf.data_ptr()) % 64 == 0
    assert unpack_tensors(batch) is batch  # an unpacked batch passes through


def _same(a, b, where="batch"):
    assert type(a) is type(b) or isinstance(a, (list, tuple)), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for k, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{k}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_loader_with_workers_equals_no_workers(tiny, context):
    """Stage 2's loader with 2 workers (their batches packed into one buffer each) gives the batches of
    the loader without workers, through an epoch boundary."""
    from tipsdistill.distill.config import load_config
    from tipsdistill.distill.data import collate_packed
    from tipsdistill.distill.task import build_task
    from tipsdistill.distill.train import _Loader

    loaders = []
    for nw in (0, 2):
        cfg = load_config("distill", base_overrides(tiny, "/tmp/unused") + [f"data.num_workers={nw}"])
        built = build_task(cfg, device=torch.device("cpu"))
        loader = _Loader(built.dataset, built.sampler, cfg)
        if nw:
            loader._dl.multiprocessing_context = context
            assert loader._dl.multiprocessing_context.get_start_method() == context
            assert loader._dl.collate_fn is collate_packed  # each batch crosses as one buffer
        loaders.append(loader)
    try:
        for _ in range(7):  # 6 batches per epoch
            a, b = (lo.next() for lo in loaders)
            assert "packed_buffer" not in b and a.keys() == b.keys()
            assert torch.equal(a.pop("features").host()["patch"], b.pop("features").host()["patch"])
            _same(a, b)
    finally:
        for lo in loaders:
            if lo.feeder is not None:
                lo.feeder.close()


def test_cache_reader_key_of_older_configs(caplog):
    """``cache.reader`` (batch, or item: the removed per-item path) in an older config or checkpoint is
    read as the one path, with a warning naming the key; another value is refused naming the fix."""
    from tipsdistill.distill.config import config_to_dict, load_config

    for reader in ("batch", "item"):
        with caplog.at_level("WARNING", logger="tipsdistill.distill.config"):
            cfg = load_config("distill", ["cache.path=/x", f"cache.reader={reader}"])
        assert "config key cache.reader" in caplog.text and repr(reader) in caplog.text
        assert "reader" not in config_to_dict(cfg)["cache"]
        caplog.clear()
    with pytest.raises(ValueError, match=r"cache.reader='rows' is invalid.*drop cache.reader"):
        load_config("distill", ["cache.path=/x", "cache.reader=rows"])
