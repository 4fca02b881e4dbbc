"""Stage 2: losses, masking, caption sampling, head-only EMA, the training task and engine.

The objectives are importable from here (``from distill import DINOLoss``); each lives in its own module
(``distill.losses``, ``distill.ema``, ``distill.masking``, ``distill.captions``). The training engine is
``distill.train`` / ``distill.task`` (import them explicitly).
"""

from .captions import DEFAULT_FALLBACK, DEFAULT_PROBS, GRANULARITIES, CaptionSampler
from .ema import FrozenHead, HeadEMA
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
    "gather_with_grad",
    "list_losses",
    "num_masked",
    "random_mask",
    "sinkhorn_knopp",
    "token_weights",
    "weighted_token_mean",
]
