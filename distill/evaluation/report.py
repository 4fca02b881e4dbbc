"""Comparison report: several models, one dataset, the same settings -> JSON, Markdown and PNG figures.

Files written to ``out_dir``: ``results.json``, ``results.md``, ``per_class_iou.png``, ``examples.png``
(image, ground truth, each model's prediction), ``pca.png`` (patch features projected to RGB per model),
``layer_curve.png`` (when ``layers`` is given) and ``retrieval`` entries in the JSON when asked.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tipsdistill.cache.format import git_revision

from .retrieval import dataset_identity_dict, retrieval_recall
from .segmentation import (
    SegmentationSettings,
    dataset_class_names,
    dense_patch_features,
    dist_rank_world,
    evaluate_segmentation,
    layer_curve,
    model_device,
    resize_image,
)
from .templates import apply_synonyms, normalise_class_list
from .text import ClassEmbeddings, resolve_class_embeddings

logger = logging.getLogger(__name__)


def _identity(obj: Any) -> dict[str, Any]:
    try:
        return dict(obj.identity())
    except Exception:
        return {"class": type(obj).__name__}


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def palette(n: int) -> np.ndarray:
    """``(n + 1, 3)`` uint8 colours; the last row (index ``n``) is the ignore colour (black)."""
    rng = np.random.RandomState(0)
    cols = rng.randint(40, 256, size=(n, 3)).astype(np.uint8)
    return np.concatenate([cols, np.zeros((1, 3), np.uint8)])


def colorize(label: torch.Tensor, num_classes: int) -> np.ndarray:
    pal = palette(num_classes)
    lab = label.cpu().numpy().astype(np.int64)
    lab = np.where((lab < 0) | (lab >= num_classes), num_classes, lab)
    return pal[lab]


def pca_rgb(feats: torch.Tensor) -> np.ndarray:
    """``(h, w, D)`` features -> ``(h, w, 3)`` float in [0, 1] from the first 3 principal components."""
    h, w, d = feats.shape
    x = feats.reshape(-1, d).double()
    x = x - x.mean(0, keepdim=True)
    k = min(3, x.shape[0], d)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    proj = x @ vh[:k].T
    if k < 3:
        proj = torch.cat([proj, proj.new_zeros(proj.shape[0], 3 - k)], 1)
    lo, hi = proj.min(0).values, proj.max(0).values
    proj = (proj - lo) / (hi - lo).clamp_min(1e-12)
    return proj.reshape(h, w, 3).float().numpy()


def markdown_table(results: dict[str, Any]) -> str:
    models = results["models"]
    subsets = sorted({k for r in models.values() for k in r["metrics"] if k.startswith("miou_")})
    head = (
        ["model", "mIoU"] + [f"mIoU ({s[5:]})" for s in subsets] + ["pixel acc", "mean acc", "images", "text"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for name, r in models.items():
        m = r["metrics"]
        row = [name, _fmt(m["miou"])] + [_fmt(m.get(s)) for s in subsets]
        row += [_fmt(m["pixel_accuracy"]), _fmt(m["mean_accuracy"]), str(r["num_images"]), r["text_source"]]
        lines.append("| " + " | ".join(row) + " |")
    s = results["settings"]
    out = [f"# Zero-shot segmentation: {results['dataset'].get('name', '?')}", "", *lines, ""]
    out.append(
        "Settings: "
        + ", ".join(f"{k}={v}" for k, v in s.items() if k != "extra" and v is not None)
        + f"; ignore index 255; mIoU over classes with a non-empty union ({results['dataset'].get('num_classes')} classes)."
    )
    curves = {n: r["layer_curve"] for n, r in models.items() if r.get("layer_curve")}
    if curves:
        layers = sorted({row["layer"] for c in curves.values() for row in c})
        out += ["", "## mIoU by layer", "", "| model | " + " | ".join(str(k) for k in layers) + " |"]
        out.append("|" + "|".join(["---"] * (len(layers) + 1)) + "|")
        for n, c in curves.items():
            by = {row["layer"]: row["miou"] for row in c}
            out.append(f"| {n} | " + " | ".join(_fmt(by.get(k)) for k in layers) + " |")
    ret = {n: r["retrieval"] for n, r in models.items() if r.get("retrieval")}
    if ret:
        out += [
            "",
            "## Image-text retrieval (recall@K, %)",
            "",
            "| model | token/captions | i2t R@1 | i2t R@5 | t2i R@1 | t2i R@5 | N |",
        ]
        out.append("|---|---|---|---|---|---|---|")
        for n, rr in ret.items():
            for key, v in rr.items():
                if key.startswith("skipped/"):
                    continue
                cells = [_fmt(v.get(c)) for c in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5")]
                out.append(f"| {n} | {key} | " + " | ".join(cells) + f" | {v['num']} |")
    return "\n".join(out) + "\n"


def _suite_columns(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(dataset, metric key, header)`` columns of a suite table: each dataset's mIoU, and its object
    mIoU where the dataset lists object classes."""
    cols = []
    for name, entry in results["datasets"].items():
        cols.append((name, "miou", name))
        if any("miou_objects" in r for r in entry["models"].values()):
            cols.append((name, "miou_objects", f"{name} (objects)"))
    return cols


