"""One dataset spec for every stage: parse it, build it, record it in the cache, find it again.

A dataset is named once, either as a registry name + kwargs (:class:`DatasetSpec`) or as a URI-like
shorthand (:func:`parse_dataset_spec`):

    ``wds:/data/cc3m/{00000..00331}.tar``   webdataset tar shards (braces expanded, globs allowed)
    ``parquet:captions.parquet``            a table (also ``csv:`` and ``tsv:``) of image paths or bytes
    ``hf:path/or/name``                     Hugging Face ``datasets``: a ``save_to_disk`` folder, an
                                            image folder, parquet files, or a hub dataset name; with the
                                            kwarg ``streaming: true`` (``--streaming``) its parquet data
                                            files are read as a stream (:mod:`cache.hf_stream`)
    ``folder:photos/`` or ``photos/``       a folder of images (``captions=`` a JSON-lines file)
    ``synthetic`` / ``NAME`` / ``NAME:{"k": v}``   any registered dataset with JSON kwargs

Stage 1 records the resolved spec (absolute paths) in the cache's attributes (``dataset_spec``);
stage 2 and evaluation rebuild the images from it with :func:`source_for_cache` when no dataset is
given. An explicit dataset overrides it; one that lacks the cache's keys is refused naming both.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from .datasets import build_dataset

logger = logging.getLogger(__name__)

# shorthand scheme -> (registry name, extra kwargs)
SCHEMES: dict[str, tuple[str, dict[str, Any]]] = {
    "wds": ("webdataset", {}),
    "parquet": ("table", {"format": "parquet"}),
    "csv": ("table", {"format": "csv"}),
    "tsv": ("table", {"format": "tsv"}),
    "hf": ("hf", {}),
    "folder": ("folder", {}),
}
# the kwarg that takes the shorthand's location, per registry name
LOCATION_KWARG = {"webdataset": "urls", "table": "path", "hf": "path", "folder": "root"}
TABLE_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "tsv"}


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset name and its keyword arguments (what :func:`cache.build_dataset` takes)."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kwargs": json.loads(json.dumps(self.kwargs, default=str))}

    def __str__(self) -> str:
        return f"{self.name} {json.dumps(self.kwargs, default=str, sort_keys=True)}"


def is_shorthand(spec: str) -> bool:
    """True for ``wds:...``, ``parquet:...``, ``hf:...``, ``folder:...`` and ``NAME:{json}`` strings."""
    scheme, sep, rest = str(spec).partition(":")
    return bool(sep) and (scheme in SCHEMES or rest.startswith("{"))


def registry_name(spec: str) -> str:
    """The registry name a spec string builds (``wds:...`` -> ``webdataset``); other strings unchanged."""
    scheme, sep, rest = str(spec).partition(":")
    if sep and scheme in SCHEMES:
        return SCHEMES[scheme][0]
    return scheme if sep and rest.startswith("{") else str(spec)


def caption_fields_for(name: str, given: dict[str, str]) -> dict[str, str]:
    """The default caption fields of dataset ``name`` updated with ``given`` (an empty field drops that
    granularity): what ``--caption GRAN=FIELD`` means on the command line."""
    from . import shards, tables

    default = {"webdataset": shards.DEFAULT_CAPTION_FIELDS}.get(name, tables.DEFAULT_CAPTION_FIELDS)
    merged = {**default, **{str(g): str(f) for g, f in given.items()}}
    return {g: f for g, f in merged.items() if f}


def _registered() -> None:
    """Import the modules that register the built-in datasets."""
    from . import hf_stream as _hf_stream  # noqa: F401  (the "hf" name: loaded, or streamed)
    from . import shards as _shards  # noqa: F401
    from . import tables as _tables  # noqa: F401

    try:
        from . import synthetic as _synthetic  # noqa: F401
    except ImportError:  # pragma: no cover
        pass


def parse_dataset_spec(spec: str | dict[str, Any] | DatasetSpec, **extra: Any) -> DatasetSpec:
    """A shorthand string, a ``{"name", "kwargs"}`` dict or a :class:`DatasetSpec` -> :class:`DatasetSpec`.

    ``extra`` kwargs (column names, caption fields, split, ...) are added to the spec's own; ``None``
    values are dropped. Raises ``ValueError`` naming the spec and the accepted forms.
    """
    extra = {k: v for k, v in extra.items() if v is not None}
    if isinstance(spec, DatasetSpec):
        return DatasetSpec(spec.name, {**spec.kwargs, **extra})
    if isinstance(spec, dict):
        if "name" not in spec:
            raise ValueError(f"dataset spec {spec!r} needs a 'name' (and optional 'kwargs')")
        return DatasetSpec(str(spec["name"]), {**dict(spec.get("kwargs") or {}), **extra})
    text = str(spec).strip()
    if not text:
        raise ValueError(
            "empty dataset spec; give e.g. wds:/data/{00000..00009}.tar, parquet:file.parquet, "
            "hf:name, a folder path, or a registered name (cache.list_datasets())"
        )
    scheme, sep, rest = text.partition(":")
    if sep and scheme in SCHEMES and not rest.startswith("{"):
        name, fixed = SCHEMES[scheme]
        if not rest:
            raise ValueError(f"dataset spec {text!r} names no location after '{scheme}:'")
        return DatasetSpec(name, {LOCATION_KWARG[name]: rest, **fixed, **extra})
    _registered()
    from .datasets import list_datasets

    if sep and rest.startswith("{"):
        try:
            kw = json.loads(rest)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"dataset spec {text!r}: kwargs after '{scheme}:' are not valid JSON ({e})"
            ) from e
        return DatasetSpec(scheme, {**kw, **extra})
    if text in list_datasets():
        return DatasetSpec(text, dict(extra))
    p = Path(text)
    if p.is_dir():
        return DatasetSpec("folder", {"root": text, **extra})
    if p.suffix.lower() == ".tar" or "{" in text and text.endswith(".tar"):
        return DatasetSpec("webdataset", {"urls": text, **extra})
    if p.suffix.lower() in TABLE_SUFFIXES:
        return DatasetSpec("table", {"path": text, "format": TABLE_SUFFIXES[p.suffix.lower()], **extra})
    raise ValueError(
        f"cannot read dataset spec {text!r}: not an existing folder, not a .tar/.parquet/.csv/.tsv path and not a "
        f"registered dataset ({', '.join(list_datasets())}); use wds:, parquet:, csv:, tsv:, hf: or folder:"
    )


def build_from_spec(spec: str | dict[str, Any] | DatasetSpec, **extra: Any) -> Dataset:
    """Parse ``spec`` (see :func:`parse_dataset_spec`) and build the dataset."""
    s = parse_dataset_spec(spec, **extra)
    _registered()
    return build_dataset(s.name, **s.kwargs)


def remember_spec(dataset: Dataset, name: str, kwargs: dict[str, Any]) -> Dataset:
    """Attach the registry name + kwargs a dataset without ``source_spec()`` was built from (stage 1 records it)."""
    if not callable(getattr(dataset, "source_spec", None)) and ":" not in name:
        try:
            dataset.built_from_spec = DatasetSpec(name, dict(kwargs)).to_dict()  # type: ignore[attr-defined]
        except AttributeError:  # a dataset that refuses attributes: nothing recorded, stage 2 asks for one
            pass
    return dataset


def recorded_spec(dataset: Dataset) -> dict | None:
    """The spec stage 1 writes into the cache: ``dataset.source_spec()`` when the dataset has one (absolute
    paths), else what :func:`remember_spec` attached, else ``None`` (a dataset object of unknown origin)."""
    fn = getattr(dataset, "source_spec", None)
    if callable(fn):
        return DatasetSpec(**fn()).to_dict()
    return getattr(dataset, "built_from_spec", None)


def spec_from_meta(meta: dict[str, Any]) -> DatasetSpec | None:
    """The dataset spec recorded in a cache's attributes (``FeatureCache.meta``), or ``None``."""
    s = meta.get("dataset_spec")
    if isinstance(s, str):
        s = json.loads(s)
    if not s:
        return None
    return parse_dataset_spec(s)


