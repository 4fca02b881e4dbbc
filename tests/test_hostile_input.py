"""Hostile input (issue #27, points 0-7): a file someone hands you is data, never code, and never ends a run.

Generated data in the layouts users have: a ``.jpg`` whose bytes are PostScript, images above a pixel cap, a
16 x 4000 strip, a float TIFF with NaN pixels, a teacher whose outputs overflow float16 (or are NaN), file
names that are not UTF-8 in a folder and in a tar, a CSV with a malformed row beside a quoted multi-line
caption, table cells with ``..`` and absolute paths, a cache whose ``teacher_spec`` names ``subprocess:call``,
and checkpoints holding a pickle that would run code. Every test fails on the code before the fix.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import EpsImagePlugin, Image, ImageFile

from tests.cache_helpers import TinyTeacher, write_images
from tipsdistill.cache import extract_features, open_cache
from tipsdistill.cache.datasets import BadImageError, ImageFolderDataset, load_image, resize_image
from tipsdistill.cache.format import read_chunk_map, row_checksum
from tipsdistill.teachers.base import DenseFeatures, Teacher

TEACHER = "tests.cache_helpers:build_tiny_teacher"


def _cfg(out: Path, dataset: str, kwargs: dict, **kw) -> dict:
    return (
        dict(
            out=str(out),
            teacher=TEACHER,
            dataset=dataset,
            dataset_kwargs=kwargs,
            image_size=32,
            batch_size=4,
            num_workers=0,
            progress=False,
        )
        | kw
    )


def _png(path: Path, size: tuple[int, int] = (40, 48), value: int | None = None, seed: int = 0) -> Path:
    w, h = size
    rng = np.random.default_rng(seed)
    arr = (
        np.full((h, w, 3), value, np.uint8)
        if value is not None
        else (rng.random((h, w, 3)) * 255).astype(np.uint8)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _postscript(path: Path) -> Path:
    """An EPS document saved under a ``.jpg`` name: Pillow would hand it to Ghostscript."""
    path.write_bytes(
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n"
    )
    return path


@pytest.fixture
def ghostscript(monkeypatch):
    """Pillow's Ghostscript call replaced by one that fails the way a real ``gs`` failure does."""
    calls: list[tuple] = []

    def fake(*args, **kwargs):
        calls.append(args)
        raise subprocess.CalledProcessError(1, ["gs", "-q", "-dBATCH"])

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", fake)
    return calls


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    write_images(root / "img", 6)
    out = root / "cache"
    extract_features(_cfg(out, "folder", {"root": str(root / "img")}))
    return out


# ----------------------------------------------------------------------------- point 0
def test_every_loss_term_keeps_its_shape_and_gradient_with_nothing_valid():
    from tipsdistill.distill.losses import (
        DINOLoss,
        ImageTextLoss,
        KoLeoLoss,
        PatchFeatureLoss,
        PatchPrototypeLoss,
    )
    from tipsdistill.distill.task import _scalar_params_as_vectors

    torch.manual_seed(0)
    B, D, K = 4, 16, 8
    clip = ImageTextLoss()
    _scalar_params_as_vectors(clip)  # what the task does for DeepSpeed: the temperature becomes shape (1,)
    assert clip.contrastive.log_scale.shape == (1,)
    tokens = torch.randn(B, 2, D, requires_grad=True)
    text = {"alt": torch.randn(B, D), "caption": torch.randn(B, D)}
    none = torch.zeros(B, dtype=torch.bool)
    # one granularity has no valid caption in this batch (web data), the other has some
    out = clip(tokens, text, {"alt": none, "caption": torch.tensor([True, False, True, True])})["clip"]
    assert out.shape == () and torch.isfinite(out)
    # no valid caption at all: a 0-d zero that still reaches the tokens and the temperature
    empty = clip(tokens, text, {"alt": none, "caption": none})["clip"]
    assert empty.shape == () and float(empty.detach()) == 0.0

    proto = PatchPrototypeLoss(K, masked_weight=1.0, visible_weight=0.0)  # iBOT: masked tokens only
    s_logits = torch.randn(B, 9, K, requires_grad=True)
    no_mask = torch.zeros(B, 9, dtype=torch.bool)
    patch_proto = proto(s_logits, torch.randn(B, 9, K), no_mask)["patch"]
    feat = PatchFeatureLoss("cosine", masked_weight=1.0, visible_weight=0.0, student_dim=D, teacher_dim=D)
    s_tokens = torch.randn(B, 9, D, requires_grad=True)
    patch_feat = feat(s_tokens, torch.randn(B, 9, D), no_mask)["patch"]
    one = torch.randn(1, D, requires_grad=True)
    koleo = KoLeoLoss()(one)["koleo"]  # one row on this rank: no neighbour
    dino = DINOLoss(K)(torch.randn(2, B, K, requires_grad=True), torch.randn(B, K))["dino"]
    terms = {
        "clip": empty,
        "patch_proto": patch_proto,
        "patch_feat": patch_feat,
        "koleo": koleo,
        "dino": dino,
    }
    for name, t in terms.items():
        assert t.shape == () and t.requires_grad, (name, t.shape)
    total = torch.stack(list(terms.values())).sum()  # what the task and the logging do with the terms
    total.backward()
    for name, leaf in [("tokens", tokens), ("s_logits", s_logits), ("s_tokens", s_tokens), ("one", one)]:
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all(), name
    assert clip.contrastive.log_scale.grad is not None


