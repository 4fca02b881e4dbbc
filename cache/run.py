"""Stage 1, the teacher run loop: decode, run the teacher, encode, hand the rows to the writer.

DataLoader workers (:class:`ViewItems`, ``forkserver`` by default, each following the main process:
:func:`follow_main_process`) decode, resize and cut the views of one write block per batch;
:func:`teacher_forward` runs the teacher on the device, :func:`encode_batch` adds the caption
embeddings, projects onto the PCA basis and encodes to the storage dtype, and :func:`extract_blocks`
submits each block to the :class:`~cache.writer.ShardWriter` thread (non-finite samples become skipped
rows, never stored ones). What to write, and the writer itself, come from the caller
(:mod:`cache.commit`).
"""

from __future__ import annotations

import functools
import logging
import os
import select
import threading
import time
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from tqdm import tqdm

from .datasets import BadImageError, resize_image
from .format import Layout
from .locations import SourceUnavailableError
from .plan import ShardPlan, ShardState
from .views import ViewSpec, apply_view, sample_views
from .writer import ShardWriter, WriteBatch, nonfinite_rows, quantise_int8_torch, sample_stats

logger = logging.getLogger(__name__)


class ViewItems(Dataset):
    """Runs in the DataLoader workers: decode, resize to the cache's rule, cut the views."""

    def __init__(
        self, ds: Dataset, size: tuple[int, int], resize: str, spec: ViewSpec, min_side: int
    ) -> None:
        self.ds, self.size, self.resize, self.spec, self.min_side = ds, size, resize, spec, min_side

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            item = self.ds[index]
            image = item["image"]
            if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
                raise BadImageError(
                    f"dataset item image is not a (3, H, W) tensor: {getattr(image, 'shape', image)}",
                    "corrupt",
                )
            if min(image.shape[-2:]) < self.min_side:
                raise BadImageError(
                    f"image is {image.shape[-1]}x{image.shape[-2]} px, smaller than one patch ({self.min_side} px)",
                    "too_small",
                )
            base = resize_image(image.float(), self.size, self.resize)
        except BadImageError as e:
            return {"index": index, "error": str(e), "kind": e.kind}
        except SourceUnavailableError:  # the data source is down, not this sample: the run stops (resumable)
            raise
        except Exception as e:  # noqa: BLE001 - whatever one sample raises is that sample's problem, not the run's
            logger.warning("sample %d: %s: %s", index, type(e).__name__, e)
            return {"index": index, "error": f"{type(e).__name__}: {e}", "kind": "error"}
        boxes, flips = sample_views(self.spec, index, *self.size)
        if self.spec.num_views == 1 and not flips[0] and tuple(boxes[0]) == (0.0, 0.0, 1.0, 1.0):
            views = base[None]
        else:
            views = torch.stack([apply_view(base, b, bool(f), self.size) for b, f in zip(boxes, flips)])
        caps = item.get("captions") or {}
        return {
            "index": index,
            "views": views,
            "boxes": boxes,
            "flips": flips,
            "captions": caps,
            "error": None,
        }


def collate_views(items: list[dict[str, Any]]) -> dict[str, Any]:
    """:class:`ViewItems` -> one batch: ``views (B, V, 3, H, W)``, ``boxes``, ``flips``, ``captions`` of the
    decoded items, ``index`` theirs, ``bad`` ``[(index, error, kind)]`` of the others."""
    good = [it for it in items if it["error"] is None]
    bad = [(it["index"], it["error"], it["kind"]) for it in items if it["error"] is not None]
    out: dict[str, Any] = {"bad": bad, "index": [it["index"] for it in good]}
    if good:
        out["views"] = torch.stack([it["views"] for it in good])
        out["boxes"] = np.stack([it["boxes"] for it in good])
        out["flips"] = np.stack([it["flips"] for it in good])
        out["captions"] = [it["captions"] for it in good]
    return out


def todo_blocks(plan: ShardPlan, layout: Layout, done: np.ndarray) -> list[tuple[int, list[int]]]:
    """``[(block, dataset indices)]`` of the write blocks with at least one row not done."""
    B, start, count = layout.block_size, plan.start, plan.count
    blocks = [
        (b, list(range(start + b * B, start + min((b + 1) * B, count))))
        for b in range(layout.num_blocks)
        if b * B < count
    ]
    return [(b, idx) for b, idx in blocks if not done[b * B : b * B + len(idx)].all()]


