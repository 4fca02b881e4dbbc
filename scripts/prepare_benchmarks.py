"""The standard zero-shot segmentation benchmarks: list them, and make the COCO-Object labels.

The command line of :mod:`distill.evaluation.benchmarks` (docs/evaluation.md, "Standard benchmarks").

    python -m tipsdistill.scripts.prepare_benchmarks list                                     # names, folders, classes, presets
    python -m tipsdistill.scripts.prepare_benchmarks convert-coco-object data/coco_stuff164k  # *_instanceTrainIds.png (val)
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from tipsdistill.distill.evaluation.benchmarks import benchmarks_table, convert_coco_object


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tipsdistill.scripts.prepare_benchmarks", description=__doc__.split("\n\n")[0]
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="print the benchmarks, their folders, classes and background presets")
    c = sub.add_parser(
        "convert-coco-object",
        help="write COCO-Object labels (*_instanceTrainIds.png) next to COCO-Stuff's *_labelTrainIds.png "
        "(GroupViT's convert_coco_object.py)",
    )
    c.add_argument("root", help="the coco_stuff164k folder (images/, annotations/)")
    c.add_argument("--split", default="val", help="val (default) or train")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.cmd == "list":
        print(benchmarks_table())
        return 0
    try:
        res = convert_coco_object(args.root, args.split, progress=not args.quiet)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {res['written']} COCO-Object label maps in {res['folder']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
