"""Teacher targets for prototype losses: a frozen head, or a head-only EMA head (TIPSv2).

Head-only EMA: the encoder is shared between student and "teacher"; only the projection head has an
EMA copy, ``h_t <- m * h_t + (1 - m) * h_s``. The momentum ``m`` is the caller's: the training loop
evaluates its schedule (``distill.schedules.Schedules.momentum``, a cosine from ``ema.momentum`` 0.994
to ``ema.momentum_end`` 1.0) and passes it in, ``ema.update(head, momentum=m)`` (as DINOv3 does).
Targets are ``stopgrad(h_t(adapter(tokens)))``.

DeepSpeed ZeRO-3: the student head's parameters are partitioned, so reading them needs a gather.
:meth:`HeadEMA.update` accepts either

- the head module plus ``gather``: a callable ``params -> context manager`` that materialises the full
  parameters inside the ``with`` block, e.g.
  ``gather=lambda ps: deepspeed.zero.GatheredParameters(ps, modifier_rank=None)``; or
- a plain sequence of full tensors in ``head.parameters()`` order (gathered by the caller).

The EMA copy itself is a plain, replicated module: build the ``HeadEMA`` from the student head
**before** ``deepspeed.initialize`` partitions it, and keep it out of the engine's model / optimizer.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class FrozenHead(nn.Module):
    """Targets through a frozen head (e.g. a teacher's released or pre-trained head): ``tokens -> logits``.

    ``(..., D_t) -> (..., K)`` under ``no_grad``; the head stays in eval mode.
    """

    def __init__(self, head: nn.Module, adapter: nn.Module | None = None) -> None:
        super().__init__()
        self.head = _freeze(head)
        self.adapter = _freeze(adapter) if adapter is not None else nn.Identity()

    def train(self, mode: bool = True) -> FrozenHead:
        return super().train(False)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.adapter(tokens))


class HeadEMA(nn.Module):
    """EMA copy of a student projection head (head-only EMA, encoder shared).

    Args:
        head: the student head (copied at construction; build before ZeRO-3 partitioning).
        adapter: optional frozen width adapter applied to tokens before the EMA head (feed teacher
            tokens of width ``D_t`` to a head built for ``D_s``; see ``students.frozen_projection``).
    Call ``ema(tokens (..., D)) -> (..., K)`` targets (no grad); ``ema.update(head, momentum=m)`` after
    each optimizer step, ``m`` from the loop's schedule.
    """

    def __init__(self, head: nn.Module, *, adapter: nn.Module | None = None) -> None:
        super().__init__()
        self.ema = _freeze(copy.deepcopy(head))
        self.adapter = _freeze(adapter) if adapter is not None else nn.Identity()
        self.last_momentum: float | None = None

    def train(self, mode: bool = True) -> HeadEMA:
        return super().train(False)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(..., D) -> (..., K)`` target logits, no gradient."""
        return self.ema(self.adapter(tokens))

    @torch.no_grad()
    def update(
        self,
        head: nn.Module | Sequence[torch.Tensor],
        *,
        momentum: float,
        gather: Callable[[list[nn.Parameter]], contextlib.AbstractContextManager[Any]] | None = None,
    ) -> float:
        """``ema_p <- m * ema_p + (1 - m) * p`` for every head parameter, ``m = momentum``; returns ``m``.

        Only the EMA head's parameters change (buffers are copied). ``head`` is the student head
        module (use ``gather`` under ZeRO-3) or a sequence of full tensors in ``head.parameters()``
        order.
        """
        m = float(momentum)
        if not 0.0 <= m <= 1.0:
            raise ValueError(
                f"HeadEMA momentum must be in [0, 1], got {m}; check ema.momentum / ema.momentum_end"
            )
        ema_params = list(self.ema.parameters())
        if isinstance(head, nn.Module):
            params = list(head.parameters())
            ctx = gather(params) if gather is not None else contextlib.nullcontext()
            with ctx:
                self._lerp_(ema_params, [p.data for p in params], m)
                for b_ema, b in zip(self.ema.buffers(), head.buffers(), strict=False):
                    b_ema.copy_(b)
        else:
            self._lerp_(ema_params, list(head), m)
        self.last_momentum = m
        return m

    @staticmethod
    def _lerp_(ema_params: list[nn.Parameter], src: list[torch.Tensor], m: float) -> None:
        if len(src) != len(ema_params):
            raise ValueError(f"HeadEMA.update got {len(src)} tensors for {len(ema_params)} head parameters")
        for i, (pe, ps) in enumerate(zip(ema_params, src, strict=True)):
            if pe.shape != ps.shape:
                raise ValueError(
                    f"HeadEMA.update: parameter {i} has shape {tuple(ps.shape)}, EMA expects {tuple(pe.shape)}; "
                    "under ZeRO-3 pass gather=... so full parameters are read"
                )
            pe.mul_(m).add_(ps.detach().to(pe.device, pe.dtype), alpha=1.0 - m)


class EMAHeads:
    """The EMA copies of a task's prototype heads (patch and CLS; one copy when the head is shared).

    A plain object, not an ``nn.Module``: the copies stay outside the DeepSpeed engine. Build it from
    the student heads before ``deepspeed.initialize``; ``update(patch_head, cls_head, momentum=m,
    gather=...)`` after each optimizer step. ``adapter``: the frozen width projection applied to teacher
    tokens before the EMA heads (``None`` when teacher and student widths match). ``named``: further
    heads by checkpoint name (a several-teacher run's per-teacher prototype heads, :mod:`distill.multi`),
    each with its EMA copy in :attr:`named`, updated from the head given here.
    """

    def __init__(
        self,
        patch_head: nn.Module | None,
        cls_head: nn.Module | None,
        adapter: nn.Module | None = None,
        *,
        named: Mapping[str, nn.Module] | None = None,
    ) -> None:
        self.patch = HeadEMA(patch_head, adapter=copy.deepcopy(adapter)) if patch_head is not None else None
        if cls_head is not None and cls_head is patch_head:
            self.cls = self.patch
        else:
            self.cls = HeadEMA(cls_head, adapter=copy.deepcopy(adapter)) if cls_head is not None else None
        self._sources = dict(named or {})
        self.named = {key: HeadEMA(head) for key, head in self._sources.items()}

    def modules(self) -> dict[str, HeadEMA]:
        """The EMA heads by checkpoint name (a shared head appears once)."""
        out = {}
        if self.patch is not None:
            out["ema_patch"] = self.patch
        if self.cls is not None and self.cls is not self.patch:
            out["ema_cls"] = self.cls
        return {**out, **self.named}

    @torch.no_grad()
    def update(
        self,
        patch_head: nn.Module | None,
        cls_head: nn.Module | None,
        *,
        momentum: float,
        gather: Callable[[list[nn.Parameter]], contextlib.AbstractContextManager[Any]] | None = None,
    ) -> None:
        if self.patch is not None:
            self.patch.update(patch_head, momentum=momentum, gather=gather)
        if self.cls is not None and self.cls is not self.patch:
            self.cls.update(cls_head, momentum=momentum, gather=gather)
        for key, ema in self.named.items():
            ema.update(self._sources[key], momentum=momentum, gather=gather)
