"""``tipsdistill-demo``: the whole pipeline on the embedded benchmark, on CPU, from a fresh clone.

1. **cache** (stage 1): the committed embedded teacher (``build_teacher("embedded")``) encodes the
   synthetic training split once into an HDF5 cache (patch tokens, both CLS tokens, caption text
   embeddings of the three granularities);
2. **distil** (stage 2): a smaller, randomly initialised TIPS-architecture student is trained from
   the cache with the TIPSv2 distillation recipe (``distill``: prototype cross-entropy on **every**
   patch token, mask ratio 0, CLIP against the cached caption embeddings) on whole-image views, so
   its patch targets are the cached teacher tokens themselves (no local crops, hence no DINO term:
   see ``DemoConfig``), DeepSpeed ZeRO-2 in one process;
3. **measure**: zero-shot segmentation of teacher and student on the validation split, same text
   embeddings (the teacher's locked text tower) and same settings: ``whole`` and ``slide``, TIPS
   value-trick and MaskCLIP readouts; mIoU over all 20 classes and over the 14 object classes; plus
   object mIoU by depth for both models. Prints the comparison table and writes ``report.md``,
   ``results.json`` and PNG figures to ``--out``.

    python -m scripts.demo            # about 11 minutes on 2 CPU cores
    python -m scripts.demo --quick    # tiny sizes, under a minute (the test suite runs it)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

logger = logging.getLogger("tipsdistill.demo")

SETTINGS = (("whole", "tips"), ("whole", "maskclip"), ("slide", "tips"), ("slide", "maskclip"))


@dataclass
class DemoConfig:
    """Sizes of one demo run (``FULL`` and ``QUICK`` below)."""

    train_size: int = 10000
    val_size: int = 500
    image_size: int = 64
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 40
    # no local crops, so no DINO CLS term: at this budget it stays at log(K) (learns nothing) and costs
    # a fifth of the step time (docs/embedded.md, section 4); the `distill` recipe keeps it by default
    local_crops: int = 0
    local_size: int = 32
    # area range of the student's global crop. The cache holds the full-image teacher grid; a smaller
    # crop gets roi_align-interpolated teacher tokens as targets, which halves what the student learns
    # of the objects at equal steps (docs/embedded.md, section 4), so the demo trains on whole images
    global_scale: tuple[float, float] = (1.0, 1.0)
    student: dict[str, Any] = field(
        default_factory=lambda: {"embed_dim": 96, "depth": 4, "num_heads": 3, "mlp_ratio": 4.0}
    )
    prototypes: int = 1024
    head_hidden: int = 512
    head_bottleneck: int = 128
    patch_loss: str = "proto"
    mask_ratio: float = 0.0
    teacher_temp: float = 0.07  # prototype-target temperature (DINO/iBOT teacher softmax)
    student_init: str = "random"
    slide_image_size: int = 96
    slide_window: int = 64
    slide_stride: int = 32
    layer_curves: bool = True
    num_examples: int = 4
    seed: int = 0  # training seed (initialisation, batches, crops)
    data_seed: int = 0  # seed of the synthetic scenes (train split cached once, validation split)
    cache_batch: int = 128


FULL = DemoConfig()
QUICK = DemoConfig(
    train_size=48,
    val_size=6,
    steps=3,
    batch_size=8,
    warmup_steps=1,
    student={"embed_dim": 96, "depth": 1, "num_heads": 3, "mlp_ratio": 2.0},
    prototypes=64,
    head_hidden=64,
    head_bottleneck=32,
    num_examples=2,
    cache_batch=16,
)


def _setup_env() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ------------------------------------------------------------------------------------------ stage 1
def stage_cache(
    cfg: DemoConfig, out: Path, teacher_path: str | None, progress: bool = True
) -> dict[str, Any]:
    """Encode the training split with the embedded teacher into ``out/cache``; returns the summary."""
    from cache.extract import extract_features

    kw = {"path": teacher_path} if teacher_path else {}
    summary = extract_features(
        out=str(out / "cache"),
        teacher="embedded",
        teacher_kwargs=kw,
        dataset="synthetic",
        dataset_kwargs={
            "split": "train",
            "size": cfg.train_size,
            "image_size": cfg.image_size,
            "seed": cfg.data_seed,
        },
        image_size=cfg.image_size,
        resize="exact",
        granularities=["alt", "short", "detailed"],
        batch_size=cfg.cache_batch,
        num_workers=0,
        device="cpu",
        progress=progress,
    )
    return summary


# ------------------------------------------------------------------------------------------ stage 2
def run_config_dict(cfg: DemoConfig, out: Path, run_name: str) -> dict[str, Any]:
    """Stage-2 config fields shared by every embedded-benchmark run (student, data, head, optim, engine)."""
    kwargs = {
        "img_size": cfg.image_size,
        "patch_size": 8,
        "reg_tokens": 1,
        "no_embed_class": True,
        "init_values": 1.0,
        **cfg.student,
    }
    return {
        "output_dir": str(out / run_name),
        "seed": cfg.seed,
        "steps": cfg.steps,
        "student": {"name": "vit_base_patch14_reg1_tipsv2", "kwargs": kwargs, "init": cfg.student_init},
        "data": {
            "dataset": "synthetic",
            "dataset_kwargs": {
                "split": "train",
                "size": cfg.train_size,
                "image_size": cfg.image_size,
                "seed": cfg.data_seed,
                "preload": True,  # each image is read several times: render the split once
            },
            "image_size": cfg.image_size,
            "local_crops": cfg.local_crops,
            "local_size": cfg.local_size,
            "flip": False,
            "global_scale": list(cfg.global_scale),
            "batch_size": cfg.batch_size,
            "num_workers": 0,
        },
        "head": {
            "out_dim": cfg.prototypes,
            "hidden_dim": cfg.head_hidden,
            "bottleneck_dim": cfg.head_bottleneck,
        },
        "optim": {"lr": cfg.lr, "warmup_steps": cfg.warmup_steps},
        "engine": {"zero_stage": 2, "precision": "fp32"},
        "checkpoint": {"every": 0, "keep_last": 1},
    }


def train_config(cfg: DemoConfig, out: Path, cache_path: str, run_name: str = "student") -> Any:
    """The stage-2 ``TrainConfig``: recipe ``distill`` sized for the embedded benchmark."""
    from distill.config import load_config

    data = run_config_dict(cfg, out, run_name)
    data["teacher"] = {"source": "cache"}
    data["cache"] = {"path": cache_path}
    data["loss"] = {"patch": cfg.patch_loss, "mask_ratio": cfg.mask_ratio, "teacher_temp": cfg.teacher_temp}
    # captions: the cached teacher embeddings, or the student's own text tower when it has one
    data["loss"]["text_source"] = "student" if cfg.student.get("text") else "cache"
    return load_config("distill", data=data)


def stage_distill(cfg: DemoConfig, out: Path, cache_path: str, run_name: str = "student") -> str:
    """Train the student; returns its export directory."""
    from distill.train import train

    tcfg = train_config(cfg, out, cache_path, run_name)
    res = train(tcfg)
    if not res.get("export"):
        raise RuntimeError(f"training in {out / run_name} finished without an export")
    return str(res["export"])


# ------------------------------------------------------------------------------------------ measure
def seg_settings(cfg: DemoConfig, mode: str, readout: str, layer: int | None = None) -> Any:
    from distill.evaluation import SegmentationSettings

    if mode == "whole":
        return SegmentationSettings(
            image_size=cfg.image_size, mode="whole", readout=readout, layer=layer, resize_backend="torch"
        )
    return SegmentationSettings(
        image_size=cfg.slide_image_size,
        mode="slide",
        window=cfg.slide_window,
        stride=cfg.slide_stride,
        readout=readout,
        layer=layer,
        resize_backend="torch",
    )


def alignment_curve(
    model: Any, dataset: Any, text: Any, settings: Any, progress: bool = False
) -> list[dict[str, Any]]:
    """Zero-shot mIoU (all classes and objects only) of every block of ``model``: ``[{layer, miou, miou_objects}]``."""
    from distill.evaluation import evaluate_segmentation

    rows = []
    for k in range(int(model.num_layers)):
        m = evaluate_segmentation(
            model, dataset, text, settings.replace(layer=k), progress=progress, desc=f"layer {k}"
        )["metrics"]
        rows.append({"layer": k, "miou": m["miou"], "miou_objects": m.get("miou_objects")})
    return rows


def plot_curves(curves: dict[str, list[dict[str, Any]]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, lab in (
        (axes[0], "miou_objects", "object mIoU (%)"),
        (axes[1], "miou", "mIoU, all classes (%)"),
    ):
        for name, rows in curves.items():
            depth = max(len(rows) - 1, 1)
            xs = [r["layer"] / depth for r in rows]
            ax.plot(
                xs, [r[key] if r[key] is not None else float("nan") for r in rows], marker="o", label=name
            )
        ax.set_xlabel("relative depth (block / last block)")
        ax.set_ylabel(lab)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def majority_background_baseline(dataset: Any) -> dict[str, Any]:
    """Metrics of a label-peeking trivial predictor: every pixel gets its image's most frequent background.

    It knows the true background (no model does), so it is the floor a model's all-class mIoU must clear
    before it says anything about objects; its object mIoU is 0 by construction.
    """
    import torch

    from distill.evaluation.metrics import ConfusionMatrix

    C = len(dataset.class_names)
    bg = torch.as_tensor(dataset.background_class_ids)
    cm = ConfusionMatrix(C)
    for i in range(len(dataset)):
        label = dataset[i]["label"]
        counts = torch.bincount(label.flatten(), minlength=C)[bg]
        cm.update(torch.full_like(label, int(bg[counts.argmax()])), label)
    return cm.compute(dataset.class_names, {"objects": dataset.object_class_ids})


def measure(
    cfg: DemoConfig, out: Path, models: dict[str, Any], text_model: Any, progress: bool = True
) -> dict[str, Any]:
    """Evaluate ``models`` with every setting; write per-setting reports, curves and ``results.json``."""
    from cache.synthetic import SyntheticScenes
    from distill.evaluation import compare_models, resolve_class_embeddings

    val = SyntheticScenes("validation", size=cfg.val_size, image_size=cfg.image_size, seed=cfg.data_seed)
    results: dict[str, Any] = {"settings": {}, "table": [], "curves": {}}
    base = majority_background_baseline(val)
    results["baseline"] = {
        "name": "every pixel = the image's majority background (peeks at the labels)",
        "miou": base["miou"],
        "miou_objects": base.get("miou_objects") or 0.0,
        "pixel_accuracy": base["pixel_accuracy"],
    }
    for mode, readout in SETTINGS:
        s = seg_settings(cfg, mode, readout)
        res = compare_models(
            models,
            val,
            s,
            out / f"eval_{mode}_{readout}",
            text_model=text_model,
            num_examples=cfg.num_examples if (mode, readout) == ("whole", "maskclip") else 0,
            num_pca=2 if (mode, readout) == ("whole", "maskclip") else 0,
            cache_dir=None,
            progress=progress,
        )
        results["settings"][f"{mode}/{readout}"] = s.to_dict()
        for name, r in res["models"].items():
            m = r["metrics"]
            results["table"].append(
                {
                    "model": name,
                    "mode": mode,
                    "readout": readout,
                    "miou": m["miou"],
                    "miou_objects": m.get("miou_objects"),
                    "miou_background": m.get("miou_background"),
                    "pixel_accuracy": m["pixel_accuracy"],
                    "per_class_iou": m["per_class_iou"],
                }
            )
        results.setdefault("files", {})[f"{mode}/{readout}"] = res["files"]
    if cfg.layer_curves:
        classes = val.class_names
        text = resolve_class_embeddings(classes, text_model=text_model, templates="tcl", cache_dir=None)
        for readout in ("tips", "maskclip"):
            s = seg_settings(cfg, "whole", readout)
            curves = {name: alignment_curve(m, val, text, s) for name, m in models.items()}
            results["curves"][readout] = curves
            plot_curves(
                curves,
                out / f"layer_curve_{readout}.png",
                f"zero-shot mIoU by depth (whole, {readout} readout)",
            )
    return results


def format_table(results: dict[str, Any]) -> str:
    rows = results["table"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    lines = [
        "| setting | " + " | ".join(f"{m} mIoU | {m} obj mIoU" for m in models) + " |",
        "|---|" + "---|" * (2 * len(models)),
    ]
    for mode, readout in SETTINGS:
        cells = []
        for m in models:
            r = next(
                (x for x in rows if x["model"] == m and x["mode"] == mode and x["readout"] == readout), None
            )
            cells += [_f(r and r["miou"]), _f(r and r["miou_objects"])]
        lines.append(f"| {mode} / {readout} | " + " | ".join(cells) + " |")
    if "baseline" in results:
        b = results["baseline"]
        lines += ["", f"Baseline, {b['name']}: mIoU {_f(b['miou'])}, obj mIoU {_f(b['miou_objects'])}"]
    for readout, curves in results.get("curves", {}).items():
        lines += ["", f"Object mIoU by block (whole, {readout}):"]
        for name, c in curves.items():
            lines.append(f"  {name:8s} " + " ".join(_f(r["miou_objects"]) for r in c))
    return "\n".join(lines)


def _f(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{float(v):.1f}"


def all_finite(results: dict[str, Any]) -> bool:
    vals = [r[k] for r in results["table"] for k in ("miou", "miou_objects", "pixel_accuracy")]
    vals += [
        r["miou_objects"] for c in results.get("curves", {}).values() for rows in c.values() for r in rows
    ]
    return all(v is not None and math.isfinite(float(v)) for v in vals)


# ------------------------------------------------------------------------------------------ driver
def run(cfg: DemoConfig, out: Path, teacher_path: str | None = None, progress: bool = True) -> dict[str, Any]:
    import torch

    import teachers.embedded  # noqa: F401  (registers "embedded")
    from students import Student  # noqa: F401  (fail early with a clear import error)
    from teachers import build_teacher

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t0 = time.time()
    logger.info("stage 1: caching the embedded teacher's features of %d images", cfg.train_size)
    summary = stage_cache(cfg, out, teacher_path, progress=progress)
    cache_path = summary.get("index") or str(out / "cache")
    times["cache_s"] = time.time() - t0
    t1 = time.time()
    logger.info(
        "stage 2: distilling a %s student for %d steps (DeepSpeed ZeRO-2, one process)",
        cfg.student,
        cfg.steps,
    )
    export = stage_distill(cfg, out, cache_path)
    times["distill_s"] = time.time() - t1
    t2 = time.time()
    from students import load_student

    teacher = build_teacher("embedded", **({"path": teacher_path} if teacher_path else {}))
    student = load_student(export)
    logger.info("measuring zero-shot segmentation on %d validation images", cfg.val_size)
    results = measure(
        cfg, out, {"teacher": teacher, "student": student}, text_model=teacher, progress=progress
    )
    times["measure_s"] = time.time() - t2
    times["total_s"] = time.time() - t0
    results.update(
        {
            "config": asdict(cfg),
            "times": times,
            "teacher": teacher.identity(),
            "student_export": export,
            "cache": cache_path,
        }
    )
    table = format_table(results)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "report.md").write_text(
        "# Embedded benchmark: teacher vs distilled student\n\n"
        f"Validation: synthetic/validation, {cfg.val_size} images, {cfg.image_size} px; text: the teacher's "
        "locked text tower with the 9 TCL templates.\n\n" + table + "\n\n"
        f"Times (s): {json.dumps({k: round(v, 1) for k, v in times.items()})}\n"
    )
    print(table)
    print(f"\nreport: {out / 'report.md'}  (total {times['total_s'] / 60:.1f} min)")
    return results


def main(argv: list[str] | None = None) -> int:
    _setup_env()
    ap = argparse.ArgumentParser(description="Embedded benchmark: cache -> distil -> measure (CPU).")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (under a minute), for tests")
    ap.add_argument("--out", default=None, help="output folder (default runs/demo or runs/demo-quick)")
    ap.add_argument("--teacher-path", default=None, help="teacher folder (default: the committed checkpoint)")
    ap.add_argument("--steps", type=int, default=None, help="override the number of distillation steps")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = QUICK if args.quick else FULL
    if args.steps is not None:
        cfg = replace(cfg, steps=args.steps)
    if args.seed is not None:
        cfg = replace(cfg, seed=args.seed)
    out = Path(args.out or ("runs/demo-quick" if args.quick else "runs/demo"))
    results = run(cfg, out, args.teacher_path, progress=not args.no_progress)
    if not all_finite(results):
        print("error: some measured numbers are not finite; see results.json", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
