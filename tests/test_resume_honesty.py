"""Honest resumes and indexes (issue 27, points 8-19): stage-2 resumes compare config and cache identity,
rollbacks, torn logs, a locked run directory, preemption, pruning; stage-1 identity checks.

Stage 2 runs in two processes started together (tiny students, a few steps, one DeepSpeed init each):
``A`` trains and pauses inside step 3 (a hook after the forward) holding its run directory; ``B``
(this file run as a script) runs the scenarios one after another with ``distill.train.train``: a
reference run, a changed config and another cache refused, a change accepted, a torn log line, a
rollback, a second run into ``A``'s directory while ``A`` lives (refused), then it sends ``A`` a real
SIGTERM and releases it (``A`` checkpoints step 3 and exits 143), and resumes ``A`` to the end.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BASE = ["steps=6", "checkpoint.every=2", "checkpoint.keep_last=0"]


# ------------------------------------------------------------------------------ stage-2 harness


def _ended(pid: int) -> bool:
    """Process ``pid`` has exited (gone, or a zombie its parent has not reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _wait_for(path: Path, timeout: float = 240.0, pid: int | None = None) -> None:
    """Until ``path`` exists (or process ``pid`` has ended)."""
    t0 = time.monotonic()
    while not path.exists():
        if pid is not None and _ended(pid):
            return
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{path} did not appear within {timeout:.0f} s")
        time.sleep(0.05)


def _read_log(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The records of a log.jsonl and its lines that do not parse."""
    recs, bad = [], []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            recs.append(json.loads(line))
        except ValueError:
            bad.append(line)
    return recs, bad


def _scenarios(spec: dict[str, Any]) -> dict[str, Any]:
    """Script mode (process B): every scenario in order; ``{name: {step, log, error, ...}}``."""
    from tests.test_train_support import base_overrides
    from tipsdistill.distill.checkpoint import resolve_resume
    from tipsdistill.distill.config import load_config
    from tipsdistill.distill.train import train

    root, cache, cache2 = Path(spec["root"]), spec["cache"], spec["cache2"]
    res: dict[str, Any] = {}

    def run(name: str, out: Path, extra: list[str], resume: str | None = None, **kw: Any) -> dict[str, Any]:
        cfg = load_config("distill", base_overrides(cache, out) + BASE + extra)
        r: dict[str, Any] = {}
        try:
            got = train(cfg, resume=resume, **kw)
            r = {"step": got["step"], "preempted": got.get("preempted")}
        except Exception as e:  # noqa: BLE001 - reported to the test
            r = {"error": f"{type(e).__name__}: {e}"}
        r["log"], r["torn"] = _read_log(out / "log.jsonl")
        r["checkpoints"] = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
        res[name] = r
        return r

    # reference: 6 steps, checkpoints at 2, 4, 6
    ref = root / "ref"
    run("ref", ref, [])
    # 13: a checkpoint at step 2, then resumes with a changed config / another cache / an accepted change
    x = root / "x"
    run("x1", x, [], max_steps=2)
    run("x_changed", x, ["optim.lr=1e-3", "loss.dino_weight=0.5", "seed=1", "log.every=2"], "auto")
    run("x_other_cache", x, [f"cache.path={cache2}"], "auto")
    run("x_allowed", x, ["optim.lr=1e-3"], "auto", max_steps=1, allow_changes=["optim.lr"])
    res["x_allowed"]["config_yaml"] = (x / "config.yaml").read_text()
    res["x_allowed"]["starts"] = sorted(p.name for p in (x / "starts").glob("*.yaml"))
    # 16: a torn last line (power loss), then --resume auto (from step 2, the reference's config)
    with open(x / "log.jsonl", "ab") as fh:
        fh.write(b'{"step": 3, "epoch": 0, "consumed": 24, "loss": 4.0')
    run("torn", x, [], "auto")
    # 14: rollback of the reference to step 2 (keep_last=2, a checkpoint every step), then auto to the end
    roll = ["checkpoint.every=1", "checkpoint.keep_last=2"]
    run("rollback", ref, roll, str(ref / "checkpoints" / "step_00000002"), max_steps=1)
    res["rollback"]["auto_after"] = str(resolve_resume("auto", ref))
    run("rollback_auto", ref, roll, "auto")
    res["rollback_auto"]["abandoned"] = sorted(
        f"{p.parent.name}/{p.name}" for p in (ref / "checkpoints").glob("abandoned-*/*")
    )
    # 15: a second run into A's output_dir while A lives (paused inside step 3)
    a_out = Path(spec["a_out"])
    _wait_for(root / "a.paused")
    a_pid = int((root / "a.paused").read_text())
    run("concurrent", a_out, [], "auto")
    res["concurrent"]["a_pid"] = a_pid
    # 17: a real SIGTERM to A, released; A checkpoints step 3 and exits; resume it to the end
    os.kill(a_pid, signal.SIGTERM)
    (root / "a.go").write_text("go")
    _wait_for(root / "a.exited", pid=a_pid)
    run("a_resumed", a_out, [], "auto")
    return res


A_SCRIPT = """
import json, os, sys, time
from pathlib import Path
sys.path.insert(0, os.getcwd())
import tipsdistill.distill.train as T
root = Path(sys.argv[1])
real, seen = T._all_reduce_terms, [0]
def reduce(terms, *args):  # after the forward of step 3: pause until B has tried the directory
    seen[0] += 1
    if seen[0] == 3:
        (root / "a.paused").write_text(str(os.getpid()))
        while not (root / "a.go").exists():
            time.sleep(0.05)
    return real(terms, *args)
T._all_reduce_terms = reduce
from tipsdistill.scripts.train import main
rc = main(sys.argv[2:])
(root / "a.exited").write_text(str(rc))
sys.exit(rc)
"""


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny cache of the training tests, and one of another teacher of the same shape (other weights)."""
    from tests.test_train_support import make_cache, tiny_teacher
    from tipsdistill.cache import build_dataset, extract_features

    root = tmp_path_factory.mktemp("caches")
    c1 = make_cache(root / "c1")
    ds = build_dataset("synthetic", split="train", size=48, image_size=32)
    extract_features(
        dict(out=str(root / "c2"), image_size=32, batch_size=16, num_workers=0, progress=False),
        teacher=tiny_teacher(seed=5),
        dataset=ds,
    )
    return c1, root / "c2"


@pytest.fixture(scope="module")
def stage2(caches, tmp_path_factory) -> dict[str, Any]:
    from tests.launch_helpers import subprocess_env
    from tests.test_train_support import base_overrides

    root = tmp_path_factory.mktemp("stage2")
    env = subprocess_env()
    a_out = root / "a"
    a_cmd = [sys.executable, "-c", A_SCRIPT, str(root), *base_overrides(caches[0], a_out), *BASE]
    spec = root / "spec.json"
    spec.write_text(
        json.dumps(
            {"root": str(root), "cache": str(caches[0]), "cache2": str(caches[1]), "a_out": str(a_out)}
        )
    )
    a_log, b_log = open(root / "a.log", "w"), open(root / "b.log", "w")
    a = subprocess.Popen(a_cmd, cwd=ROOT, env=env, stdout=a_log, stderr=a_log, start_new_session=True)
    b = subprocess.Popen(
        [sys.executable, __file__, str(spec)],
        cwd=ROOT,
        env=env,
        stdout=b_log,
        stderr=b_log,
        start_new_session=True,
    )
    try:
        b_rc = b.wait(timeout=600)
        if b_rc != 0:
            a.kill()
        a_rc = a.wait(timeout=120)
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.kill()
                p.wait()
        a_log.close()
        b_log.close()
    b_text = (root / "b.log").read_text()
    assert b_rc == 0, b_text[-5000:]
    res = json.loads((root / "result.json").read_text())
    return {**res, "a_rc": a_rc, "a_log": (root / "a.log").read_text(), "b_log": b_text, "root": root}


def _losses(r: dict[str, Any]) -> list[tuple[int, float]]:
    return [(x["step"], x["loss"]) for x in r["log"]]


def test_resume_refuses_a_changed_config_naming_every_key_and_keeps_every_start(stage2):
    """13: lr, a loss weight and the seed changed: refused naming each (log.every, operational, is not);
    another cache of the same shape (other teacher weights) refused naming the identity field; an
    explicitly allowed change resumes, and every start's config is kept."""
    assert stage2["x1"]["step"] == 2 and "error" not in stage2["x1"]
    err = stage2["x_changed"].get("error", "")
    assert err.startswith("ResumeMismatch"), err
    for key in ("optim.lr", "loss.dino_weight", "seed"):
        assert f"  {key}: checkpoint" in err, err
    assert "log.every" not in err and "3 setting(s) differ" in err
    assert "--allow-change optim.lr" in err
    err = stage2["x_other_cache"].get("error", "")
    assert err.startswith("ResumeMismatch") and "cache.teacher_weights" in err, err
    ok = stage2["x_allowed"]
    assert "error" not in ok and ok["step"] == 3, ok
    assert "lr: 0.001" in ok["config_yaml"]
    assert ok["starts"] == ["000-step_00000000.yaml", "001-step_00000002.yaml"], ok["starts"]
    start1 = (stage2["root"] / "x" / "starts" / "001-step_00000002.yaml").read_text()
    assert (
        "key: optim.lr" in start1
        and "lr: 0.002" in (stage2["root"] / "x" / "starts" / "000-step_00000000.yaml").read_text()
    )


def test_torn_log_line_is_reported_and_the_resume_matches_the_reference(stage2):
    """16: a torn last line of log.jsonl (power loss) is reported and dropped; the resumed run's log
    (steps 1-6, each once) equals the uninterrupted reference's."""
    r = stage2["torn"]
    assert "error" not in r, r
    assert "is torn" in stage2["b_log"] and "line" in stage2["b_log"]
    assert _losses(r) == _losses(stage2["ref"])


def test_rollback_keeps_the_new_timeline(stage2):
    """14: resuming step 2 of a finished run (keep_last=2, a checkpoint every step): the newer
    checkpoints of the abandoned timeline move aside, the new step 3 is kept and picked by --resume auto,
    which continues to losses equal to the reference's."""
    r = stage2["rollback"]
    assert "error" not in r, r
    assert r["checkpoints"] == ["step_00000002", "step_00000003"], r["checkpoints"]
    assert "step_00000003" in r["auto_after"], r["auto_after"]
    a = stage2["rollback_auto"]
    assert "error" not in a and a["step"] == 6, a
    assert a["checkpoints"] == ["step_00000005", "step_00000006"]
    assert [p.split("/")[1] for p in a["abandoned"]] == ["step_00000004", "step_00000006"], a["abandoned"]
    assert _losses(a) == _losses(stage2["ref"])


def test_second_run_in_a_live_run_directory_is_refused_naming_the_holder(stage2):
    """15: a second run into the output_dir of a live run (paused mid-step) is refused naming its pid."""
    err = stage2["concurrent"].get("error", "")
    assert "CacheBusyError" in err and f"pid {stage2['concurrent']['a_pid']} on host" in err, err
    assert "output_dir" in err


def test_sigterm_checkpoints_at_the_step_boundary_and_requeue_resumes_identically(stage2):
    """17: SIGTERM inside step 3: the step finishes, a checkpoint of step 3 is written, the exit code is
    143; --resume auto continues to the end with the uninterrupted run's losses."""
    assert stage2["a_rc"] == 143, stage2["a_log"][-3000:]
    assert "SIGTERM received" in stage2["a_log"] and "exit code 143" in stage2["a_log"]
    r = stage2["a_resumed"]
    assert "error" not in r and r["step"] == 6, r
    assert "resumed from" in stage2["b_log"] and "step_00000003" in stage2["b_log"]
    assert _losses(r) == _losses(stage2["ref"])


# ------------------------------------------------------------------ checkpoints without DeepSpeed


class _FakeEngine:
    """Writes a model states file the way DeepSpeed does; records saves into a complete checkpoint."""

    def __init__(self) -> None:
        self.into_complete: list[str] = []

    def save_checkpoint(self, root: str, tag: str, client_state: dict[str, Any], save_latest: bool) -> bool:
        d = Path(root) / tag
        if (d / "complete.json").exists():
            self.into_complete.append(tag)
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"step": client_state["step"]}, d / "mp_rank_00_model_states.pt")
        return True


