"""``tipsdistill-eval``: zero-shot segmentation, image-text retrieval and zero-shot classification of one or
several models.

Model specs (``--model NAME=SPEC``, repeatable; ``distill.evaluation.models``):
  ``teacher:<registry name>[:<json kwargs>]``   e.g. ``teacher:timm:{"model_name": "vit_base_patch14_reg4_dinov2"}``
  ``student:<dir>``                             a student export, a checkpoint (.../checkpoints/step_N) or a run dir
  ``python:<module>:<factory>[:<json kwargs>]`` any callable returning a DenseEncoder
A bare existing directory is a student export or an embedded-teacher folder (by its config.json);
a bare name is a teacher.
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
import logging
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger("tipsdistill.eval")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tipsdistill-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", action="append", required=True, help="NAME=SPEC (repeatable); see above")
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
        "--dataset-kwargs", default=None, help='JSON kwargs, e.g. {"split": "validation", "size": 8}'
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
        "--retrieval-kwargs", default=None, help='JSON kwargs of the retrieval dataset, e.g. {"json": ...}'
    )
    r.add_argument("--retrieval-image-size", type=int, default=224)
    r.add_argument(
        "--classification", default=None, help="labelled image set for zero-shot top-1/5: imagenet"
    )
    r.add_argument(
        "--classification-root", default=None, help="shortcut for classification dataset kwarg root="
    )
    r.add_argument(
        "--classification-kwargs", default=None, help='JSON kwargs, e.g. {"classes": ["n01440764"]}'
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


# command-line flag -> SegmentationSettings key (explicit flags override the protocol)
SETTING_FLAGS = {
    "mode": "mode",
    "window": "window",
    "stride": "stride",
    "readout": "readout",
    "layer": "layer",
    "templates": "templates",
    "background_threshold": "background_threshold",
    "background_class": "background_class",
    "background_text": "background_text",
    "background_names": "background_names",
    "resize_backend": "resize_backend",
    "resize_rule": "resize_rule",
    "max_long_side": "max_long_side",
    "resize_interpolation": "resize_interpolation",
    "window_softmax": "window_softmax",
    "logit_scale": "logit_scale",
    "synonym_reduce": "synonym_reduce",
    "area_threshold": "area_threshold",
    "window_batch": "window_batch",
    "image_batch": "image_batch",
    "amp": "amp",
    "max_images": "max_images",
}


def setting_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The protocol settings given explicitly on the command line (they override ``--protocol``)."""
    out = {key: getattr(args, flag) for flag, key in SETTING_FLAGS.items() if getattr(args, flag) is not None}
    if args.image_size is not None:
        out["image_size"] = args.image_size or None
    if "background_names" in out:
        out["background_names"] = [n.strip() for n in out["background_names"].split(",") if n.strip()]
    return out


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
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from tipsdistill.distill.evaluation import compare_models
    from tipsdistill.distill.evaluation.datasets import build_eval_dataset
    from tipsdistill.distill.evaluation.models import build_model, json_kwargs, parse_models
    from tipsdistill.distill.evaluation.protocols import (
        get_protocol,
        parse_data_roots,
        resolve_settings,
        run_suite,
        suite_datasets,
    )

    distributed, rank, shown = False, 0, ""
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
        overrides = setting_overrides(args)
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
            ds_kw = json_kwargs(args.dataset_kwargs, "--dataset-kwargs")
            if data_root:
                ds_kw["root"] = data_root
            if args.data_allow_root:
                ds_kw["allow_root"] = [str(Path(d).resolve()) for d in args.data_allow_root]
            if args.cache:
                from tipsdistill.cache.dataset_spec import source_for_cache

                dataset = source_for_cache(args.cache, args.dataset, ds_kw, only_cached=True)
            elif args.dataset:
                dataset = build_eval_dataset(args.dataset, ds_kw)
            elif not (args.retrieval_dataset or args.classification):
                raise ValueError(
                    "name the images: --dataset NAME (or spec), --suite tipsv2|ovseg with --data-root DIR, "
                    "--cache CACHE for a cache's own images, --retrieval coco_karpathy / flickr30k_karpathy, "
                    "or --classification imagenet"
                )
        models = {
            name: build_model(spec).to(device).eval() for name, spec in parse_models(args.model).items()
        }
        text_model = None
        if args.text_model in models:  # reuse an evaluated model's text tower (no second copy in memory)
            text_model = models[args.text_model]
        elif args.text_model:
            text_model = build_model(args.text_model).to(device).eval()
        retrieval_ds = _side_dataset(
            args.retrieval_dataset, args.retrieval_kwargs, args.retrieval_root, "retrieval"
        )
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
            if shown:
                print(shown)
            return 0
        layers: Any = args.layers
        if layers and layers != "all":
            layers = [int(x) for x in layers.split(",")]
        common: dict[str, Any] = {
            "text_model": text_model,
            "layers": layers,
            "num_examples": args.num_examples,
            "retrieval_dataset": retrieval_ds,
            "retrieval_image_size": args.retrieval_image_size,
            "cache_dir": None if args.text_cache == "none" else args.text_cache,
            "progress": not args.quiet,
            "plots": not args.no_plots,
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
            settings = resolve_settings(args.protocol, args.dataset, dataset, overrides)
            results = compare_models(
                models,
                dataset,
                settings,
                args.out,
                text_embeddings=args.text_embeddings,
                synonyms=args.synonyms,
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
    print(Path(results["files"]["markdown"]).read_text())
    print("wrote: " + ", ".join(sorted(Path(f).name for f in results["files"].values())) + f" in {args.out}")
    if shown:
        print(shown)
    return 0


def _side_dataset(name: str | None, kwargs: str | None, root: str | None, task: str) -> Any:
    """The ``--retrieval`` / ``--classification`` dataset (``None`` when not asked)."""
    if not name:
        if kwargs or root:
            raise ValueError(f"--{task}-kwargs / --{task}-root given without --{task} NAME")
        return None
    from tipsdistill.distill.evaluation.datasets import build_eval_dataset
    from tipsdistill.distill.evaluation.models import json_kwargs

    kw = json_kwargs(kwargs, f"--{task}-kwargs")
    if root:
        kw["root"] = root
    return build_eval_dataset(name, kw)


def _global_jobs(
    args: argparse.Namespace, models: dict[str, Any], text_model: Any, jobs: dict[str, Any]
) -> str:
    """Run the retrieval / classification jobs (a lone task writes to ``--out``; next to other tasks, to
    ``--out/<task>``); return their Markdown and where it went."""
    from tipsdistill.distill.evaluation.classification import classification_report
    from tipsdistill.distill.evaluation.retrieval import retrieval_report

    shown = []
    common = {"max_images": args.max_images, "batch_size": args.global_batch_size, "num_workers": args.global_workers,
              "progress": not args.quiet}  # fmt: skip
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
                text_embeddings=None if "segmentation" in jobs else args.text_embeddings,
                cache_dir=None if args.text_cache == "none" else args.text_cache, **common,
            )  # fmt: skip
        shown.append(
            Path(res["files"]["markdown"]).read_text() + f"wrote: results.json, results.md in {out}\n"
        )
    return "\n".join(shown)


if __name__ == "__main__":
    sys.exit(main())
