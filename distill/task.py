"""The training task: student + heads + losses, computing the dict of weighted loss terms.

:func:`build_task` returns a :class:`BuiltTask`: the ``nn.Module`` handed to DeepSpeed
(:class:`TaskModule`: student, student heads, loss modules with their trainable parts and DINO/iBOT
centers as buffers) plus state kept *outside* the engine so ZeRO never partitions it: the EMA heads
(:class:`distill.ema.EMAHeads`, head-only EMA, TIPSv2) and the targets object
(:mod:`distill.targets`: cached teacher tokens, a live teacher, the student itself or its full EMA copy).

The task is told where its targets and captions come from (one injected :class:`~distill.targets.Targets`
and one :class:`~distill.targets.TextSource`, chosen by ``teacher.source`` and ``loss.text_source``);
it does not branch on the mode. Prototype losses feed teacher tokens through the EMA copy of the
student head, after a frozen width projection when teacher and student widths differ
(``students.frozen_projection``). Scheduled values (teacher temperature, EMA momentum) come from the
training loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tipsdistill.cache import FeatureCache, open_cache
from tipsdistill.cache.dataset_spec import build_from_spec, source_for_cache
from tipsdistill.students import build_head, build_student, frozen_projection, load_student_weights
from tipsdistill.teachers import build_teacher

from .config import TrainConfig
from .data import DistillDataset, ResumableSampler, build_sampler
from .ema import EMAHeads
from .losses import DINOLoss, ImageTextLoss, KoLeoLoss, PatchFeatureLoss, PatchPrototypeLoss
from .targets import (
    CachedTargets,
    CachedText,
    EMAStudentTargets,
    OnlineTargets,
    SelfTargets,
    Targets,
    TextSource,
    TowerText,
)

logger = logging.getLogger(__name__)


def check_cache(cache: FeatureCache, cfg: TrainConfig) -> dict[str, Any]:
    """Refuse a cache whose teacher width or grid disagrees with the config, naming both values and the
    key; returns the cache's facts (:meth:`cache.CacheSpec.summary`)."""
    if len(cache) == 0:
        raise ValueError(f"cache {cfg.cache.path} has no completed samples; finish stage 1 first")
    spec = cache.spec
    if cfg.cache.expect_dim and spec.dim != cfg.cache.expect_dim:
        raise ValueError(
            f"cache {cfg.cache.path} holds teacher features of dim {spec.dim}, but the config expects dim "
            f"{cfg.cache.expect_dim} (cache.expect_dim); use the cache built for this teacher or fix cache.expect_dim"
        )
    if cfg.cache.expect_grid and tuple(cfg.cache.expect_grid) != spec.grid:
        raise ValueError(
            f"cache {cfg.cache.path} holds a teacher grid {list(spec.grid)}, but the config expects grid "
            f"{list(cfg.cache.expect_grid)} (cache.expect_grid); rebuild the cache at that size or fix cache.expect_grid"
        )
    return spec.summary()


def _head_dtype(module: nn.Module) -> torch.dtype:
    for prm in module.parameters():
        return prm.dtype if prm.numel() else torch.float32
    return torch.float32


def _scalar_params_as_vectors(module: nn.Module) -> None:
    """DeepSpeed broadcasts parameters as uint8 views, which fails on 0-dim tensors (e.g. a learnable
    temperature): store them as shape (1,) (broadcasting keeps the maths unchanged)."""
    for mod in module.modules():
        for name, prm in list(mod.named_parameters(recurse=False)):
            if prm.ndim == 0:
                setattr(mod, name, nn.Parameter(prm.detach().reshape(1), requires_grad=prm.requires_grad))


