"""Comparison report (JSON, Markdown, PNGs), retrieval and the tipsdistill-eval CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_eval_toymodel import ListDataset, ToyEncoder

from tipsdistill.distill.evaluation import SegmentationSettings, compare_models, retrieval_recall


def _dataset(n=3, size=(42, 56)):
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(n):
        img = torch.rand(3, *size, generator=g)
        img[:, :, : size[1] // 2] *= 0.3  # two halves, two classes
        lab = torch.zeros(size, dtype=torch.long)
        lab[:, size[1] // 2 :] = 1 + (i % 2)
        lab[0, :] = 255
        caps = {"alt": f"picture number {i} of a {['cat', 'dog', 'sky'][i % 3]}", "short": f"a scene {i}"}
        items.append({"key": f"img{i}", "image": img, "captions": caps, "label": lab})
    return ListDataset(items, ["cat", "dog", "sky"], object_class_ids=[0, 1])


def _png_ok(path):
    arr = np.asarray(Image.open(path).convert("RGB")).astype(float)
    assert arr.shape[0] > 50 and arr.shape[1] > 50
    assert arr.std() > 5, f"{path} looks constant"
    return arr


def test_compare_models_writes_report(tmp_path):
    models = {"teacher": ToyEncoder(seed=0), "student": ToyEncoder(seed=1, depth=3)}
    ds = _dataset()
    s = SegmentationSettings(image_size=42, mode="slide", window=42, stride=28)
    res = compare_models(
        models, ds, s, tmp_path, layers="all", num_examples=2, cache_dir=tmp_path / "tc", progress=False,
        retrieval_dataset=ds,
    )  # fmt: skip
    for name in (
        "results.json",
        "results.md",
        "per_class_iou.png",
        "examples.png",
        "pca.png",
        "layer_curve.png",
    ):
        assert (tmp_path / name).is_file(), name
    for name in ("per_class_iou.png", "examples.png", "pca.png", "layer_curve.png"):
        _png_ok(tmp_path / name)
    data = json.loads((tmp_path / "results.json").read_text())
    assert set(data["models"]) == {"teacher", "student"}
    assert data["settings"]["mode"] == "slide" and data["settings"]["window"] == 42
    assert data["settings"]["templates"] == "tcl" and data["dataset"]["name"] == "list"
    st = data["models"]["student"]
    assert [r["layer"] for r in st["layer_curve"]] == [0, 1, 2]
    assert st["layer_curve"][-1]["miou"] == pytest.approx(st["metrics"]["miou"])
    assert "miou_objects" in st["metrics"] and len(st["metrics"]["per_class_iou"]) == 3
    assert set(st["retrieval"]) == {"cls0/alt", "cls1/alt", "cls0/short", "cls1/short"}
    md = (tmp_path / "results.md").read_text()
    assert "| teacher |" in md and "mIoU (objects)" in md and "## mIoU by layer" in md
    assert res["files"]["pca"].endswith("pca.png")


def test_shared_text_model_dim_mismatch(tmp_path):
    with pytest.raises(ValueError, match="patch features have dim 48"):
        compare_models(
            {"wide": ToyEncoder(dim=48)}, _dataset(1), SegmentationSettings(image_size=None, mode="whole"), tmp_path,
            text_model=ToyEncoder(dim=32), cache_dir=None, progress=False,
        )  # fmt: skip


def test_retrieval_oracle():
    class Oracle(ToyEncoder):
        """Image CLS = text embedding of its own caption (image i painted with value i / 10)."""

        def encode_image(self, pixels, **kw):
            out = super().encode_image(pixels, **kw)
            idx = (pixels[:, 0, 0, 0] * 10).round().long()
            emb = self.encode_text([f"caption {i}" for i in idx.tolist()])
            out.cls = emb[:, None].expand(-1, 2, -1)
            return out

    items = [
        {"key": str(i), "image": torch.full((3, 28, 28), i / 10), "captions": {"alt": f"caption {i}"}}
        for i in range(6)
    ]
    r = retrieval_recall(Oracle(), ListDataset(items, []), image_size=28)
    assert r["cls0/alt"]["i2t_r1"] == 100.0 and r["cls1/alt"]["t2i_r1"] == 100.0 and r["cls0/alt"]["num"] == 6


def test_cli_end_to_end(tmp_path, capsys):
    pytest.importorskip("tipsdistill.cache.synthetic")
    from tipsdistill.scripts.evaluate import main

    out = tmp_path / "out"
    rc = main(
        [
            "--model", "a=python:test_eval_toymodel:build_toy",
            "--model", 'b=python:test_eval_toymodel:build_toy:{"seed": 1}',
            "--dataset", "synthetic", "--dataset-kwargs", '{"split": "validation", "size": 2, "image_size": 56}',
            "--image-size", "56", "--window", "56", "--stride", "42", "--mode", "whole",
            "--layers", "0,1", "--num-examples", "2", "--out", str(out), "--text-cache", "none", "--quiet",
        ]
    )  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "| a |" in text and "| b |" in text
    data = json.loads((out / "results.json").read_text())
    assert data["dataset"]["name"] == "synthetic" and data["settings"]["mode"] == "whole"
    assert (out / "layer_curve.png").is_file()
    assert data["models"]["b"]["text_source"] == "own"
    rc = main(
        ["--model", "a=python:test_eval_toymodel:build_toy", "--model", 'b=python:test_eval_toymodel:build_toy:{"seed": 1}',
         "--text-model", "a", "--dataset", "synthetic", "--dataset-kwargs", '{"split": "validation", "size": 1}',
         "--image-size", "56", "--mode", "whole", "--no-plots", "--out", str(out), "--text-cache", "none", "--quiet"]
    )  # fmt: skip
    data = json.loads((out / "results.json").read_text())
    assert rc == 0 and data["models"]["b"]["text_source"] == "shared ToyEncoder"


def test_cli_bad_input_is_clear(tmp_path, capsys):
    from tipsdistill.scripts.evaluate import main

    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    (tmp_path / "classes.txt").write_text("a\nb\n")
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(tmp_path / "images/x.png")
    Image.fromarray(np.full((28, 28), 9, np.uint8)).save(tmp_path / "labels/x.png")
    rc = main(
        ["--model", "python:test_eval_toymodel:build_toy", "--dataset", "seg_folder", "--data-root", str(tmp_path),
         "--image-size", "28", "--mode", "whole", "--out", str(tmp_path / "o"), "--text-cache", "none", "--quiet"]
    )  # fmt: skip
    assert rc == 2
    assert "class list and the label ids disagree" in capsys.readouterr().err
