"""Reduced-dimension storage (``reduce_dim``): the codec, the PCA cache round trip, resume keeps the
basis, the spec's facts, and a stage-2 run on a PCA cache."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
import torch

from tests.cache_helpers import build_tiny_teacher, write_captions, write_images
from tests.launch_helpers import torchrun
from tests.test_cache import _cfg as base_cfg
from tests.test_train_support import base_overrides, make_cache, run_subprocess
from tipsdistill.cache import CacheSpec, ImageFolderDataset, extract_features, open_cache
from tipsdistill.cache.codec import decode
from tipsdistill.cache.reduce import BASIS_FILE, Reduction

TEACHER = "tests.cache_helpers:build_tiny_teacher"
SHARD = "shard-00000-of-00001.h5"


def _cfg(out, root, captions=None, **kw):
    """test_cache's stage-1 config with an 8-dim PCA fitted on 6 images."""
    return base_cfg(out, root, captions, **({"reduce_dim": 8, "reduce_fit_images": 6} | kw))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rels = write_images(root / "img", 10)
    write_captions(root / "caps.jsonl", rels)
    return root / "img", root / "caps.jsonl", rels


def _reference(root):
    teacher = build_tiny_teacher()
    ds = ImageFolderDataset(root, image_size=32)
    px = torch.stack([ds[i]["image"] for i in range(len(ds))])
    with torch.inference_mode():
        return teacher.encode_image(px, value_trick=True)


def test_codec_decode_round_trip_and_errors():
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(32, 8, generator=g))  # (D, K) orthonormal columns
    mean = torch.randn(32, generator=g)
    coef = torch.randn(5, 16, 8, generator=g)
    x = coef @ basis.T + mean  # tokens in the basis' span
    got = decode(((x - mean) @ basis).numpy(), basis=basis.numpy(), mean=mean.numpy())
    assert got.dtype == torch.float32 and got.shape == (5, 16, 32)
    torch.testing.assert_close(got, x, atol=1e-5, rtol=1e-5)
    # int8 coefficients with a per-token scale: q * scale, then the basis
    scale = coef.abs().amax(-1) / 127
    q = (coef / scale[..., None]).round().to(torch.int8)
    torch.testing.assert_close(
        decode(q, scale, basis=basis, mean=mean), (q.float() * scale[..., None]) @ basis.T + mean
    )
    torch.testing.assert_close(decode(q, scale), q.float() * scale[..., None])
    assert decode(coef.half()).dtype == torch.float32
    with pytest.raises(ValueError, match="per-token scale"):
        decode(q)
    with pytest.raises(ValueError, match=r"basis has shape \(32, 8\), expected \(D, 4\)"):
        decode(coef[..., :4], basis=basis)
    with pytest.raises(ValueError, match="mean given without basis"):
        decode(coef, mean=mean)


