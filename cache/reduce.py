"""Reduced-dimension storage: patch tokens stored as ``K`` coefficients of a PCA basis (``--reduce-dim K``).

Stage 1 fits the basis once per cache, before any sample is written, on the patch tokens of the first
``fit_images`` images of the dataset (all their tokens, or a seeded random subset of ``fit_tokens``
of them when there are more), computed by the same teacher forward as the cache itself. The mean
``(D,)`` and basis ``(D, K)`` (orthonormal columns, the top ``K`` eigenvectors of the token covariance,
sign-fixed) are kept

- in ``OUT/reduce_basis.npz`` (written by rank 0, read by the other ranks, so every shard of a cache
  has the same basis; a resumed or repaired shard reuses it, it is never refitted), and
- in every shard and in ``index.h5`` as datasets ``reduce/<name>/mean`` and ``reduce/<name>/basis``
  (float32), with the attributes ``reduce_dim`` and ``reduce_fit`` (images, tokens, seed, explained
  variance).

Tokens are stored as ``(x - mean) @ basis`` in the cache's storage dtype (float16, or int8 with a
per-token scale on top); :func:`cache.codec.decode` reconstructs ``coeffs @ basis.T + mean``.
Global (CLS) tokens and caption text embeddings keep their full dimension: they are ``C + G`` vectors
per image against ``h*w`` patch tokens (1-5 % of the bytes), and the CLS tokens are the DINO / CLIP
targets, whose directions PCA fitted on patch tokens need not keep.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from .codec import decode

logger = logging.getLogger(__name__)

BASIS_FILE = "reduce_basis.npz"
GROUP = "reduce"
REDUCED = ("patch", "value_patch")  # the token features stored as coefficients


@dataclass
class Reduction:
    """The PCA bases of one cache: ``bases[name] = (mean (D,), basis (D, K))`` float32 for ``name`` in
    :data:`REDUCED` present; ``fit`` records how they were fitted (JSON-serialisable)."""

    dim: int
    bases: dict[str, tuple[np.ndarray, np.ndarray]]
    fit: dict[str, Any] = field(default_factory=dict)

    def project(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``x (..., D)`` -> float32 coefficients ``(..., K)`` on ``x``'s device."""
        mean, basis = self.bases[name]
        m = torch.from_numpy(mean).to(x.device)
        b = torch.from_numpy(basis).to(x.device)
        return (x.float() - m) @ b

    def decode(self, name: str, values: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Stored coefficients ``(..., K)`` (+ int8 scale) -> float32 tokens ``(..., D)``."""
        mean, basis = self.bases[name]
        return decode(values, scale, basis=basis, mean=mean)

    def tensors(self, device: torch.device | str = "cpu") -> dict[str, dict[str, torch.Tensor]]:
        """``{name: {"basis": (D, K), "mean": (D,)}}`` as float32 tensors on ``device`` (for
        :func:`cache.codec.decode` on batches)."""
        return {
            n: {"basis": torch.from_numpy(b).to(device), "mean": torch.from_numpy(m).to(device)}
            for n, (m, b) in self.bases.items()
        }

    # ---- storage -------------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        """``OUT/reduce_basis.npz``, written to a temporary name, fsynced, renamed."""
        import json

        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        arrays = {f"{n}|mean": m for n, (m, _) in self.bases.items()}
        arrays |= {f"{n}|basis": b for n, (_, b) in self.bases.items()}
        with open(tmp, "wb") as fh:
            np.savez(fh, dim=np.array(self.dim), fit=np.array(json.dumps(self.fit, sort_keys=True)), **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Reduction:
        import json

        try:
            with np.load(path) as z:
                dim = int(z["dim"])
                fit = json.loads(str(z["fit"]))
                names = sorted({k.split("|")[0] for k in z.files if "|" in k})
                bases = {
                    n: (z[f"{n}|mean"].astype(np.float32), z[f"{n}|basis"].astype(np.float32)) for n in names
                }
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(
                f"the PCA basis file {path} is unreadable ({e}); it was written by rank 0 before any shard. "
                "Shards already written keep their own copy (reduce/<name>/basis): rerun the same command, "
                "it reads the basis back from them"
            ) from e
        return cls(dim=dim, bases=bases, fit=fit)

    def write_h5(self, f: h5py.File) -> None:
        """Datasets ``reduce/<name>/mean (D,)`` and ``reduce/<name>/basis (D, K)`` in ``f``."""
        for n, (m, b) in self.bases.items():
            g = f.require_group(f"{GROUP}/{n}")
            g.create_dataset("mean", data=m.astype(np.float32))
            g.create_dataset("basis", data=b.astype(np.float32))

    @classmethod
    def read_h5(cls, f: h5py.File, meta: dict[str, Any]) -> Reduction | None:
        """The reduction stored in ``f`` (``None`` for a full-dimension cache)."""
        dim = int(meta.get("reduce_dim") or 0)
        if not dim:
            return None
        if GROUP not in f:
            raise ValueError(
                f"{f.filename} says reduce_dim={dim} but holds no {GROUP}/ datasets (mean and basis): it was not "
                "written by tipsdistill-cache; rebuild it"
            )
        bases = {
            n: (f[f"{GROUP}/{n}/mean"][()].astype(np.float32), f[f"{GROUP}/{n}/basis"][()].astype(np.float32))
            for n in f[GROUP]
        }
        return cls(dim=dim, bases=bases, fit=dict(meta.get("reduce_fit") or {}))


class PCAFitter:
    """Accumulates token statistics for :func:`fit` (float64 sums on the tokens' device).

    ``add(name, x (..., D))`` keeps a seeded random subset of the tokens: ``keep`` of every batch's
    tokens (all when ``keep >= 1``)."""

    def __init__(self, keep: float, seed: int) -> None:
        self.keep = keep
        self.gen = torch.Generator().manual_seed(seed)
        self.sums: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}

    def add(self, name: str, x: torch.Tensor) -> None:
        t = x.reshape(-1, x.shape[-1])
        if self.keep < 1:
            n = max(1, round(t.shape[0] * self.keep))
            pick = torch.randperm(t.shape[0], generator=self.gen)[:n]
            t = t[pick.to(t.device)]
        t = t.double()
        s, ss, n0 = self.sums.get(name, (0, 0, 0))  # type: ignore[assignment]
        self.sums[name] = (s + t.sum(0), ss + t.T @ t, n0 + t.shape[0])

    def fit(self, dim: int) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, Any]]:
        """``(bases, facts)``: the top-``dim`` principal directions of every name added."""
        bases: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        facts: dict[str, Any] = {"tokens": {}, "explained_variance": {}}
        for name, (s, ss, n) in self.sums.items():
            D = int(s.shape[0])
            if dim > D:
                raise ValueError(
                    f"reduce_dim {dim} is larger than the teacher's feature dim {D}; use a value below {D}"
                )
            if n < 2:
                raise ValueError(
                    f"cannot fit a PCA basis for {name} on {n} token(s); raise reduce_fit_images"
                )
            mean = s / n
            cov = (ss / n - torch.outer(mean, mean)).cpu()
            evals, evecs = torch.linalg.eigh(cov)  # ascending
            top = evecs[:, -dim:].flip(1)  # (D, K), descending variance
            sign = torch.sign(top[top.abs().argmax(0), torch.arange(dim)])  # largest entry of each positive
            top = top * torch.where(sign == 0, 1.0, sign)
            total = float(evals.clamp_min(0).sum())
            kept = float(evals[-dim:].clamp_min(0).sum())
            bases[name] = (mean.cpu().float().numpy(), top.float().contiguous().numpy())
            facts["tokens"][name] = int(n)
            facts["explained_variance"][name] = kept / total if total > 0 else 1.0
        return bases, facts


def explained(reduction: Reduction) -> str:
    """``"patch 93.1 %"``-style summary of the variance the basis keeps."""
    ev = reduction.fit.get("explained_variance", {})
    return ", ".join(f"{n} {100 * float(v):.1f} %" for n, v in sorted(ev.items())) or "n/a"