def suite_mean(results: dict[str, Any], model: str) -> float | None:
    """Mean mIoU of ``model`` over the suite's evaluated datasets (``None`` if one is undefined)."""
    vals = [e["models"][model]["miou"] for e in results["datasets"].values()]
    return None if any(v is None for v in vals) or not vals else float(np.mean(vals))


def suite_markdown(results: dict[str, Any]) -> str:
    """Markdown of a suite (:func:`~distill.evaluation.protocols.run_suite`): one row per model, one
    mIoU column per dataset (plus ``(objects)`` where it has object classes) and the mean over datasets."""
    cols = _suite_columns(results)
    head = ["model"] + [c[2] for c in cols] + ["mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for m in results["models"]:
        row = [m] + [_fmt(results["datasets"][d]["models"][m].get(k)) for d, k, _ in cols]
        lines.append("| " + " | ".join(row + [_fmt(suite_mean(results, m))]) + " |")
    out = [
        f"# Zero-shot segmentation: suite {results['suite']}, protocol {results['protocol']}",
        "",
        *lines,
        "",
    ]
    out.append(
        "mIoU (%), one global confusion matrix per dataset, ignore index 255; mean = mean of the dataset mIoUs. "
        "Images: " + ", ".join(f"{d} {e['num_images']}" for d, e in results["datasets"].items()) + "."
    )
    out.append(
        "Every setting per dataset: results.json (`datasets.<name>.settings`); per-dataset reports: `<name>/`."
    )
    if results["skipped"]:
        out += ["", f"Skipped ({len(results['skipped'])}):"]
        out += [f"- {s['dataset']}: {s['reason']} ({s['path']})" for s in results["skipped"]]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------ plots
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_per_class_iou(results: dict[str, Any], path: Path, max_classes: int = 60) -> Path:
    """Grouped bar chart of per-class IoU (classes present in the ground truth or predicted; the
    ``max_classes`` with the largest mean IoU when there are more)."""
    plt = _plt()
    models = results["models"]
    names = list(next(iter(models.values()))["metrics"]["per_class_iou"])
    vals = np.array(
        [
            [
                np.nan if r["metrics"]["per_class_iou"][c] is None else r["metrics"]["per_class_iou"][c]
                for c in names
            ]
            for r in models.values()
        ]
    )
    keep = [i for i in range(len(names)) if not np.all(np.isnan(vals[:, i]))]
    if len(keep) > max_classes:
        keep = sorted(keep, key=lambda i: -np.nanmean(vals[:, i]))[:max_classes]
    nm = len(models)
    width = 0.8 / max(nm, 1)
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(keep) * max(1, nm / 2) + 2), 4))
    x = np.arange(len(keep))
    for j, mname in enumerate(models):
        ax.bar(x + j * width - 0.4 + width / 2, np.nan_to_num(vals[j, keep]), width, label=mname)
    ax.set_xticks(x)
    ax.set_xticklabels([names[i] for i in keep], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Per-class IoU ({results['dataset'].get('name', '')}, {results['settings']['mode']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_suite(results: dict[str, Any], path: Path) -> Path:
    """Grouped bars of a suite: one group per dataset (its mIoU; object mIoU as a hatched bar where the
    dataset has object classes), one bar per model, and the mean over datasets."""
    plt = _plt()
    cols = _suite_columns(results)
    labels = [c[2] for c in cols] + ["mean"]
    models = list(results["models"])
    nm = len(models)
    width = 0.8 / max(nm, 1)
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(max(7, 0.9 * len(labels) * max(1, nm / 2) + 2), 4))
    for j, m in enumerate(models):
        vals = [results["datasets"][d]["models"][m].get(k) for d, k, _ in cols] + [suite_mean(results, m)]
        bars = ax.bar(
            x + j * width - 0.4 + width / 2,
            [np.nan if v is None else v for v in vals],
            width,
            label=m,
        )
        for b, (_, k, _) in zip(bars, cols):
            if k != "miou":
                b.set_hatch("//")
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("mIoU (%)")
    top = max(
        [0.0]
        + [
            v
            for e in results["datasets"].values()
            for r in e["models"].values()
            for k, v in r.items()
            if k.startswith("miou") and isinstance(v, float)
        ]
    )
    ax.set_ylim(0, max(10.0, min(100.0, top * 1.15)))
    ax.set_title(
        f"Zero-shot segmentation: suite {results['suite']}, protocol {results['protocol']}", fontsize=9
    )
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_examples(examples: dict[str, list], num_classes: int, path: Path) -> Path:
    """Grid: one row per image; columns image, ground truth, each model's prediction."""
    plt = _plt()
    mnames = list(examples)
    rows = min(len(v) for v in examples.values())
    cols = 2 + len(mnames)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.2 * rows), squeeze=False)
    for r in range(rows):
        ex0 = examples[mnames[0]][r]
        panels = [
            ("image", ex0.image.permute(1, 2, 0).clamp(0, 1).numpy()),
            ("ground truth", colorize(ex0.label, num_classes)),
        ]
        panels += [(m, colorize(examples[m][r].pred, num_classes)) for m in mnames]
        for c, (title, im) in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(im, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=8)
        axes[r][0].set_ylabel(str(ex0.key)[-24:], fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_pca(images: list[torch.Tensor], feats: dict[str, list[np.ndarray]], path: Path) -> Path:
    plt = _plt()
    mnames = list(feats)
    rows, cols = len(images), 1 + len(mnames)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.2 * rows), squeeze=False)
    for r, img in enumerate(images):
        panels = [("image", img.permute(1, 2, 0).clamp(0, 1).numpy())] + [(m, feats[m][r]) for m in mnames]
        for c, (title, im) in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(im, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title if c == 0 else f"{title} (PCA)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


LAYER_CURVE_LABELS = {"miou": "mIoU, all classes (%)", "miou_objects": "object mIoU (%)"}


def plot_layer_curve(
    curves: dict[str, list[dict[str, Any]]],
    path: Path,
    title: str = "",
    keys: Sequence[str] = ("miou",),
    relative_depth: bool = False,
) -> Path:
    """One panel per metric in ``keys`` (rows of :func:`layer_curve`), one line per model; the x axis
    is the block index, or ``block / last block`` with ``relative_depth`` (models of different depth)."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, rows in curves.items():
            depth = max(len(rows) - 1, 1)
            xs = [r["layer"] / depth if relative_depth else r["layer"] for r in rows]
            ys = [float("nan") if r.get(key) is None else r[key] for r in rows]
            ax.plot(xs, ys, marker="o", label=name)
        if not relative_depth:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("relative depth (block / last block)" if relative_depth else "block (0-based)")
        ax.set_ylabel(LAYER_CURVE_LABELS.get(key, f"{key} (%)"))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title or "mIoU by depth", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------- driver
def dataset_identity(dataset: Any, num_classes: int) -> dict[str, Any]:
    """``dataset.identity()`` (its class name when it has none) with ``num_classes``."""
    ident = dataset_identity_dict(dataset)
    ident.setdefault("num_classes", num_classes)
    return ident


def text_source_label(text: ClassEmbeddings, text_model: Any, text_embeddings: Any) -> str:
    """Where the class embeddings came from, for the report's ``text`` column."""
    if text_embeddings is not None:
        return f"file {Path(str(text.source.get('path', 'given'))).name}"
    if text_model is not None:
        return f"shared {_identity(text_model).get('class', 'text model')}"
    return "own"


def evaluate_model(
    model: Any,
    dataset: Any,
    text: ClassEmbeddings,
    settings: SegmentationSettings,
    *,
    text_source: str,
    layers: Sequence[int] | str | None,
    num_examples: int,
    retrieval_dataset: Any,
    retrieval_text_model: Any,
    retrieval_image_size: int,
    progress: bool,
    desc: str,
    distributed: bool = False,
    num_workers: int = 0,
) -> tuple[dict[str, Any], list]:
    """One model's report entry (metrics, optional layer curve and retrieval) and its kept examples."""
    res = evaluate_segmentation(
        model,
        dataset,
        text,
        settings,
        keep_examples=num_examples,
        progress=progress,
        desc=desc,
        distributed=distributed,
        num_workers=num_workers,
    )
    if res["skipped"] and not res["num_images"]:
        raise ValueError(
            f"every one of the {len(res['skipped'])} images was skipped (first: {res['skipped'][0]['error']}); "
            "nothing to measure"
        )
    entry: dict[str, Any] = {
        "identity": _identity(model),
        "text_source": text_source,
        "text": dict(text.source),
        "readout": res["settings"]["readout"],  # the model's own (patch for a student without attention)
        "num_images": res["num_images"],
        "skipped": res["skipped"],
        "metrics": res["metrics"],
    }
    if layers is not None:
        entry["layer_curve"] = layer_curve(
            model,
            dataset,
            text,
            settings,
            layers,
            progress=progress,
            distributed=distributed,
            num_workers=num_workers,
        )
    if retrieval_dataset is not None:
        entry["retrieval"] = retrieval_recall(
            model, retrieval_dataset, text_model=retrieval_text_model, image_size=retrieval_image_size
        )
    return entry, res["examples"]


def pca_figure(models: dict[str, Any], examples: list, settings: SegmentationSettings, path: Path) -> Path:
    """PCA-to-RGB of every model's patch features on the images of ``examples`` (same readout/layer)."""
    images = [resize_image(ex.image, settings) for ex in examples]
    feats = {}
    for name, model in models.items():
        feats[name] = [
            pca_rgb(
                dense_patch_features(
                    model,
                    im[None].to(model_device(model)),
                    settings.readout,
                    settings.layer,
                    False,
                    text_space=False,
                    amp=settings.amp,
                )[0].cpu()
            )
            for im in images
        ]
    return plot_pca(images, feats, path)


def write_figures(
    results: dict[str, Any],
    models: dict[str, Any],
    examples: dict[str, list],
    settings: SegmentationSettings,
    out: Path,
    *,
    num_examples: int,
    num_pca: int,
) -> dict[str, str]:
    """The report's PNGs (per-class IoU, examples, PCA, layer curves); returns ``{figure: path}``."""
    files = {"per_class_iou": str(plot_per_class_iou(results, out / "per_class_iou.png"))}
    if num_examples > 0 and all(examples.values()):
        files["examples"] = str(plot_examples(examples, len(results["classes"]), out / "examples.png"))
    first = next(iter(examples.values()))[:num_pca] if examples and num_pca > 0 else []
    if first:
        files["pca"] = str(pca_figure(models, first, settings, out / "pca.png"))
    curves = {n: r["layer_curve"] for n, r in results["models"].items() if r.get("layer_curve")}
    if curves:
        title = f"mIoU by depth ({settings.readout})"
        files["layer_curve"] = str(plot_layer_curve(curves, out / "layer_curve.png", title))
    return files


def write_report(results: dict[str, Any], out: Path, files: dict[str, str]) -> None:
    """``results.md`` and ``results.json`` in ``out``; ``files`` gains both paths and is stored."""
    results["files"] = files
    (out / "results.md").write_text(markdown_table(results))
    files["markdown"] = str(out / "results.md")
    files["json"] = str(out / "results.json")
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))


