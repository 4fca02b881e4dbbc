"""Segmentation metrics from one global confusion matrix (as the official TIPS notebook computes mIoU)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from sklearn.metrics import roc_auc_score

IGNORE_INDEX = 255


class ConfusionMatrix:
    """Global confusion matrix ``(C, C)``: rows = ground truth, columns = prediction.

    Pixels whose label is ``ignore_index`` are skipped; any other label outside ``0..C-1`` is an
    error (it means the class list and the label ids disagree).
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.long)

    def update(self, pred: torch.Tensor, target: torch.Tensor, where: str = "") -> None:
        """Add a predicted class map and its label map (same shape, integer)."""
        if pred.shape != target.shape:
            raise ValueError(
                f"prediction {tuple(pred.shape)} and label {tuple(target.shape)} differ in shape{where and ' (' + where + ')'}"
            )
        pred = pred.reshape(-1).long().cpu()
        target = target.reshape(-1).long().cpu()
        valid = target != self.ignore_index
        t, p = target[valid], pred[valid]
        if t.numel() == 0:
            return
        bad = (t < 0) | (t >= self.num_classes)
        if bool(bad.any()):
            ids = sorted(set(t[bad].tolist()))[:10]
            raise ValueError(
                f"label ids {ids} are outside 0..{self.num_classes - 1} (the class list has {self.num_classes} "
                f"names) and are not the ignore index {self.ignore_index}{where and ' in ' + where}; the class "
                "list and the label ids disagree: check the class-name file (one line per label id) and the "
                "label offset (ADE20K: 0 -> ignore, others minus 1)"
            )
        if bool(((p < 0) | (p >= self.num_classes)).any()):
            raise ValueError(
                f"predicted class ids outside 0..{self.num_classes - 1}{where and ' in ' + where}"
            )
        idx = t * self.num_classes + p
        self.mat += torch.bincount(idx, minlength=self.num_classes**2).reshape(
            self.num_classes, self.num_classes
        )

    def merge(self, other: ConfusionMatrix) -> None:
        self.mat += other.mat

    def compute(
        self, class_names: Sequence[str] | None = None, subsets: dict[str, Sequence[int]] | None = None
    ) -> dict[str, Any]:
        return segmentation_metrics(self.mat, class_names, subsets)


def iou_per_class(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class IoU ``(C,)`` (float64) and the mask of classes with a non-empty union."""
    mat = mat.double()
    inter = mat.diag()
    union = mat.sum(0) + mat.sum(1) - inter
    valid = union > 0
    iou = torch.where(valid, inter / union.clamp_min(1), torch.full_like(inter, float("nan")))
    return iou, valid


def _nan_to_none(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def segmentation_metrics(
    mat: torch.Tensor,
    class_names: Sequence[str] | None = None,
    subsets: dict[str, Sequence[int]] | None = None,
) -> dict[str, Any]:
    """mIoU (mean over classes with a non-empty union), per-class IoU, pixel accuracy, mean accuracy,
    and mIoU over each named subset of class ids (e.g. ``{"objects": [...]}``). Values in percent."""
    C = mat.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(C)]
    if len(names) != C:
        raise ValueError(f"{len(names)} class names for a {C}-class confusion matrix")
    iou, valid = iou_per_class(mat)
    total = mat.sum().item()
    gt = mat.sum(1).double()
    acc = torch.where(gt > 0, mat.diag().double() / gt.clamp_min(1), torch.full_like(gt, float("nan")))
    out: dict[str, Any] = {
        "miou": 100 * float(iou[valid].mean()) if bool(valid.any()) else float("nan"),
        "pixel_accuracy": 100 * mat.diag().sum().item() / total if total else float("nan"),
        "mean_accuracy": 100 * float(acc[gt > 0].mean()) if bool((gt > 0).any()) else float("nan"),
        "num_pixels": int(total),
        "num_valid_classes": int(valid.sum()),
        "per_class_iou": {n: _nan_to_none(100 * float(v)) for n, v in zip(names, iou)},
    }
    for sname, ids in (subsets or {}).items():
        ids_t = torch.as_tensor(list(ids), dtype=torch.long)
        if ids_t.numel() and (int(ids_t.min()) < 0 or int(ids_t.max()) >= C):
            raise ValueError(f"subset {sname!r} has class ids outside 0..{C - 1}")
        sub_valid = valid[ids_t]
        out[f"miou_{sname}"] = (
            100 * float(iou[ids_t][sub_valid].mean()) if bool(sub_valid.any()) else float("nan")
        )
    for k in list(out):
        if isinstance(out[k], float) and math.isnan(out[k]):
            out[k] = None
    return out


def roc_auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """ROC AUC of ``scores`` ``(N,)`` for the boolean ``positive`` ``(N,)`` (scikit-learn's
    ``roc_auc_score``, ties averaged); NaN when ``positive`` holds a single class (AUC undefined)."""
    pos = positive.reshape(-1).bool().cpu()
    if bool(pos.all()) or not bool(pos.any()):
        return float("nan")
    return float(roc_auc_score(pos.numpy(), scores.reshape(-1).double().cpu().numpy()))
