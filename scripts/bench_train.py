"""Benchmark stage 2: seconds per step of cached vs online distillation, and data-loader throughput.

One run measures, on the same machine and settings:
1. FLOPs per image of the student and of the teacher (``torch.utils.flop_counter``), the teacher must
   be >= 8x the student (``--teacher-depth/--teacher-dim`` pick its size);
2. seconds per optimizer step of ``tipsdistill-train`` reading targets from a stage-1 cache built with
   that teacher (feature batches read in the training process, ``distill.feeder``), and of the same run with the teacher online (each run in its own process; the first ``--warmup``
   steps are excluded), and the fraction of the cached step spent waiting for data;
3. samples/s of the training data loader alone (crops + cached-target alignment, ``--workers``) against
   the samples/s the training steps consume;
4. the teacher's forward alone (seconds per batch, in this process) for a second bound from measured
   time, not FLOPs: ``1 + teacher forward / (cached step - its data wait)``, what a cache can save on a
   machine whose small student kernels turn FLOPs into time slower than the teacher's large ones (the
   FLOP bound assumes one rate for both).

With ``--caches 2,3`` it measures the several-teacher path instead (:mod:`distill.multi`): K stage-1
caches of K random timm teachers of different widths and grids over the same images, then one run per
K (``teachers=[...]``, adaptor heads, PHI-S) plus the one-cache run of the same student (``cache.path``,
the recipe's heads), each in its own process: seconds per step, data wait as a share of the step
(goal <= 5 %, as for one cache), and the step cost of the adaptors (time against the one-cache run and
the adaptors' share of the step's FLOPs). Writes ``bench_train_multi.json``.

Prints a table and writes ``bench_train.json`` to ``--out``. Small defaults run on a laptop CPU in a
few minutes; scale ``--image-size``/``--batch`` up on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent


def flops_per_image(model: torch.nn.Module, size: int) -> float:
    """FLOPs of ``model.encode_image`` on one ``size`` x ``size`` image (``torch.utils.flop_counter``)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(1, 3, size, size)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.encode_image(x)
    return float(fc.get_total_flops())


def teacher_forward_s(teacher: torch.nn.Module, args: argparse.Namespace, repeats: int = 7) -> float:
    """Median seconds of the teacher's forward on one batch (``encode_image`` under ``no_grad``, the call
    the online run makes per step), measured alone in this process after two warm-up calls, with this
    process's torch threads (the training runs inherit the same ``OMP_NUM_THREADS``); on the GPU when
    there is one, as the runs are."""
    import statistics

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = teacher.to(device)
    x = torch.rand(args.batch, 3, args.image_size, args.image_size, device=device)
    times = []
    with torch.no_grad():
        for k in range(repeats + 2):
            t0 = time.perf_counter()
            teacher.encode_image(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if k >= 2:
                times.append(time.perf_counter() - t0)
    return float(statistics.median(times))


def distill_overrides(args: argparse.Namespace) -> list[str]:
    """The stage-2 overrides of the benchmarked run (the ``distill`` recipe at the benchmark's sizes)."""
    return [
        "student.name=vit_tiny_patch16_224",
        "student.kwargs=" + json.dumps(student_kwargs(args)),
        f"data.dataset_kwargs={{split: train, size: {args.images}, image_size: {args.image_size}}}",
        f"data.image_size={args.image_size}",
        f"data.local_size={args.local_size}",
        f"data.local_crops={args.local_crops}",
        f"data.batch_size={args.batch}",
        f"head.out_dim={args.head_out}",
        f"head.hidden_dim={2 * args.student_dim}",
        f"head.bottleneck_dim={max(args.student_dim // 2, 16)}",
        "loss.clip_weight=0",
    ]


def _train(args: argparse.Namespace, out: Path, extra: list[str]) -> list[dict]:
    """``tipsdistill-train`` in its own process; returns its JSON-lines log."""
    cmd = [
        sys.executable,
        "-m",
        "tipsdistill.scripts.train",
        "--recipe",
        "distill",
        f"output_dir={out}",
        f"steps={args.steps}",
        *distill_overrides(args),
        f"data.num_workers={args.workers}",
        "engine.precision=fp32",
        f"engine.zero_stage={args.zero_stage}",
        "checkpoint.every=0",
        "checkpoint.at_end=false",
        "log.progress=false",
        *extra,
    ]
    env = {
        **os.environ,
        "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu"),
    }
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"training failed:\n{proc.stderr[-4000:]}")
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def step_time(log: list[dict], batch: int, warmup: int) -> float:
    """Mean seconds per optimizer step of a training log, the first ``warmup`` steps excluded."""
    recs = log[warmup:]
    return sum(batch / r["samples_per_s"] for r in recs) / len(recs)


