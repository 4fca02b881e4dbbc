"""Student text towers that start pretrained (issue #26): official TIPS ``.npz`` text weights, a
transformers text model by hub id from a local HF cache (offline), a copy of a teacher's own text tower
(embedded, TIPS, transformers Tipsv2 / CLIP); frozen towers outside the optimizer; exports that rebuild
the tower from its architecture and reload the trained weights. CPU, tiny random models."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from tests.test_hub_teachers import hub, put_in_hub_cache  # noqa: F401  (fixture)
from tests.test_teachers_hf import _configs
from tests.test_teachers_tips import TINY_DICT, D, tips_files  # noqa: F401  (fixture)
from tipsdistill.students import build_student, load_student
from tipsdistill.teachers import build_teacher

torch.set_num_threads(1)

TEXTS = ["a photo of a cat sitting on a mat", "two birds fly over the blue sea", "a dog"]
# a one-block TIPS-layout student, 48 wide: narrower or wider than every text space below
VIT = dict(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=2, reg_tokens=1, no_embed_class=True)
WORDS = "a photo of cat sitting on mat two birds fly over the blue sea dog red ball grass".split()


def _student(text: dict, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_student("vit_base_patch14_reg1_tipsv2", text=text, **VIT, **kw)


def _bert_tokenizer():
    import transformers as tr

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    return tr.BertTokenizer(vocab={w: i for i, w in enumerate(words)})


def _perturb(module: torch.nn.Module) -> None:
    """Move every weight away from where it started (an export must carry the trained weights)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)


def _roundtrip(student: torch.nn.Module, out: Path) -> torch.nn.Module:
    """Export ``student`` and load it back; text embeddings and tokens must be identical."""
    from tipsdistill.distill.export import export_student

    student.eval()
    export_student(student, out)
    loaded = load_student(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_text(TEXTS), student.encode_text(TEXTS), rtol=0, atol=0)
        x = torch.rand(1, 3, 32, 32)
        torch.testing.assert_close(
            loaded.encode_image(x).patch, student.encode_image(x).patch, rtol=0, atol=0
        )
    assert loaded.text_dim == student.text_dim
    return loaded


# --------------------------------------------------------------------------------- TIPS .npz weights
def test_tips_npz_text_checkpoint(tips_files, tmp_path):  # noqa: F811
    teacher = build_teacher(
        "tips",
        vision_ckpt=tips_files["vision"],
        text_ckpt=tips_files["text"],
        tokenizer=tips_files["tok"],
        variant=TINY_DICT,
    )
    # the head count is not in the weights: a published size implies it, a custom one (here) needs it
    text = {
        "kind": "tips",
        "init": str(tips_files["text"]),
        "tokenizer": str(tips_files["tok"]),
        "num_heads": 2,
    }
    s = _student(text)
    # the size is read from the checkpoint; the student's text space is the checkpoint's (32 wide)
    assert s.text.tower.config.to_dict() == {
        **TINY_DICT["text"],
        "vocab_size": tips_files["vocab"],
        "max_len": 64,
    }
    assert s.text_dim == D and s.text_proj.weight.shape == (D, 48) and s.text.proj is None
    with torch.no_grad():
        torch.testing.assert_close(s.encode_text(TEXTS), teacher.encode_text(TEXTS), rtol=0, atol=0)
    # the recorded config is the architecture, not the source
    arch = s.config["text"]
    assert "init" not in arch and arch["width"] == D and arch["depth"] == 2 and arch["out_dim"] == D
    # a size that disagrees with the checkpoint is refused, naming the key and both shapes
    vocab = tips_files["vocab"]
    with pytest.raises(
        ValueError, match=rf"token_embedding.weight has shape \({vocab}, 32\).*width=40 needs \({vocab}, 40\)"
    ):
        _student({**text, "width": 40})
    with pytest.raises(ValueError, match=r"transformer.resblocks.\{i\} has blocks \(2,\).*text.depth=3"):
        _student({**text, "depth": 3})
    with pytest.raises(ValueError, match="vision"):
        _student({**text, "init": str(tips_files["vision"])})
    # a wider text space than the checkpoint's: a new projection, which trains even when the tower is frozen
    wide = _student({**text, "freeze": True}, text_dim=48)
    assert wide.text_dim == 48 and wide.text_proj is None and wide.text.proj.weight.requires_grad
    assert not any(p.requires_grad for p in wide.text.tower.parameters())
    # export: the tokenizer travels with it, the .npz is not read again (moved away here)
    _perturb(s.text)
    moved = tmp_path / "gone.npz"
    Path(tips_files["text"]).rename(moved)
    try:
        loaded = _roundtrip(s, tmp_path / "export")
    finally:
        moved.rename(tips_files["text"])
    conf = json.loads((tmp_path / "export" / "config.json").read_text())
    assert conf["student"]["text"]["tokenizer"] == "text_tokenizer.model"
    assert (tmp_path / "export" / "text_tokenizer.model").is_file() and loaded.text.proj is None


