"""What the student is trained towards: teacher tokens (:class:`Targets`) and caption embeddings
(:class:`TextSource`), one injected object each, so every mode of the task reads the same way.

Teacher tokens, by ``teacher.source``:
- ``cache``: :class:`CachedTargets`, the stage-1 teacher tokens of the batch (``batch["features"]``,
  read by :mod:`distill.feeder`) aligned on the device to the student's crop (the geometry from
  ``distill.data``);
- ``online``: :class:`OnlineTargets`, a live frozen teacher on the student's global crop (same box
  and flip);
- ``ema`` (pretraining): :class:`SelfTargets`, the student's own encoder on the unmasked crop
  (TIPSv2 head-only EMA: only the heads have EMA copies), or :class:`EMAStudentTargets`, a full EMA
  copy of the student (TIPS v1, ``ema.kind=full``).

Caption embeddings, by ``loss.text_source``: :class:`CachedText` (the cached teacher text tower,
locked) or :class:`TowerText` (the student's trainable text tower, or the online teacher's).

None of these is an ``nn.Module``: what they hold (a live teacher, an EMA copy of the student) stays
outside the DeepSpeed engine, so ZeRO never partitions it; :meth:`Targets.modules` lists it for the
task to move and checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from tipsdistill.cache.codec import decode

from .captions import CaptionSampler
from .data import align_teacher_maps, resample_grid

logger = logging.getLogger(__name__)

Gather = Callable[[list[nn.Parameter]], contextlib.AbstractContextManager[Any]]
TextBatch = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor | None]]


def _on_grid(patch: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``(B, h, w, D)`` -> ``(B, *grid, D)`` float32 (roi_align over the whole map when the grids differ)."""
    patch = patch.float()
    if tuple(patch.shape[1:3]) == tuple(grid):
        return patch
    return torch.stack([resample_grid(tokens, grid) for tokens in patch.cpu()]).to(patch.device)


