"""Random kill -9 / resume rounds of stage 1 on a real folder of images (``cache.faults``).

Example (the issue's scenario, 5 rounds)::

    python -m tipsdistill.scripts.faults --rounds 5 --images photos/ --work /tmp/faults -- \\
        --teacher efficientnet-lite0 --image-size 160 --batch-size 8 --quiet

Everything after ``--`` is passed to ``tipsdistill-cache`` (``--images`` and ``--out`` are added).
Prints one line per round (kills: how, when, done samples after each), then rounds, samples lost
(goal 0) and whether every final cache equals the uninterrupted reference run's, dataset by dataset.

Stage 2 (``--stage 2``, ``distill.faults``): everything after ``--`` is passed to ``tipsdistill-train``
(``output_dir=`` and ``--resume auto`` are added); each hit is a ``kill -9`` of the process group or a
SIGTERM (preemption)::

    python -m tipsdistill.scripts.faults --stage 2 --rounds 4 --work /tmp/faults2 --kill-after 8 25 -- \
        --recipe distill cache.path=cache/ steps=40 checkpoint.every=10

Prints one line per round (hits: how, when, the last logged step, the newest checkpoint after it),
then rounds, hits, steps lost to SIGTERM (goal 0) and whether every final log equals the reference's.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tipsdistill.cache.faults import main_cmd, run_rounds


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--stage", type=int, choices=(1, 2), default=1, help="1: tipsdistill-cache; 2: tipsdistill-train"
    )
    p.add_argument("--images", help="stage 1: folder of images (recursive jpg/png/webp)")
    p.add_argument(
        "--work", default="/tmp/tipsdistill-faults", help="where the reference and round caches go"
    )
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--max-kills", type=int, default=3, help="kills per round: 1..this many, at random")
    p.add_argument("--kill-after", type=float, nargs=2, default=(2.0, 12.0), metavar=("MIN", "MAX"),
                   help="seconds after the start a kill lands (capped at 0.9x the reference run's time)")  # fmt: skip
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.stage == 2:
        return _stage2(args, extra)
    if not args.images:
        p.error("stage 1 needs --images")
    cmd = main_cmd(["--images", args.images, *extra])
    results, ref = run_rounds(
        cmd, Path(args.work), rounds=args.rounds, max_kills=args.max_kills,
        kill_window=tuple(args.kill_after), seed=args.seed,
    )  # fmt: skip
    for i, r in enumerate(results):
        kills = ", ".join(
            f"{how} @{t:.1f}s -> {d} done" for (how, t, _), d in zip(r.kills, r.done_after_kill)
        )
        print(
            f"round {i}: kills [{kills}]; final run rc {r.final_rc}; identical {r.identical}; lost {r.lost}"
        )
        for m in r.messages:
            print(f"    {m[:200]}")
    lost = sum(max(r.lost, 0) for r in results)
    ok = all(r.identical for r in results)
    print(f"rounds {len(results)}, kills {sum(len(r.kills) for r in results)}, samples lost {lost}, "
          f"every final cache identical to the uninterrupted run: {ok} (reference {ref})")  # fmt: skip
    return 0 if ok and lost == 0 else 1


def _stage2(args: argparse.Namespace, extra: list[str]) -> int:
    from tipsdistill.distill.faults import train_rounds

    results, ref = train_rounds(
        extra, Path(args.work), rounds=args.rounds, max_hits=args.max_kills,
        hit_window=tuple(args.kill_after), seed=args.seed,
    )  # fmt: skip
    for i, r in enumerate(results):
        hits = ", ".join(
            f"{h['how']} @{h['after_s']:.1f}s rc {h['rc']} -> step {h['last_step']}, checkpoint {h['checkpoint']}"
            for h in r.hits
        )
        print(f"round {i}: hits [{hits}]; final run rc {r.final_rc}; {r.steps} steps logged; identical {r.identical}; "
              f"lost {r.lost}")  # fmt: skip
        for m in r.messages:
            print(f"    {m[:200]}")
    lost = sum(r.lost for r in results)
    ok = all(r.identical for r in results)
    print(f"rounds {len(results)}, hits {sum(len(r.hits) for r in results)}, steps lost to SIGTERM {lost}, every "
          f"final log identical to the uninterrupted run: {ok} (reference {ref})")  # fmt: skip
    return 0 if ok and lost == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