class TaskModule(nn.Module):
    """What DeepSpeed trains. ``forward(batch, *, teacher_temp) -> {term: weighted scalar}``; the engine
    sums the terms.

    Args:
        cfg: the run config (loss weights, head sizes).
        student: the student (a ``students.Student``).
        targets: where the teacher tokens come from (:mod:`distill.targets`); its ``dim`` is ``D_t``.
        text: where the caption embeddings come from, with their width; ``None`` without a CLIP term.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        student: nn.Module,
        *,
        targets: Targets,
        text: tuple[TextSource, int] | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.student = student
        self.targets = targets
        self.text, text_dim = text if text is not None else (None, 0)
        width = student.embed_dim
        self.patch_head, self.patch_loss = self._patch_term(cfg, width, targets.dim)
        self.cls_head = self.dino_loss = None
        if cfg.loss.dino_weight > 0 and cfg.data.local_crops > 0:
            shared = cfg.head.shared and self.patch_head is not None
            self.cls_head = self.patch_head if shared else self._head(width)
            self.dino_loss = DINOLoss(cfg.head.out_dim, **self._centering())
        self.clip_loss = None
        if cfg.loss.clip_weight > 0:
            if student.text_dim != text_dim:
                raise ValueError(
                    f"the captions are {text_dim} wide but the student's text space is {student.text_dim}; "
                    f"set student.kwargs.text_dim={text_dim} (or leave it unset: it follows the captions)"
                )
            pairs = (("alt", 0), ("caption", 1 if student.num_global_tokens > 1 else 0))
            self.clip_loss = ImageTextLoss(pairs=pairs, init_temperature=cfg.loss.clip_temp_init)
        self.koleo_loss = KoLeoLoss() if cfg.loss.koleo_weight > 0 else None
        _scalar_params_as_vectors(self)  # before the EMA copies, so they match
        adapter = frozen_projection(targets.dim, width, seed=cfg.seed) if targets.dim != width else None
        self.ema_heads = EMAHeads(self.patch_head, self.cls_head, adapter)

    def _head(self, width: int) -> nn.Module:
        head = self.cfg.head
        return build_head(
            "dino",
            width,
            head.out_dim,
            hidden_dim=head.hidden_dim,
            bottleneck_dim=head.bottleneck_dim,
            nlayers=head.nlayers,
            weight_init=head.weight_init,
        )

    def _centering(self) -> dict[str, Any]:
        loss = self.cfg.loss
        return {
            "student_temp": loss.student_temp,
            "teacher_temp": loss.teacher_temp,
            "center_momentum": loss.center_momentum,
            "centering": loss.centering,
            "sinkhorn_iters": loss.sinkhorn_iters,
        }

    def _patch_term(
        self, cfg: TrainConfig, width: int, teacher_dim: int
    ) -> tuple[nn.Module | None, nn.Module | None]:
        """The patch head (prototype loss only) and the patch loss; ``(None, None)`` without the term."""
        loss = cfg.loss
        weights = {"masked_weight": loss.patch_masked_weight, "visible_weight": loss.patch_visible_weight}
        if loss.patch_weight <= 0:
            return None, None
        if loss.patch == "proto":
            return self._head(width), PatchPrototypeLoss(cfg.head.out_dim, **weights, **self._centering())
        return None, PatchFeatureLoss(loss.patch, **weights, student_dim=width, teacher_dim=teacher_dim)

    # ------------------------------------------------------------------------------------- forward
    def forward(self, batch: dict[str, Any], *, teacher_temp: float) -> dict[str, torch.Tensor]:
        loss = self.cfg.loss
        pixels = batch["global"]
        patch_size = self.student.patch_size
        grid = (pixels.shape[-2] // patch_size, pixels.shape[-1] // patch_size)
        mask = batch["mask"].bool() if loss.mask_ratio > 0 else None  # drawn per sample by the data
        feats = self.student(pixels, mask)
        t_patch, t_cls = self.targets(batch, grid)
        terms: dict[str, torch.Tensor] = {}
        if self.patch_loss is not None:
            terms["patch"] = loss.patch_weight * self._patch(feats.patch, t_patch, mask, teacher_temp)
        if self.dino_loss is not None:
            terms["dino"] = loss.dino_weight * self._dino(batch["locals"], t_cls, teacher_temp)
        if self.clip_loss is not None:
            terms["clip"] = loss.clip_weight * self._clip(feats.cls, batch, pixels.device)
        if self.koleo_loss is not None:
            terms["koleo"] = loss.koleo_weight * self.koleo_loss(feats.cls[:, 0].float())["koleo"]
        return terms

    def _patch(
        self, tokens: torch.Tensor, t_patch: torch.Tensor, mask: torch.Tensor | None, teacher_temp: float
    ) -> torch.Tensor:
        """Student patch tokens ``(B, h, w, D)`` vs teacher tokens ``(B, h, w, D_t)``."""
        if self.patch_head is None:  # head-free feature loss
            return self.patch_loss(tokens.to(_head_dtype(self.patch_loss)), t_patch, mask)["patch"]
        ema = self.ema_heads.patch
        s_logits = self.patch_head(tokens.float().to(_head_dtype(self.patch_head)))
        t_logits = ema(t_patch.to(_head_dtype(ema)))
        return self.patch_loss(s_logits.float(), t_logits.float(), mask, teacher_temp=teacher_temp)["patch"]

    def _dino(self, local_crops: torch.Tensor, t_cls: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Local crops ``(B, n, 3, s, s)`` through the student vs the teacher's CLS1 ``(B, D_t)``."""
        batch_size, n_local = local_crops.shape[:2]
        local_feats = self.student(local_crops.reshape(batch_size * n_local, *local_crops.shape[2:]), None)
        s_logits = self.cls_head(local_feats.cls[:, 0].to(_head_dtype(self.cls_head)))  # (B*n, K)
        s_logits = s_logits.float().reshape(batch_size, n_local, -1).transpose(0, 1)  # (n, B, K)
        ema = self.ema_heads.cls
        t_logits = ema(t_cls[:, 0].to(_head_dtype(ema))).float()
        return self.dino_loss(s_logits, t_logits, teacher_temp=teacher_temp)["dino"]

    def _clip(self, global_tokens: torch.Tensor, batch: dict[str, Any], device: torch.device) -> torch.Tensor:
        """Global tokens ``(B, C, D)`` vs the caption embeddings of the batch."""
        text, valid = self.text(batch)
        # the student's text interface (identity at equal width)
        image = self.student.project_to_text(global_tokens)
        image = image.float().to(_head_dtype(self.clip_loss))
        text = {key: emb.to(image.dtype) for key, emb in text.items()}
        valid = {key: ok.to(device) for key, ok in valid.items() if ok is not None}
        return self.clip_loss(image, text, valid)["clip"].float()


