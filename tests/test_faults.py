"""Fault injection: kill -9 (main process only / whole process group) then the same command at once,
two concurrent runs, another process holding the shard open, damaged shards (truncated, flipped
metadata bytes, flipped sample bytes, an index naming a missing shard) repaired keeping every intact
sample, a full disk, and stage 2 killed mid-step and mid-checkpoint. CPU, tiny data."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import psutil
import pytest

from tests.cache_helpers import write_captions, write_images
from tipsdistill.cache import extract_features, open_cache
from tipsdistill.cache.format import read_chunk_map
from tipsdistill.cache.lock import CacheBusyError, ShardLock
from tipsdistill.cache.repair import verify_cache, verify_shard
from tipsdistill.scripts.cache_features import verify_main

REPO = Path(__file__).resolve().parents[1]
TEACHER = "tests.cache_helpers:build_tiny_teacher"
SHARD = "shard-00000-of-00001.h5"
N, B = 24, 3  # images, write block (8 blocks)
ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _cfg(out: Path, root: Path, caps: Path, **kw) -> dict:
    d = dict(
        out=str(out),
        teacher=TEACHER,
        dataset="folder",
        dataset_kwargs={"root": str(root), "captions": str(caps)},
        image_size=32,
        batch_size=B,
        num_workers=0,
        progress=False,
    )
    return d | kw


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("faults")
    root = base / "img"
    rels = write_images(root, N, seed=5)
    write_captions(base / "caps.jsonl", rels, skip=(4,))
    (root / "broken.png").write_bytes(b"\x89PNG not an image")  # one skipped sample (N + 1 keys)
    ref = base / "ref"
    extract_features(_cfg(ref, root, base / "caps.jsonl"))
    return root, base / "caps.jsonl", ref


def contents(out: Path) -> dict:
    """Every dataset of the shard and its attributes except the timestamps and the config (which
    records the test's slowdown knobs). HDF5 files are not byte-identical across runs (creation
    times, attribute order of a repaired file), so the caches are compared dataset by dataset."""
    res = {}
    with h5py.File(out / SHARD) as f:
        f.visititems(lambda n, o: res.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
        skip = ("created", "finished", "config", "git_revision", "teacher_spec")
        res["attrs"] = {k: v for k, v in f.attrs.items() if k not in skip}
    return res


def assert_same(out: Path, ref: Path) -> None:
    a, b = contents(out), contents(ref)
    assert sorted(a) == sorted(b)
    assert sorted(a["attrs"]) == sorted(b["attrs"])
    for k in a:
        if k == "attrs":
            for ak in a[k]:
                np.testing.assert_array_equal(a[k][ak], b[k][ak], err_msg=ak)
        else:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert len(open_cache(out)) == len(open_cache(ref)) == N


def _cli_args(root: Path, caps: Path, out: Path, prog: Path, workers: int = 1) -> list[str]:
    return [
        "--images", str(root), "--captions", str(caps), "--out", str(out), "--image-size", "32",
        "--batch-size", str(B), "--num-workers", str(workers), "--flush-interval", "0", "--quiet",
        "--teacher", TEACHER, "--teacher-kw", f"progress_file={json.dumps(str(prog))}", "delay=0.15",
    ]  # fmt: skip


def _start(args: list[str], group: bool = False) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tipsdistill.scripts.cache_features", *args],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=group,
    )


def _wait_calls(prog: Path, n: int, proc: subprocess.Popen, timeout: float = 90) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        txt = prog.read_text().strip() if prog.exists() else ""
        if txt and int(txt) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError(f"the teacher did not reach {n} calls in {timeout} s")


def test_kill9_main_then_group_then_rerun_identical(data, tmp_path):
    """kill -9 of the main process only (as the OOM killer does: its workers then exit on their own) and of the
    whole process group, each followed at once by the same command; a concurrent run is refused."""
    root, caps, ref = data
    out, prog = tmp_path / "c", tmp_path / "calls"
    args = _cli_args(root, caps, out, prog)
    rng = np.random.default_rng()
    # 1) main process only, at a random block (1 probe call + 9 blocks)
    p1 = _start(args)
    _wait_calls(prog, int(rng.integers(3, 6)), p1)
    with pytest.raises(CacheBusyError, match=rf"pid {p1.pid} on host {socket.gethostname()}"):
        extract_features(_cfg(out, root, caps))  # a second, concurrent run never writes
    leftovers = psutil.Process(p1.pid).children(recursive=True)  # fork server + workers
    assert leftovers
    p1.send_signal(signal.SIGKILL)
    p1.wait()
    _, alive = psutil.wait_procs(leftovers, timeout=30)
    assert not alive, f"workers of the killed run still alive: {[p.pid for p in alive]}"
    with h5py.File(out / SHARD) as f:
        done1 = int(f["done"][()].sum())
    assert not (out / "index.h5").exists() and 0 < done1 < N + 1
    # 2) rerun at once; kill its whole process group (main + workers + forkserver) later on
    prog.unlink()
    p2 = _start(args, group=True)
    _wait_calls(prog, 3, p2)
    os.killpg(p2.pid, signal.SIGKILL)
    _, err2 = p2.communicate()
    assert "resuming" in err2, err2[-2000:]
    assert "Delete" not in err2 and "damaged" not in err2, err2[-2000:]
    # 3) the same command at once completes
    p3 = subprocess.run(
        [sys.executable, "-m", "tipsdistill.scripts.cache_features", *args],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p3.returncode == 0, p3.stderr[-3000:]
    assert "cache complete" in p3.stdout
    assert_same(out, ref)


def test_dead_runs_leftover_holding_the_lock_is_waited_for(tmp_path):
    """A dead run whose forked child still holds the lock: the next run waits, says so, takes over."""
    shard = tmp_path / SHARD
    code = textwrap.dedent(
        f"""
        import os, signal, sys, time
        from tipsdistill.cache.lock import ShardLock
        lk = ShardLock({str(shard)!r}).acquire()
        if os.fork() == 0:  # a leftover worker: inherits the lock's open file description
            os.close(1), os.close(2)  # (not the pipes: the parent test reads them to the end)
            time.sleep(2.0)
            os._exit(0)
        print("locked", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True)
    assert "locked" in p.stdout and p.returncode == -signal.SIGKILL
    lock = ShardLock(shard, wait_s=20)
    t0 = time.time()
    with lock:
        assert lock.took_over is not None and lock.took_over["pid"] != os.getpid()
        assert 0.3 < time.time() - t0 < 10
    # a holder that is alive is refused at once, naming it
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from cache.lock import ShardLock; import time; l = ShardLock({str(shard)!r}).acquire(); print('ok', flush=True); time.sleep(30)"],
        cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "ok"
        with pytest.raises(CacheBusyError, match=rf"being written by another run: pid {holder.pid} on host"):
            ShardLock(shard).acquire()
    finally:
        holder.kill()
        holder.wait()


