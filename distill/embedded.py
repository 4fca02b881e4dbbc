"""The embedded benchmark: cache -> distil -> measure, on CPU, with the committed embedded teacher.

1. **cache** (stage 1): the embedded teacher (``build_teacher("embedded")``) encodes the synthetic
   training split once into an HDF5 cache (patch tokens, both CLS tokens, caption text embeddings of
   the three granularities);
2. **distil** (stage 2): the recipe ``distill/recipes/embedded.yaml`` (``tipsdistill-train --recipe
   embedded``: the TIPSv2 distillation objectives sized for CPU) plus dotted overrides;
3. **measure**: zero-shot segmentation of the models on the validation split, same text embeddings
   and same settings (``whole`` and ``slide``, TIPS value-trick and MaskCLIP readouts; mIoU over all
   classes and over the objects) and object mIoU by depth.

:class:`DemoConfig` holds what is not a stage-2 setting (how many images are cached and measured,
their size and seed, the slide window, the figures) and the stage-2 overrides of a preset
(:data:`QUICK`). ``scripts/demo.py`` and ``scripts/experiments.py`` are the command lines.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import tipsdistill.teachers.embedded  # noqa: F401  (registers the "embedded" teacher)
from tipsdistill.cache import extract_features
from tipsdistill.cache.synthetic import SyntheticScenes
from tipsdistill.students import load_student
from tipsdistill.teachers import build_teacher

from .config import TrainConfig, config_to_dict, load_config
from .evaluation import (
    ConfusionMatrix,
    SegmentationSettings,
    compare_models,
    layer_curve,
    resolve_class_embeddings,
)
from .evaluation.report import plot_layer_curve
from .train import train

logger = logging.getLogger(__name__)

RECIPE = "embedded"
SETTINGS = (("whole", "tips"), ("whole", "maskclip"), ("slide", "tips"), ("slide", "maskclip"))
# settings of the embedded recipe a pretraining run takes (every other one is the pretraining recipe's)
PRETRAIN_SIZE_KEYS = (
    "seed",
    "steps",
    "student",
    "data.dataset",
    "data.dataset_kwargs",
    "data.image_size",
    "data.local_crops",
    "data.local_size",
    "data.flip",
    "data.global_scale",
    "data.batch_size",
    "data.num_workers",
    "head.out_dim",
    "head.hidden_dim",
    "head.bottleneck_dim",
    "optim.lr",
    "optim.warmup_steps",
    "engine.zero_stage",
    "engine.precision",
    "checkpoint.every",
    "checkpoint.keep_last",
    "loss.patch",
    "loss.text_source",
)
NO_CACHE = "(pretraining: no cache)"


@dataclass(frozen=True)
class DemoConfig:
    """One embedded-benchmark run: the sizes that are not stage-2 settings, and stage-2 overrides.

    ``train_size``, ``image_size`` and ``data_seed`` are used by stage 1 *and* stage 2 (they become
    ``data.dataset_kwargs`` / ``data.image_size`` / ``student.kwargs.img_size`` overrides, so the
    cache and the training data always agree); ``overrides`` are dotted stage-2 ``key=value`` pairs
    applied on top of ``recipe`` (see ``distill/recipes/embedded.yaml``).
    """

    train_size: int = 10000  # synthetic training images, cached once
    val_size: int = 500  # validation images measured
    image_size: int = 64
    data_seed: int = 0  # seed of the synthetic scenes (train split cached once, validation split)
    cache_batch: int = 128
    slide_image_size: int = 96
    slide_window: int = 64
    slide_stride: int = 32
    layer_curves: bool = True
    num_examples: int = 4
    recipe: str = RECIPE
    overrides: tuple[str, ...] = field(default_factory=tuple)

    def with_overrides(self, *overrides: str) -> DemoConfig:
        """A copy with ``overrides`` appended (later ones win)."""
        return DemoConfig(**{**asdict(self), "overrides": (*self.overrides, *overrides)})


FULL = DemoConfig()
QUICK = DemoConfig(
    train_size=48,
    val_size=6,
    num_examples=2,
    cache_batch=16,
    overrides=(
        "steps=3",
        "data.batch_size=8",
        "optim.warmup_steps=1",
        "student.kwargs.depth=1",
        "student.kwargs.mlp_ratio=2.0",
        "head.out_dim=64",
        "head.hidden_dim=64",
        "head.bottleneck_dim=32",
    ),
)


# ------------------------------------------------------------------------------------------ stage 1
def stage_cache(
    cfg: DemoConfig, out: Path, teacher_path: str | None, progress: bool = True, **cache_overrides: Any
) -> dict[str, Any]:
    """Encode the training split with the embedded teacher into ``out/cache``; returns the summary.
    ``cache_overrides``: further :class:`cache.CacheConfig` fields (e.g. ``storage="int8"``, ``reduce_dim=24``)."""
    return extract_features(
        out=str(out / "cache"),
        teacher="embedded",
        teacher_kwargs={"path": teacher_path} if teacher_path else {},
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
        **cache_overrides,
    )


# ------------------------------------------------------------------------------------------ stage 2
def size_overrides(cfg: DemoConfig) -> list[str]:
    """The stage-2 overrides that make the training data the images stage 1 cached."""
    return [
        f"data.dataset_kwargs.size={cfg.train_size}",
        f"data.dataset_kwargs.image_size={cfg.image_size}",
        f"data.dataset_kwargs.seed={cfg.data_seed}",
        f"data.image_size={cfg.image_size}",
        f"student.kwargs.img_size={cfg.image_size}",
    ]


def train_config(
    cfg: DemoConfig,
    out: Path,
    cache_path: str,
    run_name: str = "student",
    overrides: Sequence[str] = (),
) -> TrainConfig:
    """The stage-2 config of one run: ``cfg.recipe``, the sizes of ``cfg``, ``cfg.overrides``, then
    ``overrides``; written to ``out/run_name``, reading the stage-1 cache ``cache_path``."""
    paths = {"output_dir": str(out / run_name), "cache": {"path": cache_path}}
    return load_config(cfg.recipe, [*size_overrides(cfg), *cfg.overrides, *overrides], data=paths)


def _pick(tree: dict[str, Any], dotted: str) -> dict[str, Any]:
    """``{"a": {"b": tree["a"]["b"]}}`` for ``dotted="a.b"``."""
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        node = node[p]
    out: dict[str, Any] = {leaf: node[leaf]}
    for p in reversed(parents):
        out = {p: out}
    return out


def _deep_update(base: dict[str, Any], upd: dict[str, Any]) -> dict[str, Any]:
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v
    return base


def pretrain_config(
    cfg: DemoConfig, out: Path, recipe: str, run_name: str, overrides: Sequence[str] = ()
) -> TrainConfig:
    """A pretraining recipe (no teacher, no cache) at the embedded benchmark's sizes.

    The run takes :data:`PRETRAIN_SIZE_KEYS` of the embedded run's resolved config (student, data
    sizes and views, head sizes, lr and warm-up, engine, checkpoints, patch loss, caption source:
    ``loss.text_source=student`` with ``student.kwargs.text``, as there is no cache); losses, EMA and
    schedules stay the pretraining recipe's, its teacher-temperature warm-up scaled to the same
    fraction of the steps."""
    sized = config_to_dict(train_config(cfg, out, NO_CACHE, run_name, overrides))
    data: dict[str, Any] = {"output_dir": sized["output_dir"]}
    for key in PRETRAIN_SIZE_KEYS:
        _deep_update(data, _pick(sized, key))
    base = load_config(recipe)
    warmup = round(sized["steps"] * base.loss.teacher_temp_warmup_steps / base.steps)
    data["loss"]["teacher_temp_warmup_steps"] = warmup
    return load_config(recipe, data=data)


def stage_distill(tcfg: TrainConfig) -> str:
    """Train ``tcfg``; returns the student's export directory."""
    res = train(tcfg)
    if not res.get("export"):
        raise RuntimeError(f"training in {tcfg.output_dir} finished without an export")
    return str(res["export"])


