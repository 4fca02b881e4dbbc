"""Zero-shot image classification with global (CLS) tokens, as CLIP evaluates ImageNet-1k.

Per class: every template filled with the class name (and each synonym), encoded, L2-normalised,
averaged, L2-normalised (:func:`~.text.resolve_class_embeddings`; the 80 OpenAI templates by default).
Per image: short side resized to ``image_size`` (PIL bicubic), centre-cropped square, each global token
mapped into the text space (:func:`~.segmentation.to_text_space`) and L2-normalised; the class scores are
cosines (max over a class's synonyms). Top-k is a hit when fewer than ``k`` classes score strictly higher
than the true class (ties count in its favour, as :func:`~.retrieval.ranks_above`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .retrieval import (
    dataset_identity_dict,
    image_global_tokens,
    ranks_above,
    recall_from_ranks,
    write_results,
)
from .segmentation import check_text_dim, model_device
from .text import ClassEmbeddings, resolve_class_embeddings

logger = logging.getLogger(__name__)


def dataset_targets(dataset: Any, n: int) -> torch.Tensor:
    """``(n,)`` class ids of the first ``n`` images: ``dataset.targets()`` or the items' ``class_id``."""
    if hasattr(dataset, "targets"):
        t = list(dataset.targets())[:n]
    else:
        t = []
        for i in range(n):
            item = dataset[i]
            if "class_id" not in item:
                raise ValueError(
                    f"item {i} of {type(dataset).__name__} has no 'class_id'; classification needs a labelled "
                    "image set (e.g. the 'imagenet' dataset)"
                )
            t.append(int(item["class_id"]))
    return torch.tensor(t, dtype=torch.long)


def dataset_label_names(dataset: Any) -> list[list[str]]:
    """The classification head's names (with synonyms) of ``dataset`` (``label_names``)."""
    names = getattr(dataset, "label_names", None)
    if not names:
        raise ValueError(
            f"{type(dataset).__name__} has no label_names; classification needs the class names of its head"
        )
    return [[n] if isinstance(n, str) else list(n) for n in names]


def topk_from_scores(scores: torch.Tensor, targets: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """``scores (N, C)``, ``targets (N,)`` -> top-k accuracy (percent) for each ``k``."""
    ranks = ranks_above(scores, scores.gather(1, targets[:, None]).squeeze(1))
    return recall_from_ranks(ranks, ks)


def classification_accuracy(
    model: Any,
    dataset: Any,
    *,
    text_model: Any = None,
    text_embeddings: str | Path | ClassEmbeddings | None = None,
    templates: str | Sequence[str] = "openai",
    image_size: int = 224,
    ks: Sequence[int] = (1, 5),
    max_images: int | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    cache_dir: str | Path | None = "default",
    progress: bool = False,
) -> dict[str, Any]:
    """Zero-shot top-k accuracy of every global token of ``model`` on a labelled image set.

    The text comes from ``text_embeddings`` (a file or :class:`~.text.ClassEmbeddings`), else ``text_model``,
    else the model's own text tower. Returns ``{"cls0": {"top1": .., "top5": .., "num": N}, "cls1": ...,
    "num_classes": C, "text": {...}}`` (and ``unreadable``, listing the images that could not be read and
    were left out, when there are any).
    """
    names = dataset_label_names(dataset)
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    targets = dataset_targets(dataset, n)
    if len(targets) != n:
        raise ValueError(f"the dataset gives {len(targets)} targets for {n} images")
    if n and (int(targets.min()) < 0 or int(targets.max()) >= len(names)):
        raise ValueError(
            f"class ids must be in 0..{len(names) - 1}; got {int(targets.min())}..{int(targets.max())}"
        )
    text = resolve_class_embeddings(
        names, model=model, text_model=text_model, text_embeddings=text_embeddings, templates=templates,
        cache_dir=cache_dir,
    )  # fmt: skip
    check_text_dim(model, text)
    enc = image_global_tokens(
        model, dataset, image_size, n, batch_size=batch_size, num_workers=num_workers, progress=progress
    )
    img, targets = enc.tokens, targets[enc.index]  # (M, C, D) of the readable images, their classes
    if img.shape[-1] != text.dim:
        raise ValueError(
            f"global tokens have dim {img.shape[-1]} in the text space; the text embeddings {text.dim}"
        )
    out: dict[str, Any] = {}
    device = model_device(model)
    for c in range(img.shape[1]):  # scored on the model's device
        scores = text.scores(img[:, c].to(device)).T  # (N, C)
        acc = topk_from_scores(scores, targets.to(device), ks)
        out[f"cls{c}"] = {f"top{k}": v for k, v in acc.items()} | {"num": len(enc.index)}
    out["num_classes"] = len(names)
    if enc.bad:
        out["unreadable"] = enc.bad_report(dataset)
    out["text"] = {**text.source, "templates": len(text.templates)}
    return out


def classification_report(
    models: dict[str, Any],
    dataset: Any,
    out_dir: str | Path,
    *,
    text_model: Any = None,
    text_embeddings: str | Path | None = None,
    templates: str | Sequence[str] = "openai",
    image_size: int = 224,
    ks: Sequence[int] = (1, 5),
    max_images: int | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    cache_dir: str | Path | None = "default",
    progress: bool = False,
) -> dict[str, Any]:
    """Zero-shot top-k of every model (each of its global tokens) on a labelled image set; writes
    ``results.json`` and ``results.md`` to ``out_dir`` and returns the results (``files`` lists them)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ident = dataset_identity_dict(dataset)
    settings = {
        "image_size": image_size,
        "templates": templates if isinstance(templates, str) else list(templates),
        "ks": list(ks),
        "max_images": max_images,
        "preprocess": "short side + centre crop",
    }
    res: dict[str, Any] = {"dataset": ident, "task": "classification", "settings": settings, "models": {}}
    for name, model in models.items():
        logger.info("classification: %s", name)
        res["models"][name] = classification_accuracy(
            model, dataset, text_model=text_model, text_embeddings=text_embeddings, templates=templates,
            image_size=image_size, ks=ks, max_images=max_images, batch_size=batch_size, num_workers=num_workers,
            cache_dir=cache_dir, progress=progress,
        )  # fmt: skip
    cols = [f"top-{k}" for k in ks]
    lines = [
        f"# Zero-shot classification: {ident.get('name')} (accuracy, %)",
        "",
        "| model | token | " + " | ".join(cols) + " | images | classes |",
        "|" + "---|" * (len(cols) + 4),
    ]
    for name, r in res["models"].items():
        for tok in sorted(k for k in r if k.startswith("cls")):
            cells = [f"{r[tok][f'top{k}']:.2f}" for k in ks]
            lines.append(
                f"| {name} | {tok} | " + " | ".join(cells) + f" | {r[tok]['num']} | {r['num_classes']} |"
            )
    unreadable = max((r.get("unreadable", {}).get("num", 0) for r in res["models"].values()), default=0)
    if unreadable:
        ident["num_unreadable"] = unreadable  # (the images: models.<name>.unreadable)
    notes = [f"{ident[k]} {what}" for k, what in (("num_ignored", "files not evaluated"), ("num_missing", "listed images missing"), ("num_unreadable", "unreadable images left out")) if ident.get(k)]  # fmt: skip
    if notes:
        lines += ["", "; ".join(notes) + " (listed in results.json, dataset)."]
    write_results(out, res, lines)
    return res
