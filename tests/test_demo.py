"""End to end: ``python -m tipsdistill.scripts.demo --quick`` (cache -> distil with DeepSpeed -> measure) on CPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_embedded_teacher_loads() -> None:
    import torch

    import tipsdistill.teachers.embedded  # noqa: F401
    from tipsdistill.teachers import build_teacher

    t = build_teacher("embedded")
    assert t.has_text and t.num_global_tokens == 2 and t.num_layers > 2
    f = t.encode_image(torch.rand(2, 3, 64, 64), value_trick=True, value_readout="maskclip", layer=1)
    assert f.cls.shape == (2, 2, t.embed_dim) and f.value_patch.shape == (2, 8, 8, t.embed_dim)
    assert t.encode_text(["a red ball on grass."]).shape == (1, t.embed_dim)
    assert t.identity()["weights_sha256"]


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    env = dict(os.environ, HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "tipsdistill.scripts.demo", "--quick", "--out", str(out), "--no-progress"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "teacher obj mIoU" in proc.stdout
    for rel in (
        "cache/index.h5",
        "student/export/config.json",
        "report.md",
        "results.json",
        "layer_curve_tips.png",
        "layer_curve_maskclip.png",
        "eval_whole_maskclip/examples.png",
        "eval_whole_maskclip/pca.png",
    ):
        assert (out / rel).is_file(), rel
    for mode in ("whole", "slide"):
        for readout in ("tips", "maskclip"):
            d = out / f"eval_{mode}_{readout}"
            assert (d / "results.json").is_file() and (d / "per_class_iou.png").is_file()
    res = json.loads((out / "results.json").read_text())
    assert len(res["table"]) == 8  # 2 models x 4 settings
    assert math.isfinite(res["baseline"]["miou"]) and "Baseline" in proc.stdout
    for row in res["table"]:
        for k in ("miou", "miou_objects", "pixel_accuracy"):
            assert row[k] is not None and math.isfinite(row[k]), (
                row["model"],
                row["mode"],
                row["readout"],
                k,
            )
    for readout in ("tips", "maskclip"):
        curves = res["curves"][readout]
        assert set(curves) == {"teacher", "student"}
        for rows in curves.values():
            assert all(r["miou_objects"] is not None and math.isfinite(r["miou_objects"]) for r in rows)
