"""Multi-granularity caption sampling for CLS2 (TIPSv2).

Per example, the granularity of CLS2's caption is drawn with configurable probabilities (default
``short`` 0.5 / ``detailed`` 0.5). When the drawn granularity is missing for an example (absent,
``None``, empty string, or ``valid`` False for cached embeddings), the sampler falls back
**deterministically**: the drawn granularity first, then the others in ``fallback`` order (default
``short -> detailed -> alt``). E.g. drawn ``detailed`` but missing -> ``short`` -> ``alt``. An example
with none of them gets ``None`` / ``valid=False`` and is left out of the loss (and counted).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import torch

logger = logging.getLogger(__name__)

GRANULARITIES = ("alt", "short", "detailed")
DEFAULT_PROBS: dict[str, float] = {"short": 0.5, "detailed": 0.5}
DEFAULT_FALLBACK: tuple[str, ...] = ("short", "detailed", "alt")


class CaptionSampler:
    """Seeded per-example granularity sampler.

    Args:
        probs: granularity -> probability; non-negative, summing to 1 (tolerance 1e-6).
        fallback: order tried after the drawn granularity when it is missing; must contain every
            granularity of ``probs``.
        seed: seed of the private ``torch.Generator`` (state in :meth:`state_dict`).
    """

    def __init__(
        self,
        probs: Mapping[str, float] | None = None,
        *,
        fallback: Sequence[str] = DEFAULT_FALLBACK,
        seed: int = 0,
    ) -> None:
        probs = dict(DEFAULT_PROBS if probs is None else probs)
        if not probs:
            raise ValueError("caption probabilities are empty; e.g. {'short': 0.5, 'detailed': 0.5}")
        for g, p in probs.items():
            if not isinstance(p, (int, float)) or p < 0 or math.isnan(p):
                raise ValueError(f"caption probability for {g!r} must be a number >= 0, got {p!r}")
        total = sum(probs.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"caption probabilities {probs} sum to {total:.6f}, not 1; rescale them")
        missing = [g for g in probs if g not in fallback]
        if missing:
            raise ValueError(f"fallback order {list(fallback)} lacks granularities {missing}; add them")
        self.names = list(probs)
        self.probs = torch.tensor([float(probs[g]) for g in self.names], dtype=torch.float64)
        self.fallback = tuple(fallback)
        self.generator = torch.Generator().manual_seed(seed)
        self.num_fallbacks = 0
        self.num_missing = 0

    def order(self, drawn: str) -> list[str]:
        """Granularities tried for an example whose draw is ``drawn``, in order."""
        return [drawn] + [g for g in self.fallback if g != drawn]

    def draw(self, n: int) -> list[str]:
        """Draw ``n`` granularities (before fallback)."""
        if n == 0:
            return []
        idx = torch.multinomial(self.probs, n, replacement=True, generator=self.generator)
        return [self.names[i] for i in idx.tolist()]

    def resolve(
        self, drawn: Sequence[str], available: Sequence[set[str] | frozenset[str]]
    ) -> list[str | None]:
        """Apply the fallback order: first available granularity per example, ``None`` if none."""
        out: list[str | None] = []
        for d, av in zip(drawn, available, strict=True):
            got = next((g for g in self.order(d) if g in av), None)
            if got is None:
                self.num_missing += 1
            elif got != d:
                self.num_fallbacks += 1
            out.append(got)
        return out

    def sample(
        self, captions: Sequence[Mapping[str, str | None]]
    ) -> tuple[list[str | None], list[str | None]]:
        """Per example pick a caption string.

        Args:
            captions: per example, granularity -> caption (dataset item ``captions``).
        Returns:
            ``(texts, granularities)``; both ``None`` for an example without any usable caption.
        """
        drawn = self.draw(len(captions))
        avail = [{g for g, t in c.items() if isinstance(t, str) and t.strip()} for c in captions]
        grans = self.resolve(drawn, avail)
        texts = [None if g is None else c[g] for g, c in zip(grans, captions, strict=True)]
        return texts, grans  # type: ignore[return-value]

    def sample_embeddings(
        self,
        text: Mapping[str, torch.Tensor],
        valid: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[str | None]]:
        """Pick per example one of precomputed caption embeddings.

        Args:
            text: granularity -> ``(B, D)`` embeddings (cache item ``text``, batched).
            valid: granularity -> ``(B,)`` bool (cache ``text_valid``); missing key = all valid.
        Returns:
            ``emb (B, D)`` (zeros where nothing is available), ``valid (B,)`` bool, granularities.
        """
        if not text:
            raise ValueError("no caption embeddings given; the cache was written without text embeddings")
        first = next(iter(text.values()))
        B = first.shape[0]
        valid = dict(valid or {})
        vmask = {g: (valid[g].bool().cpu() if g in valid else torch.ones(B, dtype=torch.bool)) for g in text}
        avail = [{g for g in text if bool(vmask[g][b])} for b in range(B)]
        grans = self.resolve(self.draw(B), avail)
        emb, ok = self.pick(text, grans)
        return emb, ok, grans

    @staticmethod
    def pick(
        text: Mapping[str, torch.Tensor], grans: Sequence[str | None]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Row ``b`` of ``text[grans[b]]`` for every example: ``emb (B, D)`` (zeros where ``grans[b]`` is
        ``None``) and ``ok (B,)`` bool (an embedding was picked)."""
        first = next(iter(text.values()))
        emb = torch.zeros_like(first)
        ok = torch.zeros(first.shape[0], dtype=torch.bool, device=first.device)
        for g in {x for x in grans if x is not None}:
            sel = torch.tensor([x == g for x in grans], dtype=torch.bool, device=first.device)
            emb = torch.where(sel.unsqueeze(-1), text[g].to(emb.dtype), emb)
            ok |= sel
        return emb, ok

    def state_dict(self) -> dict[str, object]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        self.generator.set_state(state["generator"])  # type: ignore[arg-type]
