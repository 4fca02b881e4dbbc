"""Export from any checkpoint, resume on other hardware, multi-node launchers (CPU, gloo, tiny models).

One 8-step source run in 2 processes at ZeRO-2 (started the way ``srun`` starts tasks: two plain
processes with fake ``SLURM_*`` variables, translated by ``cache.launch``) checkpoints at step 4.
That checkpoint resumes in 1 process at ZeRO-0 (to step 8), and in 2 processes at ZeRO-3 started as two
``torchrun --nnodes 2`` agents meeting at a c10d rendezvous (stopped with ``--max-steps 2``: a mid-run
ZeRO-3 checkpoint at step 6, exported and compared with the in-memory model). The ZeRO-3 step-6
checkpoint then resumes in 2 processes at ZeRO-1 under ``deepspeed --hostfile`` (localhost slots=2), and
the 1-process ZeRO-0 run's step-6 checkpoint in 2 processes at ZeRO-2 (``torchrun --nproc_per_node 2``):
every direction of the conversion (ZeRO 0/2/3 sources, ZeRO 0/1/2/3 targets, 2 -> 1 and 1 -> 2 processes).

Tolerance (stated in docs/training.md): every resumed step's loss terms equal the uninterrupted
source run's to 1e-4 relative (measured here: 6e-8 at the first step in 1 process, identical after;
identical in 2 processes at ZeRO-3). Not bit-identical by contract: the reduction order changes with
the world size and ZeRO stage, and the multi-process CLIP gradient treats the other ranks' embeddings
as constants (docs/training.md "Known limitations"), so long runs drift apart slowly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.launch_helpers import free_port, subprocess_env, torchrun
from tests.test_train_support import ROOT, base_overrides, make_cache, probe_pixels

SCRIPT = str(ROOT / "tests" / "test_train_support.py")
SRC = ["steps=8", "loss.mask_ratio=0.5", "checkpoint.every=4", "checkpoint.keep_last=0"]


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = subprocess_env()
    for k in [k for k in env if k.startswith("SLURM_")]:
        env.pop(k)
    return {**env, **(extra or {})}


def _launch(cmds: list[tuple[list[str], dict[str, str]]], result: Path, timeout: int = 400) -> dict[str, Any]:
    """Start every ``(cmd, env)`` at once (the processes of one job), wait for all; rank 0's JSON result."""
    procs = [
        subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for cmd, env in cmds
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout))
    finally:
        for p in procs:  # never leave a hung rank behind
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(p.returncode for p in procs) or not result.exists():
        tails = "\n".join(
            f"--- rc {p.returncode}\n{o[-2000:]}\n{e[-5000:]}" for p, (o, e) in zip(procs, outs)
        )
        raise RuntimeError(f"training job failed:\n{tails}")
    res = json.loads(result.read_text())
    assert "error" not in res, res["error"] + "\n" + "\n---\n".join(e[-5000:] for _, e in outs)
    res["stderr"] = "\n".join(e for _, e in outs)
    return res


def _spec(root: Path, name: str, overrides: list[str], **kw) -> tuple[Path, Path]:
    result = root / name / "result.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    spec = result.with_suffix(".args.json")
    spec.write_text(json.dumps({"result": str(result), "overrides": overrides, **kw}))
    return spec, result


