"""Experiments on the embedded benchmark: the headline over seeds, and the paper's ablations.

All runs share one stage-1 cache of the embedded teacher and are measured with the same zero-shot
segmentation settings (whole image; TIPS value-trick and MaskCLIP readouts; all 20 classes and the 14
object classes) on the validation split. Each variant is a list of dotted overrides of the
``embedded`` recipe (``distill.experiments.variants``; ``--only`` picks some):

- ``seed0``, ``seed1``, ``seed2``: the demo's distillation (random init, mask ratio 0, prototype CE);
- ``mask75``: the same with 75% of the student's patches masked (loss still on every token);
- ``cosine``: head-free cosine patch loss instead of prototype cross-entropy;
- ``deep_random`` / ``deep_teacher_init``: a student with the teacher's architecture, from random
  init or initialised from the teacher's weights (the paper's "stays in the teacher's basin" ablation);
- how fast the teacher's knowledge reaches the student: ``crop_view`` (global crops of 50-100 % of the
  area, whose patch targets are roi_align-interpolated from the cached full-image grid), ``full_view``
  (the whole image: the targets are the cached teacher tokens themselves), ``full_view_nolocal``
  (``full_view`` without local crops, hence without the DINO CLS term), ``with_locals`` (2 local crops
  of 32 px + DINO), ``lr3e-3`` (learning rate 3e-3), ``teacher_temp04`` (prototype-target temperature
  0.04 instead of 0.07).

``--base previous`` starts every variant from the demo's settings before full-view targets (400 steps,
global crops of 50-100 % area, 2 local crops + DINO); the default base is the demo's.

Runs with the student's **own** trainable TIPS-style text tower (random init, the teacher's
SentencePiece vocabulary, width 96, 2 layers, 3 heads: the teacher's text layout), each evaluated with
its own text tower (plus retrieval recall on the validation captions):

- ``pretrain_tipsv2`` / ``pretrain_tips``: no teacher, recipes ``pretrain-tipsv2`` (iBOT++ 75 %
  masking, head-only EMA, CLS2 on short/detailed captions) and ``pretrain-tips`` (iBOT on masked
  tokens only, full EMA teacher, short captions), sized like the demo (batch 64, width 96, depth 4,
  lr 1e-3, 40 warm-up steps) but with random global crops of 50-100 % area and 2 local crops of 32 px;
  measured with ``--steps 400``; the recipes' teacher-temperature warm-up (3000 of 90000 steps) is
  scaled to the same fraction of the steps (13 of 400);
- ``distill_text``: ``seed0`` with a trainable student text tower instead of the cached (locked)
  teacher caption embeddings (``loss.text_source=student``; same cache).

The paper's Table 2 (the student's text tower: random vs pretrained init, trained vs frozen), each
``seed0`` with ``loss.text_source=student`` and measured with its own tower, next to ``seed0`` (the
locked cached caption embeddings) and ``distill_text`` (random init, trained):

- ``distill_text_frozen``: the random-init TIPS-style tower above, frozen;
- ``distill_text_pretrained``: a trainable copy of the embedded teacher's own text tower (all-MiniLM-L6-v2
  + the teacher's trained projection: ``student.kwargs.text={kind: teacher, teacher: embedded}``);
- ``distill_text_pretrained_frozen``: the same copy frozen (the teacher's text, computed online).

Several teachers (``distill.multi``): ``multi_tips_eff_seed0..2``, the embedded teacher + the bundled
EfficientNet-Lite0 (its cache built once into ``OUT/cache_eff``) into one student, measured zero-shot
through the ``tips`` adaptor with linear probes through each adaptor (``probes`` in the JSON);
``multi_tips_seed0..2``, the same adaptor losses with the embedded teacher alone; ``multi_tips_eff_proto_seed*``
and ``multi_tips_proto_seed*``: the same with the embedded teacher's patch term through a prototype head.

Prints a table (mean and spread over seeds) and writes ``experiments.json`` / ``experiments.md``.

    python -m tipsdistill.scripts.experiments --out runs/experiments            # everything (long on 2 cores)
    python -m tipsdistill.scripts.experiments --only seed0,mask75 --steps 300
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

from tipsdistill.scripts import set_offline_cpu_defaults


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description="Embedded-benchmark experiments (headline over seeds + ablations)."
    )
    ap.add_argument("--out", default="runs/experiments")
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    ap.add_argument(
        "--steps", type=int, default=None, help="distillation steps per run (default: the demo's)"
    )
    ap.add_argument(
        "--base",
        choices=("demo", "previous"),
        default="demo",
        help="settings every variant starts from: the demo's, or the demo's before full-view targets "
        "(400 steps, 50-100%% crops, 2 local crops + DINO)",
    )
    ap.add_argument("--val-size", type=int, default=None)
    ap.add_argument("--train-size", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--teacher-path", default=None)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 when running jobs side by side)")
    ap.add_argument("--cache", default=None, help="reuse this stage-1 cache (e.g. runs/demo/cache/index.h5)")
    ap.add_argument(
        "--storage", choices=("float16", "int8"), default=None, help="stage-1 storage dtype (default float16)"
    )
    ap.add_argument(
        "--reduce-dim",
        type=int,
        default=None,
        help="stage 1 stores patch tokens as this many PCA coefficients (cache/reduce.py; default: full dim)",
    )
    ap.add_argument(
        "--reuse",
        action="append",
        default=[],
        help="NAME=EXPORT_DIR: measure an existing student export as variant NAME instead of training it "
        "(e.g. seed0=runs/demo/student/export, same settings as the demo)",
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    set_offline_cpu_defaults()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch

    from tipsdistill.distill.embedded import FULL
    from tipsdistill.distill.experiments import BASES, all_finite, run_experiments, summarise

    torch.set_num_threads(args.threads)
    bench = FULL
    if args.val_size:
        bench = replace(bench, val_size=args.val_size)
    if args.train_size:
        bench = replace(bench, train_size=args.train_size)
    base = list(BASES[args.base]) + [f"engine.cpu_threads={args.threads}"]
    if args.steps:
        base.append(f"steps={args.steps}")
    if args.batch_size:
        base.append(f"data.batch_size={args.batch_size}")
    reuse = dict(r.split("=", 1) for r in args.reuse)
    try:
        results = run_experiments(
            bench,
            Path(args.out),
            only=[n for n in args.only.split(",") if n],
            base=base,
            teacher_path=args.teacher_path,
            cache=args.cache,
            reuse=reuse,
            cache_overrides={
                k: v for k, v in (("storage", args.storage), ("reduce_dim", args.reduce_dim)) if v is not None
            },
        )
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc
    print(summarise(results))
    return 0 if all_finite(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
