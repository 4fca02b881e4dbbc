"""Stage 1 feature cache: round trip, int8, views, bad inputs, resume, refusal, workers."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from tests.cache_helpers import build_tiny_teacher, write_captions, write_images
from tipsdistill.cache import ImageFolderDataset, apply_view, extract_features, open_cache
from tipsdistill.cache.datasets import resize_image

REPO = Path(__file__).resolve().parents[1]
TEACHER = "tests.cache_helpers:build_tiny_teacher"


def _cfg(out: Path, root: Path, captions: Path | None = None, **kw):
    d = dict(
        out=str(out),
        teacher=TEACHER,
        dataset="folder",
        dataset_kwargs={"root": str(root)} | ({"captions": str(captions)} if captions else {}),
        image_size=32,
        batch_size=4,
        num_workers=0,
        progress=False,
    )
    d.update(kw)
    return d


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rels = write_images(root / "img", 10)
    write_captions(root / "caps.jsonl", rels, skip=(3,))
    return root / "img", root / "caps.jsonl", rels


def _teacher_features(root: Path, rels: list[str], value_trick: bool = False):
    teacher = build_tiny_teacher()
    ds = ImageFolderDataset(root, image_size=32)
    px = torch.stack([ds[i]["image"] for i in range(len(ds))])
    with torch.inference_mode():
        return teacher, teacher.encode_image(px, value_trick=value_trick)


def test_round_trip_float16(data, tmp_path):
    root, caps, rels = data
    s = extract_features(_cfg(tmp_path / "c", root, caps, value_trick=True))
    assert s["complete"] and s["index"]
    cache = open_cache(
        tmp_path / "c", expect={"dim": 32, "grid": (4, 4), "patch_size": 8, "num_global_tokens": 2}
    )
    assert len(cache) == 10 and cache.keys() == rels
    teacher, ref = _teacher_features(root, rels, value_trick=True)
    for i in range(10):
        it = cache[i]
        assert it["index"] == i and it["key"] == rels[i]
        assert it["patch"].dtype == torch.float32 and it["patch"].shape == (4, 4, 32)
        torch.testing.assert_close(it["patch"], ref.patch[i], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(it["cls"], ref.cls[i], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(it["value_patch"], ref.value_patch[i], atol=2e-3, rtol=2e-3)
        assert set(it["text"]) == {"alt", "short", "detailed"}
        assert it["text_valid"]["alt"] == (i != 3)
        if i != 3:
            emb = teacher.encode_text([f"alt text {i}"])[0]
            torch.testing.assert_close(it["text"]["alt"], emb, atol=5e-3, rtol=2e-3)
            emb = teacher.encode_text([f"détail {i % 3} " * 3])[0]  # repeated captions land on every row
            torch.testing.assert_close(it["text"]["detailed"], emb, atol=5e-3, rtol=2e-3)
        else:
            assert not it["text"]["short"].any()
    m = cache.meta
    assert m["storage_dtype"] == "float16" and m["format_version"] == 3 and m["complete"]
    assert (
        m["teacher"]["name"] == "tiny"
        and m["image_size"] == (32, 32)
        and m["granularities"] == ["alt", "short", "detailed"]
    )
    assert m["patch_mean"].shape == (32,) and m["cls_std"].shape == (2, 32)
    np.testing.assert_allclose(m["patch_mean"], ref.patch.mean((0, 1, 2)).numpy(), atol=1e-4)
    np.testing.assert_allclose(
        m["patch_std"], ref.patch.reshape(-1, 32).std(0, unbiased=False).numpy(), atol=1e-4
    )
    for k in ("git_revision", "toolkit_version", "created", "dataset", "keys_sha1"):
        assert k in m
    assert m["captions_missing"] == {"alt": 1, "short": 1, "detailed": 1}
    with pytest.raises(ValueError, match=r"dim is 32 but 64 was expected"):
        open_cache(tmp_path / "c", expect={"dim": 64})
    with pytest.raises(ValueError, match=r"grid is \[4, 4\] but \[8, 8\] was expected"):
        open_cache(tmp_path / "c", expect={"grid": (8, 8)})
    # rerun of a complete cache: a no-op that says so
    again = extract_features(_cfg(tmp_path / "c", root, caps, value_trick=True))
    assert again["already_complete"]


def test_int8_per_token_cosine(data, tmp_path):
    root, _, rels = data
    extract_features(_cfg(tmp_path / "q", root, storage="int8", granularities=[]))
    cache = open_cache(tmp_path / "q", expect={"storage_dtype": "int8"})
    with h5py.File(tmp_path / "q" / "shard-00000-of-00001.h5") as f:
        assert f["patch"].dtype == np.int8 and f["patch_scale"].shape == (10, 16)
        # format 3: contiguous (no chunk index), row r at the dataset's offset + r * row bytes
        assert f["patch"].chunks is None
        off = f["patch"].id.get_offset()
        raw = np.fromfile(
            tmp_path / "q" / "shard-00000-of-00001.h5", np.int8, count=16 * 32, offset=off + 3 * 16 * 32
        )
        np.testing.assert_array_equal(raw.reshape(16, 32), f["patch"][3])
    _, ref = _teacher_features(root, rels)
    got = torch.stack([cache[i]["patch"] for i in range(10)])
    cos = torch.nn.functional.cosine_similarity(got.reshape(-1, 32), ref.patch.reshape(-1, 32), dim=-1)
    assert cos.min() >= 0.999
    cls = torch.stack([cache[i]["cls"] for i in range(10)])
    assert (
        torch.nn.functional.cosine_similarity(cls.reshape(-1, 32), ref.cls.reshape(-1, 32), dim=-1).min()
        >= 0.999
    )
    assert "text" not in cache[0]


def test_int8_quantiser_matches_numpy_definition():
    """The torch quantiser (run next to the forward) gives the bytes of the format's numpy definition."""
    from tipsdistill.cache.writer import quantise_int8_torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, 64, generator=g) * torch.rand(3, 5, 7, 1, generator=g) * 10
    x[0, 0, 0] = 0  # an all-zero token
    x[0, 0, 1, :2] = torch.tensor([127.0, 0.5])  # a tie (0.5 * 127 / 127): round half to even
    xn = x.numpy()
    scale = np.maximum(np.abs(xn).max(axis=-1) / 127.0, 1e-12).astype(np.float32)
    q = np.clip(np.rint(xn / scale[..., None]), -127, 127).astype(np.int8)
    tq, ts = quantise_int8_torch(x)
    np.testing.assert_array_equal(tq.numpy(), q)
    np.testing.assert_array_equal(ts.numpy(), scale)


