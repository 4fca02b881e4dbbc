"""Named zero-shot segmentation protocols (``tips``, ``tcl``, ``sclip``) and benchmark suites.

A protocol is a named set of :class:`~distill.evaluation.segmentation.SegmentationSettings` values:
values for every dataset, values for datasets that have a background class, and values per benchmark
name. :func:`resolve_settings` layers them (protocol, background, dataset, then the user's explicit
overrides) and records the protocol's name and the overridden keys in ``settings.extra``, so every
value used lands in ``results.json``.

Every value below carries its source (repository and file). What is not reproduced: the methods'
own models (TCL's masker and PAMR refinement, SCLIP's correlative self-attention); the protocols
here are the *measurement* around any dense encoder. OpenCV is not a dependency, so mmcv's
``cv2.INTER_LINEAR`` resize on the 8-bit image is PyTorch's bilinear interpolation (no antialias) on
the float image (the same formula, without the 8-bit rounding).

A suite is a tuple of benchmark names (``distill.evaluation.benchmarks``, each read from its mmseg
download layout under ``<data root>/<MMSEG_SUBDIRS[name]>``); :func:`run_suite` evaluates every model
on every dataset found and writes one table and one figure.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tipsdistill.cache.format import git_revision

from .datasets import build_eval_dataset
from .report import compare_models, plot_suite, suite_markdown
from .segmentation import SegmentationSettings, check_setting_keys, dist_rank_world

logger = logging.getLogger(__name__)

# The TIPSv2 paper's four sets (reference/tipsv2-method.md section 4) and the eight of the training-free
# open-vocabulary segmentation literature (TCL configs/eval.yml, SCLIP README: the same eight).
SUITES: dict[str, tuple[str, ...]] = {
    "tipsv2": ("ade150", "pc60", "pc59", "voc21"),
    "ovseg": ("voc21", "voc20", "pc60", "pc59", "ade150", "coco_stuff", "coco_object", "cityscapes"),
}

# SCLIP configs/cls_voc21.txt and configs/cls_coco_object.txt, first line: the background class's names.
SCLIP_BACKGROUND_NAMES: tuple[str, ...] = (
    "sky", "wall", "tree", "wood", "grass", "road", "sea", "river", "mountain", "sands", "desk", "bed",
    "building", "cloud", "lamp", "door", "window", "wardrobe", "ceiling", "shelf", "curtain", "stair",
    "floor", "hill", "rail", "fence",
)  # fmt: skip


@dataclass(frozen=True)
class Protocol:
    """A named protocol.

    Attributes:
        name: what ``--protocol`` takes.
        summary: one line for ``--help`` and the docs.
        settings: :class:`SegmentationSettings` values for every dataset (unset keys keep the defaults,
            the notebook's).
        with_background: values for datasets with a background class (:func:`dataset_background`).
        per_dataset: values per benchmark name (``voc21``, ``pc60``, ...), applied last.
        sources: where each value comes from (key -> repository file), recorded in the docs.
    """

    name: str
    summary: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    with_background: Mapping[str, Any] = field(default_factory=dict)
    per_dataset: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    sources: Mapping[str, str] = field(default_factory=dict)


PROTOCOLS: dict[str, Protocol] = {
    "tips": Protocol(
        name="tips",
        summary="the official TIPS zero-shot notebook (every SegmentationSettings default)",
        settings={},  # the defaults ARE the notebook: short side 448 (PIL bicubic), slide 448/336,
        # per-window softmax, 9 TCL templates, no background rule
        sources={
            "all": "google-deepmind/tips pytorch/TIPS_zeroshot_segmentation.ipynb "
            "(reference/tipsv2-method.md section 4)",
        },
    ),
    "tcl": Protocol(
        name="tcl",
        summary="TCL (khanrc/tcl): short side 448 (mmseg rule), slide 448/224, raw score average, 9 templates, "
        "background = constant score 0.4",
        settings={
            # segmentation/configs/_base_/datasets/*.py: MultiScaleFlipAug img_scale=(2048, 448),
            # Resize keep_ratio=True (mmcv imrescale, bilinear)
            "image_size": 448,
            "resize_rule": "mmseg",
            "max_long_side": 2048,
            "resize_interpolation": "bilinear",
            "resize_backend": "torch",
            # same files: test_cfg = dict(mode="slide", stride=(224, 224), crop_size=(448, 448))
            "mode": "slide",
            "window": 448,
            "stride": 224,
            # mmseg EncoderDecoder.slide_inference sums raw logits / count_mat (softmax afterwards)
            "window_softmax": False,
            # configs/eval.yml template: custom = datasets/templates.py sub_imagenet_template (7) +
            # "a photo of many {}." + "a photo of {}s." (our TCL_TEMPLATES)
            "templates": "tcl",
        },
        with_background={
            # segmentation/evaluation/builder.py: with_bg = CLASSES[0] == "background" (voc21, pc60,
            # coco_object): no text for it; tcl_seg.py concatenates a constant channel bg_thresh,
            # configs/eval.yml bg_thresh: 0.4 (TCL's masks are in [0, 1]; here the score is the cosine)
            "background_text": False,
            "background_threshold": 0.4,
        },
        sources={
            "resize, window, stride": "khanrc/tcl segmentation/configs/_base_/datasets/*.py",
            "templates, bg_thresh": "khanrc/tcl configs/eval.yml, datasets/templates.py",
            "background rule": "khanrc/tcl segmentation/evaluation/builder.py, tcl_seg.py",
        },
    ),
    "sclip": Protocol(
        name="sclip",
        summary="SCLIP (wangf3014/SCLIP): short side 336 (mmseg rule; 448 COCO-Stuff, 560 Cityscapes), slide "
        "224/112, 80 OpenAI templates, softmax(logit_scale * cos), prob_thd / area_thd / background words",
        settings={
            # configs/cfg_*.py: Resize scale=(2048, 336), keep_ratio=True (mmcv Resize: bilinear)
            "image_size": 336,
            "resize_rule": "mmseg",
            "max_long_side": 2048,
            "resize_interpolation": "bilinear",
            "resize_backend": "torch",
            # clip_segmentor.py CLIPForSegmentation defaults: slide_crop=224, slide_stride=112
            "mode": "slide",
            "window": 224,
            "stride": 112,
            # clip_segmentor.py forward_slide: raw logits padded, summed, / count_mat
            "window_softmax": False,
            # clip_segmentor.py postprocess_result: seg_logits * logit_scale, softmax over every name
            # (query), max per class; default logit_scale=40, prob_thd=0.0 (no threshold)
            "logit_scale": 40.0,
            "synonym_reduce": "softmax",
            # prompts/imagenet_template.py openai_imagenet_template (80)
            "templates": "openai",
        },
        per_dataset={
            # configs/cfg_voc21.py: logit_scale=65, prob_thd=0.1, area_thd=0.1; cls_voc21.txt line 1
            "voc21": {
                "logit_scale": 65.0,
                "background_threshold": 0.1,
                "area_threshold": 0.1,
                "background_names": list(SCLIP_BACKGROUND_NAMES),
            },
            # configs/cfg_context60.py: logit_scale=50, prob_thd=0.1
            "pc60": {"logit_scale": 50.0, "background_threshold": 0.1},
            # configs/cfg_coco_object.py: logit_scale=50, prob_thd=0.1; cls_coco_object.txt line 1
            "coco_object": {
                "logit_scale": 50.0,
                "background_threshold": 0.1,
                "background_names": list(SCLIP_BACKGROUND_NAMES),
            },
            # configs/cfg_coco_stuff164k.py: Resize scale=(2048, 448)
            "coco_stuff": {"image_size": 448},
            # configs/cfg_city_scapes.py: Resize scale=(2048, 560)
            "cityscapes": {"image_size": 560},
        },
        sources={
            "resize": "wangf3014/SCLIP configs/cfg_*.py",
            "window, stride, logit scale, softmax": "wangf3014/SCLIP clip_segmentor.py",
            "prob_thd, area_thd": "wangf3014/SCLIP configs/cfg_voc21.py, cfg_context60.py, cfg_coco_object.py",
            "background words": "wangf3014/SCLIP configs/cls_voc21.txt, cls_coco_object.txt",
            "templates": "wangf3014/SCLIP prompts/imagenet_template.py",
        },
    ),
}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; choose one of {sorted(PROTOCOLS)}")
    return PROTOCOLS[name]


def dataset_background(dataset: Any) -> int | None:
    """The background class id of ``dataset``, or ``None`` when it has none.

    Read from ``identity()["background"]`` (the benchmarks' preset: ``class`` / ``threshold`` -> its
    ``background_class`` attribute, default 0; ``ignore`` / ``none`` -> no background class), else, as
    TCL decides it, a first class named ``background``."""
    try:
        preset = dict(dataset.identity()).get("background")
    except Exception:
        preset = None
    if preset in ("class", "threshold"):
        bg = getattr(dataset, "background_class", None)
        return 0 if bg is None else int(bg)
    if preset in ("ignore", "none"):
        return None
    names = getattr(dataset, "class_names", None) or []
    first = names[0] if names else None
    first = first if isinstance(first, str) or first is None else list(first)[0]
    return 0 if isinstance(first, str) and first.strip().lower() == "background" else None


def resolve_settings(
    protocol: str,
    dataset_name: str | None = None,
    dataset: Any = None,
    overrides: Mapping[str, Any] | None = None,
) -> SegmentationSettings:
    """Settings of ``protocol`` for one dataset: the protocol's values, then its background values
    when ``dataset`` has a background class (whose id becomes ``background_class``), then its values
    for ``dataset_name``, then ``overrides`` (explicit user choices: they always win).

    ``settings.extra`` records ``protocol``, ``dataset`` and the ``overridden`` keys."""
    proto = get_protocol(protocol)
    overrides = dict(overrides or {})
    check_setting_keys(overrides, "settings")
    values: dict[str, Any] = dict(proto.settings)
    bg = dataset_background(dataset) if dataset is not None else None
    if bg is not None:
        values["background_class"] = bg
        values.update(proto.with_background)
    if dataset_name is not None:
        values.update(proto.per_dataset.get(dataset_name, {}))
    values.update(overrides)
    values = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in values.items()}
    extra = {"protocol": proto.name, "dataset": dataset_name, "overridden": sorted(overrides)}
    return SegmentationSettings(**values, extra=extra)


# --------------------------------------------------------------------------------------------- suites
def suite_datasets(suite: str) -> tuple[str, ...]:
    """The benchmark names of ``suite``: a name in :data:`SUITES`, or registered dataset names
    separated by commas (``"voc21,ade150"``)."""
    if suite in SUITES:
        return SUITES[suite]
    names = tuple(n.strip() for n in suite.split(",") if n.strip())
    if "," not in suite and suite not in SUITES:
        raise ValueError(
            f"unknown suite {suite!r}; choose one of {sorted(SUITES)} or list datasets separated by commas"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"suite {suite!r} names a dataset twice")
    return names


def _benchmarks() -> Any:
    """``distill.evaluation.benchmarks`` (importing it registers the benchmark datasets), or ``None``
    where this installation has no such module (then only other registered datasets run)."""
    try:
        from . import benchmarks
    except ImportError:
        return None
    return benchmarks


def mmseg_subdir(name: str) -> str:
    """The folder of benchmark ``name`` under mmsegmentation's ``data/`` directory
    (``distill.evaluation.benchmarks.MMSEG_SUBDIRS``); the name itself for other datasets."""
    mod = _benchmarks()
    subdirs = getattr(mod, "MMSEG_SUBDIRS", {}) if mod is not None else {}
    return str(subdirs.get(name, name))


def parse_data_roots(values: Sequence[str] | str | None) -> tuple[str | None, dict[str, str]]:
    """``--data-root`` values: one plain directory (the mmseg ``data/`` folder) and ``name=path``
    overrides per dataset. Returns ``(directory or None, {name: path})``."""
    if values is None:
        return None, {}
    if isinstance(values, str):
        values = [values]
    root: str | None = None
    per: dict[str, str] = {}
    for v in values:
        head, sep, tail = v.partition("=")
        if sep and head and "/" not in head and head.replace("_", "").replace("-", "").isalnum():
            if not tail:
                raise ValueError(f"--data-root {v!r}: give a path after '='")
            per[head] = tail
        else:
            if root is not None and root != v:
                raise ValueError(
                    f"--data-root given twice ({root!r}, {v!r}); name=path sets one dataset's root"
                )
            root = v
    return root, per


def dataset_root(name: str, data_root: str | None, roots: Mapping[str, str]) -> Path:
    """Where ``name`` is read from: its ``name=path`` override, else ``<data_root>/<mmseg subdir>``."""
    if name in roots:
        return Path(roots[name])
    if data_root is None:
        raise ValueError(
            f"no root for dataset {name!r}: pass --data-root DIR (mmsegmentation's data/ folder) or "
            f"--data-root {name}=PATH"
        )
    return Path(data_root) / mmseg_subdir(name)


def _suite_entry(res: dict[str, Any], name: str) -> dict[str, Any]:
    keep = ("miou", "pixel_accuracy", "mean_accuracy")
    models = {}
    for m, r in res["models"].items():
        metrics = r["metrics"]
        row = {k: metrics.get(k) for k in keep}
        row.update({k: v for k, v in metrics.items() if k.startswith("miou_")})
        row["text_source"] = r["text_source"]
        models[m] = row
    return {
        "dataset": res["dataset"],
        "settings": res["settings"],
        "num_images": next(iter(res["models"].values()))["num_images"],
        "models": models,
        "report": f"{name}/results.json",
    }


def run_suite(
    models: dict[str, Any],
    suite: str,
    out_dir: str | Path,
    *,
    data_root: str | None = None,
    roots: Mapping[str, str] | None = None,
    protocol: str = "tips",
    overrides: Mapping[str, Any] | None = None,
    split: str = "val",
    strict: bool = False,
    plots: bool = True,
    distributed: bool = False,
    **compare_kwargs: Any,
) -> dict[str, Any]:
    """Evaluate every model on every dataset of ``suite`` (:func:`suite_datasets`) under ``protocol``.

    Each dataset is built with ``build_eval_dataset(name, {"root": root, "split": split})`` from
    :func:`dataset_root`; one not found there (or that cannot be read) is listed in ``skipped`` with
    the path looked for and the reason, or, with ``strict``, stops the run before any evaluation.
    Each dataset's full report (:func:`compare_models`) goes to ``out_dir/<name>/``; ``out_dir`` gets
    ``results.json`` (every dataset's settings and metrics, the skipped list), ``results.md`` (rows:
    models, columns: datasets) and ``suite_miou.png``. ``compare_kwargs`` go to :func:`compare_models`
    (``text_model``, ``layers``, ``num_examples``, ``cache_dir``, ``progress``, ``num_workers``, ...).
    """
    if not models:
        raise ValueError("run_suite needs at least one model")
    names = suite_datasets(suite)
    _benchmarks()  # registers the benchmark datasets before any is built
    roots = dict(roots or {})
    stray = sorted(set(roots) - set(names))
    if stray:
        raise ValueError(f"--data-root names {stray} that are not in suite {suite!r} ({', '.join(names)})")
    datasets: dict[str, Any] = {}
    skipped: list[dict[str, str]] = []
    for name in names:
        root = dataset_root(name, data_root, roots)
        if not root.exists():
            skipped.append({"dataset": name, "path": str(root), "reason": "not found"})
            continue
        try:
            datasets[name] = build_eval_dataset(name, {"root": str(root), "split": split})
        except (ValueError, FileNotFoundError, OSError) as exc:
            skipped.append({"dataset": name, "path": str(root), "reason": str(exc)})
    for s in skipped:
        logger.warning("suite %s: skipping %s (%s: %s)", suite, s["dataset"], s["reason"], s["path"])
    if skipped and strict:
        raise ValueError(
            f"--strict: {len(skipped)} dataset(s) of suite {suite!r} missing or unreadable: "
            + "; ".join(f"{s['dataset']} ({s['reason']}: {s['path']})" for s in skipped)
        )
    if not datasets:
        raise ValueError(
            f"no dataset of suite {suite!r} found: "
            + "; ".join(f"{s['dataset']} ({s['reason']}: {s['path']})" for s in skipped)
        )
    writer = not distributed or dist_rank_world()[0] == 0
    out = Path(out_dir)
    entries: dict[str, Any] = {}
    identities: dict[str, Any] = {}
    for name, ds in datasets.items():
        settings = resolve_settings(protocol, name, ds, overrides)
        logger.info("suite %s: %s (%d images), protocol %s", suite, name, len(ds), protocol)
        res = compare_models(
            models, ds, settings, out / name, plots=plots, distributed=distributed, **compare_kwargs
        )
        entries[name] = _suite_entry(res, name)
        for m, r in res["models"].items():
            identities.setdefault(m, r["identity"])
    results: dict[str, Any] = {
        "suite": suite,
        "protocol": protocol,
        "requested": list(names),
        "split": split,
        "models": identities,
        "datasets": entries,
        "skipped": skipped,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_revision": git_revision(),
    }
    if not writer:
        return results
    out.mkdir(parents=True, exist_ok=True)
    files = {"markdown": str(out / "results.md"), "json": str(out / "results.json")}
    if plots:
        files["figure"] = str(plot_suite(results, out / "suite_miou.png"))
    results["files"] = files
    (out / "results.md").write_text(suite_markdown(results))
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return results
