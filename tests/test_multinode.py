"""Multi-node stage 1 on one machine: two ``torchrun --nnodes 2`` agents (one process each) meet over
c10d on loopback. A shared ``--out`` gives the cache one process makes; two "nodes" that each see
their own ``--out`` (a relative path from two working directories) fail at start, fast, saying so."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.cache_helpers import write_captions, write_images
from tests.launch_helpers import free_port, subprocess_env
from tipsdistill.cache import extract_features, open_cache

REPO = Path(__file__).resolve().parents[1]
TEACHER = "tests.cache_helpers:build_tiny_teacher"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("nodes")
    rels = write_images(root / "img", 9, seed=3)
    write_captions(root / "caps.jsonl", rels)
    return root, rels


def two_nodes(
    root: Path, out: str, cwds: tuple[Path, Path], *extra: str
) -> list[subprocess.CompletedProcess]:
    """``torchrun --nnodes 2 --nproc_per_node 1`` twice over one c10d rendezvous, started together (one in
    each of ``cwds``; c10d decides which becomes node 0), each writing ``--out out``; their results."""
    port, run_id = free_port(), f"t{os.getpid()}{time.monotonic_ns() % 10**6}"
    env = subprocess_env()
    procs = []
    for cwd in cwds:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1"]
        cmd += ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", run_id]
        cmd += ["-m", "tipsdistill.scripts.cache_features", "--teacher", TEACHER]
        cmd += ["--images", str(root / "img"), "--captions", str(root / "caps.jsonl"), "--out", out]
        cmd += ["--image-size", "32", "--batch-size", "4", "--num-workers", "0", "--quiet", *extra]
        procs.append(
            subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    results = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        results.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return results


def test_two_nodes_shared_out_equal_one_process(images, tmp_path):
    root, rels = images
    out = tmp_path / "shared"
    results = two_nodes(root, str(out), (tmp_path, tmp_path))
    for r in results:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert not (out / ".shared_out_check").exists()  # rank 0 removes its check file
    two = open_cache(out, expect={"num_samples": 9})
    assert two.keys() == rels
    assert sorted(p.name for p in out.glob("shard-*.h5")) == [
        "shard-00000-of-00002.h5",
        "shard-00001-of-00002.h5",
    ]
    one = tmp_path / "one"
    extract_features(
        out=str(one),
        teacher=TEACHER,
        dataset="folder",
        dataset_kwargs={"root": str(root / "img"), "captions": str(root / "caps.jsonl")},
        image_size=32,
        batch_size=4,
        num_workers=0,
        progress=False,
    )
    single = open_cache(one)
    assert single.meta["autocast"] == "off" and single.meta["tf32"] is False  # the CPU: float32, no TF32
    assert json.loads((out / "cache_config.json").read_text())["tf32"] is False
    assert len(single) == len(two) == 9
    for i in range(9):
        a, b = two[i], single[i]
        assert a["key"] == b["key"]
        torch.testing.assert_close(a["patch"], b["patch"], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(a["text"]["short"], b["text"]["short"], atol=5e-3, rtol=2e-3)


def test_two_nodes_each_with_its_own_out_fail_fast_naming_the_rule(images, tmp_path):
    root, _ = images
    cwds = (tmp_path / "node0", tmp_path / "node1")
    for d in cwds:
        d.mkdir()
    t0 = time.monotonic()
    results = two_nodes(root, "cache", cwds, "shared_out_wait_s=1")
    took = time.monotonic() - t0
    checks = [d / "cache" / ".shared_out_check" for d in cwds]
    host = socket.gethostname()
    for r in results:
        assert r.returncode != 0, r.stdout[-2000:]
        text = r.stdout + r.stderr
        assert "--out must be one shared filesystem path seen by every node" in text, text[-4000:]
        assert "--out 'cache' is a relative path" in text
        # each names the other's path: rank 0 on one "node" wrote its file, rank 1 looked in its own folder
        wrote = next(i for i in (0, 1) if f"rank 0 on {host} (node 0) wrote {checks[i]}" in text)
        assert f"rank 1 on {host} (node 1) looked for {checks[1 - wrote]}" in text
    assert not any(p.exists() for p in checks)  # rank 0 removes its check file
    # nothing was written: the check runs before the teacher is built or a shard is created
    for d in cwds:
        assert not list((d / "cache").glob("shard-*"))
    assert took < 120, took  # no rank waits on another's files
