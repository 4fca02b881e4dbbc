"""Image-text retrieval recall@K with global (CLS) tokens: every CLS token x every caption granularity,
image->text and text->image, one caption per image (in-set retrieval)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .segmentation import model_device, resize_short_side, round_up_to_patch, to_text_space

logger = logging.getLogger(__name__)


def center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    _, H, W = image.shape
    s = min(size, H, W)
    y, x = (H - s) // 2, (W - s) // 2
    return image[:, y : y + s, x : x + s]


def recall_at_k(sim: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """``sim (N, N)`` with the match on the diagonal; recall@k (percent) of rows."""
    n = sim.shape[0]
    target = sim.diagonal().unsqueeze(1)
    rank = (sim > target).sum(dim=1)  # strictly better candidates (ties count in the item's favour)
    return {k: 100.0 * float((rank < k).double().mean()) for k in ks if k <= n} | {
        k: 100.0 for k in ks if k > n
    }


def image_global_tokens(
    model: Any, dataset: Any, image_size: int, max_images: int | None = None
) -> torch.Tensor:
    """``(N, C, D)`` L2-normalised global tokens in the model's text space (short side resized,
    centre-cropped square; :func:`~.segmentation.to_text_space`)."""
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    device = model_device(model)
    out = []
    with torch.no_grad():
        for i in range(n):
            img = resize_short_side(dataset[i]["image"].to(device).float(), image_size, "pil")
            img = round_up_to_patch(center_crop(img, image_size)[None], int(model.patch_size))
            cls = to_text_space(model, model.encode_image(img).cls)
            out.append(F.normalize(cls.float(), dim=-1).cpu())
    return torch.cat(out)


def retrieval_recall(
    model: Any,
    dataset: Any,
    *,
    text_model: Any = None,
    image_size: int = 224,
    ks: Sequence[int] = (1, 5),
    granularities: Sequence[str] | None = None,
    max_images: int | None = None,
) -> dict[str, Any]:
    """Recall@K for each global token ``cls{c}`` and caption granularity.

    Returns ``{"cls0/alt": {"i2t_r1": .., "i2t_r5": .., "t2i_r1": .., "t2i_r5": .., "num": N}, ...}``.
    Images missing a granularity are left out of that granularity's pairs (counted in ``num``).
    """
    tm = text_model if text_model is not None else model
    if hasattr(tm, "has_text") and not tm.has_text:
        raise ValueError(f"{type(tm).__name__} has no text tower; pass text_model= for retrieval")
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    caps = [dict(dataset[i].get("captions") or {}) for i in range(n)]
    grans = list(granularities) if granularities else sorted({g for c in caps for g in c if c[g]})
    if not grans:
        raise ValueError("the dataset has no captions; retrieval needs a captioned set (items['captions'])")
    img = image_global_tokens(model, dataset, image_size, n)  # (N, C, D)
    results: dict[str, Any] = {}
    for g in grans:
        idx = [i for i, c in enumerate(caps) if c.get(g)]
        if len(idx) < 2:
            logger.warning("granularity %r has %d captions; skipped (listed in results)", g, len(idx))
            results[f"skipped/{g}"] = {"reason": f"{len(idx)} captions", "num": len(idx)}
            continue
        with torch.no_grad():
            txt = F.normalize(tm.encode_text([caps[i][g] for i in idx]).float().cpu(), dim=-1)
        if txt.shape[-1] != img.shape[-1]:
            raise ValueError(
                f"text dim {txt.shape[-1]} differs from the image global-token dim {img.shape[-1]}; use a text "
                "model in the same embedding space"
            )
        for c in range(img.shape[1]):
            sim = img[idx, c] @ txt.T
            i2t, t2i = recall_at_k(sim, ks), recall_at_k(sim.T, ks)
            row = {f"i2t_r{k}": v for k, v in i2t.items()} | {f"t2i_r{k}": v for k, v in t2i.items()}
            results[f"cls{c}/{g}"] = row | {"num": len(idx)}
    return results


def retrieval_report(
    models: dict[str, Any],
    dataset: Any,
    out_dir: str | Path,
    *,
    text_model: Any = None,
    image_size: int = 224,
    max_images: int | None = None,
) -> dict[str, Any]:
    """Recall@1/5 of every model on a captioned dataset with no labels (e.g. the images of a cache);
    writes ``results.json`` and ``results.md`` to ``out_dir`` and returns the results (``files`` lists them)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        ident = dict(dataset.identity())
    except Exception:  # noqa: BLE001
        ident = {"name": type(dataset).__name__}
    res: dict[str, Any] = {"dataset": ident, "task": "retrieval", "models": {}}
    for name, model in models.items():
        logger.info("retrieval: %s", name)
        res["models"][name] = retrieval_recall(
            model, dataset, text_model=text_model, image_size=image_size, max_images=max_images
        )
    lines = [
        "| model | pair | i2t R@1 | i2t R@5 | t2i R@1 | t2i R@5 | images |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rows in res["models"].items():
        for pair, r in rows.items():
            if pair.startswith("skipped/"):
                lines.append(f"| {name} | {pair} ({r['reason']}) | | | | | {r['num']} |")
                continue
            lines.append(
                f"| {name} | {pair} | {r['i2t_r1']:.1f} | {r['i2t_r5']:.1f} | {r['t2i_r1']:.1f} | {r['t2i_r5']:.1f} "
                f"| {r['num']} |"
            )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    res["files"] = {"markdown": str(out / "results.md"), "json": str(out / "results.json")}
    (out / "results.json").write_text(json.dumps(res, indent=2, default=str))
    return res
