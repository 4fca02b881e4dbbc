"""Patch masks for masked-image objectives: bool ``(B, h*w)``, True = masked (replaced by the mask token).

Both generators mask an **exact** number of patches per image: ``round(ratio * h * w)``.
"""

from __future__ import annotations

import math
import random

import torch

MASK_MODES = ("random", "block")


def check_ratio(ratio: float, name: str = "mask ratio") -> float:
    r = float(ratio)
    if not (0.0 <= r <= 1.0) or math.isnan(r):
        raise ValueError(
            f"{name} must be in [0, 1], got {ratio}; 0 disables masking (distillation), TIPSv2 uses 0.75"
        )
    return r


def num_masked(grid: tuple[int, int], ratio: float) -> int:
    """Number of masked patches per image: ``round(ratio * h * w)``."""
    return int(round(check_ratio(ratio) * grid[0] * grid[1]))


def random_mask(
    batch: int,
    grid: tuple[int, int],
    ratio: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Uniformly random mask with exactly ``round(ratio*h*w)`` True entries per row; ``(B, h*w)`` bool."""
    n = grid[0] * grid[1]
    k = num_masked(grid, ratio)
    scores = torch.rand(batch, n, generator=generator)
    idx = scores.argsort(dim=1)[:, :k]
    mask = torch.zeros(batch, n, dtype=torch.bool)
    mask.scatter_(1, idx, True)
    return mask.to(device) if device is not None else mask


def block_mask(
    batch: int,
    grid: tuple[int, int],
    ratio: float,
    *,
    min_block: int = 4,
    max_block: int | None = None,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """BEiT-style block-wise mask; ``(B, h*w)`` bool with exactly ``round(ratio*h*w)`` True per row.

    Rectangles of area in ``[min_block, max_block]`` patches and aspect ratio log-uniform in
    ``[min_aspect, max_aspect]`` (default ``1/min_aspect``) are added while they fit the budget (BEiT's
    algorithm); if the blocks stop short of the target, random unmasked patches top it up.
    """
    h, w = grid
    k = num_masked(grid, ratio)
    max_aspect = max_aspect or 1.0 / min_aspect
    log_aspect = (math.log(min_aspect), math.log(max_aspect))
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    rng = random.Random(seed)
    out = torch.zeros(batch, h * w, dtype=torch.bool)
    for b in range(batch):
        m = torch.zeros(h, w, dtype=torch.bool)
        count = 0
        while count < k:
            remaining = k - count
            hi = min(remaining, max_block if max_block is not None else remaining)
            if hi < min_block:
                break
            delta = 0
            for _ in range(10):
                area = rng.uniform(min_block, hi)
                aspect = math.exp(rng.uniform(*log_aspect))
                bh = int(round(math.sqrt(area * aspect)))
                bw = int(round(math.sqrt(area / aspect)))
                if 0 < bh < h and 0 < bw < w:
                    top, left = rng.randint(0, h - bh), rng.randint(0, w - bw)
                    new = int((~m[top : top + bh, left : left + bw]).sum())
                    if 0 < new <= remaining:
                        m[top : top + bh, left : left + bw] = True
                        delta = new
                        break
            if delta == 0:
                break
            count += delta
        flat = m.flatten()
        if count < k:  # top up to the exact count
            free = (~flat).nonzero().flatten().tolist()
            rng.shuffle(free)
            flat[free[: k - count]] = True
        out[b] = flat
    return out.to(device) if device is not None else out


class MaskGenerator:
    """Seeded mask generator: ``MaskGenerator(0.75, "random")(batch, grid) -> (B, h*w)`` bool.

    Args:
        ratio: fraction of patches masked per image, in [0, 1] (0: no masking, all False).
        mode: ``"random"`` or ``"block"`` (BEiT); ``block_kwargs`` go to :func:`block_mask`.
        seed: seed of the private generator (state saved by :meth:`state_dict`).
    """

    def __init__(
        self, ratio: float = 0.75, mode: str = "random", *, seed: int = 0, **block_kwargs: object
    ) -> None:
        if mode not in MASK_MODES:
            raise ValueError(f"unknown mask mode {mode!r}; choose one of {MASK_MODES}")
        self.ratio = check_ratio(ratio)
        self.mode = mode
        self.block_kwargs = block_kwargs
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(
        self, batch: int, grid: tuple[int, int], device: torch.device | str | None = None
    ) -> torch.Tensor:
        if self.mode == "random":
            return random_mask(batch, grid, self.ratio, generator=self.generator, device=device)
        return block_mask(
            batch, grid, self.ratio, generator=self.generator, device=device, **self.block_kwargs
        )  # type: ignore[arg-type]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
