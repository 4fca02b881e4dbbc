"""Experiments on the embedded benchmark: the headline over seeds, and the paper's ablations.

Every variant is a list of dotted stage-2 overrides on the ``embedded`` recipe (after the base's
overrides, :data:`BASES`); all runs share one stage-1 cache of the embedded teacher and are measured
with the same zero-shot segmentation settings (whole image; TIPS value-trick and MaskCLIP readouts;
all classes and the object classes) on the validation split. ``scripts/experiments.py`` is the
command line; its docstring lists the variants.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

from tipsdistill.cache import extract_features, open_cache
from tipsdistill.cache.format import layout_from_meta
from tipsdistill.cache.synthetic import SyntheticScenes
from tipsdistill.students import load_student
from tipsdistill.students.variants import canonical_spelling
from tipsdistill.teachers import build_teacher
from tipsdistill.teachers.embedded import default_path, read_embedded_teacher

from .config import TrainConfig, config_to_dict, recipe_path
from .embedded import (
    DemoConfig,
    fmt,
    majority_background_baseline,
    pretrain_config,
    seg_settings,
    stage_cache,
    stage_distill,
    train_config,
    validation_split,
)
from .evaluation import evaluate_segmentation, resolve_class_embeddings
from .evaluation.probe import probe
from .evaluation.retrieval import retrieval_recall
from .evaluation.segmentation import resolve_readout
from .multi import teachers_override

logger = logging.getLogger(__name__)

READOUTS = ("tips", "maskclip")

# overrides every variant starts from: the demo's settings, or the demo's before full-view targets
# (session-2 numbers in docs/embedded.md were measured so: 400 steps, 50-100 % crops, 2 local crops)
BASES: dict[str, tuple[str, ...]] = {
    "demo": (),
    "previous": ("steps=400", "data.global_scale=[0.5, 1.0]", "data.local_crops=2"),
}


# students of other architectures (issue 30) at about the ViT student's budget (0.47M parameters, the same
# steps), all with 96-wide tokens (the teacher's text width): key -> (timm name, student kwargs).
# ``convnext_s8``: a ConvNeXt read at stride 8 (the teacher's 8x8 grid at 64 px), pruned after that stage;
# ``mnv4_s16``: a MobileNetV4 at stride 16 (4x4: the teacher grid is area-averaged to it); ``*_ls1``: timm's
# ConvNeXt layer scale initialised at 1 (as the ViT student's init_values) instead of 1e-6; ``*_fpn``: the
# stride-8 stage with the deeper stages fused top-down (students.featuremap ``fuse_stages``), the ConvNeXt
# narrowed to stay near the budget. ``scripts/bench_students.py`` times the same models.
_CNX_S8 = {"feature_stride": 8, "dim": 96, "dims": [48, 96, 160, 320], "depths": [2, 4, 6, 2]}
_CNX_FPN = {
    "feature_stride": 8,
    "fuse_stages": [2, 3],
    "dim": 96,
    "dims": [24, 48, 96, 160],
    "depths": [1, 1, 3, 1],
}
ARCH_STUDENTS: dict[str, tuple[str, dict[str, Any]]] = {
    "convnext_s8": ("convnext_atto", _CNX_S8),
    "convnext_s8_ls1": ("convnext_atto", {**_CNX_S8, "ls_init_value": 1.0}),
    "convnext_fpn": ("convnext_atto", _CNX_FPN),
    "convnext_fpn_ls1": ("convnext_atto", {**_CNX_FPN, "ls_init_value": 1.0}),
    "mnv4_s16": ("mobilenetv4_conv_small", {"feature_stride": 16, "dim": 96}),
    "mnv4_fpn": ("mobilenetv4_conv_small", {"feature_stride": 8, "fuse_stages": [3], "dim": 96}),
}


@dataclass(frozen=True)
class Variant:
    """One experiment: dotted overrides of the embedded recipe.

    ``pretrain``: a pretraining recipe (no teacher, no cache) taken at the benchmark's sizes
    (:func:`distill.embedded.pretrain_config`); ``own_text``: the student trains its own text tower
    (``student.kwargs.text``) and is measured with it."""

    overrides: tuple[str, ...] = ()
    pretrain: str = ""
    own_text: bool = False
    teachers: tuple[str, ...] = ()  # a several-teacher run: these teachers' caches (:data:`MULTI_TEACHERS`)
    teacher_settings: str = ""  # JSON {teacher: {key: value}} over the teachers' entries (MULTI_TEACHERS)


# the teachers of the several-teacher variants: the embedded teacher (text-aligned, the benchmark's cache)
# and the bundled EfficientNet-Lite0 (ImageNet weights; a CNN, 1280 wide, stride 32: a 4x4 grid at 128 px)
MULTI_TEACHERS: dict[str, dict[str, Any]] = {
    "tips": {"entry": {"text": True}},
    "eff": {
        "teacher": "efficientnet-lite0",
        "cache": {"image_size": 128, "storage": "int8"},
        "entry": {"hidden_dim": 256},
    },
}


# prefix -> (teachers, their entries' settings): ``*_proto``: the embedded teacher's patch term is the
# prototype cross-entropy through a head (iBOT++ as the single-teacher recipe), not cosine
MULTI_VARIANTS: dict[str, tuple[tuple[str, ...], dict[str, dict[str, Any]]]] = {
    "multi_tips_eff": (("tips", "eff"), {}),
    "multi_tips": (("tips",), {}),
    "multi_tips_eff_proto": (("tips", "eff"), {"tips": {"patch_loss": "proto"}}),
    "multi_tips_proto": (("tips",), {"tips": {"patch_loss": "proto"}}),
}


def multi_teacher_variants() -> dict[str, Variant]:
    """``multi_tips_eff_seed*``: the embedded teacher + EfficientNet-Lite0 into one student (adaptor heads,
    PHI-S, cosine terms, :mod:`distill.multi`); ``multi_tips_seed*``: the same losses with the embedded
    teacher alone (the single-teacher student at the same budget); ``*_proto_seed*``: the same with the
    embedded teacher's patch term through a prototype head (:data:`MULTI_VARIANTS`)."""
    return {
        f"{prefix}_seed{seed}": Variant(
            (f"seed={seed}",), teachers=names, teacher_settings=json.dumps(settings) if settings else ""
        )
        for prefix, (names, settings) in MULTI_VARIANTS.items()
        for seed in range(3)
    }


