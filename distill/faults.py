"""Random kill / preemption rounds of stage 2 (``scripts/faults.py --stage 2``).

Each round: start ``tipsdistill-train`` (the real entry point, in a subprocess, its own process group),
hit it at a random moment with ``kill -9`` (the OOM killer, a node failure) or SIGTERM (a scheduler's
preemption), rerun it at once with ``--resume auto``, a random number of times; then run it to the end
and compare its ``log.jsonl`` with an uninterrupted reference run's, step by step.

Figures per round: the step each hit landed in (the last logged step), the checkpoint the next run
resumed from, the steps lost (a SIGTERM must lose none: it checkpoints the step it was in; a
``kill -9`` loses the steps since the last checkpoint, which the rerun replays), and whether every
step's losses equal the reference's.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tipsdistill.cache.faults import final_run, fresh_round, hit_bounds, log_messages, reference_run

from .checkpoint import checkpoint_dir, list_complete

logger = logging.getLogger(__name__)


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
