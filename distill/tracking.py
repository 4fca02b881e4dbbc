"""Experiment trackers of stage 2: one interface over accelerate's tracker classes.

``log.trackers`` names them (default ``["tensorboard"]``; ``"wandb"`` and ``"mlflow"`` when those
packages are installed): :class:`Trackers` builds ``accelerate.tracking.TensorBoardTracker`` /
``WandBTracker`` / ``MLflowTracker`` standalone (no ``Accelerator``: the loop already runs them on
rank 0 only) and sends every logged value to each of them, next to ``log.jsonl`` (which stays the
machine-readable record; see ``distill/train.py``).

Names in the trackers: every loss term as ``loss/<term>`` (``loss/loss`` is their sum), ``lr``,
``wd``, ``samples_per_s``, ``data_s``, and the evaluation metrics as ``eval/<metric>``
(``eval/miou``, ``eval/miou_objects``, ...).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# name -> (python module that must import, pip package that provides it)
KNOWN_TRACKERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
}
PLAIN_KEYS = ("lr", "wd", "samples_per_s", "data_s", "epoch", "consumed")


def tracker_names(log_cfg: Any) -> list[str]:
    """``log.trackers`` with the former ``log.tensorboard`` switch applied; checked, in order, no repeats.

    Raises ValueError for an unknown name and ImportError (naming the ``pip install``) for a tracker
    whose package is not installed."""
    names = list(dict.fromkeys(log_cfg.trackers))
    if log_cfg.tensorboard is not None:
        logger.warning(
            "log.tensorboard is the former switch; use log.trackers (now %s tensorboard)",
            "adding" if log_cfg.tensorboard else "removing",
        )
        if log_cfg.tensorboard and "tensorboard" not in names:
            names.append("tensorboard")
        if not log_cfg.tensorboard:
            names = [n for n in names if n != "tensorboard"]
    for name in names:
        if name not in KNOWN_TRACKERS:
            raise ValueError(
                f"log.trackers: unknown tracker {name!r}; choose from {sorted(KNOWN_TRACKERS)} (or [] for "
                "log.jsonl only)"
            )
        module, package = KNOWN_TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise ImportError(
                f"log.trackers names {name!r}, but the {package!r} package is not installed: pip install "
                f"{package} (or drop {name!r} from log.trackers)"
            )
    return names


def tracker_key(name: str) -> str:
    """The tracker name of a ``log.jsonl`` key: loss terms under ``loss/``, the rest unchanged."""
    if name in PLAIN_KEYS or "/" in name:
        return name
    return f"loss/{name}"


def _flat_config(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> ``{"a.b": scalar}`` (lists and mappings of free-form kwargs as strings)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and all(isinstance(x, str) for x in v):
            out.update(_flat_config(v, key + "."))
        elif isinstance(v, bool | int | float | str):
            out[key] = v
        else:
            out[key] = str(v)
    return out


class Trackers:
    """The run's trackers (rank 0 only): ``log(values, step)`` sends the float values to every one.

    Args:
        names: tracker names (:func:`tracker_names`).
        output_dir: the run directory; TensorBoard writes ``output_dir/tensorboard/<run_name>``, W&B
            ``output_dir/wandb``, MLflow ``output_dir/mlruns`` unless ``tracker_kwargs`` say otherwise.
        run_name: the run's name in every tracker.
        project: W&B project / MLflow experiment.
        config: the resolved run config (stored as hyperparameters).
        tracker_kwargs: per tracker, extra keyword arguments of accelerate's tracker class (for W&B:
            ``wandb.init`` keywords such as ``mode: offline``, ``entity``, ``tags``).
    """

    def __init__(
        self,
        names: list[str],
        output_dir: str | Path,
        *,
        run_name: str,
        project: str,
        config: dict[str, Any] | None = None,
        tracker_kwargs: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        import torch
        from accelerate import PartialState
        from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

        PartialState(cpu=not torch.cuda.is_available())  # accelerate's logging needs its state (a singleton)
        out = Path(output_dir)
        extra = dict(tracker_kwargs or {})
        unknown = sorted(set(extra) - set(names))
        if unknown:
            raise ValueError(
                f"log.tracker_kwargs has settings for {unknown}, which log.trackers ({names}) does not name"
            )
        self.names = list(names)
        self.trackers: list[Any] = []
        for name in names:
            kw = dict(extra.get(name) or {})
            if name == "tensorboard":
                tracker = TensorBoardTracker(run_name, str(out / "tensorboard"), **kw)
            elif name == "wandb":
                kw.setdefault("dir", str(out))
                kw.setdefault("name", run_name)
                tracker = WandBTracker(project, **kw)
            else:
                kw.setdefault("logging_dir", str(out / "mlruns"))
                tracker = MLflowTracker(experiment_name=project, run_name=run_name, **kw)
            # the loop calls the trackers on rank 0 only: no accelerate PartialState check per call
            tracker.main_process_only = False
            tracker.start()
            self.trackers.append(tracker)
        if config:
            flat = _flat_config(config)
            for tracker in self.trackers:
                tracker.store_init_configuration(flat)
        if names:
            logger.info("trackers: %s (run %s)", ", ".join(names), run_name)

    @property
    def tensorboard_dir(self) -> Path | None:
        for tracker in self.trackers:
            if tracker.name == "tensorboard":
                return Path(tracker.logging_dir)
        return None

    def log(self, values: dict[str, Any], step: int) -> None:
        """Send the numeric entries of ``values`` (``log.jsonl`` keys) to every tracker at ``step``."""
        scalars = {
            tracker_key(k): float(v)
            for k, v in values.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k != "step"
        }
        for tracker in self.trackers:
            tracker.log(scalars, step=step)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []
