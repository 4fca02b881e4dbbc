"""Labelled datasets for zero-shot segmentation and captioned sets for retrieval.

Registered in :mod:`cache.datasets` (guarded, so importing twice is harmless):
  ``ade20k``      ADEChallengeData2016 layout: ``images/<split>/*.jpg`` + ``annotations/<split>/*.png``;
                  label 0 -> ignore (255), others minus 1; the 150 ADE class names are built in.
  ``seg_folder``  generic: an image folder, a label-PNG folder (same file stems) and a class-name file
                  (one class per line in label-id order, synonyms after commas). VOC / Pascal Context
                  conversions fit here (``label_offset`` / ``zero_is_ignore`` cover their conventions).
  ``caption_folder``  images + ``captions.jsonl`` for image-text retrieval.
The built-in ``synthetic`` dataset (``cache/synthetic.py``) is used through :func:`load_eval_dataset`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from cache.datasets import BadImageError, pixel_cap
from cache.datasets import load_image as decode_file
from cache.tables import ALLOW_ROOT_FIX, allowed_roots, contained_path

from .metrics import IGNORE_INDEX
from .templates import load_class_names

logger = logging.getLogger(__name__)

# The 150 ADE20K (SceneParsing) class names, as the official TIPS notebook lists them.
ADE150_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)  # fmt: skip

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def load_image(path: Path, max_pixels: int | None = None) -> torch.Tensor:
    """RGB ``(3, H, W)`` float in [0, 1], through the toolkit's one decoder (:func:`cache.datasets.load_image`:
    the listed formats only, the pixel cap checked before decoding, non-finite pixels refused). A bad image
    is a :class:`cache.datasets.BadImageError` naming the file; the evaluation skips and lists it."""
    try:
        return decode_file(path, max_pixels=max_pixels)
    except BadImageError as e:
        raise BadImageError(
            f"image {path} cannot be used ({e}); replace it or remove it with its label", e.kind
        ) from e


def load_label(path: Path) -> torch.Tensor:
    """Label PNG (palette or grayscale, 8 or 16 bit) -> ``(H, W)`` int64 of raw ids."""
    try:
        with Image.open(path, formats=("PNG",)) as im:
            cap = pixel_cap()
            if cap and im.width * im.height > cap:
                raise ValueError(
                    f"label {path} is {im.width}x{im.height} px, above the pixel cap {cap}; not decoded"
                )
            if im.mode not in ("L", "P", "I", "I;16"):
                raise ValueError(
                    f"label {path} has mode {im.mode}; label maps must be single-channel (L, P or I;16) with class "
                    "ids as pixel values, not colour-coded RGB"
                )
            arr = np.asarray(im).astype(np.int64)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder error names the file
        raise ValueError(
            f"label {path} cannot be read ({type(e).__name__}: {e}); re-export it as a single-channel PNG"
        ) from e
    return torch.from_numpy(arr)


def check_class_names(synonyms: list[list[str]], source: str) -> None:
    """Refuse a class list with a name twice (two label ids would get the same text embedding)."""
    seen: dict[str, int] = {}
    dups = []
    for i, names in enumerate(synonyms):
        key = names[0].strip().lower()
        if key in seen:
            dups.append(f"{names[0]!r} (label ids {seen[key]} and {i})")
        seen.setdefault(key, i)
    if dups:
        raise ValueError(
            f"class names in {source} are not unique: {len(dups)} duplicate(s): {', '.join(dups[:10])}; each line is "
            "one label id, so a repeated name means two ids share a text embedding. Rename one (or merge the ids)"
        )


def check_label(
    label: torch.Tensor, image_hw: tuple[int, int], num_classes: int, label_path: Path, image_path: Path
) -> None:
    """A mapped label ``(H, W)`` must have the image's size and ids in ``0..num_classes-1`` or the ignore id."""
    if tuple(label.shape) != tuple(image_hw):
        raise ValueError(
            f"label {label_path} is {tuple(label.shape)} but image {image_path} is {tuple(image_hw)} (H, W); label "
            "maps must have the image's size (re-export the label PNG at the image resolution, nearest-neighbour)"
        )
    bad = (label != IGNORE_INDEX) & ((label < 0) | (label >= num_classes))
    if bool(bad.any()):
        ids, counts = torch.unique(label[bad], return_counts=True)
        shown = ", ".join(f"{int(i)} ({int(c)} px)" for i, c in zip(ids[:10], counts[:10]))
        raise ValueError(
            f"label {label_path}: ids {shown} are outside 0..{num_classes - 1} and are not the ignore id "
            f"{IGNORE_INDEX}: the class list and the label ids disagree; check the class-name file (one line per "
            "label id) and label_offset / zero_is_ignore (ADE20K: 0 -> ignore, others minus 1)"
        )