@dataclass
class BuiltTask:
    task: TaskModule
    student: nn.Module
    dataset: DistillDataset
    sampler: ResumableSampler
    info: dict[str, Any] = field(default_factory=dict)
    text_cache_meta: dict[str, Any] | None = (
        None  # several teachers: the text-aligned teacher's cache metadata
    )

    def _outside(self) -> dict[str, nn.Module]:
        """The out-of-engine modules that train (EMA copies), by checkpoint name."""
        task = self.task
        modules = {**task.ema_heads.modules(), **task.targets.modules()}
        return {name: module for name, module in modules.items() if name != "teacher"}

    @torch.no_grad()
    def after_step(self, *, momentum: float, gather: Callable) -> None:
        """EMA updates after an optimizer step at the scheduled ``momentum`` (parameters gathered under ZeRO-3)."""
        task = self.task
        task.ema_heads.update(task.patch_head, task.cls_head, momentum=momentum, gather=gather)
        task.targets.update(task.student, momentum=momentum, gather=gather)

    def aux_state(self) -> dict[str, Any]:
        return {name: module.state_dict() for name, module in self._outside().items()}

    def load_aux_state(self, state: dict[str, Any]) -> None:
        for name, module in self._outside().items():
            if name not in state:
                raise ValueError(
                    f"checkpoint lacks the {name} state this recipe needs; resume with the same recipe"
                )
            module.load_state_dict(state[name])


