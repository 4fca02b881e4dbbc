"""Tables of captions (parquet / CSV / TSV through pyarrow) and Hugging Face ``datasets`` as image datasets.

Both are rows with an image column and caption columns:
  * ``image_field``: an image path (relative to ``image_root``, default the table's folder), encoded
    image bytes, or a ``{"bytes", "path"}`` struct (the HF ``Image`` feature's storage);
  * ``caption_fields``: granularity -> column (default ``{"alt": "caption"}``; ``{}`` for none).
Column names are checked when the dataset is built, before any image is read: an unknown one fails
naming the columns that exist. Keys are ``<table file name>/<row>`` (tables, 0-based data row) and
``<split>/<row>`` (HF datasets), so a cache is matched back to its rows.

Bad rows are never fatal and never silent: a missing or null image, a path that does not exist or an
undecodable image is a skipped row at extraction time (kind ``no_image`` / ``unreadable`` / ``corrupt``,
key with the row); a caption that is not valid text in ``captions_encoding`` counts as missing and
is listed in :attr:`problems` with its row; so is a row with an image but no caption. A CSV/TSV line
that does not parse (a wrong number of fields) is left out and listed (``bad_row``); quoted values
may span lines (a multi-line caption).

Paths in cells stay inside the dataset: a relative path is resolved against ``image_root`` (default the
table's folder), and a cell whose path (absolute, or with ``..``) leads outside that folder is a skipped
row (``outside_root``) unless the user allows its root explicitly (``allow_root=`` a folder or a list of
folders, ``--data-allow-root`` in stage 1 and evaluation, ``data.dataset_kwargs.allow_root`` in stage 2).
The check is on the path as written (normalised, symbolic links inside the folder are followed as usual).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from .datasets import (
    BadImageError,
    _as_size,
    load_image,
    load_image_bytes,
    log_problems,
    register_dataset,
)

logger = logging.getLogger(__name__)

DEFAULT_CAPTION_FIELDS = {"alt": "caption"}
TABLE_FORMATS = ("parquet", "csv", "tsv")


def allowed_roots(base: str | Path, allow_root: str | Path | list[str | Path] | tuple | None) -> list[str]:
    """The folders paths of a table may point into: ``base`` (the folder its relative paths are resolved
    against) and the ones the user allowed, normalised absolute paths."""
    extra = (
        [] if allow_root is None else [allow_root] if isinstance(allow_root, str | Path) else list(allow_root)
    )
    return [os.path.normpath(os.path.abspath(os.fspath(p))) for p in [base, *extra]]


def contained_path(cell: str, base: str | Path, roots: list[str], where: str, fix: str) -> Path:
    """The path a table cell names (relative ones resolved against ``base``), or a :class:`BadImageError`
    (``outside_root``) when it leads outside every folder of ``roots`` (:func:`allowed_roots`)."""
    p = Path(cell)
    full = os.path.normpath(os.path.abspath(p if p.is_absolute() else Path(base) / p))
    if not any(full == r or full.startswith(r.rstrip(os.sep) + os.sep) for r in roots):
        raise BadImageError(
            f"{where}: the path {cell!r} leads to {full}, outside the dataset's folder {roots[0]}; "
            f"refused (allow its folder explicitly: {fix})",
            "outside_root",
        )
    return Path(full)


ALLOW_ROOT_FIX = (
    "allow_root=FOLDER (tipsdistill-cache / tipsdistill-eval --data-allow-root FOLDER; stage 2: "
    "data.dataset_kwargs.allow_root=FOLDER)"
)


def check_columns(
    where: str,
    columns: list[str],
    image_field: str,
    caption_fields: dict[str, str],
    key_field: str | None = None,
) -> None:
    """Fail before any work when a named column does not exist, listing the ones that do."""
    wanted = [("image_field", image_field)] + [(f"caption {g}", c) for g, c in caption_fields.items()]
    wanted += [("key_field", key_field)] if key_field is not None else []
    bad = [f"{what}={col!r}" for what, col in wanted if col not in columns]
    if bad:
        raise ValueError(
            f"{where}: unknown column(s) {', '.join(bad)}; the columns are: {columns}. Name them with "
            "--image-column COL / --caption GRAN=COL (image_field= / caption_fields= / key_field= in a config)"
        )


def shard_names(paths: list[str]) -> list[str]:
    """The names of table shards in their keys (``SHARD/ROW``): each file's path relative to the files' common
    folder (its file name when there is one file)."""
    from .locations import is_remote

    dirs = [os.path.dirname(p) for p in paths]
    common = os.path.commonprefix(dirs) if any(is_remote(p) for p in paths) else os.path.commonpath(dirs)
    return [os.path.basename(p) if len(paths) == 1 else p[len(common) :].lstrip("/") for p in paths]


class _Rows(Dataset):
    """Shared row logic: ``self._images`` (path str | bytes | dict | None per row), ``self._captions``."""

    name = "rows"

    def _setup(
        self,
        where: str,
        image_field: str,
        caption_fields: dict[str, str] | None,
        image_size: Any,
        resize: str,
        min_side: int,
        encoding: str,
        max_pixels: int | None = None,
        allow_root: Any = None,
    ) -> None:
        """The settings every table-like source shares (``caption_fields=None``: the defaults)."""
        self.where = where
        self.image_field = image_field
        self.caption_fields = dict(DEFAULT_CAPTION_FIELDS if caption_fields is None else caption_fields)
        self.image_size, self.resize, self.min_side = _as_size(image_size), resize, int(min_side)
        self.max_pixels = max_pixels
        self.allow_root = allow_root
        self.encoding = encoding
        self.problems: list[dict[str, Any]] = []

    def _decode_captions(
        self, columns: dict[str, list[Any]], n: int, offset: int = 0
    ) -> list[dict[str, str]]:
        """Captions of ``n`` rows (the rows ``offset ..`` of the dataset); problems listed with their rows."""
        caps: list[dict[str, str]] = [{} for _ in range(n)]
        for g, values in columns.items():
            for row, v in enumerate(values, start=offset):
                if isinstance(v, bytes | bytearray | memoryview):
                    try:
                        v = bytes(v).decode(self.encoding)
                    except UnicodeDecodeError:
                        self.problems.append(
                            {
                                "row": row,
                                "key": self._key(row),
                                "kind": "bad_encoding",
                                "message": f"{self.where} row {row}: caption {g!r} is not valid {self.encoding}; treated "
                                "as missing (pass captions_encoding, e.g. latin-1, if the file uses another encoding)",
                            }
                        )
                        continue
                if isinstance(v, str) and v.strip():
                    caps[row - offset][g] = v.strip()
        if columns:
            for row, c in enumerate(caps, start=offset):
                if not c and self._image_present(row):
                    self.problems.append(
                        {
                            "row": row,
                            "key": self._key(row),
                            "kind": "no_caption",
                            "message": f"{self.where} row {row}: image without caption; kept, its text embeddings are "
                            "marked missing",
                        }
                    )
        return caps

    def _key(self, row: int) -> str:
        raise NotImplementedError

    def _image_present(self, row: int) -> bool:
        return self._images[row] is not None

    def _load(self, row: int, value: Any) -> Any:
        if isinstance(value, dict):  # HF Image storage {"bytes", "path"}
            value = value.get("bytes") or value.get("path")
        if value is None or (isinstance(value, str | bytes) and not value):
            raise BadImageError(
                f"{self.where} row {row}: no image (empty {self.image_field!r} cell)", "no_image"
            )
        opts = {"size": self.image_size, "resize": self.resize, "max_pixels": self.max_pixels}
        if isinstance(value, bytes | bytearray | memoryview):
            return load_image_bytes(bytes(value), self.min_side, **opts)
        if isinstance(value, str):
            roots = allowed_roots(self.image_root, self.allow_root)
            p = contained_path(value, self.image_root, roots, f"{self.where} row {row}", ALLOW_ROOT_FIX)
            try:
                return load_image(p, self.min_side, **opts)
            except BadImageError as e:
                raise BadImageError(f"{self.where} row {row}: {p}: {e}", e.kind) from e
        raise BadImageError(
            f"{self.where} row {row}: column {self.image_field!r} holds {type(value).__name__}, not a path or bytes",
            "corrupt",
        )

    @property
    def caption_problems(self) -> list[str]:
        return [p["message"] for p in self.problems]

    def __len__(self) -> int:
        return len(self._images)

    def keys(self) -> list[str]:
        return [self._key(i) for i in range(len(self))]

    def _image_value(self, index: int) -> Any:
        return self._images[index]

    def __getitem__(self, index: int) -> dict[str, Any]:
        key = self._key(index)
        try:
            image = self._load(index, self._image_value(index))
        except BadImageError as e:
            raise BadImageError(f"{key}: {e}", e.kind) from e
        return {"key": key, "image": image, "captions": dict(self._captions[index])}


@register_dataset("table")
class TableDataset(_Rows):
    """Parquet / CSV / TSV tables of images and captions, one file or many (see the module docstring).

    Args:
        path: a table file, or a pattern of shards as for ``wds:`` (:func:`cache.locations.expand_pattern`):
            braces (``out/{00000..00009}.parquet``), globs (``'out/*.parquet'``), ``::``-separated lists, or a
            folder (every file with the format's suffix under it: img2dataset's ``--output_format parquet``
            folder beside its ``*_stats.json``, an HF repo's ``data/train-000NN-of-000MM.parquet``); local or
            remote (``s3://``, ``https://``, ... through fsspec).
        format: ``parquet``, ``csv`` or ``tsv`` (default: from the first file's suffix).
        image_field: column of image paths or bytes (default ``image``; img2dataset's is ``jpg``).
        caption_fields: granularity -> column (default ``{"alt": "caption"}``).
        key_field: a column of per-row keys (img2dataset's ``key``); default none: ``SHARD/ROW``, ``SHARD`` the
            file's path relative to the shards' common folder (its name for one file) and ``ROW`` its 0-based
            data row. A key met again is a skipped row (``duplicate``), an empty key cell falls back to
            ``SHARD/ROW``; both listed.
        image_root: folder relative paths are resolved against (default: each table's folder); cells
            pointing outside it are refused unless ``allow_root`` (a folder or a list) names their folder.
        max_pixels: the pixel cap of :func:`cache.datasets.decode_image`.

    Shards are read shard by shard: building the dataset reads each file's schema, row count and its small
    columns (captions, keys, image paths), never an image column of bytes; a process reading items keeps
    the one row group (parquet) or file (CSV/TSV) it last read. Items are indexed in shard order, so the
    rank and DataLoader-worker splits of stage 1 are exact (each row read once). Whether a bytes image
    cell is empty is only known when it is read: a row without caption is listed (``no_caption``) unless
    its image cell is known to be empty.
    """

    name = "table"

    def __init__(
        self,
        path: str | Path | list[str],
        format: str | None = None,
        image_field: str = "image",
        caption_fields: dict[str, str] | None = None,
        image_root: str | Path | None = None,
        image_size: int | tuple[int, int] | None = None,
        resize: str = "short_crop",
        min_side: int = 1,
        captions_encoding: str = "utf-8",
        max_pixels: int | None = None,
        allow_root: str | list[str] | None = None,
        key_field: str | None = None,
    ) -> None:
        import numpy as np

        from .locations import expand_pattern, is_pipe, is_remote

        self.pattern = [str(p) for p in path] if isinstance(path, list) else str(path)
        if format is not None and format not in TABLE_FORMATS:
            raise ValueError(f"table format must be one of {TABLE_FORMATS}, got {format!r}")
        suffixes = {"parquet": (".parquet", ".pq"), "csv": (".csv",), "tsv": (".tsv",)}
        want = suffixes[format] if format else (".parquet", ".pq", ".csv", ".tsv")
        try:
            self.paths = expand_pattern(self.pattern, want, what="table")
        except ValueError as e:
            raise ValueError(f"table {self.pattern}: {e}") from e
        if any(is_pipe(p) for p in self.paths):
            raise ValueError(
                f"table {self.pattern}: pipe: is for tar shards (wds:); tables are read by column"
            )
        self.paths = [p if is_remote(p) else str(Path(p).resolve()) for p in self.paths]
        fmt = format or {".parquet": "parquet", ".pq": "parquet", ".tsv": "tsv"}.get(
            Path(self.paths[0]).suffix.lower(), "csv"
        )
        self.format = fmt
        self.path = self.paths[0] if len(self.paths) == 1 else str(self.pattern)
        self.key_field = key_field
        one_root = os.path.dirname(self.paths[0]) if not is_remote(self.paths[0]) else None
        self.image_root = Path(image_root) if image_root is not None else Path(one_root or ".")
        self._own_root = image_root is None
        self._setup(
            str(self.pattern),
            image_field,
            caption_fields,
            image_size,
            resize,
            min_side,
            captions_encoding,
            max_pixels,
            allow_root,
        )
        self.shard_names = shard_names(self.paths)
        self._cols = [image_field, *dict.fromkeys(self.caption_fields.values())]
        self._bad: dict[int, tuple[str, str]] = {}
        self._keys: list[str] | None = [] if key_field is not None else None
        self._first: dict[str, int] = {}
        # per shard: first row and row-group bounds (parquet); per row: the image cell's state, the key
        starts, self._groups, present = [0], [], []
        for p in self.paths:
            n, bounds, pres, table = self._scan(p)
            base = starts[-1]
            starts.append(base + n)
            self._start = np.asarray(starts, np.int64)  # rows of the shards scanned so far: _row_key works
            self._groups.append(bounds)
            present.append(pres)
            self._present_now, self._base_now = pres, base
            if self._keys is not None:
                self._keys += self._check_keys(table.column(key_field).to_pylist(), base)
            if self.caption_fields:
                self._decode_captions(
                    {g: table.column(c).to_pylist() for g, c in self.caption_fields.items()}, n, base
                )
            del table
        del self._present_now, self._first
        self._present = np.concatenate(present)
        self._unit: tuple[tuple[int, int], Any] | None = None  # the row group / file this process last read
        if len(self) == 0:
            raise ValueError(f"table {self.pattern} has no rows ({len(self.paths)} file(s))")
        log_problems(str(self.pattern), self.problems)

    # ------------------------------------------------------------------ reading
    def _read_unit(self, s: int, g: int, columns: list[str]) -> Any:
        """Row group ``g`` of parquet shard ``s`` (a CSV/TSV shard is one unit, ``g`` = 0) as an Arrow table."""
        path = self.paths[s]
        if self.format == "parquet":
            import pyarrow.parquet as pq

            def read() -> Any:
                with _open(path) as fh:
                    return pq.ParquetFile(fh).read_row_group(g, columns=columns)

            return _retried(path, read)
        table, _ = self._read_csv(path, columns)
        return table

    def _read_csv(self, path: str, columns: list[str]) -> tuple[Any, list[Any]]:
        """The ``columns`` of a CSV / TSV shard and the rows of the wrong shape left out (:func:`_retried`)."""
        return _retried(path, lambda: self._read_csv_once(path, columns))

    def _read_csv_once(self, path: str, columns: list[str]) -> tuple[Any, list[Any]]:
        import pyarrow as pa
        import pyarrow.csv as pcsv

        bad_rows: list[Any] = []

        def skip_row(row: Any) -> str:  # a line with the wrong number of fields: left out, listed
            bad_rows.append(row)
            return "skip"

        # quoted values may hold line breaks (multi-line captions)
        delim = "\t" if self.format == "tsv" else ","
        parse = pcsv.ParseOptions(delimiter=delim, newlines_in_values=True, invalid_row_handler=skip_row)
        try:
            with _open(path) as fh, pcsv.open_csv(fh, parse_options=parse) as r:
                names = r.schema.names
        except pa.ArrowInvalid as e:
            raise ValueError(f"{path}: cannot read the {self.format} header: {e}") from e
        check_columns(path, names, self.image_field, self.caption_fields, self.key_field)
        # read as bytes: a cell that is not valid UTF-8 is then one bad caption, not a failed file
        conv = pcsv.ConvertOptions(include_columns=columns, column_types={c: pa.binary() for c in columns})
        bad_rows.clear()  # the header read may have met the first ones already
        try:
            with _open(path) as fh:
                table = pcsv.read_csv(
                    fh,
                    parse_options=parse,
                    convert_options=conv,
                    # one thread: the bad rows are reported in file order with their record number
                    read_options=pcsv.ReadOptions(use_threads=False),
                )
        except pa.ArrowInvalid as e:
            raise ValueError(f"{path}: cannot parse the {self.format} table: {e}") from e
        return table, list(bad_rows)

    def _scan(self, path: str) -> tuple[int, list[int], Any, Any]:
        """Row count, row-group bounds, image-cell state per row (1 present, 0 empty, -1 not known) and the
        small columns (captions, keys) of one shard as an Arrow table; no image bytes are read."""
        import numpy as np
        import pyarrow as pa

        small = [
            c
            for c in dict.fromkeys(
                [*self.caption_fields.values(), *([self.key_field] if self.key_field else [])]
            )
        ]
        if self.format == "parquet":
            import pyarrow.parquet as pq

            def scan() -> tuple[list[int], bool, Any]:
                with _open(path) as fh:
                    pf = pq.ParquetFile(fh)
                    names = pf.schema_arrow.names
                    check_columns(path, names, self.image_field, self.caption_fields, self.key_field)
                    meta = pf.metadata
                    bounds = [0]
                    for g in range(meta.num_row_groups):
                        bounds.append(bounds[-1] + meta.row_group(g).num_rows)
                    img_type = pf.schema_arrow.field(self.image_field).type
                    is_bytes = (
                        pa.types.is_binary(img_type)
                        or pa.types.is_large_binary(img_type)
                        or pa.types.is_struct(img_type)
                    )
                    cols = small if is_bytes else list(dict.fromkeys([self.image_field, *small]))
                    return bounds, is_bytes, pf.read(columns=cols)

            bounds, is_bytes, table = _retried(path, scan)
            n = bounds[-1]
            if is_bytes:
                present = np.full(n, -1, np.int8)
            else:
                cells = table.column(self.image_field).to_pylist()
                present = np.asarray([1 if c else 0 for c in cells], np.int8)
        else:
            table, bad_rows = self._read_csv(path, list(dict.fromkeys([self.image_field, *small])))
            n = table.num_rows
            bounds = [0, n]
            present = np.asarray([1 if c else 0 for c in table.column(self.image_field).to_pylist()], np.int8)
            for bad in bad_rows:
                # pyarrow counts records (a quoted multi-line value is one), the header being record 1
                line = f"record {bad.number} (the header is 1)" if bad.number is not None else "a record"
                text = bad.text if len(bad.text) <= 200 else bad.text[:200] + "..."
                self.problems.append(
                    {
                        "row": None,
                        "key": None,
                        "kind": "bad_row",
                        "message": f"{path} {line}: {bad.actual_columns} field(s) where the header has "
                        f"{bad.expected_columns}; the row is left out (not a sample): {text!r}",
                    }
                )
        return n, bounds, present, table

    def _check_keys(self, cells: list[Any], base: int) -> list[str]:
        """The keys of the rows ``base ..`` from their key cells; an empty one falls back to ``SHARD/ROW`` and a
        repeated one makes a skipped row (``duplicate``), both listed."""
        keys: list[str] = []
        first = self._first
        for i, v in enumerate(cells, start=base):
            if isinstance(v, bytes):
                v = v.decode("utf-8", "backslashreplace")
            k = "" if v is None else str(v).strip()
            if not k:
                k = self._row_key(i)
                self.problems.append(
                    {"row": i, "key": k, "kind": "no_key",
                     "message": f"{self.where} row {i}: empty {self.key_field!r} cell; keyed {k!r}"}
                )  # fmt: skip
            if k in first:
                self._bad[i] = (
                    "duplicate",
                    f"key {k!r} was already read at row {first[k]}; this copy is not used",
                )
                k = self._row_key(i)  # keys stay unique; the row is a skipped one
            else:
                first[k] = i
            keys.append(k)
        return keys

    def _locate(self, index: int) -> tuple[int, int]:
        """``(shard, row in shard)`` of a global row."""
        import numpy as np

        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} rows")
        s = int(np.searchsorted(self._start, index, side="right")) - 1
        return s, index - int(self._start[s])

    def shard_of(self, indices: Any) -> Any:
        """The table file (shard) of each row of ``indices``, ``(len(indices),)`` int64 (``data.order=shards``)."""
        import numpy as np

        return np.searchsorted(self._start, np.asarray(indices, np.int64), side="right") - 1

    def _row_key(self, index: int) -> str:
        s, r = self._locate(index)
        return f"{self.shard_names[s]}/{r}"

    def _key(self, row: int) -> str:
        if self._keys is not None and row < len(self._keys):
            return self._keys[row]
        return self._row_key(row)

    def _image_present(self, row: int) -> bool:  # type: ignore[override]
        pres = getattr(self, "_present_now", None)
        if pres is not None:  # while scanning a shard: its own rows
            return bool(pres[row - self._base_now] != 0)
        return bool(self._present[row] != 0)

    def __len__(self) -> int:
        return int(self._start[-1])

    def keys(self) -> list[str]:
        return list(self._keys) if self._keys is not None else [self._row_key(i) for i in range(len(self))]

    def __getitem__(self, index: int) -> dict[str, Any]:
        import numpy as np

        key = self._key(index)
        bad = self._bad.get(index)
        if bad is not None:
            raise BadImageError(f"{key}: {bad[1]}", bad[0])
        s, r = self._locate(index)
        bounds = self._groups[s]
        g = int(np.searchsorted(bounds, r, side="right")) - 1
        if self._unit is None or self._unit[0] != (s, g):
            self._unit = ((s, g), self._read_unit(s, g, self._cols))
        table = self._unit[1]
        row = r - bounds[g]
        value = table.column(self.image_field)[row].as_py()
        if isinstance(value, bytes) and self.format != "parquet":  # CSV cells: paths read as bytes
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as e:
                raise BadImageError(f"{key}: the image path is not valid UTF-8", "unreadable") from e
        if self._own_root and not self.is_remote:
            self.image_root = Path(os.path.dirname(self.paths[s]))
        try:
            image = self._load(index, value)
        except BadImageError as e:
            raise BadImageError(f"{key}: {e}", e.kind) from e
        caps: dict[str, str] = {}
        for g_name, col in self.caption_fields.items():
            v = table.column(col)[row].as_py()
            if isinstance(v, bytes):
                try:
                    v = v.decode(self.encoding)
                except UnicodeDecodeError:
                    continue  # listed at construction (bad_encoding)
            if isinstance(v, str) and v.strip():
                caps[g_name] = v.strip()
        return {"key": key, "image": image, "captions": caps}

    @property
    def is_remote(self) -> bool:
        from .locations import is_remote

        return is_remote(self.paths[0])

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_unit"] = None  # a worker reads its own row groups
        return d

    def identity(self) -> dict[str, Any]:
        from .locations import public_url

        return {
            "name": "table",
            "path": public_url(self.paths[0]) if len(self.paths) == 1 else public_url(str(self.pattern)),
            "shards": len(self.paths),
            "format": self.format,
            "rows": len(self),
            "image_field": self.image_field,
            "caption_fields": self.caption_fields,
        }

    def source_spec(self) -> dict[str, Any]:
        from .locations import public_pattern

        kw: dict[str, Any] = {
            "path": public_pattern(self.pattern) if len(self.paths) > 1 else public_pattern(self.paths[0]),
            "format": self.format,
            "image_field": self.image_field,
            "caption_fields": self.caption_fields,
            "captions_encoding": self.encoding,
        }
        if not self._own_root:
            kw["image_root"] = str(Path(self.image_root).resolve())
        if self.key_field is not None:
            kw["key_field"] = self.key_field
        return {"name": "table", "kwargs": kw}


def _retried(path: str, read: Any) -> Any:
    """``read()`` of the table file ``path``; remote, tried again on a transient failure and
    :class:`cache.locations.SourceUnavailableError` when the server stays down (the run stops, resumable,
    instead of recording the shard's rows as unreadable)."""
    from .locations import is_remote, retry_remote

    return retry_remote(path, read) if is_remote(path) else read()


def _open(path: str) -> Any:
    """A binary file object of a local or remote table file (fsspec for URLs)."""
    from .locations import filesystem, is_remote

    if is_remote(path):
        fs, p = filesystem(path)
        return fs.open(p, "rb")
    return open(path, "rb")


class HFImageDataset(_Rows):
    """A Hugging Face ``datasets`` dataset of images and captions.

    ``path``: a ``save_to_disk`` folder (``load_from_disk``), a folder of images (the ``imagefolder``
    builder; captions from its ``metadata.jsonl``/``.csv``), parquet file(s) (the ``parquet`` builder;
    a glob is fine), or a hub dataset name (``load_dataset(name, split=, revision=)``; offline it must
    be in the HF cache). ``split`` defaults to the only split, or ``train``. ``cache_dir``: where the
    builders keep their Arrow files (default the ``datasets`` cache). Image paths (a path column, or the
    ``path`` of an ``Image`` feature without bytes) must stay inside ``image_root`` (default the dataset's
    folder) or a folder of ``allow_root``, as for :class:`TableDataset`.
    """

    name = "hf"

    def __init__(
        self,
        path: str,
        split: str | None = None,
        image_field: str = "image",
        caption_fields: dict[str, str] | None = None,
        revision: str | None = None,
        cache_dir: str | None = None,
        image_root: str | Path | None = None,
        image_size: int | tuple[int, int] | None = None,
        resize: str = "short_crop",
        min_side: int = 1,
        captions_encoding: str = "utf-8",
        max_pixels: int | None = None,
        allow_root: str | list[str] | None = None,
    ) -> None:
        import datasets as hfd

        self.path, self.revision = str(path), revision
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
        ds, self.builder = _load_hf(self.path, split, revision, cache_dir)
        if isinstance(ds, hfd.DatasetDict):
            splits = list(ds)
            if split is None:
                split = splits[0] if len(splits) == 1 else "train"
            if split not in ds:
                raise ValueError(f"hf:{path} has no split {split!r}; its splits: {splits} (pass split=)")
            ds = ds[split]
        self.split = split or str(getattr(ds, "split", None) or "train")
        check_columns(f"hf:{path}", list(ds.column_names), image_field, self.caption_fields)
        feat = ds.features.get(image_field)
        if isinstance(feat, hfd.Image) and feat.decode:
            ds = ds.cast_column(
                image_field, hfd.Image(decode=False)
            )  # our decoder: bad images are skipped rows
        self.ds = ds
        p = Path(self.path)
        self.image_root = Path(image_root) if image_root is not None else (p if p.is_dir() else p.parent)
        self._images = _LazyColumn(ds, image_field)
        self._captions = self._decode_captions(
            {g: ds[c] for g, c in self.caption_fields.items()}, len(ds)
        )  # fmt: skip
        if len(ds) == 0:
            raise ValueError(f"hf:{path} split {self.split!r} has no rows")
        log_problems(f"hf:{path}", self.problems)

    def _key(self, row: int) -> str:
        return f"{self.split}/{row}"

    def _image_present(self, row: int) -> bool:
        return self._images.present(row)

    def identity(self) -> dict[str, Any]:
        return {
            "name": "hf",
            "path": self.path,
            "builder": self.builder,
            "split": self.split,
            "revision": self.revision,
            "rows": len(self),
            "image_field": self.image_field,
            "caption_fields": self.caption_fields,
        }

    def source_spec(self) -> dict[str, Any]:
        p = Path(self.path)
        path = str(p.resolve()) if p.exists() or "*" in self.path else self.path
        kw = {
            "path": path,
            "split": self.split,
            "image_field": self.image_field,
            "caption_fields": self.caption_fields,
            "image_root": str(self.image_root.resolve()),
            "captions_encoding": self.encoding,
        }
        if self.revision:
            kw["revision"] = self.revision
        return {"name": "hf", "kwargs": kw}


class _LazyColumn:
    """Row access to one column of an Arrow-backed HF dataset (no copy of the image bytes up front)."""

    def __init__(self, ds: Any, column: str) -> None:
        self.ds, self.column = ds, column
        self._null = ds.with_format("arrow")[column].is_null().to_pylist() if len(ds) else []

    def present(self, row: int) -> bool:
        return not self._null[row]

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, row: int) -> Any:
        return None if self._null[row] else self.ds[int(row)][self.column]


def _load_hf(
    path: str, split: str | None, revision: str | None, cache_dir: str | None = None
) -> tuple[Any, str]:
    import datasets as hfd

    p = Path(path)
    if p.is_dir() and any((p / f).exists() for f in ("dataset_dict.json", "state.json", "dataset_info.json")):
        return hfd.load_from_disk(str(p)), "load_from_disk"
    if p.is_dir():
        return hfd.load_dataset(
            "imagefolder", data_dir=str(p), split=split or "train", cache_dir=cache_dir
        ), "imagefolder"
    if path.endswith((".parquet", ".pq")) or ("*" in path and ".parquet" in path):
        return hfd.load_dataset(
            "parquet", data_files=path, split=split or "train", cache_dir=cache_dir
        ), "parquet"
    if p.suffix or path.startswith((".", "/")):
        raise ValueError(
            f"hf:{path} does not exist (expected a save_to_disk folder, an image folder or parquet files)"
        )
    try:
        return hfd.load_dataset(path, split=split, revision=revision, cache_dir=cache_dir), "hub"
    except Exception as e:  # the hub client raises many types; name the id and the way out
        offline = _offline()
        raise ValueError(
            f"cannot load the HF dataset {path!r}{f' (revision {revision})' if revision else ''}: {e}. "
            + (
                "HF_HUB_OFFLINE=1 and it is not in the HF cache: run once online, or "
                f"`huggingface-cli download --repo-type dataset {path}` on a machine with network, "
                "or save it with save_to_disk and pass that folder"
                if offline
                else "check the name on https://huggingface.co/datasets and your network / token"
            )
        ) from e


def _offline() -> bool:
    import os

    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or os.environ.get(
        "HF_DATASETS_OFFLINE", "0"
    ).lower() in ("1", "true", "yes")
