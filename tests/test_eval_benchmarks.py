"""The standard benchmarks (voc21, voc20, pc60, pc59, ade150, coco_stuff, coco_object, cityscapes) read from
generated data in each download layout: split files that leave images out, palette PNGs, ignore labels,
distractor files; the same data through ``seg_folder`` gives exactly the same metrics."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_eval_toymodel import ToyEncoder

from tipsdistill.distill.evaluation import (
    ClassEmbeddings,
    SegmentationSettings,
    evaluate_segmentation,
    load_eval_dataset,
)
from tipsdistill.distill.evaluation.benchmarks import (
    BACKGROUND_PRESETS,
    BENCHMARKS,
    MMSEG_SUBDIRS,
    SPECS,
    benchmarks_table,
    coco_object_label,
    convert_coco_object,
)
from tipsdistill.distill.evaluation.datasets import ADE150_CLASSES
from tipsdistill.scripts.prepare_benchmarks import main

H, W = 24, 32
# the COCO-Stuff raw ids (COCO category id - 1) in train-id order, as mmsegmentation's coco_stuff164k.py maps them
COCO_RAW_IDS = [i for i in range(182) if i not in (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)]


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (256 RGB entries) of the palette PNGs in SegmentationClass."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = (np.random.default_rng(seed).random((H, W, 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(path)


def _label(path: Path, arr: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr.astype(np.uint8), mode="P" if palette else "L")
    if palette:
        im.putpalette(voc_palette())
    im.save(path)


def _ids(seed: int, high: int, extra: tuple[int, ...] = ()) -> np.ndarray:
    """``(H, W)`` label map with ids in ``[0, high)``, vertical stripes, and the ``extra`` ids in one row each."""
    rng = np.random.default_rng(seed)
    arr = np.repeat(rng.integers(0, high, (1, W // 4)), 4, axis=1).repeat(H, axis=0)
    for r, v in enumerate(extra):
        arr[r * 3, :] = v
    return arr


def make_voc(root: Path, palette: bool, high: int, labels: str, split_dir: str) -> dict[str, np.ndarray]:
    """VOC-style layout: JPEGImages (more images than labels), label PNGs for train + val, split files."""
    val, train, unlabelled = (
        ["2008_000002", "2007_000033", "2009_000012"],
        ["2007_000032", "2008_000008"],
        ["2010_000001"],
    )
    raw = {}
    for k, sid in enumerate(val + train + unlabelled):
        _image(root / "JPEGImages" / f"{sid}.jpg", k)
        if sid not in unlabelled:
            raw[sid] = _ids(k, high, extra=(0, 255))  # some background (0) and boundary (255) pixels
            _label(root / labels / f"{sid}.png", raw[sid], palette=palette)
    (root / "ImageSets" / split_dir).mkdir(parents=True)
    (root / "ImageSets" / split_dir / "val.txt").write_text("\n".join(val) + "\n")
    (root / "ImageSets" / split_dir / "train.txt").write_text("\n".join(train) + "\n")
    return {sid: raw[sid] for sid in val}


def make_ade(root: Path) -> dict[str, np.ndarray]:
    raw = {}
    for k, sid in enumerate(["ADE_val_00000001", "ADE_val_00000002"]):
        _image(root / "images/validation" / f"{sid}.jpg", 10 + k)
        raw[sid] = _ids(10 + k, 151, extra=(0,))
        _label(root / "annotations/validation" / f"{sid}.png", raw[sid])
    _image(root / "images/training/ADE_train_00000001.jpg", 19)
    _label(root / "annotations/training/ADE_train_00000001.png", _ids(19, 151))
    return raw


def make_coco(root: Path) -> dict[str, np.ndarray]:
    """coco_stuff164k after mmsegmentation's converter: raw stuffthingmaps (<id>.png, COCO ids - 1) and
    <id>_labelTrainIds.png side by side; a train2017 folder too. Returns the raw val maps."""
    raw = {}
    for split, sids in (("val2017", ["000000000139", "000000000285"]), ("train2017", ["000000000009"])):
        for k, sid in enumerate(sids):
            _image(root / "images" / split / f"{sid}.jpg", 20 + k)
            r = np.asarray(COCO_RAW_IDS)[_ids(20 + k, len(COCO_RAW_IDS))]
            r[0, :] = 255  # unlabelled
            r[1, :5] = 0  # person (a thing)
            r[1, 5:10] = 89  # toothbrush: the last thing (train id 79)
            r[1, 10:15] = 91  # banner: the first stuff class (train id 80)
            lut = np.full(256, 255, np.uint8)
            lut[COCO_RAW_IDS] = np.arange(len(COCO_RAW_IDS))
            _label(root / "annotations" / split / f"{sid}.png", r)
            _label(root / "annotations" / split / f"{sid}_labelTrainIds.png", lut[r])
            if split == "val2017":
                raw[sid] = r
    return raw


def make_cityscapes(root: Path) -> list[str]:
    names = []
    for split, items in (
        ("val", [("frankfurt", "000000_000294"), ("lindau", "000001_000019")]),
        ("train", [("aachen", "000000_000019")]),
    ):
        for k, (city, num) in enumerate(items):
            base = f"{city}_{num}"
            _image(root / "leftImg8bit" / split / city / f"{base}_leftImg8bit.png", 30 + k)
            lab = _ids(30 + k, 19, extra=(255,))
            gt = root / "gtFine" / split / city
            _label(gt / f"{base}_gtFine_labelTrainIds.png", lab)
            _label(gt / f"{base}_gtFine_labelIds.png", lab + 7)  # distractors users have next to them
            _label(gt / f"{base}_gtFine_instanceIds.png", lab + 1)
            (gt / f"{base}_gtFine_polygons.json").write_text("{}")
            if split == "val":
                names.append(f"leftImg8bit/val/{city}/{base}_leftImg8bit.png")
    return names


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """mmsegmentation's data/ folder with every benchmark's layout."""
    d = tmp_path_factory.mktemp("mmseg_data")
    out = {"root": d}
    out["voc"] = make_voc(d / MMSEG_SUBDIRS["voc21"], True, 21, "SegmentationClass", "Segmentation")
    out["context"] = make_voc(
        d / MMSEG_SUBDIRS["pc60"], False, 60, "SegmentationClassContext", "SegmentationContext"
    )
    out["ade"] = make_ade(d / MMSEG_SUBDIRS["ade150"])
    out["coco"] = make_coco(d / MMSEG_SUBDIRS["coco_stuff"])
    convert_coco_object(d / MMSEG_SUBDIRS["coco_object"], progress=False)
    out["cityscapes"] = make_cityscapes(d / MMSEG_SUBDIRS["cityscapes"])
    return out


def bench(data: dict, name: str, **kw):
    return load_eval_dataset(name, root=str(data["root"] / MMSEG_SUBDIRS[name]), **kw)


# -------------------------------------------------------------------------------- classes, presets
def test_class_lists_presets_and_registry():
    counts = {
        "voc21": 21,
        "voc20": 20,
        "pc60": 60,
        "pc59": 59,
        "ade150": 150,
        "coco_stuff": 171,
        "coco_object": 81,
        "cityscapes": 19,
    }
    presets = {
        "voc21": "class",
        "voc20": "ignore",
        "pc60": "class",
        "pc59": "ignore",
        "ade150": "none",
        "coco_stuff": "none",
        "coco_object": "threshold",
        "cityscapes": "none",
    }
    assert BENCHMARKS == tuple(counts) and set(MMSEG_SUBDIRS) == set(BENCHMARKS)
    assert MMSEG_SUBDIRS["voc20"] == "VOCdevkit/VOC2012" and MMSEG_SUBDIRS["pc59"] == "VOCdevkit/VOC2010"
    for name, n in counts.items():
        s = SPECS[name]
        assert (
            len(s.class_names) == n and s.background == presets[name] and s.background in BACKGROUND_PRESETS
        )
        assert all(len(p) == n for p in s.prompts.values()), name
        assert [p[0] for p in s.prompts["names"]] == list(s.class_names)
        bg = 0 if s.background in ("class", "threshold") else None
        assert s.background_class == bg and s.object_class_ids == [i for i in range(n) if i != bg]
    v21, c = SPECS["voc21"], SPECS["coco_object"]
    assert v21.class_names[0] == "background" and v21.class_names[20] == "tvmonitor"
    assert v21.prompts["sclip"][0][:3] == ("sky", "wall", "tree") and len(v21.prompts["sclip"][0]) == 26
    assert v21.prompts["sclip"][20] == ("television monitor", "tv monitor", "monitor", "television", "screen")
    assert (
        SPECS["voc20"].class_names == v21.class_names[1:]
        and SPECS["pc59"].class_names == SPECS["pc60"].class_names[1:]
    )
    assert c.class_names[:3] == ("background", "person", "bicycle") and c.class_names[-1] == "toothbrush"
    assert c.prompts["sclip"][1][-1] == "body" and c.prompts["sclip"][10] == ("traffic light",)
    cs = SPECS["coco_stuff"]
    assert (
        cs.class_names[79] == "toothbrush"
        and cs.class_names[80] == "banner"
        and cs.prompts["sclip"][9] == ("trafficlight",)
    )
    assert SPECS["ade150"].class_names == ADE150_CLASSES and SPECS["ade150"].default_prompts == "names"
    assert SPECS["cityscapes"].class_names[6] == "traffic light" and SPECS["cityscapes"].prompts["sclip"][
        6
    ] == ("trafficlight",)
    table = benchmarks_table()
    assert (
        table.count("\n") == len(BENCHMARKS) + 1
        and "| coco_object | coco_stuff164k | 81 | threshold |" in table
    )


# -------------------------------------------------------------------------------------- layouts
def test_voc_split_palette_and_label_mapping(data):
    root = data["root"] / MMSEG_SUBDIRS["voc21"]
    v21, v20 = bench(data, "voc21"), bench(data, "voc20", prompts="names")
    split = list(data["voc"])
    assert v21.keys() == [f"JPEGImages/{s}.jpg" for s in split] == v20.keys()  # the split file's order
    assert v21.outside_split == ["2007_000032.jpg", "2008_000008.jpg", "2010_000001.jpg"]  # not evaluated
    assert Image.open(root / "SegmentationClass" / f"{split[0]}.png").mode == "P"
    for i, sid in enumerate(split):
        raw = torch.from_numpy(data["voc"][sid].astype(np.int64))
        assert torch.equal(v21[i]["label"], raw)  # palette index = class id, 255 stays ignore
        expect = torch.where((raw == 0) | (raw == 255), torch.tensor(255), raw - 1)
        assert torch.equal(v20[i]["label"], expect)
        assert v21[i]["image"].shape == (3, H, W)
    assert v21.class_synonyms[0][0] == "sky" and v21.class_names[0] == "background"
    assert v20.class_synonyms == [[n] for n in v20.class_names] and len(v20.class_names) == 20
    ident = v21.identity()
    assert ident["name"] == "voc21" and ident["num_images"] == 3 and ident["split"] == "val"
    assert ident["split_file"] == "ImageSets/Segmentation/val.txt" and ident["num_outside_split"] == 3
    assert (ident["background"], ident["background_class"], ident["prompts"]) == ("class", 0, "sclip")
    assert v21.background_class_ids == [0] and v21.object_class_ids == list(range(1, 21))
    assert v20.background_class is None and v20.identity()["background"] == "ignore"
    train = bench(data, "voc21", split="train")
    assert train.keys() == ["JPEGImages/2007_000032.jpg", "JPEGImages/2008_000008.jpg"]


def test_context_ade_coco_cityscapes_layouts(data):
    pc60, pc59 = bench(data, "pc60"), bench(data, "pc59")
    split = list(data["context"])
    assert pc60.keys() == [f"JPEGImages/{s}.jpg" for s in split] and len(pc59) == 3
    raw = torch.from_numpy(data["context"][split[1]].astype(np.int64))
    assert torch.equal(pc60[1]["label"], raw)
    assert torch.equal(pc59[1]["label"], torch.where((raw == 0) | (raw == 255), torch.tensor(255), raw - 1))
    assert pc59.class_names[0] == "aeroplane" and pc59.identity()["background"] == "ignore"

    ade150 = bench(data, "ade150")
    ade20k = load_eval_dataset("ade20k", root=str(data["root"] / MMSEG_SUBDIRS["ade150"]))
    assert ade150.keys() == ade20k.keys() == [f"images/validation/{s}.jpg" for s in data["ade"]]
    assert ade150.class_synonyms == ade20k.class_synonyms and ade150.identity()["background"] == "none"
    for i in range(len(ade150)):
        assert torch.equal(ade150[i]["label"], ade20k[i]["label"])

    cs = bench(data, "coco_stuff")
    assert cs.keys() == [f"images/val2017/{s}.jpg" for s in data["coco"]]
    assert [p.name for _, p in cs.items] == [f"{s}_labelTrainIds.png" for s in data["coco"]]
    lab = cs[0]["label"]
    assert (
        lab[0].eq(255).all()
        and lab[1, :5].eq(0).all()
        and lab[1, 5:10].eq(79).all()
        and lab[1, 10:15].eq(80).all()
    )

    co = bench(data, "coco_object")
    assert co.keys() == cs.keys() and co.identity()["background"] == "threshold" and co.background_class == 0
    lab = co[0]["label"]
    assert (
        lab[0].eq(0).all()
        and lab[1, :5].eq(1).all()
        and lab[1, 5:10].eq(80).all()
        and lab[1, 10:15].eq(0).all()
    )

    city = bench(data, "cityscapes")
    assert city.keys() == data["cityscapes"] and city.unmatched_labels == []
    assert [p.name for _, p in city.items][0] == "frankfurt_000000_000294_gtFine_labelTrainIds.png"
    assert city[0]["label"][0].eq(255).all() and int(city[0]["label"][1:].max()) < 19


def test_coco_object_converter_reproduces_groupvit(data, tmp_path, capsys):
    # known answer: things 0..79 -> 1..80; stuff 80..170 and unlabelled 255 -> background 0
    got = coco_object_label(np.array([[0, 1, 79, 80, 170, 255]], np.uint8))
    assert got.tolist() == [[1, 2, 80, 0, 0, 0]] and got.dtype == np.uint8
    with pytest.raises(
        ValueError, match=r"x.png holds values \[171, 200\] that are not COCO-Stuff train ids"
    ):
        coco_object_label(np.array([[171, 200, 3]]), "x.png")
    # GroupViT's convert_coco_object.py on the raw stuffthingmaps: raw id <= 90 -> train id + 1, else 0
    folder = data["root"] / MMSEG_SUBDIRS["coco_object"] / "annotations/val2017"
    groupvit = {r: (t + 1 if r <= 90 else 0) for t, r in enumerate([*COCO_RAW_IDS, 255])}
    for sid, raw in data["coco"].items():
        expect = np.vectorize(groupvit.__getitem__)(raw)
        out = np.asarray(Image.open(folder / f"{sid}_instanceTrainIds.png"))
        assert np.array_equal(out, expect)
    # the command line (python -m tipsdistill.scripts.prepare_benchmarks convert-coco-object ROOT), on a fresh copy
    root = tmp_path / "coco_stuff164k"
    shutil.copytree(
        data["root"] / "coco_stuff164k", root, ignore=shutil.ignore_patterns("*_instanceTrainIds.png")
    )
    with pytest.raises(ValueError, match=r"no \*_instanceTrainIds.png label files .*convert-coco-object"):
        load_eval_dataset("coco_object", root=str(root))
    assert main(["convert-coco-object", str(root), "--quiet"]) == 0
    assert "wrote 2 COCO-Object label maps" in capsys.readouterr().out
    assert len(load_eval_dataset("coco_object", root=str(root))) == 2
    assert main(["convert-coco-object", str(tmp_path / "nowhere"), "--quiet"]) == 2
    assert "error: no *_labelTrainIds.png files in" in capsys.readouterr().err


def test_bad_layouts_name_the_fix(data, tmp_path):
    with pytest.raises(
        ValueError, match=r"looks like mmsegmentation's data/ folder: pass root=.*VOCdevkit/VOC2012"
    ):
        load_eval_dataset("voc21", root=str(data["root"]))
    with pytest.raises(ValueError, match=r"split file .*ImageSets/Segmentation/test.txt does not exist"):
        bench(data, "voc21", split="test")
    with pytest.raises(ValueError, match="unknown prompts 'clip'"):
        bench(data, "voc21", prompts="clip")
    voc = tmp_path / "VOC2012"
    shutil.copytree(data["root"] / MMSEG_SUBDIRS["voc21"], voc)
    (voc / "ImageSets/Segmentation/val.txt").write_text("2008_000002\n2011_999999\n2008_000002\n")
    with pytest.raises(
        ValueError, match=r"1 of the 2 images named in split file .*val.txt are not in .*\['2011_999999'\]"
    ):
        load_eval_dataset("voc21", root=str(voc))
    (voc / "ImageSets/Segmentation/val.txt").write_text("2008_000002\n\n2008_000002\n2010_000001\n")
    with pytest.raises(ValueError, match=r"1 images in .*JPEGImages have no label PNG .*2010_000001.jpg"):
        load_eval_dataset("voc21", root=str(voc))
    city = tmp_path / "cityscapes"
    shutil.copytree(data["root"] / "cityscapes", city, ignore=shutil.ignore_patterns("*_labelTrainIds.png"))
    with pytest.raises(
        ValueError, match=r"no \*_gtFine_labelTrainIds.png label files .*createTrainIdLabelImgs"
    ):
        load_eval_dataset("cityscapes", root=str(city))


# ------------------------------------------------------------------ equal to the same data as seg_folder
def as_seg_folder(ds, dest: Path) -> object:
    """The benchmark's split images and label files copied into a plain seg_folder (images/, labels/, classes.txt)."""
    (dest / "images").mkdir(parents=True)
    (dest / "labels").mkdir()
    for k, (ip, lp) in enumerate(ds.items):
        shutil.copy(ip, dest / "images" / f"{k:03d}{ip.suffix}")
        shutil.copy(lp, dest / "labels" / f"{k:03d}.png")
    (dest / "classes.txt").write_text("\n".join(ds.class_names) + "\n")
    return load_eval_dataset(
        "seg_folder",
        root=str(dest),
        label_offset=ds.label_offset,
        zero_is_ignore=ds.zero_is_ignore,
        object_class_ids=ds.object_class_ids,
        background_class_ids=ds.background_class_ids,
    )


