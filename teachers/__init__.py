"""Frozen teachers behind one interface: ``build_teacher(name, **kwargs)``.

Importing the package registers the adapters: ``tips`` (official TIPS ``.npz``), ``hf`` (transformers
models), ``timm`` (any timm ViT), ``efficientnet-lite0`` and ``embedded`` (the committed demo teacher).
"""

from . import efficientnet, embedded, hf, timm_teacher, tips  # noqa: F401  (register the adapters)
from .base import (
    DenseEncoder,
    DenseFeatures,
    Teacher,
    build_teacher,
    check_pixels,
    list_teachers,
    location_kwarg,
    register_teacher,
)
from .tips_text import TipsTextTower, TipsTokenizer

__all__ = [
    "DenseEncoder",
    "DenseFeatures",
    "Teacher",
    "TipsTextTower",
    "TipsTokenizer",
    "build_teacher",
    "check_pixels",
    "list_teachers",
    "location_kwarg",
    "register_teacher",
]
