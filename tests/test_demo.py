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


@pytest.mark.parametrize("text_tower", ["tips", "minilm"])
def test_pretrain_teacher_tiny_run_loads_as_embedded_teacher(tmp_path: Path, text_tower: str) -> None:
    """A 3-step teacher pretraining run (both text towers) writes a checkpoint ``build_teacher`` loads."""
    import torch

    from tipsdistill.scripts.pretrain_teacher import main
    from tipsdistill.teachers import build_teacher

    out = tmp_path / "run"
    argv = ["--out", str(out), "--steps", "3", "--batch", "8", "--train-size", "48", "--val-size", "8"]
    argv += ["--width", "32", "--heads", "2", "--depth", "2", "--prototypes", "64", "--local-crops", "1"]
    argv += ["--vocab", "200", "--eval-every", "2", "--ckpt-every", "2", "--threads", "1"]
    argv += ["--text-tower", text_tower, "--data-cache", str(tmp_path / "data")]
    assert main(argv) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["step"] == 3 and cfg["text"]["kind"] == text_tower and "--text-tower" in cfg["command"]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in log)
    assert "alignment" in log[1] and "alignment" in log[2]
    if text_tower == "minilm":  # pooled caption features are cached, the locked encoder is not stored
        assert len(list((tmp_path / "data").glob("minilm_pooled_*.npy"))) == 3  # alt, short, detailed
        from safetensors import safe_open

        with safe_open(str(out / "model.safetensors"), "pt") as f:
            text_keys = [k for k in f.keys() if k.startswith("text.")]
        assert sorted(text_keys) == ["text.proj.bias", "text.proj.weight"]
    t = build_teacher("embedded", path=out)
    f = t.encode_image(torch.rand(2, 3, 64, 64))
    assert f.patch.shape == (2, 8, 8, 32)
    e = t.encode_text(["a red ball on grass.", "snow"])
    assert e.shape == (2, 32) and torch.isfinite(e).all()