def test_kind_teacher_copies_a_tips_teachers_tower(tips_files):  # noqa: F811
    kw = dict(
        vision_ckpt=str(tips_files["vision"]),
        text_ckpt=str(tips_files["text"]),
        tokenizer=str(tips_files["tok"]),
    )
    teacher = build_teacher("tips", **kw, variant=TINY_DICT)
    s = _student({"kind": "teacher", "teacher": "tips", "teacher_kwargs": {**kw, "variant": TINY_DICT}})
    assert s.text_dim == D and s.config["text"]["kind"] == "tips"
    with torch.no_grad():
        torch.testing.assert_close(s.encode_text(TEXTS), teacher.encode_text(TEXTS), rtol=0, atol=0)
    assert all(p.requires_grad for p in s.text.parameters())  # trainable by default


# ------------------------------------------------------------------------- transformers by hub id
def test_hf_text_model_by_hub_id_offline(hub, tmp_path, monkeypatch):  # noqa: F811
    import transformers as tr

    torch.manual_seed(0)
    cfg = tr.BertConfig(
        vocab_size=len(WORDS) + 5,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    bert = tr.BertModel(cfg).eval()
    bert.save_pretrained(tmp_path / "saved")
    _bert_tokenizer().save_pretrained(tmp_path / "saved")
    put_in_hub_cache(hub, "org/tiny-bert", tmp_path / "saved")
    s = _student({"kind": "hf", "path": "org/tiny-bert"}).eval()
    # a text encoder: masked mean pooling of the pretrained model, then a projection to the student's width
    assert s.text_dim == 48 and s.text.proj.weight.shape == (48, 32)
    tok = _bert_tokenizer()(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = bert(**tok).last_hidden_state
        m = tok["attention_mask"].unsqueeze(-1).float()
        torch.testing.assert_close(s.text.pool(TEXTS), (hidden * m).sum(1) / m.sum(1), rtol=0, atol=1e-5)
    assert s.config["text"] == {
        "kind": "hf",
        "path": "org/tiny-bert",
        "out_dim": 48,
        "max_len": 64,
        "freeze": False,
        "pretrained": False,
    }
    frozen = _student({"kind": "hf", "path": "org/tiny-bert", "freeze": True}, text_dim=32)
    assert frozen.text_dim == 32 and frozen.text.memo_enabled and frozen.text.proj.weight.requires_grad
    assert not any(p.requires_grad for p in frozen.text.encoder.parameters())
    with pytest.raises(ValueError, match=r"'org/absent'.*HF_HUB_OFFLINE=1"):
        _student({"kind": "hf", "path": "org/absent"})
    # the export carries config.json + tokenizer (no weights): it loads with an empty HF cache
    _perturb(s.text)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(empty))
    _roundtrip(s, tmp_path / "export")
    files = sorted(p.name for p in (tmp_path / "export" / "text_encoder").iterdir())
    assert "config.json" in files and not any(f.endswith(".safetensors") for f in files)


@pytest.mark.parametrize("family", ["tipsv2", "clip"])
def test_kind_teacher_copies_an_hf_teachers_text_model(family, tmp_path):
    import transformers as tr

    torch.manual_seed(0)
    cls = {"tipsv2": tr.Tipsv2Model, "clip": tr.CLIPModel}[family]
    cls(_configs()[family]).save_pretrained(tmp_path / "m")
    _bert_tokenizer().save_pretrained(tmp_path / "m")
    teacher = build_teacher("hf", model=str(tmp_path / "m"))
    s = _student(
        {"kind": "teacher", "teacher": "hf", "teacher_kwargs": {"model": str(tmp_path / "m")}}
    ).eval()
    width = 16 if family == "clip" else 32  # CLIP's text_projection
    assert s.text_dim == width and s.text.proj is None
    with torch.no_grad():
        torch.testing.assert_close(s.encode_text(TEXTS), teacher.encode_text(TEXTS), rtol=0, atol=0)
    _perturb(s.text)
    _roundtrip(s, tmp_path / "export")


# ------------------------------------------------------------------------------ the embedded teacher
def test_kind_teacher_embedded_frozen_and_trained_in_a_task(tmp_path):
    from tests.test_train_support import base_overrides
    from tipsdistill.distill.config import load_config
    from tipsdistill.distill.data import collate
    from tipsdistill.distill.task import build_task
    from tipsdistill.distill.train import param_groups

    teacher = build_teacher("embedded")
    s = _student({"kind": "teacher", "teacher": "embedded"}).eval()
    # the teacher's text space (MiniLM + its trained projection, 96 wide); the student projects into it
    assert s.text_dim == 96 and s.text_proj.weight.shape == (96, 48)
    assert s.config["text"]["kind"] == "minilm" and s.config["text"]["out_dim"] == 96
    with torch.no_grad():
        torch.testing.assert_close(s.encode_text(TEXTS), teacher.encode_text(TEXTS), rtol=0, atol=1e-5)
    assert all(p.requires_grad for p in s.text.parameters()) and not s.text.memo_enabled
    with pytest.raises(ValueError, match="teacher's text space of width 96, not 48"):
        _student({"kind": "teacher", "teacher": "embedded"}, text_dim=48)

    # a pretraining recipe with the student's own tower: no cache needed
    base = [
        o
        for o in base_overrides("/unused", tmp_path / "out")
        if not o.startswith(("cache.", "student.kwargs"))
    ]
    base += ["data.dataset=synthetic", "data.dataset_kwargs={split: train, size: 8, image_size: 32}"]
    base += ["student.name=vit_base_patch14_reg1_tipsv2", "loss.text_source=student", "data.local_crops=0"]
    for freeze in (True, False):
        kwargs = {**VIT, "text": {"kind": "teacher", "teacher": "embedded", "freeze": freeze}}
        built = build_task(
            load_config("pretrain-tipsv2", [*base, "student.kwargs=" + json.dumps(kwargs)]),
            device=torch.device("cpu"),
        )
        task, tower = built.task, built.student.text
        in_optimizer = {id(p) for g in param_groups(task, 0.05) for p in g["params"]}
        terms = task(collate(built.dataset.__getitems__([(0, 0), (0, 1)])), teacher_temp=0.07)
        sum(terms.values()).backward()
        tower_params = list(tower.parameters())
        assert (
            built.student.text_proj.weight.grad is not None
            and id(built.student.text_proj.weight) in in_optimizer
        )
        if freeze:  # no gradient, no optimizer state; pooled captions memoised
            assert all(p.grad is None and id(p) not in in_optimizer for p in tower_params)
            assert tower.memo_enabled and len(tower.memo) > 0
        else:
            assert all(id(p) in in_optimizer for p in tower_params)
            assert tower.proj.weight.grad is not None and tower.proj.weight.grad.abs().sum() > 0
    # export of the trained (here perturbed) copy: the MiniLM weights come from the export
    student = copy.deepcopy(s)
    _perturb(student.text)
    _roundtrip(student, tmp_path / "export")
