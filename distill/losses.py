"""TIPSv2 training objectives. Every objective is an ``nn.Module`` whose ``forward`` returns a dict of
named, differentiable scalar loss terms (``{"clip": ...}``, ``{"dino": ...}``, ``{"patch": ...}``,
``{"koleo": ...}``); the task multiplies each by its weight and sums. Diagnostics (detached floats)
are in ``objective.metrics`` after each call, never in the returned dict.

Some objectives hold trainable parameters (the learnable temperature, width adapters): put
``objective.parameters()`` in the optimizer. Centers are buffers (saved in ``state_dict``).

Paper defaults (``docs/objectives.md``): ``L = L_CLIP + 1.0 * L_DINO + 2.0 * L_iBOT++``; student temp
0.1; teacher temp 0.04 -> 0.07 warm-up; center momentum 0.9; iBOT++ mask ratio 0.75 with uniform
weights over all tokens; distillation mask ratio 0.

Schedules are not owned here: the training loop (``distill.train`` with ``distill.schedules``) passes the
scheduled teacher temperature into each call (``loss(..., teacher_temp=t)``, as DINOv3 does); a loss
built with ``teacher_temp=`` uses that constant when the caller passes none.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_gather
from torch.nn import functional as F

from tipsdistill.students.heads import build_head

logger = logging.getLogger(__name__)

CENTERINGS = ("center", "sinkhorn_knopp")
FEATURE_LOSSES = ("cosine", "smooth_l1", "mse")


# ----------------------------------------------------------------------------- distributed helpers
def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather ``(B, ...)`` from every rank into ``(world * B, ...)`` (rank order), differentiably.

    The backward pass sums, for the local slice, the gradients of every rank's loss (autograd-aware
    ``torch.distributed.nn.functional.all_gather``). With the usual gradient averaging over ranks
    (DeepSpeed, DDP) the parameter gradient is then exactly that of the mean of the ranks' losses,
    i.e. of one process holding the whole global batch. All ranks must pass the same ``B``.
    Identity without ``torch.distributed``.
    """
    _, world = _world()
    if world == 1:
        return x
    return torch.cat(all_gather(x.contiguous()), dim=0)


def _gather_nograd(x: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(_world()[1])]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def _all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if _world()[1] > 1:
        dist.all_reduce(x)
    return x


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, temp: float, iters: int = 3) -> torch.Tensor:
    """DINOv2 Sinkhorn-Knopp teacher probabilities over ``(M, K)`` logits (rows summed across ranks)."""
    logits = _up(teacher_logits)
    Q = torch.exp(logits / temp).t()  # (K, M)
    M = torch.tensor(Q.shape[1], device=Q.device, dtype=Q.dtype)
    M = _all_reduce_sum(M)
    K = Q.shape[0]
    Q /= _all_reduce_sum(Q.sum())
    for _ in range(iters):
        row = _all_reduce_sum(Q.sum(dim=1, keepdim=True))
        Q /= row
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True)
        Q /= M
    Q *= M
    return Q.t()


def _up(x: torch.Tensor) -> torch.Tensor:
    """Compute in at least float32 (keeps float64 as is)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _to_module_dtype(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """Cast ``x`` to the dtype of ``module``'s first parameter (e.g. bf16 under DeepSpeed); as is if none."""
    for p in module.parameters():
        return x.to(p.dtype)
    return x


def _check_temp(name: str, t: float) -> float:
    if not t > 0:
        raise ValueError(f"{name} must be > 0, got {t}")
    return float(t)


