"""The standard zero-shot segmentation benchmarks, read from the layouts users download.

Every benchmark is a :class:`~.datasets.SegmentationFolder` (the generic loader) configured for one
download layout: ``root`` is the folder users download (``VOCdevkit/VOC2012``, ``VOCdevkit/VOC2010``,
``ADEChallengeData2016``, ``coco_stuff164k``, ``cityscapes``), ``split`` defaults to ``val``; only the
images the split names are evaluated.

name          root (mmseg data/ path)    classes  background  labels
voc21         VOCdevkit/VOC2012          21       class       palette PNG index as is; 255 -> ignore
voc20         VOCdevkit/VOC2012          20       ignore      0 -> ignore, others minus 1
pc60          VOCdevkit/VOC2010          60       class       SegmentationClassContext as is
pc59          VOCdevkit/VOC2010          59       ignore      0 -> ignore, others minus 1
ade150        ade/ADEChallengeData2016   150      none        0 -> ignore, others minus 1 (= ade20k)
coco_stuff    coco_stuff164k             171      none        *_labelTrainIds.png as is (255 ignore)
coco_object   coco_stuff164k             81       threshold   *_instanceTrainIds.png (the converter below)
cityscapes    cityscapes                 19       none        *_gtFine_labelTrainIds.png as is (255 ignore)

Class names. ``class_names`` (what reports show) are mmsegmentation's dataset ``CLASSES``
(``mmseg/datasets/{voc,pascal_context,coco_stuff,cityscapes}.py``; COCO-Object: GroupViT's
``COCOObjectDataset``, background + the first 80 COCO-Stuff classes; ADE150: the official TIPS notebook's
list, as the ``ade20k`` dataset). ``class_synonyms`` (what the text tower reads; a class scores the max
over its names) are chosen with ``prompts``:

* ``"sclip"``: SCLIP's ``configs/cls_*.txt`` (github.com/wangf3014/SCLIP; ProxyCLIP's and ClearCLIP's
  ``configs/cls_*.txt`` are variants of them), line for line, comma-separated synonyms kept: VOC's background is 26
  stuff names, ``person`` has clothing variants, ``tvmonitor`` is ``television monitor, tv monitor,
  monitor, television, screen``; SCLIP's COCO-Stuff, Cityscapes and ADE files are the class names with
  the spaces removed (``trafficlight``), kept as they are so SCLIP's numbers can be reproduced;
* ``"names"``: the ``class_names`` themselves, one prompt per class.

The default is ``"sclip"`` for every benchmark except ``ade150`` (``"names"``, so it equals ``ade20k``).

Background presets (:data:`BACKGROUND_PRESETS`, recorded in ``identity()``; ``background_class`` is the
label id of the background class or ``None``); evaluation protocols read them (thresholds are theirs):

* ``class``: background is class 0 and scored like any class (``voc21``, ``pc60``);
* ``ignore``: background pixels are labelled ignore (255) and not evaluated; no background class
  (``voc20``, ``pc59``);
* ``threshold``: background is class 0, predicted where the best class score is below the protocol's
  threshold (``coco_object``; SCLIP also gives class 0 its background prompts);
* ``none``: the dataset has no background class (``ade150``, ``coco_stuff``, ``cityscapes``).

``object_class_ids`` is every class but the background class, so ``miou_objects`` (mIoU without the
background class) is reported for every benchmark; ``background_class_ids`` is ``[0]`` where there is
a background class.

COCO-Object labels come from COCO-Stuff with :func:`convert_coco_object` (``python -m
tipsdistill.scripts.prepare_benchmarks convert-coco-object ROOT``); it reproduces GroupViT's
``convert_dataset/convert_coco_object.py`` (SCLIP ships the same file as ``datasets/cvt_coco_object.py``).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .datasets import ADE150_CLASSES, SegmentationFolder, load_label
from .metrics import IGNORE_INDEX

logger = logging.getLogger(__name__)

BENCHMARKS: tuple[str, ...] = (
    "voc21",
    "voc20",
    "pc60",
    "pc59",
    "ade150",
    "coco_stuff",
    "coco_object",
    "cityscapes",
)

BACKGROUND_PRESETS: dict[str, str] = {
    "class": "background is class 0 and scored like any other class",
    "ignore": "background pixels are ignore (255) and not evaluated; there is no background class",
    "threshold": "background is class 0, predicted where the best class score is below the protocol's threshold",
    "none": "the dataset has no background class",
}

PROMPT_SETS: tuple[str, ...] = ("sclip", "names")

# ------------------------------------------------------------------------------------ class lists
# mmsegmentation mmseg/datasets/voc.py PascalVOCDataset CLASSES.
VOC21_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

# SCLIP configs/cls_voc21.txt line 1 (also line 1 of cls_coco_object.txt): background as 26 stuff names.
SCLIP_BACKGROUND: tuple[str, ...] = (
    "sky", "wall", "tree", "wood", "grass", "road", "sea", "river", "mountain", "sands", "desk", "bed",
    "building", "cloud", "lamp", "door", "window", "wardrobe", "ceiling", "shelf", "curtain", "stair", "floor",
    "hill", "rail", "fence",
)  # fmt: skip
SCLIP_PERSON: tuple[str, ...] = (
    "person", "person in shirt", "person in jeans", "person in dress", "person in sweater", "person in skirt",
    "person in jacket",
)  # fmt: skip

# SCLIP configs/cls_voc21.txt (cls_voc20.txt = lines 2..21).
SCLIP_VOC21: tuple[tuple[str, ...], ...] = (
    SCLIP_BACKGROUND,
    *((n,) for n in ("aeroplane", "bicycle", "bird", "ship", "bottle", "bus", "car", "cat", "chair", "cow",
                     "table", "dog", "horse", "motorbike")),
    SCLIP_PERSON,
    ("pottedplant",), ("sheep",), ("sofa",), ("train",),
    ("television monitor", "tv monitor", "monitor", "television", "screen"),
)  # fmt: skip

# mmsegmentation mmseg/datasets/pascal_context.py PascalContextDataset CLASSES (PC59 = without
# "background"); SCLIP configs/cls_context60.txt / cls_context59.txt are the same names.
PC60_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle",
    "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain",
    "dog", "door", "fence", "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light",
    "motorbike", "mountain", "mouse", "person", "plate", "platform", "pottedplant", "road", "rock", "sheep",
    "shelves", "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree", "truck", "tvmonitor",
    "wall", "water", "window", "wood",
)  # fmt: skip

# mmsegmentation mmseg/datasets/coco_stuff.py COCOStuffDataset CLASSES (train ids 0..170 of
# coco_stuff164k's *_labelTrainIds.png: 80 things, then 91 stuff classes).
COCO_STUFF_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis",
    "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush", "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet",
    "cage", "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter",
    "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble", "floor-other",
    "floor-stone", "floor-tile", "floor-wood", "flower", "fog", "food-other", "fruit", "furniture-other", "grass",
    "gravel", "ground-other", "hill", "house", "leaves", "light", "mat", "metal", "mirror-stuff", "moss",
    "mountain", "mud", "napkin", "net", "paper", "pavement", "pillow", "plant-other", "plastic", "platform",
    "playingfield", "railing", "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf",
    "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone", "straw", "structural-other", "table",
    "tent", "textile-other", "towel", "tree", "vegetable", "wall-brick", "wall-concrete", "wall-other",
    "wall-panel", "wall-stone", "wall-tile", "wall-wood", "water-other", "waterdrops", "window-blind",
    "window-other", "wood",
)  # fmt: skip
NUM_COCO_THINGS = 80

# GroupViT's COCOObjectDataset CLASSES (SCLIP's copy says it is borrowed from TCL and GroupViT):
# background + the 80 COCO-Stuff thing classes.
COCO_OBJECT_CLASSES: tuple[str, ...] = ("background", *COCO_STUFF_CLASSES[:NUM_COCO_THINGS])

# SCLIP configs/cls_coco_object.txt: the background line of cls_voc21.txt, person with its variants
# and "body", then the other 79 thing names as above (with their spaces).
SCLIP_COCO_OBJECT: tuple[tuple[str, ...], ...] = (
    SCLIP_BACKGROUND,
    (*SCLIP_PERSON, "body"),
    *((n,) for n in COCO_STUFF_CLASSES[1:NUM_COCO_THINGS]),
)

# mmsegmentation mmseg/datasets/cityscapes.py CityscapesDataset CLASSES (train ids 0..18).
CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip


def _no_spaces(names: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    """SCLIP's cls_coco_stuff.txt / cls_city_scapes.txt / cls_ade20k.txt: the names with spaces removed."""
    return tuple((n.replace(" ", ""),) for n in names)


