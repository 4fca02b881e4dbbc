"""Per-teacher adaptor heads of a student distilled from several teachers (RADIO-style), and the
feature standardisations their losses compare in (PHI-S, per-channel).

A student trained on several caches carries one :class:`TeacherAdaptor` per teacher in
``student.adaptors`` (an ``nn.ModuleDict``): an MLP for the global token and one for the patch tokens,
each mapping the student's width ``D`` to the teacher's ``D_t``, plus the teacher's standardisation
(buffers, so they are checkpointed and exported with the student). The adaptors are trained against
*standardised* teacher tokens; :meth:`TeacherAdaptor.to_teacher` undoes the standardisation, so
:class:`AdaptedEncoder` (``student.adaptor(name)``) returns tokens in the teacher's own space: the
space its linear probes and, for a text-aligned teacher, its caption embeddings live in.

Standardisations (statistics from the teacher's cached tokens, :func:`standardisation`):

- ``phi-s`` (PHI-S, RADIOv2.5, arXiv 2410.01680): ``y = (x - mu) @ W.T / alpha`` with ``W = R U.T``,
  ``Sigma = U diag(lambda) U.T`` the tokens' covariance, ``R`` a rotation that spreads the variance
  evenly over the dimensions (the normalised Hadamard matrix ``H / sqrt(D)`` when ``D`` is a power of
  two; otherwise a product of Givens rotations with the same effect, see :func:`balancing_rotation`)
  and ``alpha = sqrt(mean(lambda))``: every dimension of ``y`` has variance 1 and the transform is
  isotropic (one scale), so the relative geometry of the teacher's space is kept;
- ``channel``: ``y = (x - mu) / sigma`` per dimension;
- ``none``: the raw tokens.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from tipsdistill.teachers.base import DenseEncoder, DenseFeatures

logger = logging.getLogger(__name__)

STANDARDISATIONS = ("phi-s", "channel", "none")


# ----------------------------------------------------------------------------------- standardisation
def hadamard(n: int) -> torch.Tensor:
    """The Sylvester Hadamard matrix ``(n, n)`` of +-1 entries (``n`` a power of two), float64."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def balancing_rotation(eigenvalues: torch.Tensor) -> torch.Tensor:
    """An orthogonal ``R (D, D)`` (float64) with ``diag(R diag(lambda) R.T) == mean(lambda)`` everywhere.

    ``H / sqrt(D)`` (Hadamard) when ``D`` is a power of two, as PHI-S; otherwise ``D - 1`` Givens rotations,
    each moving one dimension's variance to the mean (the Schur-Horn construction): the same diagonal."""
    lam = eigenvalues.double().flatten()
    d = lam.numel()
    if d & (d - 1) == 0:
        return hadamard(d) / math.sqrt(d)
    target = float(lam.mean())
    rot = torch.eye(d, dtype=torch.float64)
    diag = lam.clone()
    for _ in range(d - 1):
        above = torch.nonzero(diag > target + 1e-12 * max(1.0, abs(target))).flatten()
        below = torch.nonzero(diag < target - 1e-12 * max(1.0, abs(target))).flatten()
        if not len(above) or not len(below):
            break
        i, j = int(above[0]), int(below[0])
        a, b = float(diag[i]), float(diag[j])
        # rotate (i, j) by theta: new d_i = a cos^2 + b sin^2 = target
        s2 = (a - target) / (a - b)
        c, s = math.sqrt(1.0 - s2), math.sqrt(s2)
        # rot = G @ rot with G the Givens rotation of (i, j): only rows i and j change (O(D), not O(D^3))
        ri, rj = rot[i].clone(), rot[j]
        rot[i] = c * ri + s * rj
        rot[j] = -s * ri + c * rj
        diag[i], diag[j] = target, a + b - target
    return rot


