"""Benchmark of the stage 1 cache, all ratios measured in one run on the same data.

Prints (1) extraction with writing vs the teacher forward alone, (2) writer MB/s vs a raw sequential
write of the same bytes to the same disk, (3) reader samples/s with 0 and 2 workers vs a raw numpy
read of the same bytes from one file: the item reader through DataLoader workers (the old path), the
batch reader (``FeatureCache.read_batch``) and stage 2's training configuration (the feature reader
thread, alone and in lockstep with an image DataLoader of 2 workers, as stage 2 takes its batches; the
raw read also into a ring of as many buffers as the reader keeps in flight), (4) the cost of durability (fsync) and of the worker
start methods, (5) bytes per image and token cosine for float16, int8 and reduced-dimension (PCA)
storage, (6) the shard index at scale (issue 29): resident memory per process and start-up of a
synthetic ``--index-samples`` (10M) index, and webdataset samples/s read from local shards vs the same
shards over HTTP on loopback (Range requests), random and sequential order, (7) stage 2's order, global
permutation vs shard-aware (``data.order=shards``): tar opens and shard switches per 1,000 samples and
samples/s through a DataLoader, local and over HTTP. ``--sections 2,5`` runs only some. Every timed figure is
the median of ``--repeats`` runs (the runs are printed too); the page cache stays warm (stated).

    python -m tipsdistill.scripts.bench_cache --images 256 --dim 384 --depth 6 --image-size 224 --out /tmp/bench
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import io
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader, Dataset

from tipsdistill.cache import extract_features, open_cache
from tipsdistill.teachers.base import DenseFeatures, Teacher
from tipsdistill.teachers.vit import vit_dense_forward


class BenchTeacher(Teacher):
    """A random-init ViT of the given size (no download), read out like every teacher."""

    def __init__(self, dim: int = 384, depth: int = 6, patch_size: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.vit = VisionTransformer(
            img_size=224, patch_size=patch_size, embed_dim=dim, depth=depth, num_heads=max(1, dim // 64),
            reg_tokens=1, no_embed_class=True, init_values=1.0, num_classes=0, dynamic_img_size=True,
        )  # fmt: skip
        self.patch_size, self.embed_dim, self.num_global_tokens, self.num_layers = patch_size, dim, 2, depth

    def encode_image(
        self,
        pixels: torch.Tensor,
        *,
        value_trick: bool = False,
        value_readout: str = "tips",
        layer: int | None = None,
    ) -> DenseFeatures:
        return vit_dense_forward(
            self.vit,
            pixels,
            num_global_tokens=2,
            value_trick=value_trick,
            value_readout=value_readout,
            layer=layer,
        )

    def identity(self) -> dict[str, Any]:
        return super().identity() | {"name": "bench", "depth": self.num_layers}


class RandomImages(Dataset):
    """Pre-generated [0, 1] images held in memory (decoding is not what is measured here)."""

    def __init__(self, n: int, size: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 3, size, size, generator=g)

    def __len__(self) -> int:
        return len(self.images)

    def keys(self) -> list[str]:
        return [f"img{i:06d}" for i in range(len(self))]

    def identity(self) -> dict[str, Any]:
        return {"name": "bench-random", "n": len(self), "size": int(self.images.shape[-1])}

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"key": f"img{i:06d}", "image": self.images[i], "captions": {}}


def _forward_alone(teacher: Teacher, data: RandomImages, batch_size: int) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(data), batch_size):
            out = teacher.encode_image(data.images[s : s + batch_size])
            out.patch.float().cpu().numpy(), out.cls.float().cpu().numpy()
    return time.perf_counter() - t0


def _loader_alone(data: RandomImages, size: int, batch_size: int) -> float:
    """The extraction's input pipeline alone (item prep + collate, 0 workers), no forward, no writing."""
    from tipsdistill.cache.run import ViewItems, collate_views
    from tipsdistill.cache.views import ViewSpec

    items = ViewItems(data, (size, size), "short_crop", ViewSpec(num_views=1), 16)
    blocks = [list(range(s, min(s + batch_size, len(data)))) for s in range(0, len(data), batch_size)]
    t0 = time.perf_counter()
    for _ in DataLoader(items, batch_sampler=blocks, num_workers=0, collate_fn=collate_views):
        pass
    return time.perf_counter() - t0


def _teacher_batches(teacher: Teacher, data: RandomImages, batch_size: int) -> list[dict[str, Any]]:
    from tipsdistill.cache.writer import sample_stats

    out = []
    with torch.inference_mode():
        for s in range(0, len(data), batch_size):
            o = teacher.encode_image(data.images[s : s + batch_size])
            patch, cls = o.patch.flatten(1, 2), o.cls
            out.append({"rows": np.arange(s, s + len(patch)), "patch": patch.clone(), "cls": cls.clone(),
                        "_stats": sample_stats(patch, cls).numpy(), "grid": o.grid})  # fmt: skip
    return out


def _writer_alone(
    out: Path, batches: list[dict[str, Any]], n: int, half: bool, fsync: bool
) -> tuple[float, int]:
    """The writer pipeline with no forward running: ShardWriter (thread + queue + HDF5 writes + flushes
    + done flags) on precomputed teacher outputs, float16 arrays (``half``) or float32 (the writer
    thread converts)."""
    from tipsdistill.cache.format import Layout, create_shard
    from tipsdistill.cache.writer import ShardWriter, WriteBatch

    b0 = batches[0]
    layout = Layout(count=n, grid=b0["grid"], dim=b0["patch"].shape[-1], num_global_tokens=b0["cls"].shape[1],
                    block_size=len(b0["rows"]))  # fmt: skip
    wb = []
    for i, b in enumerate(batches):
        arrays = {"_stats": b["_stats"]}
        for k in ("patch", "cls"):
            arrays[k] = (b[k].half() if half else b[k]).numpy()
        wb.append(WriteBatch(i, b["rows"], arrays))
    path = out / f"writer-alone-{int(half)}.h5"
    path.unlink(missing_ok=True)
    create_shard(path, layout, {"bench": 1}, [f"img{i:06d}" for i in range(n)])
    w = ShardWriter(path, layout, fsync=fsync)  # opening the file is set-up, not throughput
    t0 = time.perf_counter()
    for b in wb:
        w.submit(b)
    w.close()
    if fsync:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    dt = time.perf_counter() - t0
    w.file.close()
    return dt, w.bytes_written


def _raw_write(path: Path, pieces: list[np.ndarray], fsync: bool) -> float:
    """The same bytes, one sample-sized ``os.write`` each (no copies), sequentially into one file."""
    path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for a in pieces:
        mv = memoryview(a).cast("B")
        while mv:
            mv = mv[os.write(fd, mv) :]
    if fsync:
        os.fsync(fd)
    os.close(fd)
    return time.perf_counter() - t0


