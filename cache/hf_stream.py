"""Hugging Face ``datasets`` read as a stream (``hf:NAME --streaming``): stage 1 never downloads or converts
the dataset; it reads the parquet data files row group by row group through ``datasets.IterableDataset``.

What is read up front is the data files' parquet footers (row counts, row-group bounds, the schema), never an
image: that gives the keys (``FILE/ROW``: ``FILE`` the data file's path below the files' common folder, as
``parquet:`` names it, ``ROW`` its 0-based row) and the count that stage 1's plan needs before it starts.

Where the files come from (:func:`resolve_hf_files`): a local folder in the layout HF repos have
(``data/train-0000N-of-0000M.parquet``, or any layout ``datasets`` infers splits from), a ``data_files=``
pattern or list, or a hub name: its snapshot in the local HF cache (``HF_HOME`` / ``HF_HUB_CACHE``, what
``huggingface-cli download --repo-type dataset NAME`` fills; the snapshot's commit is recorded), else, online,
the hub's own ``hf://`` files streamed by ``datasets``. Only parquet data files have footers with row counts;
other formats (JSON, CSV, Arrow) are refused with the way out (without ``--streaming``, or converted).

How stage 1 splits the work: by row, exactly, as for every other source. Rank ``r`` of ``W`` writes the
rows ``[r N / W, (r + 1) N / W)`` (:func:`cache.format.shard_range`), whatever the number of data files
(``split_dataset_by_node`` would hand out whole files when ``n_shards`` divides by ``W`` and otherwise make
every rank read every file and keep one row in ``W``); the DataLoader workers of a rank each take a
contiguous run of its write blocks (:class:`cache.run.StreamedBlocks`). Each unit of reading is one row
group of one file: ``IterableDataset.shard`` picks the file, ``reshard`` splits it into its row groups and
``shard`` picks the group, so a process reads only the row groups that hold its rows, and a resume reads
only the row groups that hold rows not yet committed.

Stage 2 and evaluation need random access by key: on local data files (a folder, or the hub snapshot in the
HF cache) they read through the sharded-table reader (:class:`cache.tables.TableDataset`, one row group at
a time); a dataset whose files are only on the hub is refused, naming the download command.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from .datasets import BadImageError, register_dataset
from .tables import HFImageDataset, _open, _Rows, check_columns, shard_names

logger = logging.getLogger(__name__)

PARQUET_SUFFIXES = (".parquet", ".pq")


def _download_hint(name: str, revision: str | None) -> str:
    rev = f" --revision {revision}" if revision else ""
    return (
        f"`huggingface-cli download --repo-type dataset {name}{rev}` on a machine with network (then "
        f"HF_HUB_OFFLINE=1 finds it in the HF cache), or download it with --local-dir DIR and pass hf:DIR"
    )


def _local_snapshot(name: str, revision: str | None) -> str | None:
    """The folder of hub dataset ``name`` in the local HF cache (``None`` when it is not there)."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, repo_type="dataset", revision=revision, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached (the hub client raises several types): the caller decides
        return None


