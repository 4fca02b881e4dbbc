"""``distill.experiments``: the pieces of the embedded-benchmark experiments that run no training."""

from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file

import tipsdistill.teachers.embedded as emb
from tipsdistill.distill.experiments import all_finite, summarise, teacher_vision_file


def test_teacher_vision_file_loads_into_the_teachers_timm_layout(tmp_path: Path) -> None:
    path = teacher_vision_file(emb.default_path(), tmp_path / "vision.safetensors")
    cfg = json.loads((emb.default_path() / "config.json").read_text())
    vit = timm.create_model(cfg["timm_name"], pretrained=False, num_classes=0, **cfg["overrides"])
    vit.load_state_dict(load_file(path), strict=True)
    assert torch.equal(vit.patch_embed.proj.weight, emb.EmbeddedTeacher().vit.patch_embed.proj.weight)


def test_summarise_reports_every_run_and_the_seed_spread() -> None:
    def m(a: float, b: float) -> dict:
        return {ro: {"miou": a, "miou_objects": b, "pixel_accuracy": 50.0} for ro in ("tips", "maskclip")}

    results = {
        "teacher": m(14.2, 4.3),
        "runs": {
            "seed0": {"metrics": m(28.0, 6.8)},
            "seed1": {"metrics": m(26.0, 8.8)},
            "mask75": {"metrics": m(9.0, 2.0)},
        },
        "baseline": {"miou": 15.0},
    }
    table = summarise(results)
    assert "| teacher | 14.2 | 4.3 | 14.2 | 4.3 |" in table and "| mask75 | 9.0 | 2.0 | 9.0 | 2.0 |" in table
    assert "| seeds mean ± sd (n=2) | 27.0 ± 1.4 | 7.8 ± 1.4 |" in table and "| 15.0 | 0.0 |" in table
    assert all_finite(results)
    results["runs"]["mask75"]["metrics"]["tips"]["miou"] = float("nan")
    assert not all_finite(results)
