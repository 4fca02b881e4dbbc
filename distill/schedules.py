"""Step-indexed schedules (pure functions of the optimizer step, so a resumed run sees the same values).

- learning rate: linear warm-up from 0 to ``lr`` over ``warmup_steps``, then cosine to ``min_lr``;
- weight decay: cosine from ``weight_decay`` to ``weight_decay_end``;
- EMA momentum: cosine from ``momentum`` to ``momentum_end`` (DINO);
- teacher temperature: linear warm-up then constant (DINOv2).

The training loop owns them (as DINOv3's ``train.py`` does): it builds one :class:`Schedules` per run,
evaluates it once per optimizer step, sets lr and weight decay on the optimizer and passes the EMA
momentum and the teacher temperature into the EMA update and the losses. Nothing else computes them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import TrainConfig


def cosine(step: int, total: int, start: float, end: float) -> float:
    """Cosine from ``start`` (step 0) to ``end`` (step ``total``); constant ``end`` after."""
    if total <= 0:
        return end
    t = min(max(step, 0), total) / total
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * t))


def warmup_cosine(step: int, total: int, peak: float, warmup: int, final: float) -> float:
    """Linear warm-up ``0 -> peak`` over ``warmup`` steps (step 0 gets ``peak / warmup``), then cosine to ``final``."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    return cosine(step - warmup, max(total - warmup, 1), peak, final)


def linear_warmup(step: int, warmup: int, start: float, end: float) -> float:
    """Linear from ``start`` to ``end`` over ``warmup`` steps, then ``end``."""
    if warmup <= 0 or step >= warmup:
        return end
    return start + (end - start) * step / warmup


class Schedules:
    """All schedules of one run, evaluated at an optimizer step: ``at(step) -> {lr, wd, momentum,
    teacher_temp}``."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    def lr(self, step: int) -> float:
        o = self.cfg.optim
        return warmup_cosine(step, self.cfg.steps, o.lr, o.warmup_steps, o.min_lr)

    def weight_decay(self, step: int) -> float:
        o = self.cfg.optim
        return cosine(step, self.cfg.steps, o.weight_decay, o.weight_decay_end)

    def momentum(self, step: int) -> float:
        e = self.cfg.ema
        return cosine(step, self.cfg.steps, e.momentum, e.momentum_end)

    def teacher_temp(self, step: int) -> float:
        c = self.cfg.loss
        return linear_warmup(step, c.teacher_temp_warmup_steps, c.teacher_temp_warmup, c.teacher_temp)

    def at(self, step: int) -> dict[str, float]:
        return {
            "lr": self.lr(step),
            "wd": self.weight_decay(step),
            "momentum": self.momentum(step),
            "teacher_temp": self.teacher_temp(step),
        }