def data_wait_fraction(log: list[dict], batch: int, warmup: int) -> float:
    """Fraction of the step time spent waiting for the next batch (``data_s`` of the log: images from the
    workers, features from the reader thread, host-to-device copy), the first ``warmup`` steps excluded."""
    recs = log[warmup:]
    return sum(r["data_s"] for r in recs) / sum(batch / r["samples_per_s"] for r in recs)


def train_step_flops(args: argparse.Namespace, cache_dir: Path) -> float:
    """FLOPs of one cached training step (forward + backward of student, heads, losses), no DeepSpeed."""
    from torch.utils.flop_counter import FlopCounterMode

    from tipsdistill.distill.config import load_config
    from tipsdistill.distill.task import build_task
    from tipsdistill.distill.train import _Loader, _to_device

    cfg = load_config("distill", [f"cache.path={cache_dir}", *distill_overrides(args), "data.num_workers=0"])
    built = build_task(cfg, device=torch.device("cpu"))
    loader = _Loader(built.dataset, built.sampler, cfg)
    batch = _to_device(loader.next(), torch.device("cpu"))
    if loader.feeder is not None:
        loader.feeder.close()
    with FlopCounterMode(display=False) as fc:
        sum(built.task(batch, teacher_temp=cfg.loss.teacher_temp).values()).backward()
    return float(fc.get_total_flops())


def student_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        img_size=args.image_size,
        patch_size=args.patch,
        embed_dim=args.student_dim,
        depth=args.student_depth,
        num_heads=2,
        reg_tokens=1,
        no_embed_class=True,
    )