def resolve_hf_files(
    path: str,
    split: str | None = None,
    revision: str | None = None,
    data_files: str | list[str] | dict[str, Any] | None = None,
) -> tuple[list[str], str, str | None, bool]:
    """The parquet data files of one split of an HF dataset: ``(files, split, revision, on_hub)``.

    ``path``: a local folder, a local parquet file or glob, or a hub name (``org/name``). ``revision``
    comes back resolved to the snapshot's commit when the hub repo is in the local HF cache. ``on_hub``:
    the files are ``hf://`` URLs (online, not cached). Raises ``ValueError`` naming the way out."""
    import datasets as hfd

    from .tables import _offline

    p = Path(path)
    local = p.exists() or path.startswith((".", "/")) or any(c in path for c in "*?[")
    on_hub = False
    if local and not p.is_dir():  # a parquet file or glob: the parquet builder
        builder_args: dict[str, Any] = {"path": "parquet", "data_files": data_files or path}
    elif local:
        builder_args = {"path": str(p.resolve()), "data_files": data_files}
    else:
        snap = _local_snapshot(path, revision)
        if snap is not None:
            revision = Path(snap).name
            builder_args = {"path": snap, "data_files": data_files}
            logger.info("hf:%s streams from its snapshot in the HF cache: %s", path, snap)
        elif _offline():
            raise ValueError(
                f"hf:{path}{f'@{revision}' if revision else ''}: not in the HF cache and HF_HUB_OFFLINE=1, so "
                f"it cannot be streamed: {_download_hint(path, revision)}"
            )
        else:
            builder_args = {"path": path, "data_files": data_files, "revision": revision}
            on_hub = True
    try:
        builder = hfd.load_dataset_builder(**builder_args)
    except Exception as e:  # the resolver raises many types: name the dataset and the forms accepted
        raise ValueError(
            f"hf:{path}: cannot resolve its data files for streaming ({type(e).__name__}: {e}); give a folder "
            "of parquet files (the HF repo layout data/train-0000N-of-0000M.parquet), data_files=, or a hub name"
        ) from e
    files_by_split = dict(builder.config.data_files or {})
    if not files_by_split:
        raise ValueError(f"hf:{path}: no data files found to stream")
    splits = [str(s) for s in files_by_split]
    if split is None:
        split = splits[0] if len(splits) == 1 else "train"
    if split not in files_by_split:
        raise ValueError(f"hf:{path} has no split {split!r}; its splits: {splits} (pass split= / --split)")
    files = [str(f) for f in files_by_split[split]]
    not_parquet = [f for f in files if not f.lower().endswith(PARQUET_SUFFIXES)]
    if not_parquet:
        raise ValueError(
            f"hf:{path} split {split!r}: streaming reads parquet data files (their footers give the row counts "
            f"stage 1 plans with), but {len(not_parquet)} file(s) are not parquet (e.g. {not_parquet[0]}); run "
            "without --streaming (the dataset is loaded and converted once), or convert it to parquet"
        )
    return files, split, revision, on_hub


