"""``tipsdistill-cache``: stage 1, run a frozen teacher once over a dataset and write the HDF5 cache.

Examples::

    tipsdistill-cache --images photos/ --captions captions.jsonl --out cache/ \\
        --teacher timm:vit_base_patch14_reg1_tipsv2 --image-size 448
    tipsdistill-cache --data 'wds:/data/cc3m/{00000..00331}.tar' --caption short=json.short_caption ...
    tipsdistill-cache --data parquet:captions.parquet --image-column path --caption alt=caption ...
    tipsdistill-cache --data hf:my_saved_dataset --caption alt=text ...
    tipsdistill-cache --data hf:org/name --streaming --caption alt=text ...   # parquet files read as a stream
    torchrun --nproc_per_node 8 -m tipsdistill.scripts.cache_features --config cache.yaml   # one shard per rank
    tipsdistill-cache --config cache.yaml batch_size=16 dataset_kwargs.caption_fields.alt=txt   # dotted overrides

Dataset specs (--data): wds:PATTERN (braces expanded), parquet:/csv:/tsv:FILE, hf:PATH_OR_NAME, a folder,
or a registered name (synthetic, ...); see cache/dataset_spec.py. The resolved spec is recorded in the cache, so
stage 2 and evaluation find the images from the cache alone.

Rerunning the same command resumes an interrupted cache (also after kill -9, a machine crash or a
full disk) and is a no-op on a complete one; ``--verify --out DIR`` checks a cache without changing
it; ``--repair`` (with the same command) repairs damaged shards keeping every intact sample.
See docs/cache.md "What happens when it crashes".
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from tipsdistill.cache.config_layer import (
    load_file,
    merge_dicts,
    parse_kwargs,
    parse_overrides,
    parse_teacher_spec,
    save_config,
    to_dict,
)
from tipsdistill.cache.dataset_spec import caption_fields_for, parse_dataset_spec
from tipsdistill.cache.extract import CacheConfig, extract_features
from tipsdistill.cache.lock import CacheBusyError

CONFIG_NAME = "cache_config.yaml"


def parse_kv(items: list[str] | None, what: str = "key=value arguments") -> dict[str, Any]:
    """``["a=1", "b=x"]`` -> ``{"a": 1, "b": "x"}``: the one value syntax (YAML values,
    :func:`cache.config_layer.parse_kwargs`); a JSON object item is still read, with a deprecation warning."""
    try:
        return parse_kwargs(items, what)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from e


def build_parser() -> argparse.ArgumentParser:
    """Flags whose ``dest`` is a :class:`CacheConfig` field override that field directly."""
    p = argparse.ArgumentParser(
        prog="tipsdistill-cache", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--config",
        help="YAML file of CacheConfig keys (a cache's cache_config.yaml reruns it); flags and overrides win",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted CacheConfig overrides (YAML values), applied last: batch_size=16 teacher_kwargs.img_size=448",
    )
    p.add_argument("--out", help="output directory (shards + index.h5); config key out")
    p.add_argument(
        "--teacher",
        help="teacher spec: a registry name (embedded, timm, hf, tips), KIND:VALUE (timm:MODEL_NAME, "
        "hf:REPO_OR_DIR, embedded:DIR) or package.module:factory; config key teacher",
    )
    p.add_argument(
        "--teacher-kw",
        nargs="*",
        metavar="K=V",
        help="teacher keyword arguments, key=value (YAML values); config key teacher_kwargs",
    )
    d = p.add_argument_group("data (one of --data, --images, --dataset)")
    d.add_argument(
        "--data",
        metavar="SPEC",
        help="dataset spec: wds:/d/{00000..00009}.tar, parquet:f.parquet, csv:f.csv, tsv:f.tsv, hf:name_or_dir, "
        "a folder, or a registered name",
    )
    d.add_argument("--image-column", "--image-field", dest="image_field", help="image column / field")
    d.add_argument(
        "--caption",
        action="append",
        metavar="GRAN=FIELD",
        help="caption granularity (alt/short/detailed) -> column, member extension or json.KEY; repeatable. "
        "Defaults: webdataset alt=txt, tables and HF alt=caption",
    )
    d.add_argument("--no-captions", action="store_true", help="the dataset has no caption fields")
    d.add_argument("--split", help="split of an HF dataset")
    d.add_argument(
        "--streaming",
        action="store_true",
        help="hf: datasets: read the parquet data files as a stream (nothing downloaded or converted up front); "
        "config key dataset_kwargs.streaming",
    )
    d.add_argument(
        "--dataset", help="dataset registry name (folder, synthetic, ...) or package.module:factory"
    )
    d.add_argument(
        "--data-kw",
        nargs="*",
        metavar="K=V",
        help="dataset keyword arguments, key=value (YAML values); config key dataset_kwargs",
    )
    d.add_argument(
        "--data-allow-root",
        action="append",
        metavar="DIR",
        help="tables and HF datasets: also read image paths under DIR (cells outside the table's folder are "
        "refused otherwise); repeatable",
    )
    d.add_argument("--images", help="shorthand for --dataset folder --data-kw root=IMAGES")
    d.add_argument("--captions", help="captions JSON-lines file for the folder dataset")
    p.add_argument(
        "--image-size", type=int, nargs="+", help="side (or height width) teacher inputs are resized to"
    )
    p.add_argument("--resize", choices=["short_crop", "exact", "none"])
    p.add_argument("--storage", choices=["float16", "int8"])
    p.add_argument(
        "--reduce-dim",
        type=int,
        metavar="K",
        help="store patch tokens as K PCA coefficients (basis fitted on the first --reduce-fit-images images; "
        "float16 or, with --storage int8, int8 on top); 0: full dimension",
    )
    p.add_argument("--reduce-fit-images", type=int, help="images the PCA basis is fitted on (default 1024)")
    p.add_argument(
        "--reduce-fit-tokens", type=int, help="at most this many tokens, seeded sample (default 262144)"
    )
    p.add_argument("--reduce-seed", type=int, help="seed of the token sample the basis is fitted on")
    p.add_argument(
        "--value-trick", action="store_true", default=None, help="also store value-trick patch tokens"
    )
    p.add_argument("--value-readout", choices=["tips", "maskclip"])
    p.add_argument("--layer", type=int, help="block to read (default: last)")
    p.add_argument("--views", type=int, help="views per image (crops + flips, boxes stored)")
    p.add_argument("--view-scale", type=float, nargs=2)
    p.add_argument("--flip-prob", type=float)
    p.add_argument("--view-seed", type=int)
    p.add_argument(
        "--granularities", help="comma-separated caption granularities to embed (default alt,short,detailed)"
    )
    p.add_argument("--no-text", action="store_true", help="do not embed captions")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--num-workers", type=int, help="DataLoader workers (default -1: fitted to the cores)")
    p.add_argument(
        "--threads", type=int, dest="num_threads", help="torch intra-op threads (default 0: fitted)"
    )
    p.add_argument("--flush-interval", type=float, dest="flush_interval_s")
    p.add_argument("--device")
    p.add_argument(
        "--autocast",
        choices=["auto", "none", "bf16", "fp16"],
        help="teacher autocast on CUDA; default auto: accelerate's mixed precision when it is bf16/fp16 "
        "(accelerate launch --mixed_precision), else bf16 on a GPU (float32 on the CPU); none: float32",
    )
    p.add_argument(
        "--tf32",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="TF32 matmuls and convolutions on CUDA (default: on unless --autocast none)",
    )
    p.add_argument("--min-side", type=int, help="skip images with a shorter side (default: one patch)")
    p.add_argument(
        "--max-pixels",
        type=int,
        help="skip images with more pixels, before decoding them (default Pillow's limit, 89478485; 0: no cap)",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="check the cache in --out (every done sample against its checksum, the index) and exit; changes nothing",
    )
    p.add_argument(
        "--repair",
        action="store_true",
        default=None,
        help="check every done sample first and repair damaged shards, keeping intact samples, then resume",
    )
    p.add_argument(
        "--worker-start", choices=["forkserver", "spawn", "fork"], help="DataLoader worker start method"
    )
    p.add_argument(
        "--no-fsync",
        action="store_true",
        help="flush without fsync (safe against kills, not machine crashes)",
    )
    e = p.add_argument_group("disk estimate (nothing runs, no weights are loaded)")
    e.add_argument(
        "--estimate",
        action="store_true",
        help="print bytes per image and the total for the dataset (--num-images N, --dataset-size NAME, or the "
        "--data/--images/--dataset spec, counted) and exit; --teacher: a known shape (vit-b/14 ... vit-g/14), "
        "tips:B|L|SO|g, timm:MODEL, timm with --teacher-kw model_name=..., or --teacher-dim/--patch-size",
    )
    e.add_argument(
        "--estimate-table",
        action="store_true",
        help="print the table of bytes per image and per dataset for the known teachers at 224 and 448 px",
    )
    e.add_argument("--num-images", type=int, help="dataset size for --estimate")
    e.add_argument(
        "--dataset-size", help="a named dataset size for --estimate (cc3m, cc12m, imagenet-1k, datacomp-1b)"
    )
    e.add_argument("--teacher-dim", type=int, help="feature dim for --estimate (with --patch-size)")
    e.add_argument("--patch-size", type=int, help="patch size for --estimate (with --teacher-dim)")
    e.add_argument("--global-tokens", type=int, default=2, help="global (CLS/register) tokens for --estimate")
    e.add_argument(
        "--text-dim", type=int, default=0, help="caption embedding dim for --estimate (0: no text)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def _data_from_args(args: argparse.Namespace, base: dict[str, Any]) -> dict[str, Any]:
    """``dataset`` / ``dataset_kwargs`` from --data / --images / --dataset and the column options."""
    extra: dict[str, Any] = {}
    if args.image_field:
        extra["image_field"] = args.image_field
    given_caps = (
        None if args.no_captions else {str(g): str(f) for g, f in parse_kv(args.caption, "--caption").items()}
    )
    if args.no_captions:
        extra["caption_fields"] = {}
    if args.split:
        extra["split"] = args.split
    if args.streaming:
        extra["streaming"] = True
    upd: dict[str, Any] = {}
    given = [n for n in ("data", "images", "dataset") if getattr(args, n)]
    if len(given) > 1:
        raise SystemExit(
            f"error: give one of --data, --images, --dataset (got {', '.join('--' + g for g in given)})"
        )
    if args.data:
        try:
            spec = parse_dataset_spec(args.data, **extra)
        except ValueError as e:
            raise SystemExit(f"error: --data: {e}") from e
        upd = {"dataset": spec.name, "dataset_kwargs": spec.kwargs}
        if args.streaming and spec.name != "hf":
            raise SystemExit(
                f"error: --streaming is for hf: datasets; {args.data} ({spec.name}) is already read shard by shard"
            )
        if given_caps and spec.name in ("webdataset", "table", "hf"):  # --caption adds to the defaults
            upd["dataset_kwargs"]["caption_fields"] = caption_fields_for(spec.name, given_caps)
    elif args.images:
        upd = {"dataset": "folder", "dataset_kwargs": {"root": args.images}}
    elif args.dataset:
        upd = {"dataset": args.dataset, "dataset_kwargs": {}}
    kw = dict(upd.get("dataset_kwargs", base.get("dataset_kwargs") or {}))
    if not args.data:
        kw.update(extra)
        if given_caps:
            kw["caption_fields"] = caption_fields_for(upd.get("dataset", base.get("dataset", "")), given_caps)
    if args.captions:
        kw["captions"] = args.captions
    if args.data_allow_root:
        kw["allow_root"] = [str(Path(d).resolve()) for d in args.data_allow_root]
    kw.update(parse_kv(args.data_kw, "--data-kw"))
    upd["dataset_kwargs"] = kw
    return upd


def config_from_args(args: argparse.Namespace) -> CacheConfig:
    """Build the stage-1 config once: defaults, then ``--config FILE``, then the flags (aliases of config
    keys), then dotted overrides; strict and typed (:mod:`cache.config_layer`). The teacher spec is resolved the
    one way (``timm:MODEL`` -> ``teacher=timm``, ``teacher_kwargs.model_name=MODEL``)."""
    try:
        base = load_file(args.config, "cache config") if args.config else {}
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from e
    names = {f.name for f in dataclasses.fields(CacheConfig)}
    flags = {k: v for k, v in vars(args).items() if k in names and v is not None}
    flags.pop("dataset", None)  # handled with the other data options
    if args.image_size:
        flags["image_size"] = args.image_size[0] if len(args.image_size) == 1 else list(args.image_size[:2])
    if args.teacher_kw is not None:
        flags["teacher_kwargs"] = {
            **base.get("teacher_kwargs", {}),
            **parse_kv(args.teacher_kw, "--teacher-kw"),
        }
    if args.no_text:
        flags["granularities"] = []
    elif args.granularities:
        flags["granularities"] = [g.strip() for g in args.granularities.split(",") if g.strip()]
    if args.quiet:
        flags["progress"] = False
    if args.no_fsync:
        flags["fsync"] = False
    merged = merge_dicts(base, flags, shallow=()) | _data_from_args(
        args, base
    )  # a new dataset replaces the file's kwargs
    try:
        merged = merge_dicts(merged, parse_overrides(args.overrides or []), shallow=())
        cfg = CacheConfig.from_dict(merged)
        teacher, teacher_kwargs = parse_teacher_spec(cfg.teacher, cfg.teacher_kwargs)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"error: {e}") from e
    cfg = dataclasses.replace(cfg, teacher=teacher, teacher_kwargs=teacher_kwargs)
    if cfg.dataset == "folder" and "root" not in cfg.dataset_kwargs:
        raise SystemExit("error: the folder dataset needs --images DIR (or --data DIR)")
    return cfg


def verify_main(out: str | None) -> int:
    """``--verify``: print one line per shard and the index's findings; 0 when all is intact, else 1."""
    from tipsdistill.cache.repair import verify_cache

    if not out:
        raise SystemExit("error: --verify needs --out DIR (the cache to check)")
    reports, index_problems = verify_cache(Path(out))
    for r in reports:
        print(r.line())
    for p in index_problems:
        print(p)
    bad = [r for r in reports if not r.ok]
    print(
        f"verified {len(reports)} shard(s): {sum(r.intact for r in reports)} intact samples, "
        f"{sum(len(r.damaged) for r in reports)} damaged ({sum(len(r.nonfinite) for r in reports)} of them "
        f"non-finite), {len(bad)} damaged shard(s), "
        f"{len(index_problems)} index problem(s)"
        + (
            "; rerun the same extraction command with --repair to keep the intact samples and redo the rest"
            if bad or index_problems
            else ""
        )
    )
    return 1 if bad or index_problems else 0