def teacher_kwargs(args: argparse.Namespace, ckpt: Path | None) -> dict:
    kw = dict(
        model_name="vit_tiny_patch16_224",
        img_size=args.image_size,
        patch_size=args.patch,
        embed_dim=args.teacher_dim,
        depth=args.teacher_depth,
        num_heads=4,
    )
    if ckpt is not None:
        kw["checkpoint"] = str(ckpt)
    return kw


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench_train")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--local-size", type=int, default=32)
    p.add_argument("--local-crops", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--zero-stage", type=int, default=0)
    p.add_argument("--student-dim", type=int, default=64)
    p.add_argument("--student-depth", type=int, default=4)
    p.add_argument("--teacher-dim", type=int, default=256)
    p.add_argument("--teacher-depth", type=int, default=8)
    p.add_argument("--head-out", type=int, default=256, help="prototypes of the DINO heads")
    p.add_argument(
        "--caches",
        default="",
        help="comma-separated teacher counts (e.g. 2,3): benchmark the several-teacher path with that many "
        "caches instead of cached vs online",
    )
    return p


# the teachers of the several-teacher benchmark: (embed_dim, patch, cache image size), widths and grids
# all different; the first is the teacher of the one-cache run
MULTI_TEACHERS = ((256, 8, None), (192, 16, 128), (384, 16, None))


def multi_teacher_caches(args: argparse.Namespace, out: Path, count: int) -> list[Path]:
    """``count`` stage-1 caches of random timm teachers (:data:`MULTI_TEACHERS`) over the same images."""
    from tipsdistill.cache import build_dataset, extract_features
    from tipsdistill.teachers.timm_teacher import build_timm_teacher

    if count > len(MULTI_TEACHERS):
        raise SystemExit(f"--caches: at most {len(MULTI_TEACHERS)} teachers")
    ds = build_dataset("synthetic", split="train", size=args.images, image_size=args.image_size)
    paths = []
    for k, (dim, patch, size) in enumerate(MULTI_TEACHERS[:count]):
        size = size or args.image_size
        dest = out / f"cache{k}"
        paths.append(dest)
        if (dest / "index.h5").is_file():
            continue
        torch.manual_seed(k)
        teacher = build_timm_teacher(
            "vit_tiny_patch16_224", img_size=size, patch_size=patch, embed_dim=dim, depth=2, num_heads=4
        ).freeze()
        extract_features(
            dict(
                out=str(dest), image_size=size, batch_size=32, num_workers=0, progress=False, granularities=[]
            ),
            teacher=teacher,
            dataset=ds,
        )
    return paths


def multi_override(paths: list[Path]) -> str:
    """``teachers=[...]`` naming the caches ``t0, t1, ...`` with default settings."""
    from tipsdistill.distill.multi import teachers_override

    return teachers_override([{"name": f"t{k}", "path": p} for k, p in enumerate(paths)])


def multi_step_flops(args: argparse.Namespace, paths: list[Path]) -> tuple[float, float]:
    """FLOPs of one several-teacher training step (forward + backward) and of its adaptor heads alone."""
    from torch.utils.flop_counter import FlopCounterMode

    from tipsdistill.distill.config import load_config
    from tipsdistill.distill.multi import build_multi_task
    from tipsdistill.distill.train import _Loader, _to_device

    cfg = load_config(
        "distill",
        [multi_override(paths), *distill_overrides(args), "data.num_workers=0", "output_dir=unused"],
    )
    built = build_multi_task(cfg, device=torch.device("cpu"))
    loader = _Loader(built.dataset, built.sampler, cfg)
    batch = _to_device(loader.next(), torch.device("cpu"))
    loader.feeder.close()
    with FlopCounterMode(display=False) as fc:
        sum(built.task(batch, teacher_temp=cfg.loss.teacher_temp).values()).backward()
    total = float(fc.get_total_flops())
    # the adaptors alone: their forward + backward on the student's token shapes of this batch
    student = built.student
    grid = args.image_size // args.patch
    x = torch.rand(args.batch, grid, grid, student.embed_dim, requires_grad=True)
    c = torch.rand(args.batch, 1, student.embed_dim, requires_grad=True)
    with FlopCounterMode(display=False) as fa:
        for adaptor in student.adaptors.values():
            (adaptor.patch(x).sum() + adaptor.cls(c).sum()).backward()
    return total, float(fa.get_total_flops())


def main_multi(args: argparse.Namespace, out: Path) -> int:
    """The several-teacher benchmark (``--caches``); see the module docstring."""
    counts = sorted({int(c) for c in args.caches.split(",") if c})
    paths = multi_teacher_caches(args, out, max(counts))
    rows: dict[str, dict[str, Any]] = {}
    log = _train(args, out / "one_cache", [f"cache.path={paths[0]}"])
    rows["1 cache (cache.path, heads)"] = {"log": log, "paths": paths[:1]}
    for k in [1, *counts] if 1 not in counts else counts:
        log = _train(args, out / f"caches{k}", [multi_override(paths[:k])])
        rows[f"{k} cache{'s' if k > 1 else ''} (teachers, adaptors)"] = {"log": log, "paths": paths[:k]}
    base = step_time(rows["1 cache (cache.path, heads)"]["log"], args.batch, args.warmup)
    res: dict[str, Any] = {
        "settings": vars(args),
        "teachers": [list(t) for t in MULTI_TEACHERS[: max(counts)]],
    }
    lines = [
        "\n| run | s/step | vs one cache | data wait / step (goal <= 5 %) | adaptor FLOPs / step FLOPs |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        s = step_time(r["log"], args.batch, args.warmup)
        wait = data_wait_fraction(r["log"], args.batch, args.warmup)
        share = ""
        entry = {"s_per_step": s, "vs_one_cache": s / base, "data_wait_fraction": wait}
        if "adaptors" in name:
            total, adapt = multi_step_flops(args, r["paths"])
            entry.update(flops_step=total, flops_adaptors=adapt)
            share = f"{100 * adapt / total:.1f} %"
        rows[name] = entry
        lines.append(f"| {name} | {s:.3f} | {s / base:.2f}x | {100 * wait:.1f} % | {share} |")
    res["runs"] = rows
    res["device"] = "cuda" if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    (out / "bench_train_multi.json").write_text(json.dumps(res, indent=2))
    print("\n".join(lines))
    return 0


def saved_teacher(args: argparse.Namespace, out: Path) -> tuple[Any, Path]:
    """A random-init timm teacher, saved to ``out/teacher.safetensors`` and rebuilt from that file (what
    the online run loads)."""
    from safetensors.torch import save_file

    from tipsdistill.teachers.timm_teacher import build_timm_teacher

    torch.manual_seed(0)
    teacher = build_timm_teacher(**teacher_kwargs(args, None)).freeze()
    ckpt = out / "teacher.safetensors"
    save_file(
        {k: v.contiguous() for k, v in teacher.model.state_dict().items()}
        if hasattr(teacher, "model")
        else {},
        str(ckpt),
    )
    return build_timm_teacher(**teacher_kwargs(args, ckpt)).freeze(), ckpt


def measure_flops(args: argparse.Namespace, teacher: Any) -> dict[str, float]:
    """FLOPs per image of the student (global and local crops) and of the teacher; prints them."""
    from tipsdistill.students import build_student

    student = build_student("vit_tiny_patch16_224", **student_kwargs(args))
    f_s, f_t = flops_per_image(student, args.image_size), flops_per_image(teacher, args.image_size)
    ratio = f_t / f_s
    print(
        f"FLOPs/image at {args.image_size}px: student {f_s / 1e6:.1f}M, teacher {f_t / 1e6:.1f}M ({ratio:.1f}x)"
    )
    if ratio < 8:
        print(
            "warning: teacher is < 8x the student's FLOPs; raise --teacher-dim/--teacher-depth",
            file=sys.stderr,
        )
    # per training sample the student also runs the local crops
    f_s_local = flops_per_image(student, args.local_size) * args.local_crops
    return {
        "flops_student_global": f_s,
        "flops_student_locals": f_s_local,
        "flops_teacher": f_t,
        "flops_ratio": ratio,
    }


def build_cache(args: argparse.Namespace, teacher: Any, cache_dir: Path) -> tuple[Any, float]:
    """The stage-1 cache of the synthetic training images with ``teacher``; returns (dataset, seconds)."""
    from tipsdistill.cache import build_dataset, extract_features

    t0 = time.time()
    ds = build_dataset("synthetic", split="train", size=args.images, image_size=args.image_size)
    extract_features(
        dict(
            out=str(cache_dir),
            image_size=args.image_size,
            batch_size=32,
            num_workers=0,
            progress=False,
            granularities=[],
        ),
        teacher=teacher,
        dataset=ds,
    )
    cache_s = time.time() - t0
    print(f"stage-1 cache of {args.images} images: {cache_s:.1f}s")
    return ds, cache_s


def loader_samples_per_s(args: argparse.Namespace, cache_dir: Path) -> float:
    """Samples/s of the cached run's data path alone (``distill.train._Loader`` with the run's settings:
    image workers + the feature reader thread + the host-to-device step), worker start-up excluded."""
    from tipsdistill.distill.config import load_config
    from tipsdistill.distill.task import build_task
    from tipsdistill.distill.train import _Loader, _to_device

    cfg = load_config(
        "distill", [f"cache.path={cache_dir}", *distill_overrides(args), f"data.num_workers={args.workers}"]
    )
    built = build_task(cfg, device=torch.device("cpu"))
    loader = _Loader(built.dataset, built.sampler, cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _to_device(loader.next(), device)  # worker start-up
    batches = max(4, 2 * args.images // args.batch)
    t0 = time.time()
    for _ in range(batches):
        _to_device(loader.next(), device)
    dt = time.time() - t0
    if loader.feeder is not None:
        loader.feeder.close()
    return batches * args.batch / dt


def format_table(res: dict[str, Any], workers: int) -> str:
    return (
        "\n| measure | value |\n|---|---|\n"
        f"| teacher / student FLOPs per image | {res['flops_ratio']:.1f}x |\n"
        f"| s/step, cached targets | {res['s_per_step_cached']:.3f} |\n"
        f"| s/step, online teacher | {res['s_per_step_online']:.3f} |\n"
        f"| speed-up of cached | {res['speedup_cached']:.2f}x |\n"
        f"| compute-bound bound: 1 + teacher fwd / cached step FLOPs | {res['speedup_bound_compute']:.2f}x |\n"
        f"| speed-up / bound (goal >= 0.8) | {res['fraction_of_bound']:.2f} |\n"
        f"| teacher forward alone, s per batch (measured) | {res['s_teacher_forward']:.3f} |\n"
        f"| measured bound: 1 + teacher forward s / cached step compute s | {res['speedup_bound_measured']:.2f}x |\n"
        f"| speed-up / measured bound | {res['fraction_of_measured_bound']:.2f} |\n"
        f"| data wait / step time (goal <= 5 %) | {100 * res['data_wait_fraction']:.1f} % |\n"
        f"| data loader alone, samples/s ({workers} workers) | {res['loader_samples_per_s']:.1f} |\n"
        f"| training consumes, samples/s | {res['train_consumes_samples_per_s']:.1f} |\n"
        f"| loader headroom | {res['loader_headroom']:.2f}x |"
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.caches:
        return main_multi(args, out)
    teacher, ckpt = saved_teacher(args, out)
    flops = measure_flops(args, teacher)
    cache_dir = out / "cache"
    ds, cache_s = build_cache(args, teacher, cache_dir)
    cached_log = _train(args, out / "cached", [f"cache.path={cache_dir}"])
    online = [
        "teacher.source=online",
        "teacher.name=timm",
        "teacher.kwargs=" + json.dumps(teacher_kwargs(args, ckpt)),
    ]
    online_log = _train(args, out / "online", online)
    s_cached = step_time(cached_log, args.batch, args.warmup)
    s_online = step_time(online_log, args.batch, args.warmup)
    step_flops = train_step_flops(args, cache_dir)
    teacher_step_flops = flops["flops_teacher"] * args.batch
    ideal = 1.0 + teacher_step_flops / step_flops
    print(
        f"FLOPs per step (batch {args.batch}): cached training step (fwd+bwd, heads, locals) "
        f"{step_flops / 1e9:.2f}G, online teacher forward {teacher_step_flops / 1e9:.2f}G; "
        f"compute-bound speed-up bound {ideal:.2f}x"
    )
    wait = data_wait_fraction(cached_log, args.batch, args.warmup)
    t_teacher = teacher_forward_s(teacher, args)
    # what a cache can save on this machine: the teacher's forward as this machine runs it, against the
    # cached step's own compute (its step time less its data wait)
    ideal_measured = 1.0 + t_teacher / (s_cached * (1.0 - wait))
    print(
        f"teacher forward alone {t_teacher:.3f}s per batch of {args.batch} ({teacher_step_flops / t_teacher / 1e9:.1f} "
        f"GFLOP/s) vs the cached step's compute {s_cached * (1 - wait):.3f}s ({step_flops / (s_cached * (1 - wait)) / 1e9:.1f} "
        f"GFLOP/s): measured bound {ideal_measured:.2f}x"
    )
    loader_sps = loader_samples_per_s(args, cache_dir)
    consume_sps = args.batch / s_cached
    device = (
        "cuda"
        if torch.cuda.is_available()
        else f"cpu ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"
    )
    res = {
        "device": device,
        "settings": vars(args),
        **flops,
        "flops_train_step_cached": step_flops,
        "flops_teacher_step": teacher_step_flops,
        "speedup_bound_compute": ideal,
        "cache_build_s": cache_s,
        "s_per_step_cached": s_cached,
        "s_per_step_online": s_online,
        "speedup_cached": s_online / s_cached,
        "fraction_of_bound": (s_online / s_cached) / ideal,
        "data_wait_fraction": wait,
        "s_teacher_forward": t_teacher,
        "speedup_bound_measured": ideal_measured,
        "fraction_of_measured_bound": (s_online / s_cached) / ideal_measured,
        "loader_samples_per_s": loader_sps,
        "train_consumes_samples_per_s": consume_sps,
        "loader_headroom": loader_sps / consume_sps,
    }
    (out / "bench_train.json").write_text(json.dumps(res, indent=2))
    print(format_table(res, args.workers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
