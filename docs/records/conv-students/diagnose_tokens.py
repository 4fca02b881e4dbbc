"""Forward-only diagnosis of trained students (issue 30): how much of the embedded teacher's patch tokens a
student's dense tokens explain linearly, and how local its tokens are.

For each ``NAME=EXPORT_DIR`` (or ``NAME=rand:<distill.experiments.ARCH_STUDENTS key>``, the random init):
the teacher's tokens on 256 validation images (resampled to the student's grid as the training targets
are, ``distill.data.resample_grid``), a least-squares map student -> teacher fitted on half of the tokens,
its R^2 on the other half; and the within-image share of the token variance (1: tokens vary only inside
images, 0: only between images).

    python docs/records/conv-students/diagnose_tokens.py vit=runs/exp/seed0/export conv=rand:convnext_s8
"""

from __future__ import annotations

import sys
from dataclasses import replace

import torch

from tipsdistill.distill.data import resample_grid
from tipsdistill.distill.embedded import FULL, validation_split
from tipsdistill.distill.experiments import ARCH_STUDENTS
from tipsdistill.students import build_student, load_student
from tipsdistill.teachers import build_teacher


def main(args: list[str]) -> None:
    torch.set_num_threads(1)
    val = validation_split(replace(FULL, val_size=256))
    x = torch.stack([val[i]["image"] for i in range(len(val))]).float()
    with torch.no_grad():
        tp = build_teacher("embedded").eval().encode_image(x).patch  # (B, 8, 8, 96)
    for name, path in (a.split("=", 1) for a in args):
        if path.startswith("rand:"):
            torch.manual_seed(0)
            timm_name, kw = ARCH_STUDENTS[path[len("rand:") :]]
            student = build_student(timm_name, **kw).eval()
        else:
            student = load_student(path).eval()
        with torch.no_grad():
            sp = student.encode_image(x).patch  # (B, h, w, D)
        grid = tuple(sp.shape[1:3])
        tt = tp if grid == tuple(tp.shape[1:3]) else torch.stack([resample_grid(v, grid) for v in tp])
        s, t = sp.flatten(0, 2), tt.flatten(0, 2)
        n = len(s) // 2
        a = torch.cat([s, torch.ones(len(s), 1)], 1)
        w = torch.linalg.lstsq(a[:n], t[:n]).solution
        r2 = 1 - ((a[n:] @ w - t[n:]) ** 2).sum() / ((t[n:] - t[:n].mean(0)) ** 2).sum()

        def within(f: torch.Tensor) -> float:
            return float(
                ((f - f.mean((1, 2), keepdim=True)) ** 2).sum() / ((f - f.mean((0, 1, 2))) ** 2).sum()
            )

        print(
            f"{name}: grid {grid}, R2 of teacher tokens from student tokens (held-out half) {r2:.3f}; "
            f"within-image share of token variance: student {within(sp):.3f}, teacher {within(tt):.3f}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
