"""Which student to deploy: parameters and CPU images/s of the embedded benchmark's students, PyTorch and
ONNX Runtime, at the benchmark's size (64 px) and at 224 px, measured in one run (random weights: speed
does not depend on them). At 224 px the teacher row is its image tower's architecture built at 224 px
(the shipped teacher resizes its 64 px position table inside the forward, which ONNX cannot export).

    python -m tipsdistill.scripts.bench_students [--threads 1] [--batch 8] [--repeats 5] [--sizes 64 224]

Rows: the embedded teacher (its image tower), the ViT student of the ``embedded`` recipe, and the
students of other architectures of ``distill.experiments`` (``ARCH_STUDENTS``). Each model is exported
with :func:`distill.export.export_onnx` (dynamic batch, fixed size, checked against PyTorch) per size.
Printed: a Markdown table and one JSON line per row; ``--out FILE`` also writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tipsdistill.distill.experiments import ARCH_STUDENTS

#: the ViT student of the ``embedded`` recipe, then the other architectures of ``distill.experiments``
STUDENTS: dict[str, tuple[str, dict[str, Any]]] = {
    "vit_student": (
        "vit_base_patch14_reg1_tipsv2",
        {
            "patch_size": 8,
            "reg_tokens": 1,
            "no_embed_class": True,
            "init_values": 1.0,
            "embed_dim": 96,
            "depth": 4,
            "num_heads": 3,
        },
    ),
    **ARCH_STUDENTS,
}


def images_per_s(fn: Any, x: Any, repeats: int) -> float:
    """Median images/s of ``repeats`` timed calls of ``fn(x)`` after one warm-up call."""
    fn(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return len(x) / statistics.median(times)


def build(name: str, size: int) -> nn.Module:
    """The model ``name`` (a :data:`STUDENTS` key or ``teacher``) for ``size`` px inputs, eval mode."""
    from tipsdistill.students import build_student
    from tipsdistill.teachers import build_teacher

    if name == "teacher":
        teacher = build_teacher("embedded").eval()
        if size == teacher.image_size:
            return teacher
        # another size: the teacher's image tower built natively at ``size`` (random weights, the same
        # compute; a position table resized inside the graph has no ONNX export, docs/limitations.md)
        shape = {**teacher.config["overrides"], "img_size": size}
        return build_student(teacher.config["timm_name"], **shape).eval()
    timm_name, kw = STUDENTS[name]
    kw = dict(kw)
    if "patch_size" in kw:
        kw["img_size"] = size
    return build_student(timm_name, **kw).eval()


def bench(name: str, size: int, batch: int, repeats: int) -> dict[str, Any]:
    import onnxruntime as ort

    from tipsdistill.distill.evaluation.segmentation import resolve_readout
    from tipsdistill.distill.export import OnnxStudent, export_onnx

    model = build(name, size)
    params = sum(p.numel() for p in model.parameters() if p is not None)
    if name == "teacher":  # the image tower only (the text tower is not deployed on the camera)
        params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("text"))
    x = torch.rand(batch, 3, size, size)
    readout = resolve_readout(model, "tips")  # each model's zero-shot readout (maskclip for a conv student)
    wrapped = OnnxStudent(model, readout).eval()
    with torch.no_grad():
        torch_ips = images_per_s(wrapped, x, repeats)
    ort_ips, info, error = None, {}, None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        try:
            info = export_onnx(model, path, image_size=size, readout=readout)
        except (RuntimeError, torch.onnx.errors.UnsupportedOperatorError) as exc:  # reported in the row
            error = f"{type(exc).__name__}: {str(exc)[:160]}"
        else:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = torch.get_num_threads()
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            ort_ips = images_per_s(lambda a: sess.run(None, {"pixels": a}), x.numpy(), repeats)
    return {
        "model": name,
        "size": size,
        "params_m": params / 1e6,
        "readout": readout,
        "torch_img_s": torch_ips,
        "ort_img_s": ort_ips,
        "onnx_max_abs_diff": info.get("max_abs_diff"),
        "onnx_error": error,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["teacher", *STUDENTS], choices=["teacher", *STUDENTS])
    p.add_argument("--sizes", nargs="+", type=int, default=[64, 224])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="PyTorch intra-op threads (and ONNX Runtime's)")
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [bench(m, s, args.batch, args.repeats) for s in args.sizes for m in args.models]
    print(f"CPU, {args.threads} thread(s), batch {args.batch}, median of {args.repeats} runs")
    print(
        "| model | size | params (M) | readout | PyTorch img/s | ONNX Runtime img/s | x teacher (PyTorch / ORT) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        base = next((t for t in rows if t["model"] == "teacher" and t["size"] == r["size"]), None)
        ratio = f"{r['torch_img_s'] / base['torch_img_s']:.2f}" if base else "-"
        if base and r["ort_img_s"] is not None and base["ort_img_s"] is not None:
            ratio += f" / {r['ort_img_s'] / base['ort_img_s']:.2f}"
        ort_cell = f"{r['ort_img_s']:.1f}" if r["ort_img_s"] is not None else "export failed (see JSON)"
        print(
            f"| {r['model']} | {r['size']} | {r['params_m']:.2f} | {r['readout']} | {r['torch_img_s']:.1f} | "
            f"{ort_cell} | {ratio} |"
        )
    for r in rows:
        print(json.dumps(r))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