# ------------------------------------------------------------------------------------------ measure
def seg_settings(cfg: DemoConfig, mode: str, readout: str, layer: int | None = None) -> SegmentationSettings:
    """The benchmark's zero-shot segmentation settings: ``whole`` at the training size, or ``slide``."""
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


def validation_split(cfg: DemoConfig) -> SyntheticScenes:
    return SyntheticScenes("validation", size=cfg.val_size, image_size=cfg.image_size, seed=cfg.data_seed)


def majority_background_baseline(dataset: Any) -> dict[str, Any]:
    """Metrics of a label-peeking trivial predictor: every pixel gets its image's most frequent background.

    It knows the true background (no model does), so it is the floor a model's all-class mIoU must clear
    before it says anything about objects; its object mIoU is 0 by construction.
    """
    C = len(dataset.class_names)
    bg = torch.as_tensor(dataset.background_class_ids)
    cm = ConfusionMatrix(C)
    for i in range(len(dataset)):
        label = dataset[i]["label"]
        counts = torch.bincount(label.flatten(), minlength=C)[bg]
        cm.update(torch.full_like(label, int(bg[counts.argmax()])), label)
    return cm.compute(dataset.class_names, {"objects": dataset.object_class_ids})


def _table_rows(res: dict[str, Any], mode: str, readout: str) -> list[dict[str, Any]]:
    rows = []
    for name, r in res["models"].items():
        m = r["metrics"]
        rows.append(
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
    return rows


def measure(
    cfg: DemoConfig, out: Path, models: dict[str, Any], text_model: Any, progress: bool = True
) -> dict[str, Any]:
    """Evaluate ``models`` with every setting; write per-setting reports, curves and ``results.json``."""
    val = validation_split(cfg)
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
        figures = (mode, readout) == ("whole", "maskclip")
        res = compare_models(
            models,
            val,
            s,
            out / f"eval_{mode}_{readout}",
            text_model=text_model,
            num_examples=cfg.num_examples if figures else 0,
            num_pca=2 if figures else 0,
            cache_dir=None,
            progress=progress,
        )
        results["settings"][f"{mode}/{readout}"] = s.to_dict()
        results["table"] += _table_rows(res, mode, readout)
        results.setdefault("files", {})[f"{mode}/{readout}"] = res["files"]
    if cfg.layer_curves:
        text = resolve_class_embeddings(
            val.class_names, text_model=text_model, templates="tcl", cache_dir=None
        )
        for readout in ("tips", "maskclip"):
            s = seg_settings(cfg, "whole", readout)
            curves = {name: layer_curve(m, val, text, s, "all", progress=False) for name, m in models.items()}
            results["curves"][readout] = curves
            plot_layer_curve(
                curves,
                out / f"layer_curve_{readout}.png",
                f"zero-shot mIoU by depth (whole, {readout} readout)",
                keys=("miou_objects", "miou"),
                relative_depth=True,
            )
    return results


def teacher_alignment(folder: str | Path, val_size: int = 500, image_size: int = 64) -> dict[str, Any]:
    """The alignment curve shipped with an embedded teacher: whole-image zero-shot mIoU (all 20 classes and
    the 14 objects) of every block, readouts ``patch``, ``tips`` and ``maskclip``, on ``val_size``
    validation images, class embeddings from the teacher's own text tower (9 TCL templates). Writes
    ``alignment.json`` and ``alignment.png`` into ``folder``; returns the record."""
    folder = Path(folder)
    teacher = build_teacher("embedded", path=folder)
    cfg = DemoConfig(val_size=val_size, image_size=image_size)
    val = validation_split(cfg)
    text = resolve_class_embeddings(val.class_names, text_model=teacher, templates="tcl", cache_dir=None)
    curves = {}
    for readout in ("patch", "tips", "maskclip"):
        s = SegmentationSettings(image_size=image_size, mode="whole", readout=readout, resize_backend="torch")
        curves[readout] = layer_curve(teacher, val, text, s, "all", progress=False)
        logger.info(
            "%s: object mIoU by block %s", readout, [round(r["miou_objects"], 1) for r in curves[readout]]
        )
    rec = {
        "teacher": teacher.identity(),
        "validation": val.identity(),
        "protocol": "whole-image zero-shot segmentation, TCL templates, teacher text tower; mIoU in %",
        "curves": curves,
    }
    (folder / "alignment.json").write_text(json.dumps(rec, indent=2))
    plot_layer_curve(
        curves,
        folder / "alignment.png",
        f"embedded teacher: zero-shot mIoU by depth (step {teacher.config.get('step')})",
        keys=("miou_objects", "miou"),
    )
    return rec


def fmt(v: Any) -> str:
    """A table cell: one decimal, ``n/a`` for missing or NaN."""
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{float(v):.1f}"


def format_table(results: dict[str, Any]) -> str:
    """The demo's printed table: mIoU / object mIoU per setting and model, baseline, curves by block."""
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
            cells += [fmt(r and r["miou"]), fmt(r and r["miou_objects"])]
        lines.append(f"| {mode} / {readout} | " + " | ".join(cells) + " |")
    if "baseline" in results:
        b = results["baseline"]
        lines += ["", f"Baseline, {b['name']}: mIoU {fmt(b['miou'])}, obj mIoU {fmt(b['miou_objects'])}"]
    for readout, curves in results.get("curves", {}).items():
        lines += ["", f"Object mIoU by block (whole, {readout}):"]
        for name, c in curves.items():
            lines.append(f"  {name:8s} " + " ".join(fmt(r["miou_objects"]) for r in c))
    return "\n".join(lines)


def all_finite(results: dict[str, Any]) -> bool:
    """Whether every number of the table and the curves is finite."""
    vals = [r[k] for r in results["table"] for k in ("miou", "miou_objects", "pixel_accuracy")]
    vals += [
        r["miou_objects"] for c in results.get("curves", {}).values() for rows in c.values() for r in rows
    ]
    return all(v is not None and math.isfinite(float(v)) for v in vals)


# ------------------------------------------------------------------------------------------ driver
def run_demo(
    cfg: DemoConfig, out: Path, teacher_path: str | None = None, progress: bool = True
) -> dict[str, Any]:
    """Cache, distil and measure; writes ``results.json`` and ``report.md`` to ``out``, prints the table."""
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t0 = time.time()
    logger.info("stage 1: caching the embedded teacher's features of %d images", cfg.train_size)
    summary = stage_cache(cfg, out, teacher_path, progress=progress)
    cache_path = summary.get("index") or str(out / "cache")
    times["cache_s"] = time.time() - t0
    t1 = time.time()
    tcfg = train_config(cfg, out, cache_path)
    logger.info(
        "stage 2: distilling a %s student for %d steps (DeepSpeed ZeRO-%d, one process)",
        tcfg.student.kwargs,
        tcfg.steps,
        tcfg.engine.zero_stage,
    )
    export = stage_distill(tcfg)
    times["distill_s"] = time.time() - t1
    t2 = time.time()
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
            "train_config": config_to_dict(tcfg),
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
