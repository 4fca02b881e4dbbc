"""Trainable students: timm ViTs with a mask token and the value-trick readout, text towers, heads."""

from .heads import (
    DINOHead,
    LinearAdapter,
    MLPAdapter,
    build_head,
    frozen_projection,
    list_heads,
    register_head,
)
from .io import load_student, load_student_weights, read_export_config
from .text import HFTextTower, TipsStudentTextTower, build_text_tower, train_sentencepiece
from .variants import VARIANTS  # registers the small TIPSv2 shapes with timm
from .vit import CONFIG_KEYS, Student, build_student, student_from_config

__all__ = [
    "CONFIG_KEYS",
    "DINOHead",
    "HFTextTower",
    "LinearAdapter",
    "MLPAdapter",
    "Student",
    "TipsStudentTextTower",
    "VARIANTS",
    "build_head",
    "build_student",
    "build_text_tower",
    "frozen_projection",
    "list_heads",
    "register_head",
    "student_from_config",
    "load_student",
    "load_student_weights",
    "read_export_config",
    "train_sentencepiece",
]
