"""Metrics, templates and class-name text embeddings of distill.evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_eval_toymodel import ToyEncoder

from tipsdistill.distill.evaluation import (
    OPENAI_IMAGENET_TEMPLATES,
    TCL_TEMPLATES,
    ClassEmbeddings,
    ConfusionMatrix,
    encode_class_names,
    get_templates,
    load_class_names,
    load_text_embeddings,
    resolve_class_embeddings,
    save_text_embeddings,
)
from tipsdistill.distill.evaluation.retrieval import recall_at_k


# --------------------------------------------------------------------------------------- metrics
def test_miou_hand_made_confusion():
    cm = ConfusionMatrix(3)
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 2]])
    cm.update(pred, target)
    # rows gt, cols pred: gt0 -> (0,1); gt1 -> (1,1); gt2 -> (2,0); ignore pixels skipped
    assert cm.mat.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    m = cm.compute(["a", "b", "c"], {"objects": [1, 2]})
    # IoU: a 1/(2+2-1)=1/3, b 2/(2+3-2)=2/3, c 1/(2+1-1)=1/2
    assert m["per_class_iou"]["a"] == pytest.approx(100 / 3)
    assert m["per_class_iou"]["b"] == pytest.approx(200 / 3)
    assert m["per_class_iou"]["c"] == pytest.approx(50)
    assert m["miou"] == pytest.approx((100 / 3 + 200 / 3 + 50) / 3)
    assert m["miou_objects"] == pytest.approx((200 / 3 + 50) / 2)
    assert m["pixel_accuracy"] == pytest.approx(100 * 4 / 6)
    assert m["num_pixels"] == 6


def test_miou_skips_empty_union_and_perfect():
    cm = ConfusionMatrix(4)
    t = torch.tensor([0, 0, 2, 2])
    cm.update(t.clone(), t)
    m = cm.compute()
    assert m["miou"] == pytest.approx(100.0)
    assert m["per_class_iou"]["1"] is None and m["per_class_iou"]["3"] is None
    assert m["num_valid_classes"] == 2
    # a false positive of an absent class makes its union non-empty: IoU 0 enters the mean
    cm.update(torch.tensor([3]), torch.tensor([0]))
    m = cm.compute()
    assert m["per_class_iou"]["3"] == 0.0
    assert m["miou"] == pytest.approx((100 * 2 / 3 + 100 + 0) / 3)


def test_all_ignore_gives_none():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([0, 1]), torch.tensor([255, 255]))
    m = cm.compute()
    assert m["miou"] is None and m["pixel_accuracy"] is None


def test_label_ids_outside_class_list_error():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="class list and the label ids disagree"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0, 7]), where="img.png")
    with pytest.raises(ValueError, match="differ in shape"):
        cm.update(torch.zeros(2, 3), torch.zeros(3, 2))


def test_recall_at_k():
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.5, 0.0], [0.0, 0.7, 0.2]])
    r = recall_at_k(sim, (1, 2, 5))
    assert r[1] == pytest.approx(100 / 3) and r[2] == 100.0 and r[5] == 100.0


# -------------------------------------------------------------------------------------- templates
def test_templates_exact():
    assert TCL_TEMPLATES == (
        "itap of a {}.",
        "a bad photo of a {}.",
        "a origami {}.",
        "a photo of the large {}.",
        "a {} in a video game.",
        "art of the {}.",
        "a photo of the small {}.",
        "a photo of many {}.",
        "a photo of {}s.",
    )
    assert len(OPENAI_IMAGENET_TEMPLATES) == 80 == len(set(OPENAI_IMAGENET_TEMPLATES))
    assert set(TCL_TEMPLATES[:8]) <= set(OPENAI_IMAGENET_TEMPLATES)
    assert get_templates("openai") == OPENAI_IMAGENET_TEMPLATES
    with pytest.raises(ValueError, match="exactly one"):
        get_templates(["a photo"])


def test_class_file_synonyms(tmp_path):
    p = tmp_path / "classes.txt"
    p.write_text("person, people\ncar\n\n")
    assert load_class_names(p) == [["person", "people"], ["car"]]
    p.write_text("person\n\ncar\n")
    with pytest.raises(ValueError, match="blank"):
        load_class_names(p)


# ------------------------------------------------------------------------------------------- text
def test_class_embeddings_follow_notebook_recipe(tmp_path):
    m = ToyEncoder()
    ce = encode_class_names(m, ["cat", "dog"], "tcl", cache_dir=None)
    with torch.no_grad():
        for c, name in enumerate(["cat", "dog"]):
            e = torch.nn.functional.normalize(m.encode_text([t.format(name) for t in TCL_TEMPLATES]), dim=-1)
            e = torch.nn.functional.normalize(e.mean(0), dim=-1)
            torch.testing.assert_close(ce.embeddings[c], e)
    assert ce.embeddings.shape == (2, 32)


def test_text_cache_hit_and_model_identity(tmp_path):
    m = ToyEncoder()
    calls = []
    orig = m.encode_text

    def counting(texts):
        calls.append(len(texts))
        return orig(texts)

    m.encode_text = counting
    a = encode_class_names(m, ["cat", "dog"], "tcl", cache_dir=tmp_path)
    n_first = sum(calls)
    b = encode_class_names(m, ["cat", "dog"], "tcl", cache_dir=tmp_path)
    assert sum(calls) - n_first == 1  # only the identity probe, no class texts
    torch.testing.assert_close(a.embeddings, b.embeddings)
    assert len(list(tmp_path.glob("text_*.pt"))) == 1
    # another random model with the same architecture must not hit that cache entry
    other = encode_class_names(ToyEncoder(seed=5), ["cat", "dog"], "tcl", cache_dir=tmp_path)
    assert not torch.allclose(other.embeddings, a.embeddings)
    encode_class_names(m, ["cat", "dog"], "openai", cache_dir=tmp_path)
    assert len(list(tmp_path.glob("text_*.pt"))) == 3


def test_synonym_score_is_max():
    emb = torch.eye(3)
    ce = ClassEmbeddings(emb, torch.tensor([0, 0, 1]), [["a", "a2"], ["b"]])
    feats = torch.nn.functional.normalize(torch.tensor([[0.1, 0.9, 0.2], [0.5, 0.0, 0.6]]), dim=-1)
    s = ce.scores(feats)
    assert s.shape == (2, 2)
    torch.testing.assert_close(s[0], torch.maximum(feats[:, 0], feats[:, 1]))
    torch.testing.assert_close(s[1], feats[:, 2])


@pytest.mark.parametrize("suffix", [".npy", ".pt", ".safetensors"])
def test_text_embedding_files_roundtrip(tmp_path, suffix):
    ce = ClassEmbeddings(torch.randn(3, 8), torch.arange(3), [["a"], ["b"], ["c"]], ("{}",))
    path = save_text_embeddings(ce, tmp_path / f"emb{suffix}")
    back = resolve_class_embeddings(["a", "b", "c"], text_embeddings=path)
    torch.testing.assert_close(back.embeddings, ce.embeddings)
    with pytest.raises(ValueError, match="3 embedding rows but the dataset has 2|different class list"):
        load_text_embeddings(path, ["a", "b"])
    if suffix != ".npy":
        with pytest.raises(ValueError, match="different class list"):
            load_text_embeddings(path, ["a", "x", "c"])


def test_no_text_tower_error():
    class NoText(ToyEncoder):
        has_text = False

    m = NoText()
    m.has_text = False
    with pytest.raises(ValueError, match="no text tower"):
        resolve_class_embeddings(["a"], model=m)


def test_nan_free_json_values():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([0]), torch.tensor([0]))
    m = cm.compute()
    assert all(not (isinstance(v, float) and math.isnan(v)) for v in m.values())
    assert np.isfinite(m["miou"])