class _Centered(nn.Module):
    """Teacher-side softmax with EMA centering (or Sinkhorn-Knopp) at the caller's teacher temperature."""

    def __init__(
        self,
        out_dim: int,
        *,
        student_temp: float = 0.1,
        teacher_temp: float = 0.07,
        center_momentum: float = 0.9,
        centering: str = "center",
        sinkhorn_iters: int = 3,
    ) -> None:
        super().__init__()
        if centering not in CENTERINGS:
            raise ValueError(f"unknown centering {centering!r}; choose one of {CENTERINGS}")
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum}")
        self.out_dim = int(out_dim)
        self.student_temp = _check_temp("student_temp", student_temp)
        self.teacher_temp = _check_temp("teacher_temp", teacher_temp)
        self.center_momentum = float(center_momentum)
        self.centering = centering
        self.sinkhorn_iters = int(sinkhorn_iters)
        self.register_buffer("center", torch.zeros(1, self.out_dim))
        self.metrics: dict[str, float] = {}

    def _temp(self, teacher_temp: float | None) -> float:
        """The caller's (scheduled) teacher temperature, or the constant the loss was built with."""
        return self.teacher_temp if teacher_temp is None else _check_temp("teacher_temp", teacher_temp)

    def _check_dim(self, x: torch.Tensor, what: str) -> None:
        if x.shape[-1] != self.out_dim:
            raise ValueError(
                f"{type(self).__name__}: {what} has {x.shape[-1]} prototypes, the loss was built for {self.out_dim}"
            )

    @torch.no_grad()
    def teacher_probs(self, teacher_logits: torch.Tensor, teacher_temp: float | None = None) -> torch.Tensor:
        """``(..., K)`` logits -> ``(..., K)`` target probabilities (float32), no gradient."""
        self._check_dim(teacher_logits, "teacher logits")
        temp = self._temp(teacher_temp)
        t = _up(teacher_logits.detach())
        if self.centering == "center":
            return F.softmax((t - self.center) / temp, dim=-1)
        flat = t.reshape(-1, t.shape[-1])
        return sinkhorn_knopp(flat, temp, self.sinkhorn_iters).reshape(t.shape)

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """``center <- m * center + (1 - m) * mean(teacher logits)`` (mean over all rows of all ranks)."""
        t = _up(teacher_logits.detach()).reshape(-1, self.out_dim)
        total = _all_reduce_sum(t.sum(dim=0, keepdim=True))
        count = _all_reduce_sum(torch.tensor(float(t.shape[0]), device=t.device))
        mean = total / count.clamp_min(1.0)
        self.center.mul_(self.center_momentum).add_(
            mean.to(self.center.dtype), alpha=1.0 - self.center_momentum
        )


