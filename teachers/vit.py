"""Dense forward for timm ``VisionTransformer`` models, shared by teachers and students.

One code path produces global tokens, patch tokens of any block and the MaskCLIP value trick, so a
teacher and a student are always read out the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import VALUE_READOUTS, DenseFeatures


def resample_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """Resample a ``(1, gh*gw, D)`` square patch position table to ``grid``; returns ``(1, h*w, D)``."""
    n, d = pos_embed.shape[1], pos_embed.shape[2]
    side = int(round(int(n) ** 0.5))  # int(): a plain int under ONNX tracing too
    if side * side != n:
        raise ValueError(f"position table with {n} entries is not a square grid")
    if (side, side) == tuple(grid):
        return pos_embed
    pe = pos_embed.reshape(1, side, side, d).permute(0, 3, 1, 2).float()
    pe = F.interpolate(pe, size=tuple(grid), mode=mode, antialias=True, align_corners=False)
    return pe.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], d).to(pos_embed.dtype)


def embed_tokens(
    model: nn.Module,
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    mask_token: torch.Tensor | None = None,
    pos_interp: str = "bicubic",
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Patch-embed normalised pixels, apply an optional boolean patch mask, add positions and prefix tokens.

    Args:
        x: normalised pixels ``(B, 3, H, W)``; H and W multiples of the patch size.
        mask: optional boolean ``(B, h*w)`` (or ``(B, h, w)``); True patches are replaced by ``mask_token``
            before the position embedding is added (iBOT).
    Returns:
        tokens ``(B, P + h*w, D)`` with P prefix (global) tokens, and the grid ``(h, w)``.
    """
    pe = model.patch_embed
    p = pe.patch_size[0]
    B, _, H, W = x.shape
    if H % p or W % p:
        raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}; resize or pad it")
    tokens = F.conv2d(x, pe.proj.weight, pe.proj.bias, stride=pe.proj.stride)  # (B, D, h, w)
    grid = (tokens.shape[2], tokens.shape[3])
    tokens = tokens.flatten(2).transpose(1, 2)
    tokens = pe.norm(tokens)
    if mask is not None:
        if mask_token is None:
            raise ValueError("a patch mask needs a mask token")
        m = mask.reshape(B, -1)
        if m.shape[1] != tokens.shape[1]:
            raise ValueError(
                f"mask has {m.shape[1]} entries per image, the image has {tokens.shape[1]} patches"
            )
        tokens = torch.where(m.unsqueeze(-1), mask_token.to(tokens.dtype).reshape(1, 1, -1), tokens)
    prefix = []
    if getattr(model, "cls_token", None) is not None:
        prefix.append(model.cls_token.expand(B, -1, -1))
    if getattr(model, "reg_token", None) is not None:
        prefix.append(model.reg_token.expand(B, -1, -1))
    if model.pos_embed is not None:
        num_prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        pos = model.pos_embed
        pos_prefix, pos_patch = pos[:, :num_prefix], pos[:, num_prefix:]
        pos_patch = resample_pos_embed(pos_patch, grid, pos_interp)
        if model.no_embed_class:
            tokens = tokens + pos_patch
            tokens = torch.cat(prefix + [tokens], dim=1)
        else:
            tokens = torch.cat(prefix + [tokens], dim=1)
            tokens = tokens + torch.cat([pos_prefix, pos_patch], dim=1)
    else:
        tokens = torch.cat(prefix + [tokens], dim=1)
    tokens = model.norm_pre(tokens)
    return tokens, grid


def value_trick_block(block: nn.Module, x: torch.Tensor, readout: str = "tips") -> torch.Tensor:
    """Run ``block`` with the MaskCLIP value trick: no attention mixing between tokens.

    ``tips``: ``x_val = x + ls1(proj(v))``, then ``x_val + ls2(mlp(norm2(x_val)))`` (residual and MLP kept).
    ``maskclip``: the value projection alone, ``proj(v)`` (no residual, no MLP).
    """
    if readout not in VALUE_READOUTS:
        raise ValueError(f"unknown value readout {readout!r}; choose one of {VALUE_READOUTS}")
    attn = block.attn
    B, N, C = x.shape
    h = block.norm1(x)
    qkv = attn.qkv(h).reshape(B, N, 3, attn.num_heads, -1)
    v = qkv[:, :, 2].reshape(B, N, -1)
    v = getattr(attn, "norm", nn.Identity())(v)
    v = attn.proj(v)
    if readout == "maskclip":
        return v
    x_val = x + block.ls1(v)
    return x_val + block.ls2(block.mlp(block.norm2(x_val)))


def vit_dense_forward(
    model: nn.Module,
    x: torch.Tensor,
    *,
    num_global_tokens: int,
    mask: torch.Tensor | None = None,
    mask_token: torch.Tensor | None = None,
    value_trick: bool = False,
    value_readout: str = "tips",
    layer: int | None = None,
    pos_interp: str = "bicubic",
) -> DenseFeatures:
    """Dense features of a timm ViT on normalised pixels.

    ``num_global_tokens`` of the model's prefix tokens are returned as ``cls``; other prefix tokens
    (registers) are dropped. ``layer`` selects the block (0-based, negative from the end) whose output
    is read, through the model's final norm.
    """
    tokens, (h, w) = embed_tokens(model, x, mask, mask_token, pos_interp)
    blocks = list(model.blocks)
    L = len(blocks)
    k = L - 1 if layer is None else (layer if layer >= 0 else L + layer)
    if not 0 <= k < L:
        raise ValueError(f"layer {layer} out of range for a model with {L} blocks")
    for blk in blocks[:k]:
        tokens = blk(tokens)
    value = value_trick_block(blocks[k], tokens, value_readout) if value_trick else None
    tokens = blocks[k](tokens)
    tokens = model.norm(tokens)
    P = model.num_prefix_tokens
    B, D = tokens.shape[0], tokens.shape[-1]
    cls = tokens[:, :num_global_tokens]
    patch = tokens[:, P:].reshape(B, h, w, D)
    value_patch = None
    if value is not None:
        value_patch = model.norm(value)[:, P:].reshape(B, h, w, D)
    return DenseFeatures(cls=cls, patch=patch, value_patch=value_patch)
