"""Helpers for the cache tests: a tiny deterministic teacher with a toy text tower, and image folders."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

from tipsdistill.teachers.base import DenseFeatures, Teacher, check_pixels
from tipsdistill.teachers.vit import vit_dense_forward


class TinyTeacher(Teacher):
    """2-layer 32-dim ViT, patch 8, CLS + one register (two global tokens), toy text tower."""

    name = "tiny"

    def __init__(
        self,
        dim: int = 32,
        patch_size: int = 8,
        depth: int = 2,
        seed: int = 0,
        delay: float = 0.0,
        progress_file: str | None = None,
    ) -> None:
        super().__init__()
        g = torch.random.fork_rng()
        with g:
            torch.manual_seed(seed)
            self.vit = VisionTransformer(
                img_size=32,
                patch_size=patch_size,
                embed_dim=dim,
                depth=depth,
                num_heads=2,
                mlp_ratio=2.0,
                reg_tokens=1,
                no_embed_class=True,
                init_values=1.0,
                num_classes=0,
                dynamic_img_size=True,
            )
            self.text_proj = torch.nn.Parameter(torch.randn(256, dim) / 16)
        self.patch_size, self.embed_dim, self.num_global_tokens = patch_size, dim, 2
        self.has_text, self.num_layers = True, depth
        self.seed, self.delay, self.progress_file = seed, delay, progress_file
        self.calls = 0

    def encode_image(
        self,
        pixels: torch.Tensor,
        *,
        value_trick: bool = False,
        value_readout: str = "tips",
        layer: int | None = None,
    ) -> DenseFeatures:
        check_pixels(pixels, self.patch_size)
        out = vit_dense_forward(
            self.vit,
            (pixels - 0.5) / 0.25,
            num_global_tokens=2,
            value_trick=value_trick,
            value_readout=value_readout,
            layer=layer,
        )
        self.calls += 1
        if self.progress_file:
            Path(self.progress_file).write_text(str(self.calls))
        if self.delay:
            time.sleep(self.delay)
        return out

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Bag of bytes through a fixed random matrix: deterministic, distinct per text."""
        counts = torch.zeros(len(texts), 256)
        for i, t in enumerate(texts):
            b = torch.tensor(list(t.encode("utf-8")), dtype=torch.long)
            counts[i].index_add_(0, b, torch.ones(len(b)))
        return counts @ self.text_proj

    def identity(self) -> dict[str, Any]:
        return super().identity() | {"name": "tiny", "seed": self.seed}


def build_tiny_teacher(**kwargs: Any) -> TinyTeacher:
    return TinyTeacher(**kwargs).freeze()


def write_images(
    root: Path, n: int, seed: int = 0, sizes: tuple[tuple[int, int], ...] = ((40, 48), (36, 36), (52, 40))
) -> list[str]:
    """``n`` random RGB images (png and jpg, in subfolders); returns their relative paths, sorted."""
    rng = np.random.default_rng(seed)
    rels = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        rel = f"{'ab'[i % 2]}/img{i:03d}.{'png' if i % 3 else 'jpg'}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(root / rel, quality=95)
        rels.append(rel)
    return sorted(rels)


def write_captions(path: Path, rels: list[str], skip: tuple[int, ...] = ()) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for i, rel in enumerate(rels):
            if i in skip:
                continue
            fh.write(
                json.dumps(
                    {
                        "image": rel,
                        "alt": f"alt text {i}",
                        "short": f"a photo number {i}",
                        "detailed": f"détail {i % 3} " * 3,  # repeats: each distinct caption is encoded once
                    }
                )
                + "\n"
            )
