"""Print the tables of README "3. Measure" and docs/embedded.md 4.6 / 4.7 from this folder's JSON files."""

import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load(d):
    return json.loads((HERE / f"{d}.json").read_text())


W = load("widths")
A = load("w64")
B = load("w192")
T = load("text")
teacher = W["teacher"]


def cell(m):
    return f"{m['miou']:.1f} / {m['miou_objects']:.1f}"


def group(R, prefix):
    return [(int(k[-1]), v["metrics"]) for k, v in sorted(R["runs"].items()) if k.startswith(prefix)]


def stats(ms, ro):
    a = [m[ro]["miou"] for m in ms]
    o = [m[ro]["miou_objects"] for m in ms]
    if len(ms) >= 2:
        return f"{statistics.mean(a):.1f} ± {statistics.stdev(a):.1f} / {statistics.mean(o):.1f} ± {statistics.stdev(o):.1f}"
    return f"{a[0]:.1f} / {o[0]:.1f}"


rows = []
rows.append(("teacher (6 blocks x 96)", [(None, teacher)], "-"))
rows.append(("student 4 x 96 (same width: no projection)", [(0, W["runs"]["seed0"]["metrics"])], "96"))
rows.append(("student 4 x 64 (+ `text_proj` 64 -> 96)", group(A, "w64_seed"), "64"))
rows.append(("student 4 x 192 (+ `text_proj` 192 -> 96)", group(B, "w192_seed"), "192"))


def table(readouts=("tips", "maskclip")):
    head = (
        "| model | "
        + " | ".join(f"{ro}: each seed (all / objects) | {ro}: mean ± sd" for ro in readouts)
        + " |"
    )
    out = [head, "|---|" + "---|---|" * len(readouts)]
    for name, runs, _ in rows:
        cells = []
        for ro in readouts:
            each = ", ".join((f"s{s}: " if s is not None else "") + cell(m[ro]) for s, m in runs)
            cells += [each, stats([m for _, m in runs], ro) + (f" (n={len(runs)})" if len(runs) > 1 else "")]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out)


readme_table = table(("tips",))
full_table = table()
nA, nB = len(group(A, "w64_seed")), len(group(B, "w192_seed"))
order = [
    ("seed0", "none: the teacher's cached caption embeddings", "teacher", "locked"),
    (
        "distill_text_pretrained_frozen",
        "a copy of the teacher's own (MiniLM + its projection)",
        "teacher",
        "frozen",
    ),
    ("distill_text_pretrained", "the same copy", "teacher", "trained"),
    ("distill_text", "TIPS-style, 2 layers, width 96, the teacher's vocabulary", "random", "trained"),
    ("distill_text_frozen", "the same", "random", "frozen"),
]
allruns = {**W["runs"], **T["runs"]}
t2 = [
    "| run | student text tower | init | update | whole / tips: all / objects | whole / maskclip: all / objects | retrieval R@1 i2t / t2i (CLS1, short captions, own text) | minutes |",
    "|---|---|---|---|---|---|---|---|",
]
for n, tw, init, upd in order:
    r = allruns.get(n)
    if not r:
        t2.append(f"| `{n}` | {tw} | {init} | {upd} | not measured | | | |")
        continue
    rr = (r.get("retrieval") or {}).get("cls0/short")
    rs = f"{rr['i2t_r1']:.1f} / {rr['t2i_r1']:.1f}" if rr else "(the teacher's text)"
    t2.append(
        f"| `{n}` | {tw} | {init} | {upd} | {cell(r['metrics']['tips'])} | {cell(r['metrics']['maskclip'])} | {rs} | {r.get('minutes', 0):.0f} |"
    )
rt = (T.get("retrieval_teacher") or {}).get("cls0/short")
t2.append(
    f"| teacher (its own tower) | | | | {cell(teacher['tips'])} | {cell(teacher['maskclip'])} | {rt['i2t_r1']:.1f} / {rt['t2i_r1']:.1f} | |"
    if rt
    else ""
)
print(readme_table)
print()
print(full_table)
print()
print("\n".join(t2))
