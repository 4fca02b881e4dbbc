"""The TIPS / TIPSv2 text tower and its tokenizer, reusable by teachers and students.

Architecture as published (google-deepmind/tips ``pytorch/text_encoder.py``): token embedding scaled
by ``sqrt(width)`` plus sinusoidal positions, pre-LN transformer blocks (multi-head attention over
non-padding keys, ReLU MLP), final LayerNorm, masked mean pooling over non-padding tokens, and a
learned temperature. Parameter names follow the official ``*_text.npz`` files so a released
checkpoint loads with ``load_state_dict(strict=True)``:
``token_embedding.weight``, ``transformer.resblocks.{i}.{ln_1,attn.in_proj_*,attn.out_proj,ln_2,
mlp.c_fc,mlp.c_proj}``, ``ln_final``, ``temperature``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

MAX_LEN = 64
VOCAB_SIZE = 32000
PAD_ID = 0


@dataclass(frozen=True)
class TextTowerConfig:
    """Size of a TIPS text tower."""

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    vocab_size: int = VOCAB_SIZE
    max_len: int = MAX_LEN

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


# Published text towers per vision variant (identical for TIPS v1 and v2).
TEXT_CONFIGS: dict[str, TextTowerConfig] = {
    "S": TextTowerConfig(384, 12, 6, 1536),
    "B": TextTowerConfig(768, 12, 12, 3072),
    "L": TextTowerConfig(1024, 12, 16, 4096),
    "SO": TextTowerConfig(1152, 27, 16, 4304),
    "g": TextTowerConfig(1536, 12, 24, 6144),
}


def sinusoidal_positions(
    length: int, dim: int, min_timescale: float = 1.0, max_timescale: float = 1.0e4
) -> torch.Tensor:
    """Tensor2tensor-style sinusoids ``(length, dim)``: sin on the first half, cos on the second."""
    half = dim // 2
    log_inc = math.log(max_timescale / min_timescale) / max(half - 1, 1)
    inv = min_timescale * torch.exp(torch.arange(half, dtype=torch.float32) * -log_inc)
    t = torch.arange(length, dtype=torch.float32)[:, None] * inv[None, :]
    sig = torch.cat([torch.sin(t), torch.cos(t)], dim=1)
    return F.pad(sig, (0, dim % 2))


class TextAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter names (packed in-projection)."""

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(f"text width {width} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``x (B, L, D)``, ``valid (B, L)`` bool (keys that may be attended) -> ``(B, L, D)``."""
        B, L, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).reshape(
            B, L, 3, self.num_heads, D // self.num_heads
        )
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])
        return self.out_proj(out.transpose(1, 2).reshape(B, L, D))


class TextMlp(nn.Module):
    """ReLU MLP whose output is zeroed on padding tokens (as the official code does)."""

    def __init__(self, width: int, mlp_dim: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, mlp_dim)
        self.c_proj = nn.Linear(mlp_dim, width)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        m = valid.unsqueeze(-1).to(x.dtype)
        return self.c_proj(F.relu(self.c_fc(x)) * m) * m


