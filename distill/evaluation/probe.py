"""Linear probes of a model's tokens on the synthetic scenes: what it *knows*, independent of text.

Zero-shot segmentation measures knowledge and text alignment together; when it is at chance, the
probes tell the two apart. On the validation split (first half fits, second half scores):

- ``cls_auc``: object presence from the global tokens (both CLS tokens concatenated, L2-normalised):
  one logistic regression per object class, mean ROC AUC over the object classes (0.5 = chance);
- ``patch``: per-patch class (the majority label inside each patch) from the patch tokens of every
  block: softmax regression, scored with the evaluation's :class:`ConfusionMatrix` (mIoU over all
  classes and over the objects, on patches; the same mIoU definition as ``tipsdistill-eval``);
- ``zero_shot_auc`` (models with a text tower): object presence scored by the cosine between each
  CLS token and the class prompt embeddings (:func:`encode_class_names`, 9 TCL templates), no training.

:func:`random_like` gives the floor (a randomly initialised copy); :func:`learnability` asks the data
question instead: it trains the model's architecture from scratch, supervised on per-patch labels, and
scores the validation patches. ``python -m tipsdistill.scripts.probe`` is the command line.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F

from tipsdistill.students import load_student
from tipsdistill.teachers.embedded import EmbeddedTeacher
from tipsdistill.teachers.vit import vit_dense_forward

from .metrics import ConfusionMatrix, roc_auc
from .models import build_model
from .segmentation import to_text_space
from .text import encode_class_names

logger = logging.getLogger(__name__)


def patch_labels(labels: torch.Tensor, grid: tuple[int, int], num_classes: int) -> torch.Tensor:
    """``(B, H, W)`` pixel labels -> ``(B, h, w)`` majority label of each patch."""
    onehot = F.one_hot(labels, num_classes).permute(0, 3, 1, 2).float()
    return F.adaptive_avg_pool2d(onehot, grid).argmax(1)


def patch_miou(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, objects: list[int]
) -> dict[str, float]:
    """mIoU of predicted patch classes ``(N,)`` against ``target`` ``(N,)`` from one
    :class:`ConfusionMatrix`: ``{"miou", "miou_objects"}`` in percent (classes with a non-empty union)."""
    cm = ConfusionMatrix(num_classes)
    cm.update(pred, target, where="probe patches")
    m = cm.compute(subsets={"objects": objects})
    return {k: float("nan") if m[k] is None else m[k] for k in ("miou", "miou_objects")}


def fit_linear(
    x: torch.Tensor, y: torch.Tensor, loss: str, out_dim: int, steps: int, seed: int
) -> torch.nn.Linear:
    """A linear probe ``(N, D) -> (N, out_dim)`` fitted with Adam for ``steps`` full-batch steps:
    ``loss="bce"`` (multi-label, ``y`` bool ``(N, out_dim)``) or ``"ce"`` (``y`` class ids ``(N,)``)."""
    if loss not in ("bce", "ce"):
        raise ValueError(f"fit_linear loss must be 'bce' or 'ce', got {loss!r}")
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(x.shape[1], out_dim)
    with torch.no_grad():
        lin.weight.normal_(0, 0.01, generator=g)
        lin.bias.zero_()
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=1e-4)
    with torch.enable_grad():
        for _ in range(steps):
            logits = lin(x)
            if loss == "bce":
                err = F.binary_cross_entropy_with_logits(logits, y.float())
            else:
                err = F.cross_entropy(logits, y)
            opt.zero_grad()
            err.backward()
            opt.step()
    return lin


@torch.no_grad()
def encode_all(
    model: Any, images: torch.Tensor, layer: int | None, batch: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global tokens ``(B, C, D)`` and patch tokens ``(B, h, w, D)`` of ``images`` ``(B, 3, H, W)``."""
    cls, patch = [], []
    for i in range(0, len(images), batch):
        f = model.encode_image(images[i : i + batch], layer=layer)
        cls.append(f.cls)
        patch.append(f.patch)
    return torch.cat(cls), torch.cat(patch)


