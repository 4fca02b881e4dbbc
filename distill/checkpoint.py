"""Checkpoints of a DeepSpeed run: ``<output_dir>/checkpoints/step_XXXXXXXX/``.

DeepSpeed writes the model and optimizer states (every ZeRO stage); the run's own state (step, data
position, EMA head, DINO centers, RNG states) travels as DeepSpeed ``client_state`` (one file per
rank under ZeRO, so per-rank RNG states come back to their rank). A checkpoint counts only once
``complete.json`` is written, after every rank finished saving and fsynced its files; ``--resume
auto`` picks the newest complete one (and names the incomplete ones it skips), so an interrupted
save, even one cut by a machine crash, is never resumed from. Older complete checkpoints beyond
``keep_last`` are deleted.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

TAG_RE = re.compile(r"^step_(\d{8})$")
COMPLETE = "complete.json"
BEST = "best"  # checkpoints/best: the best checkpoint by eval.metric (never pruned by keep_last)
BEST_JSON = "best.json"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_complete(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """``[(step, path)]`` of complete checkpoints, oldest first."""
    root = Path(ckpt_dir)
    out = []
    if root.is_dir():
        for p in root.iterdir():
            m = TAG_RE.match(p.name)
            if m and (p / COMPLETE).is_file():
                out.append((int(m.group(1)), p))
    return sorted(out)


def resolve_resume(resume: str | None, output_dir: str | Path) -> tuple[Path, str] | None:
    """``None``/"" -> None; ``auto`` -> newest complete checkpoint of ``output_dir`` (None if none);
    a path to a ``step_*`` directory -> that one (must be complete). Returns ``(load_dir, tag)``."""
    if not resume:
        return None
    if resume == "auto":
        found = list_complete(checkpoint_dir(output_dir))
        _note_incomplete(checkpoint_dir(output_dir), found)
        if not found:
            logger.info(
                "--resume auto: no complete checkpoint in %s, starting fresh", checkpoint_dir(output_dir)
            )
            return None
        _, path = found[-1]
        return path.parent, path.name
    p = Path(resume)
    if not p.is_dir() or not (TAG_RE.match(p.name) or p.name == BEST):
        raise FileNotFoundError(
            f"--resume {resume}: not a checkpoint directory (expected .../checkpoints/step_XXXXXXXX or "
            ".../checkpoints/best) or 'auto'"
        )
    if not (p / COMPLETE).is_file():
        raise ValueError(
            f"--resume {resume}: checkpoint is incomplete (no {COMPLETE}); pick an older one or use --resume auto"
        )
    return p.parent, p.name


def _fsync_tree(path: Path) -> None:
    """fsync every file under ``path`` and the directories themselves (a machine crash after the
    completion marker then never finds the marker without the files)."""
    for d, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(d, name), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(d))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _note_incomplete(root: Path, complete: list[tuple[int, Path]]) -> None:
    """Say which checkpoint directories are skipped because their save was interrupted."""
    if not root.is_dir():
        return
    done = {p.name for _, p in complete}
    partial = sorted(p.name for p in root.iterdir() if TAG_RE.match(p.name) and p.name not in done)
    if partial:
        logger.warning(
            "--resume auto: ignoring %d incomplete checkpoint(s) (no %s: interrupted while saving): %s",
            len(partial),
            COMPLETE,
            ", ".join(partial),
        )


def rng_state() -> dict[str, Any]:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save(
    engine: Any, output_dir: str | Path, step: int, client_state: dict[str, Any], keep_last: int = 0
) -> Path:
    """Save a checkpoint for optimizer step ``step`` on every rank; mark complete; prune old ones."""
    root = checkpoint_dir(output_dir)
    tag = tag_for(step)
    t0 = time.time()
    ok = engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=True)
    if ok is False:
        raise RuntimeError(f"DeepSpeed failed to save checkpoint {root / tag}")
    _fsync_tree(root / tag)  # every rank: its files are on the disk before the marker says complete
    if dist.is_initialized():
        dist.barrier()
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        marker = {
            "step": step,
            "time": time.time(),
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        }
        tmp = root / tag / (COMPLETE + ".tmp")
        with open(tmp, "w") as fh:
            fh.write(json.dumps(marker))
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(root / tag / COMPLETE)
        _fsync_dir(root / tag)
        if keep_last > 0:
            for _, old in list_complete(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        logger.info("saved checkpoint %s (%.1fs)", root / tag, time.time() - t0)
    if dist.is_initialized():
        dist.barrier()
    return root / tag


def load(engine: Any, load_dir: str | Path, tag: str) -> dict[str, Any]:
    """Load model + optimizer states into ``engine``; return the client state."""
    path, client = engine.load_checkpoint(
        str(load_dir),
        tag=tag,
        load_optimizer_states=True,
        load_lr_scheduler_states=False,
        load_module_strict=True,
    )
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {Path(load_dir) / tag}")
    return client or {}


def read_best(output_dir: str | Path) -> dict[str, Any] | None:
    """``checkpoints/best/best.json`` (``{"step", "metric", "value", ...}``) of a run, or None."""
    path = checkpoint_dir(output_dir) / BEST / BEST_JSON
    if not path.is_file() or not (path.parent / COMPLETE).is_file():
        return None
    return json.loads(path.read_text())


def save_best(
    engine: Any, output_dir: str | Path, step: int, client_state: dict[str, Any], best: dict[str, Any]
) -> Path:
    """Save the current state as ``checkpoints/best`` (every rank), a complete DeepSpeed checkpoint with
    ``best.json`` (``best``: step, metric, value); it replaces the previous best only once complete.

    ``keep_last`` never prunes it (only ``step_*`` directories count there) and ``--resume auto`` never
    picks it; ``--resume .../checkpoints/best`` resumes from it."""
    root = checkpoint_dir(output_dir)
    tmp_tag = BEST + ".saving"
    t0 = time.time()
    ok = engine.save_checkpoint(str(root), tag=tmp_tag, client_state=client_state, save_latest=False)
    if ok is False:
        raise RuntimeError(f"DeepSpeed failed to save checkpoint {root / tmp_tag}")
    _fsync_tree(root / tmp_tag)
    if dist.is_initialized():
        dist.barrier()
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        tmp = root / tmp_tag
        marker = {
            "step": step,
            "time": time.time(),
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        }
        for name, content in ((BEST_JSON, best), (COMPLETE, marker)):
            with open(tmp / name, "w") as fh:
                fh.write(json.dumps(content, indent=2))
                fh.flush()
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        final, old = root / BEST, root / (BEST + ".old")
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            final.replace(old)
        tmp.replace(final)
        _fsync_dir(root)
        shutil.rmtree(old, ignore_errors=True)
        logger.info(
            "best checkpoint: step %d, %s = %.4g -> %s (%.1fs)",
            step,
            best["metric"],
            best["value"],
            final,
            time.time() - t0,
        )
    if dist.is_initialized():
        dist.barrier()
    return root / BEST


# ------------------------------------------------------------------- reading a checkpoint offline
# (export, evaluation, resume on other hardware): no engine, DeepSpeed's own files and consolidation

_CLIENT_KEYS = ("step", "aux", "data", "rng", "config", "samples_seen", "world_size", "best")


def find_checkpoint(path: str | Path) -> Path:
    """A complete ``step_*`` (or ``best``) directory from ``path``: that directory itself, or the newest complete
    checkpoint of a run directory (``<run>/checkpoints/step_*``) or of a ``checkpoints/`` folder."""
    p = Path(path)
    if TAG_RE.match(p.name) or p.name == BEST:
        if not p.is_dir():
            raise FileNotFoundError(f"checkpoint {p} does not exist")
        if not (p / COMPLETE).is_file():
            raise ValueError(
                f"checkpoint {p} is incomplete (no {COMPLETE}: its save was interrupted); pass an older "
                f"step_* directory or the run directory (the newest complete checkpoint is picked)"
            )
        return p
    root = p if p.name == "checkpoints" else checkpoint_dir(p)
    found = list_complete(root)
    if not found:
        raise FileNotFoundError(
            f"{p}: no complete checkpoint under {root} (expected {root}/step_XXXXXXXX/{COMPLETE}); pass a run "
            "directory (output_dir) or one of its checkpoints"
        )
    _note_incomplete(root, found)
    return found[-1][1]


def _model_states_file(ckpt: Path) -> Path:
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (ckpt / name).is_file():
            return ckpt / name
    raise FileNotFoundError(
        f"{ckpt}: no DeepSpeed model states file (mp_rank_00_model_states.pt or "
        "zero_pp_rank_0_mp_rank_00_model_states.pt); not a checkpoint written by tipsdistill-train"
    )


def read_model_states(ckpt: str | Path) -> dict[str, Any]:
    """Rank 0's DeepSpeed model states file of checkpoint ``ckpt`` (DeepSpeed keys + client state)."""
    return torch.load(_model_states_file(Path(ckpt)), map_location="cpu", weights_only=False)


