"""Export a trained student: safetensors + config JSON + model card, loadable by ``students`` and timm.

Layout of an export directory:
- ``model.safetensors``: the timm ViT's own state dict (timm key names), so
  ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=".../model.safetensors"), **kwargs)``
  loads it (``name`` and ``kwargs`` are in ``config.json["timm"]``);
- ``student_extras.safetensors``: the rest of the student (mask token, text tower), when any;
- ``config.json``: ``student`` (``build_student`` config), ``timm`` (model name + create kwargs),
  the training config and final metrics;
- ``README.md``: a model card with the config and the final metrics.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from students.io import CONFIG_FILE, EXTRAS_FILE, MODEL_FILE

logger = logging.getLogger(__name__)


def _cpu_contig(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def timm_spec(student: nn.Module) -> dict[str, Any]:
    """``{"model_name", "kwargs"}`` to rebuild the student's ViT with ``timm.create_model``."""
    cfg = dict(getattr(student, "config", {}) or {})
    kwargs = {"num_classes": 0, **dict(cfg.get("overrides") or {})}
    return {"model_name": cfg.get("name"), "kwargs": kwargs}


def export_student(
    student: nn.Module,
    out_dir: str | Path,
    *,
    train_config: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write the export files of ``student`` (a ``students.Student``) to ``out_dir``; returns it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = student.state_dict()
    vit_sd = {k[len("vit.") :]: v for k, v in sd.items() if k.startswith("vit.")}
    extras = {k: v for k, v in sd.items() if not k.startswith("vit.")}
    save_file(_cpu_contig(vit_sd), str(out / MODEL_FILE), metadata={"format": "pt"})
    if extras:
        save_file(_cpu_contig(extras), str(out / EXTRAS_FILE), metadata={"format": "pt"})
    spec = timm_spec(student)
    conf = {
        "format": "tipsdistill-student/1",
        "student": dict(getattr(student, "config", {}) or {}),
        "timm": spec,
        "patch_size": int(student.patch_size),
        "embed_dim": int(student.embed_dim),
        "num_global_tokens": int(student.num_global_tokens),
        "train_config": train_config or {},
        "metrics": metrics or {},
    }
    (out / CONFIG_FILE).write_text(json.dumps(conf, indent=2, default=str))
    (out / "README.md").write_text(model_card(conf))
    logger.info("exported student to %s", out)
    return out


def model_card(conf: dict[str, Any]) -> str:
    tc = conf.get("train_config") or {}
    spec = conf["timm"]
    metrics = conf.get("metrics") or {}
    lines = [
        f"# Student `{spec['model_name']}` distilled with tipsdistill",
        "",
        f"- recipe: `{tc.get('recipe', '?')}` (teacher source `{(tc.get('teacher') or {}).get('source', '?')}`), "
        f"{tc.get('steps', '?')} steps",
        f"- patch size {conf['patch_size']}, width {conf['embed_dim']}, {conf['num_global_tokens']} global tokens",
        f"- teacher: {json.dumps(tc.get('teacher', {}))}",
        f"- cache: {json.dumps(tc.get('cache', {}))}",
        "",
        "## Load",
        "",
        "```python",
        "from students import load_student",
        "student = load_student('PATH')  # a students.Student (DenseEncoder): encode_image(pixels in [0, 1])",
        "",
        "import timm",
        "import students  # registers the small TIPSv2 shapes (vit_w96d4_patch8_reg1_tipsv2_64, ...) with timm",
        f"vit = timm.create_model({spec['model_name']!r}, pretrained=True,",
        "                        pretrained_cfg_overlay=dict(file='PATH/model.safetensors'),",
        f"                        **{spec['kwargs']!r})",
        "```",
        "Inputs are RGB in [0, 1]; the student's own normalisation is "
        f"mean={conf['student'].get('mean')}, std={conf['student'].get('std')} (apply it yourself with timm).",
        "",
        "## Final metrics (mean of the last logged steps)",
        "",
        "| term | value |",
        "|---|---|",
    ]
    for k, v in metrics.items():
        lines.append(f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |")
    lines += ["", "## Training config", "", "```json", json.dumps(tc, indent=2, default=str), "```", ""]
    return "\n".join(lines)
