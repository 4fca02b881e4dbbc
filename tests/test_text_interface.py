"""Every student carries its text interface: students narrower or wider than their teacher's text
embeddings (64 and 192 wide, of the 96-wide embedded teacher) are distilled with the default recipe's
CLIP term, evaluated while training with the teacher's text, exported, reloaded and evaluated again with
the same result; the same-width student has no projection (unchanged from before the interface)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.launch_helpers import ROOT, subprocess_env

SIZE = 24  # cached training images
EVAL_IMAGES = 4
TINY = [
    "steps=4",
    "data.batch_size=8",
    f"data.dataset_kwargs.size={SIZE}",
    "student.kwargs.depth=1",
    "head.out_dim=64",
    "head.hidden_dim=64",
    "head.bottleneck_dim=32",
    "optim.warmup_steps=1",
    "eval.every=2",
    f"eval.max_images={EVAL_IMAGES}",
    "checkpoint.every=2",
    "checkpoint.keep_last=2",
    "engine.cpu_threads=1",
    "log.every=1",
    "log.progress=false",
]


@pytest.fixture(scope="module")
def teacher_cache(tmp_path_factory) -> Path:
    """The embedded teacher's features and caption embeddings (96 wide) of SIZE synthetic images."""
    from tipsdistill.distill.embedded import DemoConfig, stage_cache

    out = tmp_path_factory.mktemp("cache")
    stage_cache(DemoConfig(train_size=SIZE, cache_batch=SIZE), out, None, progress=False)
    return out / "cache" / "index.h5"