class TextBlock(nn.Module):
    """Pre-LN residual block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, width: int, num_heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = TextAttention(width, num_heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = TextMlp(width, mlp_dim)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), valid)
        return x + self.mlp(self.ln_2(x), valid)


class TextTransformer(nn.Module):
    def __init__(self, width: int, depth: int, num_heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList([TextBlock(width, num_heads, mlp_dim) for _ in range(depth)])

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        for blk in self.resblocks:
            x = blk(x, valid)
        return x


class TipsTextTower(nn.Module):
    """The TIPS text encoder: token ids ``(B, L)`` -> pooled embedding ``(B, width)`` (unnormalised).

    Args:
        vocab_size: SentencePiece vocabulary size (32000 for the released towers).
        width, depth, num_heads, mlp_dim: transformer size (see :data:`TEXT_CONFIGS`).
        max_len: longest token sequence (64 as released).
        temperature_init: initial value of the learned contrastive temperature (logits = cos / T).
    """

    def __init__(
        self,
        vocab_size: int = VOCAB_SIZE,
        width: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_dim: int = 3072,
        max_len: int = MAX_LEN,
        temperature_init: float = 0.01,
    ) -> None:
        super().__init__()
        self.config = TextTowerConfig(width, depth, num_heads, mlp_dim, vocab_size, max_len)
        self.width = width
        self.max_len = max_len
        self.token_embedding = nn.Embedding(vocab_size, width)
        nn.init.normal_(self.token_embedding.weight, std=width**-0.5)
        self.transformer = TextTransformer(width, depth, num_heads, mlp_dim)
        self.ln_final = nn.LayerNorm(width)
        self.temperature = nn.Parameter(torch.tensor(float(temperature_init)))
        self.register_buffer("positions", sinusoidal_positions(max_len, width), persistent=False)

    @classmethod
    def from_config(cls, config: TextTowerConfig | str, **kwargs: float) -> TipsTextTower:
        """Build from a :class:`TextTowerConfig` or a published variant letter (``S/B/L/SO/g``)."""
        if isinstance(config, str):
            if config not in TEXT_CONFIGS:
                raise ValueError(f"unknown TIPS text variant {config!r}; choose one of {list(TEXT_CONFIGS)}")
            config = TEXT_CONFIGS[config]
        return cls(
            config.vocab_size,
            config.width,
            config.depth,
            config.num_heads,
            config.mlp_dim,
            config.max_len,
            **kwargs,
        )

    def forward(self, ids: torch.Tensor, paddings: torch.Tensor | None = None) -> torch.Tensor:
        """``ids (B, L)`` int64, ``paddings (B, L)`` (1/True = padding; default ``ids == 0``) -> ``(B, width)``."""
        if ids.ndim != 2:
            raise ValueError(f"token ids must be (B, L), got {tuple(ids.shape)}")
        L = ids.shape[1]
        if L > self.max_len:
            raise ValueError(
                f"token sequence of length {L} is longer than max_len={self.max_len}; truncate it"
            )
        if paddings is None:
            paddings = ids == PAD_ID
        valid = ~paddings.bool()
        # a row without any valid token would make attention undefined; let it attend everything
        attend = valid | ~valid.any(dim=1, keepdim=True)
        x = self.token_embedding(ids) * math.sqrt(self.width)
        x = x + self.positions[:L].to(x.dtype)
        x = self.transformer(x, attend)
        x = self.ln_final(x)
        m = valid.unsqueeze(-1).to(x.dtype)
        return (x * m).sum(dim=1) / (m.sum(dim=1) + 1e-8)


class TipsTokenizer:
    """SentencePiece tokenizer as TIPS uses it: lower-case, no BOS/EOS, pad with 0 / truncate to ``max_len``."""

    def __init__(self, path: str | os.PathLike[str], max_len: int = MAX_LEN) -> None:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"TIPS tokenizer {path!r} not found; pass tokenizer=path/to/tokenizer.model (the SentencePiece "
                "model released with the TIPS checkpoints)"
            )
        import sentencepiece as spm

        self.path = path
        self.max_len = max_len
        self.sp = spm.SentencePieceProcessor(model_file=path)

    @property
    def vocab_size(self) -> int:
        return int(self.sp.get_piece_size())

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Strings -> ``ids (B, max_len)`` int64 and ``paddings (B, max_len)`` int64 (1 = padding)."""
        if isinstance(texts, str):
            texts = [texts]
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"text {i} is {type(t).__name__}, expected str")
        pieces = self.sp.encode([t.lower() for t in texts])
        ids = torch.full((len(texts), self.max_len), PAD_ID, dtype=torch.long)
        for i, p in enumerate(pieces):
            p = p[: self.max_len]
            if p:
                ids[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        return ids, (ids == PAD_ID).long()
