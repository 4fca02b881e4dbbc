"""Typed stage-2 configuration: nested dataclasses loaded from YAML plus dotted ``key=value`` overrides.

Unknown keys are an error naming the key and the valid ones; values are checked against the field
types. :func:`save_resolved` writes the resolved config next to a run with the git revision and the
package versions.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

logger = logging.getLogger(__name__)

RECIPES_DIR = Path(__file__).parent / "recipes"


@dataclass
class StudentConfig:
    """The trainable student (see ``students.build_student``)."""

    name: str = "vit_tiny"  # students registry name (or a timm model name, depending on the registry)
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to the students builder
    init: str = "random"  # "random", or a path to an exported student / safetensors file


@dataclass
class TeacherConfig:
    """Where targets come from. ``source``: cache (stage-1 HDF5), online (live frozen teacher),
    ema (self-distillation: pretraining recipes, no external teacher)."""

    source: str = "cache"
    name: str = ""  # build_teacher name (online)
    kwargs: dict[str, Any] = field(default_factory=dict)
    image_size: int = 0  # online: teacher input size for the global crop (0 = same as data.image_size)
    layer: int | None = None  # online: block read out (None = last)


@dataclass
class CacheConfig:
    path: str = ""  # cache index / file (cache.open_cache)
    target: str = "auto"  # "auto", "replay" (stored views) or "crop" (roi_align of the full-image map)
    expect_dim: int = 0  # 0 = no check; otherwise the teacher dim this recipe needs
    expect_grid: list[int] = field(default_factory=list)  # [] = no check; [h, w] otherwise


@dataclass
class DataConfig:
    dataset: str = ""  # "" = the dataset recorded in the cache; else a registry name or spec (cache.spec)
    dataset_kwargs: dict[str, Any] = field(default_factory=dict)
    image_size: int = 224  # global crop, student side
    local_crops: int = 6
    local_size: int = 98
    global_scale: list[float] = field(default_factory=lambda: [0.32, 1.0])  # crop area fraction
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.32])
    ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333])
    flip: bool = True
    batch_size: int = 32  # per process, per micro step
    num_workers: int = 2
    prefetch_factor: int = 2
    granularities: list[str] = field(default_factory=lambda: ["alt", "short", "detailed"])


@dataclass
class LossConfig:
    """Loss terms; weight 0 disables a term. Defaults are the paper's (L = CLIP + 1 DINO + 2 iBOT++)."""

    patch: str = "proto"  # "proto" (iBOT-style prototype CE) or head-free "cosine" / "smooth_l1" / "mse"
    patch_weight: float = 2.0
    patch_visible_weight: float = 1.0  # iBOT++: weight of visible tokens (0 = masked only, TIPS v1)
    patch_masked_weight: float = 1.0
    dino_weight: float = 1.0
    clip_weight: float = 1.0
    koleo_weight: float = 0.0
    mask_ratio: float = 0.0  # distillation: 0 (every token supervised); pretraining: 0.75
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    teacher_temp_warmup: float = 0.04
    teacher_temp_warmup_steps: int = 0
    center_momentum: float = 0.9
    clip_temp_init: float = 0.07
    caption_probs: dict[str, float] = field(default_factory=lambda: {"short": 0.5, "detailed": 0.5})


@dataclass
class HeadConfig:
    out_dim: int = 4096  # prototypes K
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    nlayers: int = 3
    shared: bool = False  # one head for CLS and patch tokens


@dataclass
class EMAConfig:
    kind: str = "head"  # "head" (TIPSv2 head-only EMA), "full" (TIPS v1 EMA teacher), "none"
    momentum: float = 0.996
    momentum_end: float = 1.0


@dataclass
class OptimConfig:
    lr: float = 5e-4  # peak, per optimizer step
    min_lr: float = 1e-6
    warmup_steps: int = 100
    weight_decay: float = 0.04
    weight_decay_end: float = 0.2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    clip_grad: float = 3.0  # 0 = off
    accum_steps: int = 1


@dataclass
class EngineConfig:
    zero_stage: int = 0
    precision: str = "fp32"  # "fp32" or "bf16"
    deepspeed_config: str = ""  # optional user DeepSpeed JSON; batch sizes/stage from it win
    dist_backend: str = ""  # "" = nccl with CUDA, gloo otherwise


@dataclass
class CheckpointConfig:
    every: int = 1000  # optimizer steps; 0 = only at the end
    keep_last: int = 3
    at_end: bool = True


@dataclass
class LogConfig:
    every: int = 1
    tensorboard: bool = False
    progress: bool = True


