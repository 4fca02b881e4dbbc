"""Frozen teachers behind one interface: ``build_teacher(name, **kwargs)``."""

from .base import DenseEncoder, DenseFeatures, Teacher, build_teacher, check_pixels, list_teachers, register_teacher

__all__ = [
    "DenseEncoder",
    "DenseFeatures",
    "Teacher",
    "build_teacher",
    "check_pixels",
    "list_teachers",
    "register_teacher",
]
