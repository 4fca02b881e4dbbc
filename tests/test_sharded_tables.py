"""Sharded tables: ``parquet:`` / ``csv:`` / ``tsv:`` over braces, globs and folders, in the layouts users have
(img2dataset's ``--output_format parquet`` folder, an HF repo's ``data/train-000NN-of-000MM.parquet``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from tests.own_data_check import _jpeg
from tipsdistill.cache.dataset_spec import build_from_spec, parse_dataset_spec
from tipsdistill.cache.datasets import BadImageError
from tipsdistill.cache.format import shard_range


def img2dataset_parquet(root: Path, shards: int = 3, per_shard: int = 5) -> dict[str, str]:
    """img2dataset ``--output_format parquet``: ``00000.parquet`` ... with ``url, caption, key, status,
    error_message, width, height, jpg`` (a failed download: ``jpg`` null), ``00000_stats.json`` beside;
    two row groups per shard. Returns key -> caption of the rows that have an image."""
    root.mkdir(parents=True, exist_ok=True)
    good: dict[str, str] = {}
    for s in range(shards):
        rows: dict[str, list] = {k: [] for k in ("url", "caption", "key", "status", "error_message", "jpg")}
        for i in range(per_shard):
            key = f"{s:05d}{i:04d}"
            failed = i == 2
            cap = f"shard {s} photo {i}"
            rows["url"].append(f"http://example.com/{key}.jpg")
            rows["caption"].append(cap)
            rows["key"].append(key)
            rows["status"].append("failed_to_download" if failed else "success")
            rows["error_message"].append("HTTP 404" if failed else None)
            rows["jpg"].append(None if failed else _jpeg(100 * s + i))
            if not failed:
                good[key] = cap
        table = pa.table(
            rows, schema=pa.schema([(k, pa.binary() if k == "jpg" else pa.string()) for k in rows])
        )
        pq.write_table(table, root / f"{s:05d}.parquet", row_group_size=3)
        (root / f"{s:05d}_stats.json").write_text(
            json.dumps({"count": per_shard, "successes": per_shard - 1})
        )
    return good


def test_img2dataset_parquet_folder_glob_and_braces(tmp_path):
    good = img2dataset_parquet(tmp_path / "out")
    kw = {"image_field": "jpg", "key_field": "key"}
    for spec in (
        f"parquet:{tmp_path}/out/",
        f"parquet:{tmp_path}/out/*.parquet",
        f"parquet:{tmp_path}/out/{{00000..00002}}.parquet",
    ):
        ds = build_from_spec(spec, **kw)
        assert len(ds) == 15 and ds.keys()[:2] == ["000000000", "000000001"], spec
    # read shard by shard: every good row gives its own image and caption; a failed download is a skipped row
    seen = {}
    for i in range(len(ds)):
        try:
            it = ds[i]
        except BadImageError as e:
            assert e.kind == "no_image" and ds.keys()[i].endswith("0002"), str(e)
            continue
        seen[it["key"]] = it["captions"]["alt"]
        assert it["image"].shape == (3, 40, 48)
    assert seen == good
    rec = ds.source_spec()
    assert rec["kwargs"]["key_field"] == "key" and rec["kwargs"]["path"].endswith("{00000..00002}.parquet")
    again = build_from_spec(rec)
    assert again.keys() == ds.keys()


def test_row_keys_without_a_key_column_and_exact_worker_splits(tmp_path):
    img2dataset_parquet(tmp_path / "out", shards=3, per_shard=7)
    ds = build_from_spec(f"parquet:{tmp_path}/out", image_field="jpg")
    keys = ds.keys()
    assert keys[0] == "00000.parquet/0" and keys[7] == "00001.parquet/0" and len(set(keys)) == 21
    # two ranks x two DataLoader workers, blocks of 4 rows as stage 1 reads them: each row read exactly once
    read: list[str] = []
    for rank in range(2):
        start, count = shard_range(len(ds), rank, 2)
        blocks = [list(range(start + b, start + min(b + 4, count))) for b in range(0, count, 4)]
        loader = DataLoader(_Keys(ds), batch_sampler=blocks, num_workers=2, collate_fn=lambda b: b)
        read += [k for batch in loader for k in batch]
    assert sorted(read) == sorted(keys) and len(read) == len(keys)


class _Keys(torch.utils.data.Dataset):
    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        try:
            return self.ds[i]["key"]
        except BadImageError:
            return self.ds.keys()[i]


def test_hf_repo_layout_and_duplicate_keys(tmp_path):
    data = tmp_path / "repo" / "data"
    data.mkdir(parents=True)
    n = 0
    for s in range(2):
        rows = [{"bytes": _jpeg(s * 10 + i), "path": f"{s}_{i}.jpg"} for i in range(3)]
        t = pa.table({"image": rows, "text": [f"t{s}{i}" for i in range(3)], "id": ["a", f"b{s}", f"c{s}"]})
        pq.write_table(t, data / f"train-{s:05d}-of-00002.parquet")
        n += 3
    ds = build_from_spec(f"parquet:{tmp_path}/repo/", caption_fields={"alt": "text"}, key_field="id")
    assert len(ds) == n
    assert ds[4]["captions"] == {"alt": "t11"} and ds[4]["key"] == "b1"
    # "a" is in both shards: the second copy is a skipped row, listed, with a unique key
    with pytest.raises(BadImageError, match="already read at row 0") as e:
        ds[3]
    assert e.value.kind == "duplicate" and ds.keys()[3] == "train-00001-of-00002.parquet/0"


def test_csv_shards_and_clear_errors(tmp_path):
    (tmp_path / "images").mkdir()
    for s in range(2):
        lines = ["path,caption"]
        for i in range(3):
            (tmp_path / "images" / f"{s}{i}.jpg").write_bytes(_jpeg(s * 3 + i))
            lines.append(f"../images/{s}{i}.jpg,cap {s}{i}" if s else f"images/{s}{i}.jpg,cap {s}{i}")
        sub = tmp_path / ("part1" if s else ".")
        sub.mkdir(exist_ok=True)
        (sub / f"t{s}.csv").write_text("\n".join(lines) + "\nbad,row,extra\n")
    spec = f"csv:{tmp_path}/t0.csv::{tmp_path}/part1/t1.csv"
    ds = build_from_spec(spec, image_field="path", allow_root=str(tmp_path))
    assert ds.keys() == [
        "t0.csv/0",
        "t0.csv/1",
        "t0.csv/2",
        "part1/t1.csv/0",
        "part1/t1.csv/1",
        "part1/t1.csv/2",
    ]
    # each shard's relative paths are resolved against its own folder
    assert torch.equal(
        ds[4]["image"],
        build_from_spec(f"csv:{tmp_path}/part1/t1.csv", image_field="path", allow_root=str(tmp_path))[1][
            "image"
        ],
    )
    assert sum(p["kind"] == "bad_row" for p in ds.problems) == 2
    with pytest.raises(ValueError, match="holds no table"):
        build_from_spec(f"parquet:{tmp_path}/images/")
    with pytest.raises(ValueError, match="no table matches"):
        build_from_spec(f"parquet:{tmp_path}/nothing-*.parquet")
    with pytest.raises(ValueError, match="key_field='nope'.*the columns are"):
        build_from_spec(spec, image_field="path", key_field="nope")
    assert parse_dataset_spec(f"parquet:{tmp_path}/out/").kwargs["path"] == f"{tmp_path}/out/"
    assert np.array_equal(ds._start, [0, 3, 6])
