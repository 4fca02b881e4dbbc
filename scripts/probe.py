"""Linear probes of a model's tokens on the synthetic scenes: what it *knows*, independent of text.

The command line of :mod:`distill.evaluation.probe`. Zero-shot segmentation measures knowledge and
text alignment together; when it is at chance, the probes tell the two apart. On the validation split (first half fits, second half scores):

- ``cls_auc``: object presence from the global tokens (both CLS tokens concatenated, L2-normalised):
  one logistic regression per object class, mean ROC AUC over the 14 objects (0.5 = chance);
- ``patch``: per-patch class (the majority label inside each patch) from the patch tokens of every
  block: softmax regression, mIoU over all 20 classes and over the 14 objects, on patches (the
  evaluation's ``ConfusionMatrix``: the same mIoU definition as ``tipsdistill-eval``);
- ``zero_shot_auc`` (models with a text tower): object presence scored by the cosine between CLS1/CLS2
  and the class prompt embeddings (9 TCL templates), no training.

A randomly initialised model of the same class gives the floor (``--random-baseline``).
``--learnability MINUTES`` asks the data question instead: it trains the model's architecture from
scratch, **supervised** on the per-patch labels of the training split for a wall-clock budget, and
scores the validation patches: how learnable the categories are for this architecture at CPU scale.

    python -m tipsdistill.scripts.probe                                   # the committed embedded teacher
    python -m tipsdistill.scripts.probe --model runs/demo/student/export  # a distilled student
    python -m tipsdistill.scripts.probe --model DIR --kind teacher        # an embedded-teacher folder
    python -m tipsdistill.scripts.probe --learnability 3 --version 1      # supervised ceiling on version-1 scenes
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from tipsdistill.cache.synthetic import SyntheticScenes
from tipsdistill.distill.evaluation.probe import learnability, load_model, probe, random_like, summary_line


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="embedded", help="'embedded', a teacher folder or a student export")
    ap.add_argument("--kind", choices=("auto", "teacher", "student"), default="auto")
    ap.add_argument("--val-size", type=int, default=500)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--version", type=int, default=None, help="synthetic scene version (default: current)")
    ap.add_argument("--steps", type=int, default=400, help="optimisation steps of each linear probe")
    ap.add_argument("--random-baseline", action="store_true", help="also probe a random-init copy")
    ap.add_argument(
        "--learnability",
        type=float,
        default=0.0,
        metavar="MINUTES",
        help="instead of probing: train the architecture supervised on per-patch labels for MINUTES",
    )
    ap.add_argument("--train-size", type=int, default=20000, help="training images for --learnability")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the numbers as JSON here")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    kw = {"version": args.version} if args.version is not None else {}
    val = SyntheticScenes("validation", size=args.val_size, image_size=args.image_size, **kw)
    model = load_model(args.model, args.kind).eval()
    if args.learnability > 0:
        train = SyntheticScenes("train", size=args.train_size, image_size=args.image_size, **kw)
        r = learnability(model, train, val, minutes=args.learnability)
        print(
            f"supervised per-patch training, {r['steps']} steps of {r['batch']} in {r['minutes']:.1f} min "
            f"(scenes v{val.version}): validation patch mIoU objects {r['miou_objects']:.1f} all {r['miou']:.1f}"
        )
        res = {"dataset": val.identity(), "learnability": r}
    else:
        res = {"model": args.model, "dataset": val.identity(), "probe": probe(model, val, args.steps)}
        if args.random_baseline:
            res["random_init"] = probe(random_like(model), val, args.steps)
        for name in ("probe", "random_init"):
            if name in res:
                print(summary_line(name, res[name]))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
