"""Shared helpers of the stage-2 training tests (no tests here): a tiny teacher with a toy text tower,
a tiny stage-1 cache built with the real writer, and a subprocess runner (one DeepSpeed init per process).

Run as a script (``python tests/test_train_support.py ARGS.json``) it trains once and writes a JSON result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
TEACHER_KW = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2)
STUDENT_KW = dict(
    img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, reg_tokens=1, no_embed_class=True
)


def tiny_teacher(seed: int = 0):
    """A random tiny timm ViT teacher (dim 48, grid 4x4 at 32 px) with a toy hashed bag-of-words text tower."""
    from tipsdistill.teachers.timm_teacher import build_timm_teacher

    torch.manual_seed(seed)
    t = build_timm_teacher("vit_tiny_patch16_224", **TEACHER_KW)
    dim = t.embed_dim
    g = torch.Generator().manual_seed(seed + 1)
    table = torch.randn(4096, dim, generator=g)

    def encode_text(texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), dim)
        for i, s in enumerate(texts):
            for w in s.lower().replace(".", " ").replace(",", " ").split():
                out[i] += table[zlib.crc32(w.encode()) % 4096]
        return out

    t.encode_text = encode_text  # type: ignore[method-assign]
    t.has_text = True
    return t.freeze()


def make_cache(out: str | Path, n: int = 48, views: int = 1, **cache_kw: Any) -> Path:
    """Build a real stage-1 cache of ``n`` synthetic 32 px images with the tiny teacher (``cache_kw``:
    further :class:`cache.CacheConfig` fields, e.g. ``reduce_dim=12``)."""
    from tipsdistill.cache import build_dataset, extract_features

    out = Path(out)
    if (out / "index.h5").exists():
        return out
    ds = build_dataset("synthetic", split="train", size=n, image_size=32)
    extract_features(
        dict(
            out=str(out), image_size=32, batch_size=16, num_workers=0, progress=False, views=views, **cache_kw
        ),
        teacher=tiny_teacher(),
        dataset=ds,
    )
    return out


def base_overrides(cache: str | Path, out: str | Path) -> list[str]:
    return [
        f"cache.path={cache}",
        f"output_dir={out}",
        "student.name=vit_tiny_patch16_224",
        "student.kwargs=" + json.dumps(STUDENT_KW),
        "data.dataset_kwargs={split: train, size: 48, image_size: 32}",
        "data.image_size=32",
        "data.local_size=16",
        "data.local_crops=2",
        "data.batch_size=8",
        "data.num_workers=0",
        "head.out_dim=64",
        "head.hidden_dim=32",
        "head.bottleneck_dim=16",
        "optim.warmup_steps=1",
        "optim.lr=2e-3",
        "engine.precision=fp32",
        "log.progress=false",
        "checkpoint.every=0",
    ]


def run_subprocess(args: dict[str, Any], *, nproc: int = 1, timeout: int = 240) -> dict[str, Any]:
    """Run one training in a fresh process (``torchrun`` when ``nproc > 1``); return its JSON result."""
    out = Path(args["result"])
    out.parent.mkdir(parents=True, exist_ok=True)
    spec = out.with_suffix(".args.json")
    spec.write_text(json.dumps(args))
    from tests.launch_helpers import subprocess_env, torchrun  # (this file also runs as a script)

    env = subprocess_env()
    script = str(Path(__file__).resolve())
    if nproc > 1:
        cmd = [
            *torchrun(nproc),
            script,
            str(spec),
        ]
    else:
        cmd = [sys.executable, script, str(spec)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(
            f"training subprocess failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    res = json.loads(out.read_text())
    res["stderr"] = proc.stderr[-8000:]
    return res


def probe_pixels() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(123))


def weights_digest(module: torch.nn.Module) -> dict[str, float]:
    return {k: float(v.double().sum()) for k, v in module.state_dict().items() if v.is_floating_point()}


def _main(spec_path: str) -> None:
    args = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    from tipsdistill.distill.config import load_config
    from tipsdistill.distill.train import train

    cfg = load_config(args.get("recipe", "distill"), args["overrides"])
    if args.get("item_reference"):  # targets and captions from tests/item_reference.py
        from tests.item_reference import use_item_reference

        use_item_reference()
    result: dict[str, Any] = {}
    try:
        for i, resume in enumerate(args.get("runs", [None])):
            r = train(cfg, resume=resume, max_steps=args.get("max_steps", [None] * 9)[i])
            result["step"] = r["step"]
            result["final"] = r["final"]
            result["export"] = r["export"]
            result.setdefault("bests", []).append(r.get("best"))
            engine = r["engine"]
    except Exception as e:  # noqa: BLE001 - reported to the parent test
        import traceback

        traceback.print_exc()
        result["error"] = f"{type(e).__name__}: {e}"
        engine = None
    rank = int(os.environ.get("RANK", "0"))
    if engine is not None and rank == 0:
        import deepspeed

        zero3 = cfg.engine.zero_stage == 3
        params = list(engine.module.parameters())
        ctx = deepspeed.zero.GatheredParameters(params) if zero3 else _null()
        with ctx:
            result["weights"] = weights_digest(engine.module)
            student = engine.module.student
            student.eval()
            with torch.no_grad():
                feats = student.encode_image(probe_pixels())
            torch.save(
                {"cls": feats.cls, "patch": feats.patch}, Path(args["result"]).with_suffix(".probe.pt")
            )
        ema = engine.module.ema_heads.patch
        if ema is not None:
            result["ema"] = weights_digest(ema)
        named = engine.module.ema_heads.named  # several teachers' prototype heads (distill.multi)
        if named:
            result["ema_named"] = {key: weights_digest(m) for key, m in named.items()}
        log = Path(cfg.output_dir) / "log.jsonl"
        result["log"] = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    elif engine is not None and cfg.engine.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            pass
    if rank == 0:
        Path(args["result"]).write_text(json.dumps(result))


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


if __name__ == "__main__":
    _main(sys.argv[1])