@pytest.fixture(scope="module")
def jobs(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("reshard")
    cache = make_cache(root / "cache")
    out: dict[str, Any] = {"root": root, "cache": cache}

    # (1) source: 2 processes, ZeRO-2, batch 4 each, launched as srun would (fake SLURM task variables)
    spec, result = _spec(
        root,
        "src",
        base_overrides(cache, root / "src" / "out") + SRC + ["data.batch_size=4", "engine.zero_stage=2"],
    )
    slurm = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_NODELIST": "localhost"}
    slurm["SLURM_JOB_ID"] = str(free_port())  # MASTER_PORT = 20000 + job id % 20000
    out["src"] = _launch(
        [
            (
                [sys.executable, SCRIPT, str(spec)],
                _env({**slurm, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)}),
            )
            for r in range(2)
        ],
        result,
    )
    ck4 = root / "src" / "out" / "checkpoints" / "step_00000004"

    # (2) 2 x ZeRO-2 -> 1 process, ZeRO-0, batch 8 (same global batch), to the end (checkpoints at 6, 8)
    spec, result = _spec(
        root,
        "z0",
        base_overrides(cache, root / "z0" / "out")
        + SRC
        + ["data.batch_size=8", "engine.zero_stage=0", "checkpoint.every=2"],
        runs=[str(ck4)],
    )
    out["z0"] = _launch([([sys.executable, SCRIPT, str(spec)], _env())], result)

    # (3) 2 x ZeRO-2 -> 2 processes, ZeRO-3, as two torchrun agents ("nodes") at one c10d rendezvous;
    # --max-steps 2: stops at step 6 with a checkpoint there (mid-run: steps=8)
    spec, result = _spec(
        root,
        "z3",
        base_overrides(cache, root / "z3" / "out")
        + SRC
        + ["data.batch_size=4", "engine.zero_stage=3", "checkpoint.every=2"],
        runs=[str(ck4)],
        max_steps=[2],
    )
    port = free_port()
    agent = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc_per_node",
        "1",
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        f"127.0.0.1:{port}",
        "--rdzv_id",
        f"job{port}",
        SCRIPT,
        str(spec),
    ]
    out["z3"] = _launch([(agent, _env()), (agent, _env())], result)

    # (4) the ZeRO-3 step-6 checkpoint -> 2 processes, ZeRO-1, under deepspeed --hostfile (localhost slots=2)
    hostfile = root / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    spec, result = _spec(
        root,
        "z1",
        base_overrides(cache, root / "z1" / "out") + SRC + ["data.batch_size=4", "engine.zero_stage=1"],
        runs=[str(root / "z3" / "out" / "checkpoints" / "step_00000006")],
    )
    ds = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--hostfile",
        str(hostfile),
        "--no_ssh",
        "--node_rank",
        "0",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "--no_local_rank",
        SCRIPT,
        str(spec),
    ]
    out["z1"] = _launch([(ds, _env())], result)

    # (5) the ZeRO-0 step-6 checkpoint of 1 process -> 2 processes, ZeRO-2 (torchrun --nproc_per_node 2)
    spec, result = _spec(
        root,
        "z2",
        base_overrides(cache, root / "z2" / "out") + SRC + ["data.batch_size=4", "engine.zero_stage=2"],
        runs=[str(root / "z0" / "out" / "checkpoints" / "step_00000006")],
    )
    tr = torchrun()
    out["z2"] = _launch([([*tr, SCRIPT, str(spec)], _env())], result)
    return out


