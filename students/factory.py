"""One ``build_student`` for students of any architecture: timm ViTs (:mod:`students.vit`) and
feature-map students (:mod:`students.featuremap`: any other timm model, or ``python:<module>:<factory>``).

Which kind a name builds: a timm name registered in a ViT module (``vision_transformer``, ``deit``,
``vision_transformer_hybrid``, or this package's registered TIPSv2 shapes) builds a ViT
:class:`~students.vit.Student` (mask token on patch embeddings, value-trick readout); every other timm
name and every ``python:`` name builds a :class:`~students.featuremap.FeatureMapStudent`.
"""

from __future__ import annotations

from typing import Any

import timm
from timm.models import is_model_in_modules
from torch import nn

from . import featuremap, vit
from .variants import VARIANTS

#: timm modules whose models are ``VisionTransformer``s (the ViT student's backbone)
VIT_MODULES = ("vision_transformer", "deit", "vision_transformer_hybrid")


def is_vit_student(name: str) -> bool:
    """Whether ``name`` builds a ViT student (else a feature-map student)."""
    if name.startswith(featuremap.PYTHON_PREFIX):
        return False
    return name in VARIANTS or (timm.is_model(name) and is_model_in_modules(name, list(VIT_MODULES)))


def build_student(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """A student by name: :func:`students.vit.build_student` for ViTs, else
    :func:`students.featuremap.build_featuremap_student` (see the module docstring)."""
    if is_vit_student(name):
        return vit.build_student(name, pretrained, **kwargs)
    return featuremap.build_featuremap_student(name, pretrained, **kwargs)


def student_from_config(config: dict[str, Any], *, trust_code: bool = False) -> nn.Module:
    """Rebuild a student (random weights) from its ``config`` (``student.config``, an export's
    ``config.json["student"]``). A ``python:`` student imports and runs the module its config names, so it
    is rebuilt only with ``trust_code=True`` (a file someone hands you never runs code by itself)."""
    name = str(config.get("name", ""))
    if is_vit_student(name):
        return vit.student_from_config(config)
    check_trusted(name, trust_code)
    return featuremap.featuremap_student_from_config(config)


def check_trusted(name: str, trust_code: bool) -> None:
    """Refuse to rebuild a ``python:`` student named by a file (an export, a checkpoint) unless
    ``trust_code``: rebuilding it imports and runs the module."""
    if name.startswith(featuremap.PYTHON_PREFIX) and not trust_code:
        raise ValueError(
            f"this student is python code ({name!r}): rebuilding it imports and runs that module; if you trust "
            "it, load with trust_code=True (students.load_student(path, trust_code=True), tipsdistill-export "
            "--trust-code)"
        )
