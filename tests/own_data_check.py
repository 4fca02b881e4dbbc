"""Run the "Your own data" commands of docs/own-data.md, as written, on a generated example set (CI: ``.ci/run``).

``python -m tests.own_data_check [--keep DIR]`` writes, in a temporary folder, the files those
commands name (``shards/0000{0..4}.tar`` written with ``webdataset.TarWriter``, ``images/`` +
``captions.parquet`` / ``.csv`` / ``.tsv`` / ``.jsonl``, a ``save_to_disk`` folder ``hf_dataset/``), with
the bad input the toolkit must survive (a truncated tar, a corrupt image, a caption without image, an
image without caption, a key repeated in another shard, a caption that is not UTF-8, a row whose
image path does not exist), then runs every ``bash`` block of that page in order and checks
what the caches hold. Exit status 0 when every command ran and every check held.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SECTION = "# Your own data"


def _jpeg(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    rng = np.random.default_rng(seed)
    a = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_shards(root: Path, shards: int = 5, per_shard: int = 6) -> dict[str, Any]:
    """``root/shards/{00000..}.tar`` in the img2dataset layout, with bad samples; returns the expected
    outcome: ``good`` keys (cached), ``skipped`` key -> kind, ``problems`` kinds."""
    import webdataset as wds

    samples: list[list[dict[str, Any]]] = []
    for s in range(shards):
        rows = []
        for i in range(per_shard):
            key = f"{s:05d}{i:04d}"
            rows.append(
                {
                    "__key__": key,
                    "jpg": _jpeg(s * 100 + i),
                    "txt": f"alt text of image {key}",
                    "json": {"key": key, "short": f"image {key}", "detailed": f"a detailed caption of {key}"},
                }
            )
        samples.append(rows)
    samples[1][2]["jpg"] = b"\xff\xd8\xff this is not a jpeg"  # corrupt image
    del samples[2][0]["jpg"]  # caption without image
    del samples[2][1]["txt"], samples[2][1]["json"]  # image without caption
    samples[2][3]["txt"] = "caf\xe9".encode("latin-1")  # not UTF-8: alt missing, short/detailed kept
    samples[3][4]["__key__"] = samples[0][1]["__key__"]  # the same key again in a later shard
    out = root / "shards"
    out.mkdir(parents=True, exist_ok=True)
    for s, rows in enumerate(samples):
        with wds.TarWriter(str(out / f"{s:05d}.tar")) as w:
            for row in rows:
                w.write(row)
    # truncate the last shard in the middle of the image of its 4th sample: 3 samples whole, 1 cut, 2 lost
    last = out / f"{shards - 1:05d}.tar"
    with tarfile.open(last) as tf:
        jpg = [m for m in tf.getmembers() if m.name.endswith(".jpg")][3]
    last.write_bytes(last.read_bytes()[: jpg.offset_data + jpg.size // 2])
    name = lambda s, i: f"{s:05d}/{samples[s][i]['__key__']}"  # noqa: E731
    skipped = {
        name(1, 2): "corrupt",
        name(2, 0): "no_image",
        name(3, 4): "duplicate",
        name(4, 3): "truncated",
    }
    good = [name(s, i) for s in range(shards - 1) for i in range(per_shard) if name(s, i) not in skipped]
    good += [name(shards - 1, i) for i in range(3)]
    return {"good": good, "skipped": skipped, "truncated": str(last), "no_caption": name(2, 1)}


def make_tables(root: Path, n: int = 12) -> dict[str, Any]:
    """``root/images/*.jpg`` and the same rows as parquet / CSV / TSV / JSON-lines (folder dataset), with
    one path that does not exist, one empty path, one corrupt image and one caption not in UTF-8."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    img = root / "images"
    img.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        (img / f"{i:03d}.jpg").write_bytes(_jpeg(1000 + i))
        paths.append(f"images/{i:03d}.jpg")
    (img / "003.jpg").write_bytes(b"corrupt")
    caps = [f"a photo number {i}" for i in range(n)]
    rows_path = [*paths, "images/does_not_exist.jpg", None]
    rows_cap = [*caps, "lost", "no image"]
    pq.write_table(
        pa.table(
            {"path": rows_path, "caption": rows_cap, "short_caption": [f"photo {i}" for i in range(n + 2)]}
        ),
        root / "captions.parquet",
    )
    for name, sep in (("captions.csv", b","), ("captions.tsv", b"\t")):
        with open(root / name, "wb") as fh:
            fh.write(b"path" + sep + b"caption\n")
            for i, (p, c) in enumerate(zip(rows_path, rows_cap)):
                enc = "latin-1" if i == 5 else "utf-8"
                c = "caf\xe9 au lait" if i == 5 else c
                fh.write((p or "").encode() + sep + c.encode(enc) + b"\n")
    with open(root / "captions.jsonl", "w") as fh:
        for i, c in enumerate(caps):
            fh.write(json.dumps({"image": f"{i:03d}.jpg", "alt": c}) + "\n")
    good = [f"captions.parquet/{i}" for i in range(n) if i != 3]
    return {"good": good, "skipped": {"captions.parquet/3": "corrupt", f"captions.parquet/{n}": "unreadable",
                                      f"captions.parquet/{n + 1}": "no_image"}}  # fmt: skip


def make_hf(root: Path, n: int = 10) -> dict[str, Any]:
    """``root/hf_dataset``: a ``datasets.Dataset`` (``Image`` feature + ``text``) saved with ``save_to_disk``."""
    import datasets

    images = [{"bytes": _jpeg(2000 + i), "path": None} for i in range(n)]
    images[4] = {"bytes": b"not an image", "path": None}
    ds = datasets.Dataset.from_dict({"image": images, "text": [f"hf caption {i}" for i in range(n)]})
    ds = ds.cast_column("image", datasets.Image())
    ds.save_to_disk(str(root / "hf_dataset"))
    return {"good": [f"train/{i}" for i in range(n) if i != 4], "skipped": {"train/4": "corrupt"}}


def make_example_data(root: Path) -> dict[str, Any]:
    root.mkdir(parents=True, exist_ok=True)
    return {"wds": make_shards(root), "table": make_tables(root), "hf": make_hf(root)}


def readme_blocks(readme: Path = REPO / "docs" / "own-data.md") -> list[str]:
    """The ``bash`` code blocks of docs/own-data.md's "Your own data" section, in order."""
    text = readme.read_text(encoding="utf-8")
    if SECTION not in text:
        raise SystemExit(f"{readme} has no {SECTION!r} section")
    section = text.split(SECTION, 1)[1]
    section = re.split(r"\n## ", section, maxsplit=1)[0]
    return re.findall(r"```bash\n(.*?)```", section, flags=re.S)


def check_cache(path: Path, expect: dict[str, Any]) -> list[str]:
    """Compare a cache with the expected good / skipped keys; returns the failures."""
    from tipsdistill.cache import open_cache

    fc = open_cache(path)
    fails = []
    keys = fc.keys()
    if len(keys) != len(set(keys)):
        fails.append(f"{path}: a key is cached twice")
    if sorted(keys) != sorted(expect["good"]):
        fails.append(f"{path}: cached keys differ: extra {sorted(set(keys) - set(expect['good']))}, "
                     f"missing {sorted(set(expect['good']) - set(keys))}")  # fmt: skip
    got = {k: r.split(":", 1)[0] for _, k, r in fc.skipped}
    if got != expect["skipped"]:
        fails.append(f"{path}: skipped {got}, expected {expect['skipped']}")
    if not fc.meta.get("dataset_spec"):
        fails.append(f"{path}: no dataset_spec recorded")
    return fails


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", help="work in this folder (kept) instead of a temporary one")
    args = ap.parse_args(argv)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="own_data_"))
    if work.exists() and args.keep:
        shutil.rmtree(work)
    t0 = time.perf_counter()
    expect = make_example_data(work)
    bindir = str(Path(sys.executable).parent)
    env = os.environ | {
        "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "HF_HOME": str(work / ".hf"),  # imagefolder / parquet builders cache here, not in the user's cache
    }
    blocks = readme_blocks()
    print(
        f"example data in {work} ({time.perf_counter() - t0:.1f} s); running {len(blocks)} block(s) of docs/own-data.md"
    )
    for i, block in enumerate(blocks, 1):
        t = time.perf_counter()
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=work, env=env, capture_output=True,
                           text=True)  # fmt: skip
        print(f"--- block {i} ({time.perf_counter() - t:.1f} s, rc {r.returncode})\n{block.strip()}")
        if r.returncode != 0:
            print(r.stdout[-3000:], r.stderr[-5000:], sep="\n", file=sys.stderr)
            return 1
    fails = []
    fails += check_cache(work / "caches/wds", expect["wds"])
    fails += check_cache(work / "caches/parquet", expect["table"])
    fails += check_cache(work / "caches/hf", expect["hf"])
    problems = (work / "caches/wds/dataset_problems.jsonl").read_text().splitlines()
    kinds = sorted({json.loads(line)["kind"] for line in problems})
    if kinds != ["bad_encoding", "no_caption", "truncated"]:
        fails.append(f"caches/wds/dataset_problems.jsonl kinds {kinds}")
    for f in ("runs/wds/export", "eval/wds/results.json"):
        if not (work / f).exists():
            fails.append(f"{f} was not written")
    for f in fails:
        print("FAIL", f, file=sys.stderr)
    print(f"own-data check: {'FAILED' if fails else 'ok'} in {time.perf_counter() - t0:.1f} s ({work})")
    return 1 if fails else 0


if __name__ == "__main__":
    raise SystemExit(main())