def test_views_replay_exactly(data, tmp_path):
    root, _, rels = data
    extract_features(_cfg(tmp_path / "v", root, views=3, granularities=[]))
    cache = open_cache(tmp_path / "v", expect={"num_views": 3})
    teacher = build_tiny_teacher()
    ds = ImageFolderDataset(root)
    for i in (0, 5):
        it = cache[i]
        assert it["patch"].shape == (3, 4, 4, 32) and it["cls"].shape == (3, 2, 32)
        assert it["boxes"].shape == (3, 4) and it["flips"].dtype == torch.bool
        assert it["boxes"][0].tolist() == [0, 0, 1, 1]
        base = resize_image(ds[i]["image"], (32, 32), cache.meta["resize"])
        px = torch.stack([apply_view(base, b, bool(f), (32, 32)) for b, f in zip(it["boxes"], it["flips"])])
        with torch.inference_mode():
            ref = teacher.encode_image(px)
        torch.testing.assert_close(it["patch"], ref.patch, atol=2e-3, rtol=2e-3)


def _save_cmyk_16bit_etc(root: Path) -> dict[str, str]:
    rng = np.random.default_rng(1)
    rgb = (rng.random((40, 40, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).convert("L").save(root / "gray.png")
    Image.fromarray(rgb).convert("RGBA").save(root / "rgba.png")
    Image.fromarray(rgb).convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray((rng.random((40, 40)) * 65535).astype(np.uint16)).save(root / "deep16.png")
    Image.fromarray(rgb).convert("P").save(root / "palette.png")
    Image.fromarray(rgb[:5, :5]).save(root / "tiny.png")
    (root / "zero.png").write_bytes(b"")
    (root / "corrupt.jpg").write_bytes(os.urandom(300))
    buf = root / "full.jpg"
    Image.fromarray(rgb).save(buf, quality=90)
    (root / "truncated.jpg").write_bytes(buf.read_bytes()[:200])
    buf.unlink()
    return {
        "zero.png": "empty",
        "corrupt.jpg": "corrupt",
        "truncated.jpg": "truncated",
        "tiny.png": "too_small",
    }


def test_bad_inputs_recorded_never_silent(tmp_path, caplog):
    root = tmp_path / "bad"
    root.mkdir()
    expected_bad = _save_cmyk_16bit_etc(root)
    caps = tmp_path / "caps.jsonl"
    with open(caps, "wb") as fh:
        fh.write(json.dumps({"image": "gray.png", "alt": "a gray image", "short": ""}).encode() + b"\n")
        fh.write(
            json.dumps({"image": "rgba.png", "captions": {"alt": "rgba", "detailed": "  "}}).encode() + b"\n"
        )
        fh.write(b'{"image": "cmyk.jpg", "alt": "caf\xe9 latin-1 bytes"}\n')  # not UTF-8
        fh.write(b"{not json\n")
    caplog.set_level("WARNING")
    s = extract_features(_cfg(tmp_path / "c", root, caps))
    assert s["complete"]
    skipped = {k: r for _, k, r in s["skipped"]}
    assert set(skipped) == set(expected_bad)
    for k, kind in expected_bad.items():
        assert skipped[k].startswith(kind + ":"), skipped[k]
    cache = open_cache(tmp_path / "c")
    assert sorted(cache.keys()) == sorted(["cmyk.jpg", "deep16.png", "gray.png", "palette.png", "rgba.png"])
    assert {k for _, k, _ in cache.skipped} == set(expected_bad)
    by_key = {cache[i]["key"]: cache[i] for i in range(len(cache))}
    assert by_key["gray.png"]["text_valid"] == {"alt": True, "short": False, "detailed": False}
    assert by_key["rgba.png"]["text_valid"] == {"alt": True, "short": False, "detailed": False}
    assert not any(by_key["cmyk.jpg"]["text_valid"].values())
    problems = " ".join(cache.meta["caption_problems"])
    assert "not valid utf-8" in problems and "line 3" in problems.replace("lines 3", "line 3")
    assert "not valid JSON" in problems
    log = caplog.text
    assert "skipped 4 image(s)" in log and "too_small 1" in log and "not valid utf-8" in log
    # conversions: 16-bit is scaled, not clipped; RGBA is composited, grayscale replicated
    deep = ImageFolderDataset(root, image_size=None, min_side=8)
    img16 = deep[deep.keys().index("deep16.png")]["image"]
    assert img16.shape == (3, 40, 40) and 0.2 < float(img16.mean()) < 0.8


def test_resume_refuses_mismatch(data, tmp_path):
    root, caps, _ = data
    out = tmp_path / "c"
    extract_features(_cfg(out, root, granularities=[]))
    with pytest.raises(
        ValueError, match=r"image_size differs: the cache has \[32, 32\], this run has \[40, 40\]"
    ):
        extract_features(_cfg(out, root, granularities=[], image_size=40))
    with pytest.raises(
        ValueError, match=r"teacher differs: the cache has \{'seed': 0\}, this run has \{'seed': 1\}"
    ):
        extract_features(_cfg(out, root, granularities=[], teacher_kwargs={"seed": 1}))
    with pytest.raises(ValueError, match=r"dataset differs: the cache has \{'captions': None\}"):
        extract_features(_cfg(out, root, caps, granularities=[]))


def test_disk_space_refused_with_numbers(data, tmp_path, monkeypatch):
    import shutil as _sh

    root, _, _ = data
    monkeypatch.setattr(
        "tipsdistill.cache.commit.shutil.disk_usage",
        lambda p: _sh._ntuple_diskusage(10**6, 10**6 - 1000, 1000),
    )
    with pytest.raises(
        OSError, match=r"not enough disk space .* needs about .* per image x 10 images .* only 1000.0 B free"
    ):
        extract_features(_cfg(tmp_path / "c", root))
    assert not list((tmp_path / "c").glob("*.h5"))


def _run_cli(args: list[str], **kw) -> subprocess.Popen:
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "tipsdistill.scripts.cache_features", *args], cwd=REPO, env=env, **kw
    )