# ------------------------------------------------------------------------------------------ building
def move_task(task: TaskModule, device: torch.device) -> None:
    """``task`` and its out-of-engine state (EMA heads, targets) onto ``device``."""
    for module in task.ema_heads.modules().values():  # HeadEMA shadows nn.Module._apply: move its children
        for child in module.children():
            child.to(device)
    for module in task.targets.modules().values():
        module.to(device)
    task.to(device)


def build_student_from_config(cfg: TrainConfig) -> nn.Module:
    student = build_student(cfg.student.name, **cfg.student.kwargs)
    if cfg.student.init != "random":
        load_student_weights(student, cfg.student.init)
    return student


def build_source_dataset(cfg: TrainConfig, cache: FeatureCache | None = None) -> Any:
    """The student's images: by default the dataset recorded in the cache (``cache``, else opened from
    ``cache.path``); an explicit ``data.dataset`` (registry name or spec such as ``wds:...``) overrides it
    (see ``cache.dataset_spec``). With a cache: its samples only, in its order, the keys checked there
    (:class:`cache.dataset_spec.CachedSubset`, whose ``left_out`` keys the dataset reports as skipped)."""
    if cfg.cache.path:
        return source_for_cache(
            cache if cache is not None else cfg.cache.path,
            cfg.data.dataset or None,
            cfg.data.dataset_kwargs,
            only_cached=True,
        )
    if not cfg.data.dataset:
        logger.info("data.dataset is not set and there is no cache: using the built-in synthetic scenes")
    return build_from_spec(cfg.data.dataset or "synthetic", **cfg.data.dataset_kwargs)


def _build_targets(
    cfg: TrainConfig, student: nn.Module, cache: FeatureCache | None, device: torch.device
) -> Targets:
    source = cfg.teacher.source
    if source == "cache":
        basis = cache.reduction.tensors(device) if cache.reduction is not None else None
        return CachedTargets(cache.spec.dim, cache.spec.grid, basis=basis)
    if source == "online":
        return OnlineTargets(
            build_teacher(cfg.teacher.name, **cfg.teacher.kwargs).to(device), cfg.teacher.layer
        )
    if cfg.ema.kind == "full":
        return EMAStudentTargets(student)
    return SelfTargets(student)


def _build_text(
    cfg: TrainConfig, student: nn.Module, targets: Targets, cache: FeatureCache | None
) -> tuple[TextSource, int] | None:
    """The caption source named by ``loss.text_source`` and its width; ``None`` without a CLIP term."""
    source, probs = cfg.loss.text_source, cfg.loss.caption_probs
    if cfg.loss.clip_weight <= 0:
        return None
    if source == "cache":
        if cache is None or not cache.spec.has_text:
            where = (
                f"cache {cfg.cache.path} has no caption embeddings (incl. 'alt')"
                if cache
                else "no cache.path"
            )
            raise ValueError(
                f"loss.text_source=cache, but {where}; cache captions in stage 1 (a teacher with a text tower), "
                "or set loss.text_source=student (student.kwargs.text=...) or loss.clip_weight=0"
            )
        return CachedText(probs), cache.spec.text_dim
    if source == "student":
        if not getattr(student, "has_text", False):
            raise ValueError(
                "loss.text_source=student needs a student text tower: student.kwargs.text={kind: tips, ...}"
            )
        return TowerText(student.encode_text, probs, trainable=True), student.text_dim
    teacher = targets.modules().get("teacher")
    if not getattr(teacher, "has_text", False):
        raise ValueError(
            "loss.text_source=teacher needs an online teacher with a text tower (teacher.source=online)"
        )
    return TowerText(teacher.encode_text, probs, trainable=False), teacher.text_dim