def _raw_npy(cache_dir: Path, path: Path) -> None:
    """The cache's feature bytes (float16 ``patch`` then ``cls`` of every sample) as two ``.npy`` arrays
    one after the other in one file."""
    import h5py

    with h5py.File(cache_dir / "shard-00000-of-00001.h5", "r") as f, open(path, "wb") as out:
        np.save(out, f["patch"][()])
        np.save(out, f["cls"][()])


def _npy_arrays(path: Path) -> list[tuple[int, tuple[int, ...], np.dtype]]:
    """(byte offset of the data, shape, dtype) of each ``.npy`` array stored back to back in ``path``."""
    fmt, out = np.lib.format, []
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        while f.tell() < size:
            v = fmt.read_magic(f)
            shape, _, dtype = (fmt.read_array_header_1_0 if v == (1, 0) else fmt.read_array_header_2_0)(f)
            out.append((f.tell(), shape, dtype))
            f.seek(int(np.prod(shape)) * dtype.itemsize, os.SEEK_CUR)
    return out


class _RawBuffers:
    """Destination arrays of :func:`_raw_read`: ``ring`` sets of one batch of each array, allocated and
    written once up front (so no timed read pays first-touch page faults), used in turn."""

    def __init__(self, path: Path, batch: int, ring: int = 1) -> None:
        self.arrays = _npy_arrays(path)
        self.sets = [
            [np.ones((batch, *shape[1:]), dt) for _, shape, dt in self.arrays] for _ in range(max(1, ring))
        ]


def _raw_read(path: Path, batch: int, convert: bool, bufs: _RawBuffers | None = None) -> tuple[float, int]:
    """Read the arrays back in batches of ``batch`` rows (one ``preadv`` per array per batch, into
    preallocated numpy arrays: no copies); ``convert``: also float16 -> float32 tensors, as the reader
    must (its items are float32). ``bufs``: the destinations (default one set, allocated here); a ring
    of several sets is what a reader that hands batches to another thread keeps in flight (with one,
    a batch of tens of MB is read into the same memory each time and stays in the CPU's last-level
    cache, which no pipeline gets)."""
    bufs = bufs or _RawBuffers(path, batch)
    t0, n = time.perf_counter(), 0
    arrays = bufs.arrays
    total = arrays[0][1][0]
    fd = os.open(path, os.O_RDONLY)
    k_batch = 0
    try:
        while n < total:
            k = min(batch, total - n)
            dest = bufs.sets[k_batch % len(bufs.sets)]
            k_batch += 1
            for (off, _shape, _dt), buf in zip(arrays, dest):
                row = buf[0].nbytes
                os.preadv(fd, [memoryview(buf[:k]).cast("B")], off + n * row)
                if convert:
                    torch.from_numpy(buf[:k]).float()
            n += k
    finally:
        os.close(fd)
    return time.perf_counter() - t0, n


class _Zeros(Dataset):
    """Items shaped like the cache's, made of fresh zero tensors: what the DataLoader itself costs."""

    def __init__(self, cache: Any) -> None:
        it = cache[0]
        self.n, self.shapes = len(cache), {k: it[k].shape for k in ("patch", "cls")}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"index": i} | {k: torch.zeros(s) for k, s in self.shapes.items()}


def _loader(cache: Any, workers: int, batch: int) -> DataLoader:
    return DataLoader(cache, batch_size=batch, num_workers=workers, persistent_workers=workers > 0)


def _read_epoch(loader: DataLoader, n: int) -> float:
    t0 = time.perf_counter()
    got = sum(len(b["index"]) for b in loader)
    assert got == n
    return time.perf_counter() - t0


def _read_direct(cache: Any, batch: int) -> float:
    """``cache.__getitems__`` on consecutive batches, no DataLoader, no collation."""
    get = getattr(cache, "__getitems__", None) or (lambda idx: [cache[i] for i in idx])  # older readers
    t0 = time.perf_counter()
    for s in range(0, len(cache), batch):
        get(list(range(s, min(s + batch, len(cache)))))
    return time.perf_counter() - t0


def _med(xs: list[float]) -> float:
    return float(statistics.median(xs))


def _runs(xs: list[float]) -> str:
    return ", ".join(f"{x:.3f}" for x in xs)