def follow_main_process(main_pid: int, worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: end this worker as soon as the run's main process ends.

    torch's workers watch their parent, and under ``forkserver`` / ``spawn`` that parent is the fork
    server, not the run: after a ``kill -9`` of the main process alone (the OOM killer) they would
    wait on their queues forever, each holding its memory, and keep the fork server alive. A pidfd
    of the main process becomes readable when it exits; a daemon thread waits on it."""
    try:
        fd = os.pidfd_open(main_pid)
    except ProcessLookupError:
        os._exit(0)  # the run is already gone
    except (AttributeError, OSError):  # no pidfd (not Linux >= 5.3): torch's own watchdog only
        logger.debug("worker %d: no pidfd_open, cannot follow the main process %d", worker_id, main_pid)
        return

    def wait() -> None:
        select.select([fd], [], [])
        os._exit(0)

    threading.Thread(target=wait, name="follow-main-process", daemon=True).start()


class _Fetched(Dataset):
    """The rows a stream has read, by dataset index: the item, or the error that makes it a skipped row."""

    def __init__(self, rows: dict[int, Any], n: int) -> None:
        self.rows, self.n = rows, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Any]:
        got = self.rows[index]
        if isinstance(got, Exception):
            raise got
        return got


class StreamedBlocks(IterableDataset):
    """The loader of a streaming source (a dataset with ``iter_rows(indices)``, e.g.
    :class:`cache.hf_stream.HFStreamingDataset`): each DataLoader worker takes a contiguous run of the write
    blocks to do, reads their rows in order (only the row groups that hold them) and yields one batch per
    block, as :func:`collate_views` makes it, with its ``block`` number."""

    def __init__(self, items: ViewItems, todo: list[tuple[int, list[int]]]) -> None:
        self.items, self.todo = items, todo

    def __iter__(self) -> Any:
        info = get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = self.todo[len(self.todo) * w // n : len(self.todo) * (w + 1) // n]
        stream = self.items.ds.iter_rows([i for _, idx in mine for i in idx])
        for block, idx in mine:
            rows = dict(next(stream) for _ in idx)
            view = ViewItems(_Fetched(rows, len(self.items)), self.items.size, self.items.resize, self.items.spec,
                             self.items.min_side)  # fmt: skip
            batch = collate_views([view[i] for i in idx])
            batch["block"] = block
            yield batch


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


def make_loader(plan: ShardPlan, todo: list[tuple[int, list[int]]]) -> DataLoader:
    """Decode, resize and cut views in worker processes, one batch per write block (for a streaming source,
    :class:`StreamedBlocks`: batches come with their ``block`` number, in no fixed order)."""
    cfg = plan.config
    items = ViewItems(plan.dataset, plan.size, cfg.resize, plan.spec, plan.min_side)
    streamed = callable(getattr(plan.dataset, "iter_rows", None))
    return DataLoader(
        StreamedBlocks(items, todo) if streamed else items,
        batch_size=None if streamed else 1,
        batch_sampler=None if streamed else [idx for _, idx in todo],
        num_workers=cfg.num_workers,
        collate_fn=_as_is if streamed else collate_views,
        pin_memory=plan.device.type == "cuda",
        prefetch_factor=4 if cfg.num_workers > 0 else None,
        multiprocessing_context=cfg.worker_start if cfg.num_workers > 0 else None,
        worker_init_fn=functools.partial(follow_main_process, os.getpid()),
    )


def embed_captions(
    plan: ShardPlan, layout: Layout, captions: list[dict[str, str]], g: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Granularity ``g`` of a batch's captions -> ``(emb (B, Dt), valid (B,))``; each distinct caption
    is encoded once (short captions repeat a lot); missing or blank captions get zeros, valid False."""
    device, nb = plan.device, len(captions)
    texts = [c.get(g) for c in captions]
    ok = [isinstance(t, str) and t.strip() != "" for t in texts]
    emb = torch.zeros(nb, layout.text_dim, device=device)
    if any(ok):
        kept = [t for t, o in zip(texts, ok) if o]
        uniq = list(dict.fromkeys(kept))
        enc = plan.teacher.encode_text(uniq).float()
        pos = {t: i for i, t in enumerate(uniq)}
        which = torch.tensor([pos[t] for t in kept], device=enc.device)
        emb[torch.tensor(ok, device=device)] = enc[which].to(device)
    return emb, torch.tensor(ok)


def teacher_forward(plan: ShardPlan, layout: Layout, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Teacher forward of one batch (on ``plan.device``, inference mode): ``batch["views"] (B, V, 3, H, W)``
    -> ``patch (B, [V,] h*w, D)``, ``cls (B, [V,] C, D)``, optional ``value_patch``, as computed."""
    cfg, dim, C = plan.config, layout.dim, layout.num_global_tokens
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.autocast)
    views = batch["views"].to(plan.device, non_blocking=True)
    nb, V = views.shape[:2]
    arrays: dict[str, torch.Tensor] = {}
    with (
        torch.inference_mode(),
        torch.autocast(
            plan.device.type,
            dtype=amp or torch.float32,
            enabled=amp is not None and plan.device.type == "cuda",
        ),
    ):
        feats = plan.teacher.encode_image(
            views.flatten(0, 1),
            value_trick=cfg.value_trick,
            value_readout=cfg.value_readout,
            layer=cfg.layer,
        )
        vshape = (nb, V) if cfg.views > 1 else (nb,)
        arrays["patch"] = feats.patch.reshape(*vshape, -1, dim)
        arrays["cls"] = feats.cls.reshape(*vshape, C, dim)
        if cfg.value_trick:
            arrays["value_patch"] = feats.value_patch.reshape(*vshape, -1, dim)
    return arrays


def encode_batch(plan: ShardPlan, state: ShardState, batch: dict[str, Any]) -> dict[str, np.ndarray]:
    """Teacher forward of one batch -> the arrays of a :class:`WriteBatch`, in the storage dtype.

    ``batch["views"] (B, V, 3, H, W)`` -> ``patch (B, [V,] h*w, D)`` (``(..., K)`` PCA coefficients
    with ``reduce_dim K``), ``cls (B, [V,] C, D)``, optional ``value_patch``, ``text/<g> (B, Dt)``,
    ``text_valid/<g> (B,)``, ``_stats (B, 2 + 2C, D)`` (of the full-dimension features)."""
    cfg = plan.config
    arrays = teacher_forward(plan, state.layout, batch)
    with torch.inference_mode():
        for g in plan.granularities:
            arrays[f"text/{g}"], arrays[f"text_valid/{g}"] = embed_captions(
                plan, state.layout, batch["captions"], g
            )
        arrays["_stats"] = sample_stats(arrays["patch"], arrays["cls"])
        if state.reduction is not None:  # PCA coefficients, on the device, before the storage dtype
            for k in plan.reduction_names():
                arrays[k] = state.reduction.project(k, arrays[k])
        # encode to the storage dtype here, once per batch, vectorised (on the GPU when there is one:
        # halves / quarters the copy to the host); the writer thread then only writes
        for k in ("patch", "cls", "value_patch"):
            if k in arrays:
                if cfg.storage == "int8":
                    arrays[k], arrays[k + "_scale"] = quantise_int8_torch(arrays[k])
                else:
                    arrays[k] = arrays[k].half()
        for g in plan.granularities:
            arrays[f"text/{g}"] = arrays[f"text/{g}"].half()
    out = {k: (v.float() if v.dtype == torch.bfloat16 else v).cpu().numpy() for k, v in arrays.items()}
    if cfg.views > 1:
        out["boxes"], out["flips"] = batch["boxes"], batch["flips"]
    return out


def extract_blocks(
    plan: ShardPlan, state: ShardState, writer: ShardWriter, todo: list[tuple[int, list[int]]], bar: tqdm
) -> None:
    """The loop: load a block, run the teacher, hand the arrays to the writer thread; always drains
    and closes the writer (re-raising its error)."""
    start = plan.start
    t_loop = time.perf_counter()
    try:
        for i, batch in enumerate(make_loader(plan, todo)):
            block = batch.pop("block", todo[i][0])
            rows = np.asarray(batch["index"], np.int64) - start
            skipped = [(i - start, f"{kind}: {err}") for i, err, kind in batch["bad"]]
            arrays: dict[str, np.ndarray] = {}
            if len(rows):
                t0 = time.perf_counter()
                arrays = encode_batch(plan, state, batch)
                writer.forward_seconds += time.perf_counter() - t0
                rows, arrays = _drop_nonfinite(rows, arrays, skipped, start)
            writer.submit(WriteBatch(block=block, rows=rows, arrays=arrays, skipped=skipped))
            bar.update(len(rows) + len(skipped))
            el = max(time.perf_counter() - t_loop, 1e-9)
            bar.set_postfix_str(f"{writer.bytes_written / el / 2**20:.1f} MB/s", refresh=False)
    finally:
        bar.close()
        writer.close()


def _drop_nonfinite(
    rows: np.ndarray, arrays: dict[str, np.ndarray], skipped: list[tuple[int, str]], start: int
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Leave out the samples whose stored values would not be finite (NaN/inf from the teacher, or beyond
    float16's range): each becomes a skipped row (``nonfinite``) naming the fields, never a stored one."""
    bad, which = nonfinite_rows(arrays)
    if not bad.any():
        return rows, arrays
    for pos in np.flatnonzero(bad).tolist():
        skipped.append(
            (
                int(rows[pos]),
                f"nonfinite: the teacher's {', '.join(which[pos])} hold NaN/inf (or exceed the storage dtype's "
                "range, float16: 65504); not stored",
            )
        )
        logger.warning("sample %d: non-finite %s; skipped", int(rows[pos]) + start, ", ".join(which[pos]))
    keep = ~bad
    return rows[keep], {k: (v[keep] if getattr(v, "ndim", 0) else v) for k, v in arrays.items()}