def estimate_main(args: argparse.Namespace) -> int:
    """``--estimate`` / ``--estimate-table``: bytes per image and per dataset, before anything runs."""
    from tipsdistill.cache import estimate as est

    grans: list[str] | tuple[str, ...] = ("alt", "short", "detailed")
    if args.no_text:
        grans = []
    elif args.granularities:
        grans = [g.strip() for g in args.granularities.split(",") if g.strip()]
    kw = dict(views=args.views or 1, value_trick=bool(args.value_trick), granularities=grans)
    if args.estimate_table:
        sizes = list(args.image_size) if args.image_size else [224, 448]
        storages = [("float16", 0), ("int8", 0), ("float16", 256), ("int8", 256)]
        if args.reduce_dim or args.storage:
            storages = [(args.storage or "float16", args.reduce_dim or 0)]
        print(est.estimate_table(list(est.KNOWN_SHAPES.values()), sizes, storages, est.KNOWN_DATASETS, **kw))
        return 0
    try:
        if args.teacher_dim or args.patch_size:
            if not (args.teacher_dim and args.patch_size):
                raise ValueError("--teacher-dim and --patch-size go together")
            shape = est.TeacherShape(
                "custom", args.teacher_dim, args.patch_size, args.global_tokens, args.text_dim
            )
        elif args.teacher:
            shape = est.teacher_shape(args.teacher, parse_kv(args.teacher_kw, "--teacher-kw"))
        else:
            raise ValueError(
                "--estimate needs --teacher (e.g. vit-l/14, tips:g, timm:MODEL) or --teacher-dim/--patch-size"
            )
        n, label = args.num_images, ""
        if args.dataset_size:
            key = args.dataset_size.lower()
            if key not in est.KNOWN_DATASETS:
                raise ValueError(
                    f"unknown --dataset-size {args.dataset_size!r}; known: {sorted(est.KNOWN_DATASETS)} (or --num-images N)"
                )
            n, label = est.KNOWN_DATASETS[key], f"{key}, nominal"
        elif n is None and (args.data or args.images or args.dataset):
            from tipsdistill.cache.extract import make_dataset

            cfg = config_from_args(args)
            n, label = len(make_dataset(cfg.dataset, dict(cfg.dataset_kwargs))), f"{cfg.dataset}, counted"
        size = args.image_size[0] if args.image_size else 224
        print(
            est.describe(
                shape,
                size,
                n,
                label,
                storage=args.storage or "float16",
                reduce_dim=args.reduce_dim or 0,
                **kw,
            )
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # key=value overrides may sit between the flags
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if args.verify:
        return verify_main(args.out)
    if args.estimate or args.estimate_table:
        return estimate_main(args)
    cfg = config_from_args(args)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    try:
        summary = extract_features(cfg)
    except (ValueError, OSError, CacheBusyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:  # the resolved config beside the cache: --config reruns it
        save_config(cfg, Path(cfg.out) / CONFIG_NAME, command="tipsdistill-cache")
    if summary.get("skipped"):
        print(
            f"{len(summary['skipped'])} image(s) skipped; listed in the cache's 'skipped' dataset",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
