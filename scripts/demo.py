"""``tipsdistill-demo``: the whole pipeline on the embedded benchmark, on CPU, from a fresh clone.

1. **cache** (stage 1): the committed embedded teacher encodes the synthetic training split once into
   an HDF5 cache (patch tokens, both CLS tokens, caption text embeddings of the three granularities);
2. **distil** (stage 2): a smaller, randomly initialised TIPS-architecture student is trained from
   the cache with the recipe ``embedded`` (``distill/recipes/embedded.yaml``: the TIPSv2 distillation
   objectives, prototype cross-entropy on **every** patch token, mask ratio 0, CLIP against the cached
   caption embeddings, whole-image views so the patch targets are the cached teacher tokens
   themselves, no local crops hence no DINO term), DeepSpeed ZeRO-2 in one process;
3. **measure**: zero-shot segmentation of teacher and student on the validation split, same text
   embeddings (the teacher's locked text tower) and same settings: ``whole`` and ``slide``, TIPS
   value-trick and MaskCLIP readouts; mIoU over all 20 classes and over the 14 object classes; plus
   object mIoU by depth for both models. Prints the comparison table and writes ``report.md``,
   ``results.json`` and PNG figures to ``--out``.

The pipeline is :mod:`distill.embedded`; stage-2 settings are dotted overrides of the recipe
(``python -m tipsdistill.scripts.demo optim.lr=3e-3``, as ``tipsdistill-train`` takes them); the sizes of stage 1
and of the measurement are :class:`distill.embedded.DemoConfig` (``FULL``, ``QUICK``).

    python -m tipsdistill.scripts.demo            # about 11 minutes on 2 CPU cores
    python -m tipsdistill.scripts.demo --quick    # tiny sizes, under a minute (the test suite runs it)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

from tipsdistill.scripts import set_offline_cpu_defaults

if TYPE_CHECKING:  # importing distill.embedded imports timm: after set_offline_cpu_defaults
    from tipsdistill.distill.embedded import DemoConfig

CONFIG_NAME = "demo_config.yaml"  # the resolved demo config in --out (--config reruns it)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Embedded benchmark: cache -> distil -> measure (CPU).")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (under a minute), for tests")
    ap.add_argument("--out", default=None, help="output folder (default runs/demo or runs/demo-quick)")
    ap.add_argument("--teacher-path", default=None, help="teacher folder (default: the committed checkpoint)")
    ap.add_argument("--steps", type=int, default=None, help="override the number of distillation steps")
    ap.add_argument("--seed", type=int, default=None, help="training seed (initialisation, batches, crops)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument(
        "--config", default=None, help="YAML file of DemoConfig keys (a demo_config.yaml in --out reruns it)"
    )
    ap.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="YAML values; a DemoConfig key (val_size=20) sets the demo, any other key is a dotted stage-2 "
        "override of the embedded recipe, as tipsdistill-train takes them: loss.patch=cosine",
    )
    return ap


def demo_config(base: DemoConfig, file: str | None, overrides: list[str]) -> DemoConfig:
    """``base`` (FULL or QUICK), then ``file`` (YAML of DemoConfig keys), then the ``KEY=VALUE`` items that
    name a DemoConfig key; the other items are appended to its stage-2 ``overrides``. Strict and typed
    (:mod:`cache.config_layer`)."""
    from tipsdistill.cache.config_layer import from_dict, load_file, merge_dicts, parse_overrides, to_dict
    from tipsdistill.distill.embedded import DemoConfig

    own = {f.name for f in fields(DemoConfig)} - {"overrides"}
    mine = [o for o in overrides if o.partition("=")[0].strip() in own]
    stage2 = [o for o in overrides if o not in mine]
    merged = merge_dicts(to_dict(base), load_file(file, "demo config") if file else {})
    merged = merge_dicts(merged, parse_overrides(mine))
    return from_dict(DemoConfig, merged).with_overrides(*stage2)


def main(argv: list[str] | None = None) -> int:
    set_offline_cpu_defaults()
    args = build_parser().parse_intermixed_args(argv)  # key=value overrides may sit between the flags
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch

    from tipsdistill.cache.config_layer import save_config
    from tipsdistill.distill.embedded import FULL, QUICK, all_finite, run_demo

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    try:
        cfg = demo_config(QUICK if args.quick else FULL, args.config, args.overrides)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.steps is not None:
        cfg = cfg.with_overrides(f"steps={args.steps}")
    if args.seed is not None:
        cfg = cfg.with_overrides(f"seed={args.seed}")
    out = Path(args.out or ("runs/demo-quick" if args.quick else "runs/demo"))
    save_config(cfg, out / CONFIG_NAME, command="tipsdistill-demo")
    results = run_demo(cfg, out, args.teacher_path, progress=not args.no_progress)
    if not all_finite(results):
        print("error: some measured numbers are not finite; see results.json", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
