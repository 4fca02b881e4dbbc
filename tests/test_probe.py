"""``scripts.probe``: the linear probes that separate "knows the objects" from "aligned with text"."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cache.synthetic import SyntheticScenes
from scripts.probe import patch_labels, probe, random_like, roc_auc
from teachers.base import DenseFeatures


def test_roc_auc_matches_sklearn_with_ties() -> None:
    from sklearn.metrics import roc_auc_score

    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (200,), generator=g).float()  # many ties
    positive = torch.rand(200, generator=g) < 0.3
    assert roc_auc(scores, positive) == pytest.approx(roc_auc_score(positive.numpy(), scores.numpy()))
    assert math.isnan(roc_auc(scores, torch.zeros(200, dtype=torch.bool)))


class Oracle:
    """Reads the labels back from a lookup (keyed by the image bytes): tokens = one-hot classes + noise."""

    has_text = False
    num_layers = 2

    def __init__(self, ds: SyntheticScenes, informative: bool) -> None:
        self.lookup = {}
        for i in range(len(ds)):
            it = ds[i]
            lab = patch_labels(it["label"][None], (8, 8), 20)[0]
            self.lookup[it["image"].numpy().tobytes()] = lab
        self.informative = informative

    def encode_image(self, pixels: torch.Tensor, layer: int | None = None) -> DenseFeatures:
        g = torch.Generator().manual_seed(len(pixels))
        labs = torch.stack([self.lookup[p.numpy().tobytes()] for p in pixels])
        onehot = F.one_hot(labs, 20).float() if self.informative else torch.zeros(*labs.shape, 20)
        patch = onehot + 0.1 * torch.randn(*onehot.shape, generator=g)
        cls = patch.amax((1, 2))[:, None].repeat(1, 2, 1)
        return DenseFeatures(cls=cls, patch=patch)


def test_probe_finds_information_only_where_it_is() -> None:
    ds = SyntheticScenes("validation", size=40)
    good = probe(Oracle(ds, True), ds, steps=150)
    bad = probe(Oracle(ds, False), ds, steps=150)
    assert good["cls_auc"] > 0.9 and good["patch"][-1]["miou_objects"] > 50, good
    assert abs(bad["cls_auc"] - 0.5) < 0.2 and bad["patch"][-1]["miou_objects"] < 20, bad
    assert len(good["patch"]) == 2 and good["grid"] == [8, 8]


def test_probe_runs_on_the_embedded_teacher_and_a_random_copy() -> None:
    import teachers.embedded as emb

    t = emb.EmbeddedTeacher()
    ds = SyntheticScenes("validation", size=8)
    res = probe(t, ds, steps=5)
    assert np.isfinite(res["cls_auc"]) and set(res["zero_shot_auc"]) == {"cls1", "cls2"}
    assert len(res["patch"]) == t.num_layers and all(np.isfinite(r["miou"]) for r in res["patch"])
    fresh = random_like(t)
    assert not torch.equal(fresh.vit.patch_embed.proj.weight, t.vit.patch_embed.proj.weight)
    for a, b in zip(fresh.text.parameters(), t.text.parameters()):  # the text tower is untouched
        assert torch.equal(a, b)


def test_learnability_trains_and_scores() -> None:
    import teachers.embedded as emb
    from scripts.probe import learnability

    t = emb.EmbeddedTeacher()
    train, val = SyntheticScenes("train", size=16), SyntheticScenes("validation", size=6)
    r = learnability(t, train, val, max_steps=2, batch=4)
    assert r["steps"] == 2 and np.isfinite(r["final_loss"]) and 0 <= r["miou"] <= 100
    assert not any(p.grad is not None for p in t.vit.parameters())  # the model itself is untouched