@pytest.fixture(scope="module")
def toy():
    return ToyEncoder()


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_metrics_equal_seg_folder(data, tmp_path, toy, name):
    ds = bench(data, name)
    ref = as_seg_folder(ds, tmp_path / "seg")
    C = len(ds.class_names)
    text = ClassEmbeddings(
        torch.randn(C, toy.embed_dim, generator=torch.Generator().manual_seed(C)),
        torch.arange(C),
        [[n] for n in ds.class_names],
    )
    s = SegmentationSettings(image_size=None, mode="whole")
    got = evaluate_segmentation(toy, ds, text, s, progress=False)
    want = evaluate_segmentation(toy, ref, text, s, progress=False)
    assert got["num_images"] == want["num_images"] == len(ds) >= 2
    assert torch.equal(got["confusion_matrix"], want["confusion_matrix"])
    assert got["metrics"] == want["metrics"]
    assert got["metrics"]["num_pixels"] > 0 and "miou_objects" in got["metrics"]
    assert ("miou_background" in got["metrics"]) == (ds.background_class is not None)


def test_cli_records_benchmark_identity_and_prompts(data, tmp_path):
    """tipsdistill-eval --dataset voc21 --data-root VOCdevkit/VOC2012: SCLIP prompts (26 background names) are
    encoded, and the split, background preset and class source land in results.json."""
    from tipsdistill.scripts.evaluate import main as evaluate_main

    out = tmp_path / "o"
    rc = evaluate_main(
        ["--model", "python:test_eval_toymodel:build_toy", "--dataset", "voc21",
         "--data-root", str(data["root"] / MMSEG_SUBDIRS["voc21"]), "--image-size", "28", "--mode", "whole",
         "--no-plots", "--out", str(out), "--text-cache", "none", "--quiet"]
    )  # fmt: skip
    res = json.loads((out / "results.json").read_text())
    assert rc == 0 and res["dataset"]["name"] == "voc21" and res["dataset"]["num_images"] == 3
    assert (
        res["dataset"]["background"] == "class"
        and res["dataset"]["split_file"] == "ImageSets/Segmentation/val.txt"
    )
    assert len(res["classes"]) == 21 and len(res["classes"][0]) == 26 and res["classes"][15][0] == "person"
    metrics = res["models"]["model0"]["metrics"]
    assert metrics["miou_objects"] is not None and metrics["miou_background"] is not None