def _extract_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The ``extract_features`` settings every extraction of the benchmark shares."""
    return dict(
        image_size=args.image_size,
        batch_size=args.batch_size,
        num_workers=0,
        granularities=[],
        progress=False,
    )


def _durability(
    teacher: Teacher, data: RandomImages, out: Path, common: dict[str, Any], repeats: int
) -> None:
    """(4) the cost of the crash-safety: extraction with fsync before the done flags (the default) vs
    without, at the default flush interval (2 s) and flushing after every block (the worst case); and
    the DataLoader worker start methods (forkserver, the default, never hands the shard to workers)."""
    quiet = io.StringIO()
    t: dict[str, list[float]] = {k: [] for k in ("nofs", "fs", "nofs0", "fs0")}
    fs_s: list[float] = []
    for _ in range(repeats):
        for key, fsync, interval in (
            ("nofs", False, 2.0),
            ("fs", True, 2.0),
            ("nofs0", False, 0.0),
            ("fs0", True, 0.0),
        ):
            shutil.rmtree(out / "dur", ignore_errors=True)
            with contextlib.redirect_stdout(quiet):
                s = extract_features(out=str(out / "dur"), teacher=teacher, dataset=data, fsync=fsync,
                                     flush_interval_s=interval, **common)  # fmt: skip
            t[key].append(s["loop_seconds"])
            if key == "fs0":
                fs_s.append(s["fsync_seconds"])
    m = {k: _med(v) for k, v in t.items()}
    print(f"(4) durability: extraction loop with fsync before the done flags {m['fs']:.2f}s vs without {m['nofs']:.2f}s "
          f"-> {m['fs'] / m['nofs']:.3f}x (flush every 2 s, the default) | flushing after every block: "
          f"{m['fs0']:.2f}s vs {m['nofs0']:.2f}s -> {m['fs0'] / m['nofs0']:.3f}x (fsync time {_med(fs_s):.3f}s, on the writer thread)")  # fmt: skip
    starts: dict[str, list[float]] = {k: [] for k in ("fork", "forkserver", "spawn")}
    for _ in range(max(1, repeats // 2)):
        for ctx in starts:
            shutil.rmtree(out / "ws", ignore_errors=True)
            with contextlib.redirect_stdout(quiet):
                s = extract_features(out=str(out / "ws"), teacher=teacher, dataset=data, worker_start=ctx,
                                     **(common | {"num_workers": 2}))  # fmt: skip
            starts[ctx].append(s["loop_seconds"])
    w = {k: _med(v) for k, v in starts.items()}
    print(f"    extraction loop with 2 workers by start method: fork {w['fork']:.2f}s, forkserver {w['forkserver']:.2f}s "
          f"({w['forkserver'] / w['fork']:.2f}x), spawn {w['spawn']:.2f}s ({w['spawn'] / w['fork']:.2f}x); the difference is "
          "the workers' start-up, paid once per run")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--read-batch", type=int, default=16, help="DataLoader batch size of the reader test")
    p.add_argument(
        "--read-passes", type=int, default=8, help="passes over the cache per timed batch-reader run"
    )
    p.add_argument("--write-mib", type=int, default=256, help="bytes of features written in each test of (2)")
    p.add_argument("--repeats", type=int, default=5, help="repeats of every timed measurement (median shown)")
    p.add_argument("--out", default="/tmp/tipsdistill-bench-cache")
    p.add_argument(
        "--reduce-dims", default="", help="reduce_dim values of (5), comma-separated (default dim/4, dim/8)"
    )
    p.add_argument(
        "--reduce-fit-images", type=int, default=1024, help="images the PCA basis of (5) is fitted on"
    )
    p.add_argument(
        "--index-samples", type=int, default=10_000_000, help="samples of the synthetic index of (6)"
    )
    p.add_argument("--shard-images", type=int, default=512, help="images in the local / HTTP shards of (6)")
    p.add_argument("--order-shards", type=int, default=160, help="shards of (7) (more than the 64 kept open)")
    p.add_argument("--order-per-shard", type=int, default=16, help="images per shard of (7)")
    p.add_argument("--order-window", type=int, default=4, help="data.shard_window of (7)")
    p.add_argument(
        "--sections",
        default="1,2,3,4,5,6,7",
        help="comma-separated sections to run (3 needs 1's cache; default all)",
    )
    return p


def measure_extraction(
    teacher: Teacher, data: RandomImages, args: argparse.Namespace, out: Path
) -> dict[str, Any]:
    """(1) extraction with writing vs the forward alone, interleaved to share the machine's noise; returns
    the last float16 extraction summary."""
    N, R, common = args.images, args.repeats, _extract_kwargs(args)
    quiet = io.StringIO()
    _forward_alone(teacher, RandomImages(args.batch_size, args.image_size), args.batch_size)  # warm-up
    fwd, ext, main_fwd, wthread, waits, loads = [], [], [], [], [], []
    for _r in range(R):
        fwd.append(_forward_alone(teacher, data, args.batch_size))
        shutil.rmtree(out / "f16", ignore_errors=True)
        with contextlib.redirect_stdout(quiet):
            s16 = extract_features(
                out=str(out / "f16"), storage="float16", teacher=teacher, dataset=data, **common
            )
        ext.append(s16["loop_seconds"])
        main_fwd.append(s16["forward_seconds"])
        wthread.append(s16["writer_seconds"])
        waits.append(s16["submit_wait_seconds"])
        loads.append(_loader_alone(data, args.image_size, args.batch_size))
    f_m, e_m = _med(fwd), _med(ext)
    pair = _med([e / f - 1 for e, f in zip(ext, fwd)])
    print(f"(1) forward alone {f_m:.2f}s ({N / f_m:.1f} img/s; runs {_runs(fwd)}) | extraction with writing {e_m:.2f}s "
          f"({N / e_m:.1f} img/s; runs {_runs(ext)}) -> writing adds {100 * (e_m / f_m - 1):+.1f}% "
          f"(median of paired runs {100 * pair:+.1f}%; goal <= 3%)")  # fmt: skip
    print(f"    inside the extraction loop (medians): forward + encode to float16 {_med(main_fwd):.2f}s, input pipeline "
          f"(item prep + collate, measured alone) {_med(loads):.3f}s, producer waited on the writer queue {_med(waits):.4f}s, "
          f"writer thread busy {_med(wthread):.3f}s ({100 * _med(wthread) / e_m:.1f}% of the loop, on a separate thread)")  # fmt: skip

    return s16


def measure_writer(teacher: Teacher, data: RandomImages, args: argparse.Namespace, out: Path) -> None:
    """(2) the writer alone vs a raw sequential write of the same bytes."""
    N, R = args.images, args.repeats
    batches = _teacher_batches(teacher, data, args.batch_size)
    # repeat the teacher outputs (same memory, new rows) up to --write-mib: ~20 MiB written in ~15 ms
    # is too short to time on a shared machine
    per_round = sum(b["patch"].numel() + b["cls"].numel() for b in batches) * 2
    reps = max(1, -(-args.write_mib * 2**20 // per_round))
    batches = [dict(b, rows=b["rows"] + k * N) for k in range(reps) for b in batches]
    NW = N * reps
    pieces = [a for b in batches for k in ("patch", "cls") for a in b[k].half().numpy()]
    blocks = [b[k].half().numpy() for b in batches for k in ("patch", "cls")]  # one write per block and array
    nbytes = sum(a.nbytes for a in pieces)
    res: dict[str, list[float]] = {k: [] for k in ("raw", "rawb", "w16", "w32", "raw_fs", "w16_fs")}
    for _r in range(R):
        res["raw"].append(_raw_write(out / "raw.bin", pieces, fsync=False))
        res["rawb"].append(_raw_write(out / "raw.bin", blocks, fsync=False))
        t, nb = _writer_alone(out, batches, NW, half=True, fsync=False)
        assert nb == nbytes, (nb, nbytes)
        res["w16"].append(t)
        res["w32"].append(_writer_alone(out, batches, NW, half=False, fsync=False)[0])
        res["raw_fs"].append(_raw_write(out / "raw.bin", pieces, fsync=True))
        res["w16_fs"].append(_writer_alone(out, batches, NW, half=True, fsync=True)[0])
    mbs = {k: nbytes / _med(v) / 2**20 for k, v in res.items()}
    conv = []
    for _ in range(R):
        t0 = time.perf_counter()
        for b in batches:
            b["patch"].half(), b["cls"].half()
        conv.append(time.perf_counter() - t0)
    print(f"(2) {nbytes / 2**20:.1f} MiB of float16 features ({NW} samples = the {N} teacher outputs x {reps}, "
          f"{len(pieces)} sample-sized pieces): raw sequential write "
          f"{mbs['raw']:.0f} MB/s | writer alone from float16 arrays {mbs['w16']:.0f} MB/s -> {mbs['w16'] / mbs['raw']:.2f}x "
          f"(goal >= 0.8x); from float32 (converted in the writer thread) {mbs['w32']:.0f} MB/s -> "
          f"{mbs['w32'] / mbs['raw']:.2f}x | +fsync: raw {mbs['raw_fs']:.0f} MB/s, writer {mbs['w16_fs']:.0f} MB/s -> "
          f"{mbs['w16_fs'] / mbs['raw_fs']:.2f}x")  # fmt: skip
    fast = {k: nbytes / min(v) / 2**20 for k, v in res.items()}
    print(f"    by the fastest of the {R} runs (robust to other jobs' load): writer {fast['w16'] / fast['raw']:.2f}x of raw, "
          f"{fast['w16'] / fast['rawb']:.2f}x of raw blocks; +fsync {fast['w16_fs'] / fast['raw_fs']:.2f}x")  # fmt: skip
    print(f"    raw write in write-block pieces ({len(blocks)} writes of the patch / cls arrays of a block, as the format-3 "
          f"writer issues them) {mbs['rawb']:.0f} MB/s -> writer {mbs['w16'] / mbs['rawb']:.2f}x of it")  # fmt: skip
    print(f"    runs (s): raw {_runs(res['raw'])} | raw blocks {_runs(res['rawb'])} | writer {_runs(res['w16'])} | float32->float16 in the forward "
          f"thread (what extraction does) {1e3 * _med(conv) / len(batches):.2f} ms per batch of {args.batch_size}")  # fmt: skip


def measure_reader(args: argparse.Namespace, out: Path) -> None:
    """(3) the reader vs a raw numpy read of the same bytes from one file."""
    N, R = args.images, args.repeats
    cache = open_cache(out / "f16")
    npy = out / "raw-features.npy"  # patch.npy + cls.npy, back to back
    _raw_npy(out / "f16", npy)
    rb = args.read_batch
    _raw_read(npy, rb, False), _read_direct(cache, rb)  # warm the page cache and the handles
    loaders: dict[Any, DataLoader] = {}
    starts = {}
    for w in (0, 2):
        loaders[w] = _loader(open_cache(out / "f16"), w, rb)
        t0 = time.perf_counter()
        _read_epoch(loaders[w], len(cache))  # first epoch: starts the workers, opens the files
        starts[w] = time.perf_counter() - t0
        loaders[f"z{w}"] = _loader(_Zeros(cache), w, rb)
        _read_epoch(loaders[f"z{w}"], len(cache))
    t3: dict[Any, list[float]] = {k: [] for k in ("raw", "rawc", "direct", 0, 2, "z0", "z2")}
    for _ in range(R):  # interleaved, so that every figure sees the same machine load
        t3["raw"].append(_raw_read(npy, rb, False)[0])
        t3["rawc"].append(_raw_read(npy, rb, True)[0])
        t3["direct"].append(_read_direct(cache, rb))
        for k in (0, 2, "z0", "z2"):
            t3[k].append(_read_epoch(loaders[k], len(cache)))
    del loaders
    rates = {w: N / _med(t3[w]) for w in (0, 2)}
    zeros = {w: N / _med(t3[f"z{w}"]) for w in (0, 2)}
    raw_t, rawc_t, direct_t = t3["raw"], t3["rawc"], t3["direct"]
    raw_sps, rawc_sps, dir_sps = N / _med(raw_t), N / _med(rawc_t), N / _med(direct_t)
    feat_mib = npy.stat().st_size / 2**20
    print(f"(3) reader (DataLoader batch {rb}, default collate, float32 items) {rates[0]:.0f} samples/s (0 workers), "
          f"{rates[2]:.0f} samples/s (2 workers, steady state) | raw read of the same {feat_mib:.1f} MiB from one "
          f"file (numpy arrays, preadv per batch of {rb}) {raw_sps:.0f} samples/s -> {rates[0] / raw_sps:.2f}x / {rates[2] / raw_sps:.2f}x; "
          f"raw read + float16->float32 (the minimum the item API needs) {rawc_sps:.0f} samples/s -> "
          f"{rates[0] / rawc_sps:.2f}x / {rates[2] / rawc_sps:.2f}x")  # fmt: skip
    print(f"    cache.__getitems__ alone (no DataLoader/collate) {dir_sps:.0f} samples/s -> {dir_sps / raw_sps:.2f}x raw, "
          f"{dir_sps / rawc_sps:.2f}x raw+convert | first epoch incl. worker start {starts[0]:.2f}s / {starts[2]:.2f}s")  # fmt: skip
    print(f"    DataLoader ceiling on this machine (a dataset of fresh zero tensors of the same shapes, no I/O): "
          f"{zeros[0]:.0f} / {zeros[2]:.0f} samples/s (0 / 2 workers) -> the reader reaches {rates[0] / zeros[0]:.2f}x / "
          f"{rates[2] / zeros[2]:.2f}x of it")  # fmt: skip
    measure_batch_reader(args, out, npy)


class _Images(Dataset):
    """Image-only items (what stage 2's workers return when the features come from the batch reader):
    a fresh ``(3, S, S)`` tensor per sample, seeded by index."""

    def __init__(self, n: int, size: int) -> None:
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: tuple[int, int]) -> dict[str, Any]:
        g = torch.Generator().manual_seed(int(i[1]))
        return {"index": int(i[1]), "global": torch.rand(3, self.size, self.size, generator=g)}


FEEDER_DEPTH = 2  # batches the reader thread reads ahead in (3), as stage 2's cache.prefetch default


def _proc_cpu_s(pids: list[int]) -> float:
    """CPU seconds (user + system) the processes ``pids`` have used so far (``/proc/PID/stat``)."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _feeder_rate(
    cache: Any, batch: int, workers: int, passes: int, *, saturated: bool = False, features: bool = True
) -> tuple[float, float, float, float, float]:
    """Seconds per pass over the cache of stage 2's feature path: feature batches (patch + cls, storage
    dtype) from the training process's reader thread (:class:`distill.feeder.FeatureFeeder`) in the
    shuffled sampler order, taken by the main thread.

    ``workers > 0``: an image DataLoader with that many workers (32 px image items, same sampler) runs
    alongside. By default it is consumed as stage 2 consumes it (``distill.train._Loader``): each step
    takes one image batch from the DataLoader and one feature batch from the feeder and checks they
    hold the same samples (``FeatureFeeder.attach``), so the workers run ahead by their prefetch and
    then wait. ``saturated``: the image batches are drained flat out by another thread instead, so the
    workers never wait and take every cycle they can: the reader's worst case, when images, not
    features, limit the step. ``features=False``: the image batches alone (no feeder).

    Returns (seconds per pass, the reader thread's own rate in samples/s = samples read / seconds it
    spent in ``read_batch``, the fraction of the timed loop the main thread waited for feature
    batches, CPU cores used by this process (main thread, reader and preadv threads) and by the image
    workers during the timed loop)."""
    import resource
    import threading

    from tipsdistill.distill.data import ResumableSampler, collate_packed, unpack_tensors
    from tipsdistill.distill.feeder import FeatureFeeder

    feeder = (
        FeatureFeeder(
            cache, ResumableSampler(len(cache), seed=0), batch, fields=("patch", "cls"), depth=FEEDER_DEPTH
        )
        if features
        else None
    )
    stop, drainer, images, pids = threading.Event(), None, None, []
    per = len(cache) // batch
    if workers:
        sampler = ResumableSampler(len(cache), seed=1 if saturated else 0).endless(batch)
        # stage 2's transport: each worker's batch packed into one tensor (distill.data.collate_packed)
        loader = DataLoader(_Images(len(cache), 32), batch_size=batch, sampler=sampler, num_workers=workers,
                            collate_fn=collate_packed, persistent_workers=True, drop_last=True)  # fmt: skip
        images = iter(loader)
        pids = [w.pid for w in images._workers]  # torch's multiprocessing iterator keeps its workers here
        if saturated:
            ready = threading.Event()
            it = images

            def drain() -> None:
                for _ in it:
                    ready.set()
                    if stop.is_set():
                        break

            images = None
            drainer = threading.Thread(target=drain, daemon=True)
            drainer.start()
            ready.wait()  # the workers are up and producing

    def step(k: int) -> None:
        if feeder is None:
            unpack_tensors(next(images))
            return
        fb = feeder.next()
        if images is not None:
            feeder.attach({"index": unpack_tensors(next(images))["index"]}, fb, k // per)

    def own_cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    step(0)  # the thread (and the workers) are up
    if feeder is not None:
        feeder.read_s, feeder.rows_read, feeder.wait_s = 0.0, 0, 0.0
    c_own, c_workers, t0 = own_cpu(), _proc_cpu_s(pids), time.perf_counter()
    for k in range(1, passes * per + 1):
        step(k)
    dt = time.perf_counter() - t0
    own, workers_cpu = (own_cpu() - c_own) / dt, (_proc_cpu_s(pids) - c_workers) / dt
    stop.set()
    if drainer is not None:
        drainer.join()
    if feeder is None:
        return dt / passes * len(cache) / (per * batch), float("nan"), 0.0, own, workers_cpu
    feeder.close()
    reader_sps = feeder.rows_read / feeder.read_s if feeder.read_s else float("nan")
    return dt / passes * len(cache) / (per * batch), reader_sps, feeder.wait_s / dt, own, workers_cpu


def measure_batch_reader(args: argparse.Namespace, out: Path, npy: Path) -> None:
    """(3) stage 2's feature path: the batch reader in a thread of the training process, with the image
    workers alongside, vs a raw read of the same bytes (median of ``--repeats``, interleaved)."""
    N, R, rb = args.images, args.repeats, args.read_batch
    cache = open_cache(out / "f16")
    buf = cache.alloc_batch(rb)
    order = np.random.default_rng(0).permutation(N)

    def direct(idx_order: np.ndarray) -> float:
        t0 = time.perf_counter()
        for s in range(0, N - rb + 1, rb):
            cache.read_batch(idx_order[s : s + rb], out=buf)
        return time.perf_counter() - t0

    P = args.read_passes
    from tipsdistill.distill.feeder import FeatureFeeder

    ring = FEEDER_DEPTH + FeatureFeeder.SPARE_BUFFERS  # as many buffers as the feeder keeps in flight
    one, rings = _RawBuffers(npy, rb), _RawBuffers(npy, rb, ring)
    direct(order), _feeder_rate(cache, rb, 0, 1), _raw_read(npy, rb, False, rings)  # warm-up
    keys = ("raw", "rawr", "seq", "shuf", "f0", "f1", "f2", "f2s", "img1", "img2")
    t: dict[str, list[Any]] = {k: [] for k in keys}
    for _ in range(R):
        t["raw"].append(sum(_raw_read(npy, rb, False, one)[0] for _ in range(P)) / P)
        t["rawr"].append(sum(_raw_read(npy, rb, False, rings)[0] for _ in range(P)) / P)
        t["seq"].append(sum(direct(np.arange(N)) for _ in range(P)) / P)
        t["shuf"].append(sum(direct(order) for _ in range(P)) / P)
        t["f0"].append(_feeder_rate(cache, rb, 0, P))
        t["f1"].append(_feeder_rate(cache, rb, 1, P))
        t["img1"].append(_feeder_rate(cache, rb, 1, P, features=False))
        t["f2"].append(_feeder_rate(cache, rb, 2, P))
        t["f2s"].append(_feeder_rate(cache, rb, 2, P, saturated=True))
        t["img2"].append(_feeder_rate(cache, rb, 2, P, features=False))
    sps = {k: N / _med([x[0] if isinstance(x, tuple) else x for x in v]) for k, v in t.items()}
    fed = ("f0", "f1", "f2", "f2s")
    thread = {k: _med([x[1] for x in t[k]]) for k in fed}  # the reader thread's own rate
    waited = {k: _med([x[2] for x in t[k]]) for k in fed}
    cores = {k: (_med([x[3] for x in t[k]]), _med([x[4] for x in t[k]])) for k in (*fed, "img1", "img2")}

    def cpu(k: str) -> str:
        return f"CPU cores busy: this process {cores[k][0]:.2f}, image workers {cores[k][1]:.2f}, of {os.cpu_count()}"

    raw, rawr = sps["raw"], sps["rawr"]

    def vs(x: float) -> str:
        return f"{x / raw:.2f}x / {x / rawr:.2f}x"

    print(f"(3) batch reader (read_batch, float16 as stored, batch {rb}, up to {cache.read_threads} preadv threads, one per >= 4 MiB): "
          f"{sps['seq']:.0f} samples/s in file order, {sps['shuf']:.0f} shuffled | raw read {raw:.0f} samples/s into one "
          f"buffer, {rawr:.0f} into a ring of {ring} buffers (the reader's own number of buffers in flight; a batch "
          f"read into one buffer again and again stays in the CPU cache) -> shuffled {vs(sps['shuf'])} (one buffer / ring)")  # fmt: skip
    print(f"    training configuration, 0 image workers (feature batches from the reader thread, {FEEDER_DEPTH} ahead, in the "
          f"shuffled sampler order, taken by the main thread): {sps['f0']:.0f} samples/s -> {vs(sps['f0'])} of raw (goal >= 0.8x)")  # fmt: skip
    print(f"    training configuration, 2 image workers (each step takes the image batch of the same samples from a DataLoader "
          f"with 2 workers, 32 px images, and the feature batch, as stage 2 does): {sps['f2']:.0f} samples/s, bound by the "
          f"image DataLoader (alone, no features: {sps['img2']:.0f} samples/s); the reader thread read {thread['f2']:.0f} "
          f"samples/s while it ran -> {vs(thread['f2'])} of raw (goal >= 0.5x); the main thread waited "
          f"{100 * waited['f2']:.1f} % of the time for feature batches; {cpu('f2')} (images alone: {cpu('img2')}; 0 "
          f"workers: reader thread {thread['f0']:.0f} samples/s, {vs(thread['f0'])}; waited {100 * waited['f0']:.0f} %; "
          f"{cpu('f0')})")  # fmt: skip
    print(f"    training configuration, 1 image worker (the same lockstep, leaving the reader more of the cores; "
          f"a proxy for a node with more cores than workers): {sps['f1']:.0f} samples/s (images alone: {sps['img1']:.0f}); the reader "
          f"thread read {thread['f1']:.0f} samples/s while it ran -> {vs(thread['f1'])} of raw; the main thread waited "
          f"{100 * waited['f1']:.1f} % for feature batches; {cpu('f1')} (images alone: {cpu('img1')})")  # fmt: skip
    print(f"    worst case, the 2 image workers drained flat out by another thread (never waiting: when images limit the "
          f"step): {sps['f2s']:.0f} samples/s -> {vs(sps['f2s'])}; reader thread {thread['f2s']:.0f} samples/s -> "
          f"{vs(thread['f2s'])}; {cpu('f2s')}")  # fmt: skip
    print(f"    runs (s per pass): raw {_runs(t['raw'])} | raw, ring {_runs(t['rawr'])} | file order {_runs(t['seq'])} | "
          f"shuffled {_runs(t['shuf'])} | 0 workers {_runs([x[0] for x in t['f0']])} | 1 worker "
          f"{_runs([x[0] for x in t['f1']])} | 2 workers "
          f"{_runs([x[0] for x in t['f2']])} | 2 workers flat out {_runs([x[0] for x in t['f2s']])} | images alone "
          f"{_runs([x[0] for x in t['img2']])}")  # fmt: skip


def _storage_settings(args: argparse.Namespace) -> list[tuple[str, int]]:
    """``(storage dtype, reduce_dim)`` of every row of (5): float16 and int8 at full dimension and at
    each ``--reduce-dims`` value."""
    dims = (
        [int(x) for x in args.reduce_dims.split(",") if x.strip()]
        if args.reduce_dims
        else [args.dim // 4, args.dim // 8]
    )
    return [(st, k) for k in [0, *dims] for st in ("float16", "int8")]


def measure_storage(
    teacher: Teacher, data: RandomImages, args: argparse.Namespace, out: Path, s16: dict[str, Any] | None
) -> None:
    """(5) bytes per image and token cosine against the teacher's float32 tokens, for float16, int8 and
    each reduced-dimension setting (PCA fitted on the first ``--reduce-fit-images`` images)."""
    from tipsdistill.cache.format import layout_from_meta

    N, common, quiet = args.images, _extract_kwargs(args), io.StringIO()
    with torch.inference_mode():
        ref = [
            teacher.encode_image(data.images[s : s + args.batch_size]) for s in range(0, N, args.batch_size)
        ]
    ref_patch = torch.cat([o.patch for o in ref]).reshape(-1, args.dim)
    ref_cls = torch.cat([o.cls for o in ref]).reshape(-1, args.dim)
    rows, base = [], None
    for storage, k in _storage_settings(args):
        name = f"s-{storage}-{k}"
        shutil.rmtree(out / name, ignore_errors=True)
        with contextlib.redirect_stdout(quiet):
            extract_features(out=str(out / name), storage=storage, reduce_dim=k, reduce_fit_images=args.reduce_fit_images,
                             teacher=teacher, dataset=data, **common)  # fmt: skip
        cache = open_cache(out / name)
        items = cache.__getitems__(list(range(N)))
        got = torch.stack([it["patch"] for it in items]).reshape(-1, args.dim)
        cls = torch.stack([it["cls"] for it in items]).reshape(-1, args.dim)
        cos = torch.nn.functional.cosine_similarity(got, ref_patch, dim=-1)
        ccos = torch.nn.functional.cosine_similarity(cls, ref_cls, dim=-1)
        disk = (out / name / "shard-00000-of-00001.h5").stat().st_size / N
        per = layout_from_meta(cache.meta, 1).bytes_per_sample()
        ev = cache.reduction.fit["explained_variance"]["patch"] if cache.reduction is not None else 1.0
        cache.close()
        base = base or per
        rows.append(
            (
                storage,
                k,
                disk,
                per,
                per / base,
                float(cos.mean()),
                float(cos.quantile(0.01)),
                float(ccos.min()),
                ev,
            )
        )
    print(f"(5) storage: bytes per image (patch + cls tokens, bookkeeping) and token cosine vs the teacher's float32 tokens, "
          f"{N} images, dim {args.dim}; PCA fitted on the first {min(args.reduce_fit_images, N)} images")  # fmt: skip
    print("    storage    reduce_dim  bytes/image on disk  bytes/sample (format)  vs float16  patch cosine mean  p1     cls cosine min  variance kept")  # fmt: skip
    for st, k, disk, per, ratio, cm, c1, cc, ev in rows:
        print(f"    {st:<10} {k or '-':<11} {disk:>19,.0f}  {per:>21,}  {ratio:>9.3f}x  {cm:>17.4f}  {c1:.4f} {cc:>14.4f}  {100 * ev:>12.1f} %")  # fmt: skip


# ------------------------------------------------------------------------------------------ (6) data where it lives
class RangeRequestHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with ``Range: bytes=a-b`` answered by 206 Partial Content (what object stores and CDNs do);
    requests counted in ``counts`` (``range`` / ``whole``)."""

    counts: dict[str, int] = {}

    def log_message(self, *args: Any) -> None:
        pass

    def send_head(self) -> Any:
        path = self.translate_path(self.path.split("?", 1)[0])
        if not os.path.isfile(path):
            self.send_error(404)
            return None
        size = os.path.getsize(path)
        m = re.match(r"bytes=(\d+)-(\d*)$", self.headers.get("Range", ""))
        self.counts["range" if m else "whole"] = self.counts.get("range" if m else "whole", 0) + 1
        start, end = (int(m.group(1)), min(int(m.group(2) or size - 1), size - 1)) if m else (0, size - 1)
        if start >= size and size:
            self.send_error(416)
            return None
        fh = open(path, "rb")  # noqa: SIM115 - http.server closes it after copyfile
        fh.seek(start)
        self.send_response(206 if m else 200)
        if m:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self._left = end - start + 1
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(self._left))
        self.end_headers()
        return fh

    def copyfile(self, source: Any, outputfile: Any) -> None:
        outputfile.write(source.read(self._left))


def serve_folder(root: Path) -> tuple[str, dict[str, int], http.server.ThreadingHTTPServer]:
    """An HTTP server on loopback serving ``root`` with Range support, in a daemon thread: ``(base URL, counts,
    server)`` (``server.shutdown()`` stops it)."""
    counts: dict[str, int] = {"range": 0, "whole": 0}
    handler = type("Handler", (RangeRequestHandler,), {"counts": counts})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{srv.server_address[1]}", counts, srv


def synthetic_index(path: Path, n: int, per_shard: int = 10_000, caption_bytes: int = 48) -> None:
    """A shard index of ``n`` samples (``per_shard`` a shard, 9-byte keys, one caption of ``caption_bytes``),
    written as stage 1 writes one (:meth:`ShardIndex.save`), built with numpy only."""
    from tipsdistill.cache.shard_index import INDEX_VERSION, ShardIndex, index_hashes

    shards = -(-n // per_shard)
    start = np.minimum(np.arange(shards + 1, dtype=np.int64) * per_shard, n)
    within = np.arange(n, dtype=np.int64) - np.repeat(start[:-1], np.diff(start))
    digits = (within[:, None] // 10 ** np.arange(8, -1, -1)) % 10 + ord("0")
    key_bytes = digits.astype(np.uint8).reshape(-1)
    key_off = np.arange(n + 1, dtype=np.int64) * 9
    sizes = 20_000 + (np.arange(n) * 7919) % 30_000
    img = np.stack([512 + np.cumsum(sizes + 1536) - sizes - 1536, sizes], 1).astype(np.int64)
    cap = np.frombuffer(
        (b"a synthetic caption of a web image %012d" * 1)[:caption_bytes].ljust(caption_bytes, b"."), np.uint8
    )
    names = [f"{s:05d}" for s in range(shards)]
    arrays = {
        "shard_start": start, "img": img, "ext": np.zeros(n, np.int8), "bad": np.zeros(n, np.int8),
        "dup": np.zeros((0, 2), np.int64), "key_off": key_off, "key_bytes": key_bytes,
        "cap0_off": np.arange(n + 1, dtype=np.int64) * caption_bytes, "cap0": np.tile(cap, n),
    }  # fmt: skip
    h = index_hashes(start, names, key_off, key_bytes)
    order = np.argsort(h, kind="stable")
    arrays["key_hash"], arrays["key_order"] = h[order], order.astype(np.int64)
    meta = {"version": INDEX_VERSION, "pattern": "synthetic", "shards": [f"/data/{s}.tar" for s in names],
            "shard_names": names, "shard_sizes": [None] * shards, "caption_fields": {"alt": "txt"},
            "image_exts": ["jpg"], "num_samples": n}  # fmt: skip
    ShardIndex(arrays, meta, []).save(path)


_PROBE = """
import json, os, random, sys, time
def mem():
    f = {l.split(':')[0]: int(l.split()[1]) for l in open('/proc/self/smaps_rollup') if l.split()[0].endswith(':') and len(l.split()) > 2}
    return f['Rss'] * 1024, f['Anonymous'] * 1024
import numpy as np
from tipsdistill.cache.shard_index import ShardIndex
ShardIndex.load(sys.argv[1]).key(0)  # imports and first-call costs outside the measure
r0, a0 = mem()
t = time.perf_counter()
ix = ShardIndex.load(sys.argv[1])
n = len(ix)
first = (ix.key(0), ix.captions(0), ix.img[0].tolist())
t_open = time.perf_counter() - t
rng = random.Random(0)
reads = int(sys.argv[2])
t = time.perf_counter()
for _ in range(reads):  # no list of indices: its own memory would count
    i = rng.randrange(n)
    ix.key(i); ix.captions(i); ix.img[i].tolist(); ix.shard_of(i)
t_reads = time.perf_counter() - t
r1, a1 = mem()
rng = random.Random(0)
idx = [rng.randrange(n) for _ in range(1000)]
keys = [ix.key(i) for i in idx]
t = time.perf_counter()
found = ix.index_of(keys)
t_lookup = time.perf_counter() - t
assert found.tolist() == idx or all(ix.key(int(f)) == k for f, k in zip(found, keys))
print(json.dumps({"n": n, "open_s": t_open, "reads": reads, "reads_s": t_reads, "rss": r1 - r0, "anon": a1 - a0,
                  "lookup_1000_s": t_lookup}))
"""


def measure_shard_index(args: argparse.Namespace, out: Path) -> None:
    """(6a) A synthetic index of ``--index-samples``: its size on disk, start-up and resident memory of a fresh
    process that opens it and reads 100k random samples' keys, captions and offsets."""
    n = args.index_samples
    path = out / "synthetic_index"
    t = time.perf_counter()
    synthetic_index(path, n)
    build = time.perf_counter() - t
    disk = sum(f.stat().st_size for f in path.iterdir())
    runs = []
    for _ in range(max(1, min(args.repeats, 3))):
        r = subprocess.run(
            [sys.executable, "-c", _PROBE, str(path), "100000"], capture_output=True, text=True, check=True
        )
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    m = runs[len(runs) // 2]
    print(f"\n## (6a) shard index of {n:,} synthetic samples ({n // 10_000:,} shards; built in {build:.1f} s with numpy, "
          f"{disk / n:.1f} bytes/sample on disk, memory-mapped)")  # fmt: skip
    print("| measure | value |\n|---|---|")
    print(
        f"| start-up: open + first sample, s (runs {_runs([x['open_s'] for x in runs])}) | {_med([x['open_s'] for x in runs]):.3f} |"
    )
    print(f"| 100k random samples (key, caption, offsets), s | {m['reads_s']:.2f} |")
    print(f"| resident memory added, bytes/sample (RSS: mapped index pages touched, shared via the page cache) | "
          f"{m['rss'] / n:.2f} |")  # fmt: skip
    print(f"| of which private (anonymous) memory, bytes/sample | {m['anon'] / n:.3f} |")
    print(f"| key -> index lookup of 1000 keys, s | {m['lookup_1000_s']:.3f} |")


def _write_bench_shards(root: Path, n: int, per_shard: int = 128, size: int = 256) -> None:
    import webdataset as wds
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for s in range(-(-n // per_shard)):
        with wds.TarWriter(str(root / f"{s:05d}.tar")) as w:
            for i in range(s * per_shard, min(n, (s + 1) * per_shard)):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
                    buf, "JPEG", quality=90
                )
                w.write({"__key__": f"{i:09d}", "jpg": buf.getvalue(), "txt": f"caption {i}"})


def measure_remote_reads(args: argparse.Namespace, out: Path) -> None:
    """(6b) samples/s of the webdataset dataset (read + decode 256x256 JPEGs) from local shards and from the same
    shards over HTTP on loopback, random order (stage 2, evaluation) and sequential (stage 1's blocks)."""
    from tipsdistill.cache.shards import WebDatasetShards

    n = args.shard_images
    root = out / "remote"
    _write_bench_shards(root / "shards", n)
    base, counts, srv = serve_folder(root)
    pattern = f"{{00000..{-(-n // 128) - 1:05d}}}.tar"
    try:
        local = WebDatasetShards(str(root / "shards" / pattern), index=str(root / "ix_local"))
        remote = WebDatasetShards(f"{base}/shards/{pattern}", index=str(root / "ix_http"))
        order = {"random": list(np.random.default_rng(0).permutation(n)), "sequential": list(range(n))}
        print(f"\n## (6b) webdataset samples/s, {n} JPEGs 256x256 (~{os.path.getsize(root / 'shards' / '00000.tar') // 128 // 1024} KiB), "
              "one process, local files vs HTTP Range requests on loopback")  # fmt: skip
        print(
            "| order | local samples/s | HTTP samples/s | HTTP/local | HTTP requests per sample |\n|---|---|---|---|---|"
        )
        for name, idx in order.items():
            rates = {}
            for label, ds in (("local", local), ("http", remote)):
                for i in idx[:16]:
                    ds[i]  # untimed warm-up (connections, page cache)
                ts, before = [], counts["range"]
                for _ in range(max(1, min(args.repeats, 3))):
                    ds._last = -2
                    t = time.perf_counter()
                    for i in idx:
                        ds[int(i)]
                    ts.append(time.perf_counter() - t)
                rates[label] = n / _med(ts)
                reqs = (counts["range"] - before) / (n * len(ts))
            print(
                f"| {name} | {rates['local']:.0f} | {rates['http']:.0f} | {rates['http'] / rates['local']:.2f} | {reqs:.2f} |"
            )
    finally:
        srv.shutdown()


# ------------------------------------------------------------------------------------------ (7) shard-aware order
class _ReadCounter(Dataset):
    """The items of a :class:`cache.shards.WebDatasetShards` (read and decoded as stage 2 reads them), each
    reported as ``(worker, shard, tar opens so far, files held open)`` of the process that read it."""

    def __init__(self, ds: Any) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[int, int, int, int]:
        self.ds[i]
        info = torch.utils.data.get_worker_info()
        reader = self.ds._reader
        return (0 if info is None else info.id, int(self.ds.shard_of([i])[0]), reader.opens, len(reader._fds))


def _as_list(batch: list[Any]) -> list[Any]:
    return batch


def _order_pass(ds: Any, order: list[int], workers: int, batch: int) -> dict[str, float]:
    """One epoch of ``order`` through a DataLoader: samples/s after the first batch (worker start-up left out),
    tar opens and shard switches per 1,000 samples (all processes together), most files one process held."""
    ds.close()
    ds._reader.opens = 0  # the workers fork from here: each counts its own
    loader = DataLoader(_ReadCounter(ds), batch_size=batch, sampler=order, num_workers=workers,
                        collate_fn=_as_list, prefetch_factor=2 if workers else None)  # fmt: skip
    opens: dict[int, int] = {}
    last: dict[int, int] = {}
    switches, held, first, t0 = 0, 0, 0, 0.0
    for k, items in enumerate(loader):
        if k == 0:
            t0, first = time.perf_counter(), len(items)
        for w, shard, n_open, n_held in items:
            opens[w] = max(opens.get(w, 0), n_open)
            switches += int(last.get(w, shard) != shard)
            last[w], held = shard, max(held, n_held)
    rate = (len(order) - first) / max(time.perf_counter() - t0, 1e-9)
    n = len(order)
    return {
        "sps": rate,
        "opens": 1000 * sum(opens.values()) / n,
        "switches": 1000 * switches / n,
        "held": held,
    }


def measure_shard_order(args: argparse.Namespace, out: Path) -> None:
    """(7) Stage 2's sample order (issue 29, locality): ``data.order=global`` (one permutation of all samples) vs
    ``data.order=shards`` (:class:`distill.data.ShardSampler`: shards permuted, samples shuffled within windows of
    ``--order-window`` shards), read through a DataLoader from local shards and over HTTP on loopback."""
    from tipsdistill.cache.shards import MAX_OPEN_SHARDS, WebDatasetShards
    from tipsdistill.distill.data import ResumableSampler, ShardSampler

    shards, per, window, batch = args.order_shards, args.order_per_shard, args.order_window, 32
    n = shards * per
    root = out / "order"
    _write_bench_shards(root / "shards", n, per_shard=per)
    base, counts, srv = serve_folder(root)
    pattern = f"{{00000..{shards - 1:05d}}}.tar"
    kib = os.path.getsize(root / "shards" / "00000.tar") // per // 1024
    try:
        places = {
            "local": WebDatasetShards(str(root / "shards" / pattern), index=str(root / "ix_local")),
            "HTTP": WebDatasetShards(f"{base}/shards/{pattern}", index=str(root / "ix_http")),
        }
        shard_of = places["local"].shard_of(np.arange(n))
        orders = {
            "global": ResumableSampler(n, seed=0).order(0),
            "shards": ShardSampler(shard_of, window=window, seed=0).order(0),
        }
        reps = max(1, min(args.repeats, 3))
        print(f"\n## (7) stage 2's order: global permutation vs shard-aware (window {window} shards), {shards} shards x "
              f"{per} JPEGs 256x256 (~{kib} KiB), one epoch through a DataLoader (batch {batch}, items read and "
              f"decoded), local files vs HTTP Range requests on loopback; samples/s after the first batch, median of "
              f"{reps} epochs; tar opens and shard switches per 1,000 samples summed over the reading processes "
              f"(a process keeps at most {MAX_OPEN_SHARDS} tar files open, the oldest closed first; over HTTP no file is "
              "opened: every read is one Range request)")  # fmt: skip
        print("| where | workers | order | samples/s | tar opens /1000 | shard switches /1000 | files held (max) | "
              "HTTP requests/sample | shards/global samples/s |\n|---|---|---|---|---|---|---|---|---|")  # fmt: skip
        for place, ds in places.items():
            for workers in (0, 2):
                got = {}
                for name, order in orders.items():
                    before = counts["range"]
                    runs = [_order_pass(ds, order, workers, batch) for _ in range(reps)]
                    m = {k: _med([r[k] for r in runs]) for k in runs[0]}
                    m["req"] = (counts["range"] - before) / (n * reps)
                    got[name] = m
                for name, m in got.items():
                    ratio = f"{got['shards']['sps'] / got['global']['sps']:.2f}" if name == "shards" else ""
                    held = f"{m['held']:.0f}" if place == "local" else "-"
                    opens = f"{m['opens']:.1f}" if place == "local" else "-"
                    req = f"{m['req']:.2f}" if place == "HTTP" else "-"
                    print(f"| {place} | {workers} | {name} | {m['sps']:.0f} | {opens} | {m['switches']:.0f} | "
                          f"{held} | {req} | {ratio} |")  # fmt: skip
        big, big_per = 1243, 10_000  # CC12M as img2dataset writes it
        print(f"# at scale (computed, not measured): {big:,} shards of {big_per:,} samples, per reading process, "
              f"global ~{1000 * (1 - MAX_OPEN_SHARDS / big):.0f} tar opens per 1,000 samples, shards ~"
              f"{1000 * window / (window * big_per):.1f} (each process opens each shard of a window once)")  # fmt: skip
    finally:
        srv.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    teacher = BenchTeacher(args.dim, args.depth).freeze()
    data = RandomImages(args.images, args.image_size)
    N, R = args.images, args.repeats
    print(f"# bench_cache: {N} images {args.image_size}px, ViT dim {args.dim} depth {args.depth}, batch {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}, {os.cpu_count()} cpus, load avg {os.getloadavg()[0]:.1f}, device cpu, "
          f"{R} repeats per measurement (median), out {out}")  # fmt: skip
    print("# page cache: warm throughout (nothing is dropped: this is a shared machine); every write goes to the "
          "page cache and is not fsynced unless a figure says +fsync; every read is preceded by an untimed pass")  # fmt: skip

    sections = {x.strip() for x in args.sections.split(",") if x.strip()}
    s16 = measure_extraction(teacher, data, args, out) if sections & {"1", "3"} else None
    if "2" in sections:
        measure_writer(teacher, data, args, out)
    if "3" in sections:
        measure_reader(args, out)
    if "4" in sections:
        _durability(teacher, data, out, _extract_kwargs(args), args.repeats)
    if "5" in sections:
        measure_storage(teacher, data, args, out, s16)
    if "6" in sections:
        measure_shard_index(args, out)
        measure_remote_reads(args, out)
    if "7" in sections:
        measure_shard_order(args, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
