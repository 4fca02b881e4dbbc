"""``tipsdistill-train``: stage 2, distil (or pretrain) a student with DeepSpeed.

Examples::

    # one process, no launcher (the distributed env vars are set for you)
    tipsdistill-train --recipe distill cache.path=cache/ output_dir=runs/b16
    # 8 GPUs
    torchrun --nproc_per_node 8 -m tipsdistill.scripts.train --recipe distill cache.path=cache/ engine.zero_stage=2
    deepspeed --num_gpus 8 scripts/train.py --recipe distill cache.path=cache/
    # continue the newest complete checkpoint of output_dir
    tipsdistill-train --recipe distill cache.path=cache/ output_dir=runs/b16 --resume auto
    # a resume refuses a changed config or cache, naming every key; accept a change explicitly
    tipsdistill-train ... --resume auto optim.lr=1e-4 --allow-change optim.lr

SIGTERM / SIGUSR1 (preemption) end the current step, write a checkpoint and exit with 128 + the signal
(143 / 138) so the scheduler requeues the job; exit codes: 0 done, 2 bad input (a changed config, an
output_dir in use, ...), 3 diverged.

Overrides are dotted ``key=value`` pairs (values parsed as YAML, the one syntax of every command);
``--config FILE`` is ``--recipe FILE``; ``--print-config`` shows the resolved config and exits;
``--list-recipes`` lists the shipped recipes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tipsdistill-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--recipe",
        "--config",
        dest="recipe",
        default="distill",
        help="shipped recipe name or a YAML file (a run's config.yaml reruns it; default: distill)",
    )
    p.add_argument(
        "--resume", default="", help="'auto' (newest complete checkpoint of output_dir) or a checkpoint dir"
    )
    p.add_argument(
        "--allow-change",
        action="append",
        default=[],
        metavar="KEY",
        help="a resume may change this config key or section (e.g. optim.lr, loss), or cache.<identity field>; "
        "'all' accepts every change; repeatable (a resume otherwise refuses naming every changed key)",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="stop after this many optimizer steps (schedules unchanged)",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--list-recipes", action="store_true", help="list the shipped recipes and exit")
    p.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS
    )  # deepspeed launcher
    p.add_argument(
        "overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=1e-3 engine.zero_stage=2"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # key=value overrides may sit between the flags
    logging.basicConfig(
        level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from tipsdistill.distill.config import config_to_dict, list_recipes, load_config

    if args.list_recipes:
        print("\n".join(list_recipes()))
        return 0
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        cfg = load_config(args.recipe, args.overrides)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"tipsdistill-train: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        return 0
    from tipsdistill.cache.lock import CacheBusyError
    from tipsdistill.distill.resume import preempt_exit_code
    from tipsdistill.distill.train import TrainingDiverged, train

    try:
        result = train(
            cfg, resume=args.resume or None, max_steps=args.max_steps, allow_changes=args.allow_change
        )
    except TrainingDiverged as e:
        print(f"tipsdistill-train: {e}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError, CacheBusyError) as e:  # bad input found before training
        print(f"tipsdistill-train: {e}", file=sys.stderr)  # (cache, output_dir in use, changed config...)
        return 2
    if result.get("preempted"):  # SIGTERM / SIGUSR1: checkpoint written; the scheduler requeues the job
        code = preempt_exit_code(result["preempted"])
        print(
            f"tipsdistill-train: {result['preempted']}: stopped at step {result['step']} with a checkpoint; exit "
            f"code {code} (requeue); rerun with --resume auto to continue",
            file=sys.stderr,
        )
        return code
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            json.dumps(
                {"step": result["step"], "final": result["final"], "export": result["export"]}, indent=2
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
