"""Trainable students: timm ViTs with a mask token and the value-trick readout, feature-map students of
any other architecture (timm models, ``python:`` modules), text towers, heads."""

from .factory import build_student, is_vit_student, student_from_config
from .featuremap import FeatureMapStudent, build_featuremap_student
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
from .vit import CONFIG_KEYS, Student

__all__ = [
    "CONFIG_KEYS",
    "DINOHead",
    "FeatureMapStudent",
    "HFTextTower",
    "LinearAdapter",
    "MLPAdapter",
    "Student",
    "TipsStudentTextTower",
    "VARIANTS",
    "build_featuremap_student",
    "build_head",
    "build_student",
    "build_text_tower",
    "frozen_projection",
    "is_vit_student",
    "list_heads",
    "register_head",
    "student_from_config",
    "load_student",
    "load_student_weights",
    "read_export_config",
    "train_sentencepiece",
]
