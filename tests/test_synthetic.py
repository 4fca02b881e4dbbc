"""The procedural ``synthetic`` dataset: contract, determinism, masks, captions."""

from __future__ import annotations

import numpy as np
import torch

import cache.synthetic as syn
from cache.datasets import build_dataset


def test_registered_and_contract() -> None:
    ds = build_dataset("synthetic", split="validation", size=8, image_size=48)
    assert len(ds) == 8 and ds.keys()[3] == "synthetic/validation/3"
    assert len(ds.class_names) == 20 and ds.object_class_ids == list(range(14))
    item = ds[3]
    assert item["key"] == "synthetic/validation/3"
    img, lab = item["image"], item["label"]
    assert img.shape == (3, 48, 48) and img.dtype == torch.float32
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    assert lab.shape == (48, 48) and lab.dtype == torch.int64
    assert int(lab.min()) >= 0 and int(lab.max()) < 20
    assert set(item["captions"]) == {"alt", "short", "detailed"}
    assert ds.identity()["split"] == "validation"


def test_deterministic_and_splits_differ() -> None:
    a = syn.SyntheticScenes("train", size=4, seed=1)[2]
    b = syn.SyntheticScenes("train", size=4, seed=1)[2]
    c = syn.SyntheticScenes("validation", size=4, seed=1)[2]
    assert torch.equal(a["image"], b["image"]) and a["captions"] == b["captions"]
    assert not torch.equal(a["image"], c["image"])


def test_masks_match_short_captions() -> None:
    ds = syn.SyntheticScenes("train", size=30, seed=0)
    names = ds.class_names
    for i in range(30):
        _, label, caps, scene = ds.render(i)
        present = set(np.unique(label).tolist())
        # every object in the scene is visible in the mask and named in the short caption
        for o in scene["objects"]:
            assert o.category in present
            assert names[o.category] in caps["short"]
        for b in scene["backgrounds"]:
            assert syn.BACKGROUNDS[b] in caps["short"]
        assert present <= {o.category for o in scene["objects"]} | {14 + b for b in scene["backgrounds"]}


def test_arrays_cache_roundtrip(tmp_path) -> None:
    ds = syn.SyntheticScenes("validation", size=5, image_size=32, cache_dir=str(tmp_path))
    arr = ds.arrays()
    assert arr["images"].shape == (5, 32, 32, 3) and len(arr["alt"]) == 5
    fresh = syn.SyntheticScenes("validation", size=5, image_size=32)[4]
    again = syn.SyntheticScenes("validation", size=5, image_size=32, cache_dir=str(tmp_path))
    again.arrays()  # loads the .npz
    assert torch.equal(again[4]["image"], fresh["image"]) and again[4]["captions"] == fresh["captions"]
    assert torch.equal(again[4]["label"], fresh["label"])
