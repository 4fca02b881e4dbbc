"""Real dataset formats through all three stages: webdataset shards, parquet tables, HF ``datasets``.

Generated data with the bad input the toolkit must survive (``tests/own_data_check.py``); stage 1 with
2 ranks x 2 DataLoader workers (torchrun); stage 2 and evaluation started from the cache with no
dataset arguments.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.cache_helpers import build_tiny_teacher
from tests.launch_helpers import torchrun
from tests.own_data_check import check_cache, make_example_data
from tests.test_train_support import base_overrides, run_subprocess
from tipsdistill.cache import BadImageError, build_from_spec, open_cache, parse_dataset_spec, source_for_cache
from tipsdistill.cache.dataset_spec import DatasetSpec
from tipsdistill.cache.datasets import resize_image

REPO = Path(__file__).resolve().parents[1]
TEACHER = "tests.cache_helpers:build_tiny_teacher"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("own_data")
    return root, make_example_data(root)


def _stage1(
    root: Path, out: Path, data_args: list[str], nproc: int = 2, workers: int = 2
) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HOME": str(root / ".hf")}
    cmd = torchrun(nproc)
    cmd += ["-m", "tipsdistill.scripts.cache_features", "--teacher", TEACHER, *data_args, "--out", str(out)]
    cmd += ["--image-size", "32", "--batch-size", "2", "--num-workers", str(workers), "--quiet"]
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def wds_cache(data):
    root, _ = data
    out = root / "caches" / "wds"
    args = ["--data", "wds:shards/{00000..00004}.tar", "--caption", "short=json.short"]
    r = _stage1(root, out, args + ["--caption", "detailed=json.detailed"])
    assert r.returncode == 0, r.stderr[-4000:]
    return out


def test_webdataset_two_ranks_two_workers_every_good_sample_once(data, wds_cache):
    root, expect = data
    assert (wds_cache / "shard-00000-of-00002.h5").exists() and (
        wds_cache / "shard-00001-of-00002.h5"
    ).exists()
    assert check_cache(wds_cache, expect["wds"]) == []
    fc = open_cache(wds_cache)
    # the bad ones are listed with their shard/key and reason
    reasons = {k: r for _, k, r in fc.skipped}
    assert "cut off by the truncated shard" in reasons["00004/000040003"]
    assert "already read from 00000/000000001" in reasons["00003/000000001"]
    problems = [json.loads(line) for line in (wds_cache / "dataset_problems.jsonl").read_text().splitlines()]
    by_kind = {p["kind"]: p for p in problems}
    assert sorted(by_kind) == ["bad_encoding", "no_caption", "truncated"]
    assert (
        by_kind["truncated"]["shard"].endswith("00004.tar")
        and "truncated tar" in by_kind["truncated"]["message"]
    )
    assert by_kind["no_caption"]["message"].startswith(expect["wds"]["no_caption"])
    # captions: .txt -> alt, json keys -> short/detailed; a non-UTF-8 alt is missing, the others kept
    i = fc.keys().index("00002/000020003")
    item = fc[i]
    assert item["text_valid"] == {"alt": False, "short": True, "detailed": True}
    # the features under each key are the teacher's features of that key's image (right image, right row)
    teacher = build_tiny_teacher()
    src = build_from_spec(fc.meta["dataset_spec"])
    for key in ("00000/000000000", "00002/000020005", "00004/000040002"):
        it = fc[fc.keys().index(key)]
        img = resize_image(src[src.keys().index(key)]["image"], (32, 32), "short_crop")
        ref = teacher.encode_image(img[None]).patch[0]
        torch.testing.assert_close(it["patch"], ref, atol=3e-3, rtol=3e-3)


@pytest.mark.parametrize(
    "fmt,args",
    [
        ("table", ["--data", "parquet:captions.parquet", "--image-column", "path"]),
        ("hf", ["--data", "hf:hf_dataset", "--caption", "alt=text"]),
    ],
)
def test_parquet_and_hf_datasets_two_ranks(data, fmt, args):
    root, expect = data
    out = root / "caches" / fmt
    r = _stage1(root, out, args)
    assert r.returncode == 0, r.stderr[-4000:]
    assert check_cache(out, expect[fmt]) == []
    fc = open_cache(out)
    assert all(fc[i]["text_valid"]["alt"] for i in range(len(fc)))


def test_csv_caption_not_utf8_is_listed(data, tmp_path):
    root, _ = data
    ds = build_from_spec(f"csv:{root / 'captions.csv'}", image_field="path")
    assert ds[5]["captions"] == {} and ds[6]["captions"] == {"alt": "a photo number 6"}
    kinds = {(p["row"], p["kind"]) for p in ds.problems}
    assert (5, "bad_encoding") in kinds and (5, "no_caption") in kinds


def test_unknown_names_fail_before_any_work(data, tmp_path, capsys):
    from tipsdistill.scripts.cache_features import main

    root, _ = data
    common = ["--teacher", TEACHER, "--image-size", "32", "--num-workers", "0", "--quiet"]
    out = tmp_path / "c1"
    rc = main(
        [
            "--data",
            f"parquet:{root / 'captions.parquet'}",
            "--image-column",
            "file",
            "--out",
            str(out),
            *common,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "image_field='file'" in err and "['path', 'caption', 'short_caption']" in err
    assert not list(out.glob("shard-*"))
    rc = main(
        ["--data", f"wds:{root}/shards/00000.tar", "--caption", "short=json.nope", "--out", str(out), *common]
    )
    err = capsys.readouterr().err
    assert (
        rc == 2
        and "'json.nope'" in err
        and "['detailed', 'key', 'short']" in err
        and "['jpg', 'json', 'txt']" in err
    )
    rc = main(["--data", f"hf:{root / 'hf_dataset'}", "--out", str(out), *common])  # default alt=caption
    err = capsys.readouterr().err
    assert rc == 2 and "caption alt='caption'" in err and "['image', 'text']" in err
    assert not list(out.glob("shard-*"))


def test_spec_shorthands():
    assert parse_dataset_spec("wds:/d/{0..3}.tar") == DatasetSpec("webdataset", {"urls": "/d/{0..3}.tar"})
    assert parse_dataset_spec("tsv:t.tsv", image_field="p").kwargs == {
        "path": "t.tsv",
        "format": "tsv",
        "image_field": "p",
    }
    assert parse_dataset_spec("hf:org/name", split="val") == DatasetSpec(
        "hf", {"path": "org/name", "split": "val"}
    )
    assert parse_dataset_spec('synthetic:{"size": 4}') == DatasetSpec("synthetic", {"size": 4})
    assert parse_dataset_spec("synthetic").name == "synthetic"
    assert parse_dataset_spec({"name": "folder", "kwargs": {"root": "x"}}) == DatasetSpec(
        "folder", {"root": "x"}
    )
    with pytest.raises(ValueError, match="not an existing folder"):
        parse_dataset_spec("no/such/thing")


def test_stage2_and_evaluation_from_the_cache_with_no_dataset_arguments(data, wds_cache, tmp_path, capsys):
    root, expect = data
    fc = open_cache(wds_cache)
    overrides = [o for o in base_overrides(wds_cache, tmp_path / "run") if not o.startswith("data.dataset")]
    r = run_subprocess({"result": str(tmp_path / "result.json"), "overrides": overrides + ["steps=2"]})
    assert "error" not in r, r.get("error", "") + r.get("stderr", "")
    assert r["step"] == 2 and np.isfinite(r["final"]["loss"])
    # the images the cache skipped are listed next to the run, not read
    skipped = (tmp_path / "run" / "skipped_keys.txt").read_text().split()
    assert sorted(skipped) == sorted(expect["wds"]["skipped"])
    # evaluation: captioned images without labels -> retrieval over exactly the cached samples
    from tipsdistill.scripts.evaluate import main

    out = tmp_path / "eval"
    rc = main(["--model", f"student={r['export']}", "--model", f"teacher=python:{TEACHER}",
               "--text-model", "teacher", "--cache", str(wds_cache), "--retrieval-image-size", "32",
               "--out", str(out), "--quiet"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["task"] == "retrieval" and set(res["models"]) == {"student", "teacher"}
    with_short = sum(bool(fc[i]["text_valid"]["short"]) for i in range(len(fc)))
    assert res["models"]["student"]["cls0/short"]["num"] == with_short == len(fc) - 1


def test_explicit_dataset_overrides_and_a_mismatch_is_refused(data, wds_cache):
    root, expect = data
    same = source_for_cache(wds_cache, f"wds:{root}/shards/{{00000..00004}}.tar")
    assert len(same) == len(expect["wds"]["good"]) + len(expect["wds"]["skipped"])
    with pytest.raises(
        ValueError, match=r"not in the dataset given \(synthetic.*the cache was made from .*webdataset"
    ):
        source_for_cache(wds_cache, "synthetic", {"size": 8})


def test_a_dataset_object_without_spec_records_none_and_stage2_asks(tmp_path):
    from tipsdistill.cache import build_dataset, extract_features
    from tipsdistill.cache.dataset_spec import CachedSubset

    class Plain(torch.utils.data.Dataset):  # no source_spec(): where its images come from is unknown
        def __init__(self) -> None:
            self.inner = build_dataset("synthetic", split="train", size=4, image_size=32)

        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int):
            return self.inner[i]

    common = dict(image_size=32, batch_size=2, num_workers=0, progress=False, granularities=[])
    extract_features(dict(out=str(tmp_path / "a"), **common), teacher=build_tiny_teacher(), dataset=Plain())
    assert open_cache(tmp_path / "a").meta["dataset_spec"] is None
    with pytest.raises(ValueError, match="records no dataset spec.*data.dataset=SPEC"):
        source_for_cache(tmp_path / "a")
    # built from the registry by name: the name + kwargs are recorded and rebuild the same items
    kw = {"split": "train", "size": 4, "image_size": 32}
    extract_features(
        dict(out=str(tmp_path / "b"), dataset="synthetic", dataset_kwargs=kw, teacher=TEACHER, **common)
    )
    spec = open_cache(tmp_path / "b").meta["dataset_spec"]
    assert spec["name"] == "synthetic" and spec["kwargs"]["size"] == 4
    src = source_for_cache(tmp_path / "b", only_cached=True)
    assert isinstance(src, CachedSubset) and src.keys() == open_cache(tmp_path / "b").keys()
    assert src.class_names == build_dataset("synthetic", **kw).class_names  # attributes pass through


def test_hf_builders_imagefolder_parquet_and_an_offline_hub_name(data, tmp_path):
    root, _ = data
    folder = tmp_path / "imgs"
    shutil.copytree(root / "images", folder)
    rows = [{"file_name": f"{i:03d}.jpg", "caption": f"metadata caption {i}"} for i in range(12)]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = build_from_spec(f"hf:{folder}", cache_dir=str(tmp_path / "hfc"))
    assert ds.builder == "imagefolder" and len(ds) == 12 and ds.keys()[0] == "train/0"
    assert {ds[i]["captions"]["alt"] for i in (0, 5)} <= {r["caption"] for r in rows}
    with pytest.raises(
        BadImageError, match="corrupt"
    ):  # images/003.jpg is corrupt: a skipped row, not a crash
        [ds[i] for i in range(12)]
    pq_ds = build_from_spec(
        f"hf:{root / 'captions.parquet'}", image_field="path", cache_dir=str(tmp_path / "hfc")
    )
    assert pq_ds.builder == "parquet" and pq_ds[0]["captions"] == {"alt": "a photo number 0"}
    assert pq_ds[0]["image"].shape[0] == 3  # relative paths resolved against the table's folder
    with pytest.raises(
        ValueError, match=r"'someorg/no-such-dataset'.*HF_HUB_OFFLINE=1.*huggingface-cli download"
    ):
        build_from_spec("hf:someorg/no-such-dataset", cache_dir=str(tmp_path / "hfc"))