@pytest.mark.parametrize("storage", ["float16", "int8"])
def test_pca_cache_round_trip(data, tmp_path, storage):
    root, caps, rels = data
    s = extract_features(_cfg(tmp_path / "c", root, caps, storage=storage, value_trick=True))
    assert s["complete"]
    cache = open_cache(tmp_path / "c", expect={"dim": 32, "reduce_dim": 8})
    sp = cache.spec
    assert (sp.dim, sp.reduce_dim, sp.stored_dim, sp.storage_dtype) == (32, 8, 8, storage)
    assert CacheSpec.from_meta(cache.meta).reduce_dim == 8 and sp.summary()["reduce_dim"] == 8
    red = cache.reduction
    assert red is not None and set(red.bases) == {"patch", "value_patch"}
    fit = cache.meta["reduce_fit"]
    assert (
        fit["images"] == 6
        and fit["tokens"]["patch"] == 6 * 16
        and 0 < fit["explained_variance"]["patch"] <= 1
    )
    ref = _reference(root)
    with h5py.File(tmp_path / "c" / SHARD) as f:
        assert f["patch"].shape == (10, 16, 8) and f["patch"].dtype == np.dtype(storage)
        assert f["cls"].shape == (10, 2, 32)  # global tokens keep their full dimension
        stored = f["patch"][()]
        scale = f["patch_scale"][()] if storage == "int8" else None
        mean, basis = f["reduce/patch/mean"][()], f["reduce/patch/basis"][()]
    np.testing.assert_allclose(basis.T @ basis, np.eye(8), atol=1e-5)  # orthonormal columns
    # the basis is the top-8 PCA of the first 6 images' patch tokens
    tok = ref.patch[:6].reshape(-1, 32).double()
    cov = torch.cov(tok.T, correction=0)
    evals = torch.linalg.eigvalsh(cov)
    proj = torch.from_numpy(basis).double()
    kept = float(torch.trace(proj.T @ cov @ proj))
    assert kept == pytest.approx(float(evals[-8:].sum()), rel=1e-4)
    np.testing.assert_allclose(mean, tok.mean(0).numpy(), atol=1e-5)
    # the reader returns decode(stored) in full dimension, float32
    items = cache.__getitems__(list(range(10)))
    got = torch.stack([it["patch"] for it in items])
    want = decode(stored, scale, basis=basis, mean=mean).reshape(10, 4, 4, 32)
    torch.testing.assert_close(got, want)
    assert got.dtype == torch.float32 and got.shape == (10, 4, 4, 32)
    # and that is the teacher's tokens projected on the basis (up to the storage dtype)
    projected = (
        ref.patch.reshape(10, 16, 32) - torch.from_numpy(mean)
    ) @ proj.float() @ proj.float().T + torch.from_numpy(mean)
    tol = 2e-2 if storage == "int8" else 3e-3
    torch.testing.assert_close(got.reshape(10, 16, 32), projected, atol=tol, rtol=tol)
    torch.testing.assert_close(torch.stack([it["cls"] for it in items]), ref.cls, atol=2e-2, rtol=2e-2)
    # the index holds the same basis as the shard, and OUT/reduce_basis.npz too
    with h5py.File(tmp_path / "c" / "index.h5") as f:
        np.testing.assert_array_equal(f["reduce/patch/basis"][()], basis)
    np.testing.assert_array_equal(Reduction.load(tmp_path / "c" / BASIS_FILE).bases["patch"][1], basis)
    # the patch statistics are the teacher's full-dimension ones
    assert cache.meta["patch_mean"].shape == (32,)


def test_resume_keeps_the_basis_and_refuses_other_settings(data, tmp_path, monkeypatch):
    root, caps, _ = data
    out = tmp_path / "r"
    extract_features(_cfg(out, root, caps))
    ref = open_cache(out)
    ref_items = [it["patch"] for it in ref.__getitems__(list(range(10)))]
    ref_basis = ref.reduction.bases["patch"][1].copy()
    ref.close()
    # interrupt: the last 6 samples not done, the shard incomplete, no index, no cache-level basis file
    with h5py.File(out / SHARD, "r+") as f:
        f["done"][4:] = False
        f.attrs["complete"] = False
    (out / "index.h5").unlink()
    (out / BASIS_FILE).unlink()
    import tipsdistill.cache.basis as basis

    def no_refit(plan, layout):
        raise AssertionError("a resume must reuse the stored basis, not fit a new one")

    monkeypatch.setattr(basis, "fit_reduction", no_refit)
    s = extract_features(_cfg(out, root, caps))
    assert s["complete"] and s["done"] == 10
    again = open_cache(out)
    np.testing.assert_array_equal(again.reduction.bases["patch"][1], ref_basis)
    for a, b in zip(again.__getitems__(list(range(10))), ref_items):
        torch.testing.assert_close(a["patch"], b, atol=0, rtol=0)
    with pytest.raises(
        ValueError, match=r"reduce differs: the cache has \{'dim': 8\}, this run has \{'dim': 4\}"
    ):
        extract_features(_cfg(out, root, caps, reduce_dim=4))
    with pytest.raises(ValueError, match=r"reduce differs: the cache has .*this run has None"):
        extract_features(_cfg(out, root, caps, reduce_dim=0))