def _one_each(names: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    return tuple((n,) for n in names)


# ------------------------------------------------------------------------------------ the specs
@dataclass(frozen=True)
class BenchmarkSpec:
    """One benchmark's layout, labels, classes and background preset (paths may hold ``{split}``)."""

    name: str
    mmseg_subdir: str
    images: str
    labels: str
    image_suffix: str | None
    label_suffix: str
    class_names: tuple[str, ...]
    prompts: dict[str, tuple[tuple[str, ...], ...]]
    default_prompts: str
    class_source: str
    background: str
    split_file: str | None = None
    recursive: bool = False
    zero_is_ignore: bool = False
    label_offset: int = 0
    split_dirs: dict[str, str] = field(default_factory=dict)
    label_hint: str = ""

    @property
    def background_class(self) -> int | None:
        """Label id of the background class (``None`` for the ``ignore`` / ``none`` presets)."""
        return 0 if self.background in ("class", "threshold") else None

    @property
    def object_class_ids(self) -> list[int]:
        return [i for i in range(len(self.class_names)) if i != self.background_class]

    @property
    def background_class_ids(self) -> list[int] | None:
        return None if self.background_class is None else [self.background_class]

    def split_dir(self, split: str) -> str:
        return self.split_dirs.get(split, split)


_VOC_LABELS = "SegmentationClass ships with VOCtrainval_11-May-2012.tar (palette PNGs, index = class id, 255 = boundary)"
_CONTEXT_LABELS = (
    "make SegmentationClassContext with mmsegmentation's tools/dataset_converters/pascal_context.py "
    "(trainval_merged.json + the Detail API)"
)
_COCO_LABELS = "make *_labelTrainIds.png with mmsegmentation's tools/dataset_converters/coco_stuff164k.py"

SPECS: dict[str, BenchmarkSpec] = {
    s.name: s
    for s in (
        BenchmarkSpec(
            name="voc21",
            mmseg_subdir="VOCdevkit/VOC2012",
            images="JPEGImages",
            labels="SegmentationClass",
            image_suffix=".jpg",
            label_suffix=".png",
            split_file="ImageSets/Segmentation/{split}.txt",
            class_names=VOC21_CLASSES,
            prompts={"sclip": SCLIP_VOC21, "names": _one_each(VOC21_CLASSES)},
            default_prompts="sclip",
            class_source="names: mmsegmentation PascalVOCDataset; sclip: SCLIP configs/cls_voc21.txt",
            background="class",
            label_hint=_VOC_LABELS,
        ),
        BenchmarkSpec(
            name="voc20",
            mmseg_subdir="VOCdevkit/VOC2012",
            images="JPEGImages",
            labels="SegmentationClass",
            image_suffix=".jpg",
            label_suffix=".png",
            split_file="ImageSets/Segmentation/{split}.txt",
            class_names=VOC21_CLASSES[1:],
            prompts={"sclip": SCLIP_VOC21[1:], "names": _one_each(VOC21_CLASSES[1:])},
            default_prompts="sclip",
            class_source="names: SCLIP PascalVOC20Dataset (mmsegmentation's without background); "
            "sclip: SCLIP configs/cls_voc20.txt",
            background="ignore",
            zero_is_ignore=True,
            label_offset=-1,
            label_hint=_VOC_LABELS,
        ),
        BenchmarkSpec(
            name="pc60",
            mmseg_subdir="VOCdevkit/VOC2010",
            images="JPEGImages",
            labels="SegmentationClassContext",
            image_suffix=".jpg",
            label_suffix=".png",
            split_file="ImageSets/SegmentationContext/{split}.txt",
            class_names=PC60_CLASSES,
            prompts={"sclip": _one_each(PC60_CLASSES), "names": _one_each(PC60_CLASSES)},
            default_prompts="sclip",
            class_source="mmsegmentation PascalContextDataset = SCLIP configs/cls_context60.txt",
            background="class",
            label_hint=_CONTEXT_LABELS,
        ),
        BenchmarkSpec(
            name="pc59",
            mmseg_subdir="VOCdevkit/VOC2010",
            images="JPEGImages",
            labels="SegmentationClassContext",
            image_suffix=".jpg",
            label_suffix=".png",
            split_file="ImageSets/SegmentationContext/{split}.txt",
            class_names=PC60_CLASSES[1:],
            prompts={"sclip": _one_each(PC60_CLASSES[1:]), "names": _one_each(PC60_CLASSES[1:])},
            default_prompts="sclip",
            class_source="mmsegmentation PascalContextDataset59 = SCLIP configs/cls_context59.txt",
            background="ignore",
            zero_is_ignore=True,
            label_offset=-1,
            label_hint=_CONTEXT_LABELS,
        ),
        BenchmarkSpec(
            name="ade150",
            mmseg_subdir="ade/ADEChallengeData2016",
            images="images/{split}",
            labels="annotations/{split}",
            image_suffix=None,  # as the ade20k dataset: any image extension
            label_suffix=".png",
            split_dirs={"val": "validation", "train": "training"},
            class_names=ADE150_CLASSES,
            prompts={"sclip": _no_spaces(ADE150_CLASSES), "names": _one_each(ADE150_CLASSES)},
            default_prompts="names",
            class_source="names: official TIPS notebook (= the ade20k dataset); sclip: SCLIP configs/cls_ade20k.txt",
            background="none",
            zero_is_ignore=True,
            label_offset=-1,
            label_hint="annotations/<split> ships with ADEChallengeData2016.zip",
        ),
        BenchmarkSpec(
            name="coco_stuff",
            mmseg_subdir="coco_stuff164k",
            images="images/{split}",
            labels="annotations/{split}",
            image_suffix=".jpg",
            label_suffix="_labelTrainIds.png",
            split_dirs={"val": "val2017", "train": "train2017"},
            class_names=COCO_STUFF_CLASSES,
            prompts={"sclip": _no_spaces(COCO_STUFF_CLASSES), "names": _one_each(COCO_STUFF_CLASSES)},
            default_prompts="sclip",
            class_source="names: mmsegmentation COCOStuffDataset; sclip: SCLIP configs/cls_coco_stuff.txt",
            background="none",
            label_hint=_COCO_LABELS,
        ),
        BenchmarkSpec(
            name="coco_object",
            mmseg_subdir="coco_stuff164k",
            images="images/{split}",
            labels="annotations/{split}",
            image_suffix=".jpg",
            label_suffix="_instanceTrainIds.png",
            split_dirs={"val": "val2017", "train": "train2017"},
            class_names=COCO_OBJECT_CLASSES,
            prompts={"sclip": SCLIP_COCO_OBJECT, "names": _one_each(COCO_OBJECT_CLASSES)},
            default_prompts="sclip",
            class_source="names: GroupViT COCOObjectDataset; sclip: SCLIP configs/cls_coco_object.txt",
            background="threshold",
            label_hint="make them from the *_labelTrainIds.png with "
            "`python -m tipsdistill.scripts.prepare_benchmarks convert-coco-object ROOT --split SPLIT` "
            "(GroupViT's convert_coco_object.py)",
        ),
        BenchmarkSpec(
            name="cityscapes",
            mmseg_subdir="cityscapes",
            images="leftImg8bit/{split}",
            labels="gtFine/{split}",
            image_suffix="_leftImg8bit.png",
            label_suffix="_gtFine_labelTrainIds.png",
            recursive=True,
            class_names=CITYSCAPES_CLASSES,
            prompts={"sclip": _no_spaces(CITYSCAPES_CLASSES), "names": _one_each(CITYSCAPES_CLASSES)},
            default_prompts="sclip",
            class_source="names: mmsegmentation CityscapesDataset; sclip: SCLIP configs/cls_city_scapes.txt",
            background="none",
            label_hint="make *_gtFine_labelTrainIds.png with cityscapesscripts' createTrainIdLabelImgs "
            "(mmsegmentation: tools/dataset_converters/cityscapes.py)",
        ),
    )
}

# Each benchmark's folder under mmsegmentation's data/ directory convention.
MMSEG_SUBDIRS: dict[str, str] = {name: SPECS[name].mmseg_subdir for name in BENCHMARKS}


def benchmark_spec(name: str) -> BenchmarkSpec:
    if name not in SPECS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    return SPECS[name]


class BenchmarkDataset(SegmentationFolder):
    """One standard benchmark (:data:`BENCHMARKS`) read from its download layout.

    Args:
        benchmark: the benchmark name (``voc21``, ``pc59``, ...).
        root: the downloaded folder (``VOCdevkit/VOC2012``, ``coco_stuff164k``, ...; :data:`MMSEG_SUBDIRS`).
        split: ``val`` (default), ``train``, ... (folder or split-file name; ADE ``val`` = ``validation``).
        prompts: ``sclip`` or ``names`` (see the module docstring); ``None`` = the benchmark's default.
        max_images: evaluate the first N images of the split.

    Items as :class:`SegmentationFolder`: ``image (3, H, W)`` [0, 1], ``label (H, W)`` int64 (255 = ignore),
    ``key``. Attributes: ``class_names``, ``class_synonyms`` (the prompts), ``object_class_ids``,
    ``background_class_ids``, ``background`` (preset name), ``background_class`` (id or ``None``).
    """

    def __init__(
        self,
        benchmark: str,
        root: str | Path,
        split: str = "val",
        *,
        prompts: str | None = None,
        max_images: int | None = None,
    ) -> None:
        spec = benchmark_spec(benchmark)
        prompts = spec.default_prompts if prompts is None else prompts
        if prompts not in spec.prompts:
            raise ValueError(
                f"{benchmark}: unknown prompts {prompts!r}; choose one of {', '.join(spec.prompts)}"
            )
        root = Path(root)
        sdir = spec.split_dir(split)
        images, labels = spec.images.format(split=sdir), spec.labels.format(split=sdir)
        check_layout(spec, root, split, images, labels)
        super().__init__(
            root,
            images=images,
            labels=labels,
            class_names=list(spec.class_names),
            label_offset=spec.label_offset,
            zero_is_ignore=spec.zero_is_ignore,
            object_class_ids=spec.object_class_ids,
            background_class_ids=spec.background_class_ids,
            image_suffix=spec.image_suffix,
            label_suffix=spec.label_suffix,
            recursive=spec.recursive,
            split_file=None if spec.split_file is None else spec.split_file.format(split=split),
            max_images=max_images,
            name=benchmark,
        )
        synonyms = [list(p) for p in spec.prompts[prompts]]
        if len(synonyms) != len(self.class_names):  # the tables above must agree; a bug otherwise
            raise RuntimeError(
                f"{benchmark}: {len(synonyms)} prompt lines for {len(self.class_names)} classes"
            )
        self.class_synonyms = synonyms
        self.spec = spec
        self.split = split
        self.prompts = prompts
        self.background = spec.background
        self.background_class = spec.background_class

    def identity(self) -> dict[str, Any]:
        return {
            **super().identity(),
            "split": self.split,
            "background": self.background,
            "background_class": self.background_class,
            "prompts": self.prompts,
            "class_source": self.spec.class_source,
        }


def check_layout(spec: BenchmarkSpec, root: Path, split: str, images: str, labels: str) -> None:
    """Errors that name the folder users should point ``root`` at, before the generic loader's checks."""
    if not root.is_dir():
        raise ValueError(
            f"{spec.name}: root {root} does not exist; pass the downloaded {spec.mmseg_subdir} folder"
        )
    if not (root / images).is_dir():
        nested = root / spec.mmseg_subdir
        hint = (
            f"; {root} looks like mmsegmentation's data/ folder: pass root={nested}"
            if (nested / images).is_dir()
            else f" (is root the {spec.mmseg_subdir} folder, and split {split!r} downloaded?)"
        )
        raise ValueError(f"{spec.name}: image folder {root / images} does not exist{hint}")
    label_dir = root / labels
    pattern = f"*{spec.label_suffix}"
    found = label_dir.is_dir() and next(
        iter(label_dir.rglob(pattern) if spec.recursive else label_dir.glob(pattern)), None
    )
    if not found:
        raise ValueError(f"{spec.name}: no {pattern} label files in {label_dir}; {spec.label_hint}")


def _register() -> None:
    from tipsdistill.cache.datasets import list_datasets, register_dataset

    known = set(list_datasets())
    for name in BENCHMARKS:
        if name not in known:
            register_dataset(name)(functools.partial(BenchmarkDataset, name))


_register()


# ------------------------------------------------------------------------- COCO-Object converter
def coco_object_lut() -> np.ndarray:
    """``(256,)`` uint8 map from COCO-Stuff-164k train ids to COCO-Object labels.

    GroupViT's ``convert_coco_object.py`` maps the raw COCO-Stuff ids (COCO category id - 1) of the
    stuffthingmaps: things (raw id <= 90, train ids 0..79) -> train id + 1; stuff (train ids 80..170)
    and unlabelled (255) -> 0 (background). From mmsegmentation's ``*_labelTrainIds.png`` that is the
    same map: train id t < 80 -> t + 1, every other value -> 0 (COCO-Object has no ignore label).
    Values 171..254 do not occur in train-id maps; they map to 255 here and are reported by the converter.
    """
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    lut[:NUM_COCO_THINGS] = np.arange(1, NUM_COCO_THINGS + 1)
    lut[NUM_COCO_THINGS : len(COCO_STUFF_CLASSES)] = 0
    lut[IGNORE_INDEX] = 0
    return lut


def coco_object_label(train_ids: np.ndarray, source: str = "label") -> np.ndarray:
    """COCO-Object label ``(H, W)`` uint8 (0 background, 1..80 things) of a COCO-Stuff train-id map ``(H, W)``."""
    arr = np.asarray(train_ids)
    bad = (arr < 0) | (arr > 255) | ((arr >= len(COCO_STUFF_CLASSES)) & (arr != IGNORE_INDEX))
    if bad.any():
        vals = sorted({int(v) for v in np.unique(arr[bad])})[:10]
        raise ValueError(
            f"{source} holds values {vals} that are not COCO-Stuff train ids (0..170, 255 = unlabelled); "
            "convert_coco_object reads mmsegmentation's *_labelTrainIds.png (tools/dataset_converters/coco_stuff164k.py)"
        )
    return coco_object_lut()[arr.astype(np.int64)]


def convert_coco_object(root: str | Path, split: str = "val", *, progress: bool = True) -> dict[str, Any]:
    """Write ``annotations/<split>2017/<id>_instanceTrainIds.png`` (COCO-Object labels) next to every
    ``<id>_labelTrainIds.png`` of a ``coco_stuff164k`` folder (:func:`coco_object_label`).

    Each file is written to a temporary name and renamed, so an interrupted run leaves no half file;
    a rerun rewrites every file. Returns ``{"written": N, "folder": ...}``.
    """
    spec = SPECS["coco_object"]
    folder = Path(root) / spec.labels.format(split=spec.split_dir(split))
    src_suffix = SPECS["coco_stuff"].label_suffix
    sources = sorted(folder.glob(f"*{src_suffix}")) if folder.is_dir() else []
    if not sources:
        raise ValueError(
            f"no *{src_suffix} files in {folder}; {_COCO_LABELS} first (root = the coco_stuff164k folder)"
        )
    for src in tqdm(sources, desc=f"coco_object {split}", disable=not progress):
        out = src.with_name(src.name[: -len(src_suffix)] + spec.label_suffix)
        labels = coco_object_label(load_label(src).numpy(), str(src))
        tmp = out.with_name(out.name + ".tmp")
        Image.fromarray(labels).save(tmp, format="PNG")
        os.replace(tmp, out)
    logger.info("wrote %d COCO-Object label maps in %s", len(sources), folder)
    return {"written": len(sources), "folder": str(folder)}


# ----------------------------------------------------------------------------------- command line
def benchmarks_table() -> str:
    """Markdown table of the benchmarks (name, mmseg folder, classes, background preset, class source)."""
    rows = [
        "| name | root (under mmseg data/) | classes | background | class names |",
        "|---|---|---|---|---|",
    ]
    for name in BENCHMARKS:
        s = SPECS[name]
        rows.append(
            f"| {name} | {s.mmseg_subdir} | {len(s.class_names)} | {s.background} | {s.class_source} |"
        )
    return "\n".join(rows)
