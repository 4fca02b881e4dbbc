"""Random kill -9 / resume rounds of either stage: a test and bench tool, which the library never imports.

Stage 1 on a real folder of images (the issue's scenario, 5 rounds)::

    python -m tipsdistill.scripts.faults --rounds 5 --images photos/ --work /tmp/faults -- \\
        --teacher efficientnet-lite0 --image-size 160 --batch-size 8 --quiet

Everything after ``--`` is passed to ``tipsdistill-cache`` (``--images`` and ``--out`` are added).
Prints one line per round (kills: how, when, done samples after each), then rounds, samples lost
(goal 0) and whether every final cache equals the uninterrupted reference run's, dataset by dataset.

Stage 2 (``--stage 2``): everything after ``--`` is passed to ``tipsdistill-train``
(``output_dir=`` and ``--resume auto`` are added); each hit is a ``kill -9`` of the process group or a
SIGTERM (preemption)::

    python -m tipsdistill.scripts.faults --stage 2 --rounds 4 --work /tmp/faults2 --kill-after 8 25 -- \
        --recipe distill cache.path=cache/ steps=40 checkpoint.every=10

Prints one line per round (hits: how, when, the last logged step, the newest checkpoint after it),
then rounds, hits, steps lost to SIGTERM (goal 0) and whether every final log equals the reference's.

Stage 1 rounds (:func:`run_rounds`): run ``tipsdistill-cache`` (the real console entry point, in a
subprocess), ``kill -9`` it at a random moment (the main process only, as the OOM killer does, or its
whole process group), rerun the same command at once, a random number of times; then run it to
completion and compare the cache, dataset by dataset, with an uninterrupted reference run's.

Stage 2 rounds (:func:`train_rounds`): start ``tipsdistill-train`` (its own process group), hit it with
``kill -9`` (the OOM killer, a node failure) or SIGTERM (a scheduler's preemption), rerun it with
``--resume auto``; then run it to the end and compare its ``log.jsonl`` with the reference's, step by
step. Figures per round: the step each hit landed in, the checkpoint the next run resumed from, the
steps lost (a SIGTERM must lose none) and whether every step's losses equal the reference's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from tipsdistill.cache.format import INDEX_NAME
from tipsdistill.distill.checkpoint import checkpoint_dir, list_complete

logger = logging.getLogger(__name__)

# attributes that differ between any two runs and are not compared: times, and the config, which
# records the output directory (each round writes its own)
VOLATILE_ATTRS = ("created", "finished", "git_revision", "config")


@dataclass
class Round:
    kills: list[tuple[str, float, int]] = field(default_factory=list)  # (main|group, after s, rc)
    done_after_kill: list[int] = field(default_factory=list)  # samples flagged done after each kill
    final_rc: int = 0
    identical: bool = False
    lost: int = 0  # reference samples missing or different in the final cache
    messages: list[str] = field(default_factory=list)


def cache_contents(out: Path) -> dict[str, dict[str, np.ndarray]]:
    """``{shard file: {dataset or "@attr": value}}`` of every shard of a cache (timestamps left out)."""
    res: dict[str, dict[str, np.ndarray]] = {}
    for p in sorted(Path(out).glob("shard-*-of-*.h5")):
        d: dict[str, np.ndarray] = {}
        with h5py.File(p, "r") as f:
            f.visititems(lambda n, o, d=d: d.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
            for k, v in f.attrs.items():
                if k not in VOLATILE_ATTRS:
                    d["@" + k] = v
        res[p.name] = d
    return res


def compare(out: Path, ref: Path) -> tuple[bool, int, list[str]]:
    """(identical, samples lost or different, differences) between two caches."""
    a, b = cache_contents(out), cache_contents(ref)
    diffs: list[str] = []
    lost = 0
    for shard, want in b.items():
        have = a.get(shard)
        if have is None:
            diffs.append(f"{shard} missing")
            lost += len(want["done"])
            continue
        bad_rows = np.zeros(len(want["done"]), bool)
        for k, v in want.items():
            if k not in have:
                diffs.append(f"{shard}:{k} missing")
                continue
            h = have[k]
            same = np.array_equal(np.asarray(h), np.asarray(v))
            if not same:
                diffs.append(f"{shard}:{k} differs")
                if (
                    not k.startswith("@")
                    and np.shape(h) == np.shape(v)
                    and np.ndim(v) >= 1
                    and len(v) == len(bad_rows)
                ):
                    neq = np.asarray(h) != np.asarray(v)
                    bad_rows |= neq.reshape(len(v), -1).any(1) if neq.ndim > 1 else neq
        lost += int(bad_rows.sum())
    return not diffs, lost, diffs


def _done(out: Path) -> int:
    n = 0
    for p in Path(out).glob("shard-*-of-*.h5"):
        try:
            with h5py.File(p, "r") as f:
                n += int(f["done"][()].sum())
        except (OSError, KeyError):
            pass
    return n


# ------------------------------------------------------------------ the round scaffolding both stages use


def reference_run(
    cmd_at: Callable[[Path], list[str]],
    work: Path,
    timeout: float,
    env: dict[str, str] | None = None,
    *,
    writes: str | None = None,
) -> tuple[Path, float]:
    """Run ``cmd_at(work / "reference")`` uninterrupted into a fresh folder; ``(that folder, seconds)``.

    Raises ``RuntimeError`` (with the end of its stderr) when it fails or leaves no file ``writes``."""
    work.mkdir(parents=True, exist_ok=True)
    ref = work / "reference"
    shutil.rmtree(ref, ignore_errors=True)
    t0 = time.time()
    r = subprocess.run(cmd_at(ref), env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0 or (writes is not None and not (ref / writes).exists()):
        raise RuntimeError(f"the reference run failed (rc {r.returncode}):\n{r.stderr[-3000:]}")
    return ref, time.time() - t0


def hit_bounds(window: tuple[float, float], ref_s: float) -> tuple[float, float]:
    """The ``(lo, hi)`` seconds a hit lands in: ``hi`` capped below the reference run's length."""
    lo, hi = window
    return lo, min(hi, max(lo + 0.5, 0.9 * ref_s))