class Targets:
    """Teacher tokens of a batch: ``targets(batch, grid) -> (patch (B, h, w, D_t), cls (B, C, D_t))``,
    float32, no gradient, on the student's token grid. ``dim`` is ``D_t``."""

    dim: int

    def __call__(self, batch: Mapping[str, Any], grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def modules(self) -> dict[str, nn.Module]:
        """Out-of-engine modules held here, by checkpoint name (moved to the device, saved, restored)."""
        return {}

    def update(self, student: nn.Module, *, momentum: float, gather: Gather) -> None:
        """After each optimizer step (EMA copies only; the others hold nothing that trains)."""


class CachedTargets(Targets):
    """The stage-1 teacher tokens aligned to the student's crop.

    ``batch["features"]`` holds the batch's storage-dtype rows on the training device
    (:mod:`distill.feeder`); they are decoded (:func:`cache.codec.decode`), cut out and flipped here,
    batched, with no host sync (:func:`distill.data.align_teacher_maps`), at the crop geometry the
    dataset drew (``t_roi``, ``t_flip``, ``t_order`` in the features, ``t_ratio`` on the host).
    ``teacher_grid`` is the cache's ``(h_t, w_t)``; ``basis`` the PCA basis of a reduced-dimension
    cache (``{"patch": {"basis": (D, K), "mean": (D,)}}``, :meth:`cache.reduce.Reduction.tensors`, on
    the training device), with which the stored coefficients are decoded to ``D`` dims."""

    def __init__(
        self,
        dim: int,
        teacher_grid: tuple[int, int],
        basis: dict[str, dict[str, torch.Tensor]] | None = None,
    ) -> None:
        self.dim = int(dim)
        self.teacher_grid = tuple(teacher_grid)
        self.basis = basis or {}

    def __call__(self, batch: Mapping[str, Any], grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        feats, host = batch["features"], batch["host"]
        patch = decode(
            feats["patch"], feats.get("patch_scale"), **self.basis.get("patch", {})
        )  # (B, h_t * w_t, D)
        patch = patch.view(patch.shape[0], *self.teacher_grid, patch.shape[-1])
        ratios = host["t_ratio"]
        order = feats["t_order"] if len(set(ratios)) > 1 else None
        t_patch = align_teacher_maps(patch, feats["t_roi"], ratios, feats["t_flip"], grid, order)
        return t_patch, decode(feats["cls"], feats.get("cls_scale"))


class OnlineTargets(Targets):
    """A live frozen teacher on the student's global crop (``t_image`` when the teacher's input size
    differs), read out at block ``layer`` (``None`` = last)."""

    def __init__(self, teacher: nn.Module, layer: int | None = None) -> None:
        self.teacher = teacher
        self.layer = layer
        self.dim = int(teacher.embed_dim)

    def modules(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher}

    @torch.no_grad()
    def __call__(self, batch: Mapping[str, Any], grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = batch.get("t_image", batch["global"]).to(next(self.teacher.parameters()).dtype)
        feats = self.teacher.encode_image(pixels, layer=self.layer)
        return _on_grid(feats.patch, grid), feats.cls.float()


class SelfTargets(Targets):
    """Pretraining with head-only EMA: the student's own (shared) encoder on the unmasked global crop."""

    def __init__(self, student: nn.Module) -> None:
        self.student = student
        self.dim = int(student.embed_dim)

    @torch.no_grad()
    def __call__(self, batch: Mapping[str, Any], grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.student(batch["global"], None)
        return _on_grid(feats.patch, grid), feats.cls.float()


class EMAStudentTargets(Targets):
    """Pretraining with a full EMA teacher (TIPS v1): an EMA copy of the whole student makes the targets,
    ``p_ema <- m * p_ema + (1 - m) * p`` after each optimizer step.

    The copy holds the image side only: the student's text tower (if any) is not averaged (the targets
    never run it; the CLIP term uses the online tower), so a locked text encoder is not held twice.
    """

    def __init__(self, student: nn.Module) -> None:
        text = getattr(student, "text", None)
        if text is not None:
            student.text = None
        try:
            self.ema = copy.deepcopy(student).eval().requires_grad_(False)
        finally:
            if text is not None:
                student.text = text
        if text is not None:
            self.ema.has_text = False
        self.dim = int(student.embed_dim)

    @staticmethod
    def averaged(student: nn.Module) -> list[nn.Parameter]:
        """The student's parameters the EMA copy follows (all but the text tower's), in its order."""
        return [p for name, p in student.named_parameters() if not name.startswith("text.")]

    def modules(self) -> dict[str, nn.Module]:
        return {"ema_student": self.ema}

    @torch.no_grad()
    def __call__(self, batch: Mapping[str, Any], grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.ema(batch["global"], None)
        return _on_grid(feats.patch, grid), feats.cls.float()

    @torch.no_grad()
    def update(self, student: nn.Module, *, momentum: float, gather: Gather) -> None:
        params = self.averaged(student)
        with gather(params):
            for p_ema, p in zip(self.ema.parameters(), params, strict=True):
                p_ema.mul_(momentum).add_(p.detach().to(p_ema.dtype), alpha=1.0 - momentum)


# ---------------------------------------------------------------------------------------- captions
class TextSource:
    """Caption embeddings of a batch for the CLIP term: ``text(batch) -> (embeddings, valid)`` with
    ``embeddings = {"alt": (B, D), "caption": (B, D)}`` and ``valid`` the matching ``(B,)`` bool masks
    (``None`` = all valid). CLS2's caption granularity is drawn per example from the sample's own
    uniform ``caption_u`` (seeded per sample by the data, so independent of batch split and world
    size), then the :class:`CaptionSampler` fallback order for missing captions.
    """

    def __init__(self, caption_probs: Mapping[str, float]) -> None:
        probs = dict(caption_probs)
        self.sampler = CaptionSampler(probs)
        self.names = list(probs)
        self.cdf = torch.tensor([probs[gran] for gran in self.names], dtype=torch.float64).cumsum(0)

    def granularities(self, batch: Mapping[str, Any], available: list[set[str]]) -> list[str | None]:
        """The caption granularity of each example (``None`` where it has none of them)."""
        host = batch.get("host", {})
        if "caption_u" in host:  # the host copy of the draws (distill.data.collate): no device sync
            draws = torch.tensor(host["caption_u"], dtype=torch.float64)
        else:
            draws = batch["caption_u"].double().cpu()
        index = torch.searchsorted(self.cdf, draws * self.cdf[-1], right=True).clamp_(max=len(self.names) - 1)
        return self.sampler.resolve([self.names[k] for k in index.tolist()], available)

    def __call__(self, batch: Mapping[str, Any]) -> TextBatch:
        raise NotImplementedError


class CachedText(TextSource):
    """The cached teacher caption embeddings: the batch's ``text/<g>`` rows on the device
    (``batch["features"]``, :mod:`distill.feeder`), their validity ``text_valid/<g>`` there and on the
    host (``batch["host"]["text_valid"]``, no device sync)."""

    def __call__(self, batch: Mapping[str, Any]) -> TextBatch:
        feats = batch["features"]
        grans = [k.split("/", 1)[1] for k in feats if k.startswith("text/")]
        text = {gran: decode(feats[f"text/{gran}"]) for gran in grans}
        valid = {gran: feats[f"text_valid/{gran}"] for gran in grans}
        host_valid = batch["host"]["text_valid"]
        alt = text["alt"]
        batch_size = alt.shape[0]
        ok = {gran: torch.tensor(host_valid[gran], dtype=torch.bool) for gran in text}
        available = [
            {gran for gran in self.names if gran in text and bool(ok[gran][row])} for row in range(batch_size)
        ]
        caption, has_caption = self.sampler.pick(text, self.granularities(batch, available))
        return {"alt": alt, "caption": caption}, {"alt": valid.get("alt"), "caption": has_caption}


class TowerText(TextSource):
    """A text tower run on the batch's caption strings: the student's (``trainable=True``, gradients
    flow) or a frozen teacher's (``trainable=False``, no gradient, float32)."""

    def __init__(
        self,
        encode: Callable[[list[str]], torch.Tensor],
        caption_probs: Mapping[str, float],
        *,
        trainable: bool,
    ) -> None:
        super().__init__(caption_probs)
        self.encode = encode
        self.trainable = trainable

    def __call__(self, batch: Mapping[str, Any]) -> TextBatch:
        captions, present = batch["captions"], batch["caption_valid"]
        per_example = [
            {gran: (captions[gran][row] if bool(present[gran][row]) else None) for gran in captions}
            for row in range(len(captions["alt"]))
        ]
        available = [{gran for gran in self.names if example.get(gran)} for example in per_example]
        grans = self.granularities(batch, available)
        caption = [None if gran is None else example[gran] for gran, example in zip(grans, per_example)]
        alt = [example.get("alt") for example in per_example]
        valid = {
            "alt": torch.tensor([text is not None for text in alt], dtype=torch.bool),
            "caption": torch.tensor([text is not None for text in caption], dtype=torch.bool),
        }
        alt = [text or "" for text in alt]
        caption = [text or "" for text in caption]
        if self.trainable:
            return {"alt": self.encode(alt), "caption": self.encode(caption)}, valid
        with torch.no_grad():
            return {"alt": self.encode(alt).float(), "caption": self.encode(caption).float()}, valid
