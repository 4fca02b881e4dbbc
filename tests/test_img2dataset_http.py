"""img2dataset's own output read over HTTP, and stage 1 killed with ``kill -9`` then resumed over HTTP.

img2dataset itself (the package, not a copy of its layout) downloads a URL list from a loopback HTTP
server of generated images, two URLs of which answer 404, one file a truncated JPEG, one an HTML page,
with ``output_format="webdataset"`` and again with ``output_format="parquet"``: its real folders
(``00000.tar`` + ``00000.parquet`` + ``00000_stats.json``, failed rows in the parquet files). A second
loopback server honouring ``Range`` (``tests/test_remote_data.RangeHandler``) serves those folders:
stage 1 caches every sample img2dataset downloaded exactly once, from
``wds:http://.../{00000..00002}.tar`` (captions from its ``.txt`` and ``.json`` members) and from
``parquet:http://.../*.parquet`` (the folder listed over HTTP, ``key_field=key``), the failed rows counted
as skipped, the parquet rows read again from the server through the spec the cache records; stage 2
trains from the webdataset cache reading its images from the server (Range requests at image offsets only).

A stage 1 over ``wds:http://...`` killed with SIGKILL after its first committed blocks and run again with
the same command completes with every sample once, and the server's log shows that the second run
walked no tar again: no request without ``Range``, none at offset 0 (the index is read from
``OUT/data_index``).
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.own_data_check import _jpeg, check_cache, make_shards
from tests.test_remote_data import serve
from tests.test_train_support import base_overrides, run_subprocess
from tipsdistill.cache import locations, open_cache, source_for_cache
from tipsdistill.cache.locations import RangeNotHonouredError
from tipsdistill.cache.shard_index import ShardIndex
from tipsdistill.cache.shards import WebDatasetShards
from tipsdistill.scripts.cache_features import main as cache_main

REPO = Path(__file__).resolve().parents[1]
TEACHER = "tests.cache_helpers:build_tiny_teacher"
N_URLS, MISSING, CORRUPT, NOT_IMAGE = 12, (3, 7), 5, 9
# img2dataset's Python API with the arguments of its command line (docs/cache.md shows the commands);
# under `if __name__`: its multiprocessing distributor spawns processes
I2D_SCRIPT = (
    "import json, sys\n"
    "if __name__ == '__main__':\n"
    "    from img2dataset import download\n"
    "    for kw in json.loads(sys.argv[1]):\n"
    "        download(**kw)\n"
)


def _stage1(out: Path, data: str, *extra: str) -> None:
    args = [
        "--teacher",
        TEACHER,
        "--data",
        data,
        "--out",
        str(out),
        "--image-size",
        "32",
        "--batch-size",
        "4",
    ]
    assert cache_main([*args, "--num-workers", "0", "--quiet", *extra]) == 0


def _rows(folder: Path) -> list[dict]:
    """img2dataset's record of every URL (its per-shard parquet files), with the shard's name."""
    rows = []
    for f in sorted(folder.glob("*.parquet")):
        t = pq.read_table(f, columns=["url", "key", "status", "error_message"])
        rows += [r | {"shard": f.stem} for r in t.to_pylist()]
    return rows


@pytest.fixture(scope="module")
def img2dataset_out(tmp_path_factory):
    """img2dataset's webdataset and parquet folders of 12 URLs served on loopback (5 per shard: 3 shards)."""
    if importlib.util.find_spec("img2dataset") is None:
        pytest.skip(
            "img2dataset is not installed: pip install --no-deps img2dataset==1.47.0 (requirements.lock pins it and "
            "its dependencies; its metadata asks webdataset<0.3 and pandas<3, it runs with ours)"
        )
    root = tmp_path_factory.mktemp("img2dataset")
    web = root / "web"
    web.mkdir()
    for i in range(N_URLS):
        if i in MISSING:
            continue
        data = _jpeg(i)
        if i == CORRUPT:
            data = data[: len(data) // 3]  # cut short, as an interrupted upload leaves it
        elif i == NOT_IMAGE:
            data = b"<html><body>this page moved</body></html>"
        (web / f"img{i:03d}.jpg").write_bytes(data)
    out = root / "out"
    env = os.environ | {"NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    with serve(web) as (base, log):
        urls = [{"url": f"{base}/img{i:03d}.jpg", "caption": f"photo number {i}"} for i in range(N_URLS)]
        pq.write_table(pa.Table.from_pylist(urls), root / "urls.parquet")
        common = dict(
            url_list=str(root / "urls.parquet"), input_format="parquet", url_col="url", caption_col="caption",
            processes_count=1, thread_count=4, number_sample_per_shard=5, distributor="multiprocessing",
            resize_mode="no", timeout=5, enable_wandb=False,
        )  # fmt: skip
        runs = [
            common | {"output_format": "webdataset", "output_folder": str(out / "wds")},
            # the bytes as downloaded: the truncated JPEG and the HTML page reach the parquet file
            common | {"output_format": "parquet", "output_folder": str(out / "parquet"), "disable_all_reencoding": True},
        ]  # fmt: skip
        p = subprocess.run(
            [sys.executable, "-c", I2D_SCRIPT, json.dumps(runs)], env=env, capture_output=True, text=True, timeout=600
        )  # fmt: skip
        assert p.returncode == 0, p.stderr[-4000:]
    names = {f"{base}/img{i:03d}.jpg": i for i in range(N_URLS)}
    return out, {fmt: [r | {"i": names[r["url"]]} for r in _rows(out / fmt)] for fmt in ("wds", "parquet")}


def test_img2dataset_output_over_http_stage1_then_stage2(img2dataset_out, tmp_path):
    out, rows = img2dataset_out
    # img2dataset's real layout: per shard a tar (or parquet) + parquet + stats; every URL has its row
    assert sorted(f.name for f in (out / "wds").iterdir() if not f.name.startswith("_")) == sorted(
        f"0000{s}{suffix}" for s in range(3) for suffix in (".tar", ".parquet", "_stats.json")
    )
    for fmt in rows:
        assert sorted(r["i"] for r in rows[fmt]) == list(range(N_URLS)), fmt
        stats = [json.loads(f.read_text()) for f in sorted((out / fmt).glob("*_stats.json"))]
        assert sum(s["count"] for s in stats) == N_URLS
        assert sum(s["successes"] for s in stats) == sum(r["status"] == "success" for r in rows[fmt])
    status = {fmt: {r["i"]: r["status"] for r in rows[fmt]} for fmt in rows}
    assert all(status[fmt][i] == "failed_to_download" for fmt in rows for i in MISSING)
    # re-encoding (the webdataset run) rejects the two bad files; as downloaded (parquet) they are "success"
    assert status["wds"][CORRUPT] == status["wds"][NOT_IMAGE] == "failed_to_resize"
    assert status["parquet"][CORRUPT] == status["parquet"][NOT_IMAGE] == "success"

    with serve(out) as (base, log):
        # 1) the webdataset output: every sample img2dataset wrote, once; its failures never reached a tar
        wds_cache = tmp_path / "wds_cache"
        _stage1(wds_cache, f"wds:{base}/wds/{{00000..00002}}.tar", "--caption", "short=json.caption")
        good = [f"{r['shard']}/{r['key']}" for r in rows["wds"] if r["status"] == "success"]
        assert len(good) == N_URLS - 4
        assert check_cache(wds_cache, {"good": good, "skipped": {}}) == []
        item = source_for_cache(wds_cache, only_cached=True)[0]  # read again from the server by key
        i = next(r["i"] for r in rows["wds"] if f"{r['shard']}/{r['key']}" == item["key"])
        assert item["captions"] == {"alt": f"photo number {i}", "short": f"photo number {i}"}
        # 2) the parquet output, its folder listed over HTTP: failed downloads (null jpg) and the two bad
        # files skipped with their kinds, the others cached once under img2dataset's own keys
        pq_cache = tmp_path / "pq_cache"
        _stage1(
            pq_cache,
            f"parquet:{base}/parquet/*.parquet",
            "--image-field",
            "jpg",
            "--data-kw",
            "key_field=key",
        )
        key = {r["i"]: r["key"] for r in rows["parquet"]}
        skipped = {key[i]: "no_image" for i in MISSING} | {
            key[CORRUPT]: "truncated",
            key[NOT_IMAGE]: "corrupt",
        }
        good = [k for i, k in key.items() if k not in skipped]
        assert check_cache(pq_cache, {"good": good, "skipped": skipped}) == []
        spec = open_cache(pq_cache).meta["dataset_spec"]
        assert f"{base}/parquet/*.parquet" in str(spec) and "key_field" in str(spec)
        src = source_for_cache(pq_cache, only_cached=True)  # the recorded spec, its rows read from the server
        item = src[len(src) - 1]
        i = next(i for i, k in key.items() if k == item["key"])
        assert item["captions"] == {"alt": f"photo number {i}"} and item["image"].shape == (3, 40, 48)
        # 3) stage 2 from the webdataset cache alone: its images come from the server, one Range request at
        # an image's offset in the index each (the index is read from the cache: no tar walked, no listing)
        starts = {int(o) for o in ShardIndex.load(wds_cache / "data_index").img[:, 0] if o >= 0}
        n_before = len(log)
        overrides = [
            o for o in base_overrides(wds_cache, tmp_path / "run") if not o.startswith("data.dataset")
        ]
        r = run_subprocess(
            {
                "result": str(tmp_path / "result.json"),
                "overrides": [*overrides, "data.batch_size=4", "steps=2"],
            },
            timeout=600,
        )
        assert "error" not in r, r.get("error", "") + r.get("stderr", "")
        assert r["step"] == 2 and np.isfinite(r["final"]["loss"])
        reads = log[n_before:]
        assert reads and all(m == "GET" and p.startswith("/wds/") and at in starts for m, p, at in reads), (
            reads
        )


def test_kill9_stage1_over_http_resumes_without_walking_a_tar_again(tmp_path):
    expect = make_shards(tmp_path / "data")
    out, prog = tmp_path / "cache", tmp_path / "calls"
    with serve(tmp_path / "data") as (base, log):
        args = [
            "--teacher", TEACHER, "--data", f"wds:{base}/shards/{{00000..00004}}.tar", "--caption", "short=json.short",
            "--out", str(out), "--image-size", "32", "--batch-size", "3", "--num-workers", "0", "--flush-interval", "0",
            "--quiet", "--teacher-kw", f"progress_file={json.dumps(str(prog))}", "delay=0.2",
        ]  # fmt: skip
        env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        p = subprocess.Popen(
            [sys.executable, "-m", "tipsdistill.scripts.cache_features", *args],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip
        t0 = time.time()
        while not (
            prog.exists() and prog.read_text().strip() and int(prog.read_text()) >= 4
        ):  # probe + 3 blocks
            assert p.poll() is None, p.communicate()
            assert time.time() - t0 < 240, "stage 1 did not reach its third block"
            time.sleep(0.02)
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        assert p.returncode == -signal.SIGKILL
        with h5py.File(next(out.glob("shard-*.h5")), "r") as f:
            done = int(f["done"][()].sum())
        assert 0 < done < len(expect["good"]), done
        shards = {f"/shards/{s:05d}.tar" for s in range(5)}
        # the killed run walked every tar once (the index pass: requests from offset 0 or without Range)
        walked = {path for _, path, start in log if path in shards and not start}
        assert walked == shards
        index_meta = (out / "data_index" / "meta.json").read_text()
        (out / ".data_index.tmp-999999").mkdir()  # what a build killed while saving the index leaves
        n_before = len(log)
        assert cache_main(args) == 0  # the same command again, at once (in this process)
        again = log[n_before:]
        assert check_cache(out, expect) == []  # every good sample once, the bad ones skipped with their kinds
        assert (out / "data_index" / "meta.json").read_text() == index_meta  # read, not rebuilt
        assert not (out / ".data_index.tmp-999999").exists()  # the unfinished save removed
        headers = [x for x in again if x[2] is None or x[2] == 0]
        assert not headers, f"the resumed run read tar headers again: {headers}"
        assert again and all(m == "GET" and path in shards for m, path, _ in again), again


def test_a_server_that_ignores_range_stops_the_index_with_its_fix(tmp_path):
    """``python -m http.server`` answers a range with the whole file: taken for the sample's bytes it made every
    tar "truncated" and every image "corrupt"; the index pass now stops, naming the server and the fix."""
    make_shards(tmp_path)

    class Plain(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: Plain(*a, directory=str(tmp_path)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/shards/{{00000..00001}}.tar"
        with pytest.raises(RangeNotHonouredError, match=r"00000\.tar: the server ignored the byte range"):
            WebDatasetShards(url)
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_flaky_server_is_retried_and_a_dead_one_stops_stage1_which_resumes(tmp_path, monkeypatch, capsys):
    """HTTP 503s (or refused connections, time-outs) are the server's problem, not the samples': a read is tried
    again, and when the server stays down stage 1 stops (before, every sample read then was recorded as skipped
    for good, so the cache silently lacked them); the same command then completes with every sample once."""
    monkeypatch.setattr(locations, "RETRY_WAIT_S", 0.01)
    expect = make_shards(tmp_path / "data")
    fail = {"left": 0}
    with serve(tmp_path / "data", fail) as (base, log):
        data = f"wds:{base}/shards/{{00000..00004}}.tar"
        fail["left"] = locations.REMOTE_TRIES - 1  # the first read fails 3 times, the 4th try succeeds
        _stage1(tmp_path / "flaky", data, "--caption", "short=json.short")
        assert fail["left"] == 0 and check_cache(tmp_path / "flaky", expect) == []
        out = tmp_path / "down"
        WebDatasetShards(data[4:], {"alt": "txt", "short": "json.short"}, index=str(out / "data_index"))
        fail["left"] = 10**6  # the index is built; now the server answers no image read
        args = ["--teacher", TEACHER, "--data", data, "--caption", "short=json.short", "--out", str(out)]
        args += ["--image-size", "32", "--batch-size", "4", "--num-workers", "0", "--quiet"]
        assert cache_main(args) == 2
        assert "the source is unavailable" in capsys.readouterr().err
        assert 10**6 - fail["left"] == locations.REMOTE_TRIES  # one read tried 4 times, then the run stopped
        fail["left"] = 0  # the server is back: the same command completes, nothing recorded as unreadable
        assert cache_main(args) == 0
        assert check_cache(out, expect) == []