class CachedSubset(Dataset):
    """The items of ``source`` whose keys are in a cache, in the cache's order (the samples stage 1
    skipped are left out: their keys, in the source's order, are ``left_out``, their number
    ``num_left_out``). Attributes such as ``class_names`` pass through."""

    def __init__(self, source: Dataset, keys: list[str]) -> None:
        self.source, self._keys = source, list(keys)
        if callable(getattr(source, "index_of", None)):  # the index's key lookup (no dict of every key)
            found = source.index_of(self._keys)
            if (found < 0).any():
                raise KeyError(f"key {self._keys[int(np.argmax(found < 0))]!r} is not in the dataset")
            self._index = found.tolist()
            absent = np.ones(len(source), dtype=bool)
            absent[found] = False
            self.left_out = [source.key(int(i)) for i in np.flatnonzero(absent)]
        else:
            src_keys = (
                list(source.keys()) if hasattr(source, "keys") else [str(i) for i in range(len(source))]
            )
            lookup = {k: i for i, k in enumerate(src_keys)}
            self._index = [lookup[k] for k in self._keys]
            cached = set(self._keys)
            self.left_out = [k for k in src_keys if k not in cached]
        self.num_left_out = len(self.left_out)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)

    def __len__(self) -> int:
        return len(self._index)

    def keys(self) -> list[str]:
        return list(self._keys)

    def shard_of(self, indices: np.ndarray) -> np.ndarray | None:
        """The source's shard of each item of ``indices`` (its ``shard_of``), ``None`` when it has no shards."""
        shard_of = getattr(self.source, "shard_of", None)
        if not callable(shard_of):
            return None
        return shard_of(np.asarray(self._index, np.int64)[np.asarray(indices, np.int64)])

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.source[self._index[index]]