def test_reduce_dim_checked(data, tmp_path):
    root, caps, _ = data
    with pytest.raises(ValueError, match=r"reduce_dim 32 is not below the teacher's feature dim 32"):
        extract_features(_cfg(tmp_path / "x", root, caps, reduce_dim=32))
    with pytest.raises(ValueError, match="reduce_dim must be >= 0"):
        extract_features(_cfg(tmp_path / "x", root, caps, reduce_dim=-1))


def test_stage2_trains_on_a_pca_cache(tmp_path):
    cache = make_cache(tmp_path / "pca", reduce_dim=12, reduce_fit_images=32)
    spec = open_cache(cache).spec
    assert (spec.dim, spec.reduce_dim) == (48, 12)
    r = run_subprocess(
        {
            "result": str(tmp_path / "run" / "result.json"),
            "overrides": base_overrides(cache, tmp_path / "run" / "out") + ["steps=3"],
        }
    )
    assert "error" not in r, r.get("error", "") + "\n" + r.get("stderr", "")
    losses = [rec["loss"] for rec in r["log"]]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)


def test_two_ranks_share_one_basis(data, tmp_path):
    """Rank 0 fits and saves the basis, rank 1 waits for it: both shards and the index hold the same
    one, and the two-rank cache reads back as the one-process cache does."""
    import os
    import subprocess
    from pathlib import Path

    root, caps, _ = data
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "c2"

    cmd = torchrun()
    cmd += [
        "-m",
        "tipsdistill.scripts.cache_features",
        "--teacher",
        TEACHER,
        "--images",
        str(root),
        "--captions",
        str(caps),
    ]
    cmd += ["--out", str(out), "--image-size", "32", "--batch-size", "4", "--num-workers", "0", "--quiet"]
    cmd += ["--reduce-dim", "8", "--reduce-fit-images", "6"]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    r = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    bases = []
    for name in ("shard-00000-of-00002.h5", "shard-00001-of-00002.h5", "index.h5"):
        with h5py.File(out / name) as f:
            bases.append(f["reduce/patch/basis"][()])
    saved = Reduction.load(out / BASIS_FILE).bases["patch"][1]
    for b in bases:
        np.testing.assert_array_equal(b, saved)
    one = tmp_path / "c1"
    extract_features(_cfg(one, root, caps))
    a, b = open_cache(out), open_cache(one)
    np.testing.assert_array_equal(a.reduction.bases["patch"][1], b.reduction.bases["patch"][1])
    for x, y in zip(a.__getitems__(list(range(10))), b.__getitems__(list(range(10)))):
        torch.testing.assert_close(x["patch"], y["patch"], atol=2e-3, rtol=2e-3)


def test_batch_reader_rows_decode_with_the_basis(data, tmp_path):
    """The batch reader (stage 2's path) returns the stored coefficients; decoding them with the cache's
    basis gives exactly the reference's tokens (tests/item_reference.py: h5py rows, item by item), and so
    does CachedTargets."""
    from tests.item_reference import ReferenceRows
    from tipsdistill.distill.targets import CachedTargets

    root, caps, _ = data
    extract_features(_cfg(tmp_path / "c", root, caps, storage="int8"))
    cache = open_cache(tmp_path / "c")
    rows = [7, 2, 9, 2]
    host = cache.read_batch(rows, ("patch", "cls")).host()
    assert host["patch"].shape == (4, 16, 8) and host["patch"].dtype == torch.int8
    basis = cache.reduction.tensors("cpu")
    got = decode(host["patch"], host["patch_scale"], **basis["patch"])
    want = torch.stack([it["patch"] for it in ReferenceRows(cache).rows(rows)]).reshape(4, 16, 32)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    targets = CachedTargets(cache.spec.dim, cache.spec.grid, basis=basis)
    assert targets.basis["patch"]["basis"].shape == (32, 8)