# ----------------------------------------------------------------------------- image-text
class ContrastiveLoss(nn.Module):
    """Symmetric softmax InfoNCE with a learnable temperature and in-batch negatives from all ranks.

    ``logit_scale = exp(log_scale)`` with ``log_scale = log(1 / temperature)`` learnable, clamped to
    ``temperature in [min_temperature, max_temperature]``.

    ``forward(image (B, D), text (B, D), valid (B,) | None) -> scalar``: both sides L2-normalised;
    local rows against the gathered columns of all ranks; ``0.5 * (CE(i->t) + CE(t->i))`` averaged over
    valid local rows. Invalid examples are neither queries nor negatives. The result is always a 0-d
    tensor (also when the temperature parameter is stored as shape ``(1,)``, as under DeepSpeed): a
    batch with no valid example gives a 0-d zero that still reaches every input and the temperature,
    so it stacks with the other terms and its backward pass runs on every rank.
    """

    def __init__(
        self,
        init_temperature: float = 0.07,
        *,
        learnable: bool = True,
        min_temperature: float = 0.005,
        max_temperature: float = 1.0,
        gather: bool = True,
    ) -> None:
        super().__init__()
        if not 0 < min_temperature <= init_temperature <= max_temperature:
            raise ValueError(
                f"need 0 < min_temperature <= init_temperature <= max_temperature, got "
                f"{min_temperature}, {init_temperature}, {max_temperature}"
            )
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)), requires_grad=learnable)
        self.min_temperature = float(min_temperature)
        self.max_temperature = float(max_temperature)
        self.gather = gather
        self.metrics: dict[str, float] = {}

    def logit_scale(self) -> torch.Tensor:
        return self.log_scale.clamp(
            math.log(1.0 / self.max_temperature), math.log(1.0 / self.min_temperature)
        ).exp()

    @property
    def temperature(self) -> float:
        return float(1.0 / self.logit_scale().detach())

    def forward(
        self, image: torch.Tensor, text: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        if image.ndim != 2 or text.ndim != 2 or image.shape != text.shape:
            raise ValueError(
                f"contrastive loss needs image and text embeddings of equal shape (B, D), got "
                f"{tuple(image.shape)} and {tuple(text.shape)}; project one side to the other's width"
            )
        B = image.shape[0]
        if valid is None:
            valid = torch.ones(B, dtype=torch.bool, device=image.device)
        valid = valid.to(image.device).bool()
        img = F.normalize(_up(image), dim=-1)
        txt = F.normalize(_up(text).to(_up(image).dtype), dim=-1)
        rank, world = _world() if self.gather else (0, 1)
        img_all = gather_with_grad(img) if world > 1 else img
        txt_all = gather_with_grad(txt) if world > 1 else txt
        valid_all = _gather_nograd(valid.to(torch.uint8)).bool() if world > 1 else valid
        scale = self.logit_scale()
        neg = torch.finfo(img.dtype).min
        col_mask = ~valid_all.unsqueeze(0)
        logits_i2t = (scale * img @ txt_all.t()).masked_fill(col_mask, neg)
        logits_t2i = (scale * txt @ img_all.t()).masked_fill(col_mask, neg)
        labels = torch.arange(B, device=image.device) + rank * B
        n = int(valid.sum())
        if n == 0:  # nothing to contrast on this rank: a 0-d zero on the same graph (see the docstring)
            self.metrics = {"num_valid": 0.0, "temperature": self.temperature}
            return (img.sum() + txt.sum() + img_all.sum() + txt_all.sum() + scale.sum()) * 0.0
        li = F.cross_entropy(logits_i2t[valid], labels[valid])
        lt = F.cross_entropy(logits_t2i[valid], labels[valid])
        with torch.no_grad():
            acc = (logits_i2t[valid].argmax(-1) == labels[valid]).float().mean()
        self.metrics = {"num_valid": float(n), "temperature": self.temperature, "i2t_acc": float(acc)}
        return (0.5 * (li + lt)).reshape(())


class ImageTextLoss(nn.Module):
    """TIPSv2 image-text term: CLS1 <-> alt-text and CLS2 <-> sampled caption, averaged.

    Args:
        pairs: ``(text key, global-token index)`` pairs; default ``(("alt", 0), ("caption", 1))``.
            A student with one global token uses ``(("alt", 0), ("caption", 0))``.
        The global tokens must already be in the text space: a student whose width differs from the
        text's projects them with its own text interface (``students.Student.project_to_text``, exported
        with it), never with a module of the loss.
        init_temperature, min_temperature, max_temperature, learnable, gather: see
            :class:`ContrastiveLoss` (one shared temperature).
    ``forward(global_tokens (B, C, D_img), text {key: (B, D_txt)}, valid {key: (B,)} | None)
    -> {"clip": mean over pairs}``. ``text`` comes from cached teacher embeddings (see
    ``CaptionSampler.sample_embeddings``) or a trainable tower (``student.encode_text``).
    """

    def __init__(
        self,
        *,
        pairs: Sequence[tuple[str, int]] = (("alt", 0), ("caption", 1)),
        init_temperature: float = 0.07,
        min_temperature: float = 0.005,
        max_temperature: float = 1.0,
        learnable: bool = True,
        gather: bool = True,
    ) -> None:
        super().__init__()
        if not pairs:
            raise ValueError("ImageTextLoss needs at least one (text key, global token index) pair")
        self.pairs = [(str(k), int(i)) for k, i in pairs]
        self.contrastive = ContrastiveLoss(
            init_temperature,
            learnable=learnable,
            min_temperature=min_temperature,
            max_temperature=max_temperature,
            gather=gather,
        )
        self.metrics: dict[str, float] = {}

    def forward(
        self,
        global_tokens: torch.Tensor,
        text: Mapping[str, torch.Tensor],
        valid: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        if global_tokens.ndim != 3:
            raise ValueError(f"global_tokens must be (B, C, D), got {tuple(global_tokens.shape)}")
        valid = valid or {}
        terms = []
        self.metrics = {}
        for key, idx in self.pairs:
            if idx >= global_tokens.shape[1]:
                raise ValueError(
                    f"pair ({key!r}, {idx}) needs global token {idx} but the student has {global_tokens.shape[1]}; "
                    f"use pairs=(('alt', 0), ('caption', 0)) for one global token"
                )
            if key not in text:
                raise ValueError(f"ImageTextLoss: no text embeddings for {key!r}; got keys {sorted(text)}")
            img = global_tokens[:, idx]
            if img.shape[-1] != text[key].shape[-1]:
                raise ValueError(
                    f"mismatched widths: image tokens {img.shape[-1]} vs text {key!r} {text[key].shape[-1]}; "
                    "project the image tokens into the text space first (a student with text_dim="
                    f"{text[key].shape[-1]} carries that projection: Student.project_to_text)"
                )
            terms.append(self.contrastive(img, text[key], valid.get(key)).reshape(()))
            self.metrics.update({f"{key}/{k}": v for k, v in self.contrastive.metrics.items()})
        return {"clip": torch.stack(terms).mean()}


# ----------------------------------------------------------------------------- DINO (global)
class DINOLoss(_Centered):
    """DINO cross-entropy between teacher global-crop and student local-crop prototype scores.

    ``forward(student_logits, teacher_logits, *, teacher_temp=None, update_center=True) -> {"dino": loss}``:

    - ``student_logits``: ``(S, B, K)`` (or a list of ``(B, K)``), the head applied to the CLS of
      each of the S local crops;
    - ``teacher_logits``: ``(T, B, K)`` or ``(B, K)``, the (EMA / frozen) head on the global crop CLS.

    Loss = mean over all (student crop, teacher crop) pairs and images of
    ``-sum_k p_t[k] log softmax(s / student_temp)[k]``, ``p_t = softmax((t - center) / teacher_temp)``
    (or Sinkhorn-Knopp), ``teacher_temp`` from the caller's schedule (default: the constructor's). The
    center is updated afterwards (EMA, ``center_momentum``) when ``update_center`` and in training mode.
    Constructor: ``DINOLoss(out_dim, *, student_temp=0.1, teacher_temp=0.07, center_momentum=0.9,
    centering="center", sinkhorn_iters=3)``.
    """

    def forward(
        self,
        student_logits: torch.Tensor | Sequence[torch.Tensor],
        teacher_logits: torch.Tensor,
        *,
        teacher_temp: float | None = None,
        update_center: bool = True,
    ) -> dict[str, torch.Tensor]:
        s = (
            torch.stack(list(student_logits))
            if not isinstance(student_logits, torch.Tensor)
            else student_logits
        )
        t = teacher_logits.unsqueeze(0) if teacher_logits.ndim == 2 else teacher_logits
        if s.ndim != 3 or t.ndim != 3 or s.shape[1] != t.shape[1]:
            raise ValueError(
                f"DINOLoss needs student (S, B, K) and teacher (T, B, K), got {tuple(s.shape)}, {tuple(t.shape)}"
            )
        self._check_dim(s, "student logits")
        temp = self._temp(teacher_temp)
        p_t = self.teacher_probs(t, temp)  # (T, B, K)
        logp_s = F.log_softmax(_up(s) / self.student_temp, dim=-1)  # (S, B, K)
        # mean over pairs (i, j) and images of -sum_k p_t[j] log p_s[i]
        loss = -torch.einsum("tbk,sbk->", p_t.to(logp_s.dtype), logp_s) / (
            s.shape[0] * t.shape[0] * s.shape[1]
        )
        if update_center and self.training and self.centering == "center":
            self.update_center(t)
        self.metrics = {"teacher_temp": temp}
        return {"dino": loss}


# ----------------------------------------------------------------------------- patch losses
def _flatten_tokens(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.ndim == 4:
        return x.reshape(x.shape[0], -1, x.shape[-1])
    if x.ndim != 3:
        raise ValueError(f"{what} must be (B, N, D) or (B, h, w, D), got {tuple(x.shape)}")
    return x


def token_weights(
    mask: torch.Tensor | None,
    shape: tuple[int, int],
    masked_weight: float,
    visible_weight: float,
    device: torch.device,
) -> torch.Tensor:
    """Per-token weights ``(B, N)``: ``masked_weight`` where ``mask`` is True, ``visible_weight`` elsewhere."""
    B, N = shape
    if mask is None:
        return torch.full((B, N), float(visible_weight), device=device)
    m = mask.reshape(mask.shape[0], -1).to(device)
    if m.dtype != torch.bool:
        raise ValueError(f"mask must be bool (True = masked), got {m.dtype}")
    if tuple(m.shape) != (B, N):
        raise ValueError(f"mask has shape {tuple(m.shape)}, the tokens are {(B, N)}")
    return torch.where(
        m,
        torch.tensor(float(masked_weight), device=device),
        torch.tensor(float(visible_weight), device=device),
    )


def weighted_token_mean(per_token: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``mean_b [ sum_n w_bn l_bn / sum_n w_bn ]`` over images with a non-zero weight sum.

    iBOT (visible weight 0): mean over masked tokens per image, then over images. iBOT++ / distillation
    (uniform weights): mean over all tokens.
    A batch where no token has weight (iBOT with nothing masked) gives a 0-d zero on ``per_token``'s graph.
    """
    wsum = weights.sum(dim=1)
    keep = wsum > 0
    if not bool(keep.any()):
        return per_token.sum() * 0.0
    per_image = (per_token * weights).sum(dim=1)[keep] / wsum[keep]
    return per_image.mean()


def _check_weights(masked_weight: float, visible_weight: float) -> None:
    if masked_weight < 0 or visible_weight < 0 or masked_weight + visible_weight == 0:
        raise ValueError(
            f"patch loss weights must be >= 0 and not both 0, got masked={masked_weight}, visible={visible_weight}"
        )


class PatchPrototypeLoss(_Centered):
    """iBOT-style prototype cross-entropy per patch, with separate weights for masked/visible tokens.

    ``forward(student_logits (B, N, K) | (B, h, w, K), teacher_logits (same), mask (B, N) bool | None,
    *, teacher_temp=None, update_center=True) -> {"patch": loss}``.

    Per token ``l = -sum_k p_t log softmax(s / student_temp)``, ``p_t`` from the teacher logits with
    centering (or Sinkhorn-Knopp) at the caller's (scheduled) teacher temperature; reduced with
    :func:`weighted_token_mean`. ``masked_weight=1, visible_weight=0``: iBOT; ``1, 1``: iBOT++ (paper
    default); ``mask=None`` (ratio 0) with ``visible_weight=1``: all-token distillation. The center is
    the EMA of the mean teacher logit over all tokens.
    """

    def __init__(
        self,
        out_dim: int,
        *,
        masked_weight: float = 1.0,
        visible_weight: float = 1.0,
        **centering: Any,
    ) -> None:
        super().__init__(
            out_dim, **centering
        )  # student_temp, teacher_temp, center_momentum, centering, sinkhorn_iters
        _check_weights(masked_weight, visible_weight)
        self.masked_weight = float(masked_weight)
        self.visible_weight = float(visible_weight)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        teacher_temp: float | None = None,
        update_center: bool = True,
    ) -> dict[str, torch.Tensor]:
        per_token = self.per_token(student_logits, teacher_logits, teacher_temp=teacher_temp)
        w = token_weights(mask, per_token.shape, self.masked_weight, self.visible_weight, per_token.device)
        loss = weighted_token_mean(per_token, w)
        if update_center and self.training and self.centering == "center":
            self.update_center(teacher_logits)
        return {"patch": loss}

    def per_token(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, teacher_temp: float | None = None
    ) -> torch.Tensor:
        """The cross-entropy of every token ``(B, N)`` (no weighting, no center update)."""
        s = _flatten_tokens(student_logits, "student logits")
        t = _flatten_tokens(teacher_logits, "teacher logits")
        if s.shape != t.shape:
            raise ValueError(f"student logits {tuple(s.shape)} and teacher logits {tuple(t.shape)} differ")
        self._check_dim(s, "student logits")
        temp = self._temp(teacher_temp)
        p_t = self.teacher_probs(t, temp)
        self.metrics = {"teacher_temp": temp}
        return -(p_t * F.log_softmax(_up(s) / self.student_temp, dim=-1)).sum(-1)


class PatchFeatureLoss(nn.Module):
    """Head-free per-patch feature loss between adapted student tokens and teacher tokens.

    Args:
        kind: ``"cosine"`` (``1 - cos``), ``"smooth_l1"`` (mean over dims, ``beta``), ``"mse"`` (mean over dims).
        masked_weight, visible_weight: token weights as in :class:`PatchPrototypeLoss`.
        student_dim, teacher_dim: widths; if given the loss owns an adapter ``student_dim -> teacher_dim``
            (``adapter``: ``"linear"``/``"mlp"`` from ``students.build_head``, or ``None`` = identity,
            which needs equal widths).
        teacher_mean, teacher_std: optional per-dimension statistics ``(D_t,)``; the teacher features
            are standardised ``(t - mean) / std`` first (cache ``meta`` has them).
    ``forward(student (B, N, D_s) | (B, h, w, D_s), teacher (B, N, D_t) | (B, h, w, D_t), mask | None)
    -> {"patch": loss}``.
    """

    def __init__(
        self,
        kind: str = "cosine",
        *,
        masked_weight: float = 1.0,
        visible_weight: float = 1.0,
        student_dim: int | None = None,
        teacher_dim: int | None = None,
        adapter: str | None = "linear",
        adapter_kwargs: Mapping[str, Any] | None = None,
        teacher_mean: torch.Tensor | Sequence[float] | None = None,
        teacher_std: torch.Tensor | Sequence[float] | None = None,
        beta: float = 1.0,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if kind not in FEATURE_LOSSES:
            raise ValueError(f"unknown feature loss {kind!r}; choose one of {FEATURE_LOSSES}")
        _check_weights(masked_weight, visible_weight)
        self.kind = kind
        self.masked_weight = float(masked_weight)
        self.visible_weight = float(visible_weight)
        self.beta = float(beta)
        self.eps = float(eps)
        self.student_dim, self.teacher_dim = student_dim, teacher_dim
        self.adapter: nn.Module = nn.Identity()
        if adapter is not None and student_dim is not None and teacher_dim is not None:
            self.adapter = build_head(adapter, student_dim, teacher_dim, **dict(adapter_kwargs or {}))
        elif (
            adapter is None
            and student_dim is not None
            and teacher_dim is not None
            and student_dim != teacher_dim
        ):
            raise ValueError(
                f"mismatched widths: student {student_dim} vs teacher {teacher_dim} and adapter=None; "
                "use adapter='linear' or 'mlp'"
            )
        if (teacher_mean is None) != (teacher_std is None):
            raise ValueError("give both teacher_mean and teacher_std (or neither)")
        if teacher_mean is not None:
            mean = torch.as_tensor(teacher_mean, dtype=torch.float32).flatten()
            std = torch.as_tensor(teacher_std, dtype=torch.float32).flatten()
            if mean.shape != std.shape or (teacher_dim is not None and mean.numel() != teacher_dim):
                raise ValueError(
                    f"teacher_mean/std shapes {tuple(mean.shape)}/{tuple(std.shape)} do not match width {teacher_dim}"
                )
            if bool((std <= 0).any()):
                raise ValueError("teacher_std must be > 0 in every dimension")
            self.register_buffer("teacher_mean", mean)
            self.register_buffer("teacher_std", std)
        else:
            self.teacher_mean = None
            self.teacher_std = None
        self.metrics: dict[str, float] = {}

    def per_token(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """``(B, N, D)`` adapted student and standardised teacher -> ``(B, N)`` per-token losses."""
        if self.kind == "cosine":
            return 1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=self.eps)
        if self.kind == "smooth_l1":
            return F.smooth_l1_loss(student, teacher, reduction="none", beta=self.beta).mean(-1)
        return F.mse_loss(student, teacher, reduction="none").mean(-1)

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        s = _up(self.adapter(_to_module_dtype(_flatten_tokens(student, "student tokens"), self.adapter)))
        t = _up(_flatten_tokens(teacher, "teacher tokens").detach()).to(s.dtype)
        if s.shape != t.shape:
            raise ValueError(
                f"mismatched widths/shapes: adapted student {tuple(s.shape)} vs teacher {tuple(t.shape)}; "
                "pass student_dim and teacher_dim so an adapter is built"
            )
        if self.teacher_mean is not None:
            t = (t - self.teacher_mean.to(t.dtype)) / self.teacher_std.to(t.dtype)
        per_token = self.per_token(s, t)
        w = token_weights(mask, per_token.shape, self.masked_weight, self.visible_weight, per_token.device)
        return {"patch": weighted_token_mean(per_token, w)}


# ----------------------------------------------------------------------------- KoLeo
class KoLeoLoss(nn.Module):
    """KoLeo regulariser (DINOv2): ``-mean_i log(min_j ||x_i - x_j|| + eps)`` on L2-normalised ``(B, D)``.

    ``forward(x (B, D)) -> {"koleo": loss}`` (per rank, like DINOv2). A rank with fewer than two rows has
    no neighbour to push away from: the term is then a 0-d zero on ``x``'s graph (``metrics["num_rows"]``
    says so), never an error that stops the run.
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = float(eps)
        self.metrics: dict[str, float] = {}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.ndim != 2:
            raise ValueError(f"KoLeo needs (B, D), got {tuple(x.shape)}")
        self.metrics = {"num_rows": float(x.shape[0])}
        if x.shape[0] < 2:
            return {"koleo": _up(x).sum() * 0.0}
        x = F.normalize(_up(x), dim=-1, eps=self.eps)
        with torch.no_grad():
            dots = x @ x.t()
            dots.fill_diagonal_(-2.0)
            nn_idx = dots.argmax(dim=1)
        dist_ = F.pairwise_distance(x, x[nn_idx], p=2, eps=self.eps)
        return {"koleo": -torch.log(dist_ + self.eps).mean()}


# ----------------------------------------------------------------------------- registry
_LOSSES: dict[str, Callable[..., nn.Module]] = {
    "clip": lambda **kw: ImageTextLoss(**kw),
    "dino": lambda **kw: DINOLoss(**kw),
    "ibot": lambda **kw: PatchPrototypeLoss(**{"masked_weight": 1.0, "visible_weight": 0.0, **kw}),
    "ibot++": lambda **kw: PatchPrototypeLoss(**{"masked_weight": 1.0, "visible_weight": 1.0, **kw}),
    "patch_proto": lambda **kw: PatchPrototypeLoss(**kw),
    "patch_cosine": lambda **kw: PatchFeatureLoss("cosine", **kw),
    "patch_smooth_l1": lambda **kw: PatchFeatureLoss("smooth_l1", **kw),
    "patch_mse": lambda **kw: PatchFeatureLoss("mse", **kw),
    "koleo": lambda **kw: KoLeoLoss(**kw),
}


def list_losses() -> list[str]:
    return sorted(_LOSSES)


def build_loss(name: str, **kwargs: Any) -> nn.Module:
    """Build an objective by name: ``clip``, ``dino``, ``ibot``, ``ibot++``, ``patch_proto``,
    ``patch_cosine``, ``patch_smooth_l1``, ``patch_mse``, ``koleo``; kwargs go to its class."""
    if name not in _LOSSES:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(list_losses())}")
    return _LOSSES[name](**kwargs)
