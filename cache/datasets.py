"""Image sources that stage 1 (and stage 2, and evaluation) read: a registry of named datasets.

Every dataset is a ``torch.utils.data.Dataset`` whose items are dicts:
    ``key``      str, stable source identifier (relative path or ``<name>/<split>/<index>``)
    ``image``    float tensor ``(3, H, W)`` RGB in [0, 1]
    ``captions`` dict granularity -> str (``alt``, ``short``, ``detailed``; any may be missing)
    ``label``    optional int64 ``(H, W)`` per-pixel class map (255 = ignore), for segmentation sets
and expose ``identity() -> dict`` (what a cache records to match data) and ``keys() -> list[str]``.
"""

from __future__ import annotations

import inspect
import io
import json
import logging
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

_DATASETS: dict[str, Callable[..., Dataset]] = {}


def register_dataset(name: str) -> Callable[[Callable[..., Dataset]], Callable[..., Dataset]]:
    def deco(fn: Callable[..., Dataset]) -> Callable[..., Dataset]:
        if name in _DATASETS:
            raise ValueError(f"dataset {name!r} registered twice")
        _DATASETS[name] = fn
        return fn

    return deco


def list_datasets() -> list[str]:
    return sorted(_DATASETS)


def build_dataset(name: str, **kwargs: Any) -> Dataset:
    """Build a registered dataset by name (for example ``"synthetic"``)."""
    if name not in _DATASETS:
        raise ValueError(
            f"unknown dataset {name!r}; registered datasets: {', '.join(list_datasets()) or 'none'}"
        )
    fn = _DATASETS[name]
    try:
        inspect.signature(fn).bind(**kwargs)
    except TypeError as e:
        raise ValueError(f"dataset {name!r}: {e}; it takes {inspect.signature(fn)}") from e
    return fn(**kwargs)


# --------------------------------------------------------------------------------------------------
# Image decoding and resizing, shared by the folder dataset and the extraction driver.
# --------------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
# the Pillow decoders the toolkit opens images with, whatever a file's name says: never EPS / PDF (which
# hand the bytes to Ghostscript), nor any other of Pillow's many plug-ins (docs/cache.md "Threat model")
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
# images with more pixels are refused before they are decoded (a sample problem, ``too_large``): by default
# Pillow's own limit ``PIL.Image.MAX_IMAGE_PIXELS`` (89478485 unless changed), which Pillow itself only warns
# about below twice that. ``max_pixels=`` of every image dataset (``--max-pixels`` in stage 1) sets another
# cap; 0 turns the check off
DEFAULT_MAX_PIXELS = 89_478_485


def pixel_cap(max_pixels: int | None = None) -> int:
    """The pixel cap in force: ``max_pixels``, else Pillow's ``Image.MAX_IMAGE_PIXELS`` (0: none)."""
    if max_pixels is not None:
        return int(max_pixels)
    return int(Image.MAX_IMAGE_PIXELS or 0)


RESIZE_MODES = ("short_crop", "exact", "none")
GRANULARITIES = ("alt", "short", "detailed")


class BadImageError(ValueError):
    """An image that cannot be used; the message says why, ``kind`` names the category
    (``empty``, ``corrupt`` (also: a format the toolkit does not decode), ``truncated``, ``too_small``,
    ``too_large``, ``nonfinite``, ``unreadable``, ``outside_root``)."""

    def __init__(self, message: str, kind: str = "corrupt") -> None:
        super().__init__(message)
        self.kind = kind


