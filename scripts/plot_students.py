"""Which student to deploy: a Pareto figure of zero-shot mIoU against CPU images/s, drawn from a results
JSON (issue 30; docs/embedded.md).

The results file holds two parts, both measured by the toolkit's own scripts::

    {"miou": {"<model>": [<all-class mIoU of each seed>, ...], ...},
     "throughput": [<rows of `python -m tipsdistill.scripts.bench_students --out FILE`>]}

``miou`` keys are the :mod:`scripts.bench_students` model names (``teacher``, ``vit_student``,
``convnext_s8``...). One panel per (input size, runtime): x = images/s (log scale), y = mean mIoU over the
seeds (error bar: the spread when there are several), the Pareto front (no other model both faster and
better) joined by a line; models without an mIoU are left out and listed.

    python -m tipsdistill.scripts.plot_students docs/records/conv-students/results.json \\
        --out docs/img/students_pareto.png
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RUNTIMES = (("torch_img_s", "PyTorch"), ("ort_img_s", "ONNX Runtime"))


def read_results(path: str | Path) -> tuple[dict[str, list[float]], list[dict[str, Any]]]:
    """``(miou: model -> seeds, throughput rows)`` of a results file; a clear error for a malformed one."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{p}: cannot read the results JSON ({exc})") from exc
    if not isinstance(data, dict) or not {"miou", "throughput"} <= set(data):
        raise ValueError(f"{p}: needs the keys 'miou' and 'throughput' (see this script's docstring)")
    miou = {
        str(k): [float(v) for v in (vals if isinstance(vals, list) else [vals])]
        for k, vals in data["miou"].items()
    }
    rows = list(data["throughput"])
    for i, r in enumerate(rows):
        missing = {"model", "size", "torch_img_s", "ort_img_s"} - set(r)
        if missing:
            raise ValueError(
                f"{p}: throughput row {i} lacks {sorted(missing)} (rows of bench_students --out)"
            )
    return miou, rows


def pareto_front(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The points ``(speed, miou, name)`` no other point beats on both axes, by increasing speed."""
    front = [
        p
        for p in points
        if not any(q[0] >= p[0] and q[1] >= p[1] and (q[0], q[1]) != (p[0], p[1]) for q in points)
    ]
    return sorted(front)


def plot(miou: dict[str, list[float]], rows: list[dict[str, Any]], out: str | Path) -> list[str]:
    """Draw the figure into ``out``; returns the models left out (no mIoU)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    sizes = sorted({int(r["size"]) for r in rows})
    left_out = sorted({r["model"] for r in rows} - set(miou))
    fig, axes = plt.subplots(
        len(sizes), len(RUNTIMES), figsize=(5.2 * len(RUNTIMES), 3.8 * len(sizes)), squeeze=False
    )
    for i, size in enumerate(sizes):
        for j, (key, label) in enumerate(RUNTIMES):
            ax = axes[i][j]
            points = []
            for r in rows:
                if int(r["size"]) != size or r["model"] not in miou or r.get(key) is None:
                    continue
                seeds = miou[r["model"]]
                mean = statistics.mean(seeds)
                sd = statistics.stdev(seeds) if len(seeds) > 1 else 0.0
                points.append((float(r[key]), mean, r["model"]))
                ax.errorbar(float(r[key]), mean, yerr=sd, fmt="o", capsize=3)
                ax.annotate(
                    f"{r['model']} (n={len(seeds)})",
                    (float(r[key]), mean),
                    fontsize=7,
                    xytext=(4, 4),
                    textcoords="offset points",
                )
            front = pareto_front(points)
            if len(front) > 1:
                ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="gray", lw=1)
            ax.set_xscale("log")
            ax.set_xlabel(f"{label} images/s, {size} px (CPU)")
            ax.set_ylabel("zero-shot mIoU %, all classes (64 px)")
            ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return left_out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="results JSON: {'miou': {...}, 'throughput': [...]}")
    p.add_argument("--out", default="students_pareto.png")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        miou, rows = read_results(args.results)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc
    left_out = plot(miou, rows, args.out)
    if left_out:
        logger.info("left out (no mIoU in %s): %s", args.results, ", ".join(left_out))
    logger.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
