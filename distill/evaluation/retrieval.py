"""Image-text retrieval recall@K with global (CLS) tokens: every CLS token x every caption set, image->text
and text->image. One caption per image and granularity (in-set retrieval of a captioned set), or several
captions per image (Karpathy's COCO 5k / Flickr30k 1k test splits) by the standard rule: a text's match is its
image, an image's rank is that of its best-ranked caption."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .segmentation import model_device, resize_short_side, round_up_to_patch, to_text_space
from .text import encode_texts

logger = logging.getLogger(__name__)


def center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    _, H, W = image.shape
    s = min(size, H, W)
    y, x = (H - s) // 2, (W - s) // 2
    return image[:, y : y + s, x : x + s]


def ranks_above(sim: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``sim (Q, G)``, ``target (Q,)`` the score of each query's best match -> ``(Q,)`` the number of candidates
    scoring strictly higher (0 = the match is first; ties count in the match's favour)."""
    return (sim > target.unsqueeze(1)).sum(dim=1)


def recall_from_ranks(ranks: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Recall@k (percent) of queries whose best match has rank ``< k``."""
    return {k: 100.0 * float((ranks < k).double().mean()) for k in ks}


def recall_at_k(sim: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """``sim (N, N)`` with the match on the diagonal; recall@k (percent) of rows."""
    return recall_from_ranks(ranks_above(sim, sim.diagonal()), ks)


def retrieval_ranks(
    images: torch.Tensor, texts: torch.Tensor, text_image: torch.Tensor, chunk: int = 2048
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks of image->text and text->image retrieval with several captions per image (the standard rule of
    CLIP-like papers, CLIP_benchmark's ``zeroshot_retrieval``): a text's match is its image; an image's
    rank is that of the best-ranked of its captions.

    Args:
        images: ``(N, D)`` L2-normalised image embeddings.
        texts: ``(T, D)`` L2-normalised text embeddings.
        text_image: ``(T,)`` the image row of each text; every image has at least one text.
        chunk: texts scored per block (memory ``chunk x N``); the ranks are computed on ``images.device``.
    Returns:
        ``(i2t (N,), t2i (T,))`` ranks (0 = first); recall@k = share of ranks ``< k``.
    """
    n, t = images.shape[0], texts.shape[0]
    text_image = text_image.long().to(images.device)
    if text_image.shape != (t,) or (t and (int(text_image.min()) < 0 or int(text_image.max()) >= n)):
        raise ValueError(f"text_image must be ({t},) image rows in 0..{n - 1}")
    if bool((torch.bincount(text_image, minlength=n) == 0).any()):
        raise ValueError("every image needs at least one caption for image->text retrieval")
    t2i = torch.empty(t, dtype=torch.long)
    best = torch.full((n,), float("-inf"), device=images.device)
    blocks = [(a, min(a + chunk, t)) for a in range(0, t, chunk)]
    for a, b in blocks:  # pass 1: each text's rank; each image's best caption score
        sim = texts[a:b] @ images.T  # (b-a, N)
        pos = sim.gather(1, text_image[a:b, None]).squeeze(1)
        t2i[a:b] = ranks_above(sim, pos).cpu()
        best.scatter_reduce_(0, text_image[a:b], pos, reduce="amax")
    i2t = torch.zeros(n, dtype=torch.long, device=images.device)
    for a, b in blocks:  # pass 2: other images' captions scoring above each image's best caption
        own = F.one_hot(text_image[a:b], n).bool()  # (b-a, N) an image's own captions never count
        i2t += ((texts[a:b] @ images.T > best) & ~own).sum(dim=0)
    return i2t.cpu(), t2i


class _GlobalView(Dataset):
    """A dataset's images resized (short side, PIL bicubic) and centre-cropped square: ``(3, S, S)``; an image
    that cannot be read comes back as its error (listed by the caller, never fatal)."""

    def __init__(self, dataset: Any, n: int, image_size: int) -> None:
        self.dataset, self.n, self.image_size = dataset, n, image_size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            img = self.dataset[i]["image"].float()
        except ValueError as e:  # an unreadable image file (load_image / BadImageError say which and why)
            return i, None, str(e)
        return i, center_crop(resize_short_side(img, self.image_size, "pil"), self.image_size), ""


def _collate_views(batch: list[tuple[int, torch.Tensor | None, str]]) -> dict[str, Any]:
    good = [b for b in batch if b[1] is not None]
    return {
        "index": [b[0] for b in good],
        "pixels": torch.stack([b[1] for b in good]) if good else None,
        "bad": [(b[0], b[2]) for b in batch if b[1] is None],
    }


@dataclass
class GlobalTokens:
    """Global tokens of the readable images of a dataset.

    Attributes:
        tokens: ``(M, C, D)`` L2-normalised, in the model's text space.
        index: the dataset row of each of the ``M`` images.
        bad: ``(row, error)`` of every image that could not be read (left out).
    """

    tokens: torch.Tensor
    index: list[int]
    bad: list[tuple[int, str]]

    def bad_report(self, dataset: Any) -> dict[str, Any]:
        """``{"reason", "num", "images"}`` for a results file (keys of the unreadable images when known)."""
        keys = dataset.keys() if hasattr(dataset, "keys") else None
        images = [{"image": keys[i] if keys else i, "error": e} for i, e in self.bad[:100]]
        return {
            "reason": f"{len(self.bad)} unreadable image(s) left out",
            "num": len(self.bad),
            "images": images,
        }


def image_global_tokens(
    model: Any,
    dataset: Any,
    image_size: int,
    max_images: int | None = None,
    *,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = False,
) -> GlobalTokens:
    """Global tokens of the first ``max_images`` images (short side resized, centre-cropped square, as CLIP's
    preprocessing), each mapped into the model's text space (:func:`~.segmentation.to_text_space`) and
    L2-normalised; ``batch_size`` images per forward, decoded by ``num_workers`` loader processes. Unreadable
    images are left out and listed (:class:`GlobalTokens`)."""
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    if n == 0:
        raise ValueError("the dataset has no images")
    device = model_device(model)
    loader = DataLoader(
        _GlobalView(dataset, n, image_size), batch_size=batch_size, num_workers=num_workers, shuffle=False,
        collate_fn=_collate_views,
    )  # fmt: skip
    out, index, bad = [], [], []
    with torch.no_grad():
        for batch in tqdm(loader, desc="images", disable=not progress, leave=False):
            bad += batch["bad"]
            if batch["pixels"] is None:
                continue
            pixels = round_up_to_patch(batch["pixels"].to(device), int(model.patch_size))
            cls = to_text_space(model, model.encode_image(pixels).cls)
            out.append(F.normalize(cls.float(), dim=-1).cpu())
            index += batch["index"]
    if bad:
        logger.warning(
            "%d of %d images cannot be read and are left out (listed in the results): %s",
            len(bad), n, "; ".join(f"row {i}: {e}" for i, e in bad[:5]),
        )  # fmt: skip
    if not out:
        raise ValueError(f"none of the {n} images can be read (first: {bad[0][1]})")
    return GlobalTokens(torch.cat(out), index, bad)


def caption_sets(dataset: Any, n: int, granularities: Sequence[str] | None = None) -> dict[str, Any]:
    """``{granularity: (texts, image_rows)}`` of the first ``n`` images: the dataset's own
    ``caption_sets()`` (several captions per image: Karpathy) or one caption per image and granularity
    read from the items (``items['captions']``, images without that granularity left out)."""
    if hasattr(dataset, "caption_sets"):
        sets = {}
        for g, (texts, rows) in dataset.caption_sets().items():
            keep = [j for j, r in enumerate(rows) if r < n]
            sets[g] = ([texts[j] for j in keep], [rows[j] for j in keep])
    else:
        caps = []
        for i in range(n):
            try:
                caps.append(dict(dataset[i].get("captions") or {}))
            except ValueError:  # an unreadable image: left out, listed by the image pass
                caps.append({})
        names = sorted({g for c in caps for g in c if c[g]})
        sets = {
            g: ([c[g] for c in caps if c.get(g)], [i for i, c in enumerate(caps) if c.get(g)]) for g in names
        }
    if granularities:
        unknown = [g for g in granularities if g not in sets]
        if unknown:
            raise ValueError(
                f"caption granularities {unknown} are not in the dataset (it has {sorted(sets)})"
            )
        sets = {g: sets[g] for g in granularities}
    return sets


def retrieval_recall(
    model: Any,
    dataset: Any,
    *,
    text_model: Any = None,
    image_size: int = 224,
    ks: Sequence[int] = (1, 5, 10),
    granularities: Sequence[str] | None = None,
    max_images: int | None = None,
    batch_size: int = 32,
    text_batch_size: int = 256,
    num_workers: int = 0,
    progress: bool = False,
    text_memo: dict[Any, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Recall@K for each global token ``cls{c}`` and caption set (a granularity, or ``captions``: all of a
    Karpathy image's captions), image->text and text->image (:func:`retrieval_ranks`).

    Returns ``{"cls0/alt": {"i2t_r1": .., "i2t_r5": .., "i2t_r10": .., "t2i_r1": .., ..., "num": N,
    "num_texts": T}, ...}``. Images missing a granularity are left out of that granularity's pairs
    (``num`` counts the images used); a caption set with fewer than 2 images is listed as ``skipped/<g>``.
    ``text_memo``: a dict shared by calls that use one text model, so its captions are encoded once.
    """
    tm = text_model if text_model is not None else model
    if hasattr(tm, "has_text") and not tm.has_text:
        raise ValueError(f"{type(tm).__name__} has no text tower; pass text_model= for retrieval")
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    sets = caption_sets(dataset, n, granularities)
    if not sets:
        raise ValueError("the dataset has no captions; retrieval needs a captioned set (items['captions'])")
    enc = image_global_tokens(
        model, dataset, image_size, n, batch_size=batch_size, num_workers=num_workers, progress=progress
    )
    img, token_row = (
        enc.tokens,
        {r: j for j, r in enumerate(enc.index)},
    )  # (M, C, D); dataset row -> token row
    device = model_device(model)
    results: dict[str, Any] = {}
    for g, (texts, rows) in sets.items():
        kept = [j for j, r in enumerate(rows) if r in token_row]  # captions of readable images
        used = sorted({rows[j] for j in kept})
        if len(used) < 2:
            logger.warning("caption set %r covers %d images; skipped (listed in results)", g, len(used))
            results[f"skipped/{g}"] = {"reason": f"{len(used)} captioned images", "num": len(used)}
            continue
        key = (id(tm), g)
        txt = text_memo.get(key) if text_memo is not None else None
        if txt is None:
            txt = encode_texts(tm, texts, text_batch_size)  # (T, D)
            if text_memo is not None:
                text_memo[key] = txt
        if txt.shape[-1] != img.shape[-1]:
            raise ValueError(
                f"text dim {txt.shape[-1]} differs from the image global-token dim {img.shape[-1]}; use a text "
                "model in the same embedding space"
            )
        row_of = {r: j for j, r in enumerate(used)}
        text_image = torch.tensor([row_of[rows[j]] for j in kept], dtype=torch.long)
        txt_kept, img_used = txt[kept].to(device), img[[token_row[r] for r in used]]
        for c in range(img.shape[1]):  # ranked on the model's device (a GPU when the model is on one)
            i2t, t2i = retrieval_ranks(img_used[:, c].to(device), txt_kept, text_image)
            row = {f"i2t_r{k}": v for k, v in recall_from_ranks(i2t, ks).items()}
            row |= {f"t2i_r{k}": v for k, v in recall_from_ranks(t2i, ks).items()}
            results[f"cls{c}/{g}"] = row | {"num": len(used), "num_texts": len(kept)}
    if enc.bad:
        results["skipped/unreadable"] = enc.bad_report(dataset)
    return results


def dataset_identity_dict(dataset: Any) -> dict[str, Any]:
    """``dataset.identity()`` as a dict (``{"name": its class name}`` when it has none or it fails)."""
    try:
        return dict(dataset.identity())
    except Exception:  # noqa: BLE001
        return {"name": type(dataset).__name__}


def write_results(out: Path, res: dict[str, Any], lines: list[str]) -> None:
    """``results.md`` (``lines``) and ``results.json`` (``res``, which gains ``files`` naming both) in ``out``."""
    (out / "results.md").write_text("\n".join(lines) + "\n")
    res["files"] = {"markdown": str(out / "results.md"), "json": str(out / "results.json")}
    (out / "results.json").write_text(json.dumps(res, indent=2, default=str))


def retrieval_table(models: dict[str, dict[str, Any]], ks: Sequence[int] = (1, 5, 10)) -> list[str]:
    """Markdown rows of :func:`retrieval_recall` results, ``{model: {pair: row}}``."""
    cols = [f"{d} R@{k}" for d in ("i2t", "t2i") for k in ks]
    lines = ["| model | token/captions | " + " | ".join(cols) + " | images | texts |"]
    lines.append("|" + "---|" * (len(cols) + 4))
    for name, rows in models.items():
        for pair, r in rows.items():
            if pair.startswith("skipped/"):
                lines.append(f"| {name} | {pair} ({r['reason']}) |" + " |" * len(cols) + f" {r['num']} | |")
                continue
            cells = [f"{r[f'{d}_r{k}']:.1f}" if f"{d}_r{k}" in r else "" for d in ("i2t", "t2i") for k in ks]
            lines.append(
                f"| {name} | {pair} | " + " | ".join(cells) + f" | {r['num']} | {r.get('num_texts', '')} |"
            )
    return lines


def retrieval_report(
    models: dict[str, Any],
    dataset: Any,
    out_dir: str | Path,
    *,
    text_model: Any = None,
    image_size: int = 224,
    ks: Sequence[int] = (1, 5, 10),
    max_images: int | None = None,
    batch_size: int = 32,
    text_batch_size: int = 256,
    num_workers: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Recall@K of every model (each of its global tokens) on a captioned dataset without labels (the images
    of a cache, a caption folder, a Karpathy split); writes ``results.json`` and ``results.md`` to ``out_dir``
    and returns the results (``files`` lists them)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ident = dataset_identity_dict(dataset)
    settings = {
        "image_size": image_size,
        "ks": list(ks),
        "max_images": max_images,
        "preprocess": "short side + centre crop",
    }
    res: dict[str, Any] = {"dataset": ident, "task": "retrieval", "settings": settings, "models": {}}
    memo: dict[Any, torch.Tensor] = {}
    for name, model in models.items():
        logger.info("retrieval: %s", name)
        res["models"][name] = retrieval_recall(
            model, dataset, text_model=text_model, image_size=image_size, ks=ks, max_images=max_images,
            batch_size=batch_size, text_batch_size=text_batch_size, num_workers=num_workers, progress=progress,
            text_memo=memo,
        )  # fmt: skip
    lines = [
        f"# Image-text retrieval: {ident.get('name')} (recall@K, %)",
        "",
        *retrieval_table(res["models"], ks),
    ]
    skipped = ident.get("num_skipped")
    if skipped:
        lines += ["", f"{skipped} image(s) of the split left out (listed in results.json, dataset.skipped)."]
    write_results(out, res, lines)
    return res
