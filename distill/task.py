"""The training task: student + heads + losses per recipe, computing the dict of weighted loss terms.

:func:`build_task` returns a :class:`BuiltTask`: the ``nn.Module`` handed to DeepSpeed (student,
student heads, loss modules with their trainable parts and DINO/iBOT centers as buffers) plus state
kept *outside* the engine so ZeRO never partitions it: the EMA head(s) (head-only EMA, TIPSv2), the
full EMA student (TIPS v1 baseline), and the online teacher.

Targets per mode:
- ``distill`` + ``cache``: teacher patch/CLS tokens from the cache, aligned to the student's crop
  (``distill.data``); caption embeddings from the cache (locked teacher text tower);
- ``distill`` + ``online``: the teacher runs live on the student's global crop (same box and flip);
- ``pretrain``: targets from the student's own encoder on the unmasked crop (head-only EMA) or from a
  full EMA copy of the student (``ema.kind=full``).
Prototype losses feed teacher tokens through the EMA copy of the student head, after a frozen width
projection when teacher and student widths differ (``students.frozen_projection``).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import TrainConfig
from .data import DistillDataset, ResumableSampler, resample_grid

logger = logging.getLogger(__name__)


def open_cache(path: str, expect: dict[str, Any] | None = None) -> Any:
    """Open a stage-1 cache (indirection so tests can substitute a stand-in)."""
    from cache import open_cache as _open

    return _open(path, expect=expect)


def check_cache(cache: Any, cfg: TrainConfig) -> dict[str, Any]:
    """Refuse a cache whose teacher width or grid disagrees with the config, naming both values."""
    meta = dict(getattr(cache, "meta", {}) or {})
    if len(cache) == 0:
        raise ValueError(f"cache {cfg.cache.path} has no completed samples; finish stage 1 first")
    first = cache[0]
    patch = first["patch"]
    grid = tuple(int(v) for v in (meta.get("grid") or patch.shape[-3:-1]))
    dim = int(meta.get("dim") or patch.shape[-1])
    if cfg.cache.expect_dim and dim != cfg.cache.expect_dim:
        raise ValueError(
            f"cache {cfg.cache.path} holds teacher features of dim {dim}, but the config expects dim "
            f"{cfg.cache.expect_dim} (cache.expect_dim); use the cache built for this teacher or fix cache.expect_dim"
        )
    if cfg.cache.expect_grid and tuple(cfg.cache.expect_grid) != grid:
        raise ValueError(
            f"cache {cfg.cache.path} holds a teacher grid {list(grid)}, but the config expects grid "
            f"{list(cfg.cache.expect_grid)} (cache.expect_grid); rebuild the cache at that size or fix cache.expect_grid"
        )
    cls = _cls_2d(first["cls"], int(meta.get("num_global_tokens") or 1), patch.ndim == 4)
    text = first.get("text") or {}
    return {
        "dim": dim,
        "grid": list(grid),
        "num_global_tokens": int(cls.shape[-2]),
        "text_dim": int(next(iter(text.values())).shape[-1]) if text else 0,
        "granularities": sorted(text),
        "views": int(patch.shape[0]) if patch.ndim == 4 else 1,
        "meta_teacher": meta.get("teacher"),
    }


def _cls_2d(cls: torch.Tensor, num_global: int, views: bool) -> torch.Tensor:
    """Cache ``cls`` as ``(C, D)`` (``(V, C, D)`` with views), whatever squeezing the reader did."""
    want = 3 if views else 2
    if cls.ndim == want:
        return cls
    if views:
        return cls.reshape(cls.shape[0], num_global, -1)
    return cls.reshape(num_global, -1)


class TaskModule(nn.Module):
    """What DeepSpeed trains. ``forward(batch) -> {term: weighted scalar}``; the engine sums the terms."""

    def __init__(
        self, cfg: TrainConfig, student: nn.Module, *, teacher_dim: int, text_dim: int, text_source: str
    ) -> None:
        super().__init__()
        from students import build_head, frozen_projection

        from .objectives import DINOLoss, ImageTextLoss, KoLeoLoss, PatchFeatureLoss, PatchPrototypeLoss

        self.cfg = cfg
        L = cfg.loss
        self.student = student
        D = student.embed_dim
        self.teacher_dim = teacher_dim
        self.text_source = text_source
        hk = {
            "hidden_dim": cfg.head.hidden_dim,
            "bottleneck_dim": cfg.head.bottleneck_dim,
            "nlayers": cfg.head.nlayers,
        }
        cent = {
            "student_temp": L.student_temp,
            "teacher_temp": L.teacher_temp,
            "warmup_teacher_temp": L.teacher_temp_warmup,
            "warmup_teacher_temp_steps": L.teacher_temp_warmup_steps,
            "center_momentum": L.center_momentum,
        }
        self.use_patch = L.patch_weight > 0
        self.use_dino = L.dino_weight > 0 and cfg.data.local_crops > 0
        self.use_clip = L.clip_weight > 0
        self.use_koleo = L.koleo_weight > 0
        self.proto = L.patch == "proto"
        self.patch_head = self.cls_head = None
        if self.use_patch and self.proto:
            self.patch_head = build_head("dino", D, cfg.head.out_dim, **hk)
            self.patch_loss = PatchPrototypeLoss(
                cfg.head.out_dim,
                masked_weight=L.patch_masked_weight,
                visible_weight=L.patch_visible_weight,
                **cent,
            )
        elif self.use_patch:
            self.patch_loss = PatchFeatureLoss(
                L.patch,
                masked_weight=L.patch_masked_weight,
                visible_weight=L.patch_visible_weight,
                student_dim=D,
                teacher_dim=teacher_dim,
            )
        if self.use_dino:
            if cfg.head.shared and self.patch_head is not None:
                self.cls_head = self.patch_head
            else:
                self.cls_head = build_head("dino", D, cfg.head.out_dim, **hk)
            self.dino_loss = DINOLoss(cfg.head.out_dim, **cent)
        if self.use_clip:
            pairs = (("alt", 0), ("caption", 1 if student.num_global_tokens > 1 else 0))
            self.clip_loss = ImageTextLoss(
                pairs=pairs, image_dim=D, text_dim=text_dim, init_temperature=L.clip_temp_init
            )
        if self.use_koleo:
            self.koleo_loss = KoLeoLoss()
        # ---- state outside the engine (not submodules: ZeRO must not partition them)
        adapter = None
        if cfg.mode == "distill" and teacher_dim != D:
            adapter = frozen_projection(teacher_dim, D, seed=cfg.seed)
        # DeepSpeed broadcasts parameters as uint8 views, which fails on 0-dim tensors (e.g. a learnable
        # temperature): store them as shape (1,) (broadcasting keeps the maths unchanged);
        # before the EMA copies below, so they match
        for mod in self.modules():
            for name, prm in list(mod.named_parameters(recurse=False)):
                if prm.ndim == 0:
                    setattr(mod, name, nn.Parameter(prm.detach().reshape(1), requires_grad=prm.requires_grad))
        ext: dict[str, Any] = {"teacher": None, "ema_student": None, "ema_patch": None, "ema_cls": None}
        from .objectives import HeadEMA

        mk = {
            "total_steps": cfg.steps,
            "momentum_start": cfg.ema.momentum,
            "momentum_end": cfg.ema.momentum_end,
        }
        if self.patch_head is not None:
            ext["ema_patch"] = HeadEMA(self.patch_head, adapter=copy.deepcopy(adapter), **mk)
        if self.cls_head is not None:
            ext["ema_cls"] = (
                ext["ema_patch"]
                if self.cls_head is self.patch_head
                else HeadEMA(self.cls_head, adapter=copy.deepcopy(adapter), **mk)
            )
        if cfg.mode == "pretrain" and cfg.ema.kind == "full":
            ema_s = copy.deepcopy(student)
            ema_s.eval().requires_grad_(False)
            ext["ema_student"] = ema_s
        object.__setattr__(self, "ext", ext)
        self.step = 0
        self.caption_grans = [g for g in L.caption_probs]

    # ------------------------------------------------------------------ targets
    @torch.no_grad()
    def _targets(self, batch: dict[str, Any], grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        g = batch["global"]
        if cfg.mode == "distill" and cfg.teacher.source == "cache":
            return batch["t_patch"].float(), batch["t_cls"].float()
        if cfg.mode == "distill":
            teacher = self.ext["teacher"]
            x = batch.get("t_image", g).to(next(teacher.parameters()).dtype)
            tf = teacher.encode_image(x, layer=cfg.teacher.layer)
        elif self.ext["ema_student"] is not None:
            tf = self.ext["ema_student"](g, None)
        else:  # head-only EMA: the shared encoder on the unmasked crop
            tf = self.student(g, None)
        patch = tf.patch.float()
        if tuple(patch.shape[1:3]) != tuple(grid):
            patch = torch.stack([resample_grid(p, grid) for p in patch.cpu()]).to(g.device)
        return patch, tf.cls.float()

    def _draw_granularities(self, batch: dict[str, Any], available: list[set[str]]) -> list[str | None]:
        """CLS2's caption granularity per example: drawn from the sample's own uniform ``caption_u``
        (seeded per sample in the data, so independent of batch split and world size), then the
        :class:`CaptionSampler` fallback order for missing captions."""
        from .objectives import CaptionSampler

        probs = dict(self.cfg.loss.caption_probs)
        sampler = CaptionSampler(probs)
        names = list(probs)
        cdf = torch.tensor([probs[g] for g in names], dtype=torch.float64).cumsum(0)
        u = batch["caption_u"].double().cpu()
        idx = torch.searchsorted(cdf, u * cdf[-1], right=True).clamp_(max=len(names) - 1)
        return sampler.resolve([names[i] for i in idx.tolist()], available)

    def _text(self, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        if self.text_source == "cache":
            text, valid = batch["text"], batch.get("text_valid", {})
            B = text["alt"].shape[0]
            vm = {g: (valid[g].bool().cpu() if g in valid else torch.ones(B, dtype=torch.bool)) for g in text}
            avail = [{g for g in self.caption_grans if g in text and bool(vm[g][b])} for b in range(B)]
            grans = self._draw_granularities(batch, avail)
            ref = text["alt"]
            emb = torch.zeros_like(ref)
            for gname in {x for x in grans if x is not None}:
                sel = torch.tensor([x == gname for x in grans], dtype=torch.bool, device=ref.device)
                emb = torch.where(sel.unsqueeze(-1), text[gname].to(emb.dtype), emb)
            ok = torch.tensor([x is not None for x in grans], dtype=torch.bool, device=ref.device)
            return {"alt": ref, "caption": emb}, {"alt": valid.get("alt"), "caption": ok}
        caps = batch["captions"]
        B = len(caps["alt"])
        per_ex = [
            {g: (caps[g][i] if bool(batch["caption_valid"][g][i]) else None) for g in caps} for i in range(B)
        ]
        avail = [{g for g in self.caption_grans if c.get(g)} for c in per_ex]
        grans = self._draw_granularities(batch, avail)
        texts = [None if g is None else c[g] for g, c in zip(grans, per_ex)]
        alt = [c.get("alt") for c in per_ex]
        valid = {
            "alt": torch.tensor([a is not None for a in alt], dtype=torch.bool),
            "caption": torch.tensor([t is not None for t in texts], dtype=torch.bool),
        }
        alt = [a or "" for a in alt]
        texts = [t or "" for t in texts]
        if self.text_source == "student":
            enc = self.student.encode_text
            return {"alt": enc(alt), "caption": enc(texts)}, valid
        with torch.no_grad():
            enc = self.ext["teacher"].encode_text
            return {"alt": enc(alt).float(), "caption": enc(texts).float()}, valid

    # ------------------------------------------------------------------ forward
    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        L = self.cfg.loss
        g = batch["global"]
        B = g.shape[0]
        p = self.student.patch_size
        grid = (g.shape[-2] // p, g.shape[-1] // p)
        mask = batch["mask"].bool() if L.mask_ratio > 0 else None  # drawn per sample by the data
        feats = self.student(g, mask)
        t_patch, t_cls = self._targets(batch, grid)
        terms: dict[str, torch.Tensor] = {}
        step = self.step
        if self.use_patch:
            if self.proto:
                s_logits = self.patch_head(feats.patch.float().to(self._head_dtype(self.patch_head)))
                t_logits = self.ext["ema_patch"](t_patch.to(self._head_dtype(self.ext["ema_patch"])))
                out = self.patch_loss(s_logits.float(), t_logits.float(), mask, step)
            else:
                out = self.patch_loss(feats.patch.to(self._head_dtype(self.patch_loss)), t_patch, mask)
            terms["patch"] = L.patch_weight * out["patch"]
        if self.use_dino:
            loc = batch["locals"]
            n = loc.shape[1]
            lf = self.student(loc.reshape(B * n, *loc.shape[2:]), None)
            s_cls = self.cls_head(lf.cls[:, 0].to(self._head_dtype(self.cls_head)))  # (B*n, K)
            s_cls = s_cls.float().reshape(B, n, -1).transpose(0, 1)  # (n, B, K)
            t_logits = self.ext["ema_cls"](t_cls[:, 0].to(self._head_dtype(self.ext["ema_cls"]))).float()
            terms["dino"] = L.dino_weight * self.dino_loss(s_cls, t_logits, step)["dino"]
        if self.use_clip:
            text, valid = self._text(batch)
            gt = feats.cls.float().to(self._head_dtype(self.clip_loss))
            text = {k: v.to(gt.dtype) for k, v in text.items()}
            valid = {k: v.to(g.device) for k, v in valid.items() if v is not None}
            terms["clip"] = L.clip_weight * self.clip_loss(gt, text, valid)["clip"].float()
        if self.use_koleo:
            terms["koleo"] = L.koleo_weight * self.koleo_loss(feats.cls[:, 0].float())["koleo"]
        return terms

    @staticmethod
    def _head_dtype(m: nn.Module) -> torch.dtype:
        for p in m.parameters():
            return p.dtype if p.numel() else torch.float32
        return torch.float32


@dataclass
class BuiltTask:
    task: TaskModule
    student: nn.Module
    dataset: DistillDataset
    sampler: ResumableSampler
    info: dict[str, Any] = field(default_factory=dict)

    def set_step(self, step: int, vals: dict[str, float]) -> None:
        self.task.step = step

    @torch.no_grad()
    def after_step(self, step: int, engine: Any, gather: Callable) -> None:
        """EMA updates after optimizer step ``step`` (parameters gathered under ZeRO-3)."""
        t, ext = self.task, self.task.ext
        m = None
        done = set()
        for key, head in (("ema_patch", t.patch_head), ("ema_cls", t.cls_head)):
            ema = ext[key]
            if ema is None or id(ema) in done:
                continue
            done.add(id(ema))
            m = ema.update(head, step, gather=gather)
        if ext["ema_student"] is not None:
            m = ext["ema_patch"].momentum(step) if m is None else m
            params = list(t.student.parameters())
            with gather(params):
                for pe, ps in zip(ext["ema_student"].parameters(), params, strict=True):
                    pe.mul_(m).add_(ps.detach().to(pe.dtype), alpha=1.0 - m)

    def aux_state(self) -> dict[str, Any]:
        ext = self.task.ext
        out = {k: ext[k].state_dict() for k in ("ema_patch", "ema_cls", "ema_student") if ext[k] is not None}
        out["step"] = self.task.step
        return out

    def load_aux_state(self, state: dict[str, Any]) -> None:
        ext = self.task.ext
        for k in ("ema_patch", "ema_cls", "ema_student"):
            if ext[k] is not None:
                if k not in state:
                    raise ValueError(
                        f"checkpoint lacks the {k} state this recipe needs; resume with the same recipe"
                    )
                ext[k].load_state_dict(state[k])
        self.task.step = int(state.get("step", 0))


def build_student_from_config(cfg: TrainConfig) -> nn.Module:
    from students import build_student

    student = build_student(cfg.student.name, **cfg.student.kwargs)
    if cfg.student.init != "random":
        from .export import load_student_weights

        load_student_weights(student, cfg.student.init)
    return student


def build_source_dataset(cfg: TrainConfig) -> Any:
    """The student's images: by default the dataset recorded in the cache (``cache.path``); an explicit
    ``data.dataset`` (registry name or spec such as ``wds:...``) overrides it (see ``cache.spec``)."""
    from cache.spec import build_from_spec, source_for_cache

    if cfg.cache.path:
        return source_for_cache(cfg.cache.path, cfg.data.dataset or None, cfg.data.dataset_kwargs)
    if not cfg.data.dataset:
        logger.info("data.dataset is not set and there is no cache: using the built-in synthetic scenes")
    return build_from_spec(cfg.data.dataset or "synthetic", **cfg.data.dataset_kwargs)


def build_online_teacher(cfg: TrainConfig) -> nn.Module:
    import teachers

    try:
        import teachers.timm_teacher  # noqa: F401
    except ImportError:
        pass
    return teachers.build_teacher(cfg.teacher.name, **cfg.teacher.kwargs)


def build_task(cfg: TrainConfig, *, device: torch.device, rank: int = 0, world: int = 1) -> BuiltTask:
    """Build the student, heads, losses, data and the out-of-engine state for ``cfg``."""
    torch.manual_seed(cfg.seed)
    student = build_student_from_config(cfg)
    p = student.patch_size
    if cfg.data.image_size % p or cfg.data.local_size % p:
        raise ValueError(
            f"data.image_size={cfg.data.image_size} and data.local_size={cfg.data.local_size} must be multiples "
            f"of the student's patch size {p}"
        )
    grid = (cfg.data.image_size // p, cfg.data.image_size // p)
    source = build_source_dataset(cfg)
    cache = None
    info: dict[str, Any] = {"student": getattr(student, "config", {}), "student_grid": list(grid)}
    teacher = None
    teacher_dim = student.embed_dim
    text_dim, text_source = student.embed_dim, "none"
    if cfg.cache.path:
        expect = {}
        if cfg.cache.expect_dim:
            expect["dim"] = cfg.cache.expect_dim
        if cfg.cache.expect_grid:
            expect["grid"] = tuple(cfg.cache.expect_grid)
        cache = open_cache(cfg.cache.path, expect=expect or None)
        cinfo = check_cache(cache, cfg)
        info["cache"] = cinfo
        if cfg.teacher.source == "cache":
            teacher_dim = cinfo["dim"]
        if cinfo["text_dim"] and "alt" in cinfo["granularities"]:
            text_dim, text_source = cinfo["text_dim"], "cache"
    if cfg.teacher.source == "online":
        teacher = build_online_teacher(cfg).to(device)
        teacher_dim = teacher.embed_dim
        info["teacher"] = teacher.identity()
    if text_source == "none":
        if getattr(student, "has_text", False):
            text_dim, text_source = student.embed_dim, "student"
        elif teacher is not None and getattr(teacher, "has_text", False):
            text_dim, text_source = teacher.embed_dim, "teacher"
    if cfg.loss.clip_weight > 0 and text_source == "none":
        raise ValueError(
            "loss.clip_weight > 0 needs caption embeddings: a cache with text embeddings (incl. 'alt'), a student "
            "text tower (student.kwargs.text=...) or an online teacher with a text tower; or set loss.clip_weight=0"
        )
    info["text_source"] = text_source
    task = TaskModule(cfg, student, teacher_dim=teacher_dim, text_dim=text_dim, text_source=text_source)
    task.ext["teacher"] = teacher
    for k in ("ema_patch", "ema_cls", "ema_student"):
        m = task.ext[k]
        if m is not None:  # move children (HeadEMA shadows nn.Module._apply, so no .to() on it)
            for child in m.children():
                child.to(device)
    task.to(device)
    t_size = cfg.teacher.image_size if cfg.teacher.source == "online" else 0
    dataset = DistillDataset(
        source,
        cfg.data,
        grid,
        cache=cache if cfg.teacher.source == "cache" or text_source == "cache" else None,
        target=cfg.cache.target,
        teacher_image_size=t_size,
        seed=cfg.seed,
        mask_ratio=cfg.loss.mask_ratio,
    )
    sampler = ResumableSampler(len(dataset), rank=rank, world=world, seed=cfg.seed)
    info["num_samples"] = len(dataset)
    info["skipped"] = len(dataset.skipped_keys)
    info["trainable_params"] = sum(p.numel() for p in task.parameters() if p.requires_grad)
    return BuiltTask(task=task, student=student, dataset=dataset, sampler=sampler, info=info)