def test_hdf5_lock_held_by_a_reader_is_not_damage(data, tmp_path):
    root, caps, _ = data
    out = tmp_path / "c"
    shutil.copytree(data[2], out)
    with h5py.File(out / SHARD, "r+") as f:  # an incomplete cache: the next run must open it for writing
        f.attrs["complete"] = False
        f["done"][N - 2 :] = False
    (out / "index.h5").unlink()
    reader = subprocess.Popen(
        [sys.executable, "-c", f"import h5py, time; f = h5py.File({str(out / SHARD)!r}, 'r'); print('open', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert reader.stdout.readline().strip() == "open"
        with pytest.raises(
            CacheBusyError, match=rf"is open in processes \[{reader.pid}\].*The file is not damaged"
        ):
            extract_features(_cfg(out, root, caps))
    finally:
        reader.kill()
        reader.wait()
    assert not list(out.glob("*.damaged-*"))
    extract_features(_cfg(out, root, caps))
    assert_same(out, data[2])


def _flip(path: Path, offset: int, n: int = 8) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = bytearray(fh.read(n))
        fh.seek(offset)
        fh.write(bytes(x ^ 0xFF for x in b))


def test_damaged_shards_detected_and_repaired_keeping_intact_samples(data, tmp_path, capsys):
    root, caps, ref = data
    cmap = read_chunk_map(ref / SHARD)
    row_bytes = int(np.prod(cmap["patch@shape"])) * 2
    per = int(cmap["patch@rows"])  # rows per chunk (format 3: one contiguous extent of all rows)

    def row_offset(r: int) -> int:
        return int(cmap["patch"][r // per]) + (r % per) * row_bytes

    cases = {
        # sample bytes of rows 4 and 10 (blocks 1 and 3): those two blocks are redone, 18 samples kept
        "rows": (
            lambda p: [_flip(p, row_offset(r) + row_bytes // 2) for r in (4, 10)],
            [4, 10],
            25 - 6,
        ),
        # the root group's object header (checksummed metadata): HDF5 cannot open it; every sample kept
        "metadata": (lambda p: _flip(p, 96), [], 25),
        # the last 300 bytes (metadata written at completion): truncated; every sample kept
        "truncated": (lambda p: os.truncate(p, p.stat().st_size - 300), [], 25),
    }
    for name, (damage, bad_rows, kept) in cases.items():
        out = tmp_path / name
        shutil.copytree(ref, out)
        damage(out / SHARD)
        rep = verify_shard(out / SHARD)
        assert not rep.ok and rep.damaged == bad_rows and rep.kept_rows == kept, (name, rep.line())
        assert rep.intact == 25 - len(bad_rows)
        assert verify_main(str(out)) == 1  # tipsdistill-cache --verify --out DIR
        assert f"{SHARD}: DAMAGED" in capsys.readouterr().out
        s = extract_features(_cfg(out, root, caps, repair=True))
        printed = capsys.readouterr().out
        assert f"repaired {SHARD}: kept {kept} of 25 samples" in printed, printed
        assert s["index"] and not s["already_complete"]
        aside = list(out.glob(f"{SHARD}.damaged-*"))
        assert len(aside) == 2  # the damaged file and its chunk map, kept aside
        assert_same(out, ref)
        assert verify_shard(out / SHARD).ok
    # an index that names a missing shard: the reader refuses naming it; a rerun redoes the shard
    out = tmp_path / "missing"
    shutil.copytree(ref, out)
    (out / SHARD).rename(out / "elsewhere.h5")
    with pytest.raises(ValueError, match=rf"points at {SHARD}, which is missing"):
        open_cache(out)
    reports, index_problems = verify_cache(out)
    assert index_problems and f"lists {SHARD}, which is missing" in index_problems[0]
    extract_features(_cfg(out, root, caps))
    assert f"lists {SHARD}, which is missing: its 25 samples are redone" in capsys.readouterr().out
    assert_same(out, ref)


def test_disk_full_then_resume(data, tmp_path, monkeypatch):
    root, caps, ref = data
    out = tmp_path / "c"
    from tipsdistill.cache.writer import ShardWriter

    real = ShardWriter._write_rows
    calls = {"patch": 0}

    def full_disk(self, name, arr, row):
        if name == "patch":
            calls["patch"] += 1
            if calls["patch"] == 5:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, name, arr, row)

    monkeypatch.setattr(ShardWriter, "_write_rows", full_disk)
    with pytest.raises(
        OSError,
        match=r"is full .* samples of shard-00000-of-00001.h5 are written and safe; the other \d+ need about .* free now\. Free at least .* rerun the same command: it resumes",
    ) as ei:
        extract_features(_cfg(out, root, caps, flush_interval_s=0))
    assert ei.value.errno == errno.ENOSPC
    with h5py.File(out / SHARD) as f:
        assert 0 < f["done"][()].sum() < 25 and not f.attrs["complete"]
    monkeypatch.setattr(ShardWriter, "_write_rows", real)
    s = extract_features(_cfg(out, root, caps))
    assert s["index"]
    assert_same(out, ref)


# ----------------------------------------------------------------------------------------- stage 2

KILLER = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, os.getcwd())
    import tipsdistill.distill.checkpoint as ckpt
    import tipsdistill.distill.train as T
    kind, at = os.environ["FAULT_KIND"], int(os.environ["FAULT_AT"])
    if kind == "checkpoint":  # DeepSpeed's files written, the completion marker not yet
        real_save = ckpt.save
        def save(engine, output_dir, step, client_state, keep_last=0):
            if step == at:
                engine.save_checkpoint(str(ckpt.checkpoint_dir(output_dir)), tag=ckpt.tag_for(step),
                                       client_state=client_state, save_latest=True)
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(engine, output_dir, step, client_state, keep_last=keep_last)
        ckpt.save = save
    elif kind == "step":  # after the forward of optimizer step `at`, before its backward
        real_reduce, seen = T._all_reduce_terms, [0]
        def reduce(terms, *args):
            seen[0] += 1
            if seen[0] == at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_reduce(terms, *args)
        T._all_reduce_terms = reduce
    from tests.test_train_support import _main
    _main(sys.argv[1])
    """
)


def _train(tmp: Path, name: str, cache: Path, out: Path, fault: tuple[str, int] | None, resume: bool):
    from tests.test_train_support import base_overrides

    args = {
        "result": str(tmp / f"{name}.json"),
        "overrides": base_overrides(cache, out) + ["steps=6", "checkpoint.every=2", "checkpoint.keep_last=2"],
        "runs": ["auto" if resume else None],
    }
    spec = tmp / f"{name}.args.json"
    spec.write_text(json.dumps(args))
    env = ENV | {"FAULT_KIND": fault[0] if fault else "-", "FAULT_AT": str(fault[1] if fault else 0)}
    # DeepSpeed's CPU communication op is compiled on first use: once per virtualenv, not in the
    # user-wide cache that other checkouts (other torch paths) would make it rebuild
    env["TORCH_EXTENSIONS_DIR"] = str(Path(sys.prefix) / "torch_extensions")
    # output to a file, not a pipe: helper processes the trainer started outlive a kill -9 of it
    # and would hold a pipe open; its process group is ended once it is gone
    log = tmp / f"{name}.log"
    with open(log, "w") as fh:
        p = subprocess.Popen(
            [sys.executable, "-c", KILLER, str(spec)],
            cwd=REPO,
            env=env,
            stdout=fh,
            stderr=fh,
            start_new_session=True,
        )
        rc = p.wait(timeout=300)
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    text = log.read_text()
    if fault:
        assert rc == -signal.SIGKILL, text[-3000:]
        return text, None
    assert rc == 0, text[-3000:]
    res = json.loads((tmp / f"{name}.json").read_text())
    assert "error" not in res, res["error"]
    return text, res


def test_stage2_kill_mid_checkpoint_and_mid_step_resume_identical(tmp_path):
    from tests.test_train_support import make_cache
    from tipsdistill.distill.checkpoint import resolve_resume

    cache = make_cache(tmp_path / "cache", n=48)
    _, full = _train(tmp_path, "full", cache, tmp_path / "full", None, False)
    out = tmp_path / "run"
    _train(tmp_path, "a", cache, out, ("checkpoint", 4), False)  # killed saving step 4
    ck = out / "checkpoints"
    assert (ck / "step_00000002" / "complete.json").is_file()
    assert (ck / "step_00000004").is_dir() and not (ck / "step_00000004" / "complete.json").exists()
    assert resolve_resume("auto", out) == (ck, "step_00000002")  # the partial one is never loaded
    log, _ = _train(tmp_path, "b", cache, out, ("step", 3), True)  # resumes at 2; killed inside step 5
    assert "ignoring 1 incomplete checkpoint(s)" in log and "step_00000004" in log
    assert resolve_resume("auto", out) == (ck, "step_00000004")
    _, res = _train(tmp_path, "c", cache, out, None, True)
    assert res["step"] == 6
    assert [r["loss"] for r in res["log"]] == [r["loss"] for r in full["log"]]
    assert res["weights"] == full["weights"]


def test_stage2_refuses_a_cache_still_being_written(data, tmp_path):
    root, caps, _ = data
    out, prog = tmp_path / "c", tmp_path / "calls"
    p = _start(_cli_args(root, caps, out, prog, workers=0))
    try:
        _wait_calls(prog, 3, p)
        with pytest.raises(ValueError, match=rf"incomplete.*being written now by pid {p.pid} on host"):
            open_cache(out)
        import torch

        from tests.test_train_support import base_overrides
        from tipsdistill.distill.config import load_config
        from tipsdistill.distill.task import build_task

        cfg = load_config("distill", base_overrides(out, tmp_path / "run"))
        with pytest.raises(ValueError, match=r"incomplete"):
            build_task(cfg, device=torch.device("cpu"))
    finally:
        p.kill()
        p.communicate()


# ------------------------------------------------------------------------------- evaluation inputs


def test_eval_dataset_bad_inputs_name_the_file(tmp_path, caplog):
    from PIL import Image

    from tipsdistill.distill.evaluation.datasets import load_eval_dataset

    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    rng = np.random.default_rng(0)
    for stem in ("a", "b"):
        Image.fromarray((rng.random((20, 30, 3)) * 255).astype(np.uint8)).save(
            tmp_path / f"images/{stem}.png"
        )
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(tmp_path / "labels/a.png")
    Image.fromarray(np.full((20, 30), 7, np.uint8)).save(tmp_path / "labels/b.png")  # id 7 of 3 classes
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(tmp_path / "labels/orphan.png")
    (tmp_path / "classes.txt").write_text("cat\ndog\nsky\n")
    with caplog.at_level("WARNING"):
        ds = load_eval_dataset("seg_folder", root=str(tmp_path))
    assert ds.unmatched_labels == ["orphan.png"] and "1 label PNG(s)" in caplog.text
    assert ds[0]["label"].shape == (20, 30)
    with pytest.raises(
        ValueError,
        match=r"labels/b.png: ids 7 \(600 px\) are outside 0..2 .* class list and the label ids disagree",
    ):
        ds[1]
    Image.fromarray(np.zeros((21, 30), np.uint8)).save(tmp_path / "labels/b.png")
    with pytest.raises(
        ValueError,
        match=r"labels/b.png is \(21, 30\) but image .*images/b.png is \(20, 30\).*label maps must have the image's size",
    ):
        load_eval_dataset("seg_folder", root=str(tmp_path))[1]
    (tmp_path / "labels/b.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"label .*labels/b.png cannot be read"):
        load_eval_dataset("seg_folder", root=str(tmp_path))[1]
    (tmp_path / "labels/b.png").unlink()
    with pytest.raises(ValueError, match=r"1 images in .*images have no label PNG .*\['b.png'\]"):
        load_eval_dataset("seg_folder", root=str(tmp_path))
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(tmp_path / "labels/b.png")
    (tmp_path / "classes.txt").write_text("cat\ndog\nCat\n")
    with pytest.raises(
        ValueError, match=r"classes.txt are not unique: 1 duplicate\(s\): 'Cat' \(label ids 0 and 2\)"
    ):
        load_eval_dataset("seg_folder", root=str(tmp_path))
    (tmp_path / "classes.txt").write_text("cat\n\ndog\n")
    with pytest.raises(ValueError, match=r"classes.txt:2 is blank"):
        load_eval_dataset("seg_folder", root=str(tmp_path))


def test_fault_rounds_compare_counts_lost_samples(data, tmp_path):
    """The kill/resume harness (scripts/faults.py, a tool outside the library) finds a cache equal to
    its reference, and names the dataset and counts the samples when one row differs."""
    from tipsdistill.scripts.faults import compare

    _, _, ref = data
    copy = tmp_path / "copy"
    shutil.copytree(ref, copy)
    assert compare(copy, ref) == (True, 0, [])
    with h5py.File(copy / SHARD, "r+") as f:
        f["patch"][2] = f["patch"][2] + 1
    identical, lost, diffs = compare(copy, ref)
    assert (identical, lost) == (False, 1) and f"{SHARD}:patch differs" in diffs