def escape_name(name: str) -> str:
    """A file or tar member name as a cache key: unchanged when it is valid UTF-8; otherwise (a name the OS
    handed over with undecodable bytes as surrogates) each such byte written ``\\xNN``.

    The key then stores in HDF5 and JSON; :func:`unescape_name` gives the name's bytes back."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def unescape_name(key: str) -> bytes:
    """The bytes of the name :func:`escape_name` turned into ``key`` (for a key made from a name that was
    not valid UTF-8; ``os.fsdecode`` of the result opens the file)."""
    return re.sub(rb"\\x([0-9a-f]{2})", lambda m: bytes([int(m.group(1), 16)]), key.encode("utf-8"))


def load_image(
    path: str | Path,
    min_side: int = 1,
    *,
    size: int | tuple[int, int] | None = None,
    resize: str = "short_crop",
    max_pixels: int | None = None,
) -> torch.Tensor:
    """Decode an image file to float RGB ``(3, H, W)`` in [0, 1] (``(3, *size)`` when ``size`` is given).

    Converts what can be converted: grayscale, palette, CMYK and 16-bit images become RGB (16-bit
    values are scaled by 1/65535, not clipped); alpha is composited over white; EXIF orientation is
    applied. Raises :class:`BadImageError` for empty, corrupt or truncated files, for formats outside
    :data:`IMAGE_FORMATS`, for images with more than ``max_pixels`` pixels (checked before decoding),
    with non-finite pixels, or with a side shorter than ``min_side`` pixels (for example smaller than
    one patch). See :func:`decode_image` for ``size`` / ``resize``.
    """
    path = Path(path)
    try:
        nbytes = path.stat().st_size
    except OSError as e:
        raise BadImageError(f"cannot read: {e.strerror or e}", "unreadable") from e
    if nbytes == 0:
        raise BadImageError("empty file (0 bytes)", "empty")
    if not path.is_file():
        raise BadImageError("not a regular file", "unreadable")
    return decode_image(path, min_side, size=size, resize=resize, max_pixels=max_pixels)


def load_image_bytes(
    data: bytes | None,
    min_side: int = 1,
    *,
    size: int | tuple[int, int] | None = None,
    resize: str = "short_crop",
    max_pixels: int | None = None,
) -> torch.Tensor:
    """:func:`load_image` for encoded bytes held in memory (a tar member, a table cell): ``(3, H, W)``."""
    if not data:
        raise BadImageError("empty image (0 bytes)", "empty")
    return decode_image(io.BytesIO(data), min_side, size=size, resize=resize, max_pixels=max_pixels)


def decode_image(
    src: str | Path | io.BytesIO,
    min_side: int = 1,
    *,
    size: int | tuple[int, int] | None = None,
    resize: str = "short_crop",
    max_pixels: int | None = None,
) -> torch.Tensor:
    """Decode an opened image source (path or bytes buffer) to ``(3, H, W)``; the one image decoder of
    stage 1, stage 2 and evaluation.

    In order: ``Image.open`` with ``formats=IMAGE_FORMATS`` (the header only); the pixel count against
    ``max_pixels`` (:func:`pixel_cap`; 0: no cap) and the short side against ``min_side``,
    before any pixel is decoded; with ``size`` and ``resize="short_crop"`` the centre region with the
    target's aspect (:func:`center_crop_box`) is cropped in source coordinates and only that region
    becomes float and is resized. So a 16 x 100000 strip costs a 16 x 16 crop, never the 448 x 2.8M
    upsample. The result equals :func:`resize_image` of the whole decoded image bit for bit (stage 2 cuts
    the cache's base image that way), which is why the JPEG decoder is not asked for a reduced scale
    (``Image.draft``): its pixels would differ from the full decode's.
    Any exception of the decoder is this image's problem: a :class:`BadImageError` naming its type.
    """
    cap = pixel_cap(max_pixels)
    target = _as_size(size)
    if resize not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {resize!r}; choose one of {RESIZE_MODES}")
    try:
        with warnings.catch_warnings():
            # our cap below is the limit (an error); Pillow's warning between 1x and 2x its own is noise
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(src, formats=IMAGE_FORMATS)
        with im:
            w, h = im.size
            if cap and w * h > cap:
                raise BadImageError(
                    f"image is {w}x{h} = {w * h} px, above the pixel cap of {cap} px; not decoded (raise the cap "
                    "with max_pixels= / --max-pixels if such images are wanted)",
                    "too_large",
                )
            if min(w, h) < min_side:
                raise BadImageError(
                    f"image is {w}x{h} px, smaller than the minimum side {min_side} px (one patch)",
                    "too_small",
                )
            im.load()
            im = ImageOps.exif_transpose(im)
            if target is not None and resize == "short_crop" and (im.height, im.width) != tuple(target):
                top, left, ch, cw = center_crop_box(im.height, im.width, *target)
                im = im.crop((left, top, left + cw, top + ch))  # source coordinates, before any resize
                resize = "exact"  # the region has the target's aspect: what is left is the resize itself
            arr = _to_rgb_array(im)
    except BadImageError:
        raise
    except Image.UnidentifiedImageError as e:
        raise BadImageError(
            f"corrupt image: not an image in a format the toolkit decodes ({', '.join(IMAGE_FORMATS)}): "
            f"{_msg(e, src)}",
            "corrupt",
        ) from e
    except Exception as e:  # noqa: BLE001 - whatever a decoder raises is this image's problem, not the run's
        kind = "truncated" if "truncated" in str(e).lower() else "corrupt"
        if isinstance(e, Image.DecompressionBombError):
            kind = "too_large"
        raise BadImageError(f"{kind} image ({type(e).__name__}: {_msg(e, src)})", kind) from e
    image = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
    if target is not None:
        image = resize_image(image, target, resize)
    return image


def _msg(e: BaseException, src: Any) -> str:
    return str(e).replace(repr(src), "the image bytes") if isinstance(src, io.BytesIO) else str(e)


def center_crop_box(h: int, w: int, th: int, tw: int) -> tuple[int, int, int, int]:
    """``(top, left, height, width)``: the centre region of an ``h x w`` image with the aspect of ``th x tw``
    (what ``short_crop`` keeps), in source pixels."""
    scale = max(th / h, tw / w)
    ch = min(h, max(1, round(th / scale)))
    cw = min(w, max(1, round(tw / scale)))
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    """PIL image of any common mode -> float32 ``(H, W, 3)`` in [0, 1]; non-finite pixels (a float TIFF
    with NaN or inf) are a :class:`BadImageError` (``nonfinite``), never passed on."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im).astype(np.float32)
        a = a / (65535.0 if mode.startswith("I;16") or a.max() > 255 else 255.0)
        a = np.clip(a, 0.0, 1.0)
        return np.repeat(a[..., None], 3, axis=2)
    if mode == "F":
        a = np.asarray(im, dtype=np.float32)
        bad = ~np.isfinite(a)
        if bad.any():
            raise BadImageError(
                f"{int(bad.sum())} of {a.size} pixels are not finite (NaN or inf) in this float image",
                "nonfinite",
            )
        a = np.clip(a, 0.0, 1.0)
        return np.repeat(a[..., None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, rgba)
    im = im.convert("RGB")
    return np.asarray(im, dtype=np.float32) / 255.0


def resize_image(image: torch.Tensor, size: tuple[int, int], mode: str = "short_crop") -> torch.Tensor:
    """Resize ``(3, H, W)`` to ``size = (height, width)``.

    ``short_crop``: the centre region with the target's aspect (:func:`center_crop_box`) is cut first, in
    source coordinates, then resized (so the upsampled intermediate is never larger than the target);
    ``exact``: resize to ``size`` ignoring the aspect ratio; ``none``: require the size already matches.
    Bicubic with antialiasing, clamped to [0, 1].
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; choose one of {RESIZE_MODES}")
    th, tw = int(size[0]), int(size[1])
    h, w = image.shape[-2:]
    if (h, w) == (th, tw):
        return image
    if mode == "none":
        raise ValueError(
            f"image is {h}x{w} but {th}x{tw} is required and resize='none'; use short_crop or exact"
        )
    if mode == "short_crop":
        top, left, ch, cw = center_crop_box(h, w, th, tw)
        image = image[:, top : top + ch, left : left + cw]
        if (ch, cw) == (th, tw):
            return image.contiguous()
    out = F.interpolate(
        image[None].float(), size=(th, tw), mode="bicubic", antialias=True, align_corners=False
    )[0]
    return out.clamp_(0.0, 1.0).contiguous()


def _as_size(size: int | tuple[int, int] | list[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    if len(size) != 2:
        raise ValueError(f"image size must be an int or (height, width), got {size!r}")
    return (int(size[0]), int(size[1]))


def read_captions(path: str | Path, encoding: str = "utf-8") -> tuple[dict[str, dict[str, str]], list[str]]:
    """Read a JSON-lines captions file; returns ``(captions by image relpath, problems)``.

    Each line is ``{"image": relpath, "alt": ..., "short": ..., "detailed": ...}`` or
    ``{"image": relpath, "captions": {granularity: text}}``. Lines that are not valid text in
    ``encoding`` or not valid JSON are never fatal and never silent: they are listed in ``problems``
    (file and line number) and the captions of that line count as missing.
    """
    path = Path(path)
    captions: dict[str, dict[str, str]] = {}
    problems: list[str] = []
    bad_encoding: list[int] = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode(encoding)
            except UnicodeDecodeError:
                bad_encoding.append(lineno)
                continue
            line = line.strip().lstrip("\ufeff")
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(
                    f"{path}:{lineno}: not valid JSON ({e.msg}); captions of that line treated as missing"
                )
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("image"), str):
                problems.append(f"{path}:{lineno}: no 'image' string field; line ignored")
                continue
            caps = rec.get("captions", {k: v for k, v in rec.items() if k != "image"})
            if not isinstance(caps, dict):
                problems.append(f"{path}:{lineno}: 'captions' is not an object; line ignored")
                continue
            entry = captions.setdefault(rec["image"].replace("\\", "/"), {})
            for gran, text in caps.items():
                if isinstance(text, str):
                    entry[str(gran)] = text
                elif text is not None:
                    problems.append(f"{path}:{lineno}: caption {gran!r} is not a string; treated as missing")
    if bad_encoding:
        lines = ", ".join(map(str, bad_encoding[:10])) + (" ..." if len(bad_encoding) > 10 else "")
        problems.append(
            f"{path}: {len(bad_encoding)} line(s) are not valid {encoding} (lines {lines}); their captions are "
            "treated as missing. If the file uses another encoding pass captions_encoding (e.g. 'latin-1')"
        )
    for p in problems:
        logger.warning(p)
    return captions, problems


def log_problems(where: str, problems: list[dict[str, Any]], show: int = 10) -> None:
    """Log each of the first ``show`` problems and a count by kind (all are kept in ``problems``)."""
    for p in problems[:show]:
        logger.warning("%s", p["message"])
    if problems:
        kinds: dict[str, int] = {}
        for p in problems:
            kinds[p["kind"]] = kinds.get(p["kind"], 0) + 1
        logger.warning(
            "%s: %d problem(s) (%s); all are listed in the cache's dataset_problems.jsonl",
            where,
            len(problems),
            ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())),
        )


def write_problems(out_dir: str | Path, dataset: Any) -> Path | None:
    """Write every problem a dataset found while indexing (``dataset.problems``: dicts with ``kind`` and
    ``message``, plus ``shard``/``row``/``key`` where known) to ``out_dir/dataset_problems.jsonl``."""
    problems = list(getattr(dataset, "problems", None) or [])
    if not problems:
        return None
    path = Path(out_dir) / "dataset_problems.jsonl"
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(p, default=str) + "\n" for p in problems), encoding="utf-8")
    tmp.replace(path)
    return path


@register_dataset("folder")
class ImageFolderDataset(Dataset):
    """All jpg/jpeg/png/webp files under ``root`` (recursive), in sorted relative-path order.

    Args:
        root: the image folder.
        captions: optional JSON-lines captions file (see :func:`read_captions`).
        image_size: int or ``(height, width)``; ``None`` keeps each image's own size.
        resize: ``short_crop`` (short side resize + center crop) or ``exact``; see :func:`resize_image`.
        min_side: images with a side shorter than this are bad (the extractor sets one patch).
        captions_encoding: text encoding of the captions file.
        max_pixels: images with more pixels are bad, refused before decoding (default
            :func:`pixel_cap`: Pillow's ``Image.MAX_IMAGE_PIXELS``; 0: no cap).

    ``__getitem__`` raises :class:`BadImageError` for unusable files (the extraction driver records
    and skips them; it never drops one silently). A file name that is not valid UTF-8 is kept, its key
    escaped (:func:`escape_name`); a key that two names share (an escaped name and a real name spelled
    like it) is listed in :attr:`problems` and only the first is used.
    """

    def __init__(
        self,
        root: str | Path,
        captions: str | Path | None = None,
        image_size: int | tuple[int, int] | None = None,
        resize: str = "short_crop",
        min_side: int = 1,
        captions_encoding: str = "utf-8",
        max_pixels: int | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"image folder {self.root} does not exist or is not a directory")
        if resize not in RESIZE_MODES:
            raise ValueError(f"unknown resize mode {resize!r}; choose one of {RESIZE_MODES}")
        self.image_size = _as_size(image_size)
        self.resize = resize
        self.min_side = int(min_side)
        self.max_pixels = max_pixels
        self.problems: list[dict[str, Any]] = []
        files = sorted(
            (escape_name(rel), rel)
            for rel in (
                p.relative_to(self.root).as_posix()
                for p in self.root.rglob("*")
                if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
            )
        )
        self._files: dict[str, str] = {}  # key -> relative path as the OS spells it
        for key, rel in files:
            if key in self._files:
                self.problems.append(
                    {
                        "key": key,
                        "kind": "duplicate_name",
                        "message": f"{self.root}: the file name {rel!r} has the same key {key!r} as another file "
                        f"({self._files[key]!r}, kept); rename one of them to cache both",
                    }
                )
                continue
            if key != rel:
                self.problems.append(
                    {
                        "key": key,
                        "kind": "escaped_name",
                        "message": f"{self.root}: a file name is not valid UTF-8; kept under the escaped key {key!r}",
                    }
                )
            self._files[key] = rel
        self._keys = list(self._files)
        log_problems(str(self.root), self.problems)
        if not self._keys:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {self.root}")
        self.captions_path = None if captions is None else Path(captions)
        self.captions: dict[str, dict[str, str]] = {}
        self.caption_problems: list[str] = []
        if self.captions_path is not None:
            self.captions, self.caption_problems = read_captions(self.captions_path, captions_encoding)
            unknown = set(self.captions) - set(self._keys)
            if unknown:
                msg = (
                    f"{self.captions_path}: {len(unknown)} caption record(s) name images not found under "
                    f"{self.root} (e.g. {sorted(unknown)[0]!r}); they are ignored"
                )
                logger.warning(msg)
                self.caption_problems.append(msg)

    def __len__(self) -> int:
        return len(self._keys)

    def keys(self) -> list[str]:
        return list(self._keys)

    def identity(self) -> dict[str, Any]:
        return {
            "name": "folder",
            "root": str(self.root.resolve()),
            "num_images": len(self._keys),
            "captions": None if self.captions_path is None else str(self.captions_path.resolve()),
            "image_size": None if self.image_size is None else list(self.image_size),
            "resize": self.resize,
        }

    def source_spec(self) -> dict[str, Any]:
        """The dataset spec stage 1 records in the cache (absolute paths; see :mod:`cache.dataset_spec`)."""
        kw: dict[str, Any] = {"root": str(self.root.resolve())}
        if self.captions_path is not None:
            kw["captions"] = str(self.captions_path.resolve())
        return {"name": "folder", "kwargs": kw}

    def __getitem__(self, index: int) -> dict[str, Any]:
        key = self._keys[index]
        try:
            image = load_image(
                self.root / self._files[key],
                self.min_side,
                size=self.image_size,
                resize=self.resize,
                max_pixels=self.max_pixels,
            )
        except BadImageError as e:
            raise BadImageError(f"{self.root / key}: {e}", e.kind) from e
        return {"key": key, "image": image, "captions": dict(self.captions.get(key, {}))}