# ----------------------------------------------------------------------------- point 2
def test_postscript_jpg_is_never_handed_to_ghostscript(tmp_path, ghostscript):
    from tipsdistill.distill.evaluation.datasets import load_image as eval_load_image

    ps = _postscript(tmp_path / "photo.jpg")
    for load in (load_image, eval_load_image):
        with pytest.raises(BadImageError) as e:
            load(ps)
        assert e.value.kind == "corrupt" and "format the toolkit decodes" in str(e.value)
    assert ghostscript == []


def test_evaluation_skips_and_lists_an_image_it_cannot_use(tmp_path, ghostscript):
    from tests.test_eval_toymodel import ToyEncoder
    from tipsdistill.distill.evaluation import SegmentationSettings, evaluate_segmentation, load_eval_dataset
    from tipsdistill.distill.evaluation.text import resolve_class_embeddings

    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    _png(tmp_path / "images" / "a.png", (42, 28))
    _postscript(tmp_path / "images" / "b.jpg")
    (tmp_path / "labels").mkdir()
    for stem in "ab":
        Image.fromarray(np.zeros((28, 42), np.uint8)).save(tmp_path / "labels" / f"{stem}.png")
    ds = load_eval_dataset("seg_folder", root=str(tmp_path))
    model = ToyEncoder()
    text = resolve_class_embeddings(ds.class_names, model=model, cache_dir=None)
    res = evaluate_segmentation(
        model, ds, text, SegmentationSettings(image_size=28, mode="whole"), progress=False
    )
    assert res["num_images"] == 1 and [(s["index"], s["kind"]) for s in res["skipped"]] == [(1, "corrupt")]
    assert "b.jpg" in res["skipped"][0]["error"] and ghostscript == []


def test_stage1_skips_and_counts_hostile_images(tmp_path, ghostscript, capsys, monkeypatch):
    root = tmp_path / "img"
    root.mkdir()
    _postscript(root / "photo.jpg")
    _png(root / "big.png", (120, 120))  # 14400 px: between 1x and 2x Pillow's limit below (Pillow only warns)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    cfg = _cfg(tmp_path / "c", "folder", {"root": str(root)})
    s = extract_features(cfg)
    reasons = {k: r for _, k, r in s["skipped"]}
    assert set(reasons) == {"photo.jpg", "big.png"}
    assert reasons["photo.jpg"].startswith("corrupt:") and reasons["big.png"].startswith("too_large:")
    assert ghostscript == []
    out = capsys.readouterr().out
    assert "cache complete:" in out and "0 cached, 2 skipped (of 2 samples)" in out
    extract_features(cfg)  # a rerun of the complete cache says the same
    assert "already complete: 0 cached, 2 skipped" in capsys.readouterr().out