def _by_step(r: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {rec["step"]: rec for rec in r["log"]}


def test_resume_other_world_size_and_zero_stage(jobs):
    src = _by_step(jobs["src"])
    assert sorted(src) == list(range(1, 9)) and src[8]["samples_seen"] == 64
    for name, steps in (("z0", range(5, 9)), ("z3", range(5, 7)), ("z1", range(7, 9)), ("z2", range(7, 9))):
        r = jobs[name]
        got = _by_step(r)
        assert sorted(got) == list(steps), (name, sorted(got))  # the log restarts after the checkpoint
        first = steps[0]
        # same step and samples seen; the global data position mapped to the new number of processes
        assert got[first]["samples_seen"] == src[first]["samples_seen"], name
        assert got[first]["epoch"] == src[first]["epoch"], name
        for s in steps:  # the loss continues: the same weights, Adam state and schedules see the same samples
            for k in ("loss", "patch", "dino", "clip"):
                assert got[s][k] == pytest.approx(src[s][k], rel=1e-4), (name, s, k)
        assert "resharded" in r["stderr"] and "RNG states not restored" in r["stderr"], name
    assert [jobs[n]["step"] for n in ("z0", "z3", "z1", "z2")] == [8, 6, 8, 8]
    # per-rank consumed: 2 processes x 4 -> 1 x 8 samples per batch
    assert _by_step(jobs["z0"])[5]["consumed"] == 2 * src[5]["consumed"]
    assert "saved by 2 process(es) at ZeRO stage 3" in jobs["z1"]["stderr"]  # ZeRO-3 source -> ZeRO-1
    assert "saved by 1 process(es) at ZeRO stage 0" in jobs["z2"]["stderr"]  # ZeRO-0 source -> ZeRO-2


def test_position_the_new_batch_does_not_divide_is_refused():
    from tipsdistill.distill.reshard import remap_position

    assert remap_position({"epoch": 1, "consumed": 16}, old_world=2, new_world=1, new_batch=8, where="x") == {
        "epoch": 1,
        "consumed": 32,
    }
    with pytest.raises(ValueError, match=r"x: the checkpoint is 32 samples into epoch 1.*3 process\(es\)"):
        remap_position({"epoch": 1, "consumed": 16}, old_world=2, new_world=3, new_batch=4, where="x")


def test_export_mid_run_zero3_checkpoint_matches_in_memory_model(jobs, tmp_path, monkeypatch):
    import timm
    from safetensors.torch import load_file

    from tipsdistill.scripts.export import main
    from tipsdistill.students import load_student

    root = jobs["root"]
    ck6 = root / "z3" / "out" / "checkpoints" / "step_00000006"
    ref = torch.load(root / "z3" / "result.probe.pt")  # the in-memory student at step 6 (ZeRO-3, gathered)
    assert main([str(ck6), "--out", str(tmp_path / "ex")]) == 0
    student = load_student(tmp_path / "ex")
    with torch.no_grad():
        f = student.encode_image(probe_pixels())
    assert torch.equal(f.patch, ref["patch"]) and torch.equal(f.cls, ref["cls"])
    conf = json.loads((tmp_path / "ex" / "config.json").read_text())
    assert conf["metrics"]["step"] == 6 and conf["metrics"]["samples_seen"] == 48
    assert conf["train_config"]["engine"]["zero_stage"] == 3 and "loss" in conf["metrics"]
    # the run stopped early (--max-steps) exported its state at step 6 from memory: the same tensors
    early = Path(jobs["z3"]["export"])
    assert early.name == "export_step_00000006"
    a, b = load_file(str(early / "model.safetensors")), load_file(str(tmp_path / "ex" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # timm loads it by name from the folder (its hub config: architecture, model_args, pretrained_cfg)
    assert conf["architecture"] == "vit_tiny_patch16_224" and conf["pretrained_cfg"]["mean"] == [0.0] * 3
    vit = timm.create_model(f"local-dir:{tmp_path / 'ex'}", pretrained=True).eval()
    with torch.no_grad():
        tokens = vit.forward_features(probe_pixels())  # student normalisation is mean 0 / std 1
    assert torch.allclose(tokens[:, vit.num_prefix_tokens :].reshape(f.patch.shape), ref["patch"], atol=1e-5)
    # and by hub name, offline: the export as a Hugging Face cache snapshot of repo org/tiny-student
    import huggingface_hub.constants

    rev = "0" * 40
    repo = tmp_path / "hub" / "models--org--tiny-student"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    shutil.copytree(tmp_path / "ex", repo / "snapshots" / rev)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    hub = timm.create_model("hf-hub:org/tiny-student", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(hub.forward_features(probe_pixels()), tokens)
    # a run directory: its newest complete checkpoint (step 6), default output next to it
    assert main([str(root / "z3" / "out")]) == 0
    assert (
        json.loads((root / "z3" / "out" / "export_step_00000006" / "config.json").read_text())["metrics"][
            "step"
        ]
        == 6
    )
    # an incomplete checkpoint is refused naming the fix
    bad = tmp_path / "checkpoints" / "step_00000009"
    bad.mkdir(parents=True)
    assert main([str(bad)]) == 2


def test_push_to_hub_uses_create_repo_and_upload_folder(jobs, tmp_path, monkeypatch):
    import huggingface_hub

    from tipsdistill.distill.export import export_checkpoint

    calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id, **kw):
        calls.append(("create_repo", {"repo_id": repo_id, **kw}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kw):
        calls.append(("upload_folder", {**kw, "files": sorted(os.listdir(kw["folder_path"]))}))
        return "commit"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    ck4 = jobs["root"] / "src" / "out" / "checkpoints" / "step_00000004"  # a ZeRO-2 checkpoint of 2 ranks
    out = export_checkpoint(ck4, tmp_path / "hub", push_to_hub_repo="org/tiny-student", private=True)
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
    assert calls[0][1]["repo_id"] == "org/tiny-student" and calls[0][1]["private"] is True
    up = calls[1][1]
    assert up["repo_id"] == "org/tiny-student" and up["folder_path"] == str(out)
    assert {"README.md", "config.json", "model.safetensors"} <= set(up["files"]) and "step 4" in up[
        "commit_message"
    ]


def test_eval_accepts_checkpoint_and_run_dirs(jobs):
    from tipsdistill.distill.evaluation.models import build_model

    root = jobs["root"]
    x = probe_pixels()
    ref = torch.load(root / "z3" / "result.probe.pt")
    with torch.no_grad():
        for spec in (
            f"student:{root / 'z3' / 'out' / 'checkpoints' / 'step_00000006'}",
            str(root / "z3" / "out"),
        ):
            assert torch.equal(build_model(spec).encode_image(x).patch, ref["patch"]), spec
        # the finished run: its export/ (step 8) is as new as its last checkpoint
        final = torch.load(root / "z0" / "result.probe.pt")
        assert torch.equal(build_model(str(root / "z0" / "out")).encode_image(x).patch, final["patch"])


def test_slurm_variables_translate():
    from tipsdistill.cache.launch import first_host, slurm_env

    assert first_host("gpu-[003-004,010],cpu1") == "gpu-003" and first_host("node7,node8") == "node7"
    env = {
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "2",
        "SLURM_NTASKS": "8",
        "SLURM_NTASKS_PER_NODE": "2(x4)",
        "SLURM_JOB_NODELIST": "gpu-[003-006]",
        "SLURM_JOB_ID": "123456",
    }
    assert slurm_env(env) == {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "NODE_RANK": "2",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "gpu-003",
        "MASTER_PORT": "23456",
    }
    assert slurm_env({**env, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"})["RANK"] == "5"
    assert "MASTER_ADDR" not in slurm_env({**env, "MASTER_ADDR": "10.0.0.1"})
    assert slurm_env({**env, "SLURM_NTASKS": "1"}) == {} and slurm_env({}) == {}
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        slurm_env({**env, "SLURM_JOB_NODELIST": ""})
