"""HF datasets streamed in stage 1 (``hf:NAME --streaming``, cache/hf_stream.py): a folder of parquet shards in
the layout HF repos have (``data/train-0000N-of-0000M.parquet``, an ``Image`` column stored as ``{bytes, path}``,
a text column, a corrupt image), also as a hub repo in a temporary offline HF cache. Stage 1 with 1 and 2
processes caches every good sample once and equals the loaded (non-streaming) dataset's cache; a resume reads
only the rows not committed; stage 2 / evaluation read the images back through the table reader."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.launch_helpers import torchrun
from tipsdistill.cache import build_from_spec, open_cache, source_for_cache
from tipsdistill.cache.datasets import BadImageError
from tipsdistill.cache.format import shard_range
from tipsdistill.cache.hf_stream import HFStreamingDataset

REPO = Path(__file__).resolve().parents[1]
TEACHER = "tests.cache_helpers:build_tiny_teacher"
REV = "0123456789abcdef0123456789abcdef01234567"
ROWS = (5, 4, 3)  # three data files: not divisible by two ranks
BAD = "train-00001-of-00003.parquet/2"


def _caption(key: str) -> dict[str, str]:
    """The caption :func:`write_hf_repo` gave the row ``key`` (``train-0000S-of-00003.parquet/R``)."""
    return {"alt": f"photo {int(key[6:11])} {key.rsplit('/', 1)[1]}"}


def write_hf_repo(root: Path) -> None:
    """``root/data/train-0000N-of-00003.parquet`` written by ``datasets`` (an ``Image`` feature, row groups of 2
    rows), one corrupt image, and a README as hub repos have."""
    import datasets as hfd
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "data").mkdir(parents=True)
    feats = hfd.Features({"image": hfd.Image(), "text": hfd.Value("string")})
    for s, n in enumerate(ROWS):
        imgs = []
        for r in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (20 + r, 24, 3), dtype=np.uint8)).save(buf, "PNG")
            data = b"not an image" if f"train-{s:05d}-of-00003.parquet/{r}" == BAD else buf.getvalue()
            imgs.append({"bytes": data, "path": f"{s}_{r}.png"})
        ds = hfd.Dataset.from_dict(
            {"image": imgs, "text": [f"photo {s} {r}" for r in range(n)]}, features=feats
        )
        ds.to_parquet(str(root / "data" / f"train-{s:05d}-of-00003.parquet"), batch_size=2)
    (root / "README.md").write_text("---\nlicense: mit\n---\n")


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hf_repo")
    write_hf_repo(root)
    return root


def _offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, repo: Path) -> None:
    """``repo`` as the snapshot ``REV`` of the dataset ``org/tiny`` in an HF cache under ``tmp_path``, offline."""
    hub = tmp_path / "hf" / "hub"
    snap = hub / "datasets--org--tiny" / "snapshots" / REV
    shutil.copytree(repo, snap)
    (hub / "datasets--org--tiny" / "refs").mkdir()
    (hub / "datasets--org--tiny" / "refs" / "main").write_text(REV)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)


def test_keys_from_footers_exact_rank_split_random_access_and_hub_cache(repo, tmp_path, monkeypatch):
    ds = build_from_spec(f"hf:{repo}", streaming=True, caption_fields={"alt": "text"})
    assert isinstance(ds, HFStreamingDataset) and len(ds) == sum(ROWS) and ds.rows_read == 0
    table = build_from_spec(f"parquet:{repo}/data", caption_fields={"alt": "text"})
    assert ds.keys() == table.keys()  # the same FILE/ROW keys as the sharded-table reader
    # two ranks (three files): each reads its rows once, and only the row groups that hold them
    seen: list[int] = []
    for rank in range(2):
        part = build_from_spec(f"hf:{repo}", streaming=True, caption_fields={"alt": "text"})
        start, count = shard_range(len(ds), rank, 2)
        got = list(part.iter_rows(list(range(start, start + count))))
        assert [i for i, _ in got] == list(range(start, start + count))
        assert part.rows_read <= count + 2  # at most the rest of one shared row group of 2 rows
        seen += [i for i, _ in got]
        for i, item in got:
            if ds.keys()[i] == BAD:
                assert isinstance(item, BadImageError) and item.kind == "corrupt"
                continue
            ref = ds[i]  # random access: the table reader over the same local files
            assert item["key"] == ref["key"] and item["captions"] == ref["captions"] == _caption(ref["key"])
            torch.testing.assert_close(item["image"], ref["image"], rtol=0, atol=0)
    assert seen == list(range(len(ds)))
    # a hub name streams from its snapshot in the HF cache, offline; the snapshot's commit is recorded
    _offline_hub(tmp_path, monkeypatch, repo)
    hub = build_from_spec("hf:org/tiny", streaming=True, caption_fields={"alt": "text"})
    assert hub.keys() == ds.keys() and hub.source_spec()["kwargs"]["revision"] == REV
    assert hub.source_spec()["kwargs"]["streaming"] is True
    with pytest.raises(
        ValueError, match=r"not in the HF cache.*huggingface-cli download --repo-type dataset org/absent"
    ):
        build_from_spec("hf:org/absent", streaming=True)
    jsonl = tmp_path / "jsonrepo" / "data"
    jsonl.mkdir(parents=True)
    (jsonl / "train.jsonl").write_text('{"image": "a.png", "caption": "x"}\n')
    with pytest.raises(ValueError, match=r"not parquet.*without --streaming"):
        build_from_spec(f"hf:{jsonl.parent}", streaming=True)
    with pytest.raises(ValueError, match=r"unknown column\(s\) image_field='jpg'"):
        build_from_spec(f"hf:{repo}", streaming=True, image_field="jpg")


def test_streaming_flag_is_a_dataset_kwarg_in_the_config(repo):
    from tipsdistill.scripts.cache_features import build_parser, config_from_args

    cfg = config_from_args(build_parser().parse_args(["--data", f"hf:{repo}", "--streaming", "--out", "x"]))
    assert (
        cfg.dataset == "hf" and cfg.dataset_kwargs["streaming"] is True
    )  # config key dataset_kwargs.streaming
    with pytest.raises(SystemExit, match="--streaming is for hf: datasets"):
        config_from_args(build_parser().parse_args(["--data", f"parquet:{repo}/data", "--streaming"]))


def test_dataloader_workers_each_read_a_contiguous_run_of_blocks(repo, monkeypatch):
    """:class:`cache.run.StreamedBlocks` under 3 workers (the worker info given as torch gives it): every
    block of the todo list comes once, with its rows in order and the corrupt image as a skipped row."""
    from types import SimpleNamespace

    from tipsdistill.cache import run
    from tipsdistill.cache.views import ViewSpec

    ds = build_from_spec(f"hf:{repo}", streaming=True, caption_fields={"alt": "text"}, image_size=16)
    todo = [(b, list(range(2 * b, min(2 * b + 2, len(ds))))) for b in range(6) if b != 1]  # block 1 done
    items = run.ViewItems(ds, (16, 16), "short_crop", ViewSpec(), 1)
    got: dict[int, list[int]] = {}
    for w in range(3):
        monkeypatch.setattr(run, "get_worker_info", lambda w=w: SimpleNamespace(id=w, num_workers=3))
        for batch in run.StreamedBlocks(items, todo):
            assert batch["block"] not in got
            got[batch["block"]] = batch["index"] + [i for i, _, _ in batch["bad"]]
            assert all(kind == "corrupt" and ds.keys()[i] == BAD for i, _, kind in batch["bad"])
            assert batch["views"].shape[1:] == (1, 3, 16, 16)
    assert {b: sorted(v) for b, v in got.items()} == dict(todo)


def _stage1(out: Path, data: list[str], *more: str) -> int:
    from tipsdistill.scripts.cache_features import main

    return main(
        ["--teacher", TEACHER, *data, "--caption", "alt=text", "--out", str(out), "--image-size", "32",
         "--batch-size", "2", "--num-workers", "0", "--granularities", "alt", "--quiet", *more]
    )  # fmt: skip


def _features(path: Path) -> tuple[list[str], np.ndarray, list]:
    fc = open_cache(path)
    return (
        fc.keys(),
        np.stack([fc[i]["patch"].numpy() for i in range(len(fc))]),
        [k for _, k, _ in fc.skipped],
    )


@pytest.fixture(scope="module")
def streamed(repo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("caches") / "streamed"
    assert _stage1(out, ["--data", f"hf:{repo}", "--streaming"]) == 0
    return out


def test_streamed_cache_equals_the_loaded_one_and_resume_reads_only_uncommitted(
    repo, streamed, tmp_path, monkeypatch
):
    keys, feats, skipped = _features(streamed)
    assert skipped == [BAD] and len(keys) == sum(ROWS) - 1 and len(set(keys)) == len(keys)
    # the same dataset loaded and converted (no streaming): the same rows in the same order, the same features
    loaded = tmp_path / "loaded"
    assert _stage1(loaded, ["--data", f"hf:{repo}/data/*.parquet"]) == 0
    lkeys, lfeats, lskipped = _features(loaded)
    assert lskipped == ["train/7"] and len(lkeys) == len(keys)
    np.testing.assert_array_equal(lfeats, feats)
    # interrupted after two write blocks (4 rows), then rerun: only the rows not committed are read
    from tipsdistill.cache import run

    real, calls = run.encode_batch, []

    def dies(*a, **k):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("interrupted")
        return real(*a, **k)

    resumed = tmp_path / "resumed"
    monkeypatch.setattr(run, "encode_batch", dies)
    with pytest.raises(RuntimeError, match="interrupted"):
        _stage1(resumed, ["--data", f"hf:{repo}", "--streaming"])
    monkeypatch.setattr(run, "encode_batch", real)
    read: list[str] = []
    item = HFStreamingDataset._item
    monkeypatch.setattr(
        HFStreamingDataset, "_item", lambda self, i, ex: read.append(self._key(i)) or item(self, i, ex)
    )
    assert _stage1(resumed, ["--data", f"hf:{repo}", "--streaming"]) == 0
    all_keys = build_from_spec(f"hf:{repo}", streaming=True, caption_fields={}).keys()
    assert read == all_keys[4:]  # rows 0..3 (two blocks) were committed: none of them is read again
    rkeys, rfeats, rskipped = _features(resumed)
    assert rkeys == keys and rskipped == skipped
    np.testing.assert_array_equal(rfeats, feats)


def test_two_ranks_and_stage2_reads_the_images_back(repo, streamed, tmp_path):
    out = tmp_path / "two"
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    cmd = torchrun(2) + ["-m", "tipsdistill.scripts.cache_features", "--teacher", TEACHER, "--data", f"hf:{repo}",
                         "--streaming", "--caption", "alt=text", "--out", str(out), "--image-size", "32",
                         "--batch-size", "2", "--num-workers", "0", "--granularities", "alt", "--quiet"]  # fmt: skip
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    keys, feats, skipped = _features(out)
    skeys, sfeats, sskipped = _features(streamed)
    assert keys == skeys and skipped == sskipped == [BAD]
    np.testing.assert_array_equal(feats, sfeats)
    # stage 2 / evaluation: the recorded spec (streaming) reads each cached key's image from the local files
    src = source_for_cache(out, only_cached=True)
    assert len(src) == len(keys) and src.num_left_out == 1
    fc = open_cache(out)
    for i in (0, len(src) - 1):
        assert src[i]["key"] == fc.keys()[i]
        assert src[i]["captions"] == _caption(src[i]["key"])
