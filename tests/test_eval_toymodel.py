"""Tiny DenseEncoders for the evaluation tests (and the CLI examples in docs/evaluation.md).

``ToyEncoder``: a random-init TIPS-architecture timm ViT (reg_tokens=1, no_embed_class, init_values=1.0,
patch 14) read out with the shared ``vit_dense_forward`` + a bag-of-words text encoder.
``OracleEncoder``: patch features equal the text embedding of the class painted in each patch.
"""

from __future__ import annotations

import zlib
from typing import Any

import timm
import torch
from torch import nn

from tipsdistill.teachers.base import DenseEncoder, DenseFeatures, check_pixels
from tipsdistill.teachers.vit import vit_dense_forward


def tiny_tips_vit(
    img_size: int = 56, dim: int = 32, depth: int = 2, heads: int = 2, seed: int = 0
) -> nn.Module:
    torch.manual_seed(seed)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=img_size,
        patch_size=14,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=2.0,
        reg_tokens=1,
        no_embed_class=True,
        init_values=1.0,
        num_classes=0,
        global_pool="token",
    ).eval()


class ToyEncoder(DenseEncoder):
    """Tiny TIPS-like ViT with a bag-of-words text tower (``text_dim`` != ``dim`` makes a broken model)."""

    def __init__(
        self, dim: int = 32, depth: int = 2, img_size: int = 56, seed: int = 0, text_dim: int | None = None
    ):
        super().__init__()
        self.vit = tiny_tips_vit(img_size, dim, depth, seed=seed)
        self.patch_size, self.embed_dim, self.num_global_tokens = 14, dim, 2
        self.num_layers, self.has_text = depth, True
        self.vocab = 997
        torch.manual_seed(seed + 1)
        self.text = nn.EmbeddingBag(self.vocab, text_dim or dim, mode="mean")
        self.seed = seed

    def encode_image(self, pixels, *, value_trick=False, value_readout="tips", layer=None) -> DenseFeatures:
        check_pixels(pixels, self.patch_size)
        return vit_dense_forward(
            self.vit,
            pixels,
            num_global_tokens=2,
            value_trick=value_trick,
            value_readout=value_readout,
            layer=layer,
        )

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        ids, offsets = [], []
        for t in texts:
            offsets.append(len(ids))
            ids += [zlib.crc32(w.encode()) % self.vocab for w in t.lower().replace(".", " ").split()] or [0]
        return self.text(torch.tensor(ids), torch.tensor(offsets))

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "toy_seed": self.seed}


class OracleEncoder(DenseEncoder):
    """Each 14x14 patch is painted with red = class / (C - 1); features = that class's text embedding."""

    def __init__(self, class_emb: torch.Tensor):
        super().__init__()
        self.register_buffer("class_emb", class_emb.float())
        self.patch_size, self.embed_dim, self.num_global_tokens, self.num_layers = (
            14,
            class_emb.shape[1],
            1,
            1,
        )

    def encode_image(self, pixels, *, value_trick=False, value_readout="tips", layer=None) -> DenseFeatures:
        check_pixels(pixels, self.patch_size)
        C = self.class_emb.shape[0]
        ids = (pixels[:, 0, 7::14, 7::14] * (C - 1)).round().long()  # patch centres
        feats = self.class_emb[ids]  # (B, h, w, D)
        return DenseFeatures(
            cls=feats.mean((1, 2))[:, None], patch=feats, value_patch=feats if value_trick else None
        )


def build_toy(**kw: Any) -> ToyEncoder:
    """Factory for ``tipsdistill-eval --model toy=python:test_eval_toymodel:build_toy``."""
    return ToyEncoder(**kw)


def painted_image(
    label_patches: torch.Tensor, num_classes: int, patch: int = 14
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image ``(3, H, W)`` and label ``(H, W)`` from a ``(h, w)`` grid of class ids (one class per patch)."""
    label = label_patches.repeat_interleave(patch, 0).repeat_interleave(patch, 1).long()
    img = torch.zeros(3, *label.shape)
    img[0] = label.float() / (num_classes - 1)
    img[1] = 0.5
    return img, label


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[dict[str, Any]], class_names: list[str], object_class_ids=None):
        self.items, self.class_names, self.object_class_ids = items, class_names, object_class_ids

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]

    def identity(self) -> dict[str, Any]:
        return {"name": "list", "num_images": len(self.items)}


def test_toy_encoder_shapes():
    m = ToyEncoder()
    out = m.encode_image(torch.rand(1, 3, 56, 70), value_trick=True)
    assert (
        out.cls.shape == (1, 2, 32)
        and out.patch.shape == (1, 4, 5, 32)
        and out.value_patch.shape == out.patch.shape
    )
    assert m.encode_text(["a cat", "a dog"]).shape == (2, 32)
