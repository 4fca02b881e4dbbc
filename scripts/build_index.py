"""``tipsdistill-index``: build the shard index of webdataset shards once (issue 29), before any stage.

    tipsdistill-index --data 's3://bucket/cc12m/{00000..01242}.tar' --caption short=json.short --out /shared/cc12m_index

walks every tar once (local files: headers only; remote: one sequential stream each) and writes the
index folder (:mod:`tipsdistill.cache.shard_index`): flat arrays that every later process memory-maps.
Pass the same folder to stage 1 (``--data-kw index=/shared/cc12m_index`` / ``dataset_kwargs.index``;
by default stage 1 writes one to ``OUT/data_index``), stage 2 and evaluation read it from the cache's record.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from tipsdistill.cache.dataset_spec import caption_fields_for
from tipsdistill.cache.locations import public_pattern
from tipsdistill.cache.shards import WebDatasetShards


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data", required=True, help="shard pattern (wds: prefix optional): braces, globs, folders, URLs"
    )
    p.add_argument(
        "--out", required=True, help="the index folder to write (refused if it holds another index)"
    )
    p.add_argument(
        "--caption", action="append", default=[], metavar="GRAN=FIELD", help="as tipsdistill-cache"
    )
    p.add_argument("--image-ext", action="append", default=None, help="image member extensions, in order")
    p.add_argument("--captions-encoding", default="utf-8")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    urls = args.data[len("wds:") :] if args.data.startswith("wds:") else args.data
    given = {}
    for item in args.caption:
        g, sep, f = item.partition("=")
        if not sep:
            print(f"error: --caption {item!r} is not GRAN=FIELD (e.g. short=json.short)", file=sys.stderr)
            return 2
        given[g] = f
    kw = {
        "caption_fields": caption_fields_for("webdataset", given),
        "captions_encoding": args.captions_encoding,
    }
    if args.image_ext:
        kw["image_exts"] = args.image_ext
    t = time.perf_counter()
    try:
        ds = WebDatasetShards(urls, index=args.out, **kw)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    kinds: dict[str, int] = {}
    for p in ds.problems:
        kinds[p["kind"]] = kinds.get(p["kind"], 0) + 1
    print(json.dumps({"index": ds.index_path, "shards": len(ds.paths), "samples": len(ds),
                      "pattern": public_pattern(urls), "problems": kinds,
                      "seconds": round(time.perf_counter() - t, 2)}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
