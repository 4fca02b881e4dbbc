"""One import point for the students' objectives: losses, masking, caption sampling, EMA heads.

``from distill.objectives import ImageTextLoss, DINOLoss, PatchPrototypeLoss, ...`` (also re-exported
by ``distill``). See ``docs/objectives.md`` for the formulas, knobs and paper defaults.
"""

from __future__ import annotations

from .captions import DEFAULT_FALLBACK, DEFAULT_PROBS, GRANULARITIES, CaptionSampler
from .ema import FrozenHead, HeadEMA, cosine_momentum
from .losses import (
    CENTERINGS,
    FEATURE_LOSSES,
    ContrastiveLoss,
    DINOLoss,
    ImageTextLoss,
    KoLeoLoss,
    PatchFeatureLoss,
    PatchPrototypeLoss,
    build_loss,
    gather_with_grad,
    list_losses,
    sinkhorn_knopp,
    teacher_temperature,
    token_weights,
    weighted_token_mean,
)
from .masking import MASK_MODES, MaskGenerator, block_mask, check_ratio, num_masked, random_mask

__all__ = [
    "CENTERINGS",
    "DEFAULT_FALLBACK",
    "DEFAULT_PROBS",
    "FEATURE_LOSSES",
    "GRANULARITIES",
    "MASK_MODES",
    "CaptionSampler",
    "ContrastiveLoss",
    "DINOLoss",
    "FrozenHead",
    "HeadEMA",
    "ImageTextLoss",
    "KoLeoLoss",
    "MaskGenerator",
    "PatchFeatureLoss",
    "PatchPrototypeLoss",
    "block_mask",
    "build_loss",
    "check_ratio",
    "cosine_momentum",
    "gather_with_grad",
    "list_losses",
    "num_masked",
    "random_mask",
    "sinkhorn_knopp",
    "teacher_temperature",
    "token_weights",
    "weighted_token_mean",
]