def standardisation(
    kind: str, mean: torch.Tensor, cov: torch.Tensor, eps: float = 1e-8
) -> dict[str, torch.Tensor]:
    """The affine maps of standardisation ``kind`` from token statistics: ``mean (D,)`` and ``cov (D, D)``
    (float64). Returns float32 ``{"mean" (D,), "forward" (D, D), "inverse" (D, D)}`` with
    ``y = (x - mean) @ forward`` and ``x = y @ inverse + mean``."""
    if kind not in STANDARDISATIONS:
        raise ValueError(f"unknown standardisation {kind!r}; choose one of {list(STANDARDISATIONS)}")
    mean, cov = mean.double(), cov.double()
    d = mean.numel()
    if kind == "none":
        eye = torch.eye(d, dtype=torch.float64)
        fwd, inv = eye, eye
    elif kind == "channel":
        std = cov.diagonal().clamp_min(eps).sqrt()
        fwd, inv = torch.diag(1.0 / std), torch.diag(std)
    else:
        lam, u = torch.linalg.eigh((cov + cov.T) / 2)
        lam = lam.clamp_min(0.0)
        w = balancing_rotation(lam) @ u.T  # y = W (x - mu) / alpha
        alpha = math.sqrt(max(float(lam.mean()), eps))
        fwd, inv = w.T / alpha, w * alpha
    return {"mean": mean.float(), "forward": fwd.float(), "inverse": inv.float()}


# ------------------------------------------------------------------------------------------ adaptors
class AdaptorMLP(nn.Module):
    """RADIO's adaptor MLP: ``Linear(in, hidden) -> LayerNorm -> GELU``, then ``nlayers - 2`` residual
    ``LayerNorm -> Linear -> GELU`` blocks, then ``LayerNorm -> Linear(hidden, out)``;
    ``(..., in) -> (..., out)``."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, nlayers: int = 2) -> None:
        super().__init__()
        if nlayers < 2:
            raise ValueError(f"adaptor nlayers={nlayers} must be >= 2 (input and output layers)")
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.norm1 = nn.LayerNorm(hidden_dim)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden_dim), nn.Linear(hidden_dim, hidden_dim), nn.GELU())
            for _ in range(nlayers - 2)
        )
        self.final = nn.Sequential(nn.LayerNorm(hidden_dim), nn.Linear(hidden_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.gelu(self.norm1(self.fc1(x)))
        for block in self.blocks:
            x = x + block(x)
        return self.final(x)


class TeacherAdaptor(nn.Module):
    """One teacher's view of the student: ``cls`` and ``patch`` MLPs ``D -> D_t`` and the teacher's
    standardisation of its global (``cls_*``) and patch (``patch_*``) tokens, as buffers.

    Args:
        student_dim: the student's width ``D``.
        spec: ``{"teacher_dim", "hidden_dim" (0 = max(D, D_t)), "nlayers", "standardize", "text",
            "text_dim"}`` (what ``student.config["adaptors"][name]`` records).
    """

    def __init__(self, student_dim: int, spec: dict[str, Any]) -> None:
        super().__init__()
        unknown = set(spec) - {"teacher_dim", "hidden_dim", "nlayers", "standardize", "text", "text_dim"}
        if unknown:
            raise ValueError(f"unknown adaptor keys {sorted(unknown)}")
        self.teacher_dim = int(spec["teacher_dim"])
        hidden = int(spec.get("hidden_dim") or max(student_dim, self.teacher_dim))
        nlayers = int(spec.get("nlayers", 2))
        self.standardize = str(spec.get("standardize", "phi-s"))
        if self.standardize not in STANDARDISATIONS:
            raise ValueError(
                f"adaptor standardize={self.standardize!r}; choose one of {list(STANDARDISATIONS)}"
            )
        self.text = bool(spec.get("text", False))
        self.text_dim = int(spec.get("text_dim") or 0)
        self.cls = AdaptorMLP(student_dim, self.teacher_dim, hidden, nlayers)
        self.patch = AdaptorMLP(student_dim, self.teacher_dim, hidden, nlayers)
        d = self.teacher_dim
        eye = torch.eye(d)
        for which in ("cls", "patch"):
            self.register_buffer(f"{which}_mean", torch.zeros(d))
            self.register_buffer(f"{which}_forward", eye.clone())
            self.register_buffer(f"{which}_inverse", eye.clone())

    def set_statistics(self, which: str, maps: dict[str, torch.Tensor]) -> None:
        """Load the maps of :func:`standardisation` for ``which`` (``cls`` or ``patch``)."""
        for key in ("mean", "forward", "inverse"):
            buf = getattr(self, f"{which}_{key}")
            value = maps[key].to(buf.device, buf.dtype)
            if value.shape != buf.shape:
                raise ValueError(
                    f"{which} {key} statistics have shape {tuple(value.shape)}, the adaptor expects "
                    f"{tuple(buf.shape)} (teacher width {self.teacher_dim})"
                )
            buf.copy_(value)

    def standardise(self, which: str, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher tokens ``(..., D_t)`` -> standardised ``(..., D_t)`` float32."""
        mean, fwd = getattr(self, f"{which}_mean"), getattr(self, f"{which}_forward")
        return (tokens.float() - mean.float()) @ fwd.float()

    def to_teacher(self, which: str, tokens: torch.Tensor) -> torch.Tensor:
        """Standardised ``(..., D_t)`` (an adaptor's output) -> the teacher's own space ``(..., D_t)``."""
        mean, inv = getattr(self, f"{which}_mean"), getattr(self, f"{which}_inverse")
        return tokens.float() @ inv.float() + mean.float()


