"""Stage 1, the PCA basis of a reduced-dimension cache (``reduce_dim K``; the math is :mod:`cache.reduce`).

:func:`resolve_reduction` finds the basis a run must use: a resumed shard's own copy (a resume never
refits), else ``OUT/reduce_basis.npz`` when it was fitted for this very cache (its recorded identity
matches), else rank 0 fits it now (:func:`fit_reduction`, on the teacher's tokens of the first
``reduce_fit_images`` images) and saves it there, while the other ranks wait for that file.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import h5py
import torch

from .format import H5_ERRORS, Layout, cache_identity, identity_differences, read_meta
from .plan import ShardPlan
from .reduce import BASIS_FILE, PCAFitter, Reduction, explained
from .run import make_loader, teacher_forward

logger = logging.getLogger(__name__)


def resolve_reduction(plan: ShardPlan, layout: Layout) -> Reduction:
    """The cache's PCA basis: this shard's copy when it exists (a resume never refits), else
    ``OUT/reduce_basis.npz``, else (rank 0) fitted now and saved there; other ranks wait for that file.
    ``layout``: the shard's (its ``reduce_dim`` is what the basis must have)."""
    red: Reduction | None = None
    if plan.shard_path.exists():
        try:
            with h5py.File(plan.shard_path, "r") as f:
                red = Reduction.read_h5(f, read_meta(plan.shard_path))
        except H5_ERRORS as e:  # damaged metadata: the cache-level file below still has it
            logger.warning(
                "cannot read the PCA basis of %s (%s); using %s", plan.shard_path.name, e, BASIS_FILE
            )
    path = plan.out_dir / BASIS_FILE
    want = cache_identity(plan.attrs)
    if red is None and path.exists():
        red = Reduction.load(path)
        diff = _basis_differences(red, want)
        if diff:  # left by another (refused, or other-teacher) run into this folder: never reused
            logger.warning(
                "%s was fitted for another cache (%s differ); fitting this run's basis", path, ", ".join(diff)
            )
            red = None
    if red is None:
        if plan.rank == 0:
            red = fit_reduction(plan, layout)
            red.fit["identity"] = want
            red.save(path)
        else:
            red = _wait_for_basis(plan, path, want)
    if red.dim != layout.reduce_dim:
        raise ValueError(
            f"{path} holds a reduce_dim={red.dim} basis but this run asks for {layout.reduce_dim}: write to "
            "another output directory (--out) or rerun with the cache's --reduce-dim"
        )
    return red


def _basis_differences(red: Reduction, want: dict[str, Any]) -> list[str]:
    """Why a basis file does not belong to this run (identity fields, or that it records none)."""
    have = red.fit.get("identity")
    if not isinstance(have, dict):
        return ["identity (none recorded)"]
    return identity_differences(have, want)


def _wait_for_basis(plan: ShardPlan, path: Path, want: dict[str, Any]) -> Reduction:
    """Ranks > 0: rank 0's basis for this run (a stale file of another run is waited past)."""
    t0 = time.monotonic()
    last = t0
    while True:
        if path.exists():
            try:
                red = Reduction.load(path)
                if not _basis_differences(red, want):
                    return red
            except ValueError:  # being replaced right now
                pass
        if time.monotonic() - t0 > plan.config.reduce_wait_s:
            raise TimeoutError(
                f"rank {plan.rank}: rank 0 has not written the PCA basis {path} after {plan.config.reduce_wait_s:.0f} s; "
                "check rank 0's log, or raise reduce_wait_s"
            )
        if time.monotonic() - last > 30:
            logger.info("rank %d: waiting for rank 0's PCA basis %s", plan.rank, path)
            last = time.monotonic()
        time.sleep(0.5)


def fit_reduction(plan: ShardPlan, layout: Layout) -> Reduction:
    """Fit the PCA basis on the teacher's patch tokens of the first ``reduce_fit_images`` images."""
    cfg = plan.config
    n = min(cfg.reduce_fit_images, plan.num_samples)
    idx = list(range(n))
    batches = [(b, idx[i : i + cfg.batch_size]) for b, i in enumerate(range(0, n, cfg.batch_size))]
    h, w = layout.grid
    tokens_per_image = h * w * layout.num_views
    keep = min(1.0, cfg.reduce_fit_tokens / max(n * tokens_per_image, 1))
    fitter = PCAFitter(keep, cfg.reduce_seed)
    used, bad = 0, 0
    t0 = time.perf_counter()
    for batch in make_loader(plan, batches):
        bad += len(batch["bad"])
        if not batch["index"]:
            continue
        feats = teacher_forward(plan, layout, batch)
        # a non-finite sample must not bend the basis (it is skipped when written)
        finite = torch.stack(
            [torch.isfinite(feats[n].flatten(1)).all(1) for n in ("cls", *plan.reduction_names())]
        ).all(0)
        bad += int((~finite).sum())
        if not bool(finite.any()):
            continue
        for name in plan.reduction_names():
            fitter.add(name, feats[name][finite])
        used += int(finite.sum())
    if not used:
        raise ValueError(f"no usable image among the first {n} of the dataset to fit the PCA basis on")
    bases, facts = fitter.fit(cfg.reduce_dim)
    facts.update(images=used, skipped_images=bad, seed=cfg.reduce_seed, token_fraction=keep)
    red = Reduction(dim=cfg.reduce_dim, bases=bases, fit=facts)
    msg = (
        f"fitted the PCA basis (reduce_dim {cfg.reduce_dim} of {layout.dim}) on {used} images "
        f"({', '.join(f'{v} {k} tokens' for k, v in facts['tokens'].items())}) in {time.perf_counter() - t0:.1f}s; "
        f"variance kept: {explained(red)}"
    )
    logger.info(msg)
    print(msg, flush=True)
    return red