def _has_pipe(spec: DatasetSpec) -> bool:
    from .locations import has_pipe

    where = spec.kwargs.get(LOCATION_KWARG.get(spec.name, ""), "")
    return isinstance(where, str | list) and has_pipe(where)


def source_for_cache(
    cache: Any,
    dataset: str | dict[str, Any] | DatasetSpec | None = None,
    dataset_kwargs: dict[str, Any] | None = None,
    *,
    only_cached: bool = False,
) -> Dataset:
    """The images a cache was made from, for stage 2 and evaluation.

    ``cache``: a ``FeatureCache`` or a cache path. ``dataset``: an explicit spec that overrides the one
    recorded in the cache (``None``/``""`` = the recorded one); ``dataset_kwargs`` update the kwargs of
    whichever spec is used. An explicit spec whose keys do not cover the cache's is refused, naming both.
    ``only_cached``: return a :class:`CachedSubset` (the cached samples only, in cache order; evaluation).
    """
    from .reader import open_cache

    fc = open_cache(cache) if isinstance(cache, (str, Path)) else cache
    recorded = spec_from_meta(dict(fc.meta))
    kw = dict(dataset_kwargs or {})
    if dataset:
        spec = parse_dataset_spec(dataset, **kw)
    elif recorded is not None:
        spec = parse_dataset_spec(recorded, **kw)
    else:
        raise ValueError(
            f"cache {fc.path} records no dataset spec (made by an older version, or from a dataset object); "
            "name the images with data.dataset=SPEC (stage 2) or --dataset SPEC (evaluation), e.g. "
            f"data.dataset=folder 'data.dataset_kwargs={{root: ...}}'; the cache's dataset: {fc.meta.get('dataset')}"
        )
    if not dataset and _has_pipe(spec):
        raise ValueError(
            f"cache {fc.path} was made from pipe: commands ({spec}); a cache never runs commands: name the shards "
            "yourself with data.dataset=SPEC (stage 2) or --dataset SPEC (evaluation), e.g. the same pipe: pattern "
            "or its s3:// / https:// URLs"
        )
    logger.info("source images of cache %s: %s", fc.path, spec)
    _registered()
    source = build_dataset(spec.name, **spec.kwargs)
    cache_keys = fc.keys()
    if callable(getattr(source, "index_of", None)):  # a key lookup in the index: no set of every key
        found = source.index_of(cache_keys)
        missing = [k for k, i in zip(cache_keys, found) if i < 0]
    else:
        src_keys = set(source.keys()) if hasattr(source, "keys") else {str(i) for i in range(len(source))}
        missing = [k for k in cache_keys if k not in src_keys]
    if missing and dataset:
        raise ValueError(
            f"{len(missing)} of {len(fc)} keys of cache {fc.path} are not in the dataset given ({spec}); "
            f"the cache was made from {recorded if recorded is not None else fc.meta.get('dataset')} "
            f"(first missing: {missing[:3]}). Leave the dataset unset to use the recorded one, or point it "
            "at the same images"
        )
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(fc)} keys of cache {fc.path} are not in its recorded dataset ({spec}) any more "
            f"(first: {missing[:3]}): the images were moved or changed after stage 1; point data.dataset (stage 2) "
            "or --dataset (evaluation) at where they are now"
        )
    if only_cached:
        source = CachedSubset(source, fc.keys())
        if source.num_left_out:
            logger.info(
                "%d image(s) of the dataset are not in the cache and are left out", source.num_left_out
            )
    return source