def test_a_save_never_writes_into_a_complete_checkpoint(tmp_path):
    """14: saving step 4 again (a replayed timeline) renames the complete step_4 aside first."""
    from tipsdistill.distill import checkpoint as ckpt

    eng = _FakeEngine()
    ckpt.save(eng, tmp_path, 4, {"step": 4})
    ckpt.save(eng, tmp_path, 4, {"step": 4})
    assert eng.into_complete == []
    root = ckpt.checkpoint_dir(tmp_path)
    assert [p.name for _, p in ckpt.list_complete(root)] == ["step_00000004"]
    assert sorted(p.name for p in root.iterdir()) == ["step_00000004"]  # the replaced copy is gone


def test_pruning_cut_short_never_leaves_a_marker_without_its_files(tmp_path, monkeypatch, caplog):
    """19: keep-last-K whose deletion fails on complete.json (EBUSY, as NFS can answer) never leaves a
    listed step_* directory without its files; a checkpoint whose listed files are gone is not listed."""
    from tipsdistill.distill import checkpoint as ckpt

    eng = _FakeEngine()
    ckpt.save(eng, tmp_path, 2, {"step": 2}, keep_last=1)
    real_unlink = os.unlink

    def unlink(path: Any, *a: Any, **kw: Any) -> None:
        if os.fspath(path).endswith("complete.json"):
            raise OSError(errno.EBUSY, "Device or resource busy", os.fspath(path))
        real_unlink(path, *a, **kw)

    monkeypatch.setattr(os, "unlink", unlink)
    ckpt.save(eng, tmp_path, 4, {"step": 4}, keep_last=1)
    monkeypatch.setattr(os, "unlink", real_unlink)
    root = ckpt.checkpoint_dir(tmp_path)
    assert [p.name for _, p in ckpt.list_complete(root)] == ["step_00000004"]
    assert not any(p.name == "step_00000002" for p in root.iterdir())
    assert "delete it by hand" in caplog.text
    # files deleted by hand (or a torn copy): not complete, never resumed from, named
    (root / "step_00000004" / "mp_rank_00_model_states.pt").unlink()
    assert ckpt.list_complete(root) == []
    assert ckpt.resolve_resume("auto", tmp_path) is None
    with pytest.raises(ValueError, match="mp_rank_00_model_states.pt"):
        ckpt.find_checkpoint(root / "step_00000004")