@dataclass
class TrainConfig:
    recipe: str = "distill"
    mode: str = "distill"  # "distill" (external frozen teacher) or "pretrain" (self-distillation)
    output_dir: str = "runs/distill"
    seed: int = 0
    steps: int = 1000  # optimizer steps
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self) -> TrainConfig:
        """Cross-field checks; raise ValueError naming the key and the fix."""
        checks = [
            ("mode", self.mode, ("distill", "pretrain")),
            ("teacher.source", self.teacher.source, ("cache", "online", "ema")),
            ("cache.target", self.cache.target, ("auto", "replay", "crop")),
            ("loss.patch", self.loss.patch, ("proto", "cosine", "smooth_l1", "mse")),
            ("ema.kind", self.ema.kind, ("head", "full", "none")),
            ("engine.precision", self.engine.precision, ("fp32", "bf16")),
            ("engine.zero_stage", self.engine.zero_stage, (0, 1, 2, 3)),
        ]
        for key, val, ok in checks:
            if val not in ok:
                raise ValueError(f"config {key}={val!r} is invalid; choose one of {list(ok)}")
        if self.mode == "distill" and self.teacher.source == "ema":
            raise ValueError("mode=distill needs teacher.source=cache or online (ema is for mode=pretrain)")
        if self.mode == "pretrain" and self.teacher.source != "ema":
            raise ValueError("mode=pretrain needs teacher.source=ema (no external teacher)")
        if self.teacher.source == "cache" and not self.cache.path:
            raise ValueError("teacher.source=cache needs cache.path=<path to the stage-1 cache>")
        if self.teacher.source == "online" and not self.teacher.name:
            raise ValueError("teacher.source=online needs teacher.name=<build_teacher name>")
        if self.mode == "pretrain" and self.ema.kind == "none":
            raise ValueError("mode=pretrain needs ema.kind=head or full (targets come from the EMA)")
        if not 0.0 <= self.loss.mask_ratio < 1.0:
            raise ValueError(f"loss.mask_ratio={self.loss.mask_ratio} must be in [0, 1)")
        if self.steps < 1 or self.data.batch_size < 1 or self.optim.accum_steps < 1:
            raise ValueError("steps, data.batch_size and optim.accum_steps must be >= 1")
        return self


# ----------------------------------------------------------------------------------------------
# generic typed loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; raise naming ``key``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise TypeError(f"config key {key!r}: {value!r} matches none of {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise TypeError(f"config key {key!r} must be a mapping, got {value!r}")
        return _from_dict(tp, value, key)
    if origin is list:
        if not isinstance(value, list | tuple):
            raise TypeError(f"config key {key!r} must be a list, got {value!r}")
        (a,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, a, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"config key {key!r} must be a mapping, got {value!r}")
        _, vt = typing.get_args(tp) or (str, Any)
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(f"config key {key!r} must be true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else value
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise TypeError(f"config key {key!r} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise TypeError(f"config key {key!r} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError(f"config key {key!r} must be a string, got {value!r}")
    return value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in data:
        if k not in names:
            where = f" under {prefix!r}" if prefix else ""
            raise ValueError(
                f"unknown config key {(prefix + '.' if prefix else '') + k!r}; valid keys{where}: {', '.join(names)}"
            )
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def _merge(base: dict[str, Any], upd: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("kwargs", "dataset_kwargs"):
            out[k] = _merge(out[k], v)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def recipe_path(recipe: str) -> Path:
    """A shipped recipe name (``distill``) or a path to a YAML file."""
    p = Path(recipe)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.exists():
            raise FileNotFoundError(
                f"recipe file {p} not found; shipped recipes: {', '.join(list_recipes())}"
            )
        return p
    q = RECIPES_DIR / f"{recipe}.yaml"
    if not q.exists():
        raise ValueError(
            f"unknown recipe {recipe!r}; shipped recipes: {', '.join(list_recipes())}, or pass a YAML path"
        )
    return q


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["optim.lr=1e-3", "data.flip=false"]`` -> nested dict; values parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value (dotted keys, e.g. optim.lr=1e-3)")
        key, raw = item.split("=", 1)
        val = yaml.safe_load(raw) if raw != "" else ""
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r} conflicts with another override of {p!r}")
        node[parts[-1]] = val
    return out


def load_config(
    recipe: str | None = None, overrides: list[str] | None = None, data: dict | None = None
) -> TrainConfig:
    """Build a :class:`TrainConfig` from a recipe (name or YAML path), a dict and dotted overrides."""
    merged: dict[str, Any] = {}
    if recipe:
        with open(recipe_path(recipe)) as f:
            merged = yaml.safe_load(f) or {}
        if not isinstance(merged, dict):
            raise ValueError(f"recipe {recipe} must be a YAML mapping")
        merged.setdefault("recipe", Path(recipe).stem)
    if data:
        merged = _merge(merged, data)
    if overrides:
        merged = _merge(merged, parse_overrides(overrides))
    return _from_dict(TrainConfig, merged).validate()


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return asdict(cfg)


def git_revision() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10
        )
        if rev.returncode != 0:
            return "unknown"
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in (
        "tipsdistill",
        "torch",
        "torchvision",
        "timm",
        "transformers",
        "deepspeed",
        "h5py",
        "safetensors",
    ):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def save_resolved(cfg: TrainConfig, out_dir: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``config.yaml`` (resolved) and ``run_info.json`` (git revision, versions) to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "config.yaml", "w") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)
    info = {"git_revision": git_revision(), "versions": package_versions(), **(extra or {})}
    with open(out / "run_info.json", "w") as f:
        json.dump(info, f, indent=2)
    return out / "config.yaml"
