"""Checkpoints of a DeepSpeed run: ``<output_dir>/checkpoints/step_XXXXXXXX/``.

DeepSpeed writes the model and optimizer states (every ZeRO stage); the run's own state (step, data
position, EMA head, DINO centers, RNG states) travels as DeepSpeed ``client_state`` (one file per
rank under ZeRO, so per-rank RNG states come back to their rank). A checkpoint counts only once
``complete.json`` is written, after every rank finished saving and fsynced its files; ``--resume
auto`` picks the newest complete one (and names the incomplete ones it skips), so an interrupted
save, even one cut by a machine crash, is never resumed from. ``complete.json`` lists every file of
the checkpoint with its size, and a checkpoint counts as complete only while all of them are there.

Older complete checkpoints beyond ``keep_last`` are deleted: each is first renamed aside
(``.pruning-step_*``, never listed again), then removed, so a deletion cut short never leaves a
``step_*`` directory whose marker survived its files. A save never writes into a complete checkpoint:
a ``step_*`` directory already there is renamed aside (complete) or removed (interrupted) first.
Resuming an older checkpoint into its own run directory (a rollback) moves the newer checkpoints of
the abandoned timeline to ``checkpoints/abandoned-<time>/`` before training, so keep-last-K and
``--resume auto`` follow the new timeline.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
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


def missing_files(ckpt: Path) -> list[str]:
    """The files ``ckpt/complete.json`` lists that are missing or of another size (an older marker
    without a list: the model states file must be there); ``["complete.json"]`` without a marker."""
    try:
        marker = json.loads((ckpt / COMPLETE).read_text())
    except FileNotFoundError:
        return [COMPLETE]
    except (OSError, ValueError):
        return [f"{COMPLETE} (unreadable)"]
    files = marker.get("files") if isinstance(marker, dict) else None
    if not isinstance(files, dict):
        names = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
        return [] if any((ckpt / n).is_file() for n in names) else ["mp_rank_00_model_states.pt"]
    bad = []
    for name, size in files.items():
        try:
            if (ckpt / name).stat().st_size != int(size):
                bad.append(f"{name} (size)")
        except OSError:
            bad.append(name)
    return bad


def list_complete(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """``[(step, path)]`` of complete checkpoints (marker present, every file it lists there), oldest first."""
    root = Path(ckpt_dir)
    out = []
    if root.is_dir():
        for p in root.iterdir():
            m = TAG_RE.match(p.name)
            if m and (p / COMPLETE).is_file() and not missing_files(p):
                out.append((int(m.group(1)), p))
    return sorted(out)


def _manifest(path: Path) -> dict[str, int]:
    """``{relative path: size}`` of every file under ``path`` (the marker excluded)."""
    out = {}
    for d, _, files in os.walk(path):
        for name in files:
            f = Path(d) / name
            rel = str(f.relative_to(path))
            if rel not in (COMPLETE, COMPLETE + ".tmp", BEST_JSON):
                out[rel] = f.stat().st_size
    return dict(sorted(out.items()))


def prune(root: Path, keep_last: int) -> list[Path]:
    """Delete the complete checkpoints of ``root`` beyond the newest ``keep_last``: each is renamed aside
    first (``.pruning-step_*``: never listed again, whatever happens next), then removed; a removal that
    fails is reported with the path to delete by hand. Returns the pruned checkpoints."""
    pruned = []
    for _, old in list_complete(root)[:-keep_last] if keep_last > 0 else []:
        trash = root / f".pruning-{old.name}"
        if trash.exists():
            shutil.rmtree(trash, ignore_errors=True)
        old.replace(trash)
        fsync_dir(root)
        pruned.append(old)
        try:
            shutil.rmtree(trash)
        except OSError as e:
            logger.warning(
                "pruned checkpoint %s (keep_last=%d) was renamed to %s but could not be deleted (%s); it is never "
                "resumed from: delete it by hand",
                old.name,
                keep_last,
                trash,
                e,
            )
    return pruned


def set_aside_newer(output_dir: str | Path, step: int) -> list[str]:
    """A rollback: resuming ``step`` while ``output_dir`` holds checkpoints of later steps (an abandoned
    timeline). Rank 0 moves the complete ones (and a ``best`` saved after ``step``) to
    ``checkpoints/abandoned-<time>/`` and deletes the incomplete ones; every rank waits. Returns the moved names."""
    root = checkpoint_dir(output_dir)
    rank = dist.get_rank() if dist.is_initialized() else 0
    moved: list[str] = []
    if rank == 0 and root.is_dir():
        newer = sorted(p for p in root.iterdir() if (m := TAG_RE.match(p.name)) and int(m.group(1)) > step)
        best = read_best(output_dir)
        if best is not None and int(best.get("step", 0)) > step:
            newer.append(root / BEST)
        dest = root / f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}-from-{tag_for(step)}"
        for p in newer:
            if p.name != BEST and missing_files(p):
                shutil.rmtree(p, ignore_errors=True)  # an interrupted save: nothing to keep
                logger.info(
                    "removed the incomplete checkpoint %s (newer than the resumed step %d)", p.name, step
                )
                continue
            dest.mkdir(exist_ok=True)
            p.replace(dest / p.name)
            moved.append(p.name)
        if moved:
            fsync_dir(root)
            logger.warning(
                "rollback to step %d: the newer checkpoint(s) %s of the abandoned timeline were moved to %s "
                "(keep_last and --resume auto now follow the resumed timeline)",
                step,
                ", ".join(moved),
                dest,
            )
    if dist.is_initialized():
        dist.barrier()
    return moved


def _clear_target(root: Path, tag: str) -> Path | None:
    """Before a save into ``root/tag`` (rank 0): a complete checkpoint there is renamed aside (returned,
    deleted once the new one is complete); an incomplete one is removed. A save never writes into a
    complete checkpoint (a kill would leave a torn checkpoint that looks complete)."""
    target = root / tag
    if not target.exists():
        return None
    if (target / COMPLETE).exists():
        aside = root / f".replaced-{tag}-{time.strftime('%Y%m%d-%H%M%S')}"
        target.replace(aside)
        fsync_dir(root)
        logger.warning(
            "%s already holds a checkpoint: renamed to %s until the new one is complete", target, aside.name
        )
        return aside
    shutil.rmtree(target)
    return None


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
    if missing := missing_files(p):
        raise ValueError(
            f"--resume {resume}: checkpoint is incomplete (missing: {', '.join(missing[:5])}); pick an older one "
            "or use --resume auto"
        )
    return p.parent, p.name


def _fsync_tree(path: Path) -> None:
    """fsync every file under ``path`` and the directories themselves (a machine crash after the
    completion marker then never finds the marker without the files)."""
    for d, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(d, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(d))


def fsync_dir(path: Path) -> None:
    """Make a rename or new file inside ``path`` durable; an ``OSError`` propagates (a save that cannot
    be made durable fails; ``cache.format.fsync_dir`` is the best-effort one for the cache)."""
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
    partial = sorted(p for p in root.iterdir() if TAG_RE.match(p.name) and p.name not in done)
    if partial:
        logger.warning(
            "--resume auto: ignoring %d incomplete checkpoint(s) (no %s: interrupted while saving; or files it "
            "lists missing): %s",
            len(partial),
            COMPLETE,
            ", ".join(f"{p.name} (missing {', '.join(missing_files(p)[:3])})" for p in partial),
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
    rank = dist.get_rank() if dist.is_initialized() else 0
    replaced = None
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        replaced = _clear_target(root, tag)
    if dist.is_initialized():
        dist.barrier()  # no rank writes before the target is clear
    ok = engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=True)
    if ok is False:
        raise RuntimeError(f"DeepSpeed failed to save checkpoint {root / tag}")
    _fsync_tree(root / tag)  # every rank: its files are on the disk before the marker says complete
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        marker = {
            "step": step,
            "time": time.time(),
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "files": _manifest(root / tag),
        }
        tmp = root / tag / (COMPLETE + ".tmp")
        with open(tmp, "w") as fh:
            fh.write(json.dumps(marker))
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(root / tag / COMPLETE)
        fsync_dir(root / tag)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
        prune(root, keep_last)
        logger.info("saved checkpoint %s (%.1fs)", root / tag, time.time() - t0)
    if dist.is_initialized():
        dist.barrier()
    return root / tag


def load(engine: Any, load_dir: str | Path, tag: str) -> dict[str, Any]:
    """Load model + optimizer states into ``engine``; return the client state. Every pickle of the
    checkpoint is checked against the allow-list first (:func:`check_pickles`): DeepSpeed's own loader
    unpickles without restriction."""
    check_pickles(Path(load_dir) / tag)
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
            "files": _manifest(tmp),
        }
        for name, content in ((BEST_JSON, best), (COMPLETE, marker)):
            with open(tmp / name, "w") as fh:
                fh.write(json.dumps(content, indent=2))
                fh.flush()
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        final, old = root / BEST, root / (BEST + ".old")
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            final.replace(old)
        tmp.replace(final)
        fsync_dir(root)
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

_CLIENT_KEYS = (
    "step",
    "aux",
    "data",
    "rng",
    "config",
    "cache_identity",
    "samples_seen",
    "world_size",
    "best",
)


def find_checkpoint(path: str | Path) -> Path:
    """A complete ``step_*`` (or ``best``) directory from ``path``: that directory itself, or the newest complete
    checkpoint of a run directory (``<run>/checkpoints/step_*``) or of a ``checkpoints/`` folder."""
    p = Path(path)
    if TAG_RE.match(p.name) or p.name == BEST:
        if not p.is_dir():
            raise FileNotFoundError(f"checkpoint {p} does not exist")
        if missing := missing_files(p):
            raise ValueError(
                f"checkpoint {p} is incomplete (missing: {', '.join(missing[:5])}: its save was interrupted or "
                "its files were deleted); pass an older "
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
    """Rank 0's DeepSpeed model states file of checkpoint ``ckpt`` (DeepSpeed keys + client state), loaded
    with ``weights_only=True`` and the allow-list of :func:`safe_load` (a pickle that would run code is refused)."""
    return safe_load(_model_states_file(Path(ckpt)))


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

    check_pickles(ckpt)  # DeepSpeed's consolidation unpickles without restriction: check the files first
    sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


# ------------------------------------------------------------------------------------------ safe loading
class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds an object outside the allow-list (a pickle that could run code)."""


def checkpoint_globals() -> list[Any]:
    """The allow-list of :func:`safe_load`: what the toolkit's checkpoints really hold besides tensors and
    plain containers. numpy arrays (the numpy RNG state of ``client_state``) and DeepSpeed's optimizer
    bookkeeping (loss scaler, ZeRO stage enum, fragment addresses). Found by
    ``torch.serialization.get_unsafe_globals_in_checkpoint`` over ZeRO 0-3, fp32 and bf16 checkpoints."""
    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    rec = core.multiarray._reconstruct
    allowed: list[Any] = [
        (rec, "numpy._core.multiarray._reconstruct"),
        (rec, "numpy.core.multiarray._reconstruct"),  # a checkpoint written under numpy 1
        np.ndarray,
        np.dtype,
        *{type(np.dtype(t)) for t in (np.uint32, np.int64, np.float32, np.float64, np.bool_)},
    ]
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed += [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    except ImportError:  # pragma: no cover - without DeepSpeed its classes cannot be in a loadable checkpoint
        pass
    return allowed


def safe_load(path: str | Path, *, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` with :func:`checkpoint_globals` allowed: tensors, containers,
    numbers, strings and those classes come back; any other global (a pickle that would call
    ``os.system`` or build an arbitrary object) raises :class:`UnsafeCheckpointError` naming the file and the
    global, and nothing of it runs. ``mmap``: map the tensors instead of reading them (a cheap check)."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(checkpoint_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{path} holds an object outside the checkpoint allow-list, so it was not loaded (loading it could "
            f"run code): {str(e).splitlines()[0]}. tipsdistill checkpoints hold tensors, numbers, numpy arrays and "
            "DeepSpeed's loss scaler / ZeRO enums only; do not load this file with torch.load(weights_only=False) "
            "unless you trust its source (docs/cache.md, 'Threat model')"
        ) from e


def check_pickles(ckpt: str | Path) -> int:
    """Check every ``*.pt`` file of checkpoint folder ``ckpt`` with :func:`safe_load` (tensors mapped, not
    read) before a library that unpickles without restriction (DeepSpeed) opens it. Returns the count."""
    files = sorted(Path(ckpt).rglob("*.pt"))
    for f in files:
        safe_load(f, mmap=True)
    return len(files)