# ----------------------------------------------------------------------------- point 3
def test_pixel_cap_is_an_error_before_decoding(tmp_path, monkeypatch):
    path = _png(tmp_path / "a.png", (40, 40))  # 1600 px: between 1x and 2x the limit below
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    decoded: list[str] = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: decoded.append(im.format) or real_load(im))
    with pytest.raises(BadImageError) as e:
        load_image(path)
    assert e.value.kind == "too_large" and "1600 px" in str(e.value)
    assert decoded == []  # refused from the header, nothing decoded
    with pytest.raises(BadImageError, match="too_large|above the pixel cap"):
        ImageFolderDataset(tmp_path, max_pixels=1599)[0]
    assert load_image(path, max_pixels=0).shape == (3, 40, 40)  # 0: no cap
    assert decoded and set(decoded) == {"PNG"}


def test_strip_is_cropped_in_source_coordinates_before_resizing(tmp_path, monkeypatch):
    import tipsdistill.cache.datasets as cds

    strip = _png(tmp_path / "strip.png", (4000, 16))
    sizes: list[tuple[int, ...]] = []
    real = cds.F.interpolate

    def spy(x, size=None, **kw):
        sizes.append(tuple(x.shape[-2:]))
        sizes.append(tuple(size))
        return real(x, size=size, **kw)

    monkeypatch.setattr(cds.F, "interpolate", spy)
    out = ImageFolderDataset(tmp_path, image_size=448)[0]["image"]  # how stage 1 reads it
    assert out.shape == (3, 448, 448)
    tensor_out = resize_image(torch.rand(3, 16, 4000), (448, 448))
    assert tensor_out.shape == (3, 448, 448)
    # never the 448 x 112000 upsample of the whole strip: the inputs are the 16 x 16 centre, outputs the target
    assert sizes and all(h * w <= 448 * 448 for h, w in sizes), sizes
    assert (16, 16) in sizes
    # decoding with a target equals resizing the full decode (what stage 2 does with the base image), exactly
    photo = _png(tmp_path / "photo.png", (53, 37), seed=5)
    for path, size in [(strip, (448, 448)), (photo, (32, 24)), (photo, (16, 40))]:
        assert torch.equal(load_image(path, size=size), resize_image(load_image(path), size))


# ----------------------------------------------------------------------------- point 4
def test_nan_pixels_of_a_float_tiff_are_a_bad_image(tmp_path):
    arr = np.full((24, 24), 0.5, np.float32)
    arr[3, 4] = np.nan
    path = tmp_path / "nan.tif"
    Image.fromarray(arr, mode="F").save(path)
    with pytest.raises(BadImageError) as e:
        load_image(path)
    assert e.value.kind == "nonfinite" and "not finite" in str(e.value)


