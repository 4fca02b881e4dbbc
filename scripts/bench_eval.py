"""Benchmark zero-shot segmentation speed: images/s one by one against batched (and bf16), in one run.

A random-init TIPSv2-architecture student (``students.build_student``, ``--dim``/``--depth``, patch 14)
is evaluated by :func:`distill.evaluation.segmentation.evaluate_segmentation` on generated images
(random pixels and labels, three shapes in turn as a benchmark's landscape / portrait / square
photos, held in memory so decoding is not timed) against random class embeddings of its width.
Configurations, each in whole and slide mode, measured after one warm-up pass, best of ``--repeats``
rounds (round robin over the configurations, so a slow spell of a shared machine hits all of them):

- ``one-by-one``: ``image_batch=1, window_batch=1`` (one image, one window per forward);
- ``before``: ``image_batch=1, window_batch=8`` (the evaluation before batched images: one image at a
  time, its windows in forwards of 8);
- ``batched``: ``image_batch=--image-batch, window_batch=--window-batch`` (the new default: same-size
  images share forwards in whole mode, windows of several images in slide mode);
- ``batched+bf16``: the same under bfloat16 autocast (``--amp``; on the GPU by default).

Prints images/s, the ratios against ``one-by-one`` and ``before``, and whether the float32
configurations gave the same confusion matrix; writes ``bench_eval.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch


class MemoryDataset(torch.utils.data.Dataset):
    """Generated labelled images in memory: ``(3, H, W)`` in [0, 1] and ``(H, W)`` labels, three shapes."""

    def __init__(self, n: int, size: int, num_classes: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        long = size * 4 // 3
        shapes = [(size, long), (long, size), (size, size)]
        self.items = []
        for i in range(n):
            h, w = shapes[i % 3]
            label = torch.randint(0, num_classes, (h // 14 + 1, w // 14 + 1), generator=g)
            label = label.repeat_interleave(14, 0).repeat_interleave(14, 1)[:h, :w]
            self.items.append(
                {"key": str(i), "image": torch.rand(3, h, w, generator=g), "captions": {}, "label": label}
            )
        self.class_names = [f"class {c}" for c in range(num_classes)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]

    def identity(self) -> dict[str, Any]:
        return {"name": "generated", "num_images": len(self)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda")
    p.add_argument("--images", type=int, default=24, help="generated images")
    p.add_argument("--image-size", type=int, default=224, help="short side of the images (no resize)")
    p.add_argument("--window", type=int, default=224, help="slide window (stride = 3/4 of it, as 448/336)")
    p.add_argument("--dim", type=int, default=192, help="student width")
    p.add_argument("--depth", type=int, default=6, help="student blocks")
    p.add_argument("--classes", type=int, default=150, help="classes (ADE150: 150)")
    p.add_argument("--image-batch", type=int, default=8)
    p.add_argument("--window-batch", type=int, default=8)
    p.add_argument(
        "--amp", choices=["auto", "on", "off"], default="auto", help="the bf16 row: auto = on the GPU only"
    )
    p.add_argument("--repeats", type=int, default=3, help="timed rounds over the configurations (best kept)")
    p.add_argument("--out", default="bench_eval_out")
    return p


def evaluate_once(model, ds, text, settings, device: str) -> tuple[float, torch.Tensor]:  # noqa: ANN001
    """Seconds of one evaluation of every image, and its confusion matrix."""
    from tipsdistill.distill.evaluation.segmentation import evaluate_segmentation

    t0 = time.perf_counter()
    res = evaluate_segmentation(model, ds, text, settings, progress=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0, res["confusion_matrix"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tipsdistill.distill.evaluation import ClassEmbeddings, SegmentationSettings
    from tipsdistill.students import build_student

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    amp = args.amp == "on" or (args.amp == "auto" and device.startswith("cuda"))
    torch.manual_seed(0)
    heads = max(1, args.dim // 64)
    model = (
        build_student(
            "vit_base_patch14_reg1_tipsv2",
            embed_dim=args.dim,
            depth=args.depth,
            num_heads=heads,
            img_size=args.window,
        )
        .to(device)
        .eval()
    )
    ds = MemoryDataset(args.images, args.image_size, args.classes)
    g = torch.Generator().manual_seed(1)
    text = ClassEmbeddings(
        torch.randn(args.classes, model.text_dim, generator=g),
        torch.arange(args.classes),
        [[n] for n in ds.class_names],
    )
    base = SegmentationSettings(image_size=None, window=args.window, stride=args.window * 3 // 4)
    configs = {
        "one-by-one": {"image_batch": 1, "window_batch": 1},
        "before": {"image_batch": 1, "window_batch": 8},
        "batched": {"image_batch": args.image_batch, "window_batch": args.window_batch},
    }
    if amp:
        configs["batched+bf16"] = {**configs["batched"], "amp": "bf16"}
    rows = []
    for mode in ("whole", "slide"):
        runs = {name: base.replace(mode=mode, **kw) for name, kw in configs.items()}
        mats = {name: evaluate_once(model, ds, text, s, device)[1] for name, s in runs.items()}  # warm-up
        best = {name: float("inf") for name in runs}
        for _ in range(args.repeats):  # round robin: a slower spell of a shared machine hits every config
            for name, s in runs.items():
                best[name] = min(best[name], evaluate_once(model, ds, text, s, device)[0])
        for name, kw in configs.items():
            rows.append(
                {
                    "mode": mode,
                    "config": name,
                    **kw,
                    "seconds": best[name],
                    "images_per_s": len(ds) / best[name],
                    "same_confusion_matrix": bool(torch.equal(mats[name], mats["one-by-one"])),
                }
            )
    per_mode = {
        m: {r["config"]: r["images_per_s"] for r in rows if r["mode"] == m} for m in ("whole", "slide")
    }
    for r in rows:
        r["x_one_by_one"] = r["images_per_s"] / per_mode[r["mode"]]["one-by-one"]
        r["x_before"] = r["images_per_s"] / per_mode[r["mode"]]["before"]
    dev_name = torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or "cpu"
    print(
        f"device {device} ({dev_name}), torch threads {torch.get_num_threads()}; student {args.depth} blocks x "
        f"{args.dim}, patch 14; {len(ds)} images, short side {args.image_size}; {args.classes} classes; window "
        f"{args.window} stride {base.stride}"
    )
    print("| mode | config | image_batch | window_batch | images/s | x one-by-one | x before | same matrix |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        same = "yes" if r["same_confusion_matrix"] else ("no (bf16)" if r.get("amp") else "NO")
        print(
            f"| {r['mode']} | {r['config']} | {r['image_batch']} | {r['window_batch']} | {r['images_per_s']:.2f} | "
            f"{r['x_one_by_one']:.2f} | {r['x_before']:.2f} | {same} |"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_eval.json").write_text(
        json.dumps({"args": vars(args), "device": device, "device_name": dev_name, "rows": rows}, indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
