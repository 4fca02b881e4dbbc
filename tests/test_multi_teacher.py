"""Several teachers into one student (distill.multi, students.adaptors): two tiny teachers of different
width, grid, resolution and storage cached over the same generated set (one sample skipped in one cache),
joined by key; PHI-S statistics against a direct computation; DeepSpeed runs (ZeRO 2 with a bit-identical
resume, ZeRO 3 on two processes); export, reload, adaptor outputs and zero-shot through the text
teacher's adaptor. CPU, tiny models."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.test_train_support import make_cache, run_subprocess, tiny_teacher

N = 24
STUDENT_KW = dict(
    img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, reg_tokens=1, no_embed_class=True
)


def _second_teacher(bad_row: int = 5):
    """A timm teacher of another width (24), patch 16 at 48 px (grid 3x3), no text; the forward returns
    non-finite tokens for one image, so stage 1 skips that sample in this cache only."""
    from tipsdistill.teachers.timm_teacher import build_timm_teacher

    torch.manual_seed(7)
    t = build_timm_teacher(
        "vit_tiny_patch16_224", img_size=48, patch_size=16, embed_dim=24, depth=1, num_heads=2
    ).freeze()
    plain = t.encode_image
    seen = {"n": 0}

    def encode_image(pixels, **kw):
        out = plain(pixels, **kw)
        start, seen["n"] = seen["n"], seen["n"] + pixels.shape[0]
        if start <= bad_row < seen["n"]:
            out.patch[bad_row - start] = float("nan")
        return out

    t.encode_image = encode_image  # type: ignore[method-assign]
    return t


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict[str, Path]:
    from tipsdistill.cache import build_dataset, extract_features

    root = tmp_path_factory.mktemp("multi")
    a = make_cache(root / "tips", n=N)  # dim 48, grid 4x4 at 32 px, float16, captions
    b = root / "eff"
    extract_features(
        dict(out=str(b), image_size=48, batch_size=8, num_workers=0, progress=False, storage="int8"),
        teacher=_second_teacher(),
        dataset=build_dataset("synthetic", split="train", size=N, image_size=32),
    )
    other = root / "other"  # the same teacher over another split: no key in common
    extract_features(
        dict(out=str(other), image_size=32, batch_size=8, num_workers=0, progress=False),
        teacher=tiny_teacher(),
        dataset=build_dataset("synthetic", split="validation", size=4, image_size=32),
    )
    return {"tips": a, "eff": b, "other": other}


def _teachers(caches: dict[str, Path]) -> str:
    return (
        f"teachers=[{{name: tips, path: {caches['tips']}, text: true}}, "
        f"{{name: eff, path: {caches['eff']}, standardize: channel, patch_loss: smooth_l1, weight: 0.5}}]"
    )


def _overrides(caches: dict[str, Path], out: Path) -> list[str]:
    return [
        _teachers(caches),
        f"output_dir={out}",
        "student.name=vit_tiny_patch16_224",
        "student.kwargs=" + json.dumps(STUDENT_KW),
        "data.dataset_kwargs={split: train, size: 24, image_size: 32}",
        "data.image_size=32",
        "data.batch_size=4",
        "data.num_workers=0",
        "optim.warmup_steps=1",
        "optim.lr=2e-3",
        "loss.mask_ratio=0.25",
        "log.progress=false",
        "checkpoint.every=2",
        "checkpoint.keep_last=2",
        "steps=4",
    ]


def test_caches_are_joined_by_key_and_disjoint_caches_refused(caches):
    from tipsdistill.distill.config import load_config
    from tipsdistill.distill.multi import join_keys, open_teachers

    cfg = load_config("distill", [_teachers(caches), "output_dir=/unused"])
    teachers = open_teachers(cfg)
    assert [t.name for t in teachers] == ["tips", "eff"] and teachers[0].entry.text
    keys = join_keys(teachers)
    assert len(keys) == N and len(set(keys)) == N
    tips, eff = teachers
    assert (tips.rows >= 0).all()
    lacking = np.flatnonzero(eff.rows < 0).tolist()
    ((_, bad, reason),) = eff.cache.skipped  # the non-finite sample, skipped in eff's cache only
    assert "nonfinite" in reason and lacking == [keys.index(bad)]
    assert [eff.cache.keys()[r] for r in eff.rows if r >= 0] == [k for k in keys if k != bad]

    bad = load_config(
        "distill",
        [
            f"teachers=[{{name: a, path: {caches['tips']}}}, {{name: b, path: {caches['other']}}}]",
            "output_dir=/x",
        ],
    )
    with pytest.raises(ValueError, match=rf"{caches['tips']}.*{caches['other']}.*overlap 0"):
        join_keys(open_teachers(bad))
    with pytest.raises(ValueError, match="more than once"):
        open_teachers(load_config("distill", [f"cache.paths=[{caches['tips']}, {caches['tips']}]"]))


def test_phi_s_statistics_equal_a_direct_computation(caches, tmp_path):
    from tipsdistill.cache import open_cache
    from tipsdistill.distill.multi import load_statistics, stats_path
    from tipsdistill.students.adaptors import balancing_rotation, hadamard, standardisation

    for name in ("tips", "eff"):  # float16 and int8 storage
        cache = open_cache(caches[name])
        stats = load_statistics(cache)
        path = stats_path(cache)
        assert path.is_file() and path.parent == Path(cache.path).parent
        # direct: every patch token of every sample through the item reader, float64
        patch = torch.cat([cache[i]["patch"].reshape(-1, cache.spec.dim) for i in range(len(cache))]).double()
        cls = torch.stack([cache[i]["cls"][0] for i in range(len(cache))]).double()
        for which, x in (("patch", patch), ("cls", cls)):
            mean = x.mean(0)
            cov = (x - mean).T @ (x - mean) / x.shape[0]
            assert torch.allclose(stats[f"{which}_mean"], mean, atol=1e-6)
            assert torch.allclose(stats[f"{which}_cov"], cov, atol=1e-6)
        # PHI-S: one scale, every dimension of the standardised tokens has variance 1, invertible
        maps = standardisation("phi-s", stats["patch_mean"], stats["patch_cov"])
        y = (patch.float() - maps["mean"]) @ maps["forward"]
        var = y.double().var(0, unbiased=False)
        assert torch.allclose(var, torch.ones_like(var), atol=1e-3)
        back = y @ maps["inverse"] + maps["mean"]
        assert torch.allclose(back, patch.float(), atol=1e-3)
        # read back from the file, not recomputed
        mtime = path.stat().st_mtime_ns
        again = load_statistics(cache)
        assert path.stat().st_mtime_ns == mtime and torch.equal(again["patch_cov"], stats["patch_cov"])
    # a file of another cache identity beside it is recomputed, never trusted
    cache = open_cache(caches["tips"])
    path = stats_path(cache)
    from safetensors.torch import load_file, save_file

    good = load_file(str(path))

    save_file({"patch_mean": torch.zeros(3)}, str(path), metadata={"format": "x", "identity": "{}"})
    assert load_statistics(cache)["patch_mean"].shape == (48,)
    assert all(torch.equal(v, good[k]) for k, v in load_file(str(path)).items())  # rewritten, same values
    # the rotation equalises the variances: Hadamard for powers of two, Givens otherwise
    for d in (16, 12):
        lam = torch.rand(d, dtype=torch.float64) * 5
        r = balancing_rotation(lam)
        assert torch.allclose(r @ r.T, torch.eye(d, dtype=torch.float64), atol=1e-10)
        assert torch.allclose((r @ torch.diag(lam) @ r.T).diagonal(), lam.mean().expand(d), atol=1e-10)
    assert torch.equal(balancing_rotation(torch.ones(16)) * 4, hadamard(16))


def _result(name: str, root: Path, caches: dict[str, Path], extra: list[str], nproc: int = 1, **kw) -> dict:
    args = {
        "result": str(root / name / "result.json"),
        "overrides": _overrides(caches, root / name / "out") + extra,
    }
    res = run_subprocess({**args, **kw}, nproc=nproc)
    assert "error" not in res, res["error"] + "\n" + res.get("stderr", "")
    return res


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


def test_train_resume_export_and_zero_shot_through_the_text_adaptor(caches, runs):
    from tipsdistill.distill.evaluation import evaluate_segmentation, resolve_class_embeddings
    from tipsdistill.distill.evaluation.datasets import build_eval_dataset
    from tipsdistill.distill.evaluation.models import build_model
    from tipsdistill.distill.evaluation.segmentation import SegmentationSettings
    from tipsdistill.students import load_student

    straight = _result("z2", runs, caches, ["engine.zero_stage=2"])
    first = _result("z2r", runs, caches, ["engine.zero_stage=2"], max_steps=[2])
    assert first["step"] == 2
    resumed = _result(
        "z2r2", runs, caches, ["engine.zero_stage=2", f"output_dir={runs / 'z2r' / 'out'}"], runs=["auto"]
    )
    assert straight["step"] == resumed["step"] == 4
    assert [r["loss"] for r in resumed["log"]] == [r["loss"] for r in straight["log"]]
    assert straight["weights"] == resumed["weights"]  # bit-identical after the resume
    log = straight["log"]
    assert {"tips/patch", "tips/cls", "eff/patch", "eff/cls", "clip"} <= set(log[-1])
    assert all(np.isfinite(r["loss"]) for r in log)
    out = runs / "z2" / "out"
    info = json.loads((out / "run_info.json").read_text())["task"]["teachers"]
    assert info["eff"]["missing"] == 1 and len(info["eff"]["missing_keys"]) == 1
    assert info["tips"]["missing"] == 0 and info["tips"]["text"]

    # export: reloaded adaptors give the trained student's outputs exactly (its module state at step 4,
    # as the ZeRO-2 checkpoint holds it whole)
    exported = load_student(out / "export")
    ckpt_student = load_student(out / "export")
    with torch.no_grad():  # a fresh state first, so the comparison below sees the loaded one
        for p in ckpt_student.parameters():
            p.zero_()
    module = torch.load(
        out / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt", weights_only=False
    )
    own = {k[len("student.") :]: v for k, v in module["module"].items() if k.startswith("student.")}
    ckpt_student.load_state_dict(own, strict=True)
    # the ZeRO-2 consolidation (zero_to_fp32) gives the fp32 master weights, adaptors included; the module
    # holds their bf16 cast (engine.precision=bf16 of the recipe): equal bit for bit once cast, the
    # buffers (standardisation maps) equal as saved
    from tipsdistill.distill.checkpoint import consolidated_state_dict

    master = consolidated_state_dict(out / "checkpoints" / "step_00000004")
    assert set(master) == set(module["module"]) and any(".adaptors.eff." in k for k in master)
    for k, v in module["module"].items():
        assert torch.equal(master[k].to(v.dtype), v), k
    params = {n for n, _ in ckpt_student.named_parameters()}
    assert any(
        not torch.equal(master[f"student.{n}"], module["module"][f"student.{n}"].float()) for n in params
    )  # the master weights are finer than the bf16 module: a consolidated checkpoint is not the export
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for name, dim, grid in (("tips", 48, 4), ("eff", 24, 4)):
        with torch.no_grad():
            a = exported.adaptor(name).encode_image(pixels, value_trick=True)
            b = ckpt_student.eval().adaptor(name).encode_image(pixels, value_trick=True)
        assert a.patch.shape == (2, grid, grid, dim) and a.cls.shape == (2, 2, dim)
        assert (
            torch.equal(a.patch, b.patch)
            and torch.equal(a.cls, b.cls)
            and torch.equal(a.value_patch, b.value_patch)
        )
    with pytest.raises(ValueError, match="no adaptor 'dino'.*eff.*tips"):
        exported.adaptor("dino")

    # zero-shot through the text teacher's adaptor, with that teacher's text; the other has no text space
    model = build_model(f"student:{out / 'export'}@tips")
    assert build_model(f"{out / 'export'}@eff").embed_dim == 24  # a bare folder spec takes @teacher too
    dataset = build_eval_dataset("synthetic", {"split": "validation", "size": 4, "image_size": 32})
    text = resolve_class_embeddings(
        dataset.class_names, text_model=tiny_teacher(), templates="tcl", cache_dir=None
    )
    settings = SegmentationSettings(
        image_size=32, window=32, stride=24, readout="tips", resize_backend="torch"
    )
    metrics = evaluate_segmentation(model, dataset, text, settings, progress=False)["metrics"]
    assert 0.0 <= metrics["miou"] <= 100.0
    with pytest.raises(ValueError, match="adaptor 'eff'.*caption embeddings"):
        evaluate_segmentation(
            build_model(f"student:{out / 'export'}@eff"), dataset, text, settings, progress=False
        )


def test_prototype_terms_through_per_teacher_heads_resume_bit_identically(caches, runs):
    """``patch_loss: proto`` / ``cls_loss: proto``: a prototype head per term on the adaptor's output, the
    teacher's standardised tokens through the head's EMA copy (outside the engine, in the checkpoint); a
    resume equals the uninterrupted run, EMA heads included."""
    teachers = (
        f"teachers=[{{name: tips, path: {caches['tips']}, text: true, patch_loss: proto, cls_loss: proto}}, "
        f"{{name: eff, path: {caches['eff']}, patch_loss: proto}}]"
    )
    from safetensors.torch import save_file

    from tipsdistill.distill.evaluation import evaluate_segmentation, resolve_class_embeddings
    from tipsdistill.distill.evaluation.datasets import build_eval_dataset
    from tipsdistill.distill.evaluation.segmentation import training_settings
    from tipsdistill.students import load_student

    # eval.every (eval.adaptor=tips) measures the student through the text teacher's adaptor, with that
    # teacher's text
    dataset = build_eval_dataset("synthetic", {"split": "validation", "size": 4, "image_size": 32})
    text = resolve_class_embeddings(
        dataset.class_names, text_model=tiny_teacher(), templates="tcl", cache_dir=None
    )
    text_file = runs / "class_text.safetensors"
    save_file({"embeddings": text.embeddings, "class_index": text.class_index}, str(text_file))
    extra = [
        "engine.zero_stage=2",
        teachers,
        "head.out_dim=64",
        "head.hidden_dim=32",
        "head.bottleneck_dim=16",
        "eval.every=2",
        "eval.max_images=4",
        "eval.dataset_kwargs={split: validation, size: 4, image_size: 32}",
        f"eval.text_embeddings={text_file}",
        "eval.adaptor=tips",
    ]
    straight = _result("proto", runs, caches, extra)
    _result("proto_r", runs, caches, extra, max_steps=[2])
    resumed = _result(
        "proto_r2", runs, caches, [*extra, f"output_dir={runs / 'proto_r' / 'out'}"], runs=["auto"]
    )
    assert straight["step"] == resumed["step"] == 4
    log = straight["log"]
    assert {"tips/patch", "tips/cls", "eff/patch", "eff/cls", "clip"} <= set(log[-1])
    assert all(np.isfinite(r["loss"]) for r in log)
    assert [r["loss"] for r in resumed["log"]] == [r["loss"] for r in log]
    assert straight["weights"] == resumed["weights"]
    # one EMA copy per proto term, moved by training, restored by the resume
    assert set(straight["ema_named"]) == {"ema_tips/patch", "ema_tips/cls", "ema_eff/patch"}
    assert straight["ema_named"] == resumed["ema_named"]
    assert any(k.startswith("proto_heads.eff/patch.") for k in straight["weights"])
    assert not any(k.startswith("proto_heads.eff/cls") for k in straight["weights"])  # eff's cls: cosine
    assert log[-1]["tips/patch"] != log[0]["tips/patch"] and log[-1]["tips/patch"] > 0
    evals = [r for r in log if "eval/miou" in r]
    assert [r["step"] for r in evals] == [2, 4]
    cfg = yaml.safe_load((runs / "proto" / "out" / "config.yaml").read_text())["eval"]
    settings = dataclasses.replace(training_settings(cfg["settings"], 32), max_images=4)
    exported = load_student(runs / "proto" / "out" / "export").adaptor("tips")
    again = evaluate_segmentation(exported, dataset, text, settings, progress=False)["metrics"]
    assert evals[-1]["eval/miou"] == pytest.approx(again["miou"], abs=1e-6)


def test_eval_while_training_names_the_text_teachers_cache(caches, tmp_path):
    """eval.every of a several-teacher run takes its class-name text from the text-aligned teacher's cache;
    one that cannot rebuild its teacher is refused naming that cache and the two fixes."""
    from tipsdistill.distill.config import load_config
    from tipsdistill.distill.evaluation.while_training import TrainingEval
    from tipsdistill.distill.multi import build_multi_task

    cfg = load_config("distill", [*_overrides(caches, tmp_path / "out"), "eval.every=2", "eval.max_images=2"])
    built = build_multi_task(cfg, device=torch.device("cpu"))
    assert built.task.text_teacher == "tips" and built.text_cache_meta is not None
    with pytest.raises(ValueError, match="eval.adaptor='tips'.*several-teacher run"):
        load_config("distill", ["cache.path=c.h5", "eval.every=2", "eval.adaptor=tips"])
    with pytest.raises(ValueError, match=rf"cache {caches['tips']}.*eval.text_model=.*eval.text_embeddings="):
        TrainingEval(
            cfg,
            built.student,
            device=torch.device("cpu"),
            cache_meta=built.text_cache_meta,
            adaptor="tips",
            cache_path=str(caches["tips"]),
        )


def test_prototype_term_ignores_missing_rows():
    """A row the teacher lacks weighs nothing in a proto term and does not move its center."""
    from tipsdistill.distill.losses import PatchPrototypeLoss

    torch.manual_seed(0)
    fl = PatchPrototypeLoss(8, center_momentum=0.5)
    s, t = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    ok = torch.tensor([True, False, True])
    per_token = fl.per_token(s, t, teacher_temp=0.1)
    assert per_token.shape == (3, 5)
    same = fl.per_token(s[[0, 2]], t[[0, 2]], teacher_temp=0.1)
    assert torch.allclose(per_token[[0, 2]], same)
    fl.update_center(t[ok])
    assert torch.allclose(fl.center, 0.5 * t[[0, 2]].reshape(-1, 8).mean(0, keepdim=True))


def test_two_processes_zero3(caches, runs):
    res = _result("z3x2", runs, caches, ["engine.zero_stage=3", "steps=2", "checkpoint.every=0"], nproc=2)
    assert res["step"] == 2 and {"tips/patch", "eff/cls", "clip"} <= set(res["log"][-1])
    assert all(np.isfinite(r["loss"]) for r in res["log"])


def test_featuremap_student_with_adaptors(caches, runs):
    """A convolutional student (timm ConvNeXt, stride 8) carries the adaptors: a few steps, export,
    reload with the adaptor outputs of the trained module state, zero-shot through ``@tips`` (patch readout)."""
    from tipsdistill.distill.evaluation import evaluate_segmentation, resolve_class_embeddings
    from tipsdistill.distill.evaluation.datasets import build_eval_dataset
    from tipsdistill.distill.evaluation.models import build_model
    from tipsdistill.distill.evaluation.segmentation import SegmentationSettings, resolve_readout
    from tipsdistill.students import load_student
    from tipsdistill.students.featuremap import FeatureMapStudent

    conv = {"feature_stride": 8, "dim": 32, "depths": [1, 1, 1, 1], "dims": [16, 24, 32, 48], "img_size": 32}
    overrides = [o for o in _overrides(caches, runs / "conv" / "out") if not o.startswith("student.")]
    res = run_subprocess(
        {
            "result": str(runs / "conv" / "result.json"),
            "overrides": [
                *overrides,
                "student.name=convnext_atto",
                "student.kwargs=" + json.dumps(conv),
                "engine.precision=fp32",
                "steps=2",
                "engine.zero_stage=0",
            ],
        },
        timeout=600,
    )
    assert "error" not in res, res["error"] + "\n" + res.get("stderr", "")
    assert res["step"] == 2 and {"tips/patch", "eff/patch", "clip"} <= set(res["log"][-1])
    out = runs / "conv" / "out"
    exported = load_student(out / "export")
    assert isinstance(exported, FeatureMapStudent) and sorted(exported.adaptors) == ["eff", "tips"]
    trained = load_student(out / "export")
    with torch.no_grad():
        for p in trained.parameters():
            p.zero_()
    module = torch.load(
        out / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt", weights_only=False
    )
    trained.load_state_dict(
        {k[len("student.") :]: v for k, v in module["module"].items() if k.startswith("student.")},
        strict=True,
    )
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    for name, dim in (("tips", 48), ("eff", 24)):
        view = exported.adaptor(name)
        assert resolve_readout(view, "tips") == "maskclip"  # the attention pool's values: no self-attention
        with torch.no_grad():
            a, b = view.encode_image(pixels), trained.eval().adaptor(name).encode_image(pixels)
        assert a.patch.shape == (2, 4, 4, dim) and a.cls.shape == (2, 2, dim)
        assert torch.equal(a.patch, b.patch) and torch.equal(a.cls, b.cls)
    dataset = build_eval_dataset("synthetic", {"split": "validation", "size": 4, "image_size": 32})
    text = resolve_class_embeddings(
        dataset.class_names, text_model=tiny_teacher(), templates="tcl", cache_dir=None
    )
    settings = SegmentationSettings(
        image_size=32, window=32, stride=24, readout="tips", resize_backend="torch"
    )
    metrics = evaluate_segmentation(
        build_model(f"student:{out / 'export'}@tips"), dataset, text, settings, progress=False
    )
    assert 0.0 <= metrics["metrics"]["miou"] <= 100.0
