"""Labelled datasets for zero-shot segmentation and captioned sets for retrieval.

Registered in :mod:`cache.datasets` (guarded, so importing twice is harmless):
  ``ade20k``      ADEChallengeData2016 layout: ``images/<split>/*.jpg`` + ``annotations/<split>/*.png``;
                  label 0 -> ignore (255), others minus 1; the 150 ADE class names are built in.
  ``seg_folder``  generic: an image folder, a label-PNG folder (same sample ids) and a class-name file
                  (one class per line in label-id order, synonyms after commas); optional split file,
                  image / label file-name suffixes and subfolders (mmsegmentation's ``ann_file``,
                  ``img_suffix``, ``seg_map_suffix``). ``label_offset`` / ``zero_is_ignore`` cover the
                  VOC / Pascal Context / ADE conventions. The standard benchmarks built on it
                  (``voc21``, ``pc59``, ``coco_stuff``, ...) live in :mod:`.benchmarks`.
  ``caption_folder``  images + ``captions.jsonl`` for image-text retrieval.
  ``coco_karpathy`` / ``flickr30k_karpathy`` / ``karpathy``  Karpathy's split files (``dataset_coco.json``,
                  ``dataset_flickr30k.json``) + the image folders: standard 5-caption retrieval.
  ``imagenet``    ImageNet-1k validation (wnid folders, or the flat folder + ``LOC_val_solution.csv``) for
                  zero-shot classification.
The built-in ``synthetic`` dataset (``cache/synthetic.py``) is used through :func:`load_eval_dataset`.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from tipsdistill.cache.datasets import BadImageError, pixel_cap
from tipsdistill.cache.datasets import load_image as decode_file
from tipsdistill.cache.tables import ALLOW_ROOT_FIX, allowed_roots, contained_path

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


def _ends_with(name: str, suffix: str) -> bool:
    return name.lower().endswith(suffix.lower())


def list_files_by_id(folder: Path, suffixes: tuple[str, ...], *, recursive: bool = False) -> dict[str, Path]:
    """Files of ``folder`` whose name ends with one of ``suffixes`` (case-insensitive), keyed by sample id:
    the path relative to ``folder`` (POSIX) without the suffix; ``recursive`` also looks in subfolders
    (Cityscapes' ``<split>/<city>/<name>_leftImg8bit.png``)."""
    out: dict[str, Path] = {}
    shadowed: list[str] = []
    for p in sorted(folder.rglob("*") if recursive else folder.iterdir()):
        if not p.is_file():
            continue
        suffix = next((s for s in suffixes if _ends_with(p.name, s)), None)
        if suffix is not None:
            rel = p.relative_to(folder).as_posix()
            sid = rel[: len(rel) - len(suffix)]
            if sid in out:
                shadowed.append(rel)
            else:
                out[sid] = p
    if shadowed:
        logger.warning(
            "%d file(s) in %s share a sample id with an earlier file and are not used: %s%s",
            len(shadowed),
            folder,
            ", ".join(shadowed[:10]),
            " ..." if len(shadowed) > 10 else "",
        )
    return out


def read_split_file(path: Path) -> list[str]:
    """Sample ids of a split file (mmsegmentation's ``ann_file``: one id per line, no extension).

    Blank lines are skipped; an id listed twice is kept once (logged with the count)."""
    if not path.is_file():
        raise ValueError(
            f"split file {path} does not exist; point root at the folder that holds it (e.g. VOCdevkit/VOC2012 "
            "for ImageSets/Segmentation/val.txt) or pass split_file="
        )
    ids: list[str] = []
    seen: set[str] = set()
    repeated: list[str] = []
    for line in path.read_text().splitlines():
        sid = line.strip()
        if not sid:
            continue
        if sid in seen:
            repeated.append(sid)
            continue
        seen.add(sid)
        ids.append(sid)
    if not ids:
        raise ValueError(f"split file {path} names no images (one image id per line, e.g. 2007_000033)")
    if repeated:
        logger.warning(
            "split file %s names %d id(s) more than once; each image is evaluated once: %s%s",
            path,
            len(repeated),
            ", ".join(repeated[:10]),
            " ..." if len(repeated) > 10 else "",
        )
    return ids


class SegmentationFolder(Dataset):
    """Images + label PNGs matched by sample id, plus class names.

    A sample id is an image's path under ``images`` without its suffix; its label is
    ``labels/<id><label_suffix>``. ``image_suffix`` ``None`` accepts any image extension (id = stem);
    a string (``".jpg"``, ``"_leftImg8bit.png"``) selects the images that end with it. ``recursive``
    looks in subfolders. ``split_file`` (relative to ``root`` unless absolute; one id per line, as
    mmsegmentation's ``ann_file``) restricts the set to the ids it names, in its order: an id without an
    image is an error; images outside the split are counted (``outside_split``) and not evaluated.

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
        background_class_ids: list[int] | None = None,
        image_suffix: str | None = None,
        label_suffix: str = ".png",
        recursive: bool = False,
        split_file: str | Path | None = None,
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
        self.image_suffix = image_suffix
        self.label_suffix = label_suffix
        self.name = name
        image_suffixes = IMAGE_EXTS if image_suffix is None else (image_suffix,)
        images_by_id = list_files_by_id(self.image_dir, image_suffixes, recursive=recursive)
        labels_by_id = list_files_by_id(self.label_dir, (label_suffix,), recursive=recursive)
        self.split_file: Path | None = None
        self.outside_split: list[str] = []
        if split_file is not None:
            sp = Path(split_file)
            self.split_file = sp if sp.is_absolute() else self.root / sp
            ids = read_split_file(self.split_file)
            absent = [i for i in ids if i not in images_by_id]
            if absent:
                raise ValueError(
                    f"{len(absent)} of the {len(ids)} images named in split file {self.split_file} are not in "
                    f"{self.image_dir} (first: {absent[:5]}; looked for <id>{'|'.join(image_suffixes)}); the "
                    "download is incomplete or root / split point at another dataset"
                )
            chosen = set(ids)
            self.outside_split = sorted(images_by_id[i].name for i in images_by_id if i not in chosen)
            if self.outside_split:
                logger.info(
                    "%d image(s) in %s are outside split %s and not evaluated: %s%s",
                    len(self.outside_split),
                    self.image_dir,
                    self.split_file.name,
                    ", ".join(self.outside_split[:5]),
                    " ..." if len(self.outside_split) > 5 else "",
                )
            labels_by_id = {i: p for i, p in labels_by_id.items() if i in chosen}
        else:
            ids = sorted(images_by_id, key=lambda i: images_by_id[i])
        if not ids:
            raise ValueError(f"no images ({', '.join(image_suffixes)}) in {self.image_dir}")
        missing = [images_by_id[i].name for i in ids if i not in labels_by_id]
        if missing:
            raise ValueError(
                f"{len(missing)} images in {self.image_dir} have no label PNG in {self.label_dir} "
                f"(first: {missing[:5]}); every image needs <id>{label_suffix}"
            )
        wanted = set(ids)
        self.unmatched_labels = sorted(p.name for i, p in labels_by_id.items() if i not in wanted)
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
            ids = ids[:max_images]
        self.items = [(images_by_id[i], labels_by_id[i]) for i in ids]
        if object_classes_file is not None:
            objs = [c[0] for c in load_class_names(object_classes_file)]
            unknown = [o for o in objs if o not in self.class_names]
            if unknown:
                raise ValueError(
                    f"object classes {unknown[:5]} in {object_classes_file} are not in the class list"
                )
            object_class_ids = [self.class_names.index(o) for o in objs]
        for what, ids_ in (
            ("object_class_ids", object_class_ids),
            ("background_class_ids", background_class_ids),
        ):
            bad = [i for i in ids_ or () if not 0 <= int(i) < len(self.class_names)]
            if bad:
                raise ValueError(f"{what} {bad[:5]} are not class ids (0..{len(self.class_names) - 1})")
        self.object_class_ids = object_class_ids
        self.background_class_ids = background_class_ids

    def __len__(self) -> int:
        return len(self.items)

    def keys(self) -> list[str]:
        return [str(p.relative_to(self.root)) for p, _ in self.items]

    def identity(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "root": str(self.root),
            "num_images": len(self),
            "num_classes": len(self.class_names),
            "label_offset": self.label_offset,
            "zero_is_ignore": self.zero_is_ignore,
        }
        if self.image_suffix is not None or self.label_suffix != ".png":
            out.update(image_suffix=self.image_suffix, label_suffix=self.label_suffix)
        if self.split_file is not None:
            sp = self.split_file
            out.update(
                split_file=str(sp.relative_to(self.root)) if sp.is_relative_to(self.root) else str(sp),
                num_outside_split=len(self.outside_split),
            )
        return out

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


# ------------------------------------------------------------------------- Karpathy caption splits
KARPATHY_JSON = {"coco_karpathy": "dataset_coco.json", "flickr30k_karpathy": "dataset_flickr30k.json"}
KARPATHY_SPLITS = ("train", "restval", "val", "test")
MISSING_POLICIES = ("error", "skip")


def _find_file(root: Path, name: str, levels: int = 4) -> Path | None:
    """``root/name`` or the same name in one of ``root``'s first ``levels`` parents (download layouts keep
    annotation files next to or above the image folder)."""
    for d in [root, *list(root.parents)[:levels]]:
        if (d / name).is_file():
            return d / name
    return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a readable JSON file ({e}); download it again") from e


class KarpathyCaptions(Dataset):
    """One split of Karpathy's caption files (``dataset_coco.json``, ``dataset_flickr30k.json``): every image
    of the split with exactly the captions the file lists (5 per image; a few COCO images have 6 or 7).

    ``json`` (absolute, or relative to ``root``; default ``root/dataset_<name>.json``): fields
    ``images[i].split`` (train, restval, val, test), ``filepath`` (COCO: ``val2014``; absent for Flickr30k),
    ``filename``, ``sentences[j].raw``. Images are read from ``root/<images>/<filepath>/<filename>``
    (``images`` default: ``flickr30k-images`` when ``root`` has that folder and the file gives no filepath,
    else ``root`` itself). ``split``: one of :data:`KARPATHY_SPLITS` or several joined by ``+``
    (``train+restval``). Images listed but absent on disk are an error (``missing="error"``) or are left
    out and listed in :meth:`identity` (``missing="skip"``); images without captions are always left out
    and listed.

    Items: ``key`` (image path relative to the image folder), ``image`` ``(3, H, W)`` [0, 1], ``captions``
    ``{"alt": <first caption>}`` (the dataset contract: one string per granularity). Retrieval reads every
    caption through :meth:`caption_sets`.
    """

    def __init__(
        self,
        root: str | Path,
        json: str | Path | None = None,
        split: str = "test",
        images: str | Path | None = None,
        missing: str = "error",
        max_images: int | None = None,
        name: str = "karpathy",
    ) -> None:
        self.root = Path(root)
        self.name = name
        if not self.root.is_dir():
            raise ValueError(f"{name}: root {self.root} is not a folder (the folder holding the images)")
        if missing not in MISSING_POLICIES:
            raise ValueError(f"{name}: missing={missing!r}; choose one of {MISSING_POLICIES}")
        self.json_path = self._json_path(json)
        self.split = split
        splits = [s.strip() for s in split.split("+") if s.strip()]
        bad = [s for s in splits if s not in KARPATHY_SPLITS]
        if bad or not splits:
            raise ValueError(
                f"{name}: split {split!r}; use one of {KARPATHY_SPLITS} (or several joined by '+')"
            )
        data = _read_json(self.json_path)
        entries = data.get("images") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise ValueError(
                f"{self.json_path} has no 'images' list; a Karpathy split file (dataset_coco.json / "
                "dataset_flickr30k.json) is expected"
            )
        rows = []
        for i, e in enumerate(entries):
            where = f"{self.json_path}: images[{i}]"
            if not isinstance(e, dict) or not isinstance(e.get("filename"), str) or "split" not in e:
                raise ValueError(f"{where} needs 'filename' and 'split' (a Karpathy split file is expected)")
            if e["split"] not in splits:
                continue
            sents = e.get("sentences") or []
            if not isinstance(sents, list) or any(
                not isinstance(t, dict) or not isinstance(t.get("raw"), str) for t in sents
            ):
                raise ValueError(f"{where} ({e['filename']}): 'sentences' must be a list of {{'raw': str}}")
            rel = Path(e.get("filepath") or "") / e["filename"]
            rows.append((rel, [t["raw"].strip() for t in sents]))
        if not rows:
            found = sorted({str(e.get("split")) for e in entries if isinstance(e, dict)})
            raise ValueError(f"{self.json_path} has no image in split {split!r} (splits present: {found})")
        has_filepath = any(str(r[0].parent) != "." for r in rows)
        if images is not None:
            self.image_root = Path(images) if Path(images).is_absolute() else self.root / images
        elif not has_filepath and (self.root / "flickr30k-images").is_dir():
            self.image_root = self.root / "flickr30k-images"
        else:
            self.image_root = self.root
        self.skipped: list[dict[str, str]] = []
        no_caps = [r for r in rows if not r[1]]
        self.skipped += [{"image": str(r[0]), "reason": "no captions"} for r in no_caps]
        rows = [r for r in rows if r[1]]
        absent = [r for r in rows if not (self.image_root / r[0]).is_file()]
        if absent and missing == "error":
            raise ValueError(
                f"{name}: {len(absent)} of {len(rows)} {split} images listed in {self.json_path} are not in "
                f"{self.image_root} (first: {[str(r[0]) for r in absent[:5]]}); point root= (and images=) at the "
                "folder holding them, or pass missing='skip' to evaluate without them (they are listed)"
            )
        absent_set = {r[0] for r in absent}
        self.skipped += [{"image": str(r[0]), "reason": "image file missing"} for r in absent]
        rows = [r for r in rows if r[0] not in absent_set]
        if self.skipped:
            logger.warning(
                "%s: %d %s image(s) left out: %s%s",
                name,
                len(self.skipped),
                split,
                ", ".join(f"{s['image']} ({s['reason']})" for s in self.skipped[:10]),
                " ..." if len(self.skipped) > 10 else "",
            )
        if not rows:
            raise ValueError(f"{name}: no usable image in split {split!r} of {self.json_path}")
        self.rows = rows[:max_images] if max_images is not None else rows

    def _json_path(self, json_arg: str | Path | None) -> Path:
        if json_arg is not None:
            p = Path(json_arg)
            p = p if p.is_absolute() or p.is_file() else self.root / p
            if not p.is_file():
                raise ValueError(f"{self.name}: caption file {p} does not exist")
            return p
        default = KARPATHY_JSON.get(self.name)
        if default is not None:
            found = _find_file(self.root, default)
            if found is not None:
                return found
            raise ValueError(
                f"{self.name}: {default} is neither in {self.root} nor in its parents; pass json= (the Karpathy "
                "split file, e.g. caption_datasets/dataset_coco.json)"
            )
        cands = sorted(self.root.glob("dataset_*.json"))
        if len(cands) != 1:
            raise ValueError(
                f"{self.name}: pass json= (found {len(cands)} dataset_*.json files in {self.root}: "
                f"{[c.name for c in cands]})"
            )
        return cands[0]

    def __len__(self) -> int:
        return len(self.rows)

    def keys(self) -> list[str]:
        return [str(r[0]) for r in self.rows]

    def caption_sets(self) -> dict[str, tuple[list[str], list[int]]]:
        """``{"captions": (texts, image_index)}``: every caption of every image, and the row of its image."""
        texts, index = [], []
        for i, (_, caps) in enumerate(self.rows):
            texts += caps
            index += [i] * len(caps)
        return {"captions": (texts, index)}

    def identity(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "root": str(self.root),
            "json": str(self.json_path),
            "split": self.split,
            "num_images": len(self),
            "num_captions": sum(len(r[1]) for r in self.rows),
            "num_skipped": len(self.skipped),
            "skipped": self.skipped[:100],
        }

    def __getitem__(self, i: int) -> dict[str, Any]:
        rel, caps = self.rows[i]
        return {"key": str(rel), "image": load_image(self.image_root / rel), "captions": {"alt": caps[0]}}


def coco_karpathy(root: str | Path, **kwargs: Any) -> KarpathyCaptions:
    """COCO 2014 Karpathy split (test: the 5k images of ``val2014``); ``root`` holds ``val2014/`` (and
    ``train2014/`` for the training splits)."""
    return KarpathyCaptions(root, name="coco_karpathy", **kwargs)


def flickr30k_karpathy(root: str | Path, **kwargs: Any) -> KarpathyCaptions:
    """Flickr30k Karpathy split (test: 1k images); ``root`` holds the images or ``flickr30k-images/``."""
    return KarpathyCaptions(root, name="flickr30k_karpathy", **kwargs)


# ------------------------------------------------------------------------------ ImageNet-1k validation
WNID_PATTERN = re.compile(r"n\d{8}")


def read_synset_mapping(path: Path) -> tuple[list[str], list[str]]:
    """``LOC_synset_mapping.txt`` (``n01440764 tench, Tinca tinca`` per line) -> (wnids, descriptions) in file order."""
    wnids, desc = [], []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        wnid, _, rest = line.strip().partition(" ")
        if not WNID_PATTERN.fullmatch(wnid):
            raise ValueError(
                f"{path}:{lineno}: {wnid!r} is not a WordNet id (nXXXXXXXX); a synset mapping has one "
                "'<wnid> <names>' per line"
            )
        wnids.append(wnid)
        desc.append(rest.strip() or wnid)
    if len(set(wnids)) != len(wnids):
        raise ValueError(f"{path} lists a WordNet id twice")
    if not wnids:
        raise ValueError(f"{path} lists no synsets")
    return wnids, desc


class ImageNetVal(Dataset):
    """ImageNet-1k validation images with their class, for zero-shot classification.

    Two download layouts of ``root``:
      * wnid folders: ``root/n01440764/*.JPEG`` ... (torchvision's ``ImageFolder`` layout);
      * flat: ``root/ILSVRC2012_val_00000001.JPEG`` ... plus ``LOC_val_solution.csv`` (columns ``ImageId``,
        ``PredictionString`` whose first token is the wnid; found in ``root`` or a parent, or ``solution_csv=``),
        as the Kaggle ``ILSVRC/Data/CLS-LOC/val`` layout has it.
    The class head is the 1000 classes in sorted-wnid order (``LOC_synset_mapping.txt`` when found in ``root``
    or a parent, or ``synset_mapping=``; else timm's list) named by OpenAI's cleaned names
    (:data:`~.imagenet_classes.IMAGENET_CLASSNAMES`; ``class_names=`` a file of one line per head class, synonyms
    after commas, replaces them). ``classes=`` (wnids) restricts the head, and the images, to those classes.
    Images of classes outside the head and files that are not images of a listed class are left out, counted
    in :meth:`identity`; solution rows whose image is absent are an error (``missing="error"``) or left out
    (``missing="skip"``).

    Items: ``key`` (path relative to ``root``), ``image`` ``(3, H, W)`` [0, 1], ``captions`` ``{}``,
    ``class_id`` (index into the head). ``task = "classification"``; ``label_names`` (head names with
    synonyms) and ``wnids`` describe the head.
    """

    task = "classification"

    def __init__(
        self,
        root: str | Path,
        classes: list[str] | str | Path | None = None,
        solution_csv: str | Path | None = None,
        synset_mapping: str | Path | None = None,
        class_names: str | Path | None = None,
        missing: str = "error",
        max_images: int | None = None,
        name: str = "imagenet",
    ) -> None:
        from .imagenet_classes import IMAGENET_CLASSNAMES, imagenet_wnids

        self.root = Path(root)
        self.name = name
        if not self.root.is_dir():
            raise ValueError(f"{name}: root {self.root} is not a folder (the validation image folder)")
        if missing not in MISSING_POLICIES:
            raise ValueError(f"{name}: missing={missing!r}; choose one of {MISSING_POLICIES}")
        standard = imagenet_wnids()
        std_index = {w: i for i, w in enumerate(standard)}
        mapping = (
            Path(synset_mapping)
            if synset_mapping is not None
            else _find_file(self.root, "LOC_synset_mapping.txt")
        )
        if synset_mapping is not None and not mapping.is_file():
            raise ValueError(f"{name}: synset mapping {mapping} does not exist")
        if mapping is not None:
            all_wnids, desc = read_synset_mapping(mapping)
            names = [[IMAGENET_CLASSNAMES[std_index[w]]] if w in std_index else [d.split(",")[0].strip()]
                     for w, d in zip(all_wnids, desc)]  # fmt: skip
            self.mapping_source = str(mapping)
        else:
            all_wnids, names = standard, [[n] for n in IMAGENET_CLASSNAMES]
            self.mapping_source = "timm imagenet_synsets.txt"
        if class_names is not None:
            names = load_class_names(class_names)
            if len(names) != len(all_wnids):
                raise ValueError(
                    f"{name}: class-name file {class_names} has {len(names)} lines for {len(all_wnids)} classes; "
                    "write one line per class in sorted-wnid order"
                )
        if classes is not None:
            if isinstance(classes, (str, Path)) and Path(classes).is_file():
                wanted_ids = [w[0] for w in load_class_names(classes)]  # one wnid per line
            elif isinstance(classes, str):
                wanted_ids = [c.strip() for c in classes.split(",") if c.strip()]  # "n01440764,n01443537"
            else:
                wanted_ids = [str(c) for c in classes]
            unknown = [w for w in wanted_ids if w not in all_wnids]
            if unknown:
                raise ValueError(
                    f"{name}: classes {unknown[:5]} are not WordNet ids of the head ({self.mapping_source})"
                )
            keep = sorted({all_wnids.index(w) for w in wanted_ids})
        else:
            keep = list(range(len(all_wnids)))
        self.wnids = [all_wnids[i] for i in keep]
        self.label_names = [names[i] for i in keep]
        head = {w: i for i, w in enumerate(self.wnids)}
        known = set(all_wnids)
        self.ignored: list[dict[str, str]] = []
        self.missing: list[str] = []
        subdirs = sorted(d for d in self.root.iterdir() if d.is_dir() and WNID_PATTERN.fullmatch(d.name))
        items: list[tuple[Path, int]] = []
        if subdirs:
            self.layout = "wnid_folders"
            foreign = [d.name for d in subdirs if d.name not in known]
            if foreign:
                raise ValueError(
                    f"{name}: folders {foreign[:5]} in {self.root} are not ImageNet-1k WordNet ids "
                    f"({self.mapping_source}); is this the ImageNet-1k validation folder?"
                )
            others = sorted(
                p.name for p in self.root.iterdir() if p not in subdirs and not p.name.startswith(".")
            )
            self.ignored += [
                {"path": o, "reason": "not a wnid folder"} for o in others if not o.endswith((".csv", ".txt"))
            ]
            for d in subdirs:
                files = sorted(p for p in d.iterdir() if p.is_file())
                if d.name not in head:
                    self.ignored += [
                        {"path": f"{d.name}/*", "reason": f"class outside classes= ({len(files)} files)"}
                    ]
                    continue
                for p in files:
                    if p.suffix.lower() in IMAGE_EXTS:
                        items.append((p, head[d.name]))
                    else:
                        self.ignored.append({"path": str(p.relative_to(self.root)), "reason": "not an image"})
        else:
            self.layout = "flat_csv"
            csv_path = (
                Path(solution_csv)
                if solution_csv is not None
                else _find_file(self.root, "LOC_val_solution.csv")
            )
            if csv_path is None or not csv_path.is_file():
                raise ValueError(
                    f"{name}: {self.root} has no WordNet-id folders (n01440764/ ...) and no LOC_val_solution.csv in it "
                    "or its parents; give the ImageFolder layout, or the flat folder with solution_csv= "
                    "(columns ImageId, PredictionString)"
                )
            self.solution_csv = csv_path
            by_stem = {
                p.stem: p for p in self.root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS
            }
            used: set[str] = set()
            for image_id, wnid, lineno in _read_solution_csv(csv_path):
                if wnid not in known:
                    raise ValueError(
                        f"{csv_path}:{lineno}: {wnid!r} is not an ImageNet-1k WordNet id ({self.mapping_source})"
                    )
                if image_id not in by_stem:
                    self.missing.append(image_id)
                    continue
                used.add(image_id)
                if wnid not in head:
                    self.ignored.append({"path": by_stem[image_id].name, "reason": "class outside classes="})
                    continue
                items.append((by_stem[image_id], head[wnid]))
            if self.missing and missing == "error":
                raise ValueError(
                    f"{name}: {len(self.missing)} images listed in {csv_path} are not in {self.root} (first: "
                    f"{self.missing[:5]}); point root= at the folder holding them, or pass missing='skip' to "
                    "evaluate without them (they are counted)"
                )
            self.ignored += [{"path": p.name, "reason": "not in the solution file"}
                             for s, p in sorted(by_stem.items()) if s not in used]  # fmt: skip
        if self.ignored or self.missing:
            logger.warning(
                "%s: %d file(s) not evaluated (%s), %d listed image(s) missing%s",
                name,
                len(self.ignored),
                ", ".join(f"{x['path']}: {x['reason']}" for x in self.ignored[:5]),
                len(self.missing),
                f" (first: {self.missing[:5]})" if self.missing else "",
            )
        if not items:
            raise ValueError(f"{name}: no image of the head's {len(self.wnids)} classes in {self.root}")
        items.sort(key=lambda t: str(t[0]))
        self.items = items[:max_images] if max_images is not None else items

    def __len__(self) -> int:
        return len(self.items)

    def keys(self) -> list[str]:
        return [str(p.relative_to(self.root)) for p, _ in self.items]

    def targets(self) -> list[int]:
        """The class id of every image (no image is read)."""
        return [c for _, c in self.items]

    def identity(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "root": str(self.root),
            "layout": self.layout,
            "synsets": self.mapping_source,
            "num_images": len(self),
            "num_classes": len(self.wnids),
            "num_ignored": len(self.ignored),
            "ignored": self.ignored[:100],
            "num_missing": len(self.missing),
            "missing": self.missing[:100],
        }

    def __getitem__(self, i: int) -> dict[str, Any]:
        p, c = self.items[i]
        return {"key": str(p.relative_to(self.root)), "image": load_image(p), "captions": {}, "class_id": c}


def _read_solution_csv(path: Path) -> list[tuple[str, str, int]]:
    """``LOC_val_solution.csv`` -> ``(ImageId, wnid, line)`` rows (the wnid is PredictionString's first token)."""
    import csv

    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        cols = set(reader.fieldnames or ())
        if not {"ImageId", "PredictionString"} <= cols:
            raise ValueError(
                f"{path} has columns {sorted(cols)}; LOC_val_solution.csv needs ImageId and PredictionString"
            )
        rows = []
        for lineno, row in enumerate(reader, 2):
            toks = (row.get("PredictionString") or "").split()
            image_id = (row.get("ImageId") or "").strip()
            if not toks or not image_id:
                raise ValueError(f"{path}:{lineno}: empty ImageId or PredictionString")
            rows.append((image_id, toks[0], lineno))
    if not rows:
        raise ValueError(f"{path} has no rows")
    return rows


def _register() -> None:
    from tipsdistill.cache.datasets import list_datasets, register_dataset

    known = set(list_datasets())
    for name, fn in (
        ("ade20k", ADE20K),
        ("seg_folder", SegmentationFolder),
        ("caption_folder", CaptionFolder),
        ("coco_karpathy", coco_karpathy),
        ("flickr30k_karpathy", flickr30k_karpathy),
        ("karpathy", KarpathyCaptions),
        ("imagenet", ImageNetVal),
    ):
        if name not in known:
            register_dataset(name)(fn)


_register()


def load_eval_dataset(name: str, **kwargs: Any) -> Dataset:
    """Build a dataset through the :mod:`cache.datasets` registry (importing ``cache.synthetic`` when present)."""
    from tipsdistill.cache.datasets import build_dataset, list_datasets

    if name not in list_datasets():
        try:  # the built-in synthetic set lives in another package; register it on demand
            import tipsdistill.cache.synthetic  # noqa: F401
        except ImportError:
            pass
    return build_dataset(name, **kwargs)


def build_eval_dataset(name: str, kwargs: dict[str, Any]) -> Dataset:
    """A registered evaluation dataset (``synthetic``, ``ade20k``, ``seg_folder``, ...) or a dataset spec
    (``wds:...``, ``parquet:...``, ``hf:...``), as ``tipsdistill-eval --dataset`` takes them."""
    from tipsdistill.cache.dataset_spec import build_from_spec, is_shorthand

    return build_from_spec(name, **kwargs) if is_shorthand(name) else load_eval_dataset(name, **kwargs)