def multi_teacher_caches(
    bench: DemoConfig, out: Path, tips_cache: str, names: Sequence[str]
) -> dict[str, str]:
    """The stage-1 cache of each teacher in ``names`` over the benchmark's training split: the embedded
    teacher's is ``tips_cache``; the others are built once into ``out/cache_<name>``."""
    paths = {}
    for name in names:
        spec = MULTI_TEACHERS[name]
        if "teacher" not in spec:
            paths[name] = tips_cache
            continue
        dest = out / f"cache_{name}"
        if not (dest / "index.h5").is_file():
            extract_features(
                out=str(dest),
                teacher=spec["teacher"],
                dataset="synthetic",
                dataset_kwargs={
                    "split": "train",
                    "size": bench.train_size,
                    "image_size": bench.image_size,
                    "seed": bench.data_seed,
                },
                resize="exact",
                granularities=[],
                batch_size=bench.cache_batch,
                num_workers=0,
                device="cpu",
                progress=False,
                **spec["cache"],
            )
        paths[name] = str(dest / "index.h5")
    return paths


def variant_teachers(paths: dict[str, str], settings: str = "") -> str:
    """The ``teachers=[...]`` override of a several-teacher variant (``settings``: its
    :attr:`Variant.teacher_settings`)."""
    extra = json.loads(settings) if settings else {}
    return teachers_override(
        [{"name": n, "path": p, **MULTI_TEACHERS[n]["entry"], **extra.get(n, {})} for n, p in paths.items()]
    )


def text_tower(tokenizer: str | Path) -> dict[str, Any]:
    """A random-init TIPS text tower with the embedded teacher's layout and SentencePiece vocabulary."""
    return {
        "kind": "tips",
        "tokenizer": str(Path(tokenizer).resolve()),
        "depth": 2,
        "num_heads": 3,
        "mlp_dim": 384,
        "max_len": 48,
    }


def teacher_text_tower(teacher_path: str | Path | None = None, *, freeze: bool = False) -> dict[str, Any]:
    """A copy of the embedded teacher's own text tower (locked all-MiniLM-L6-v2 + its trained projection,
    the teacher's text space) as the student's tower: trained, or ``freeze``-locked whole."""
    kwargs = {} if teacher_path is None else {"path": str(Path(teacher_path).resolve())}
    return {"kind": "teacher", "teacher": "embedded", "teacher_kwargs": kwargs, "freeze": freeze}


