"""Stage-2 training: config, crops/target alignment, engine runs (each in its own process), resume,
2-process torchrun, export round trip, bad cache refused. CPU, gloo, tiny models; ~2-3 minutes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.test_train_support import base_overrides, make_cache, probe_pixels, run_subprocess

# --------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory) -> Path:
    return make_cache(tmp_path_factory.mktemp("cache") / "c")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


_RESULTS: dict[str, dict] = {}
# engine runs mask half the patches (exercises the mask token under every ZeRO stage); Z0 is also the
# reference of the resume and torchrun tests
Z0 = ["steps=6", "loss.mask_ratio=0.5", "engine.zero_stage=0", "checkpoint.every=3", "checkpoint.keep_last=1"]


def _run(name: str, root: Path, cache: Path, extra: list[str], nproc: int = 1, **kw) -> dict:
    if name not in _RESULTS:
        args = {
            "result": str(root / name / "result.json"),
            "overrides": base_overrides(cache, root / name / "out") + extra,
            **kw,
        }
        _RESULTS[name] = run_subprocess(args, nproc=nproc)
    r = _RESULTS[name]
    assert "error" not in r, r["error"] + "\n" + r.get("stderr", "")
    return r


# ----------------------------------------------------------------------------------------- config


def test_config_recipes_overrides_and_unknown_keys(tmp_path):
    from tipsdistill.distill.config import list_recipes, load_config, save_resolved

    assert {"distill", "pretrain-tipsv2", "pretrain-tips", "distill-feature"} <= set(list_recipes())
    cfg = load_config("distill", ["cache.path=/x", "optim.lr=1e-3", "data.flip=false", "engine.zero_stage=3"])
    assert cfg.optim.lr == 1e-3 and cfg.data.flip is False and cfg.engine.zero_stage == 3
    assert cfg.loss.mask_ratio == 0.0 and cfg.student.init == "random"
    p = load_config("pretrain-tipsv2")
    assert p.loss.mask_ratio == 0.75 and p.ema.kind == "head" and p.loss.patch_visible_weight == 1.0
    t = load_config("pretrain-tips")
    assert t.ema.kind == "full" and t.loss.patch_visible_weight == 0.0
    assert load_config("distill-feature", ["cache.path=/x"]).loss.patch == "cosine"
    with pytest.raises(ValueError, match=r"unknown config key 'optim.lrr'.*valid keys under 'optim': lr"):
        load_config("distill", ["cache.path=/x", "optim.lrr=1"])
    with pytest.raises(TypeError, match="data.batch_size"):
        load_config("distill", ["cache.path=/x", "data.batch_size=abc"])
    with pytest.raises(ValueError, match="cache.path"):
        load_config("distill")
    save_resolved(cfg, tmp_path)
    assert (tmp_path / "config.yaml").exists()
    assert "git_revision" in json.loads((tmp_path / "run_info.json").read_text())


def test_schedules():
    from tipsdistill.distill.config import load_config
    from tipsdistill.distill.schedules import Schedules

    cfg = load_config(
        "distill", ["cache.path=/x", "steps=100", "optim.warmup_steps=10", "optim.lr=1.0", "optim.min_lr=0.0"]
    )
    s = Schedules(cfg)
    assert s.lr(0) == pytest.approx(0.1) and s.lr(9) == pytest.approx(1.0)
    assert s.lr(10) == pytest.approx(1.0) and s.lr(100) == pytest.approx(0.0, abs=1e-12)
    assert s.weight_decay(0) == pytest.approx(cfg.optim.weight_decay)
    assert s.weight_decay(100) == pytest.approx(cfg.optim.weight_decay_end)


def test_config_keys_say_one_thing_each():
    from tipsdistill.distill.config import CacheSection, TrainConfig, load_config

    assert isinstance(TrainConfig().cache, CacheSection)
    with pytest.raises(TypeError, match="data.batch_size.*integer.*1.5"):  # an int field refuses "1.5"
        load_config("distill", ["cache.path=/x", "data.batch_size='1.5'"])
    with pytest.raises(TypeError, match="steps"):
        load_config("distill", ["cache.path=/x", "steps=2.5"])
    assert load_config("distill", ["cache.path=/x", "steps='3'"]).steps == 3
    # `mode` was folded into teacher.source: kept when it agrees, refused naming teacher.source when not
    assert load_config("pretrain-tips", data={"mode": "pretrain"}).pretraining
    assert not load_config("distill", ["cache.path=/x"], data={"mode": "distill"}).pretraining
    with pytest.raises(ValueError, match="teacher.source"):
        load_config("distill", ["cache.path=/x"], data={"mode": "pretrain"})
    # ema.kind does what it says
    with pytest.raises(ValueError, match="ema.kind=none.*ema.kind=head"):
        load_config("distill", ["cache.path=/x", "ema.kind=none"])
    with pytest.raises(ValueError, match="ema.kind=full.*pretraining"):
        load_config("distill", ["cache.path=/x", "ema.kind=full"])
    assert load_config("distill-feature", ["cache.path=/x"]).ema.kind == "none"
    with pytest.raises(ValueError, match="loss.text_source"):
        load_config("distill", ["cache.path=/x", "loss.text_source=none"])
    with pytest.raises(ValueError, match="teacher.source=online"):
        load_config("distill", ["cache.path=/x", "loss.text_source=teacher"])
    with pytest.raises(ValueError, match="loss.centering"):
        load_config("distill", ["cache.path=/x", "loss.centering=none"])
    with pytest.raises(ValueError, match=r"ema.momentum=1.5 must be in \[0, 1\]"):
        load_config("distill", ["cache.path=/x", "ema.momentum=1.5"])


def test_task_takes_its_targets_and_captions_from_the_config(tiny_cache):
    from tipsdistill.distill.config import load_config
    from tipsdistill.distill.targets import (
        CachedTargets,
        CachedText,
        EMAStudentTargets,
        SelfTargets,
        TowerText,
    )
    from tipsdistill.distill.task import build_task

    cpu = torch.device("cpu")
    base = base_overrides(tiny_cache, "/tmp/unused")
    built = build_task(load_config("distill", [*base, "loss.centering=sinkhorn_knopp"]), device=cpu)
    task = built.task
    assert isinstance(task.targets, CachedTargets) and task.targets.dim == 48
    assert isinstance(task.text, CachedText) and built.info["text_source"] == "cache"
    assert task.patch_loss.centering == "sinkhorn_knopp" and task.dino_loss.centering == "sinkhorn_knopp"
    assert built.info["cache"]["dim"] == 48 and built.info["cache"]["grid"] == [4, 4]
    # state outside the engine is not a submodule of what DeepSpeed trains
    names = {n for n, _ in task.named_modules()}
    assert not any("ema" in n for n in names) and set(built.aux_state()) == {"ema_patch", "ema_cls"}
    pre = build_task(load_config("pretrain-tips", base), device=cpu)
    assert isinstance(pre.task.targets, EMAStudentTargets) and "ema_student" in pre.aux_state()
    assert isinstance(build_task(load_config("pretrain-tipsv2", base), device=cpu).task.targets, SelfTargets)
    with pytest.raises(ValueError, match="loss.text_source=student needs a student text tower"):
        build_task(load_config("distill", [*base, "loss.text_source=student"]), device=cpu)
    tower = "student.kwargs=" + json.dumps(
        {**json.loads(base[3].split("=", 1)[1]), "text": {"kind": "tips", "tokenizer": str(_tokenizer())}}
    )
    # a batch of the loader (images from the dataset, cached features from the feeder) feeds the task
    from tipsdistill.distill.train import _Loader, _to_device

    own_cfg = load_config("distill", [*base, tower, "loss.text_source=student"])
    own = build_task(own_cfg, device=cpu)
    assert isinstance(own.task.text, TowerText) and own.task.text.trainable
    assert built.dataset.batch_features == ("patch", "cls", "text")
    assert own.dataset.batch_features == ("patch", "cls")  # captions from the tower, not the cache
    loader = _Loader(own.dataset, own.sampler, own_cfg)
    try:
        batch = loader.next()
    finally:
        loader.feeder.close()
    assert (
        set(batch["features"].tensors) >= {"patch", "cls", "t_roi"}
        and "text/alt" not in batch["features"].tensors
    )
    terms = own.task(_to_device(batch, cpu), teacher_temp=0.07)
    assert set(terms) == {"patch", "dino", "clip"} and all(torch.isfinite(v) for v in terms.values())
    with pytest.raises(ValueError, match="no cache.path"):
        build_task(
            load_config("pretrain-tipsv2", [o for o in base if not o.startswith("cache.path")]), device=cpu
        )


def _tokenizer() -> Path:
    from tipsdistill.teachers.embedded import default_path

    return default_path() / "tokenizer.model"


def test_cache_spec_from_meta(tiny_cache):
    from tipsdistill.cache import CacheSpec, open_cache

    cache = open_cache(tiny_cache)
    spec = cache.spec
    assert spec == CacheSpec.from_meta(cache.meta, str(cache.path))
    assert (spec.dim, spec.grid, spec.num_global_tokens, spec.num_views) == (48, (4, 4), 1, 1)
    assert spec.has_text and spec.text_dim == 48 and set(spec.granularities) == {"alt", "short", "detailed"}
    item = cache[0]
    assert item["patch"].shape == (*spec.grid, spec.dim) and item["cls"].shape == (
        spec.num_global_tokens,
        spec.dim,
    )
    with pytest.raises(ValueError, match=r"lacks the metadata field\(s\) \['dim'\].*rebuild"):
        CacheSpec.from_meta({k: v for k, v in cache.meta.items() if k != "dim"}, "x.h5")


# ------------------------------------------------------------------------------------------- data


def test_align_teacher_map_crop_flip_and_grids():
    from tipsdistill.distill.data import align_teacher_map

    h = w = 4
    ys, xs = torch.meshgrid(torch.arange(h).float() + 0.5, torch.arange(w).float() + 0.5, indexing="ij")
    feat = torch.stack([xs / w, ys / h], -1)  # token centre in normalised coordinates
    # the central half of the image (interior: bilinear sampling is exact for a linear map) on a 2x4 grid,
    # a different grid from the teacher's 4x4
    box = (0.25, 0.25, 0.75, 0.75)
    out = align_teacher_map(feat, box, (2, 4))
    assert out.shape == (2, 4, 2)
    # student token centres: x = 0.25 + (j + 0.5) / 8, y = 0.25 + (i + 0.5) / 4
    assert torch.allclose(out[0, :, 0], 0.25 + (torch.arange(4) + 0.5) / 8, atol=1e-5)
    assert torch.allclose(out[:, 0, 1], 0.25 + (torch.arange(2) + 0.5) / 4, atol=1e-5)
    flipped = align_teacher_map(feat, box, (2, 4), flip=True)
    assert torch.equal(flipped, out.flip(1))
    same = align_teacher_map(feat, (0.0, 0.0, 1.0, 1.0), (4, 4))
    assert torch.allclose(same, feat, atol=1e-6)


def test_dataset_matches_cache_and_is_seeded(tiny_cache, caplog):
    from tipsdistill.cache import build_dataset, open_cache
    from tipsdistill.distill.config import load_config
    from tipsdistill.distill.data import DistillDataset, ResumableSampler

    cfg = load_config("distill", base_overrides(tiny_cache, "/tmp/unused"))
    src = build_dataset("synthetic", split="train", size=60, image_size=32)  # 12 images not in the cache
    with caplog.at_level("INFO", logger="tipsdistill.distill.data"):
        ds = DistillDataset(src, cfg.data, (4, 4), cache=open_cache(tiny_cache), seed=0)
    assert len(ds) == 48 and len(ds.skipped_keys) == 12 and ds.target == "crop"
    assert min(cfg.data.global_scale) < 1 and "resampled from the cached full-image grid" in caplog.text
    assert ds.batch_features == ("patch", "cls")  # what the feeder reads for each batch
    a, b = ds[(0, 5)], ds[(0, 5)]
    assert torch.equal(a["global"], b["global"]) and torch.equal(a["t_roi"], b["t_roi"])
    assert a["t_roi"].shape == (4,) and a["locals"].shape == (2, 3, 16, 16)
    assert "t_patch" not in a and a["t_view"] == 0 and a["t_flip"] == a["flip"]
    assert not torch.equal(ds[(1, 5)]["global"], a["global"])  # another epoch, other crops
    # a batch read (what DataLoader calls) = the items one by one
    idx = [(0, 7), (1, 5), (0, 2), (0, 7)]
    batch = ds.__getitems__(idx)
    for (e, i), got in zip(idx, batch, strict=True):
        want = ds[(e, i)]
        assert got["key"] == want["key"] and got["index"] == want["index"]
        for k in ("global", "locals", "t_roi", "box"):
            assert torch.equal(got[k], want[k]), k
        assert (got["t_ratio"], got["t_flip"], got["t_view"]) == (
            want["t_ratio"],
            want["t_flip"],
            want["t_view"],
        )
        assert got["captions"] == want["captions"] and got["caption_u"] == want["caption_u"]
    with pytest.raises(ValueError, match="batch_features"):
        DistillDataset(src, cfg.data, (4, 4), cache=open_cache(tiny_cache), batch_features=())
    with pytest.raises(ValueError, match="not in the source dataset"):
        DistillDataset(
            build_dataset("synthetic", split="train", size=10, image_size=32),
            cfg.data,
            (4, 4),
            cache=open_cache(tiny_cache),
        )
    # 2 ranks of batch b together = the first 2b samples of one rank
    one = ResumableSampler(48, seed=3).order()
    r0, r1 = (
        ResumableSampler(48, rank=0, world=2, seed=3).order(),
        ResumableSampler(48, rank=1, world=2, seed=3).order(),
    )
    assert sorted(r0[:4] + r1[:4]) == sorted(one[:8])


def test_bad_cache_refused_before_training(tiny_cache):
    from tipsdistill.distill.config import load_config
    from tipsdistill.distill.task import build_task

    for extra, pat in (
        (["cache.expect_dim=64"], r"48.*64|64.*48"),
        (["cache.expect_grid=[8, 8]"], r"\[4, 4\].*\[8, 8\]|\[8, 8\].*\[4, 4\]"),
    ):
        cfg = load_config("distill", base_overrides(tiny_cache, "/tmp/unused") + extra)
        with pytest.raises(ValueError, match=pat):
            build_task(cfg, device=torch.device("cpu"))


# ------------------------------------------------------------------------------------ engine runs


def _losses(r: dict) -> list[float]:
    return [rec["loss"] for rec in r["log"]]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stages_loss_decreases(stage, tiny_cache, runs):
    extra = Z0 if stage == 0 else ["steps=6", "loss.mask_ratio=0.5", f"engine.zero_stage={stage}"]
    r = _run(f"z{stage}", runs, tiny_cache, extra)
    losses = _losses(r)
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-2:]) / 2 < 0.8 * losses[0], losses
    if stage:  # every stage computes the same first step
        assert losses[0] == pytest.approx(_losses(_run("z0", runs, tiny_cache, Z0))[0], rel=1e-5)


def test_resume_is_bit_identical(tiny_cache, runs):
    full = _run("z0", runs, tiny_cache, Z0)
    extra = Z0
    first = _run("part1", runs, tiny_cache, extra, max_steps=[3])
    assert first["step"] == 3
    second = _run("part2", runs, tiny_cache, [*extra, f"output_dir={runs / 'part1' / 'out'}"], runs=["auto"])
    assert second["step"] == 6
    assert _losses(second) == _losses(full)  # log of part 1 (3 steps) + resumed part (3 steps)
    assert second["weights"] == full["weights"]
    assert second["ema"] == full["ema"]
    ckpts = sorted(p.name for p in (runs / "part1" / "out" / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000006"]  # keep_last=1


def test_batch_reader_run_matches_the_item_reference(tiny_cache, runs):
    """The same run with targets and captions from the reference (tests/item_reference.py: rows read
    item by item with h5py, targets aligned per sample on the CPU, as the removed item reader built them)
    and from the one data path (feature batches read in the training process, targets built on the
    device): the same losses at every step (float tolerance 1e-6; on the CPU they are equal)."""
    batch = _run("z0", runs, tiny_cache, Z0)
    item = _run("z0_item", runs, tiny_cache, Z0, item_reference=True)
    assert len(_losses(batch)) == 6
    for a, b in zip(batch["log"], item["log"], strict=True):
        for k in ("loss", "patch", "dino", "clip"):
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-7), (a["step"], k)
    assert batch["weights"] == pytest.approx(item["weights"], rel=1e-5)


def test_torchrun_two_processes_match_one(tiny_cache, runs):
    one = _run("z0", runs, tiny_cache, Z0)  # batch 8 in one process
    two = _run(
        "two_proc",
        runs,
        tiny_cache,
        ["steps=2", "data.batch_size=4", "engine.zero_stage=2", "loss.mask_ratio=0.5"],
        nproc=2,
    )
    l1, l2 = one["log"][0], two["log"][0]
    for k in ("loss", "patch", "dino", "clip"):
        assert l2[k] == pytest.approx(l1[k], rel=1e-4, abs=1e-5), k
    assert Path(two["export"], "model.safetensors").exists()  # checkpoint + export from 2 ZeRO-2 ranks


def test_export_reload_identical(tiny_cache, runs):
    import timm

    from tipsdistill.students import load_student

    r = _run("z0", runs, tiny_cache, Z0)
    export = Path(r["export"])
    ref = torch.load(runs / "z0" / "result.probe.pt")
    student = load_student(export)
    with torch.no_grad():
        f = student.encode_image(probe_pixels())
    assert torch.equal(f.patch, ref["patch"]) and torch.equal(f.cls, ref["cls"])
    conf = json.loads((export / "config.json").read_text())
    vit = timm.create_model(
        conf["timm"]["model_name"],
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(export / "model.safetensors")),
        **conf["timm"]["kwargs"],
    ).eval()
    with torch.no_grad():
        tokens = vit.forward_features(probe_pixels())  # student normalisation is mean 0 / std 1
    assert torch.allclose(tokens[:, vit.num_prefix_tokens :].reshape(f.patch.shape), ref["patch"], atol=1e-5)
    assert (export / "README.md").read_text().startswith("# Student")


def test_nan_loss_stops_naming_step_and_term(tiny_cache, runs):
    args = {
        "result": str(runs / "nan" / "result.json"),
        "overrides": base_overrides(tiny_cache, runs / "nan" / "out")
        + ["steps=4", "optim.lr=1e30", "checkpoint.every=1"],
    }
    r = run_subprocess(args)
    assert "TrainingDiverged" in r["error"] and "at step 2" in r["error"]
    assert any(f"'{t}'" in r["error"] for t in ("patch", "dino", "clip", "loss"))
    from tipsdistill.distill.checkpoint import list_complete

    assert [s for s, _ in list_complete(runs / "nan" / "out" / "checkpoints")] == [
        1
    ]  # nothing saved after it


@pytest.mark.parametrize("recipe", ["pretrain-tipsv2", "pretrain-tips", "distill-feature", "online"])
def test_other_recipes_run(recipe, tiny_cache, runs):
    from tests.test_train_support import TEACHER_KW

    extra = ["steps=2", "loss.teacher_temp_warmup_steps=0", "optim.warmup_steps=1"]
    if recipe == "online":  # the same teacher architecture live (captions still from the cache)
        kw = json.dumps({"model_name": "vit_tiny_patch16_224", **TEACHER_KW})
        extra += [
            "teacher.source=online",
            "teacher.name=timm",
            f"teacher.kwargs={kw}",
            "log.tensorboard=true",
        ]
    r = _run(f"recipe-{recipe}", runs, tiny_cache, extra, recipe="distill" if recipe == "online" else recipe)
    terms = set(r["log"][-1])
    want = {"patch", "clip"} | ({"dino"} if recipe.startswith("pretrain") else set())
    assert want <= terms and all(math.isfinite(rec["loss"]) for rec in r["log"])
    assert Path(r["export"], "model.safetensors").exists()


def test_user_deepspeed_json(tmp_path):
    from tipsdistill.distill.config import load_config
    from tipsdistill.distill.train import build_ds_config

    cfg = load_config("distill", ["cache.path=/x", "data.batch_size=4", "optim.accum_steps=2"])
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 3, "overlap_comm": True}}))
    cfg.engine.deepspeed_config = str(user)
    ds = build_ds_config(cfg, world=2)
    assert ds["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == 2
    user.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8}))
    with pytest.raises(ValueError, match="disagree"):
        build_ds_config(cfg, world=1)
    user.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ValueError, match="optimizer"):
        build_ds_config(cfg, world=1)
