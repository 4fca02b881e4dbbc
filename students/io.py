"""Load an exported student (the files ``distill.export.export_student`` writes).

Layout of an export directory: ``model.safetensors`` (the backbone's state dict: the timm ViT's, or a
feature-map student's timm model / python module, ``student.backbone_key``; timm key names),
``student_extras.safetensors`` (mask token, text tower, when any), ``config.json`` (``student`` is the
``build_student`` config) and a model card ``README.md``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

MODEL_FILE = "model.safetensors"
EXTRAS_FILE = "student_extras.safetensors"
CONFIG_FILE = "config.json"


def read_export_config(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` of an export directory; a clear error when ``path`` is not one."""
    path = Path(path)
    f = path / CONFIG_FILE
    if not f.is_file():
        raise FileNotFoundError(
            f"{path} is not a student export (no {CONFIG_FILE}); pass the directory written by export_student"
        )
    return json.loads(f.read_text())


def backbone_key(student: nn.Module) -> str:
    """The attribute holding the student's backbone, whose state dict is an export's ``model.safetensors``
    (``vit`` for ViT students, ``backbone`` for feature-map students)."""
    return str(getattr(student, "backbone_key", "vit"))


def load_student_weights(student: nn.Module, path: str | Path) -> nn.Module:
    """Load exported weights (directory, or a timm-keyed ``.safetensors`` file) into ``student`` strictly."""
    from safetensors.torch import load_file

    p = Path(path)
    key = backbone_key(student)
    if p.is_file():
        missing, unexpected = getattr(student, key).load_state_dict(load_file(str(p)), strict=False)
        if unexpected or missing:
            raise ValueError(
                f"{p}: weights do not fit the student's {key} (missing {missing[:5]}, unexpected {unexpected[:5]})"
            )
        return student
    sd = {f"{key}.{k}": v for k, v in load_file(str(p / MODEL_FILE)).items()}
    if (p / EXTRAS_FILE).is_file():
        sd.update(load_file(str(p / EXTRAS_FILE)))
    student.load_state_dict(sd, strict=True)
    return student


def export_text_config(text: dict[str, Any] | None, folder: str | Path) -> dict[str, Any] | None:
    """An export's ``student.text`` with the files it names relative to the export (the text tower's
    tokenizer, ``text_tokenizer.model``; a transformers ``text_encoder/`` folder) made absolute."""
    if not text:
        return text
    out = dict(text)
    for key in ("tokenizer", "path"):
        value = out.get(key)
        if isinstance(value, str) and not os.path.isabs(value) and (Path(folder) / value).exists():
            out[key] = str(Path(folder) / value)
    return out


def load_student(
    path: str | Path, *, device: str | torch.device = "cpu", trust_code: bool = False
) -> nn.Module:
    """Rebuild an exported student (``students.student_from_config``) and load its weights. The text tower,
    when any, is rebuilt from its architecture (``student.text``: the files the export carries), never
    from the pretrained weights it started from; its trained weights are in the export. A ``python:``
    student's module is imported only with ``trust_code=True``."""
    from .factory import student_from_config

    p = Path(path)
    conf = read_export_config(p)
    scfg = dict(conf["student"])
    if scfg.get("text"):
        scfg["text"] = export_text_config(scfg["text"], p)
    student = student_from_config(scfg, trust_code=trust_code)
    load_student_weights(student, p)
    return student.to(device).eval()