def fresh_round(work: Path, i: int) -> tuple[Path, Path]:
    """Round ``i``'s output folder and log file under ``work``, left over ones removed."""
    out = work / f"round-{i:02d}"
    shutil.rmtree(out, ignore_errors=True)
    log = work / f"round-{i:02d}.log"
    log.unlink(missing_ok=True)
    return out, log


def final_run(
    cmd: list[str], log: Path, timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` to the end (no hit), its output appended to ``log``."""
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    with open(log, "a") as fh:
        fh.write(p.stdout + p.stderr)
    return p


def log_messages(log: Path, words: tuple[str, ...]) -> list[str]:
    """The first 8 lines of ``log`` holding any of ``words``."""
    return [ln.strip() for ln in log.read_text().splitlines() if any(w in ln for w in words)][:8]


def _killed_run(cmd: list[str], env: dict[str, str], log: Path, how: str, after: float) -> int:
    """Start ``cmd`` (its own process group), ``kill -9`` it after ``after`` s; its exit status."""
    with open(log, "a") as fh:
        p = subprocess.Popen(cmd, env=env, stdout=fh, stderr=fh, start_new_session=True)
        try:
            return p.wait(timeout=after)
        except subprocess.TimeoutExpired:
            if how == "main":
                p.send_signal(signal.SIGKILL)
            else:
                os.killpg(p.pid, signal.SIGKILL)
        return p.wait()


def run_rounds(
    cmd: list[str],
    work: Path,
    *,
    rounds: int,
    max_kills: int = 3,
    kill_window: tuple[float, float] = (2.0, 12.0),
    seed: int | None = None,
    timeout: float = 900.0,
) -> tuple[list[Round], Path]:
    """Run the reference, then ``rounds`` kill/resume rounds of ``cmd`` (whose ``--out`` is appended)."""
    rng = random.Random(seed)
    env = dict(os.environ)
    ref, ref_s = reference_run(lambda o: [*cmd, "--out", str(o)], work, timeout, env, writes=INDEX_NAME)
    logger.warning("reference run: %.1f s", ref_s)
    lo, hi = hit_bounds(kill_window, ref_s)
    results = []
    for i in range(rounds):
        out, log = fresh_round(work, i)
        rd = Round()
        for _ in range(rng.randint(1, max_kills)):
            how = rng.choice(["main", "group"])
            after = rng.uniform(lo, hi)
            rc = _killed_run([*cmd, "--out", str(out)], env, log, how, after)
            rd.kills.append((how, round(after, 2), rc))
            rd.done_after_kill.append(_done(out))
            if rc == 0:  # it finished before the kill
                break
        p = final_run([*cmd, "--out", str(out)], log, timeout, env)
        rd.final_rc = p.returncode
        rd.messages = log_messages(
            log, ("took over", "resuming", "waiting up to", "damaged", "repaired", "error")
        )
        rd.identical, rd.lost, diffs = compare(out, ref) if p.returncode == 0 else (False, -1, ["run failed"])
        if diffs:
            rd.messages += diffs[:5]
        results.append(rd)
        logger.info("round %d: %s", i, rd)
    return results, ref


def main_cmd(extra: list[str]) -> list[str]:
    """The stage-1 command as a user runs it (the installed console script's module)."""
    return [sys.executable, "-m", "tipsdistill.scripts.cache_features", *extra]


# ------------------------------------------------------------------ stage 2


@dataclass
class TrainRound:
    hits: list[dict[str, Any]] = field(default_factory=list)  # {how, after_s, rc, last_step, checkpoint}
    final_rc: int = 0
    steps: int = 0
    identical: bool = False
    lost: int = 0  # steps done before a SIGTERM that its checkpoint does not hold (goal 0)
    messages: list[str] = field(default_factory=list)


def _log(out: Path) -> list[dict[str, Any]]:
    recs = []
    path = out / "log.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            recs.append(json.loads(line))
        except ValueError:
            continue
    return recs


def _newest_checkpoint(out: Path) -> int:
    found = list_complete(checkpoint_dir(out))
    return found[-1][0] if found else 0


def _hit(cmd: list[str], log: Path, how: str, after: float, timeout: float) -> int:
    with open(log, "a") as fh:
        p = subprocess.Popen(cmd, stdout=fh, stderr=fh, start_new_session=True)
        try:
            return p.wait(timeout=after)
        except subprocess.TimeoutExpired:
            if how == "kill9":
                os.killpg(p.pid, signal.SIGKILL)
            else:
                p.send_signal(signal.SIGTERM)
        rc = p.wait(timeout=timeout)
        try:  # leftovers of a killed run (DataLoader workers) never outlive the round
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return rc


def train_rounds(
    overrides: list[str],
    work: Path,
    *,
    rounds: int,
    max_hits: int = 3,
    hit_window: tuple[float, float] = (5.0, 30.0),
    seed: int | None = None,
    timeout: float = 1800.0,
) -> tuple[list[TrainRound], Path]:
    """Run the reference, then ``rounds`` hit/resume rounds of ``tipsdistill-train overrides``."""
    rng = random.Random(seed)
    base = [sys.executable, "-m", "tipsdistill.scripts.train", *overrides]
    ref, ref_s = reference_run(lambda o: [*base, f"output_dir={o}"], work, timeout)
    want = [(x["step"], x.get("loss")) for x in _log(ref)]
    logger.warning("reference run: %.1f s, %d logged steps", ref_s, len(want))
    lo, hi = hit_bounds(hit_window, ref_s)
    results = []
    for i in range(rounds):
        out, log = fresh_round(work, i)
        cmd = [*base, f"output_dir={out}", "--resume", "auto"]
        rd = TrainRound()
        for _ in range(rng.randint(1, max_hits)):
            how = rng.choice(["kill9", "sigterm"])
            after = rng.uniform(lo, hi)
            rc = _hit(cmd, log, how, after, timeout)
            last = max((x["step"] for x in _log(out)), default=0)
            ck = _newest_checkpoint(out)
            rd.hits.append(
                {"how": how, "after_s": round(after, 1), "rc": rc, "last_step": last, "checkpoint": ck}
            )
            if how == "sigterm" and rc == 143:
                rd.lost += max(last - ck, 0)
            if rc == 0:  # it finished before the hit
                break
        p = final_run(cmd, log, timeout)
        rd.final_rc = p.returncode
        got = [(x["step"], x.get("loss")) for x in _log(out)]
        rd.steps = len(got)
        rd.identical = p.returncode == 0 and got == want
        rd.messages = log_messages(log, ("resumed from", "SIGTERM", "torn", "refus", "Error"))
        results.append(rd)
        logger.info("round %d: %s", i, rd)
    return results, ref


# ------------------------------------------------------------------ the command


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
