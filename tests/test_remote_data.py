"""Shards where they live: stage 1 and stage 2 reading webdataset shards from servers this test starts on
loopback (never mocked): an HTTP server that honours ``Range`` requests (an ``http.server`` subclass in a
thread) and an S3-compatible server (moto's server mode), and from ``pipe:`` commands.

The shards are ``tests/own_data_check.make_shards`` (a corrupt image, a caption without image, a key
repeated in a later shard, a truncated shard): every good sample is cached exactly once, the skipped
ones are listed, the index is built once (a later open sends no request), and no file of the cache
holds a credential.
"""

from __future__ import annotations

import http.server
import os
import re
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from tests.own_data_check import check_cache, make_shards
from tests.test_train_support import base_overrides, run_subprocess
from tipsdistill.cache import open_cache, source_for_cache
from tipsdistill.cache.locations import public_url
from tipsdistill.cache.shards import WebDatasetShards

TEACHER = "tests.cache_helpers:build_tiny_teacher"
SECRET = "very-secret-key-0123"
PATTERN = "{00000..00004}.tar"


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with ``Range: bytes=a-b`` answered by 206 Partial Content, folders listed as HTML (as
    ``python -m http.server`` or nginx's autoindex list them: what fsspec globs and lists); every request
    counted."""

    counts: dict[str, int]

    def log_message(self, *args) -> None:  # quiet
        pass

    def send_head(self):  # noqa: ANN201 - http.server's own signature
        path = self.translate_path(self.path.split("?", 1)[0])
        if os.path.isdir(path):  # the folder's listing (or a redirect to its URL with a trailing slash)
            self._left = 1 << 30
            return super().send_head()
        if not os.path.isfile(path):
            self.send_error(404)
            return None
        size = os.path.getsize(path)
        fh = open(path, "rb")  # noqa: SIM115 - http.server closes it after copyfile
        m = re.match(r"bytes=(\d+)-(\d*)$", self.headers.get("Range", ""))
        with self.server.lock:
            self.counts["range" if m else "whole"] += 1
        if m:
            start, end = int(m.group(1)), int(m.group(2) or size - 1)
            end = min(end, size - 1)
            if start >= size:
                self.send_error(416)
                fh.close()
                return None
            fh.seek(start)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            length = end - start + 1
            self._left = length
        else:
            self.send_response(200)
            length = size
            self._left = size
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(length))
        self.end_headers()
        return fh

    def copyfile(self, source, outputfile) -> None:
        outputfile.write(source.read(self._left))


class LoggedRangeHandler(RangeHandler):
    """:class:`RangeHandler` that logs each request as ``(method, path, range start or None)`` and answers
    503 Service Unavailable to the next ``fail["left"]`` requests for a range after offset 0 (image reads), or
    to any request with ``fail["any"]``."""

    log: list[tuple[str, str, int | None]]
    fail: dict[str, int]

    def send_head(self):  # noqa: ANN201 - http.server's own signature
        m = re.match(r"bytes=(\d+)-", self.headers.get("Range", ""))
        start = int(m.group(1)) if m else None
        with self.server.lock:
            self.log.append((self.command, urllib.parse.urlsplit(self.path).path, start))
            down = (bool(start) or self.fail.get("any", False)) and self.fail["left"] > 0
            self.fail["left"] -= down
        if down:
            self.send_error(503)
            return None
        return super().send_head()


@contextmanager
def serve(
    folder: Path, fail: dict[str, int] | None = None, counts: dict[str, int] | None = None
) -> Iterator[tuple[str, list[tuple[str, str, int | None]]]]:
    """A loopback HTTP server of ``folder`` (Range requests, folder listings): ``(base URL, request log)``;
    ``fail={"left": n}``: the next ``n`` image reads answer 503 (set it at any time); ``counts``: the
    requests with and without ``Range`` are counted there."""
    log: list[tuple[str, str, int | None]] = []
    attrs = {"counts": {"range": 0, "whole": 0} if counts is None else counts, "log": log}
    attrs["fail"] = {"left": 0} if fail is None else fail
    handler = type("H", (LoggedRangeHandler,), attrs)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: handler(*a, directory=str(folder)))
    srv.lock = threading.Lock()
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", log
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote")
    expect = make_shards(root)
    return root, expect


@pytest.fixture(scope="module")
def http_server(shards):
    root, _ = shards
    counts = {"range": 0, "whole": 0}
    with serve(root, counts=counts) as (base, _):
        yield base, counts


@pytest.fixture(scope="module")
def s3_server(shards):
    from moto.server import ThreadedMotoServer

    root, _ = shards
    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing-key-id",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="laion")
    for f in sorted((root / "shards").glob("*.tar")):
        s3.upload_file(str(f), "laion", f"cc/shards/{f.name}")
    yield "s3://laion/cc/shards"
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    srv.stop()


def _stage1(out: Path, data: str, workers: int = 0) -> None:
    from tipsdistill.scripts.cache_features import main

    args = ["--teacher", TEACHER, "--data", data, "--caption", "short=json.short", "--out", str(out)]
    rc = main(args + ["--image-size", "32", "--batch-size", "4", "--num-workers", str(workers), "--quiet"])
    assert rc == 0


def _no_secret_in(folder: Path, *secrets: str) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            for s in secrets:
                assert s.encode() not in data, f"{s!r} is in {f}"


def test_http_range_stage1_every_good_sample_once_then_stage2_reads_from_the_server(
    shards, http_server, tmp_path
):
    root, expect = shards
    base, counts = http_server
    url = base.replace("http://", f"http://user:{SECRET}@") + f"/shards/{PATTERN}"
    out = tmp_path / "cache"
    _stage1(out, f"wds:{url}", workers=2)
    assert check_cache(out, expect) == []  # every good sample once, the bad ones skipped with their kind
    fc = open_cache(out)
    assert {k for _, k, _ in fc.skipped} == set(expect["skipped"])
    _no_secret_in(out, SECRET)
    spec = fc.meta["dataset_spec"]
    assert f"{base}/shards/{PATTERN}" in str(spec) and (out / "data_index" / "meta.json").exists()
    # the index is read, not rebuilt: opening the dataset again sends no request
    before = dict(counts)
    ds = WebDatasetShards(f"{base}/shards/{PATTERN}", caption_fields={"alt": "txt", "short": "json.short"},
                          index=str(out / "data_index"))  # fmt: skip
    assert counts == before and len(ds) == len(expect["good"]) + len(expect["skipped"])
    # one image by key: one Range request at the index's offset
    i = int(ds.index_of([expect["good"][5]])[0])
    assert ds[i]["key"] == expect["good"][5] and counts["range"] == before["range"] + 1
    # stage 2 from the cache alone: its images come from the server
    before = dict(counts)
    overrides = [o for o in base_overrides(out, tmp_path / "run") if not o.startswith("data.dataset")]
    # (a generous timeout: on a shared machine deepspeed may first rebuild its CPU shm op, minutes under load)
    r = run_subprocess(
        {"result": str(tmp_path / "result.json"), "overrides": overrides + ["steps=2"]}, timeout=600
    )
    assert "error" not in r, r.get("error", "") + r.get("stderr", "")
    assert r["step"] == 2 and np.isfinite(r["final"]["loss"])
    assert counts["range"] > before["range"]
    assert len(source_for_cache(out, only_cached=True)) == len(expect["good"])


def test_s3_through_moto_and_no_credential_recorded(shards, s3_server, tmp_path):
    root, expect = shards
    out = tmp_path / "cache"
    _stage1(out, f"wds:{s3_server}/{PATTERN}")
    assert check_cache(out, expect) == []
    _no_secret_in(out, SECRET, "testing-key-id")
    ds = source_for_cache(out, only_cached=True)
    it = ds[0]
    assert it["key"] == expect["good"][0] and it["image"].shape == (3, 40, 48)  # read from the bucket
    # a folder URL is listed on the bucket
    assert len(WebDatasetShards(f"{s3_server}/", index=str(tmp_path / "ix"))) == len(ds) + len(
        expect["skipped"]
    )


def test_pipe_commands_stream_and_a_cache_never_runs_them(shards, tmp_path):
    root, expect = shards
    out = tmp_path / "cache"
    _stage1(out, f"wds:pipe:cat {root}/shards/{PATTERN}")
    assert check_cache(out, expect) == []
    with pytest.raises(ValueError, match="a cache never runs commands"):
        source_for_cache(out)
    kw = {"index": str(out / "data_index"), "caption_fields": {"alt": "txt", "short": "json.short"}}
    given = source_for_cache(out, f"wds:pipe:cat {root}/shards/{PATTERN}", kw)
    assert given[0]["key"] == expect["good"][0]


def test_public_url_removes_secrets():
    assert public_url(f"https://bob:{SECRET}@host/a/{{0..3}}.tar?X-Amz-Signature=abc&v=2") == (
        "https://host/a/{0..3}.tar?v=2"
    )
    assert SECRET not in public_url(f"pipe:curl -s -H 'Authorization: Bearer {SECRET}' https://h/0.tar")
    assert public_url("s3://bucket/x.tar") == "s3://bucket/x.tar"


def test_remote_tables_retry_a_flaky_server_and_stop_when_it_is_down(tmp_path, monkeypatch, capsys):
    """Parquet shards over HTTP: a 503 while scanning a shard or reading a row group is tried again; a server
    that goes down mid-run stops stage 1 (before: every row of the row group being read was recorded as
    skipped for good) and the same command completes once it answers, every row cached, none skipped."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.own_data_check import _jpeg
    from tipsdistill.cache import locations
    from tipsdistill.cache.tables import TableDataset
    from tipsdistill.scripts.cache_features import main as cache_main

    monkeypatch.setattr(locations, "RETRY_WAIT_S", 0.01)
    root = tmp_path / "data" / "parquet"
    root.mkdir(parents=True)
    keys: list[str] = []
    for s in range(2):
        ks = [f"{s}{r:03d}" for r in range(4)]
        keys += ks
        table = {
            "key": ks,
            "jpg": [_jpeg(10 * s + r) for r in range(4)],
            "caption": [f"photo {k}" for k in ks],
        }
        pq.write_table(pa.table(table), root / f"{s:05d}.parquet", row_group_size=2)
    expect = {"good": keys, "skipped": {}}
    fail = {"left": 0, "any": True}  # small files are read whole (no range): any request fails
    with serve(tmp_path / "data", fail) as (base, _):
        args = ["--teacher", TEACHER, "--data", f"parquet:{base}/parquet/*.parquet", "--image-field", "jpg"]
        args += "--data-kw key_field=key --image-size 32 --batch-size 4 --num-workers 0 --quiet".split()
        fail["left"] = locations.REMOTE_TRIES - 1  # the first read fails 3 times, the 4th try succeeds
        assert cache_main([*args, "--out", str(tmp_path / "flaky")]) == 0
        assert fail["left"] == 0 and check_cache(tmp_path / "flaky", expect) == []
        ds = TableDataset(f"{base}/parquet/*.parquet", image_field="jpg", key_field="key")
        fail["left"] = 10**6
        with pytest.raises(locations.SourceUnavailableError, match=r"00000\.parquet.*source is unavailable"):
            ds[0]
        assert 10**6 - fail["left"] >= locations.REMOTE_TRIES  # each try is one or two requests (fsspec)
        # the server goes down after the shards were scanned, at the first row-group read
        out = tmp_path / "down"
        read = TableDataset.__getitem__

        def down_then_read(self, index):
            fail["left"] = 10**6
            return read(self, index)

        with monkeypatch.context() as m:
            m.setattr(TableDataset, "__getitem__", down_then_read)
            assert cache_main([*args, "--out", str(out)]) == 2
        assert "the source is unavailable" in capsys.readouterr().err
        fail["left"] = 0  # back: the same command completes, nothing recorded as unreadable
        assert cache_main([*args, "--out", str(out)]) == 0
        assert check_cache(out, expect) == []