def layout(ckpt: str | Path, states: dict[str, Any] | None = None) -> dict[str, int]:
    """``{"step", "world_size", "zero_stage"}`` of a checkpoint (the processes and ZeRO stage it was saved with)."""
    ckpt = Path(ckpt)
    ms = states if states is not None else read_model_states(ckpt)
    marker = json.loads((ckpt / COMPLETE).read_text()) if (ckpt / COMPLETE).is_file() else {}
    zero = (ms.get("ds_config") or {}).get("zero_optimization") or {}
    return {
        "step": int(ms.get("step", marker.get("step", 0))),
        "world_size": int(marker.get("world_size", ms.get("dp_world_size", 1))),
        "zero_stage": int(zero.get("stage", 0)),
    }


def client_state(states: dict[str, Any]) -> dict[str, Any]:
    """The run's own state (``train``'s ``client_state``) out of a model states dict."""
    return {k: states[k] for k in _CLIENT_KEYS if k in states}


def consolidated_state_dict(
    ckpt: str | Path, states: dict[str, Any] | None = None
) -> dict[str, torch.Tensor]:
    """The full fp32 state dict (parameters and buffers, names of the trained task module) of a checkpoint
    of any ZeRO stage: DeepSpeed's own consolidation (``deepspeed.utils.zero_to_fp32``) for stages 1-3, the
    module state DeepSpeed saved for stage 0."""
    ckpt = Path(ckpt)
    ms = states if states is not None else read_model_states(ckpt)
    if layout(ckpt, ms)["zero_stage"] == 0:
        return {k: v.float() if v.is_floating_point() else v for k, v in ms["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
