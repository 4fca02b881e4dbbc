"""Stage 1's key memory per process: a list of every key vs keys read on demand from the shard index.

``python -m tipsdistill.scripts.bench_keys --samples 1000000 --world 8`` writes a synthetic shard index
(:func:`scripts.bench_cache.synthetic_index`: 9-byte keys in 10,000-sample shards, 5-character shard
names, so a key is ``00042/000001234``) beside empty tar files it names, opens it as stage 1 does
(:class:`cache.shards.WebDatasetShards` with ``index=``), and in a fresh process per way measures what
planning rank 0 of ``--world`` adds: the keys as :class:`cache.plan.ShardPlan` holds them, their digest
(``keys_sha1``) and the rank's own slice (what its shard file stores). Resident = ``Rss`` and private
``Anonymous`` memory of ``/proc/self/smaps_rollup`` after planning, the keys still held; peak =
``VmHWM`` after resetting it (``/proc/self/clear_refs``) just before.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

_PROBE = """
import json, sys, time
from pathlib import Path
def mem():
    f = {l.split(':')[0]: int(l.split()[1]) for l in open('/proc/self/smaps_rollup') if l.split()[0].endswith(':')}
    return f['Rss'] * 1024, f['Anonymous'] * 1024
def hwm():
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) * 1024
from tipsdistill.cache.format import keys_digest, shard_range
from tipsdistill.cache.plan import _dataset_keys
from tipsdistill.cache.shards import WebDatasetShards
root, way, world = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
ds = WebDatasetShards(str(root / 'shards' / '*.tar'), image_exts=['jpg'], index=str(root / 'index'))
ds.key(0)
r0, a0 = mem()
open('/proc/self/clear_refs', 'w').write('5')
h0 = hwm()
t = time.perf_counter()
if way == 'list':  # stage 1 before: cache.plan._dataset_keys made a list of every key
    keys = [str(k) for k in ds.keys()]
else:
    keys = _dataset_keys(ds)
digest = keys_digest(keys)
start, count = shard_range(len(keys), 0, world)
mine = list(keys[start : start + count])
seconds = time.perf_counter() - t
r1, a1 = mem()
print(json.dumps({'n': len(keys), 'rss': r1 - r0, 'anon': a1 - a0, 'peak': hwm() - h0, 's': seconds,
                  'shard_keys': len(mine), 'digest': digest}))
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=1_000_000, help="keys in the synthetic index")
    p.add_argument("--world", type=int, default=8, help="ranks of stage 1 (rank 0's slice is measured)")
    p.add_argument("--dir", help="work folder (default: a temporary one)")
    return p


def main(argv: list[str] | None = None) -> int:
    from tipsdistill.scripts.bench_cache import synthetic_index

    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        synthetic_index(root / "index", args.samples)
        meta_path = root / "index" / "meta.json"
        meta = json.loads(meta_path.read_text())
        (root / "shards").mkdir()
        meta["shards"] = []
        for name in meta["shard_names"]:  # empty tars: the index is read, never a shard
            (root / "shards" / f"{name}.tar").touch()
            meta["shards"].append(str((root / "shards" / f"{name}.tar").resolve()))
        meta_path.write_text(json.dumps(meta))
        rows = {}
        for way in ("list", "on_demand"):
            r = subprocess.run(
                [sys.executable, "-c", _PROBE, str(root), way, str(args.world)],
                capture_output=True,
                text=True,
            )
            if r.returncode:
                raise SystemExit(f"the {way} probe failed:\n{r.stderr[-3000:]}")
            rows[way] = json.loads(r.stdout.strip().splitlines()[-1])
    if rows["list"]["digest"] != rows["on_demand"]["digest"]:
        raise SystemExit("the two ways disagree on the keys' digest")
    n = args.samples
    print(f"stage 1 planning, rank 0 of {args.world}, {n:,} keys (synthetic shard index)")
    print("| keys held as | resident, bytes/key (private) | peak added, bytes/key | planning keys, s |")
    print("|---|---|---|---|")
    for way, label in (
        ("list", "a list of every key (before)"),
        ("on_demand", "read on demand (DatasetKeys)"),
    ):
        m = rows[way]
        print(f"| {label} | {m['rss'] / n:.1f} ({m['anon'] / n:.1f}) | {m['peak'] / n:.1f} | {m['s']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