class _HotTeacher(TinyTeacher):
    """The tiny teacher, whose patch tokens of a white image are ``value`` (1e6 overflows float16; NaN)."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def encode_image(self, pixels: torch.Tensor, **kw) -> DenseFeatures:
        out = super().encode_image(pixels, **kw)
        hot = pixels.flatten(1).mean(1) > 0.99
        patch = out.patch.clone()
        patch[hot] = self.value
        return DenseFeatures(out.cls, patch, out.value_patch, out.extras)


@pytest.mark.parametrize("storage,value", [("float16", 1e6), ("int8", float("nan"))])
def test_nonfinite_teacher_outputs_are_skipped_never_stored(tmp_path, storage, value):
    root = tmp_path / "img"
    write_images(root, 3)
    _png(root / "white.png", (40, 40), value=255)
    s = extract_features(
        _cfg(tmp_path / "c", "folder", {"root": str(root)}, storage=storage),
        teacher=_HotTeacher(value).freeze(),
    )
    reasons = {k: r for _, k, r in s["skipped"]}
    assert list(reasons) == ["white.png"] and reasons["white.png"].startswith("nonfinite:"), reasons
    assert "patch" in reasons["white.png"]
    cache = open_cache(tmp_path / "c")
    assert len(cache) == 3 and "white.png" not in cache.keys()
    for i in range(len(cache)):
        assert torch.isfinite(cache[i]["patch"]).all()
    assert all(np.isfinite(np.asarray(cache.meta[k])).all() for k in ("patch_mean", "patch_std"))


def test_verify_flags_nonfinite_rows(tiny_cache, tmp_path, capsys):
    from tipsdistill.scripts.cache_features import verify_main

    out = tmp_path / "cache"
    shutil.copytree(tiny_cache, out)
    assert verify_main(str(out)) == 0
    shard = next(out.glob("shard-*.h5"))
    names = [str(x) for x in read_chunk_map(shard)["@checked"]]
    with h5py.File(shard, "r+") as f:  # a row as an older version stored it: NaN, with a matching checksum
        f["patch"][1] = np.full(f["patch"].shape[1:], np.nan, f["patch"].dtype)
        f["checksum"][1] = row_checksum({n: f[n][1:2] for n in names}, 0, names)
    capsys.readouterr()
    assert verify_main(str(out)) == 1
    printed = capsys.readouterr().out
    assert "DAMAGED" in printed and "non-finite" in printed and "rows [1]" in printed


def test_stage2_names_the_keys_of_a_nonfinite_batch():
    from tipsdistill.distill.data import collate
    from tipsdistill.distill.train import TrainingDiverged, _all_reduce_terms, _drain_terms

    batch = collate([{"key": f"00003/00000{i}", "x": torch.zeros(2)} for i in range(3)])
    keys = batch["key"]
    ok = (1, 0, *_all_reduce_terms({"patch": torch.tensor(1.0), "clip": torch.tensor(2.0)}, 1, 0), keys)
    bad = (
        2,
        0,
        *_all_reduce_terms({"patch": torch.tensor(float("nan")), "clip": torch.tensor(2.0)}, 1, 0),
        keys,
    )
    assert _drain_terms([ok], 1, 1, 0) == [{"clip": 2.0, "patch": 1.0}]
    with pytest.raises(TrainingDiverged) as e:
        _drain_terms([ok, bad], 1, 1, 0)
    msg = str(e.value)
    assert "'patch' is nan at step 2" in msg and "rank(s) [0]" in msg
    assert all(k in msg for k in keys)
    from tipsdistill.distill.train import _batch_keys  # what the loop puts with each micro step's terms

    assert _batch_keys(batch) == ["00003/000000", "00003/000001", "00003/000002"]


# ----------------------------------------------------------------------------- point 5
def test_non_utf8_names_in_a_folder_and_a_tar_are_kept_escaped(tmp_path):
    from tipsdistill.cache.shards import WebDatasetShards

    root = tmp_path / "img"
    write_images(root, 2)
    raw = b"caf\xe9.png"
    _png(root / os.fsdecode(raw), (40, 40), seed=3)
    s = extract_features(_cfg(tmp_path / "c", "folder", {"root": str(root)}))
    assert s["complete"] and not s["skipped"]
    from tipsdistill.cache.datasets import unescape_name

    cache = open_cache(tmp_path / "c")
    key = "caf\\xe9.png"
    assert key in cache.keys() and unescape_name(key) == raw
    problems = [
        json.loads(line) for line in (tmp_path / "c" / "dataset_problems.jsonl").read_text().splitlines()
    ]
    assert [(p["kind"], p["key"]) for p in problems] == [("escaped_name", key)]

    # a tar member name that is not UTF-8 (webdataset shards written on another system)
    tar = tmp_path / "00000.tar"
    buf = io.BytesIO()
    Image.open(root / os.fsdecode(raw)).save(buf, "JPEG")
    members = []
    for stem in ("ok", os.fsdecode(b"na\xefve")):  # the second: Latin-1 bytes, not UTF-8
        members += [(f"{stem}.jpg", buf.getvalue()), (f"{stem}.txt", b"a caption")]
    with tarfile.open(tar, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    ds = WebDatasetShards(str(tar))
    assert sorted(ds.keys()) == ["00000/na\\xefve", "00000/ok"]
    for k in ds.keys():
        k.encode("utf-8")  # storable in HDF5 / JSON
    i = ds.keys().index("00000/na\\xefve")
    assert unescape_name(ds.keys()[i].split("/", 1)[1]) == b"na\xefve"
    item = ds[i]
    assert item["image"].shape[0] == 3 and item["captions"] == {"alt": "a caption"}
    assert any(p["kind"] == "escaped_name" for p in ds.problems)


def test_malformed_csv_row_is_skipped_and_a_multiline_caption_reads(tmp_path):
    from tipsdistill.cache.tables import TableDataset

    for i in range(3):
        _png(tmp_path / f"i{i}.png", seed=i)
    csv = tmp_path / "captions.csv"
    csv.write_text(
        'image,caption\ni0.png,"first line\nsecond line, with a comma"\ni1.png,a,stray,field\ni2.png,plain\n',
        encoding="utf-8",
    )
    ds = TableDataset(csv)
    assert len(ds) == 2
    assert ds[0]["captions"] == {"alt": "first line\nsecond line, with a comma"}
    assert ds[1]["captions"] == {"alt": "plain"} and ds[1]["image"].shape[0] == 3
    bad = [p for p in ds.problems if p["kind"] == "bad_row"]
    assert len(bad) == 1 and "i1.png,a,stray,field" in bad[0]["message"] and "4 field(s)" in bad[0]["message"]
    assert "record 3 (the header is 1)" in bad[0]["message"]


# ----------------------------------------------------------------------------- point 6
def test_table_paths_outside_the_dataset_are_refused_unless_allowed(tmp_path):
    from tipsdistill.cache.dataset_spec import source_for_cache
    from tipsdistill.distill.evaluation.datasets import CaptionFolder

    data = tmp_path / "data"
    _png(data / "imgs" / "a.png", seed=1)
    _png(tmp_path / "up.png", seed=2)  # reached with ..
    elsewhere = _png(tmp_path / "elsewhere" / "b.png", seed=3)  # an absolute path
    csv = data / "t.csv"
    csv.write_text(f"image,caption\nimgs/a.png,in\n../up.png,up\n{elsewhere},abs\n", encoding="utf-8")
    kw = {"path": str(csv)}
    s = extract_features(_cfg(tmp_path / "c", "table", kw))
    reasons = {k: r for _, k, r in s["skipped"]}
    assert set(reasons) == {"t.csv/1", "t.csv/2"}
    assert all(r.startswith("outside_root:") and "refused (allow" in r for r in reasons.values())
    assert "allow_root=FOLDER" in reasons["t.csv/1"]
    # the user allows the folder explicitly: every row is read
    allowed = extract_features(_cfg(tmp_path / "c2", "table", kw | {"allow_root": [str(tmp_path)]}))
    assert not allowed["skipped"] and len(open_cache(tmp_path / "c2")) == 3
    # stage 2 rebuilds the images from the cache's recorded spec: the permission is not inherited
    src = source_for_cache(tmp_path / "c2")
    assert src[0]["image"].shape[0] == 3
    with pytest.raises(BadImageError) as e:
        src[1]
    assert e.value.kind == "outside_root"
    src = source_for_cache(tmp_path / "c2", dataset_kwargs={"allow_root": [str(tmp_path)]})
    assert src[2]["image"].shape[0] == 3
    # evaluation: a caption file pointing outside its folder
    (data / "captions.jsonl").write_text(
        json.dumps({"image": "imgs/a.png", "caption": "in"})
        + "\n"
        + json.dumps({"image": "../up.png", "caption": "up"})
        + "\n"
    )
    with pytest.raises(BadImageError, match="outside the dataset's folder"):
        CaptionFolder(data)
    assert len(CaptionFolder(data, allow_root=str(tmp_path))) == 2


# ----------------------------------------------------------------------------- point 1
def make_marker(path: str) -> str:
    """A 'teacher factory' that writes a marker file: if it runs, the cache ran code."""
    Path(path).write_text("ran")
    return path


def _set_teacher_spec(cache: Path, spec: dict) -> None:
    for p in cache.glob("*.h5"):
        with h5py.File(p, "r+") as f:
            f.attrs["teacher_spec"] = json.dumps(spec)


def test_cache_teacher_spec_never_runs_code(tiny_cache, tmp_path):
    from tipsdistill.distill.config import TrainConfig
    from tipsdistill.distill.evaluation.while_training import _teacher_for_text

    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)
    cfg = TrainConfig()
    cfg.eval.every, cfg.cache.path = 1, str(cache)
    marker = tmp_path / "ran"
    hostile = [
        {"teacher": "subprocess:call", "kwargs": {"args": ["mkdir", str(marker)]}},
        {"teacher": "tests.test_hostile_input:make_marker", "kwargs": {"path": str(marker)}},
    ]
    for spec in hostile:
        _set_teacher_spec(cache, spec)
        meta = open_cache(cache).meta
        assert meta["teacher_spec"] == spec
        with pytest.raises(ValueError, match="trust_remote_code") as e:
            _teacher_for_text(cfg, None, meta)
        assert spec["teacher"] in str(e.value) and str(cache) in str(e.value)
        assert not marker.exists()
    # the user opts in: the recorded factory is imported and called
    _set_teacher_spec(cache, {"teacher": TEACHER, "kwargs": {"seed": 1}})
    cfg.eval.trust_remote_code = True
    teacher = _teacher_for_text(cfg, None, open_cache(cache).meta)
    assert isinstance(teacher, Teacher) and teacher.seed == 1


# ----------------------------------------------------------------------------- point 7
class _RunsCode:
    """Unpickling this calls ``os.makedirs(path)``: what a malicious checkpoint does (harmlessly here)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def test_checkpoint_pickles_that_run_code_are_refused(tmp_path):
    from tipsdistill.distill.checkpoint import consolidated_state_dict, read_model_states
    from tipsdistill.distill.export import student_from_checkpoint

    marker = tmp_path / "ran"
    stage0 = tmp_path / "a" / "checkpoints" / "step_00000001"
    stage0.mkdir(parents=True)
    torch.save(
        {"module": {"w": torch.ones(2)}, "hook": _RunsCode(marker)}, stage0 / "mp_rank_00_model_states.pt"
    )
    (stage0 / "complete.json").write_text(json.dumps({"step": 1, "world_size": 1}))
    with pytest.raises(ValueError, match="allow-list"):
        read_model_states(stage0)
    assert not marker.exists()
    with pytest.raises(ValueError, match="allow-list"):  # export and evaluation read checkpoints this way
        student_from_checkpoint(stage0)
    assert not marker.exists()
    # ZeRO-2: the model states are harmless, the optimizer states are not; refused before DeepSpeed reads them
    zero2 = tmp_path / "b" / "checkpoints" / "step_00000001"
    zero2.mkdir(parents=True)
    torch.save(
        {"module": None, "ds_config": {"zero_optimization": {"stage": 2}}},
        zero2 / "mp_rank_00_model_states.pt",
    )
    torch.save(
        {"optimizer_state_dict": _RunsCode(marker)}, zero2 / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    )
    with pytest.raises(ValueError, match="allow-list"):
        consolidated_state_dict(zero2)
    assert not marker.exists()
    from tipsdistill.distill.checkpoint import UnsafeCheckpointError, safe_load

    with pytest.raises(UnsafeCheckpointError):
        safe_load(zero2 / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    # what real checkpoints hold (tensors, the numpy / Python / torch RNG states) loads
    real = tmp_path / "real.pt"
    torch.save(
        {
            "module": {"w": torch.ones(2)},
            "rng": {
                "numpy": np.random.get_state(),
                "python": random.getstate(),
                "torch": torch.get_rng_state(),
            },
        },
        real,
    )
    back = safe_load(real)
    assert back["rng"]["numpy"][1].dtype == np.uint32 and torch.equal(back["module"]["w"], torch.ones(2))
