"""Random kill/resume rounds of the stage-1 command on a real image folder (``scripts/faults.py``).

Each round: run ``tipsdistill-cache`` (the real console entry point, in a subprocess), ``kill -9`` it
at a random moment (the main process only, as the OOM killer does, or its whole process group),
rerun the same command at once, and repeat a random number of times; then run it to completion and
compare the cache, dataset by dataset, with an uninterrupted reference run of the same command.
"""

from __future__ import annotations

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

import h5py
import numpy as np

from .format import INDEX_NAME

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