# ------------------------------------------------------------------------------------------ stage 1

TEACHER = "tests.cache_helpers:build_tiny_teacher"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    from tests.cache_helpers import write_images

    root = tmp_path_factory.mktemp("honest_images")
    write_images(root / "img", 8, seed=3)
    return root / "img"


def _cfg(out: Path, images: Path, **kw: Any) -> dict[str, Any]:
    d = dict(
        out=str(out),
        teacher=TEACHER,
        dataset="folder",
        dataset_kwargs={"root": str(images)},
        image_size=32,
        batch_size=4,
        num_workers=0,
        progress=False,
    )
    return d | kw


def _independent(monkeypatch: pytest.MonkeyPatch, rank: int, world: int = 2) -> None:
    """One shard per job, no process group (RANK / WORLD_SIZE without MASTER_ADDR): the last writes the index."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    for k in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)


@pytest.fixture(scope="module")
def two_shards(images, tmp_path_factory) -> Path:
    """A complete 2-shard cache written by two independent jobs (teacher seed 0)."""
    from tipsdistill.cache import extract_features

    out = tmp_path_factory.mktemp("two") / "c"
    with pytest.MonkeyPatch.context() as mp:
        for rank in (0, 1):
            _independent(mp, rank)
            extract_features(_cfg(out, images))
    assert (out / "index.h5").exists()
    return out


def test_index_refuses_shards_of_different_teachers(images, tmp_path, monkeypatch):
    """9: two shards of one cache written with different teachers (independent jobs): the index is refused,
    naming the odd shard and the fields."""
    from tipsdistill.cache import extract_features

    out = tmp_path / "c"
    _independent(monkeypatch, 0)
    extract_features(_cfg(out, images))
    _independent(monkeypatch, 1)
    with pytest.raises(ValueError, match=r"shard-00001-of-00002.h5 was written with other settings") as e:
        extract_features(_cfg(out, images, teacher_kwargs={"seed": 1}))
    assert "teacher_weights" in str(e.value) and "teacher_spec" in str(e.value)
    assert not (out / "index.h5").exists()


def test_rerunning_a_complete_two_rank_cache_is_a_no_op_on_both_ranks(two_shards, images):
    """11: the same command under torchrun on a complete 2-shard cache: both ranks exit 0 at once."""
    from tests.launch_helpers import subprocess_env, torchrun

    cmd = [
        *torchrun(2),
        "-m",
        "tipsdistill.scripts.cache_features",
        "--teacher",
        TEACHER,
        "--images",
        str(images),
    ]
    cmd += [
        "--out",
        str(two_shards),
        "--image-size",
        "32",
        "--batch-size",
        "4",
        "--num-workers",
        "0",
        "--quiet",
    ]
    before = (two_shards / "index.h5").stat().st_mtime_ns
    r = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "is already complete" in r.stdout
    assert (two_shards / "index.h5").stat().st_mtime_ns == before


def test_stage1_resume_compares_weights_autocast_min_side_and_version(images, tmp_path, monkeypatch):
    """12: an interrupted cache resumed with new weights behind the same teacher (no spec to compare),
    another autocast, another min_side or another toolkit version: refused naming the field."""
    import h5py

    import tipsdistill.cache.plan as plan
    from tests.cache_helpers import build_tiny_teacher
    from tipsdistill.cache import extract_features

    out = tmp_path / "c"
    extract_features(_cfg(out, images), teacher=build_tiny_teacher())
    shard = out / "shard-00000-of-00001.h5"
    with h5py.File(shard, "r+") as f:  # interrupted: the last block not done
        f["done"][4:] = False
        f.attrs["complete"] = False
    (out / "index.h5").unlink()
    retrained = build_tiny_teacher()  # new weights behind the same teacher (same identity, no spec)
    with torch.no_grad():
        retrained.vit.blocks[0].mlp.fc1.weight.add_(0.01)
    with pytest.raises(ValueError, match="teacher_weights differs"):
        extract_features(_cfg(out, images), teacher=retrained)
    for kw, field in (({"autocast": "bf16"}, "autocast"), ({"min_side": 16}, "min_side")):
        with pytest.raises(ValueError, match=f"{field} differs"):
            extract_features(_cfg(out, images, **kw), teacher=build_tiny_teacher())
    monkeypatch.setattr(plan, "toolkit_version", lambda: "99.0")
    with pytest.raises(ValueError, match="toolkit_version differs"):
        extract_features(_cfg(out, images), teacher=build_tiny_teacher())
    monkeypatch.undo()
    s = extract_features(_cfg(out, images), teacher=build_tiny_teacher())  # the same settings resume
    assert s["complete"] and s["index"]


def _flip(path: Path, offset: int, n: int = 8) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(n)
        fh.seek(offset)
        fh.write(bytes(x ^ 0xFF for x in b))


def test_repair_checks_who_wrote_the_rows(images, tmp_path):
    """8: a shard whose HDF5 metadata is unreadable, rerun with another teacher: its rows are not kept
    under the new teacher's name; the chunk map's identity refuses, and nothing is changed."""
    from tipsdistill.cache import extract_features
    from tipsdistill.cache.format import H5_ERRORS, read_meta

    out = tmp_path / "c"
    extract_features(_cfg(out, images))
    shard = out / "shard-00000-of-00001.h5"
    (out / "index.h5").unlink()
    _flip(shard, 96)  # the root group's object header: HDF5 cannot open the file
    with pytest.raises(H5_ERRORS):
        read_meta(shard)
    damaged = shard.read_bytes()
    with pytest.raises(ValueError, match=r"was written by another run \(teacher: .*teacher_weights: "):
        extract_features(_cfg(out, images, teacher_kwargs={"seed": 1}))
    assert shard.read_bytes() == damaged and not list(out.glob("*.damaged-*"))
    s = extract_features(_cfg(out, images))  # its own teacher: repaired, every row kept
    assert s["complete"] and read_meta(shard)["teacher_spec"]["kwargs"] == {}


def test_stale_pca_basis_is_refitted_and_a_refused_run_writes_none(images, tmp_path, monkeypatch):
    """10: reduce_basis.npz of another teacher in the folder is not reused (the cache gets its own
    teacher's basis, as a fresh run's); a run refused by the disk check leaves no basis behind."""
    import shutil
    from collections import namedtuple

    import numpy as np

    import tipsdistill.cache.commit as commit
    from tipsdistill.cache import extract_features, open_cache
    from tipsdistill.cache.reduce import BASIS_FILE

    extract_features(_cfg(tmp_path / "a", images, reduce_dim=8))  # teacher seed 0
    extract_features(_cfg(tmp_path / "fresh", images, reduce_dim=8, teacher_kwargs={"seed": 1}))
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / BASIS_FILE, tmp_path / "b" / BASIS_FILE)  # left by another run
    extract_features(_cfg(tmp_path / "b", images, reduce_dim=8, teacher_kwargs={"seed": 1}))
    got = open_cache(tmp_path / "b").reduction.bases["patch"][1]
    np.testing.assert_array_equal(got, open_cache(tmp_path / "fresh").reduction.bases["patch"][1])
    assert not np.array_equal(got, open_cache(tmp_path / "a").reduction.bases["patch"][1])
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(commit.shutil, "disk_usage", lambda p: usage(10**6, 10**6, 10))
    with pytest.raises(OSError, match="not enough disk space"):
        extract_features(_cfg(tmp_path / "full", images, reduce_dim=8))
    assert not (tmp_path / "full" / BASIS_FILE).exists()


def test_lock_errors_on_cluster_filesystems(tmp_path, monkeypatch):
    """18: ENOLCK from flock (NFS nolock) and HDF5's errno 38 (Lustre without flock) are reported as
    missing file locks with the fix, not as another process; a fresh lock record of another host is
    honoured where flock is host-local."""
    import fcntl
    import socket

    import tipsdistill.cache.lock as lk

    shard = tmp_path / "shard-00000-of-00001.h5"

    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    real_flock = fcntl.flock
    monkeypatch.setattr(lk.fcntl, "flock", no_locks)
    with pytest.raises(OSError, match="file locks are not supported") as e:
        lk.ShardLock(shard).acquire()
    assert "HDF5_USE_FILE_LOCKING=FALSE" in str(e.value) and "nolock" in str(e.value)
    monkeypatch.setattr(lk.fcntl, "flock", real_flock)
    h5_err = OSError("Unable to synchronously open file (unable to lock file, errno = 38, error message = "
                     "'Function not implemented')")  # fmt: skip
    msg = lk.busy_message(shard, h5_err)
    assert (
        "file locks are not supported" in msg
        and "HDF5_USE_FILE_LOCKING=FALSE" in msg
        and "open in" not in msg
    )
    # host-local flock: this host gets the lock, but another host's holder refreshed its record just now
    other = {"pid": 4242, "host": socket.gethostname() + "-other", "started": "x", "command": "c"}
    lk.lock_path(shard).write_text(json.dumps(other | {"heartbeat": time.time()}))
    with pytest.raises(lk.CacheBusyError, match=r"held by a run on another host: pid 4242 on host .*-other"):
        lk.ShardLock(shard).acquire()
    lk.lock_path(shard).write_text(json.dumps(other | {"heartbeat": time.time() - 3600}))  # long gone
    lock = lk.ShardLock(shard).acquire()
    assert lk.read_holder(lk.lock_path(shard))["pid"] == os.getpid()
    lock.release()


if __name__ == "__main__":
    torch.set_num_threads(1)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    spec_path = Path(sys.argv[1])
    out = _scenarios(json.loads(spec_path.read_text()))
    (spec_path.parent / "result.json").write_text(json.dumps(out, default=str))