def attach_adaptors(student: nn.Module, specs: dict[str, dict[str, Any]] | None) -> None:
    """Give ``student`` one :class:`TeacherAdaptor` per entry of ``specs`` (``student.adaptors``); records
    ``specs`` in ``student.config["adaptors"]`` so ``build_student(**config)`` rebuilds them."""
    if not specs:
        return
    width = int(student.embed_dim)
    weight = next(student.parameters())
    student.adaptors = nn.ModuleDict(
        {name: TeacherAdaptor(width, dict(spec)) for name, spec in specs.items()}
    ).to(weight.device)
    student.config["adaptors"] = {name: dict(spec) for name, spec in specs.items()}


class AdaptedEncoder(DenseEncoder):
    """The student seen through one teacher's adaptor: a :class:`DenseEncoder` whose global, patch and
    value-trick tokens are the adaptor's outputs mapped back to the teacher's space ``(.., D_t)``, so it
    is evaluated (zero-shot with that teacher's text, linear probes) like the teacher.

    ``text_dim`` is ``D_t`` when the teacher's caption embeddings are as wide as its tokens (one shared
    space, as TIPS); a teacher without text, or with a separate projection, has no text space here."""

    def __init__(self, student: nn.Module, name: str) -> None:
        super().__init__()
        adaptors = getattr(student, "adaptors", None)
        if adaptors is None or name not in adaptors:
            have = sorted(adaptors) if adaptors is not None else []
            raise ValueError(
                f"the student has no adaptor {name!r} (it has {have or 'none'}); adaptors come from training "
                "on several teachers (teachers: [...] in the run config)"
            )
        self.student = student
        self.name = name
        self.adaptor: TeacherAdaptor = adaptors[name]
        self.patch_size = int(student.patch_size)
        self.embed_dim = self.adaptor.teacher_dim
        self.num_global_tokens = int(student.num_global_tokens)
        self.num_layers = int(getattr(student, "num_layers", 0))
        self.has_text = False
        self.config = dict(getattr(student, "config", {}) or {})
        if hasattr(student, "readouts"):  # a feature-map student: patch and the attention pool's maskclip
            self.readouts = tuple(student.readouts)

    @property
    def text_dim(self) -> int:
        a = self.adaptor
        if not a.text_dim or a.text_dim != a.teacher_dim:
            raise ValueError(
                f"adaptor {self.name!r}: its teacher's caption embeddings (width {a.text_dim or 'none'}) do not "
                f"share its token space (width {a.teacher_dim}); evaluate zero-shot through the text-aligned "
                "teacher's adaptor, or use linear probes"
            )
        return a.teacher_dim

    def _map(self, which: str, tokens: torch.Tensor | None) -> torch.Tensor | None:
        if tokens is None:
            return None
        head = getattr(self.adaptor, which)
        out = head(tokens.to(head.fc1.weight.dtype))
        return self.adaptor.to_teacher(which, out)

    def encode_image(
        self,
        pixels: torch.Tensor,
        *,
        value_trick: bool = False,
        value_readout: str = "tips",
        layer: int | None = None,
    ) -> DenseFeatures:
        """``(B, 3, H, W)`` -> ``cls (B, C, D_t)``, ``patch (B, h, w, D_t)`` (and ``value_patch``), float32."""
        feats = self.student.encode_image(
            pixels, value_trick=value_trick, value_readout=value_readout, layer=layer
        )
        return DenseFeatures(
            cls=self._map("cls", feats.cls),
            patch=self._map("patch", feats.patch),
            value_patch=self._map("patch", feats.value_patch),
        )

    def identity(self) -> dict[str, Any]:
        ident = self.student.identity() if hasattr(self.student, "identity") else {}
        return {**ident, "adaptor": self.name, "embed_dim": self.embed_dim}
