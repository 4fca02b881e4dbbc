"""Class-name text embeddings for zero-shot segmentation, as the official TIPS notebook builds them.

Per class (and per synonym): fill every template, encode, L2-normalise each, average, L2-normalise.
A class with several synonyms keeps one row per synonym; its score is the max over its rows.
Embeddings are cached on disk per hash of (text model identity + a probe embedding, class list, templates).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from .templates import get_templates, normalise_class_list

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
_PROBE_TEXT = "a photo of a tipsdistill probe."
DEFAULT_CACHE_ENV = "TIPSDISTILL_TEXT_CACHE"


def default_cache_dir() -> Path:
    """``$TIPSDISTILL_TEXT_CACHE`` or ``~/.cache/tipsdistill/text_embeddings``."""
    env = os.environ.get(DEFAULT_CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "tipsdistill" / "text_embeddings"


@dataclass
class ClassEmbeddings:
    """Text embeddings of a class list.

    Attributes:
        embeddings: ``(K, D)`` L2-normalised rows, one per (class, synonym).
        class_index: ``(K,)`` int64, the class of each row (``0..C-1``, every class present).
        class_names: ``C`` lists of names (first = the class name, others synonyms).
        templates: templates used (empty when loaded from a file without that record).
        source: JSON-serialisable record of where the text came from.
    """

    embeddings: torch.Tensor
    class_index: torch.Tensor
    class_names: list[list[str]]
    templates: tuple[str, ...] = ()
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.embeddings.ndim != 2:
            raise ValueError(f"text embeddings must be (K, D), got shape {tuple(self.embeddings.shape)}")
        if self.class_index.shape != (self.embeddings.shape[0],):
            raise ValueError(
                f"class_index has shape {tuple(self.class_index.shape)}, expected ({self.embeddings.shape[0]},)"
            )
        present = set(self.class_index.tolist())
        if present != set(range(len(self.class_names))):
            missing = sorted(set(range(len(self.class_names))) - present)
            raise ValueError(
                f"text embeddings cover classes {sorted(present)[:10]}..., missing {missing[:10]} of "
                f"{len(self.class_names)} classes"
            )
        self.embeddings = F.normalize(self.embeddings.float(), dim=-1)
        self.class_index = self.class_index.long()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def has_synonyms(self) -> bool:
        return self.embeddings.shape[0] != self.num_classes

    def to(self, device: torch.device | str) -> ClassEmbeddings:
        return ClassEmbeddings(
            self.embeddings.to(device),
            self.class_index.to(device),
            self.class_names,
            self.templates,
            self.source,
        )

    def scores(self, feats: torch.Tensor) -> torch.Tensor:
        """Cosine scores of L2-normalised features ``(..., D)`` -> ``(C, ...)`` (max over synonyms)."""
        return self.reduce_names(self.name_scores(feats))

    def name_scores(self, feats: torch.Tensor) -> torch.Tensor:
        """Cosine scores of L2-normalised features ``(..., D)`` with every row -> ``(K, ...)``."""
        emb = self.embeddings.to(feats.device, feats.dtype)
        return torch.einsum("kd,...d->k...", emb, feats)

    def reduce_names(self, scores: torch.Tensor) -> torch.Tensor:
        """Per-row scores ``(K, ...)`` -> per-class ``(C, ...)``: the max over each class's rows."""
        if not self.has_synonyms and torch.equal(
            self.class_index.cpu(), torch.arange(self.num_classes, dtype=torch.long)
        ):
            return scores
        out = scores.new_full((self.num_classes, *scores.shape[1:]), float("-inf"))
        idx = self.class_index.to(scores.device).view(-1, *([1] * (scores.ndim - 1))).expand_as(scores)
        return out.scatter_reduce(0, idx, scores, reduce="amax", include_self=True)


def _flatten(classes: list[list[str]]) -> tuple[list[str], list[int]]:
    names, index = [], []
    for c, syns in enumerate(classes):
        for n in syns:
            names.append(n)
            index.append(c)
    return names, index


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


def text_identity(text_model: Any) -> dict[str, Any]:
    """Identity of a text source: ``identity()`` plus a digest of one probe embedding (so two
    random-init models with the same architecture never share a cache entry)."""
    ident: dict[str, Any] = {}
    if hasattr(text_model, "identity"):
        ident = dict(text_model.identity())
    else:
        ident = {"callable": getattr(text_model, "__qualname__", type(text_model).__name__)}
    with torch.no_grad():
        probe = _encode(text_model, [_PROBE_TEXT]).float().cpu().numpy()
    ident["probe_sha1"] = hashlib.sha1(np.round(probe, 4).astype(np.float32).tobytes()).hexdigest()[:16]
    return ident