def map_labels(
    raw: torch.Tensor, *, zero_is_ignore: bool, label_offset: int, ignore_index: int = IGNORE_INDEX
):
    """``zero_is_ignore``: 0 -> ignore and the rest shifted by ``label_offset`` (ADE: -1); 255 stays ignore."""
    ignore = raw == ignore_index
    if zero_is_ignore:
        ignore |= raw == 0
    out = raw + label_offset
    return torch.where(ignore, torch.full_like(raw, ignore_index), out)


class SegmentationFolder(Dataset):
    """Images + label PNGs matched by file stem, plus class names.

    Items: ``key`` (image path relative to root), ``image`` (3,H,W) [0,1], ``captions`` {}, ``label`` (H,W) int64.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        images: str = "images",
        labels: str = "labels",
        class_names: str | Path | list[str] | list[list[str]] = "classes.txt",
        label_offset: int = 0,
        zero_is_ignore: bool = False,
        object_class_ids: list[int] | None = None,
        object_classes_file: str | Path | None = None,
        max_images: int | None = None,
        name: str = "seg_folder",
    ) -> None:
        self.root = Path(root)
        self.image_dir = self.root / images
        self.label_dir = self.root / labels
        for d, what in ((self.image_dir, "image"), (self.label_dir, "label")):
            if not d.is_dir():
                raise ValueError(f"{what} folder {d} does not exist")
        if isinstance(class_names, (str, Path)):
            p = Path(class_names)
            p = p if p.is_absolute() or p.is_file() else self.root / p
            self.class_synonyms = load_class_names(p)
        else:
            self.class_synonyms = [[c] if isinstance(c, str) else list(c) for c in class_names]
        check_class_names(
            self.class_synonyms, str(class_names) if isinstance(class_names, (str, Path)) else "class_names"
        )
        self.class_names = [c[0] for c in self.class_synonyms]
        self.label_offset = label_offset
        self.zero_is_ignore = zero_is_ignore
        self.name = name
        imgs = sorted(p for p in self.image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS)
        labels_by_stem = {p.stem: p for p in self.label_dir.iterdir() if p.suffix.lower() == ".png"}
        missing = [p.name for p in imgs if p.stem not in labels_by_stem]
        if missing:
            raise ValueError(
                f"{len(missing)} images in {self.image_dir} have no label PNG in {self.label_dir} "
                f"(first: {missing[:5]}); every image needs <stem>.png"
            )
        if not imgs:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTS)}) in {self.image_dir}")
        stems = {p.stem for p in imgs}
        self.unmatched_labels = sorted(p.name for s, p in labels_by_stem.items() if s not in stems)
        if self.unmatched_labels:
            logger.warning(
                "%d label PNG(s) in %s have no image in %s and are not used: %s%s",
                len(self.unmatched_labels),
                self.label_dir,
                self.image_dir,
                ", ".join(self.unmatched_labels[:10]),
                " ..." if len(self.unmatched_labels) > 10 else "",
            )
        if max_images is not None:
            imgs = imgs[:max_images]
        self.items = [(p, labels_by_stem[p.stem]) for p in imgs]
        if object_classes_file is not None:
            objs = [c[0] for c in load_class_names(object_classes_file)]
            unknown = [o for o in objs if o not in self.class_names]
            if unknown:
                raise ValueError(
                    f"object classes {unknown[:5]} in {object_classes_file} are not in the class list"
                )
            object_class_ids = [self.class_names.index(o) for o in objs]
        self.object_class_ids = object_class_ids

    def __len__(self) -> int:
        return len(self.items)

    def keys(self) -> list[str]:
        return [str(p.relative_to(self.root)) for p, _ in self.items]

    def identity(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "root": str(self.root),
            "num_images": len(self),
            "num_classes": len(self.class_names),
            "label_offset": self.label_offset,
            "zero_is_ignore": self.zero_is_ignore,
        }

    def __getitem__(self, i: int) -> dict[str, Any]:
        ip, lp = self.items[i]
        raw = load_label(lp)
        label = map_labels(raw, zero_is_ignore=self.zero_is_ignore, label_offset=self.label_offset)
        image = load_image(ip)
        check_label(label, tuple(image.shape[-2:]), len(self.class_names), lp, ip)
        return {
            "key": str(ip.relative_to(self.root)),
            "image": image,
            "captions": {},
            "label": label,
        }


class ADE20K(SegmentationFolder):
    """ADEChallengeData2016: ``images/<split>/*.jpg``, ``annotations/<split>/*.png``; 0 -> ignore, others -1."""

    def __init__(self, root: str | Path, split: str = "validation", max_images: int | None = None) -> None:
        super().__init__(
            root,
            images=f"images/{split}",
            labels=f"annotations/{split}",
            class_names=list(ADE150_CLASSES),
            label_offset=-1,
            zero_is_ignore=True,
            max_images=max_images,
            name="ade20k",
        )
        self.split = split

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "split": self.split}


class CaptionFolder(Dataset):
    """Images with captions for retrieval: ``root/captions.jsonl``, one JSON object per line:
    ``{"image": "relative/path.jpg", "caption": "..."}`` or ``{"image": ..., "captions": {"alt": ..., "short": ...}}``."""

    def __init__(
        self,
        root: str | Path,
        captions: str = "captions.jsonl",
        max_images: int | None = None,
        allow_root: str | list[str] | None = None,
    ) -> None:
        self.root = Path(root)
        path = self.root / captions
        if not path.is_file():
            raise ValueError(f"caption file {path} does not exist")
        roots = allowed_roots(self.root, allow_root)
        rows = []
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            obj = json.loads(line)
            if not isinstance(obj, dict) or "image" not in obj or not ("caption" in obj or "captions" in obj):
                raise ValueError(f"{path}:{lineno} needs 'image' and 'caption' (or 'captions')")
            caps = obj.get("captions") or {"alt": obj["caption"]}
            # a line naming a file outside the folder (absolute, or with ..) is refused unless allowed
            img = contained_path(str(obj["image"]), self.root, roots, f"{path}:{lineno}", ALLOW_ROOT_FIX)
            if not img.is_file():
                raise ValueError(f"{path}:{lineno}: image {img} does not exist")
            rows.append((obj["image"], caps))
        self.rows = rows[:max_images] if max_images is not None else rows

    def __len__(self) -> int:
        return len(self.rows)

    def keys(self) -> list[str]:
        return [r[0] for r in self.rows]

    def identity(self) -> dict[str, Any]:
        return {"name": "caption_folder", "root": str(self.root), "num_images": len(self)}

    def __getitem__(self, i: int) -> dict[str, Any]:
        rel, caps = self.rows[i]
        return {"key": rel, "image": load_image(self.root / rel), "captions": dict(caps)}


def _register() -> None:
    from cache.datasets import list_datasets, register_dataset

    known = set(list_datasets())
    for name, fn in (
        ("ade20k", ADE20K),
        ("seg_folder", SegmentationFolder),
        ("caption_folder", CaptionFolder),
    ):
        if name not in known:
            register_dataset(name)(fn)


_register()


def load_eval_dataset(name: str, **kwargs: Any) -> Dataset:
    """Build a dataset through the :mod:`cache.datasets` registry (importing ``cache.synthetic`` when present)."""
    from cache.datasets import build_dataset, list_datasets

    if name not in list_datasets():
        try:  # the built-in synthetic set lives in another package; register it on demand
            import cache.synthetic  # noqa: F401
        except ImportError:
            pass
    return build_dataset(name, **kwargs)


def build_eval_dataset(name: str, kwargs: dict[str, Any]) -> Dataset:
    """A registered evaluation dataset (``synthetic``, ``ade20k``, ``seg_folder``, ...) or a dataset spec
    (``wds:...``, ``parquet:...``, ``hf:...``), as ``tipsdistill-eval --dataset`` takes them."""
    from cache.dataset_spec import build_from_spec, is_shorthand

    return build_from_spec(name, **kwargs) if is_shorthand(name) else load_eval_dataset(name, **kwargs)