class HFStreamingDataset(_Rows):
    """An HF dataset of images and captions read as a ``datasets.IterableDataset`` (see the module docstring).

    Items are the dicts of every image dataset (``key``, ``image (3, H, W)``, ``captions``). Stage 1 reads
    them with :meth:`iter_rows` (sequentially, row group by row group); ``__getitem__`` (stage 2,
    evaluation) needs the data files on disk. Bad images are skipped rows as everywhere (``corrupt``,
    ``no_image``, ...); a caption that is missing or not valid text is stored as missing (its text
    embedding marked not valid) without being listed up front, since listing it would mean reading every
    caption before the run starts.

    Args:
        path: a folder of parquet files in an HF repo's layout, a parquet file or glob, or a hub name.
        split: the split (default: the only one, else ``train``).
        streaming: must be true (the ``hf`` registry name builds :class:`cache.tables.HFImageDataset` otherwise).
        data_files: as ``datasets.load_dataset(data_files=)``: a pattern, a list, or ``{split: patterns}``.
        revision: the hub revision (recorded resolved to the snapshot's commit).
        image_field / caption_fields / image_size / resize / min_side / captions_encoding / max_pixels /
        allow_root / image_root: as for :class:`cache.tables.HFImageDataset`.
    """

    name = "hf"

    def __init__(
        self,
        path: str,
        split: str | None = None,
        streaming: bool = True,
        data_files: str | list[str] | dict[str, Any] | None = None,
        image_field: str = "image",
        caption_fields: dict[str, str] | None = None,
        revision: str | None = None,
        image_root: str | Path | None = None,
        image_size: int | tuple[int, int] | None = None,
        resize: str = "short_crop",
        min_side: int = 1,
        captions_encoding: str = "utf-8",
        max_pixels: int | None = None,
        allow_root: str | list[str] | None = None,
    ) -> None:
        if not streaming:
            raise ValueError(
                "HFStreamingDataset reads streaming=True datasets; build hf:... without it instead"
            )
        self.path, self.data_files = str(path), data_files
        self._setup(
            f"hf:{path}",
            image_field,
            caption_fields,
            image_size,
            resize,
            min_side,
            captions_encoding,
            max_pixels,
            allow_root,
        )
        self.files, self.split, self.revision, self.on_hub = resolve_hf_files(
            self.path, split, revision, data_files
        )
        self.shard_names = shard_names(self.files)
        starts, self._groups = [0], []
        for f in self.files:  # footers only: row counts, row-group bounds, the schema
            import pyarrow.parquet as pq

            try:
                with _open(f) as fh:
                    pf = pq.ParquetFile(fh)
                    meta, names = pf.metadata, pf.schema_arrow.names
            except Exception as e:  # noqa: BLE001 - a file that is not parquet: name it
                raise ValueError(
                    f"hf:{path}: {f} is not a readable parquet file ({type(e).__name__}: {e})"
                ) from e
            check_columns(f, names, image_field, self.caption_fields)
            bounds = [0]
            for g in range(meta.num_row_groups):
                bounds.append(bounds[-1] + meta.row_group(g).num_rows)
            self._groups.append(np.asarray(bounds, np.int64))
            starts.append(starts[-1] + bounds[-1])
        self._start = np.asarray(starts, np.int64)
        if len(self) == 0:
            raise ValueError(f"hf:{path} split {self.split!r} has no rows ({len(self.files)} file(s))")
        one = self.files[0]
        self.image_root = (
            Path(image_root)
            if image_root is not None
            else Path(os.path.dirname(one) if not self.on_hub else ".")
        )
        self._base: Any = None  # the IterableDataset, built in the process that reads (never pickled)
        self._table: Any = None  # the random-access reader (stage 2, evaluation)
        self.rows_read = 0  # rows this process read from the files (a resume reads only uncommitted ones)
        logger.info(
            "hf:%s split %s streaming: %d rows in %d parquet file(s), %d row groups",
            path,
            self.split,
            len(self),
            len(self.files),
            sum(len(b) - 1 for b in self._groups),
        )

    # ------------------------------------------------------------------ keys
    def __len__(self) -> int:
        return int(self._start[-1])

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} rows")
        s = int(np.searchsorted(self._start, index, side="right")) - 1
        return s, index - int(self._start[s])

    def _key(self, row: int) -> str:
        s, r = self._locate(row)
        return f"{self.shard_names[s]}/{r}"

    def keys(self) -> list[str]:
        return [
            f"{name}/{r}" for name, n in zip(self.shard_names, np.diff(self._start)) for r in range(int(n))
        ]

    def _image_present(self, row: int) -> bool:
        return True  # not known before the row is read; a missing image is a skipped row then

    # ------------------------------------------------------------------ streaming (stage 1)
    def _stream(self) -> Any:
        """The split as a ``datasets.IterableDataset`` of the image and caption columns, images undecoded."""
        if self._base is None:
            import datasets as hfd

            ds = hfd.load_dataset(
                "parquet", data_files={self.split: self.files}, split=self.split, streaming=True
            )
            ds = ds.select_columns(list(dict.fromkeys([self.image_field, *self.caption_fields.values()])))
            feat = (ds.features or {}).get(self.image_field)
            if isinstance(feat, hfd.Image) and feat.decode:  # our decoder: a bad image is a skipped row
                ds = ds.cast_column(self.image_field, hfd.Image(decode=False))
            if ds.num_shards != len(self.files):
                raise RuntimeError(
                    f"hf:{self.path}: datasets made {ds.num_shards} shards of {len(self.files)} files"
                )
            self._base = ds
        return self._base

    def _unit(self, s: int, g: int) -> Any:
        """Row group ``g`` of file ``s`` as an ``IterableDataset`` (``shard`` -> file, ``reshard`` -> groups)."""
        one = self._stream().shard(num_shards=len(self.files), index=s)
        groups = one.reshard()
        if groups.num_shards != len(self._groups[s]) - 1:
            raise RuntimeError(
                f"hf:{self.path}: {self.files[s]} has {len(self._groups[s]) - 1} row groups but datasets made "
                f"{groups.num_shards} shards of it"
            )
        return groups.shard(num_shards=groups.num_shards, index=g)

    def iter_rows(self, indices: list[int]) -> Iterator[tuple[int, dict[str, Any] | BadImageError]]:
        """``(index, item)`` for each of ``indices`` (ascending), read in file order; ``item`` is the sample's
        dict, or the :class:`BadImageError` that makes it a skipped row. Only the row groups holding
        ``indices`` are read."""
        want = np.asarray(sorted(set(int(i) for i in indices)), np.int64)
        if len(want) and (want[0] < 0 or want[-1] >= len(self)):
            raise IndexError(f"rows {want[0]}..{want[-1]} out of range for {len(self)} rows")
        pos = 0
        while pos < len(want):
            s, r = self._locate(int(want[pos]))
            bounds = self._groups[s]
            g = int(np.searchsorted(bounds, r, side="right")) - 1
            first = int(self._start[s] + bounds[g])
            end = int(self._start[s] + bounds[g + 1])
            stop = int(np.searchsorted(want, end))
            wanted = set(want[pos:stop].tolist())
            j = -1
            for ex in self._examples(self._unit(s, g)):
                j += 1
                self.rows_read += 1
                if first + j in wanted:
                    yield first + j, self._item(first + j, ex)
            if first + j + 1 != end:
                raise RuntimeError(
                    f"hf:{self.path}: row group {g} of {self.files[s]} gave {j + 1} rows, its footer says "
                    f"{end - first}: the file changed while it was read"
                )
            pos = stop

    @staticmethod
    def _examples(unit: Any, batch: int = 64) -> Iterator[dict[str, Any]]:
        """The rows of a unit. ``IterableDataset.iter`` rather than ``iter()``: inside a DataLoader worker the
        latter hands each worker a share of the unit's shards, and here the worker split is already made."""
        for cols in unit.iter(batch_size=batch):
            names = list(cols)
            for values in zip(*(cols[c] for c in names)):
                yield dict(zip(names, values))

    def _item(self, index: int, ex: dict[str, Any]) -> dict[str, Any] | BadImageError:
        key = self._key(index)
        try:
            image = self._load(index, ex.get(self.image_field))
        except BadImageError as e:
            return BadImageError(f"{key}: {e}", e.kind)
        caps: dict[str, str] = {}
        for g, col in self.caption_fields.items():
            v = ex.get(col)
            if isinstance(v, bytes):
                try:
                    v = v.decode(self.encoding)
                except UnicodeDecodeError:
                    continue  # stored as missing (text_valid False)
            if isinstance(v, str) and v.strip():
                caps[g] = v.strip()
        return {"key": key, "image": image, "captions": caps}

    # ------------------------------------------------------------------ random access (stage 2, evaluation)
    def __getitem__(self, index: int) -> dict[str, Any]:
        if self._table is None:
            self._table = self._random_access()
        return self._table[index]

    def _random_access(self) -> Any:
        """The sharded-table reader over the same local files (same keys, same rows)."""
        from .tables import TableDataset

        if self.on_hub:
            raise ValueError(
                f"hf:{self.path} was streamed from the hub: reading a sample by key (stage 2, evaluation) needs its "
                f"data files on disk: {_download_hint(self.path, self.revision)}"
            )
        table = TableDataset(
            self.files,
            format="parquet",
            image_field=self.image_field,
            caption_fields=self.caption_fields,
            image_root=self.image_root,
            image_size=self.image_size,
            resize=self.resize,
            min_side=self.min_side,
            captions_encoding=self.encoding,
            max_pixels=self.max_pixels,
            allow_root=self.allow_root,
        )
        if len(table) != len(self) or table.shard_names != self.shard_names:
            raise ValueError(f"hf:{self.path}: its data files changed since they were listed; rerun")
        return table

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_base"], d["_table"] = None, None  # each process opens its own
        return d

    # ------------------------------------------------------------------ records
    def identity(self) -> dict[str, Any]:
        return {
            "name": "hf",
            "streaming": True,
            "path": self.path,
            "split": self.split,
            "revision": self.revision,
            "files": len(self.files),
            "rows": len(self),
            "image_field": self.image_field,
            "caption_fields": self.caption_fields,
        }

    def source_spec(self) -> dict[str, Any]:
        p = Path(self.path)
        kw: dict[str, Any] = {
            "path": str(p.resolve()) if p.exists() else self.path,
            "split": self.split,
            "streaming": True,
            "image_field": self.image_field,
            "caption_fields": self.caption_fields,
            "captions_encoding": self.encoding,
            "image_root": str(Path(self.image_root).resolve()),
        }
        if self.data_files is not None:
            kw["data_files"] = self.data_files
        if self.revision:
            kw["revision"] = self.revision
        return {"name": "hf", "kwargs": kw}


@register_dataset("hf")
def hf_dataset(path: str, streaming: bool = False, **kwargs: Any) -> Dataset:
    """An HF ``datasets`` dataset: loaded and converted (:class:`HFImageDataset`), or with ``streaming=True``
    read as a stream of its parquet data files (:class:`cache.hf_stream.HFStreamingDataset`)."""
    cls: type[Dataset] = HFStreamingDataset if streaming else HFImageDataset
    try:
        inspect.signature(cls).bind(path, **kwargs)
    except TypeError as e:
        how = "streaming" if streaming else "without streaming"
        raise ValueError(f"dataset 'hf' ({how}): {e}; it takes {inspect.signature(cls)}") from e
    return cls(path, **kwargs)
