"""Typed stage-2 configuration: nested dataclasses loaded from YAML plus dotted ``key=value`` overrides.

Unknown keys are an error naming the key and the valid ones; values are checked against the field
types. :func:`save_resolved` writes the resolved config next to a run with the git revision and the
package versions.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tipsdistill.cache.config_layer import (
    from_dict,
    load_file,
    merge_dicts,
    package_versions,
    parse_overrides,
)
from tipsdistill.cache.format import git_revision
from tipsdistill.cache.resources import workers_setting
from tipsdistill.students.heads import HEAD_WEIGHT_INITS

logger = logging.getLogger(__name__)

DATA_ORDERS = ("global", "shards")  # data.order (distill.data.build_sampler)

RECIPES_DIR = Path(__file__).parent / "recipes"


@dataclass
class StudentConfig:
    """The trainable student (see ``students.build_student``)."""

    name: str = "vit_tiny"  # students registry name (or a timm model name, depending on the registry)
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to the students builder
    init: str = "random"  # "random", or a path to an exported student / safetensors file


@dataclass
class TeacherConfig:
    """Where targets come from, and so what the run is. ``source``: cache (stage-1 HDF5) or online
    (live frozen teacher): distillation; ema (self-distillation, no external teacher): pretraining."""

    source: str = "cache"
    name: str = ""  # online: a teacher spec, as tipsdistill-cache --teacher (embedded, timm:MODEL, hf:REPO)
    kwargs: dict[str, Any] = field(default_factory=dict)
    image_size: int = 0  # online: teacher input size for the global crop (0 = same as data.image_size)
    layer: int | None = None  # online: block read out (None = last)


@dataclass
class CacheSection:
    """The stage-1 cache a stage-2 run reads (``cache.*``; the stage-1 settings are ``cache.CacheConfig``)."""

    path: str = ""  # cache index / file (cache.open_cache)
    target: str = "auto"  # "auto", "replay" (stored views) or "crop" (roi_align of the full-image map)
    expect_dim: int = 0  # 0 = no check; otherwise the teacher dim this recipe needs
    expect_grid: list[int] = field(default_factory=list)  # [] = no check; [h, w] otherwise
    prefetch: int = 2  # feature batches read ahead by the feeder thread (distill.feeder)
    # several teachers (distill.multi): caches of different teachers over the same dataset, one default
    # TeacherEntry each (named by the cache's teacher); `teachers: [...]` names and weighs them
    paths: list[str] = field(default_factory=list)


@dataclass
class TeacherEntry:
    """One teacher of a several-teacher run (``teachers: [...]``, :mod:`distill.multi`): its cache, its
    adaptor head on the student, its losses and their weights."""

    name: str = ""  # the adaptor's name (student.adaptor(name)); "" = the cache's teacher name
    path: str = ""  # the stage-1 cache of this teacher
    weight: float = 1.0  # multiplies every term of this teacher
    patch_weight: float = 1.0  # patch-token feature loss
    cls_weight: float = 1.0  # global-token (CLS) feature loss
    # cosine | smooth_l1 | mse (on standardised tokens) | proto (prototype cross-entropy through a head on
    # the adaptor, the teacher's tokens through its EMA copy: iBOT++ for patch tokens, DINO-style for CLS)
    patch_loss: str = "cosine"
    cls_loss: str = "cosine"
    standardize: str = "phi-s"  # phi-s | channel | none; statistics computed once, stored beside the cache
    text: bool | None = None  # the text-aligned teacher (its captions feed the CLIP term); None = auto
    hidden_dim: int = 0  # adaptor MLP width; 0 = max(student, teacher width)
    nlayers: int = 2
    stats_samples: int = 0  # samples the statistics are computed on; 0 = all


@dataclass
class DataConfig:
    dataset: str = ""  # "" = the one the cache recorded; else a name or spec (cache.dataset_spec)
    dataset_kwargs: dict[str, Any] = field(default_factory=dict)
    # sample order of each epoch: "global" (one permutation of all samples) or "shards" (a permutation of the
    # shards, then the samples of shard_window shards at a time shuffled together: few tar files open)
    order: str = "global"
    shard_window: int = 4
    image_size: int = 224  # global crop, student side
    local_crops: int = 6
    local_size: int = 98
    global_scale: list[float] = field(default_factory=lambda: [0.32, 1.0])  # crop area fraction
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.32])
    ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333])
    flip: bool = True
    batch_size: int = 32  # per process, per micro step
    # DataLoader workers per process; auto: fitted to the cores this process may use (affinity, cgroup
    # quota, divided among the node's ranks: cache.resources.auto_workers), logged at start
    num_workers: int | str = "auto"
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
    mask_prob: float = 1.0  # fraction of images masked at mask_ratio (iBOT/DINOv2 mask_probability: 0.5)
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    teacher_temp_warmup: float = 0.04
    teacher_temp_warmup_steps: int = 0
    center_momentum: float = 0.9
    # teacher-side centering of the prototype scores (DINO, patch): "center" (EMA) or "sinkhorn_knopp"
    centering: str = "center"
    sinkhorn_iters: int = 3
    clip_temp_init: float = 0.07
    # caption embeddings of the CLIP term: "cache" (the cached teacher text tower, locked), "student"
    # (the student's own text tower, student.kwargs.text), "teacher" (the online teacher's tower), "none"
    text_source: str = "cache"
    caption_probs: dict[str, float] = field(default_factory=lambda: {"short": 0.5, "detailed": 0.5})


@dataclass
class HeadConfig:
    out_dim: int = 4096  # prototypes K
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    nlayers: int = 3
    shared: bool = False  # one head for CLS and patch tokens
    # the MLP's init: "trunc_normal" (DINOv2) or "skip" (PyTorch's nn.Linear default, timm's name)
    weight_init: str = "trunc_normal"


@dataclass
class EMAConfig:
    """EMA targets of the prototype heads; the momentum follows a cosine from ``momentum`` to ``momentum_end``.

    ``kind``: "head" (TIPSv2 head-only EMA: an EMA copy of each projection head scores the targets),
    "full" (TIPS v1: an EMA copy of the whole student makes the targets; pretraining only), "none"
    (no EMA: only for head-free recipes, i.e. no prototype patch loss and no DINO term).
    """

    kind: str = "head"
    momentum: float = 0.994  # the recipes' value (TIPSv2)
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
    # weight decay on the class/register tokens and position tables too (DINO, iBOT and DINOv2 decay every
    # tensor but biases and norms); false: timm's classification groups (no decay on tokens, pos_embed)
    decay_tokens: bool = False
    accum_steps: int = 1


@dataclass
class EngineConfig:
    zero_stage: int = 0
    precision: str = "fp32"  # "fp32" or "bf16"
    deepspeed_config: str = ""  # optional user DeepSpeed JSON; batch sizes/stage from it win
    dist_backend: str = ""  # "" = nccl with CUDA, gloo otherwise
    cpu_threads: int = 0  # intra-op threads per process; 0 = fitted to the free cores (cache/resources.py)


@dataclass
class CheckpointConfig:
    every: int = 1000  # optimizer steps; 0 = only at the end
    keep_last: int = 3
    at_end: bool = True
    # the weights of the export: "auto" (the full EMA copy under ema.kind=full, as DINO/iBOT/TIPS release
    # it; else the student), "student" or "ema" (distill.export.export_model)
    export: str = "auto"


@dataclass
class LogConfig:
    every: int = 1
    # trackers every logged value goes to (rank 0), besides log.jsonl: tensorboard, wandb, mlflow
    # (distill.tracking; accelerate's tracker classes)
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    project: str = "tipsdistill"  # W&B project / MLflow experiment
    run_name: str = ""  # "" = the name of output_dir
    tracker_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)  # e.g. {wandb: {mode: offline}}
    # former switch: true adds "tensorboard" to log.trackers, false removes it (None: not set)
    tensorboard: bool | None = None
    progress: bool = True


# the training evaluation's defaults over SegmentationSettings' own: whole images at the training size
# (image_size / window / stride 0 or absent: data.image_size, image_size, window * 3 / 4), torch resizing
EVAL_SETTINGS_DEFAULTS: dict[str, Any] = {
    "mode": "whole",
    "readout": "tips",
    "templates": "tcl",
    "resize_backend": "torch",
}
# former flat keys of the eval section, now keys of eval.settings (read with a deprecation warning)
LEGACY_EVAL_KEYS = ("mode", "readout", "image_size", "window", "stride", "templates")


@dataclass
class EvalConfig:
    """Zero-shot segmentation while training (``distill.evaluation.while_training``): every ``every``
    optimizer steps (0 = off), the same code as ``tipsdistill-eval`` on ``max_images`` held-out images.

    ``settings`` are :class:`distill.evaluation.SegmentationSettings` keys (the one home of the
    protocol's knobs, as ``tipsdistill-eval``'s ``settings.*``): ``eval.settings.mode=slide``."""

    every: int = 0
    dataset: str = "synthetic"  # a registered evaluation dataset or a spec, as tipsdistill-eval --dataset
    dataset_kwargs: dict[str, Any] = field(default_factory=lambda: {"split": "validation"})
    max_images: int = 64
    settings: dict[str, Any] = field(default_factory=lambda: dict(EVAL_SETTINGS_DEFAULTS))
    # class-name text embeddings, computed once at the start: a file (one row per class), else a model
    # spec with a text tower (as tipsdistill-eval --text-model), else "auto": the online teacher, the
    # student's own tower (loss.text_source=student; recomputed at every evaluation), or the teacher
    # the cache recorded
    text_embeddings: str = ""
    text_model: str = ""
    # several teachers: "" measures the student's own tokens and text interface (as tipsdistill-eval DIR);
    # a teacher's name measures the student through that teacher's adaptor (as tipsdistill-eval DIR@name)
    adaptor: str = ""
    metric: str = "miou"  # the best checkpoint's metric: miou, miou_objects, pixel_accuracy, mean_accuracy
    keep_best: bool = True  # keep checkpoints/best (a complete checkpoint + best.json), apart from keep_last
    # the cache's recorded teacher may be rebuilt from a Python import path (package.module:factory), which
    # runs code named by the cache file: off by default (registry teachers only), like trust_remote_code
    trust_remote_code: bool = False


@dataclass
class TrainConfig:
    recipe: str = "distill"
    output_dir: str = "runs/distill"
    seed: int = 0
    steps: int = 1000  # optimizer steps
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    cache: CacheSection = field(default_factory=CacheSection)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    teachers: list[TeacherEntry] = field(default_factory=list)  # several teachers (distill.multi)

    @property
    def multi_teacher(self) -> bool:
        """Several caches (``teachers`` or ``cache.paths``), one student (:mod:`distill.multi`)."""
        return bool(self.teachers or self.cache.paths)

    @property
    def pretraining(self) -> bool:
        """Self-distillation (no external teacher): ``teacher.source=ema``."""
        return self.teacher.source == "ema"

    @property
    def uses_heads(self) -> bool:
        """Whether a prototype head scores targets (prototype patch loss or the DINO term; with several
        teachers, a teacher whose ``patch_loss`` or ``cls_loss`` is ``proto``)."""
        if self.multi_teacher:
            return any("proto" in (e.patch_loss, e.cls_loss) for e in self.teachers)
        loss = self.loss
        proto = loss.patch_weight > 0 and loss.patch == "proto"
        return proto or (loss.dino_weight > 0 and self.data.local_crops > 0)

    def validate(self) -> TrainConfig:
        """Cross-field checks; raise ValueError naming the key and the fix."""
        checks = [
            ("teacher.source", self.teacher.source, ("cache", "online", "ema")),
            ("cache.target", self.cache.target, ("auto", "replay", "crop")),
            ("loss.patch", self.loss.patch, ("proto", "cosine", "smooth_l1", "mse")),
            ("ema.kind", self.ema.kind, ("head", "full", "none")),
            ("loss.centering", self.loss.centering, ("center", "sinkhorn_knopp")),
            ("loss.text_source", self.loss.text_source, ("cache", "student", "teacher", "none")),
            ("engine.precision", self.engine.precision, ("fp32", "bf16")),
            ("engine.zero_stage", self.engine.zero_stage, (0, 1, 2, 3)),
            ("checkpoint.export", self.checkpoint.export, ("auto", "student", "ema")),
            ("head.weight_init", self.head.weight_init, HEAD_WEIGHT_INITS),
            ("data.order", self.data.order, DATA_ORDERS),
        ]
        for key, val, ok in checks:
            if val not in ok:
                raise ValueError(f"config {key}={val!r} is invalid; choose one of {list(ok)}")
        workers_setting(self.data.num_workers, "config data.num_workers")  # a number >= 0, or auto
        if self.teacher.source == "cache" and not self.cache.path and not self.multi_teacher:
            raise ValueError("teacher.source=cache needs cache.path=<path to the stage-1 cache>")
        if ":" in self.teacher.name:  # teacher.name=timm:MODEL, the one teacher spec (cache.config_layer)
            from tipsdistill.cache.config_layer import parse_teacher_spec

            self.teacher.name, self.teacher.kwargs = parse_teacher_spec(
                self.teacher.name, self.teacher.kwargs
            )
        if self.teacher.source == "online" and not self.teacher.name:
            raise ValueError("teacher.source=online needs teacher.name=<build_teacher name>")
        if self.checkpoint.export == "ema" and self.ema.kind != "full":
            raise ValueError(
                f"checkpoint.export=ema needs a full EMA copy (ema.kind=full), not ema.kind={self.ema.kind}; "
                "use checkpoint.export=auto or student"
            )
        if self.pretraining and self.ema.kind == "none":
            raise ValueError(
                "teacher.source=ema (pretraining) needs ema.kind=head or full (targets come from the EMA)"
            )
        if self.ema.kind == "full" and not self.pretraining:
            raise ValueError(
                f"ema.kind=full (an EMA copy of the student makes the targets) is for pretraining "
                f"(teacher.source=ema); with teacher.source={self.teacher.source} the teacher makes them: "
                "use ema.kind=head"
            )
        if self.ema.kind == "none" and self.uses_heads:
            raise ValueError(
                "ema.kind=none, but the prototype patch loss (loss.patch=proto) or the DINO term scores teacher "
                "tokens with an EMA head; set ema.kind=head, or use a head-free recipe (loss.patch=cosine and "
                "loss.dino_weight=0)"
            )
        text = self.loss.text_source
        if self.loss.clip_weight > 0 and text == "none":
            raise ValueError(
                "loss.clip_weight > 0 needs caption embeddings: set loss.text_source=cache (cached teacher text), "
                "student (student.kwargs.text=...) or teacher (online teacher), or loss.clip_weight=0"
            )
        if self.loss.clip_weight > 0 and text == "teacher" and self.teacher.source != "online":
            raise ValueError(
                "loss.text_source=teacher needs teacher.source=online (a live teacher's text tower)"
            )
        for key, m in (("ema.momentum", self.ema.momentum), ("ema.momentum_end", self.ema.momentum_end)):
            if not 0.0 <= m <= 1.0:
                raise ValueError(f"config {key}={m} must be in [0, 1]")
        if not 0.0 <= self.loss.mask_ratio < 1.0:
            raise ValueError(f"loss.mask_ratio={self.loss.mask_ratio} must be in [0, 1)")
        if not 0.0 < self.loss.mask_prob <= 1.0:
            raise ValueError(
                f"loss.mask_prob={self.loss.mask_prob} must be in (0, 1]; for no masking set loss.mask_ratio=0"
            )
        if self.data.shard_window < 1:
            raise ValueError(
                f"config data.shard_window={self.data.shard_window} must be >= 1 (the shards whose samples "
                "data.order=shards shuffles together; 1 = one shard at a time)"
            )
        if self.steps < 1 or self.data.batch_size < 1 or self.optim.accum_steps < 1:
            raise ValueError("steps, data.batch_size and optim.accum_steps must be >= 1")
        if self.eval.every < 0 or self.eval.max_images < 1:
            raise ValueError(
                f"eval.every={self.eval.every} must be >= 0 (0 = off) and eval.max_images={self.eval.max_images} >= 1"
            )
        if self.eval.settings != EVAL_SETTINGS_DEFAULTS:
            from tipsdistill.distill.evaluation.segmentation import training_settings

            training_settings(self.eval.settings, self.data.image_size)  # unknown keys, bad values: named
        if self.eval.adaptor and not self.multi_teacher:
            raise ValueError(
                f"eval.adaptor={self.eval.adaptor!r} measures the student through a teacher's adaptor; only a "
                "several-teacher run (teachers=[...] or cache.paths=[...]) has adaptors: drop eval.adaptor"
            )
        metric = self.eval.metric
        if metric not in ("miou", "pixel_accuracy", "mean_accuracy") and not metric.startswith("miou_"):
            raise ValueError(
                f"eval.metric={metric!r} is not a segmentation metric; choose miou, miou_<subset> (e.g. "
                "miou_objects), pixel_accuracy or mean_accuracy"
            )
        return self


# ----------------------------------------------------------------------------------------------
# loading: the generic typed machinery is tipsdistill.cache.config_layer (one home for every command)


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


def load_config(
    recipe: str | None = None, overrides: list[str] | None = None, data: dict | None = None
) -> TrainConfig:
    """Build a :class:`TrainConfig` from a recipe (name or YAML path), a dict and dotted overrides."""
    merged: dict[str, Any] = {}
    if recipe:
        merged = load_file(recipe_path(recipe), "recipe")
        merged.setdefault("recipe", Path(recipe).stem)
    if data:
        merged = merge_dicts(merged, data)
    if overrides:
        upd = parse_overrides(overrides)
        merged = merge_dicts(_other_architecture(merged, upd), upd)
    return from_dict(TrainConfig, _eval_settings(_drop_reader(_drop_mode(merged)))).validate()


def _eval_settings(merged: dict[str, Any]) -> dict[str, Any]:
    """``eval.settings`` over the training defaults (:data:`EVAL_SETTINGS_DEFAULTS`), so the resolved config
    shows every knob set. Configs written before the knobs moved under ``eval.settings``: ``eval.mode`` &
    co. are read as ``eval.settings.mode`` & co., with a deprecation warning (``eval.settings`` wins)."""
    ev = dict(merged.get("eval") or {})
    if not isinstance(merged.get("eval", {}), dict):
        return merged  # from_dict names the bad value
    moved = {k: ev.pop(k) for k in LEGACY_EVAL_KEYS if k in ev}
    if moved:
        logger.warning(
            "config keys %s are deprecated; write %s",
            ", ".join(f"eval.{k}" for k in moved),
            ", ".join(f"eval.settings.{k}={v}" for k, v in moved.items()),
        )
    given = ev.get("settings") or {}
    if not isinstance(given, dict):
        return merged
    ev["settings"] = {**EVAL_SETTINGS_DEFAULTS, **moved, **given}
    return {**merged, "eval": ev}


def _other_architecture(merged: dict[str, Any], upd: dict[str, Any]) -> dict[str, Any]:
    """A ``student.name`` override of another kind than the recipe's (a ViT recipe, a convolutional student:
    ``students.is_vit_student``) does not inherit the recipe's ``student.kwargs`` (the ViT's size keys would
    not fit it); the dropped keys are logged."""
    from tipsdistill.students import is_vit_student

    new = (upd.get("student") or {}).get("name")
    old = (merged.get("student") or {}).get("name")
    if not new or not old or is_vit_student(str(new)) == is_vit_student(str(old)):
        return merged
    dropped = (merged["student"] or {}).get("kwargs") or {}
    if dropped:
        logger.info(
            "student.name=%s is not a %s: the recipe's student.kwargs %s do not apply", new, old, dropped
        )
    return {**merged, "student": {**merged["student"], "kwargs": {}}}


def _drop_mode(merged: dict[str, Any]) -> dict[str, Any]:
    """Configs written before ``mode`` was folded into ``teacher.source``: a ``mode`` that agrees with
    the teacher source is dropped (with a warning), one that disagrees is an error naming the new key."""
    if "mode" not in merged:
        return merged
    merged = dict(merged)
    mode = merged.pop("mode")
    source = (merged.get("teacher") or {}).get("source", TeacherConfig.source)
    implied = "pretrain" if source == "ema" else "distill"
    if mode != implied:
        raise ValueError(
            f"config key 'mode' ({mode!r}) was replaced by teacher.source, which says {implied!r} here "
            f"(teacher.source={source}); drop 'mode' and set teacher.source=ema for pretraining or "
            "teacher.source=cache|online for distillation"
        )
    logger.warning("config key 'mode' is no longer read (teacher.source=%s says %s); drop it", source, mode)
    return merged


def _drop_reader(merged: dict[str, Any]) -> dict[str, Any]:
    """Configs written before stage 2 had one data path hold ``cache.reader`` (``batch``, or ``item``: the
    float32 targets built per item in the workers). Both are read as the one path, the feeder's batches
    (``distill.feeder``), whose targets equal the item reader's (tested to 1e-6, equal on the CPU), so an
    old config or checkpoint runs and resumes unchanged; the key is dropped with a warning. Any other
    value is an error."""
    cache = merged.get("cache")
    if not isinstance(cache, dict) or "reader" not in cache:
        return merged
    reader = cache["reader"]
    if reader not in ("batch", "item"):
        raise ValueError(
            f"config cache.reader={reader!r} is invalid, and the key is no longer read: stage 2 has one data "
            "path (feature batches read by the feeder thread); drop cache.reader"
        )
    logger.warning(
        "config key cache.reader (%r) is no longer read: stage 2 reads cached features one way, in batches "
        "in the training process (distill.feeder), with the same targets the item reader built; drop it",
        reader,
    )
    return {**merged, "cache": {k: v for k, v in cache.items() if k != "reader"}}


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return asdict(cfg)


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