def _encode(text_model: Any, texts: list[str]) -> torch.Tensor:
    if hasattr(text_model, "encode_text"):
        if hasattr(text_model, "has_text") and not text_model.has_text:
            raise ValueError(
                f"{type(text_model).__name__} has no text tower (has_text=False); pass text_model= another "
                "model with a text tower, or text_embeddings= a cached embedding file"
            )
        out = text_model.encode_text(texts)
    elif callable(text_model):
        out = text_model(texts)
    else:
        raise TypeError(
            f"text source must have encode_text() or be callable, got {type(text_model).__name__}"
        )
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != len(texts):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"encode_text returned {shape} for {len(texts)} texts; expected ({len(texts)}, D)")
    return out


def encode_texts(text_model: Any, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """``(T, D)`` L2-normalised float32 CPU embeddings of ``texts``, encoded ``batch_size`` at a time with
    ``text_model.encode_text`` (or a callable ``list[str] -> (B, D)``)."""
    if batch_size < 1:
        raise ValueError(f"text batch_size must be >= 1, got {batch_size}")
    texts = list(texts)
    if not texts:
        raise ValueError("no texts to encode")
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            out.append(F.normalize(_encode(text_model, texts[i : i + batch_size]).float(), dim=-1).cpu())
    return torch.cat(out)


def encode_class_names(
    text_model: Any,
    classes: Sequence[str] | Sequence[Sequence[str]],
    templates: str | Sequence[str] | None = "tcl",
    *,
    batch_size: int = 256,
    cache_dir: str | Path | None = "default",
) -> ClassEmbeddings:
    """Embed class names (with synonyms) with ``text_model.encode_text`` (or a callable ``list[str] -> (B, D)``).

    ``cache_dir="default"`` uses :func:`default_cache_dir`; ``None`` disables the disk cache.
    """
    cls_list = normalise_class_list(list(classes))
    tmpl = get_templates(templates if not isinstance(templates, tuple) else list(templates))
    names, index = _flatten(cls_list)
    ident = text_identity(text_model)
    key_src = json.dumps(
        {"v": CACHE_VERSION, "text": ident, "classes": cls_list, "templates": list(tmpl)}, sort_keys=True
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:24]
    source = {"kind": "model", "identity": ident, "cache_key": key}
    cache_path = None
    if cache_dir is not None:
        cache_path = (default_cache_dir() if cache_dir == "default" else Path(cache_dir)) / f"text_{key}.pt"
        if cache_path.is_file():
            try:
                blob = torch.load(cache_path, map_location="cpu", weights_only=True)
                logger.info("text embeddings loaded from cache %s", cache_path)
                return ClassEmbeddings(
                    blob["embeddings"],
                    blob["class_index"],
                    cls_list,
                    tmpl,
                    {**source, "cache_file": str(cache_path)},
                )
            except Exception as exc:  # a corrupt cache entry is recomputed, never trusted
                logger.warning("ignoring unreadable text cache %s (%s); recomputing", cache_path, exc)
    texts = [t.format(n) for n in names for t in tmpl]
    emb = encode_texts(text_model, texts, batch_size).reshape(len(names), len(tmpl), -1).mean(dim=1)
    emb = F.normalize(emb, dim=-1)
    ce = ClassEmbeddings(emb, torch.tensor(index, dtype=torch.long), cls_list, tmpl, source)
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"embeddings": ce.embeddings, "class_index": ce.class_index, "key_src": key_src}, tmp)
        os.replace(tmp, cache_path)
        ce.source["cache_file"] = str(cache_path)
    return ce


