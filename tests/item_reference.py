"""The reference stage 2's one data path is checked against (no tests here): cached features read item by
item with plain h5py through the index's virtual datasets (not :meth:`cache.FeatureCache.read_batch`),
decoded to float32, and the teacher targets aligned per sample on the CPU (:func:`distill.data.align_teacher_map`,
:func:`distill.data.resample_grid`), as the item reader of earlier versions (``cache.reader=item``) built them.

:func:`use_item_reference` swaps this reference in for the cached targets and captions of a training run
(``tests/test_train_support.py`` with ``"item_reference": true``), so a whole run can be compared with the
default one step by step.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from tipsdistill.cache import FeatureCache, open_cache
from tipsdistill.cache.codec import decode
from tipsdistill.distill.data import align_teacher_map, resample_grid
from tipsdistill.distill.targets import CachedTargets, CachedText


class ReferenceRows:
    """Items of a cache read with h5py, one dataset read per row: ``rows(indices)`` -> item dicts
    (``patch`` ``([V,] h, w, D)``, ``cls`` ``([V,] C, D)`` float32, ``boxes``/``flips`` with several views,
    ``text`` gran -> ``(Dt,)``, ``text_valid`` gran -> bool)."""

    def __init__(self, cache: FeatureCache | str | Path) -> None:
        fc = open_cache(cache) if isinstance(cache, (str, Path)) else cache
        self.path, self.grid, self.valid = fc.path, fc.grid, fc.valid
        self.views, self.grans = fc.spec.has_views, list(fc.granularities)
        self.int8 = fc.int8
        self.bases = fc.reduction.bases if fc.reduction is not None else {}
        self.file = h5py.File(self.path, "r")
        self.names = [n for n in ("patch", "cls", "value_patch") if n in self.file]

    def _get(self, name: str, row: int) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.file[name][row]))

    def item(self, index: int) -> dict[str, Any]:
        row = int(self.valid[index])
        out: dict[str, Any] = {"index": row}
        for name in self.names:
            scale = self._get(name + "_scale", row) if self.int8 else None
            mean, basis = self.bases.get(name, (None, None))
            x = decode(self._get(name, row), scale, basis=basis, mean=mean)
            out[name] = x if name == "cls" else x.reshape(x.shape[:-2] + tuple(self.grid) + x.shape[-1:])
        if self.views:
            out["boxes"], out["flips"] = self._get("boxes", row), self._get("flips", row).bool()
        if self.grans:
            out["text"] = {g: decode(self._get(f"text/{g}", row)) for g in self.grans}
            out["text_valid"] = {g: bool(self.file[f"text_valid/{g}"][row]) for g in self.grans}
        return out

    def rows(self, indices: list[int]) -> list[dict[str, Any]]:
        return [self.item(int(i)) for i in indices]

    def stacked(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """``patch`` ``(B, [V,] h*w, D)``, ``cls``, ``text/<g>`` ``(B, Dt)``, ``text_valid/<g>`` ``(B,)``."""
        items = self.rows(indices)
        out = {
            "patch": torch.stack([it["patch"].flatten(-3, -2) for it in items]),
            "cls": torch.stack([it["cls"] for it in items]),
        }
        for g in self.grans:
            out[f"text/{g}"] = torch.stack([it["text"][g] for it in items])
            out[f"text_valid/{g}"] = torch.tensor([it["text_valid"][g] for it in items])
        return out


def item_targets(
    rows: list[dict[str, Any]], batch: Mapping[str, Any], grid: tuple[int, int], *, replay: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The targets of a batch built sample by sample on the CPU from reference ``rows`` and the crop
    each sample's image got (``batch["box"]``, ``batch["flip"]``, the replayed view ``host["t_view"]``):
    ``(patch (B, *grid, D), cls (B, C, D))`` float32."""
    patches, clss = [], []
    for k, it in enumerate(rows):
        if replay:
            v = int(batch["host"]["t_view"][k])
            patches.append(resample_grid(it["patch"][v], grid))
            clss.append(it["cls"][v])
            continue
        views = "boxes" in it
        src_box = tuple(float(x) for x in it["boxes"][0]) if views else (0.0, 0.0, 1.0, 1.0)
        feat = it["patch"][0] if views else it["patch"]
        box = [float(x) for x in batch["box"][k]]
        flip = bool(batch["flip"][k])
        patches.append(align_teacher_map(feat, box, grid, flip=flip, source_box=src_box))
        clss.append(it["cls"][0] if views else it["cls"])
    return torch.stack(patches).float(), torch.stack(clss).float()


class ItemTargets(CachedTargets):
    """:class:`CachedTargets` computed from the reference (h5py rows, per-sample CPU alignment)."""

    def __init__(self, ref: ReferenceRows, dim: int, *, replay: bool) -> None:
        super().__init__(dim, ref.grid)
        self.ref, self.replay = ref, replay

    def __call__(self, batch: Mapping[str, Any], grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.ref.rows(batch["index"].tolist())
        patch, cls = item_targets(rows, batch, grid, replay=self.replay)
        device = batch["global"].device
        return patch.to(device), cls.to(device)


class ItemText(CachedText):
    """:class:`CachedText` over the reference's caption embeddings (h5py rows), not the feeder's."""

    def __init__(self, ref: ReferenceRows, caption_probs: Mapping[str, float]) -> None:
        super().__init__(caption_probs)
        self.ref = ref

    def __call__(self, batch: Mapping[str, Any]):
        got = self.ref.stacked(batch["index"].tolist())
        feats = {k: v for k, v in got.items() if k.startswith("text")}
        host = {**batch["host"], "text_valid": {g: got[f"text_valid/{g}"].tolist() for g in self.ref.grans}}
        return super().__call__({**batch, "features": feats, "host": host})


def use_item_reference() -> None:
    """Make :func:`distill.task.build_task` use :class:`ItemTargets` / :class:`ItemText` (this process)."""
    import tipsdistill.distill.task as task

    build_targets, build_text = task._build_targets, task._build_text

    def targets(cfg, student, cache, device):
        got = build_targets(cfg, student, cache, device)
        if not isinstance(got, CachedTargets):
            return got
        replay = cfg.cache.target == "replay" or (cfg.cache.target == "auto" and cache.spec.has_views)
        return ItemTargets(ReferenceRows(cache), got.dim, replay=replay)

    def text(cfg, student, targets, cache):
        got = build_text(cfg, student, targets, cache)
        if got is None or not isinstance(got[0], CachedText):
            return got
        return ItemText(ReferenceRows(cache), cfg.loss.caption_probs), got[1]

    task._build_targets, task._build_text = targets, text
