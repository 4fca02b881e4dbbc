"""``tipsdistill-eval``: zero-shot segmentation, image-text retrieval and zero-shot classification of one or
several models.

Model specs (``--model NAME=SPEC``, repeatable, config key ``models.NAME``; ``distill.evaluation.models``):
  ``teacher:<teacher spec>``                    e.g. ``teacher:timm:vit_base_patch14_reg4_dinov2``, ``teacher:embedded``
  ``student:<dir>``                             a student export, a checkpoint (.../checkpoints/step_N) or a run dir
  ``python:<module>:<factory>``                 any callable returning a DenseEncoder
Keyword arguments of a model: ``model_kwargs.NAME.KEY=VALUE``. A bare existing directory is a student export or
an embedded-teacher folder (by its config.json); a bare teacher spec (``embedded``, ``timm:MODEL``) is a teacher.
Every flag is an alias of a config key (``EvalRunConfig``): ``--config FILE`` (YAML), then the flags, then dotted
``key=value`` overrides (YAML values: ``settings.mode=whole 'dataset_kwargs={split: validation}'``); the resolved
config is written to ``--out``/eval_config.yaml (see docs/config.md).
Retrieval (``--retrieval coco_karpathy --retrieval-root DIR``: Karpathy's 5k COCO / 1k Flickr30k test split)
and ImageNet zero-shot (``--classification imagenet --classification-root VAL_DIR``) report every global
token of every model; they run alone or next to a segmentation ``--dataset``.
Writes ``results.json``, ``results.md`` and PNG figures to ``--out`` (a retrieval or classification run next
to another task writes to ``--out/retrieval``, ``--out/classification``); prints the Markdown tables.

``--protocol tips|tcl|sclip`` sets every protocol knob (``distill.evaluation.protocols``); a knob given
on the command line overrides it. ``--suite tipsv2|ovseg --data-root DIR`` evaluates every model on
every benchmark of the suite (``DIR/<mmseg folder>``; ``--data-root NAME=PATH`` for one dataset) and
writes one table and one figure (each dataset's own report in ``--out/<name>/``).
Under ``torchrun --nproc_per_node N`` the images are split over the processes (rank r: images r, r+N,
...; confusion matrices summed), rank 0 writes: the metrics of one process.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("tipsdistill.eval")
CONFIG_NAME = "eval_config.yaml"  # the resolved config, beside results.json (--config reruns it)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tipsdistill-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--config", default=None, help="YAML file of EvalRunConfig keys (an eval_config.yaml reruns it)"
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted config overrides (YAML values), applied last: settings.mode=whole dataset_kwargs.size=8",
    )
    p.add_argument(
        "--model",
        action="append",
        default=None,
        help="NAME=SPEC (repeatable; config key models.NAME); see above",
    )
    p.add_argument(
        "--dataset",
        default=None,
        help="registered dataset: ade20k, seg_folder, synthetic, ... or a spec (wds:...)",
    )
    p.add_argument(
        "--suite",
        default=None,
        help="tipsv2 (ade150 pc60 pc59 voc21), ovseg (the eight: voc21 voc20 pc60 pc59 ade150 coco_stuff "
        "coco_object cityscapes), or registered dataset names separated by commas",
    )
    p.add_argument(
        "--cache",
        default=None,
        help="a stage-1 cache: evaluate on the images it was made from (segmentation when they have labels, "
        "else retrieval); --dataset then overrides the recorded dataset",
    )
    p.add_argument(
        "--dataset-kwargs",
        default=None,
        help="dataset kwargs as a YAML mapping, e.g. '{split: validation, size: 8}' (config key dataset_kwargs; "
        "or dataset_kwargs.split=validation); JSON is read with a deprecation warning",
    )
    p.add_argument(
        "--data-root",
        action="append",
        default=None,
        help="--dataset: its root (dataset kwarg root=); --suite: mmsegmentation's data/ folder, and "
        "NAME=PATH (repeatable) for a dataset kept elsewhere",
    )
    p.add_argument("--split", default="val", help="--suite: the split of every benchmark (default val)")
    p.add_argument(
        "--strict",
        action="store_true",
        help="--suite: stop when a dataset is missing (default: skip, listed)",
    )
    p.add_argument(
        "--data-allow-root",
        action="append",
        metavar="DIR",
        help="tables, HF datasets and caption folders: also read image paths under DIR (paths outside the "
        "dataset's folder are refused otherwise); repeatable (dataset kwarg allow_root=)",
    )
    p.add_argument("--max-images", type=int, default=None)
    g = p.add_argument_group(
        "protocol (--protocol sets them; a flag given here overrides it; defaults = tips, the official notebook)"
    )
    g.add_argument("--protocol", default="tips", help="tips (default), tcl or sclip")
    g.add_argument("--mode", choices=["slide", "whole"], default=None, help="tips: slide")
    g.add_argument("--image-size", type=int, default=None, help="short side after resizing; 0 keeps the size")
    g.add_argument("--window", type=int, default=None, help="tips: 448")
    g.add_argument("--stride", type=int, default=None, help="tips: 336")
    g.add_argument("--readout", choices=["tips", "maskclip", "patch"], default=None, help="tips: tips")
    g.add_argument(
        "--layer", type=int, default=None, help="block index (negative from the end); default last"
    )
    g.add_argument("--layers", default=None, help="mIoU-by-depth curve: 'all' or comma-separated block ids")
    g.add_argument("--templates", default=None, help="tcl (9, tips), openai (80), none, or a file")
    g.add_argument(
        "--synonyms", default=None, help="synonym file: one line per class, names separated by commas"
    )
    g.add_argument("--background-threshold", type=float, default=None)
    g.add_argument("--background-class", type=int, default=None)
    g.add_argument(
        "--background-text",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="--no-background-text: the background class scores the constant --background-threshold (TCL)",
    )
    g.add_argument(
        "--background-names", default=None, help="comma-separated names replacing the background class's name"
    )
    g.add_argument("--resize-backend", choices=["pil", "torch"], default=None, help="tips: pil")
    g.add_argument("--resize-rule", choices=["notebook", "mmseg"], default=None, help="tips: notebook")
    g.add_argument("--max-long-side", type=int, default=None, help="mmseg rule's long-side cap (2048)")
    g.add_argument(
        "--resize-interpolation", choices=["bicubic", "bilinear"], default=None, help="tips: bicubic"
    )
    g.add_argument(
        "--window-softmax",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="slide: softmax per window before averaging (tips) or raw scores averaged (tcl, sclip)",
    )
    g.add_argument("--logit-scale", type=float, default=None, help="softmax temperature (sclip: 40)")
    g.add_argument("--synonym-reduce", choices=["cosine", "softmax"], default=None, help="tips: cosine")
    g.add_argument("--area-threshold", type=float, default=None, help="SCLIP's area_thd")
    s_ = p.add_argument_group("speed (results equal up to float rounding)")
    s_.add_argument("--window-batch", type=int, default=None, help="windows per forward in slide mode (8)")
    s_.add_argument(
        "--image-batch", type=int, default=None, help="images evaluated together (8); 1: one by one"
    )
    s_.add_argument(
        "--amp", choices=["none", "bf16"], default=None, help="bf16: autocast the encoder forward"
    )
    s_.add_argument(
        "--workers", type=int, default=None, help="image-reading workers (default 4 on a GPU, else 0)"
    )
    t = p.add_argument_group("text")
    t.add_argument(
        "--text-model",
        default=None,
        help="NAME of a --model, or a SPEC: its encode_text is used for every model",
    )
    t.add_argument("--text-embeddings", default=None, help=".safetensors/.pt/.npy file, one row per class")
    t.add_argument("--text-cache", default="default", help="text-embedding cache dir ('none' disables)")
    r = p.add_argument_group(
        "retrieval and zero-shot classification (global tokens: every CLS token of every model)"
    )
    r.add_argument(
        "--retrieval-dataset",
        "--retrieval",
        default=None,
        help="captioned dataset for image<->text recall@1/5/10: coco_karpathy, flickr30k_karpathy, caption_folder, ...",
    )
    r.add_argument("--retrieval-root", default=None, help="shortcut for retrieval dataset kwarg root=")
    r.add_argument(
        "--retrieval-kwargs",
        default=None,
        help="kwargs of the retrieval dataset, a YAML mapping: '{json: ...}'",
    )
    r.add_argument("--retrieval-image-size", type=int, default=224)
    r.add_argument(
        "--classification", default=None, help="labelled image set for zero-shot top-1/5: imagenet"
    )
    r.add_argument(
        "--classification-root", default=None, help="shortcut for classification dataset kwarg root="
    )
    r.add_argument(
        "--classification-kwargs", default=None, help="kwargs, a YAML mapping: '{classes: [n01440764]}'"
    )
    r.add_argument("--classification-image-size", type=int, default=224)
    r.add_argument(
        "--classification-templates", default="openai", help="openai (80, default), tcl, none, or a file"
    )
    r.add_argument(
        "--global-batch-size", type=int, default=32, help="images per forward (retrieval, classification)"
    )
    r.add_argument(
        "--global-workers", type=int, default=0, help="image-decoding processes (retrieval, classification)"
    )
    o = p.add_argument_group("output")
    o.add_argument("--out", default="eval_out", help="output directory")
    o.add_argument("--num-examples", type=int, default=4)
    o.add_argument("--no-plots", action="store_true")
    o.add_argument(
        "--device", default="auto", help="auto (the GPU when there is one), cpu, cuda, cuda:1, ..."
    )
    o.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


@dataclass
class EvalRunConfig:
    """Everything ``tipsdistill-eval`` takes: ``--config FILE``, then the flags (aliases of these keys), then
    dotted ``key=value`` overrides. ``settings`` are :class:`SegmentationSettings` keys over ``protocol``
    (the one home of the segmentation knobs, as a training run's ``eval.settings``); written to
    ``<out>/eval_config.yaml``."""

    models: dict[str, str] = field(default_factory=dict)  # name -> model spec (module docstring)
    model_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> builder kwargs
    dataset: str = ""
    dataset_kwargs: dict[str, Any] = field(default_factory=dict)
    suite: str = ""
    cache: str = ""
    data_root: list[str] = field(default_factory=list)
    split: str = "val"
    strict: bool = False
    data_allow_root: list[str] = field(default_factory=list)
    max_images: int | None = None
    protocol: str = "tips"
    settings: dict[str, Any] = field(default_factory=dict)
    layers: str = ""  # "all" or comma-separated block ids: the mIoU-by-depth curve
    synonyms: str = ""
    text_model: str = ""
    text_embeddings: str = ""
    text_cache: str = "default"
    retrieval: str = ""
    retrieval_root: str = ""
    retrieval_kwargs: dict[str, Any] = field(default_factory=dict)
    retrieval_image_size: int = 224
    classification: str = ""
    classification_root: str = ""
    classification_kwargs: dict[str, Any] = field(default_factory=dict)
    classification_image_size: int = 224
    classification_templates: str = "openai"
    global_batch_size: int = 32
    global_workers: int = 0
    workers: int | None = None  # segmentation image readers (None: 4 on a GPU, else 0)
    out: str = "eval_out"
    num_examples: int = 4
    plots: bool = True
    device: str = "auto"
    progress: bool = True

    def validate(self) -> EvalRunConfig:
        from tipsdistill.distill.evaluation.segmentation import check_setting_keys

        check_setting_keys(self.settings, "settings")
        if not self.models:
            raise ValueError("no model to evaluate: give --model NAME=SPEC (or models.NAME=SPEC)")
        stray = sorted(set(self.model_kwargs) - set(self.models))
        if stray:
            raise ValueError(
                f"model_kwargs name models that are not evaluated: {stray}; models: {sorted(self.models)}"
            )
        return self


# flags whose value is a SegmentationSettings knob: config key settings.<dest>
SETTING_FLAGS = (
    "mode", "window", "stride", "readout", "layer", "templates", "background_threshold", "background_class",
    "background_text", "background_names", "resize_backend", "resize_rule", "max_long_side", "resize_interpolation",
    "window_softmax", "logit_scale", "synonym_reduce", "area_threshold", "window_batch", "image_batch", "amp",
)  # fmt: skip
# flags whose config key has another name
RENAMED_FLAGS = {"retrieval_dataset": "retrieval", "data_root": "data_root"}
KWARGS_FLAGS = ("dataset_kwargs", "retrieval_kwargs", "classification_kwargs")


def kwargs_text(text: str, what: str) -> dict[str, Any]:
    """A ``--*-kwargs`` value: a YAML mapping (``{split: validation}``, the one syntax); JSON (the former
    syntax) is read with a deprecation warning."""
    from tipsdistill.cache.config_layer import json_object, parse_value

    try:
        json.loads(text)
        return json_object(text, what)
    except json.JSONDecodeError:
        pass
    value = parse_value(text)
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a mapping, e.g. '{{split: validation, size: 8}}', got {text!r}")
    return value


def setting_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The protocol settings given explicitly on the command line (they override ``--protocol``)."""
    given = {k: v for k, v in vars(args).items() if v is not None}
    return flags_to_config(given).get("settings", {})


def flags_to_config(given: dict[str, Any]) -> dict[str, Any]:
    """Explicitly given flags (``dest -> value``) as config keys (:class:`EvalRunConfig`)."""
    from tipsdistill.distill.evaluation.models import parse_models

    data: dict[str, Any] = {}
    settings: dict[str, Any] = {}
    for dest, value in given.items():
        if dest in ("config", "overrides"):
            continue
        if dest in SETTING_FLAGS:
            if dest == "background_names":
                value = [n.strip() for n in value.split(",") if n.strip()]
            settings[dest] = value
        elif dest == "image_size":
            settings["image_size"] = value or None
        elif dest == "max_images":
            data["max_images"] = settings["max_images"] = value
        elif dest == "model":
            data["models"] = parse_models(value)
        elif dest in KWARGS_FLAGS:
            data[dest] = kwargs_text(value, "--" + dest.replace("_", "-"))
        elif dest == "no_plots":
            data["plots"] = not value
        elif dest == "quiet":
            data["progress"] = not value
        else:
            data[RENAMED_FLAGS.get(dest, dest)] = value
    if settings:
        data["settings"] = settings
    return data


def load_run_config(argv: list[str] | None) -> EvalRunConfig:
    """Defaults, then ``--config FILE``, then the flags typed on the command line, then dotted overrides."""
    from tipsdistill.cache.config_layer import given_flags, load_typed

    given = given_flags(build_parser(), argv)
    cfg = load_typed(EvalRunConfig, given.get("config"), flags_to_config(given), given.get("overrides"))
    if "max_images" in cfg.settings and cfg.max_images is None:
        cfg.max_images = cfg.settings["max_images"]
    elif cfg.max_images is not None:
        cfg.settings["max_images"] = cfg.max_images
    return cfg


def resolve_device(name: str) -> tuple[str, bool]:
    """``(device, distributed)``: ``auto`` is ``cuda`` when there is a GPU, else ``cpu``; under torchrun
    (``WORLD_SIZE`` > 1) the process group is initialised (NCCL on GPUs, gloo on CPUs) and each rank
    takes the GPU of its ``LOCAL_RANK`` (:func:`cache.launch.process_place`, as both stages)."""
    import torch

    from tipsdistill.cache.launch import process_place

    device = ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    place = process_place(group=True)
    if place.world <= 1:
        return device, False
    import torch.distributed as dist

    if device.startswith("cuda"):
        local = place.local_rank
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device, True


def main(argv: list[str] | None = None) -> int:
    build_parser().parse_intermixed_args(argv)  # --help, and argparse's own errors
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from tipsdistill.cache.config_layer import save_config
    from tipsdistill.distill.evaluation import compare_models
    from tipsdistill.distill.evaluation.datasets import build_eval_dataset
    from tipsdistill.distill.evaluation.models import build_model
    from tipsdistill.distill.evaluation.protocols import (
        get_protocol,
        parse_data_roots,
        resolve_settings,
        run_suite,
        suite_datasets,
    )

    distributed, rank, shown = False, 0, ""
    try:
        args = load_run_config(argv)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        device, distributed = resolve_device(args.device)
        if distributed:
            import torch.distributed as dist

            rank = dist.get_rank()
            if rank != 0:
                logging.getLogger().setLevel(logging.WARNING)
        get_protocol(args.protocol)  # bad names stop before any model is built
        if args.suite:
            suite_datasets(args.suite)
        overrides = dict(args.settings)
        data_root, roots = parse_data_roots(args.data_root)
        workers = args.workers if args.workers is not None else (4 if device.startswith("cuda") else 0)
        if args.suite and (args.dataset or args.cache or args.dataset_kwargs):
            raise ValueError(
                "--suite builds every benchmark from --data-root; drop --dataset / --cache / --dataset-kwargs"
            )
        if args.suite and (args.text_embeddings or args.synonyms):
            raise ValueError(
                "--text-embeddings / --synonyms hold one class list; a suite has one per dataset (use "
                "--text-model, or evaluate each dataset with --dataset)"
            )
        if roots and not args.suite:
            raise ValueError(
                f"--data-root NAME=PATH ({', '.join(roots)}) sets a suite dataset's root; use --suite"
            )
        dataset = None
        if not args.suite:
            ds_kw = dict(args.dataset_kwargs)
            if data_root:
                ds_kw["root"] = data_root
            if args.data_allow_root:
                ds_kw["allow_root"] = [str(Path(d).resolve()) for d in args.data_allow_root]
            if args.cache:
                from tipsdistill.cache.dataset_spec import source_for_cache

                dataset = source_for_cache(args.cache, args.dataset or None, ds_kw, only_cached=True)
            elif args.dataset:
                dataset = build_eval_dataset(args.dataset, ds_kw)
            elif not (args.retrieval or args.classification):
                raise ValueError(
                    "name the images: --dataset NAME (or spec), --suite tipsv2|ovseg with --data-root DIR, "
                    "--cache CACHE for a cache's own images, --retrieval coco_karpathy / flickr30k_karpathy, "
                    "or --classification imagenet"
                )
        models = {
            name: build_model(spec, args.model_kwargs.get(name)).to(device).eval()
            for name, spec in args.models.items()
        }
        text_model = None
        if args.text_model in models:  # reuse an evaluated model's text tower (no second copy in memory)
            text_model = models[args.text_model]
        elif args.text_model:
            text_model = build_model(args.text_model).to(device).eval()
        retrieval_ds = _side_dataset(args.retrieval, args.retrieval_kwargs, args.retrieval_root, "retrieval")
        cls_ds = _side_dataset(
            args.classification, args.classification_kwargs, args.classification_root, "classification"
        )
        jobs: dict[str, Any] = {}  # task -> dataset
        if dataset is not None:
            if getattr(dataset, "task", None) == "classification":
                jobs["classification"] = dataset
            elif not getattr(dataset, "class_names", None):  # captioned images without labels: retrieval
                jobs["retrieval"] = dataset
            else:
                jobs["segmentation"] = dataset
        elif args.suite:
            jobs["segmentation"] = None
        for task, ds in (("retrieval", retrieval_ds), ("classification", cls_ds)):
            if ds is None or (task == "retrieval" and "segmentation" in jobs):
                continue  # with a segmentation set, retrieval goes into its report (compare_models)
            if task in jobs:
                raise ValueError(f"two {task} datasets (--dataset and --{task}); evaluate one per run")
            jobs[task] = ds
        shown = _global_jobs(args, models, text_model, jobs) if rank == 0 else ""
        if "segmentation" not in jobs:
            if rank == 0:
                save_config(args, Path(args.out) / CONFIG_NAME, command="tipsdistill-eval")
            if shown:
                print(shown)
            return 0
        layers: Any = args.layers or None
        if layers and layers != "all":
            layers = [int(x) for x in layers.split(",")]
        common: dict[str, Any] = {
            "text_model": text_model,
            "layers": layers,
            "num_examples": args.num_examples,
            "retrieval_dataset": retrieval_ds,
            "retrieval_image_size": args.retrieval_image_size,
            "cache_dir": None if args.text_cache == "none" else args.text_cache,
            "progress": args.progress,
            "plots": args.plots,
            "distributed": distributed,
            "num_workers": workers,
        }
        if args.suite:
            results = run_suite(
                models,
                args.suite,
                args.out,
                data_root=data_root,
                roots=roots,
                protocol=args.protocol,
                overrides=overrides,
                split=args.split,
                strict=args.strict,
                **common,
            )
        else:
            settings = resolve_settings(args.protocol, args.dataset or None, dataset, overrides)
            results = compare_models(
                models,
                dataset,
                settings,
                args.out,
                text_embeddings=args.text_embeddings or None,
                synonyms=args.synonyms or None,
                **common,
            )
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    if rank != 0:
        return 0
    save_config(args, Path(args.out) / CONFIG_NAME, command="tipsdistill-eval")
    print(Path(results["files"]["markdown"]).read_text())
    print("wrote: " + ", ".join(sorted(Path(f).name for f in results["files"].values())) + f" in {args.out}")
    if shown:
        print(shown)
    return 0


def _side_dataset(name: str, kwargs: dict[str, Any], root: str, task: str) -> Any:
    """The ``--retrieval`` / ``--classification`` dataset (``None`` when not asked)."""
    if not name:
        if kwargs or root:
            raise ValueError(f"--{task}-kwargs / --{task}-root given without --{task} NAME")
        return None
    from tipsdistill.distill.evaluation.datasets import build_eval_dataset

    kw = dict(kwargs)
    if root:
        kw["root"] = root
    return build_eval_dataset(name, kw)


def _global_jobs(args: EvalRunConfig, models: dict[str, Any], text_model: Any, jobs: dict[str, Any]) -> str:
    """Run the retrieval / classification jobs (a lone task writes to ``--out``; next to other tasks, to
    ``--out/<task>``); return their Markdown and where it went."""
    from tipsdistill.distill.evaluation.classification import classification_report
    from tipsdistill.distill.evaluation.retrieval import retrieval_report

    shown = []
    common = {"max_images": args.max_images, "batch_size": args.global_batch_size, "num_workers": args.global_workers,
              "progress": args.progress}  # fmt: skip
    for task, ds in jobs.items():
        if task == "segmentation":
            continue
        out = Path(args.out) if len(jobs) == 1 else Path(args.out) / task
        if task == "retrieval":
            res = retrieval_report(
                models, ds, out, text_model=text_model, image_size=args.retrieval_image_size, **common
            )
        else:
            res = classification_report(
                models, ds, out, text_model=text_model, image_size=args.classification_image_size,
                templates=args.classification_templates,
                text_embeddings=None if "segmentation" in jobs else (args.text_embeddings or None),
                cache_dir=None if args.text_cache == "none" else args.text_cache, **common,
            )  # fmt: skip
        shown.append(
            Path(res["files"]["markdown"]).read_text() + f"wrote: results.json, results.md in {out}\n"
        )
    return "\n".join(shown)


if __name__ == "__main__":
    sys.exit(main())
