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
            f"{where}: the path {cell!r} is outside the dataset's folder, refused (allow its folder explicitly: "
            f"{fix}); it leads to {full}, the folder is {roots[0]}",
            "outside_root",
        )
    return Path(full)


ALLOW_ROOT_FIX = (
    "allow_root=FOLDER (tipsdistill-cache / tipsdistill-eval --data-allow-root FOLDER; stage 2: "
    "data.dataset_kwargs.allow_root=FOLDER)"
)


def check_columns(where: str, columns: list[str], image_field: str, caption_fields: dict[str, str]) -> None:
    """Fail before any work when a named column does not exist, listing the ones that do."""
    wanted = [("image_field", image_field)] + [(f"caption {g}", c) for g, c in caption_fields.items()]
    bad = [f"{what}={col!r}" for what, col in wanted if col not in columns]
    if bad:
        raise ValueError(
            f"{where}: unknown column(s) {', '.join(bad)}; the columns are: {columns}. Name them with "
            "--image-column COL / --caption GRAN=COL (image_field= / caption_fields= in a config)"
        )


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

    def _decode_captions(self, columns: dict[str, list[Any]], n: int) -> list[dict[str, str]]:
        caps: list[dict[str, str]] = [{} for _ in range(n)]
        for g, values in columns.items():
            for row, v in enumerate(values):
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
                    caps[row][g] = v.strip()
        if columns:
            for row, c in enumerate(caps):
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
    """A parquet / CSV / TSV table of images and captions (see the module docstring).

    Args:
        path: the table file. format: ``parquet``, ``csv`` or ``tsv`` (default: from the suffix).
        image_field: column of image paths or bytes (default ``image``).
        caption_fields: granularity -> column (default ``{"alt": "caption"}``).
        image_root: folder relative paths are resolved against (default: the table's folder); cells
            pointing outside it are refused unless ``allow_root`` (a folder or a list) names their folder.
        max_pixels: the pixel cap of :func:`cache.datasets.decode_image`.
    """

    name = "table"

    def __init__(
        self,
        path: str | Path,
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
    ) -> None:
        import pyarrow as pa

        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"table {self.path} does not exist")
        fmt = format or {".parquet": "parquet", ".pq": "parquet", ".tsv": "tsv"}.get(
            self.path.suffix.lower(), "csv"
        )
        if fmt not in TABLE_FORMATS:
            raise ValueError(f"table format must be one of {TABLE_FORMATS}, got {fmt!r}")
        self.format = fmt
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        self._setup(
            str(self.path),
            image_field,
            caption_fields,
            image_size,
            resize,
            min_side,
            captions_encoding,
            max_pixels,
            allow_root,
        )
        cols = [image_field, *dict.fromkeys(self.caption_fields.values())]
        if fmt == "parquet":
            import pyarrow.parquet as pq

            names = pq.read_schema(self.path).names
            check_columns(str(self.path), names, image_field, self.caption_fields)
            table = pq.read_table(self.path, columns=cols)
        else:
            import pyarrow.csv as pcsv

            bad_rows: list[Any] = []

            def skip_row(row: Any) -> str:  # a line with the wrong number of fields: left out, listed
                bad_rows.append(row)
                return "skip"

            # quoted values may hold line breaks (multi-line captions)
            delim = "\t" if fmt == "tsv" else ","
            parse = pcsv.ParseOptions(delimiter=delim, newlines_in_values=True, invalid_row_handler=skip_row)
            try:
                with pcsv.open_csv(self.path, parse_options=parse) as r:
                    names = r.schema.names
            except pa.ArrowInvalid as e:
                raise ValueError(f"{self.path}: cannot read the {fmt} header: {e}") from e
            check_columns(str(self.path), names, image_field, self.caption_fields)
            # read as bytes: a cell that is not valid UTF-8 is then one bad caption, not a failed file
            conv = pcsv.ConvertOptions(include_columns=cols, column_types={c: pa.binary() for c in cols})
            bad_rows.clear()  # the header read may have met the first ones already
            try:
                table = pcsv.read_csv(
                    self.path,
                    parse_options=parse,
                    convert_options=conv,
                    # one thread: the bad rows are reported in file order with their record number
                    read_options=pcsv.ReadOptions(use_threads=False),
                )
            except pa.ArrowInvalid as e:
                raise ValueError(f"{self.path}: cannot parse the {fmt} table: {e}") from e
            for bad in bad_rows:
                # pyarrow counts records (a quoted multi-line value is one), the header being record 1
                line = f"record {bad.number} (the header is 1)" if bad.number is not None else "a record"
                text = bad.text if len(bad.text) <= 200 else bad.text[:200] + "..."
                self.problems.append(
                    {
                        "row": None,
                        "key": None,
                        "kind": "bad_row",
                        "message": f"{self.path} {line}: {bad.actual_columns} field(s) where the header has "
                        f"{bad.expected_columns}; the row is left out (not a sample): {text!r}",
                    }
                )
        self._images = self._image_cells(table.column(image_field).to_pylist())
        self._captions = self._decode_captions(
            {g: table.column(c).to_pylist() for g, c in self.caption_fields.items()}, len(self._images)
        )
        if not self._images:
            raise ValueError(f"table {self.path} has no rows")
        log_problems(str(self.path), self.problems)

    def _image_cells(self, values: list[Any]) -> list[Any]:
        out = []
        for row, v in enumerate(values):
            if isinstance(v, bytes) and self.format != "parquet":  # CSV cells: paths read as bytes
                try:
                    v = v.decode("utf-8")
                except UnicodeDecodeError:
                    v = None
                    self.problems.append(
                        {"row": row, "key": self._key(row), "kind": "bad_encoding",
                         "message": f"{self.path} row {row}: the image path is not valid UTF-8"}
                    )  # fmt: skip
            out.append(v)
        return out

    def _key(self, row: int) -> str:
        return f"{self.path.name}/{row}"

    def identity(self) -> dict[str, Any]:
        return {
            "name": "table",
            "path": str(self.path.resolve()),
            "format": self.format,
            "rows": len(self),
            "image_field": self.image_field,
            "caption_fields": self.caption_fields,
        }

    def source_spec(self) -> dict[str, Any]:
        kw = {
            "path": str(self.path.resolve()),
            "format": self.format,
            "image_field": self.image_field,
            "caption_fields": self.caption_fields,
            "image_root": str(self.image_root.resolve()),
            "captions_encoding": self.encoding,
        }
        return {"name": "table", "kwargs": kw}


@register_dataset("hf")
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