def _stack_split(dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Every item of ``dataset``: images ``(B, 3, H, W)`` and labels ``(B, H, W)``."""
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([it["image"] for it in items]), torch.stack([it["label"] for it in items])


def zero_shot_presence(
    model: Any, cls: torch.Tensor, present: torch.Tensor, class_names: list[str], objects: list[int]
) -> dict[str, Any]:
    """Object presence scored by cosine(CLS token k, class prompt embedding), mean ROC AUC over
    ``objects`` per CLS token, and the mean cosine between distinct object prompts.

    ``cls`` ``(B, C, D)``; ``present`` bool ``(B, num_classes)``."""
    emb = encode_class_names(model, class_names, "tcl", cache_dir=None).embeddings  # (num_classes, D)
    zs = {}
    for k in range(cls.shape[1]):
        s = F.normalize(to_text_space(model, cls[:, k]).float(), dim=-1) @ emb.T
        zs[f"cls{k + 1}"] = float(torch.tensor([roc_auc(s[:, c], present[:, c]) for c in objects]).nanmean())
    obj = emb[objects]
    cos = obj @ obj.T
    return {
        "zero_shot_auc": zs,
        "object_prompt_cosine": float(cos[~torch.eye(len(objects), dtype=torch.bool)].mean()),
    }


def probe(
    model: Any, dataset: Any, steps: int = 400, seed: int = 0, presence_min: float = 0.05
) -> dict[str, Any]:
    """Run every probe on ``dataset`` (a :class:`cache.synthetic.SyntheticScenes`); returns the numbers."""
    images, labels = _stack_split(dataset)
    C = len(dataset.class_names)
    objects = list(dataset.object_class_ids)
    n_fit = len(images) // 2
    if n_fit < 2:
        raise ValueError(f"the probe needs at least 4 validation images, got {len(images)}")
    cls, patch = encode_all(model, images, None)
    grid = tuple(patch.shape[1:3])
    plab = patch_labels(labels, grid, C)  # (B, h, w)
    area = F.adaptive_avg_pool2d(F.one_hot(labels, C).permute(0, 3, 1, 2).float(), grid)  # (B, C, h, w)
    present = area.flatten(2).amax(2) > presence_min  # (B, C): the class fills > 5% of some patch

    out: dict[str, Any] = {"num_images": len(images), "fit_images": n_fit, "grid": list(grid)}
    g = F.normalize(cls.flatten(1), dim=-1) * 10
    lin = fit_linear(g[:n_fit], present[:n_fit], "bce", C, steps, seed)
    scores = lin(g[n_fit:]).detach()
    aucs = [roc_auc(scores[:, c], present[n_fit:, c]) for c in objects]
    out["cls_auc"] = float(torch.tensor(aucs).nanmean())
    if getattr(model, "has_text", False):
        out.update(zero_shot_presence(model, cls, present, list(dataset.class_names), objects))
    rows = []
    y = plab.reshape(-1)
    n_tok = n_fit * grid[0] * grid[1]
    for layer in range(int(model.num_layers)):
        _, p = encode_all(model, images, layer)
        x = F.normalize(p.reshape(-1, p.shape[-1]), dim=-1) * 10
        lin = fit_linear(x[:n_tok], y[:n_tok], "ce", C, steps, seed)
        pred = lin(x[n_tok:]).argmax(1).detach()
        rows.append({"layer": layer, **patch_miou(pred, y[n_tok:], C, objects)})
    out["patch"] = rows
    return out


def load_model(spec: str, kind: str = "auto") -> Any:
    """``embedded`` (the committed teacher), an embedded-teacher folder or a student export
    (``kind="auto"`` reads the folder's ``config.json`` ``format``), or any :func:`build_model` spec."""
    if kind not in ("auto", "teacher", "student"):
        raise ValueError(f"kind must be auto, teacher or student, got {kind!r}")
    if kind == "auto":
        return build_model(spec)
    return EmbeddedTeacher(Path(spec)) if kind == "teacher" else load_student(spec)


def random_like(model: Any) -> Any:
    """A copy of ``model`` whose vision tower is freshly initialised (same timm name and overrides)."""
    cfg = model.config
    name = cfg.get("timm_name") or cfg.get("name")
    if not name or "overrides" not in cfg:
        raise ValueError(
            f"{type(model).__name__}.config lacks the timm name/overrides needed for a random copy"
        )
    fresh = copy.deepcopy(model)
    torch.manual_seed(0)
    fresh.vit = timm.create_model(name, pretrained=False, num_classes=0, **cfg["overrides"]).eval()
    return fresh


def learnability(
    model: Any,
    train: Any,
    val: Any,
    minutes: float = 3.0,
    max_steps: int = 0,
    batch: int = 96,
    lr: float = 1e-3,
    seed: int = 0,
) -> dict[str, Any]:
    """Train ``model``'s architecture from scratch with per-patch cross-entropy on ``train`` (a linear
    classifier on the last block's patch tokens), for ``minutes`` of wall clock (or ``max_steps``),
    then score the second half of ``val`` like :func:`probe` (patch mIoU, all classes and objects)."""
    net = random_like(model)
    vit = net.vit.train()
    C = len(train.class_names)
    head = torch.nn.Linear(vit.embed_dim, C)
    opt = torch.optim.AdamW(list(vit.parameters()) + list(head.parameters()), lr=lr, weight_decay=0.05)
    arr = train.arrays()
    images = torch.from_numpy(arr["images"]).permute(0, 3, 1, 2)
    labels = torch.from_numpy(arr["labels"].astype("int64"))
    grid = tuple(s // vit.patch_embed.patch_size[0] for s in images.shape[-2:])
    ng = int(getattr(model, "num_global_tokens", 2))
    g = torch.Generator().manual_seed(seed)
    t0, step = time.time(), 0
    while (max_steps and step < max_steps) or (not max_steps and time.time() - t0 < minutes * 60):
        idx = torch.randint(len(images), (batch,), generator=g)
        f = vit_dense_forward(vit, images[idx].float().div(255), num_global_tokens=ng)
        y = patch_labels(labels[idx], grid, C)
        loss = F.cross_entropy(head(f.patch).permute(0, 3, 1, 2), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
    vit.eval()
    vx, vlab = _stack_split(val)
    vy = patch_labels(vlab, grid, C)
    with torch.no_grad():
        pred = head(vit_dense_forward(vit, vx, num_global_tokens=ng).patch).argmax(-1)
    half = len(vx) // 2
    return {
        "steps": step,
        "batch": batch,
        "minutes": (time.time() - t0) / 60,
        "final_loss": float(loss.detach()) if step else float("nan"),
        **patch_miou(pred[half:], vy[half:], C, list(val.object_class_ids)),
    }


def summary_line(name: str, r: dict[str, Any]) -> str:
    """One printed line of :func:`probe`'s result ``r``."""
    best = max(r["patch"], key=lambda row: row["miou_objects"])
    line = (
        f"{name:11s} CLS object-presence AUC {r['cls_auc']:.3f} | patch probe, last block: objects "
        f"{r['patch'][-1]['miou_objects']:.1f} all {r['patch'][-1]['miou']:.1f} mIoU; best block "
        f"{best['layer']}: objects {best['miou_objects']:.1f}"
    )
    if "zero_shot_auc" in r:
        zs = ", ".join(f"{k} {v:.3f}" for k, v in r["zero_shot_auc"].items())
        line += f" | zero-shot presence AUC {zs}; object prompt cosine {r['object_prompt_cosine']:.2f}"
    return line