def _align_text_width(cfg: TrainConfig, student: nn.Module, text_dim: int) -> bool:
    """Give the student its text interface: a projection into the caption embeddings' space when they are
    wider or narrower than its tokens (``Student.set_text_dim``), recorded in ``student.kwargs.text_dim`` so
    checkpoints, exports and resumes rebuild it. A ``text_dim`` the user set must match the captions.
    Returns whether the student changed (a projection was added or replaced)."""
    asked = cfg.student.kwargs.get("text_dim")
    if asked is not None and int(asked) != int(text_dim):
        raise ValueError(
            f"student.kwargs.text_dim={asked}, but the captions ({cfg.loss.text_source}) are {text_dim} wide; "
            f"set student.kwargs.text_dim={text_dim} or drop it"
        )
    changed = student.text_dim != text_dim
    if changed:
        student.set_text_dim(int(text_dim))
    if text_dim != student.embed_dim:
        cfg.student.kwargs["text_dim"] = int(text_dim)
    return changed


def build_task(
    cfg: TrainConfig,
    *,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
    cache: FeatureCache | None = None,
) -> BuiltTask:
    """Build the student, heads, losses, targets, data and the out-of-engine state for ``cfg``.
    ``cache``: the opened ``cache.path`` (opened here when ``None``); set-up opens it once and passes it."""
    if cfg.multi_teacher:  # several teachers: distill.multi builds that task (it imports this module)
        raise ValueError(
            "this config names several teachers (teachers / cache.paths): build it with "
            "distill.multi.build_multi_task (tipsdistill-train does)"
        )
    torch.manual_seed(cfg.seed)
    student = build_student_from_config(cfg)
    patch_size = student.patch_size
    if cfg.data.image_size % patch_size or cfg.data.local_size % patch_size:
        raise ValueError(
            f"data.image_size={cfg.data.image_size} and data.local_size={cfg.data.local_size} must be multiples "
            f"of the student's patch size {patch_size}"
        )
    grid = (cfg.data.image_size // patch_size, cfg.data.image_size // patch_size)
    if cache is None and cfg.cache.path:
        cache = open_cache(cfg.cache.path)
    source = build_source_dataset(cfg, cache)
    info: dict[str, Any] = {"student": getattr(student, "config", {}), "student_grid": list(grid)}
    if cache is not None:
        info["cache"] = check_cache(cache, cfg)
    targets = _build_targets(cfg, student, cache, device)
    if isinstance(targets, OnlineTargets):
        info["teacher"] = targets.teacher.identity()
    text = _build_text(cfg, student, targets, cache)
    if (
        text is not None
        and _align_text_width(cfg, student, text[1])
        and isinstance(targets, EMAStudentTargets)
    ):
        targets = EMAStudentTargets(student)  # the full EMA copy follows the student's text interface too
    info["text_source"] = cfg.loss.text_source if text is not None else "none"
    info["text_dim"] = student.text_dim
    if not cfg.uses_heads and cfg.ema.kind == "head":
        logger.info(
            "ema.kind=head: this recipe has no prototype head (no proto patch loss, no DINO); nothing to average"
        )
    task = TaskModule(cfg, student, targets=targets, text=text)
    move_task(task, device)
    # the cache fields read in the training process for each batch (distill.feeder)
    fields = ("patch", "cls") if cfg.teacher.source == "cache" else ()
    fields += ("text",) if isinstance(task.text, CachedText) else ()
    reads_cache = bool(fields)
    dataset = DistillDataset(
        source,
        cfg.data,
        grid,
        cache=cache if reads_cache else None,
        target=cfg.cache.target,
        teacher_image_size=cfg.teacher.image_size if cfg.teacher.source == "online" else 0,
        seed=cfg.seed,
        mask_ratio=cfg.loss.mask_ratio,
        mask_prob=cfg.loss.mask_prob,
        batch_features=fields,
    )
    sampler = build_sampler(dataset, cfg.data, rank=rank, world=world, seed=cfg.seed)
    info["num_samples"] = len(dataset)
    info["skipped"] = len(dataset.skipped_keys)
    info["trainable_params"] = sum(prm.numel() for prm in task.parameters() if prm.requires_grad)
    return BuiltTask(task=task, student=student, dataset=dataset, sampler=sampler, info=info)