def student_shaped(**shape: Any) -> tuple[str, ...]:
    """Overrides that give the ``embedded`` recipe's student the ``shape`` kwargs (``embed_dim``, ``depth``...):
    ``student.name=`` the registered variant of that shape (``students.variants``), plus whatever kwargs
    no registered name covers."""
    student = yaml.safe_load(recipe_path("embedded").read_text())["student"]
    name, kwargs = canonical_spelling(student["name"], {**(student.get("kwargs") or {}), **shape})
    return (
        f"student.name={name}",
        *(f"student.kwargs.{k}={json.dumps(v)}" for k, v in kwargs.items() if k in shape),
    )


def variants(
    teacher_config: dict[str, Any],
    teacher_init: str,
    tokenizer: str | Path,
    teacher_path: str | Path | None = None,
) -> dict[str, Variant]:
    """Every variant; ``teacher_config``: the teacher's ``config.json`` (its ``overrides`` size the
    teacher-sized students); ``teacher_init``: a timm-keyed file of the teacher's vision weights;
    ``teacher_path``: the teacher's folder when not the shipped one (the pretrained text towers copy it)."""
    arch = {"mlp_ratio": 4.0, **teacher_config["overrides"]}
    deep = student_shaped(**{k: arch[k] for k in ("embed_dim", "depth", "num_heads", "mlp_ratio")})
    # the student's own trainable text tower makes the CLIP term's caption embeddings
    own_text = ("student.kwargs.text=" + json.dumps(text_tower(tokenizer)), "loss.text_source=student")

    def tower(text: dict[str, Any]) -> Variant:
        return Variant(
            ("seed=0", "student.kwargs.text=" + json.dumps(text), "loss.text_source=student"), own_text=True
        )

    # pretraining needs views that differ: random global crops and 2 local crops (DINO)
    pretrain = ("data.global_scale=[0.5, 1.0]", "data.local_crops=2", *own_text)
    # students narrower and wider than the teacher's 96-wide text: each learns a projection into the
    # caption-embedding space (its text interface) and is measured with the teacher's text; 32-wide heads
    widths = {
        f"w{w}_seed{seed}": Variant((f"seed={seed}", *student_shaped(embed_dim=w, num_heads=w // 32)))
        for w in (64, 192)
        for seed in range(3)
    }
    other_archs = {
        f"{key}_seed{seed}": Variant(
            (f"seed={seed}", f"student.name={timm_name}", "student.kwargs=" + json.dumps(kw))
        )
        for key, (timm_name, kw) in ARCH_STUDENTS.items()
        for seed in range(3)
    }
    return {
        "seed0": Variant(("seed=0",)),
        "seed1": Variant(("seed=1",)),
        "seed2": Variant(("seed=2",)),
        **widths,
        **other_archs,
        "mask75": Variant(("loss.mask_ratio=0.75",)),
        "cosine": Variant(("loss.patch=cosine",)),
        "crop_view": Variant(("data.global_scale=[0.5, 1.0]",)),
        "full_view": Variant(("data.global_scale=[1.0, 1.0]",)),
        "full_view_nolocal": Variant(("data.global_scale=[1.0, 1.0]", "data.local_crops=0")),
        "with_locals": Variant(("data.local_crops=2",)),
        "lr3e-3": Variant(("optim.lr=3e-3",)),
        "teacher_temp04": Variant(("loss.teacher_temp=0.04",)),
        "deep_random": Variant(deep),
        "deep_teacher_init": Variant((*deep, "student.init=" + json.dumps(teacher_init))),
        "pretrain_tipsv2": Variant(pretrain, pretrain="pretrain-tipsv2", own_text=True),
        "pretrain_tips": Variant(pretrain, pretrain="pretrain-tips", own_text=True),
        "distill_text": Variant(("seed=0", *own_text), own_text=True),
        "distill_text_frozen": tower({**text_tower(tokenizer), "freeze": True}),
        "distill_text_pretrained": tower(teacher_text_tower(teacher_path)),
        "distill_text_pretrained_frozen": tower(teacher_text_tower(teacher_path, freeze=True)),
        **multi_teacher_variants(),
    }


def variant_config(
    bench: DemoConfig,
    variant: Variant,
    out: Path,
    cache_path: str,
    name: str,
    base: Sequence[str] = (),
) -> TrainConfig:
    """The stage-2 config of ``variant`` (``base`` overrides first), reading the stage-1 cache
    ``cache_path`` unless it is a pretraining variant."""
    overrides = (*base, *variant.overrides)
    if variant.pretrain:
        return pretrain_config(bench, out, variant.pretrain, name, overrides)
    return train_config(bench, out, cache_path, name, overrides)


def teacher_vision_file(teacher_path: Path, dest: Path) -> str:
    """Write the teacher's vision weights with timm keys (what ``student.init`` loads)."""
    _, vis, _ = read_embedded_teacher(teacher_path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in vis.items()}, str(dest))
    return str(dest)


def evaluate(models: dict[str, Any], val: Any, text: Any, bench: DemoConfig) -> dict[str, dict[str, Any]]:
    """Whole-image zero-shot mIoU (all / objects) and pixel accuracy of each model, both readouts."""
    out: dict[str, dict[str, Any]] = {}
    for name, model in models.items():
        for readout in READOUTS:
            m = evaluate_segmentation(
                model, val, text, seg_settings(bench, "whole", readout), progress=False
            )["metrics"]
            out.setdefault(name, {})[readout] = {
                "miou": m["miou"],
                "miou_objects": m.get("miou_objects"),
                "pixel_accuracy": m["pixel_accuracy"],
            }
    return out


def summarise(results: dict[str, Any]) -> str:
    """The experiments table: one row per run, the mean ± sd over the ``seed*`` runs, the baseline."""
    runs = results["runs"]
    lines = [
        "| run | tips mIoU | tips obj | maskclip mIoU | maskclip obj |",
        "|---|---|---|---|---|",
    ]

    def row(name: str, r: dict[str, Any]) -> str:
        cells = [fmt(r[ro][k]) for ro in READOUTS for k in ("miou", "miou_objects")]
        return f"| {name} | " + " | ".join(cells) + " |"

    lines.append(row("teacher", results["teacher"]))
    for name, r in runs.items():
        lines.append(row(name, r["metrics"]))
    groups: dict[str, list[dict[str, Any]]] = {}  # "seed1" -> "", "w64_seed2" -> "w64_"
    for n, r in runs.items():
        prefix, sep, rest = n.rpartition("seed")
        if sep and rest.isdigit():
            groups.setdefault(prefix, []).append(r["metrics"])
    for prefix, seeds in groups.items():
        if len(seeds) < 2:
            continue
        cells = []
        for ro in READOUTS:
            for k in ("miou", "miou_objects"):
                vals = [s[ro][k] for s in seeds]
                cells.append(f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f}")
        lines.append(f"| {prefix}seeds mean ± sd (n={len(seeds)}) | " + " | ".join(cells) + " |")
    if "baseline" in results:
        b = results["baseline"]
        lines.append(f"| baseline: majority background (peeks at labels) | {fmt(b['miou'])} | 0.0 | | |")
    return "\n".join(lines)


def _own_text_extras(
    student: Any, teacher: Any, val: Any, bench: DemoConfig, results: dict[str, Any]
) -> tuple[Any, dict[str, Any]]:
    """Class embeddings from the student's own text tower and its retrieval recall (teacher's once)."""
    with torch.no_grad():
        text = resolve_class_embeddings(val.class_names, text_model=student, templates="tcl", cache_dir=None)
        extra = {
            "retrieval": retrieval_recall(student, val, image_size=bench.image_size, ks=(1, 5)),
            "text": "own text tower",
        }
    if "retrieval_teacher" not in results:
        results["retrieval_teacher"] = retrieval_recall(teacher, val, image_size=bench.image_size, ks=(1, 5))
    return text, extra


def _adaptor_extras(student: Any, names: Sequence[str], val: Any) -> dict[str, Any]:
    """Linear probes (:func:`distill.evaluation.probe.probe`) of the student through each adaptor:
    CLS AUC and the last block's patch mIoU (all / objects) per teacher."""
    probes = {}
    for name in names:
        p = probe(student.adaptor(name), val)
        last = p["patch"][-1]
        probes[name] = {
            "cls_auc": p["cls_auc"],
            "patch_miou": last["miou"],
            "patch_miou_objects": last["miou_objects"],
        }
    return {"adaptor_metrics_through": names[0], "probes": probes}


def _cache_facts(path: str) -> dict[str, Any]:
    """Storage facts of the stage-1 cache the runs read (recorded in ``experiments.json``)."""
    cache = open_cache(path)
    try:
        sp = cache.spec
        return {
            "path": str(path),
            "storage_dtype": sp.storage_dtype,
            "reduce_dim": sp.reduce_dim,
            "dim": sp.dim,
            "bytes_per_sample": layout_from_meta(cache.meta, 1).bytes_per_sample(),
            "reduce_fit": cache.reduction.fit if cache.reduction is not None else None,
        }
    finally:
        cache.close()


def run_experiments(
    bench: DemoConfig,
    out: Path,
    *,
    only: Sequence[str] = (),
    base: Sequence[str] = (),
    teacher_path: str | Path | None = None,
    cache: str | None = None,
    reuse: dict[str, str] | None = None,
    cache_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train (or reuse, ``reuse``: name -> export dir) and measure the variants ``only`` (default all);
    results accumulate in ``out/experiments.json`` (earlier runs kept), the table in ``experiments.md``."""
    out.mkdir(parents=True, exist_ok=True)
    tpath = Path(teacher_path) if teacher_path else default_path()
    teacher = build_teacher("embedded", path=str(tpath))
    init_file = teacher_vision_file(tpath, out / "teacher_vision.safetensors")
    shipped = tpath.resolve() == default_path().resolve()
    all_variants = variants(teacher.config, init_file, tpath / "tokenizer.model", None if shipped else tpath)
    names = list(only) or list(all_variants)
    unknown = [n for n in names if n not in all_variants]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {list(all_variants)}")
    cache_path = (
        cache
        or stage_cache(bench, out, str(tpath), **(cache_overrides or {})).get("index")
        or str(out / "cache")
    )
    reuse = reuse or {}
    results_cache = _cache_facts(cache_path)
    val: SyntheticScenes = validation_split(bench)
    text = resolve_class_embeddings(val.class_names, text_model=teacher, templates="tcl", cache_dir=None)
    res_path = out / "experiments.json"
    results: dict[str, Any] = json.loads(res_path.read_text()) if res_path.exists() else {"runs": {}}
    results["teacher"] = evaluate({"teacher": teacher}, val, text, bench)["teacher"]
    results["teacher_identity"] = teacher.identity()
    results["cache"] = results_cache
    base_m = majority_background_baseline(val)
    results["baseline"] = {"miou": base_m["miou"], "pixel_accuracy": base_m["pixel_accuracy"]}
    for name in names:
        v = all_variants[name]
        t0 = time.time()
        if v.teachers:  # several teachers: no cache.path, the teachers' caches instead
            paths = multi_teacher_caches(bench, out, cache_path, v.teachers)
            v = Variant((*v.overrides, variant_teachers(paths, v.teacher_settings)), teachers=v.teachers)
            tcfg = variant_config(bench, v, out, "", name, base)
        else:
            tcfg = variant_config(bench, v, out, cache_path, name, base)
        logger.info("run %s: %s", name, list(v.overrides))
        export = reuse[name] if name in reuse else stage_distill(tcfg)
        student = load_student(export)
        run_text, extra = (
            _own_text_extras(student, teacher, val, bench, results) if v.own_text else (text, {})
        )
        if v.teachers:  # zero-shot of the student's own tokens (below) and through the text teacher's adaptor
            extra = _adaptor_extras(student, v.teachers, val)
            extra["adaptor_metrics"] = evaluate({name: student.adaptor(v.teachers[0])}, val, run_text, bench)[
                name
            ]
        metrics = evaluate({name: student}, val, run_text, bench)[name]
        results["runs"][name] = {
            "overrides": [*base, *v.overrides],
            "recipe": v.pretrain or bench.recipe,
            "config": config_to_dict(tcfg),
            "metrics": metrics,
            # the readout each column used (patch for a student without attention: no value trick)
            "readouts": {ro: resolve_readout(student, ro) for ro in READOUTS},
            "minutes": (time.time() - t0) / 60,
            **extra,
        }
        res_path.write_text(json.dumps(results, indent=2, default=str))
        logger.info("run %s done in %.1f min: %s", name, (time.time() - t0) / 60, metrics)
    (out / "experiments.md").write_text(summarise(results) + "\n")
    return results


def all_finite(results: dict[str, Any]) -> bool:
    """Whether every measured number of every run is finite."""
    return all(
        v is not None and math.isfinite(v)
        for r in results["runs"].values()
        for ro in r["metrics"].values()
        for v in ro.values()
    )