def _run(args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


_RUNS: dict[int, Path] = {}


def _train(width: int, cache: Path, root: Path) -> Path:
    if width not in _RUNS:
        out = root / f"w{width}"
        heads = max(1, width // 32)
        _run(
            [
                "-m",
                "tipsdistill.scripts.train",
                "--recipe",
                "embedded",
                f"cache.path={cache}",
                f"output_dir={out}",
                *TINY,
            ]
            + [f"student.kwargs.embed_dim={width}", f"student.kwargs.num_heads={heads}"]
        )
        _RUNS[width] = out
    return _RUNS[width]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


def _eval_like_training(student: torch.nn.Module, cfg: dict) -> dict:
    """The evaluation ``eval.every`` runs, on a loaded student, with the teacher's class-name text."""
    from tipsdistill.distill.evaluation import evaluate_segmentation, resolve_class_embeddings
    from tipsdistill.distill.evaluation.datasets import build_eval_dataset
    from tipsdistill.distill.evaluation.segmentation import training_settings
    from tipsdistill.teachers import build_teacher

    e = cfg["eval"]
    dataset = build_eval_dataset(e["dataset"], dict(e["dataset_kwargs"]))
    # the settings eval.every resolves (eval.settings over the training image size), on e.max_images images
    settings = dataclasses.replace(
        training_settings(e["settings"], cfg["data"]["image_size"]),
        max_images=e["max_images"],
    )
    text = resolve_class_embeddings(
        dataset.class_names,
        text_model=build_teacher("embedded"),
        templates=settings.templates,
        cache_dir=None,
    )
    return evaluate_segmentation(student, dataset, text, settings, progress=False)["metrics"]


@pytest.mark.parametrize("width", [64, 192])
def test_student_of_another_width_is_measured_with_its_teachers_text(width, teacher_cache, runs) -> None:
    from tipsdistill.students import load_student

    out = _train(width, teacher_cache, runs)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["student"]["kwargs"]["text_dim"] == 96  # recorded: checkpoints and resumes rebuild it
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in log if "eval/miou" in r]
    assert [r["step"] for r in evals] == [2, 4]
    # the export holds the projection beside the plain timm ViT, and it is applied by the readouts
    export = out / "export"
    conf = json.loads((export / "config.json").read_text())
    assert conf["text_dim"] == 96 and conf["embed_dim"] == width
    assert conf["text_interface"]["weight"] == "text_proj.weight"
    assert conf["text_interface"]["shape"] == [96, width]
    from safetensors.torch import load_file

    assert "text_proj.weight" not in load_file(str(export / "model.safetensors"))  # timm's own keys only
    assert load_file(str(export / "student_extras.safetensors"))["text_proj.weight"].shape == (96, width)
    student = load_student(export)
    assert student.embed_dim == width and student.text_dim == 96
    metrics = _eval_like_training(student, cfg)
    assert metrics["miou"] == pytest.approx(evals[-1]["eval/miou"], abs=1e-9)
    assert metrics["miou_objects"] == pytest.approx(evals[-1]["eval/miou_objects"], abs=1e-9)
    # any checkpoint exports the same interface (tipsdistill-export of the step-2 checkpoint)
    ckpt_export = runs / f"w{width}_step2"
    _run(
        [
            "-m",
            "tipsdistill.scripts.export",
            str(out / "checkpoints" / "step_00000002"),
            "--out",
            str(ckpt_export),
        ]
    )
    early = load_student(ckpt_export)
    assert early.text_dim == 96
    assert _eval_like_training(early, cfg)["miou"] == pytest.approx(evals[0]["eval/miou"], abs=1e-9)
    # tipsdistill-eval with the teacher's text evaluates the student (no width refusal), same numbers
    res_dir = runs / f"w{width}_eval"
    _run(
        [
            "-m",
            "tipsdistill.scripts.evaluate",
            "--model",
            f"student={export}",
            "--text-model",
            "teacher:embedded",
        ]
        + ["--dataset", "synthetic", "--dataset-kwargs", '{"split": "validation"}', "--mode", "whole"]
        + ["--image-size", "64", "--resize-backend", "torch", "--max-images", str(EVAL_IMAGES)]
        + ["--out", str(res_dir), "--no-plots", "--quiet", "--text-cache", "none", "--device", "cpu"]
    )
    res = json.loads((res_dir / "results.json").read_text())
    got = res["models"]["student"]["metrics"]["miou"]
    assert got == pytest.approx(evals[-1]["eval/miou"], abs=1e-9)


def test_projection_is_applied_to_global_patch_and_value_tokens() -> None:
    from tipsdistill.distill.evaluation.segmentation import dense_patch_features
    from tipsdistill.students import build_student, student_from_config

    kw = dict(
        img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, reg_tokens=1, no_embed_class=True
    )
    torch.manual_seed(0)
    s = build_student("vit_base_patch14_reg1_tipsv2", text_dim=48, **kw).eval()
    x = torch.rand(2, 3, 32, 32)
    f = s.encode_image(x, value_trick=True)
    w = s.text_proj.weight
    assert s.project_to_text(f.cls).shape == (2, 2, 48)
    assert torch.allclose(s.project_to_text(f.cls), f.cls @ w.T)
    for readout, tokens in (("tips", f.value_patch), ("patch", f.patch)):
        got = dense_patch_features(s, x, readout)
        assert got.shape == (2, 4, 4, 48)
        assert torch.allclose(got, torch.nn.functional.normalize(tokens @ w.T, dim=-1), atol=1e-6)
    raw = dense_patch_features(s, x, "patch", text_space=False)
    assert raw.shape == (2, 4, 4, 32)
    # rebuilt from its config with the interface; the same width carries none and records none
    again = student_from_config(s.config)
    assert again.text_dim == 48 and again.text_proj.weight.shape == (48, 32)
    same = build_student("vit_base_patch14_reg1_tipsv2", text_dim=32, **kw)
    plain = build_student("vit_base_patch14_reg1_tipsv2", **kw)
    assert same.text_proj is None and "text_dim" not in same.config and same.config == plain.config
    assert set(same.state_dict()) == set(plain.state_dict())
    assert not any("text_proj" in k for k in plain.state_dict())
    with pytest.raises(ValueError, match="text_dim must be a positive int"):
        build_student("vit_base_patch14_reg1_tipsv2", text_dim=0, **kw)