def compare_models(
    models: dict[str, Any],
    dataset: Any,
    settings: SegmentationSettings | None = None,
    out_dir: str | Path = "eval_out",
    *,
    text_model: Any = None,
    text_embeddings: str | Path | ClassEmbeddings | None = None,
    synonyms: str | Path | list[list[str]] | None = None,
    layers: Sequence[int] | str | None = None,
    num_examples: int = 4,
    num_pca: int = 2,
    retrieval_dataset: Any = None,
    retrieval_image_size: int = 224,
    cache_dir: str | Path | None = "default",
    progress: bool = True,
    plots: bool = True,
    distributed: bool = False,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Evaluate every model on ``dataset`` with the same ``settings``; write the report to ``out_dir``.

    Text: ``text_embeddings`` (file/object) for all models, else ``text_model`` for all models, else each
    model's own text tower. ``synonyms`` (file or lists, one line per class) adds names scored by max;
    ``settings.background_names`` replace the background class's names. ``layers`` (``"all"`` or ids)
    adds an mIoU-by-depth curve per model. ``distributed``: every rank of ``torch.distributed`` calls
    this, each evaluates its share of the images (:func:`evaluate_segmentation`), rank 0 writes.
    Returns the results dict (also written as ``results.json`` by the writing rank) with ``files``
    listing the outputs.
    """
    if not models:
        raise ValueError("compare_models needs at least one model")
    settings = settings or SegmentationSettings()
    writer = not distributed or dist_rank_world()[0] == 0
    out = Path(out_dir)
    if writer:
        out.mkdir(parents=True, exist_ok=True)
    names = dataset_class_names(dataset)
    classes = apply_synonyms(
        normalise_class_list(getattr(dataset, "class_synonyms", None) or names), synonyms
    )
    if settings.background_names is not None:
        if not 0 <= settings.background_class < len(classes):
            raise ValueError(
                f"background_class {settings.background_class} is not a class id (0..{len(classes) - 1})"
            )
        classes = [list(c) for c in classes]
        classes[settings.background_class] = list(settings.background_names)
    results: dict[str, Any] = {
        "dataset": dataset_identity(dataset, len(names)),
        "settings": settings.to_dict(),
        "classes": classes,
        "models": {},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_revision": git_revision(),
    }
    examples: dict[str, list] = {}
    for mname, model in models.items():
        logger.info("evaluating %s", mname)
        text = resolve_class_embeddings(
            classes,
            model=model,
            text_model=text_model,
            text_embeddings=text_embeddings,
            templates=settings.templates,
            cache_dir=cache_dir,
        )
        results["models"][mname], examples[mname] = evaluate_model(
            model,
            dataset,
            text,
            settings,
            text_source=text_source_label(text, text_model, text_embeddings),
            layers=layers,
            num_examples=num_examples,
            retrieval_dataset=retrieval_dataset,
            retrieval_text_model=text_model,
            retrieval_image_size=retrieval_image_size,
            progress=progress,
            desc=mname,
            distributed=distributed,
            num_workers=num_workers,
        )
    if not writer:
        return results
    figures = (
        write_figures(results, models, examples, settings, out, num_examples=num_examples, num_pca=num_pca)
        if plots
        else {}
    )
    write_report(results, out, figures)
    return results
