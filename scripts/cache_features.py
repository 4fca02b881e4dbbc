"""``tipsdistill-cache``: stage 1, run a frozen teacher once over a dataset and write the HDF5 cache.

Examples::

    tipsdistill-cache --images photos/ --captions captions.jsonl --out cache/ \\
        --teacher timm --teacher-kw model_name=vit_base_patch14_reg1_tipsv2 --image-size 448
    torchrun --nproc_per_node 8 -m scripts.cache_features --config cache.yaml   # one shard per rank

Rerunning the same command resumes an interrupted cache (also after kill -9, a machine crash or a
full disk) and is a no-op on a complete one; ``--verify --out DIR`` checks a cache without changing
it; ``--repair`` (with the same command) repairs damaged shards keeping every intact sample.
See docs/cache.md "What happens when it crashes".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

from cache.extract import CacheConfig, extract_features
from cache.lock import CacheBusyError


def parse_kv(items: list[str] | None) -> dict[str, Any]:
    """``["a=1", "b=x", '{"c": [1, 2]}']`` -> ``{"a": 1, "b": "x", "c": [1, 2]}`` (values parsed as JSON when possible)."""
    out: dict[str, Any] = {}
    for item in items or []:
        item = item.strip()
        if item.startswith("{"):
            try:
                d = json.loads(item)
            except json.JSONDecodeError as e:
                raise SystemExit(f"error: cannot parse {item!r} as a JSON object: {e}") from e
            out.update(d)
            continue
        if "=" not in item:
            raise SystemExit(f"error: expected key=value or a JSON object, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tipsdistill-cache", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--config", help="YAML or JSON file of CacheConfig fields (command-line flags override it)"
    )
    p.add_argument("--out", help="output directory (shards + index.h5)")
    p.add_argument("--teacher", help="teacher registry name (e.g. timm) or package.module:factory")
    p.add_argument(
        "--teacher-kw",
        nargs="*",
        metavar="K=V",
        help="teacher keyword arguments: key=value ... or a JSON object",
    )
    p.add_argument(
        "--dataset", help="dataset registry name (folder, synthetic, ...) or package.module:factory"
    )
    p.add_argument(
        "--data-kw",
        nargs="*",
        metavar="K=V",
        help="dataset keyword arguments: key=value ... or a JSON object",
    )
    p.add_argument("--images", help="shorthand for --dataset folder --data-kw root=IMAGES")
    p.add_argument("--captions", help="captions JSON-lines file for the folder dataset")
    p.add_argument(
        "--image-size", type=int, nargs="+", help="side (or height width) teacher inputs are resized to"
    )
    p.add_argument("--resize", choices=["short_crop", "exact", "none"])
    p.add_argument("--storage", choices=["float16", "int8"])
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
    p.add_argument("--num-workers", type=int)
    p.add_argument("--flush-interval", type=float, dest="flush_interval_s")
    p.add_argument("--device")
    p.add_argument("--autocast", choices=["none", "bf16", "fp16"])
    p.add_argument("--min-side", type=int, help="skip images with a shorter side (default: one patch)")
    p.add_argument(
        "--verify",
        action="store_true",
        help="check the cache in --out (every done sample against its checksum, the index) and exit; changes nothing",
    )
    p.add_argument(
        "--repair",
        action="store_true",
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
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def config_from_args(args: argparse.Namespace) -> CacheConfig:
    base: dict[str, Any] = {}
    if args.config:
        text = Path(args.config).read_text(encoding="utf-8")
        if args.config.endswith((".yaml", ".yml")):
            import yaml

            base = yaml.safe_load(text) or {}
        else:
            base = json.loads(text)
    cfg = CacheConfig.from_dict(base)
    upd: dict[str, Any] = {}
    for name in (
        "out",
        "teacher",
        "dataset",
        "resize",
        "storage",
        "value_trick",
        "value_readout",
        "layer",
        "views",
    ):
        if getattr(args, name) is not None:
            upd[name] = getattr(args, name)
    for name in (
        "flip_prob",
        "view_seed",
        "batch_size",
        "num_workers",
        "flush_interval_s",
        "device",
        "autocast",
        "min_side",
    ):
        if getattr(args, name) is not None:
            upd[name] = getattr(args, name)
    if args.view_scale:
        upd["view_scale"] = list(args.view_scale)
    if args.image_size:
        upd["image_size"] = args.image_size[0] if len(args.image_size) == 1 else list(args.image_size[:2])
    if args.teacher_kw is not None:
        upd["teacher_kwargs"] = {**cfg.teacher_kwargs, **parse_kv(args.teacher_kw)}
    data_kw = {**cfg.dataset_kwargs, **parse_kv(args.data_kw)}
    if args.images:
        upd["dataset"] = "folder"
        data_kw["root"] = args.images
    if args.captions:
        data_kw["captions"] = args.captions
    upd["dataset_kwargs"] = data_kw
    if args.no_text:
        upd["granularities"] = []
    elif args.granularities:
        upd["granularities"] = [g.strip() for g in args.granularities.split(",") if g.strip()]
    if args.quiet:
        upd["progress"] = False
    if args.repair:
        upd["repair"] = True
    if args.no_fsync:
        upd["fsync"] = False
    if args.worker_start:
        upd["worker_start"] = args.worker_start
    cfg = dataclasses.replace(cfg, **upd)
    if cfg.dataset == "folder":
        if "root" not in cfg.dataset_kwargs:
            raise SystemExit("error: the folder dataset needs --images DIR (or --data-kw root=DIR)")
    return cfg


def verify_main(out: str | None) -> int:
    """``--verify``: print one line per shard and the index's findings; 0 when all is intact, else 1."""
    from cache.repair import verify_cache

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
        f"{sum(len(r.damaged) for r in reports)} damaged, {len(bad)} damaged shard(s), "
        f"{len(index_problems)} index problem(s)"
        + (
            "; rerun the same extraction command with --repair to keep the intact samples and redo the rest"
            if bad or index_problems
            else ""
        )
    )
    return 1 if bad or index_problems else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if args.verify:
        return verify_main(args.out)
    cfg = config_from_args(args)
    if args.print_config:
        print(json.dumps(dataclasses.asdict(cfg), indent=2, default=str))
        return 0
    try:
        summary = extract_features(cfg)
    except (ValueError, OSError, CacheBusyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if summary.get("skipped"):
        print(
            f"{len(summary['skipped'])} image(s) skipped; listed in the cache's 'skipped' dataset",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
