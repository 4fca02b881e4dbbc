"""Optional student text towers: ``list[str] -> (B, out_dim)`` unnormalised embeddings.

Built with :func:`build_text_tower` (``student.kwargs.text`` of a run); every kind takes ``freeze``
(``true``: the pretrained or random text model gets no gradient, hence no optimizer state):

- ``"tips"``: a TIPS-style transformer (``teachers.tips_text.TipsTextTower``: pre-LN, ReLU MLP,
  sinusoidal positions, masked mean pooling) with a SentencePiece tokenizer (one can be trained
  offline from captions: :func:`train_sentencepiece`). Random init of a configurable size, or
  ``init: PATH/text.npz``: the official TIPS text weights (``*_text.npz``; local path, ``hf-hub:`` file
  or URL), the size read from the checkpoint's shapes.
- ``"hf"``: :class:`teachers.text.HFTextTower`, a transformers model by local folder or hub id
  (``path``; offline from the local HF cache): a text encoder (BERT, MiniLM: masked mean pooling +
  a linear projection to ``out_dim``), or the text side of CLIP / SigLIP / SigLIP2 / Tipsv2 in its
  image-text space (a projection only when ``out_dim`` differs). ``freeze=True`` locks the model (the
  new projection still trains) and memoises pooled caption features; ``pretrained=False``: random
  weights of that architecture.
- ``"minilm"``: the ``"hf"`` kind on the packaged all-MiniLM-L6-v2 (no path needed), locked by default
  (``freeze=True``): the embedded teacher's text model.
- ``"teacher"``: a trainable copy of a teacher's own text tower (``teacher``: a ``teachers`` registry
  name such as ``embedded``, ``tips``, ``hf``; ``teacher_kwargs``: its build arguments): the embedded
  teacher's MiniLM + trained projection, a TIPS teacher's text tower, an HF Tipsv2 / CLIP / SigLIP text
  model. The student's text space is then the teacher's (``out_dim`` = the teacher's text width); a
  frozen copy locks the whole tower, projection included.

Width: ``out_dim`` (the student's ``text_dim``) when given; else a pretrained tower keeps its own text
space (a TIPS checkpoint's width, an image-text model's embedding width, the teacher's), and towers
without one (random ``tips``, text encoders) take ``default_dim`` (the student's width).

Every tower's :meth:`arch` gives the ``build_text_tower`` arguments that rebuild its architecture
without the pretrained weights (no ``init``, ``pretrained=False``, a ``teacher`` resolved into the
``tips`` / ``hf`` / ``minilm`` tower it copied): that is what ``Student.config["text"]`` and an export
record, so ``students.load_student`` reads only the architecture's files (a SentencePiece model, a
transformers ``config.json`` + tokenizer; an export carries copies, :meth:`export_architecture`) and
then the trained weights.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tipsdistill.teachers.text import HFTextTower, minilm_path
from tipsdistill.teachers.tips_text import MAX_LEN, TEXT_CONFIGS, TipsTextTower, TipsTokenizer

logger = logging.getLogger(__name__)

KINDS = ("tips", "hf", "minilm", "teacher")
#: file / folder names an export gives the files a text tower's architecture needs
EXPORT_TOKENIZER = "text_tokenizer.model"
EXPORT_HF_FOLDER = "text_encoder"


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
    """SentencePiece tokenizer + ``teachers.tips_text.TipsTextTower`` (+ ``proj`` when ``out_dim``
    differs from the tower's width); ``list[str] -> (B, out_dim)``.

    Args:
        tokenizer: a SentencePiece ``.model`` (pad id 0; e.g. from :func:`train_sentencepiece`, or the one
            released with TIPS); a local path, ``hf-hub:org/name/file`` or URL (``teachers.hub``).
        out_dim: width of the embeddings (default: the tower's width; TIPS uses no projection).
        default_dim: the tower's width when neither ``width``, ``init`` nor ``out_dim`` gives it.
        width, depth, num_heads, mlp_dim, max_len, vocab_size: size of the transformer (TIPS: 12 layers,
            width/64 heads, 4x MLP, 64 tokens, the tokenizer's vocabulary). With ``init`` they are read
            from the checkpoint; a value given that disagrees is refused, naming the key and both shapes.
        init: official TIPS text weights (``*_text.npz``, keys ``token_embedding.weight``,
            ``transformer.resblocks.{i}...``, ``ln_final``, ``temperature``); ``None``: random init.
        freeze: no gradient to the transformer (``proj``, when present, still trains).
    """

    def __init__(
        self,
        tokenizer: str | Path,
        out_dim: int | None = None,
        *,
        default_dim: int | None = None,
        width: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        mlp_dim: int | None = None,
        max_len: int | None = None,
        vocab_size: int | None = None,
        init: str | Path | None = None,
        freeze: bool = False,
    ) -> None:
        super().__init__()
        from tipsdistill.teachers.hub import resolve_file

        max_len = int(max_len or MAX_LEN)
        tok = TipsTokenizer(resolve_file(tokenizer, "TIPS tokenizer"), max_len=max_len)
        given = {"width": width, "depth": depth, "mlp_dim": mlp_dim, "vocab_size": vocab_size}
        if init is not None:
            tower = _tips_from_checkpoint(init, given, num_heads, max_len)
        else:
            width = width or out_dim or default_dim
            if not width:
                raise ValueError(
                    "a random-init tips text tower needs its width: pass width=, out_dim= or init="
                )
            heads = num_heads or max(1, width // 64)
            if width % heads:
                raise ValueError(f"text width {width} is not divisible by num_heads={heads}")
            tower = TipsTextTower(
                vocab_size=vocab_size or tok.vocab_size,
                width=width,
                depth=12 if depth is None else depth,
                num_heads=heads,
                mlp_dim=mlp_dim or 4 * width,
                max_len=max_len,
            )
        self._setup(tower, tok, os.fspath(tokenizer), out_dim, freeze)
        self.init = None if init is None else os.fspath(init)

    @classmethod
    def from_tower(
        cls,
        tower: TipsTextTower,
        tokenizer: TipsTokenizer,
        tokenizer_spec: str,
        *,
        out_dim: int | None = None,
        freeze: bool = False,
    ) -> TipsStudentTextTower:
        """A student tower around an existing ``TipsTextTower`` (e.g. a copy of a teacher's) and its
        tokenizer; ``tokenizer_spec`` names the tokenizer file for :meth:`arch`."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new._setup(tower, tokenizer, tokenizer_spec, out_dim, freeze)
        new.init = None
        return new

    def _setup(
        self, tower: TipsTextTower, tokenizer: TipsTokenizer, spec: str, out_dim: int | None, freeze: bool
    ) -> None:
        if tokenizer.vocab_size > tower.token_embedding.num_embeddings:
            raise ValueError(
                f"tokenizer {spec!r} has {tokenizer.vocab_size} pieces but the text tower embeds only "
                f"{tower.token_embedding.num_embeddings}; pass the tokenizer released with these weights"
            )
        if tokenizer.max_len > tower.max_len:
            raise ValueError(f"tokenizer max_len {tokenizer.max_len} exceeds the tower's {tower.max_len}")
        self.tokenizer = tokenizer
        self.tokenizer_spec = spec
        self.tower = tower
        self.width = int(tower.width)
        self.out_dim = int(out_dim or self.width)
        self.proj = nn.Linear(self.width, self.out_dim) if self.out_dim != self.width else None
        self.set_frozen(freeze)

    def set_frozen(self, freeze: bool) -> None:
        """Lock (or unlock) the transformer: no gradients, hence no optimizer state."""
        self.frozen = bool(freeze)
        self.tower.requires_grad_(not freeze)

    def forward(self, texts: list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not one string")
        ids, paddings = self.tokenizer(list(texts))
        dev = self.tower.token_embedding.weight.device
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            out = self.tower(ids.to(dev), paddings.to(dev))
        return self.proj(out) if self.proj is not None else out

    def arch(self) -> dict[str, Any]:
        """``build_text_tower`` arguments that rebuild this architecture (random weights, no ``init``)."""
        c = self.tower.config
        return {
            "kind": "tips",
            "tokenizer": self.tokenizer_spec,
            "out_dim": self.out_dim,
            "width": c.width,
            "depth": c.depth,
            "num_heads": c.num_heads,
            "mlp_dim": c.mlp_dim,
            "max_len": self.tokenizer.max_len,
            "vocab_size": c.vocab_size,
            "freeze": self.frozen,
        }

    def export_architecture(self, folder: str | Path) -> dict[str, Any]:
        """Copy the tokenizer into ``folder`` (:data:`EXPORT_TOKENIZER`); :meth:`arch` naming that copy
        by its relative name (``students.load_student`` resolves it against the export folder)."""
        shutil.copyfile(self.tokenizer.path, Path(folder) / EXPORT_TOKENIZER)
        return {**self.arch(), "tokenizer": EXPORT_TOKENIZER}


def _tips_from_checkpoint(
    init: str | Path, given: dict[str, int | None], num_heads: int | None, max_len: int
) -> TipsTextTower:
    """A ``TipsTextTower`` of the checkpoint's size with its weights; sizes in ``given`` must agree."""
    from tipsdistill.teachers.hub import resolve_file
    from tipsdistill.teachers.tips import describe_text_checkpoint, load_npz, load_text_state

    src = repr(os.fspath(init))
    sd = load_npz(resolve_file(init, "TIPS text checkpoint"), "text")
    found = describe_text_checkpoint(sd, src)
    emb = tuple(sd["token_embedding.weight"].shape)
    where = {
        "width": ("token_embedding.weight", emb, lambda v: (emb[0], v)),
        "vocab_size": ("token_embedding.weight", emb, lambda v: (v, emb[1])),
        "depth": ("transformer.resblocks.{i}", (found.depth,), lambda v: (v,)),
    }
    if found.depth:
        fc = tuple(sd["transformer.resblocks.0.mlp.c_fc.weight"].shape)
        where["mlp_dim"] = ("transformer.resblocks.0.mlp.c_fc.weight", fc, lambda v: (v, fc[1]))
    for name, value in given.items():
        if value is None or name not in where or int(value) == int(getattr(found, name)):
            continue
        key, shape, asked = where[name]
        what = "blocks" if name == "depth" else "shape"
        raise ValueError(
            f"text init {src}: {key} has {what} {shape} in the checkpoint, but text.{name}={value} needs "
            f"{asked(int(value))}; drop text.{name} (the size is read from the checkpoint) or pass the checkpoint "
            "of that size"
        )
    size = (found.width, found.depth, found.mlp_dim)
    published = any((c.width, c.depth, c.mlp_dim) == size for c in TEXT_CONFIGS.values())
    if num_heads is None and not published:
        logger.warning(
            "text init %s: width %d, depth %d, mlp %d is not a published TIPS text size and the head count is not "
            "in the weights: assuming %d heads (width / 64); pass text.num_heads if it differs",
            src,
            found.width,
            found.depth,
            found.mlp_dim,
            found.num_heads,
        )
    heads = int(num_heads or found.num_heads)
    if found.width % heads:
        raise ValueError(f"text init {src}: width {found.width} is not divisible by num_heads={heads}")
    tower = TipsTextTower(found.vocab_size, found.width, found.depth, heads, found.mlp_dim, max_len)
    load_text_state(tower, sd, f"text init {src}")
    logger.info("tips text tower from %s: %s", src, tower.config.to_dict())
    return tower


def _teacher_tower(teacher: Any, *, freeze: bool) -> nn.Module:
    """A trainable (or, ``freeze``, wholly locked) copy of ``teacher``'s text tower."""
    from tipsdistill.teachers.embedded import EmbeddedTeacher
    from tipsdistill.teachers.hf import HFTeacher
    from tipsdistill.teachers.tips import TipsTeacher

    name = type(teacher).__name__
    if not getattr(teacher, "has_text", False):
        raise ValueError(
            f"text kind 'teacher': the {name} has no text tower (build it with its text weights)"
        )
    if isinstance(teacher, EmbeddedTeacher):
        if teacher.text_kind == "minilm":
            tower = copy.deepcopy(teacher.text)
            tower.set_frozen(freeze, freeze_proj=freeze)
            return tower
        spec = str(teacher.path / teacher.config.get("tokenizer", "tokenizer.model"))
        return TipsStudentTextTower.from_tower(
            copy.deepcopy(teacher.text), teacher.tokenizer, spec, freeze=freeze
        )
    if isinstance(teacher, TipsTeacher):
        if teacher.text is None or teacher.tokenizer is None:
            raise ValueError(
                "text kind 'teacher': the TIPS teacher has no text tower; pass text_ckpt= and tokenizer="
            )
        spec = teacher.identity().get("tokenizer") or teacher.tokenizer.path
        return TipsStudentTextTower.from_tower(
            copy.deepcopy(teacher.text), teacher.tokenizer, spec, freeze=freeze
        )
    if isinstance(teacher, HFTeacher):
        source = teacher.source
        if source == "(config)" or teacher.tokenizer is None:
            raise ValueError(
                "text kind 'teacher': an hf teacher built from a config object has no folder to rebuild its text "
                "tower from; build it from a hub id or a saved model folder (config.json + tokenizer files)"
            )
        path, revision = source, None
        if not os.path.isdir(source) and "@" in source:
            path, revision = source.rsplit("@", 1)
        model = teacher.model
        projection = copy.deepcopy(model.text_projection) if teacher.family == "clip" else None
        return HFTextTower.from_model(
            copy.deepcopy(model.text_model),
            teacher.tokenizer,
            family=teacher.family,
            path=path,
            revision=revision,
            hf_config=model.config,
            projection=projection,
            freeze=freeze,
        )
    raise ValueError(
        f"text kind 'teacher' copies the text tower of an embedded, tips or hf teacher, not of a {name}"
    )


def build_text_tower(
    kind: str, out_dim: int | None = None, *, default_dim: int | None = None, **kw: Any
) -> nn.Module:
    """Build a student text tower (see the module docstring): ``kind`` ``"tips"`` (kw of
    :class:`TipsStudentTextTower`), ``"hf"`` (kw of :class:`HFTextTower`), ``"minilm"`` (``"hf"`` on the
    packaged all-MiniLM-L6-v2, ``freeze`` default True) or ``"teacher"`` (``teacher``, ``teacher_kwargs``,
    ``freeze``). ``out_dim``: the embedding width (default: the tower's own text space, else
    ``default_dim``). Returns a module ``list[str] -> (B, out_dim)`` with ``out_dim`` and :meth:`arch`."""
    if kind == "tips":
        return TipsStudentTextTower(out_dim=out_dim, default_dim=default_dim, **kw)
    if kind == "hf":
        if "path" not in kw:
            raise ValueError(
                "text kind 'hf' needs path= (a transformers model folder or hub id, e.g. org/name)"
            )
        return HFTextTower(out_dim=out_dim, default_dim=default_dim, **kw)
    if kind == "minilm":
        if "path" in kw:
            raise ValueError(
                "text kind 'minilm' uses the packaged weights; for another folder use kind 'hf' + path"
            )
        return HFTextTower(minilm_path(), out_dim=out_dim, default_dim=default_dim, **{"freeze": True, **kw})
    if kind == "teacher":
        unknown = set(kw) - {"teacher", "teacher_kwargs", "freeze"}
        if unknown or "teacher" not in kw:
            raise ValueError(
                f"text kind 'teacher' takes teacher (a teachers registry name, e.g. embedded), teacher_kwargs and "
                f"freeze; got {sorted(kw)}"
            )
        from tipsdistill.teachers import build_teacher

        teacher = build_teacher(kw["teacher"], **dict(kw.get("teacher_kwargs") or {}))
        tower = _teacher_tower(teacher, freeze=bool(kw.get("freeze", False)))
        del teacher
        if out_dim is not None and int(out_dim) != tower.out_dim:
            raise ValueError(
                f"text kind 'teacher' embeds in the {kw['teacher']} teacher's text space of width {tower.out_dim}, "
                f"not {out_dim}: drop student.kwargs.text_dim (the student projects its tokens into that space)"
            )
        logger.info("student text tower: a copy of the %s teacher's (%s)", kw["teacher"], tower.arch())
        return tower
    raise ValueError(f"unknown text tower kind {kind!r}; choose one of {list(KINDS)}")