def save_text_embeddings(ce: ClassEmbeddings, path: str | Path) -> Path:
    """Write embeddings to ``.safetensors``, ``.pt`` or ``.npy`` (``.npy``: only when no synonyms)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        meta = {"class_names": json.dumps(ce.class_names), "templates": json.dumps(list(ce.templates))}
        save_file(
            {"embeddings": ce.embeddings.contiguous(), "class_index": ce.class_index},
            str(path),
            metadata=meta,
        )
    elif suffix == ".pt":
        torch.save(
            {
                "embeddings": ce.embeddings,
                "class_index": ce.class_index,
                "class_names": ce.class_names,
                "templates": list(ce.templates),
            },
            path,
        )
    elif suffix == ".npy":
        if ce.has_synonyms:
            raise ValueError(f"{path}: .npy holds one row per class; use .pt or .safetensors for synonyms")
        np.save(path, ce.embeddings.numpy())
    else:
        raise ValueError(f"unknown text-embedding file type {path.suffix!r}; use .safetensors, .pt or .npy")
    return path


def load_text_embeddings(
    path: str | Path, classes: Sequence[str] | Sequence[Sequence[str]] | None = None
) -> ClassEmbeddings:
    """Load class text embeddings from ``.safetensors`` / ``.pt`` / ``.npy``.

    The file holds ``embeddings (C, D)`` (one row per class, in label-id order) or ``(K, D)`` with
    ``class_index (K,)``. When the file records class names and ``classes`` is given, they must agree.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"text-embedding file {path} does not exist")
    suffix = path.suffix.lower()
    names_in_file: list[list[str]] | None = None
    templates: tuple[str, ...] = ()
    class_index = None
    if suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            meta = f.metadata() or {}
            key = "embeddings" if "embeddings" in keys else (keys[0] if len(keys) == 1 else None)
            if key is None:
                raise ValueError(f"{path}: expected a tensor named 'embeddings' (found {keys})")
            emb = f.get_tensor(key)
            if "class_index" in keys:
                class_index = f.get_tensor("class_index")
        if "class_names" in meta:
            names_in_file = json.loads(meta["class_names"])
        if "templates" in meta:
            templates = tuple(json.loads(meta["templates"]))
    elif suffix in (".pt", ".pth"):
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(blob, torch.Tensor):
            emb = blob
        elif isinstance(blob, dict) and "embeddings" in blob:
            emb = blob["embeddings"]
            class_index = blob.get("class_index")
            names_in_file = blob.get("class_names")
            templates = tuple(blob.get("templates") or ())
        else:
            raise ValueError(f"{path}: expected a tensor or a dict with 'embeddings'")
    elif suffix == ".npy":
        emb = torch.from_numpy(np.load(path))
    else:
        raise ValueError(f"unknown text-embedding file type {path.suffix!r}; use .safetensors, .pt or .npy")
    emb = torch.as_tensor(emb).float()
    if emb.ndim != 2:
        raise ValueError(f"{path}: embeddings must be (num_classes, D), got {tuple(emb.shape)}")
    if names_in_file is not None:
        names_in_file = normalise_class_list(names_in_file)
    if classes is not None:
        cls_list = normalise_class_list(list(classes))
        if names_in_file is not None:
            file_names, ds_names = [n[0] for n in names_in_file], [n[0] for n in cls_list]
            if file_names != ds_names:
                if len(file_names) != len(ds_names):
                    why = f"{len(file_names)} classes in the file, {len(ds_names)} in the dataset"
                else:
                    i = next(k for k, (x, y) in enumerate(zip(file_names, ds_names)) if x != y)
                    why = f"class {i} is {file_names[i]!r} in the file, {ds_names[i]!r} in the dataset"
                raise ValueError(
                    f"{path} was built for a different class list ({why}); rebuild it for this dataset"
                )
        if names_in_file is not None:
            cls_list = names_in_file
    elif names_in_file is not None:
        cls_list = names_in_file
    else:
        cls_list = [[f"class_{i}"] for i in range(emb.shape[0])]
    if class_index is None:
        if emb.shape[0] != len(cls_list):
            raise ValueError(
                f"{path} has {emb.shape[0]} embedding rows but the dataset has {len(cls_list)} classes; "
                "one row per class in label-id order is expected (or save class_index with synonyms)"
            )
        class_index = torch.arange(emb.shape[0])
    return ClassEmbeddings(
        emb, torch.as_tensor(class_index).long(), cls_list, templates, {"kind": "file", "path": str(path)}
    )


TextSource = Any  # DenseEncoder with a text tower | Callable[[list[str]], Tensor] | path to an embedding file


def resolve_class_embeddings(
    classes: Sequence[str] | Sequence[Sequence[str]],
    *,
    model: Any = None,
    text_model: Any = None,
    text_embeddings: str | Path | ClassEmbeddings | None = None,
    templates: str | Sequence[str] | None = "tcl",
    cache_dir: str | Path | None = "default",
) -> ClassEmbeddings:
    """Pick the text source in priority order: ``text_embeddings`` (file or object), ``text_model``,
    then the evaluated ``model``'s own text tower."""
    if isinstance(text_embeddings, ClassEmbeddings):
        if text_embeddings.num_classes != len(classes):
            raise ValueError(
                f"text embeddings cover {text_embeddings.num_classes} classes, the dataset has {len(classes)}"
            )
        return text_embeddings
    if text_embeddings is not None:
        return load_text_embeddings(text_embeddings, classes)
    src: Callable | Any = text_model if text_model is not None else model
    if src is None:
        raise ValueError("no text source: pass text_model=, text_embeddings=, or a model with a text tower")
    if hasattr(src, "has_text") and not src.has_text:
        raise ValueError(
            f"{type(src).__name__} has no text tower; pass text_model= (a model with encode_text) or "
            "text_embeddings= (a .safetensors/.pt/.npy file with one row per class)"
        )
    return encode_class_names(src, classes, templates, cache_dir=cache_dir)
