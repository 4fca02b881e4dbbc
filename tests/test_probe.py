"""``distill.evaluation.probe`` (``scripts.probe``): the linear probes that separate "knows the objects" from "aligned with text"."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tipsdistill.cache.synthetic import SyntheticScenes
from tipsdistill.distill.evaluation.metrics import roc_auc
from tipsdistill.distill.evaluation.probe import learnability, patch_labels, probe, random_like
from tipsdistill.teachers.base import DenseFeatures


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
    import tipsdistill.teachers.embedded as emb

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
    import tipsdistill.teachers.embedded as emb

    t = emb.EmbeddedTeacher()
    train, val = SyntheticScenes("train", size=16), SyntheticScenes("validation", size=6)
    r = learnability(t, train, val, max_steps=2, batch=4)
    assert r["steps"] == 2 and np.isfinite(r["final_loss"]) and 0 <= r["miou"] <= 100
    assert not any(p.grad is not None for p in t.vit.parameters())  # the model itself is untouched


def test_patch_miou_is_the_evaluation_miou() -> None:
    """A class predicted but absent from the labels counts (IoU 0), as in ``tipsdistill-eval``."""
    from tipsdistill.distill.evaluation.metrics import ConfusionMatrix
    from tipsdistill.distill.evaluation.probe import patch_miou

    target = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 3, 1, 1, 2, 0])  # class 3 is predicted, never in the labels
    got = patch_miou(pred, target, 4, objects=[1, 2, 3])
    cm = ConfusionMatrix(4)
    cm.update(pred, target)
    want = cm.compute(subsets={"objects": [1, 2, 3]})
    assert got == {"miou": want["miou"], "miou_objects": want["miou_objects"]}
    # IoUs 1/3, 1, 1/2, 0 (class 3): the old probe-only definition skipped class 3 (61.1 / 75.0)
    assert got["miou"] == pytest.approx(100 * (1 / 3 + 1 + 1 / 2 + 0) / 4)
    assert got["miou_objects"] == pytest.approx(100 * (1 + 1 / 2 + 0) / 3)


def test_load_model_reads_the_folder_format(tmp_path) -> None:
    import json

    import tipsdistill.teachers.embedded as emb
    from tipsdistill.distill.evaluation.probe import load_model

    assert isinstance(load_model(str(emb.default_path())), emb.EmbeddedTeacher)
    (tmp_path / "config.json").write_text(json.dumps({"format": "something-else/1"}))
    with pytest.raises(ValueError, match="neither tipsdistill-student"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "missing"))
    assert isinstance(load_model(str(emb.default_path()), kind="teacher"), emb.EmbeddedTeacher)
