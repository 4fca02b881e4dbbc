"""Students of any architecture (issue 30), the whole loop: each listed timm family in a tiny
configuration trains under DeepSpeed (ZeRO 0 and 2 in turn) from the embedded teacher's cache, resumes,
exports, reloads with the training run's outputs and is evaluated by ``tipsdistill-eval`` with the
teacher's text (a file of its own so that ``make test``'s workers share the families' runs out)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.launch_helpers import ROOT, subprocess_env
from tests.test_text_interface import SIZE, teacher_cache  # noqa: F401  (fixture: the embedded teacher's cache)
from tests.test_timm_students import FAMILIES
from tests.test_train_support import probe_pixels, run_subprocess

# ----------------------------------------------------------------------------------- the full loop

TINY = [
    "steps=4",
    "data.batch_size=8",
    f"data.dataset_kwargs.size={SIZE}",
    "head.out_dim=64",
    "head.hidden_dim=64",
    "head.bottleneck_dim=32",
    "optim.warmup_steps=1",
    "eval.every=2",
    "eval.max_images=4",
    "checkpoint.every=2",
    "checkpoint.keep_last=2",
    "engine.cpu_threads=1",
    "log.every=1",
    "log.progress=false",
]


@pytest.mark.parametrize(
    ("name", "stage", "stride"),
    [  # every listed family, ZeRO 0 and 2 in turn
        ("convnext_atto", 0, 8),
        ("repvit_m0_9", 2, 16),
        ("mobilenetv4_conv_small", 2, 8),
        ("fastvit_t8", 0, 8),
        ("efficientvit_b0", 2, 8),
        ("resnet18", 0, 8),
    ],
)
def test_trains_resumes_exports_and_evaluates(name, stage, stride, teacher_cache, tmp_path) -> None:  # noqa: F811
    from tipsdistill.students import load_student

    out = tmp_path / "run"
    kwargs = {"feature_stride": stride, "dim": 32, **FAMILIES[name]}
    res = run_subprocess(
        {
            "recipe": "embedded",
            "overrides": [
                f"cache.path={teacher_cache}",
                f"output_dir={out}",
                f"student.name={name}",
                "student.kwargs=" + json.dumps(kwargs),
                f"engine.zero_stage={stage}",
                *TINY,
            ],
            "runs": [None, "auto"],  # two steps past the first checkpoint, then a resume to the end
            "max_steps": [3, None],
            "result": str(tmp_path / "result.json"),
        },
        timeout=600,
    )
    assert "error" not in res, res.get("error")
    assert res["step"] == 4
    log = res["log"]
    assert sorted({r["step"] for r in log if "loss" in r}) == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) for r in log if "loss" in r)
    evals = [r for r in log if "eval/miou" in r]
    assert evals and evals[-1]["step"] == 4
    # the teacher's 8x8 grid was resampled to the student's grid (stride 8: 8x8, stride 16: 4x4)
    cfg = json.loads((out / "export" / "config.json").read_text())
    assert cfg["student"]["feature_stage"] is not None and cfg["patch_size"] == stride
    assert cfg["text_dim"] == 96 and cfg["teacher"]["teacher"]["name"] == "embedded"
    student = load_student(out / "export")
    probe = torch.load(tmp_path / "result.probe.pt")
    with torch.no_grad():
        feats = student.encode_image(probe_pixels())
    assert torch.allclose(feats.patch, probe["patch"], atol=1e-6) and torch.allclose(
        feats.cls, probe["cls"], atol=1e-6
    )
    # tipsdistill-eval with the teacher's text: the readout is recorded, the number is the training eval's
    res_dir = tmp_path / "eval"
    proc = subprocess.run(
        [sys.executable, "-m", "tipsdistill.scripts.evaluate", "--model", f"student={out / 'export'}"]
        + [
            "--text-model",
            "teacher:embedded",
            "--dataset",
            "synthetic",
            "--dataset-kwargs",
            '{"split": "validation"}',
        ]
        + ["--mode", "whole", "--image-size", "64", "--resize-backend", "torch", "--max-images", "4"]
        + ["--out", str(res_dir), "--no-plots", "--quiet", "--text-cache", "none", "--device", "cpu"],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads((res_dir / "results.json").read_text())["models"]["student"]
    assert result["readout"] == "maskclip"  # what tips resolves to without self-attention
    assert result["metrics"]["miou"] == pytest.approx(evals[-1]["eval/miou"], abs=1e-9)
