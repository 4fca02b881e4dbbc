"""Linear probes of a model's tokens on the synthetic scenes: what it *knows*, independent of text.

Zero-shot segmentation measures knowledge and text alignment together; when it is at chance, this
script tells the two apart. On the validation split (first half fits, second half scores):

- ``cls_auc``: object presence from the global tokens (both CLS tokens concatenated, L2-normalised):
  one logistic regression per object class, mean ROC AUC over the 14 objects (0.5 = chance);
- ``patch``: per-patch class (the majority label inside each patch) from the patch tokens of every
  block: softmax regression, mIoU over all 20 classes and over the 14 objects, on patches;
- ``zero_shot_auc`` (models with a text tower): object presence scored by the cosine between CLS1/CLS2
  and the class prompt embeddings (9 TCL templates), no training.

A randomly initialised model of the same class gives the floor (``--random-baseline``).
``--learnability MINUTES`` asks the data question instead: it trains the model's architecture from
scratch, **supervised** on the per-patch labels of the training split for a wall-clock budget, and
scores the validation patches: how learnable the categories are for this architecture at CPU scale.

    python -m scripts.probe                                   # the committed embedded teacher
    python -m scripts.probe --model runs/demo/student/export  # a distilled student
    python -m scripts.probe --model DIR --kind teacher        # a pretrain_teacher run folder
    python -m scripts.probe --learnability 3 --version 1      # supervised ceiling on version-1 scenes
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger("tipsdistill.probe")


def roc_auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """ROC AUC of ``scores`` for the boolean ``positive`` (Mann-Whitney U with tied ranks averaged)."""
    pos, neg = int(positive.sum()), int((~positive).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    s = scores.double()
    order = torch.argsort(s)
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, len(s) + 1, dtype=torch.float64)
    for v in torch.unique(s):  # average ranks of ties
        tie = s == v
        if int(tie.sum()) > 1:
            ranks[tie] = ranks[tie].mean()
    return float((ranks[positive].sum() - pos * (pos + 1) / 2) / (pos * neg))


def _fit_linear(
    x: torch.Tensor, y: torch.Tensor, loss: str, out_dim: int, steps: int, seed: int
) -> torch.nn.Linear:
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(x.shape[1], out_dim)
    with torch.no_grad():
        lin.weight.normal_(0, 0.01, generator=g)
        lin.bias.zero_()
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=1e-4)
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


def patch_labels(labels: torch.Tensor, grid: tuple[int, int], num_classes: int) -> torch.Tensor:
    """``(B, H, W)`` pixel labels -> ``(B, h, w)`` majority label of each patch."""
    onehot = F.one_hot(labels, num_classes).permute(0, 3, 1, 2).float()
    return F.adaptive_avg_pool2d(onehot, grid).argmax(1)


def _miou(pred: torch.Tensor, target: torch.Tensor, ids: list[int]) -> float:
    ious = []
    for c in ids:
        if not bool((target == c).any()):
            continue
        inter = int(((pred == c) & (target == c)).sum())
        union = int(((pred == c) | (target == c)).sum())
        ious.append(inter / union)
    return 100.0 * sum(ious) / len(ious) if ious else float("nan")


@torch.no_grad()
def _features(
    model: Any, images: torch.Tensor, layer: int | None, batch: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    cls, patch = [], []
    for i in range(0, len(images), batch):
        f = model.encode_image(images[i : i + batch], layer=layer)
        cls.append(f.cls)
        patch.append(f.patch)
    return torch.cat(cls), torch.cat(patch)


def probe(
    model: Any, dataset: Any, steps: int = 400, seed: int = 0, presence_min: float = 0.05
) -> dict[str, Any]:
    """Run every probe on ``dataset`` (a :class:`cache.synthetic.SyntheticScenes`); returns the numbers."""
    items = [dataset[i] for i in range(len(dataset))]
    images = torch.stack([it["image"] for it in items])
    labels = torch.stack([it["label"] for it in items])
    C = len(dataset.class_names)
    objects = list(dataset.object_class_ids)
    n_fit = len(images) // 2
    if n_fit < 2:
        raise ValueError(f"the probe needs at least 4 validation images, got {len(images)}")
    cls, patch = _features(model, images, None)
    grid = tuple(patch.shape[1:3])
    plab = patch_labels(labels, grid, C)  # (B, h, w)
    area = F.adaptive_avg_pool2d(F.one_hot(labels, C).permute(0, 3, 1, 2).float(), grid)  # (B, C, h, w)
    present = area.flatten(2).amax(2) > presence_min  # (B, C): the class fills > 5% of some patch

    out: dict[str, Any] = {"num_images": len(images), "fit_images": n_fit, "grid": list(grid)}
    g = F.normalize(cls.flatten(1), dim=-1) * 10
    with torch.enable_grad():
        lin = _fit_linear(g[:n_fit], present[:n_fit], "bce", C, steps, seed)
    scores = lin(g[n_fit:]).detach()
    aucs = [roc_auc(scores[:, c], present[n_fit:, c]) for c in objects]
    out["cls_auc"] = float(torch.tensor(aucs).nanmean())
    if getattr(model, "has_text", False):
        from distill.evaluation.templates import TCL_TEMPLATES

        with torch.no_grad():
            emb = []
            for name in dataset.class_names:
                e = F.normalize(model.encode_text([t.format(name) for t in TCL_TEMPLATES]).float(), dim=-1)
                emb.append(F.normalize(e.mean(0), dim=-1))
            emb_t = torch.stack(emb)
        zs = {}
        for k in range(cls.shape[1]):
            s = F.normalize(cls[:, k], dim=-1) @ emb_t.T
            zs[f"cls{k + 1}"] = float(
                torch.tensor([roc_auc(s[:, c], present[:, c]) for c in objects]).nanmean()
            )
        out["zero_shot_auc"] = zs
        obj = emb_t[objects]
        cos = obj @ obj.T
        out["object_prompt_cosine"] = float(cos[~torch.eye(len(objects), dtype=torch.bool)].mean())
    rows = []
    y = plab.reshape(-1)
    n_tok = n_fit * grid[0] * grid[1]
    for layer in range(int(model.num_layers)):
        _, p = _features(model, images, layer)
        x = F.normalize(p.reshape(-1, p.shape[-1]), dim=-1) * 10
        with torch.enable_grad():
            lin = _fit_linear(x[:n_tok], y[:n_tok], "ce", C, steps, seed)
        pred = lin(x[n_tok:]).argmax(1).detach()
        rows.append(
            {
                "layer": layer,
                "miou": _miou(pred, y[n_tok:], list(range(C))),
                "miou_objects": _miou(pred, y[n_tok:], objects),
            }
        )
    out["patch"] = rows
    return out


def load_model(spec: str, kind: str) -> Any:
    """``embedded`` (the committed teacher), a teacher run folder (``kind=teacher``) or a student export."""
    import teachers.embedded as emb

    if spec == "embedded":
        return emb.EmbeddedTeacher()
    p = Path(spec)
    if kind == "teacher" or (
        kind == "auto" and (p / "tokenizer.model").is_file() and not (p / "card.md").is_file()
    ):
        return emb.EmbeddedTeacher(p)
    from students import load_student

    return load_student(p)


def random_like(model: Any) -> Any:
    """A copy of ``model`` whose vision tower is freshly initialised (same timm name and overrides)."""
    import copy

    import timm

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
    import time

    from teachers.vit import vit_dense_forward

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
    items = [val[i] for i in range(len(val))]
    vx = torch.stack([it["image"] for it in items])
    vy = patch_labels(torch.stack([it["label"] for it in items]), grid, C)
    with torch.no_grad():
        pred = head(vit_dense_forward(vit, vx, num_global_tokens=ng).patch).argmax(-1)
    half = len(vx) // 2
    objects = list(val.object_class_ids)
    return {
        "steps": step,
        "batch": batch,
        "minutes": (time.time() - t0) / 60,
        "final_loss": float(loss.detach()) if step else float("nan"),
        "miou": _miou(pred[half:], vy[half:], list(range(C))),
        "miou_objects": _miou(pred[half:], vy[half:], objects),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="embedded", help="'embedded', a teacher folder or a student export")
    ap.add_argument("--kind", choices=("auto", "teacher", "student"), default="auto")
    ap.add_argument("--val-size", type=int, default=500)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--version", type=int, default=None, help="synthetic scene version (default: current)")
    ap.add_argument("--steps", type=int, default=400, help="optimisation steps of each linear probe")
    ap.add_argument("--random-baseline", action="store_true", help="also probe a random-init copy")
    ap.add_argument(
        "--learnability",
        type=float,
        default=0.0,
        metavar="MINUTES",
        help="instead of probing: train the architecture supervised on per-patch labels for MINUTES",
    )
    ap.add_argument("--train-size", type=int, default=20000, help="training images for --learnability")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    from cache.synthetic import SyntheticScenes

    kw = {"version": args.version} if args.version is not None else {}
    val = SyntheticScenes("validation", size=args.val_size, image_size=args.image_size, **kw)
    model = load_model(args.model, args.kind).eval()
    if args.learnability > 0:
        train = SyntheticScenes("train", size=args.train_size, image_size=args.image_size, **kw)
        r = learnability(model, train, val, minutes=args.learnability)
        print(
            f"supervised per-patch training, {r['steps']} steps of {r['batch']} in {r['minutes']:.1f} min "
            f"(scenes v{val.version}): validation patch mIoU objects {r['miou_objects']:.1f} all {r['miou']:.1f}"
        )
        if args.out:
            Path(args.out).write_text(json.dumps({"dataset": val.identity(), "learnability": r}, indent=2))
        return 0
    res = {"model": args.model, "dataset": val.identity(), "probe": probe(model, val, args.steps)}
    if args.random_baseline:
        res["random_init"] = probe(random_like(model), val, args.steps)
    for name in ("probe", "random_init"):
        if name not in res:
            continue
        r = res[name]
        best = max(r["patch"], key=lambda row: row["miou_objects"])
        line = (
            f"{name:11s} CLS object-presence AUC {r['cls_auc']:.3f} | patch probe, last block: objects "
            f"{r['patch'][-1]['miou_objects']:.1f} all {r['patch'][-1]['miou']:.1f} mIoU; best block "
            f"{best['layer']}: objects {best['miou_objects']:.1f}"
        )
        if "zero_shot_auc" in r:
            zs = ", ".join(f"{k} {v:.3f}" for k, v in r["zero_shot_auc"].items())
            line += f" | zero-shot presence AUC {zs}; object prompt cosine {r['object_prompt_cosine']:.2f}"
        print(line)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