def _h5_contents(path: Path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(path) as f:
        f.visititems(lambda n, o: out.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
        out["attrs"] = {
            k: v for k, v in f.attrs.items() if k not in ("created", "finished", "config", "git_revision")
        }
    return out


def test_kill9_then_resume_matches_uninterrupted(tmp_path):
    root = tmp_path / "img"
    rels = write_images(root, 24, seed=3)
    caps = tmp_path / "caps.jsonl"
    write_captions(caps, rels, skip=(5,))
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    prog = tmp_path / "progress"
    out = tmp_path / "killed"
    kw = ["--teacher-kw", f"progress_file={json.dumps(str(prog))}", "delay=0.08"]
    args = [
        "--images",
        str(root),
        "--captions",
        str(caps),
        "--out",
        str(out),
        "--image-size",
        "32",
        "--batch-size",
        "3",
    ]
    args += ["--num-workers", "0", "--flush-interval", "0", "--quiet", "--teacher", TEACHER, "--value-trick"]
    proc = _run_cli(args + kw, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = random.Random().randint(3, 8)  # of 9 batches (1 probe call + forwards)
    t0 = time.time()
    while time.time() - t0 < 60:
        # read once: the teacher rewrites the file (truncate, then write), so two reads can disagree
        txt = prog.read_text().strip() if prog.exists() else ""
        if txt and int(txt) >= target:
            break
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    shard = out / "shard-00000-of-00001.h5"
    assert shard.exists() and not (out / "index.h5").exists()
    with h5py.File(shard) as f:
        assert not f.attrs["complete"] and not f["done"][()].all()
        done_before = int(f["done"][()].sum())
    with pytest.raises(ValueError, match="incomplete"):
        open_cache(out)
    # resume: rerun the same command
    done = subprocess.run(
        [sys.executable, "-m", "tipsdistill.scripts.cache_features", *args, *kw],
        cwd=REPO,
        env=os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "cache complete" in done.stdout
    assert ("resuming" in done.stderr) == (done_before > 0), (done_before, done.stderr[-2000:])
    # the uninterrupted reference, same settings, in this process (one thread, like the CLI runs)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tkw = {"progress_file": str(tmp_path / "p2"), "delay": 0.0}
        extract_features(
            _cfg(tmp_path / "ref", root, caps, batch_size=3, value_trick=True, teacher_kwargs=tkw)
        )
    finally:
        torch.set_num_threads(threads)
    a = _h5_contents(shard)
    b = _h5_contents(tmp_path / "ref" / "shard-00000-of-00001.h5")
    assert sorted(a) == sorted(b)
    for k in a:
        if k == "attrs":
            for ak in a[k]:
                if ak == "teacher_spec":  # differs only in the test's slowdown knobs
                    continue
                np.testing.assert_array_equal(a[k][ak], b[k][ak], err_msg=ak)
        else:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert a["attrs"]["complete"] and a["done"].all()
    c1, c2 = open_cache(out), open_cache(tmp_path / "ref")
    assert len(c1) == len(c2) == 24
    for i in range(24):
        torch.testing.assert_close(c1[i]["patch"], c2[i]["patch"], rtol=0, atol=0)
