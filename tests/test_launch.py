"""``accelerate launch`` of both stages with the shipped CPU config (gloo, 2 processes), the trackers,
and zero-shot segmentation while training with the best checkpoint kept.

One 2-process stage-1 run writes the cache the 2-process stage-2 run trains on (ZeRO-3, so the
evaluation gathers the partitioned student); that one stage-2 run (4 steps, eval every 2, a second
``train`` call resuming the last checkpoint) serves every stage-2 assertion. ~1.5 minutes on 2 cores.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from tests.launch_helpers import free_port
from tests.test_train_support import STUDENT_KW, base_overrides

REPO = Path(__file__).resolve().parents[1]
ACCELERATE_CPU = REPO / "configs" / "accelerate" / "cpu.yaml"
TEACHER = (
    "tests.test_train_support:tiny_teacher"  # recorded in the cache: eval rebuilds it for the class names
)
HAS_WANDB = importlib.util.find_spec("wandb") is not None


def _env(**extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        **extra,
    }
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def accelerate_launch(args: list[str], *, timeout: int = 300, nproc: int = 2) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file configs/accelerate/cpu.yaml ARGS`` (a free port, ``nproc`` processes)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CPU)]
    cmd += ["--num_processes", str(nproc), "--main_process_port", str(free_port()), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def launched_cache(tmp_path_factory) -> Path:
    """Stage 1 under ``accelerate launch``: 2 processes write two shards of 48 synthetic images, one index."""
    out = tmp_path_factory.mktemp("launch") / "cache"
    accelerate_launch(
        ["-m", "tipsdistill.scripts.cache_features", "--teacher", TEACHER, "--dataset", "synthetic"]
        + ["--data-kw", '{"split": "train", "size": 48, "image_size": 32}', "--out", str(out)]
        + ["--image-size", "32", "--batch-size", "16", "--num-workers", "0", "--quiet"]
    )
    return out


def test_accelerate_launch_stage1_two_shards_one_index(launched_cache):
    from tipsdistill.cache import build_dataset, open_cache

    out = launched_cache
    with h5py.File(out / "shard-00000-of-00002.h5") as a, h5py.File(out / "shard-00001-of-00002.h5") as b:
        assert a.attrs["complete"] and b.attrs["complete"]
        assert a.attrs["shard_count"] == 24 and b.attrs["shard_start"] == 24
    cache = open_cache(out, expect={"num_samples": 48, "dim": 48})
    assert cache.keys() == list(build_dataset("synthetic", split="train", size=48, image_size=32).keys())
    assert cache.meta["teacher_spec"]["teacher"] == TEACHER  # what eval-while-training rebuilds
    assert json.loads((out / "cache_config.json").read_text())["autocast"] == "none"  # accelerate: 'no'


# ------------------------------------------------------------------------------------------ stage 2
# width 48 = the tiny teacher's text width, so the teacher's class-name embeddings score the student
EVAL_STUDENT = {**STUDENT_KW, "embed_dim": 48}


@pytest.fixture(scope="module")
def launched_run(launched_cache, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("launch_run")
    out = root / "out"
    trackers = ["tensorboard", "wandb"] if HAS_WANDB else ["tensorboard"]
    overrides = base_overrides(launched_cache, out) + [
        "student.kwargs=" + json.dumps(EVAL_STUDENT),
        "steps=4",
        "engine.zero_stage=3",
        "checkpoint.every=1",
        "checkpoint.keep_last=1",
        "eval.every=2",
        "eval.trust_remote_code=true",  # the cache records our own tests.cache_helpers factory: trusted here
        "eval.max_images=6",
        "eval.dataset_kwargs={split: validation, size: 6, image_size: 32}",
        "log.trackers=" + json.dumps(trackers),
        "log.tracker_kwargs={wandb: {mode: offline}}" if HAS_WANDB else "log.tracker_kwargs={}",
    ]
    spec = root / "result.args.json"
    result = root / "result.json"
    # run 1: 4 steps; run 2: --resume auto with no step left (restores the best-so-far from step 4)
    spec.write_text(
        json.dumps(
            {"result": str(result), "overrides": overrides, "runs": [None, "auto"], "max_steps": [None, 0]}
        )
    )
    proc = accelerate_launch([str(REPO / "tests" / "test_train_support.py"), str(spec)], timeout=400)
    r = json.loads(result.read_text())
    assert "error" not in r, r["error"] + proc.stderr[-4000:]
    r["out"], r["stderr"], r["trackers"] = out, proc.stderr, trackers
    return r


def _eval_lines(r: dict) -> list[dict]:
    return [rec for rec in r["log"] if "eval/miou" in rec]


def test_accelerate_launch_stage2_eval_metrics_finite_at_chosen_steps(launched_run):
    r = launched_run
    assert r["step"] == 4
    run_info = json.loads((r["out"] / "run_info.json").read_text())
    assert run_info["world_size"] == 2
    ev = _eval_lines(r)
    assert [rec["step"] for rec in ev] == [2, 4]
    for rec in ev:
        for k in ("eval/miou", "eval/miou_objects", "eval/pixel_accuracy", "eval/mean_accuracy"):
            assert isinstance(rec[k], float) and math.isfinite(rec[k]) and 0.0 <= rec[k] <= 100.0, (k, rec)
    # every step's losses are logged too
    assert [rec["step"] for rec in r["log"]] == [1, 2, 3, 4]


def test_sharded_eval_equals_one_process_tipsdistill_eval_code(launched_run):
    """The 2-rank evaluation at step 4 (3 + 3 images, confusion matrices summed) equals
    evaluate_segmentation of the exported step-4 student on all 6 images in this process."""
    from tests.test_train_support import tiny_teacher
    from tipsdistill.distill.evaluation import (
        SegmentationSettings,
        evaluate_segmentation,
        resolve_class_embeddings,
    )
    from tipsdistill.distill.evaluation.datasets import build_eval_dataset
    from tipsdistill.students import load_student

    r = launched_run
    ds = build_eval_dataset("synthetic", {"split": "validation", "size": 6, "image_size": 32})
    text = resolve_class_embeddings(
        ds.class_names, text_model=tiny_teacher(), templates="tcl", cache_dir=None
    )
    settings = SegmentationSettings(image_size=32, mode="whole", readout="tips", resize_backend="torch")
    res = evaluate_segmentation(load_student(r["export"]).eval(), ds, text, settings, progress=False)
    last = _eval_lines(r)[-1]
    assert last["step"] == 4
    for k in ("miou", "miou_objects", "pixel_accuracy", "mean_accuracy"):
        assert last[f"eval/{k}"] == pytest.approx(res["metrics"][k], abs=1e-4), k


def test_best_checkpoint_kept_apart_from_keep_last_and_restored(launched_run):
    r = launched_run
    ckpts = r["out"] / "checkpoints"
    ev = _eval_lines(r)
    top = max(ev, key=lambda rec: rec["eval/miou"])  # first of equals wins: a later tie is not better
    best = json.loads((ckpts / "best" / "best.json").read_text())
    assert best == {"step": top["step"], "metric": "eval/miou", "value": top["eval/miou"]}
    assert (ckpts / "best" / "complete.json").is_file()
    assert any((ckpts / "best").glob("*model_states.pt"))
    # keep_last=1 pruned every step checkpoint but the last, never the best
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step_")) == ["step_00000004"]
    # the resumed train() (no step left) restored the best-so-far from the checkpoint
    assert r["bests"] == [best, best]
    from tipsdistill.distill import checkpoint as ckpt

    assert ckpt.resolve_resume(str(ckpts / "best"), r["out"]) == (ckpts, "best")


def test_tensorboard_and_wandb_hold_every_term_and_eval_metric(launched_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    r = launched_run
    terms = [
        k
        for k in r["log"][0]
        if k not in ("step", "epoch", "consumed", "lr", "wd", "samples_per_s", "data_s")
    ]
    assert {"loss", "patch", "clip"} <= set(terms)
    expected = {f"loss/{k}" for k in terms} | {"lr", "wd", "samples_per_s", "data_s"}
    expected |= {"eval/miou", "eval/miou_objects", "eval/pixel_accuracy", "eval/mean_accuracy"}
    runs = [p for p in (r["out"] / "tensorboard").iterdir() if p.is_dir()]
    assert [p.name for p in runs] == ["out"]  # the run name: output_dir's name
    scalars: dict[str, list] = {}
    for d in [runs[0]] + [p for p in runs[0].iterdir() if p.is_dir()]:
        acc = EventAccumulator(str(d))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(acc.Scalars(tag))
    missing = expected - set(scalars)
    assert not missing, f"missing in the TensorBoard events: {sorted(missing)}; have {sorted(scalars)}"
    # logged once per step by rank 0 only (the resumed call logs no step), values equal log.jsonl's
    assert [e.step for e in scalars["loss/loss"]] == [1, 2, 3, 4]
    assert [e.step for e in scalars["eval/miou"]] == [2, 4]
    for e, rec in zip(scalars["eval/miou"], _eval_lines(r)):
        assert e.value == pytest.approx(rec["eval/miou"], rel=1e-6)
    if HAS_WANDB:
        runs = list((r["out"] / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(runs) == 2  # one per train() call, rank 0 only
        blob = b"".join(p.read_bytes() for p in runs)
        for key in sorted(expected):
            assert key.encode() in blob, f"W&B offline run lacks {key}"


def test_unknown_or_missing_tracker_named(tmp_path):
    from tipsdistill.distill.config import load_config
    from tipsdistill.distill.tracking import tracker_names

    cfg = load_config("distill", ["cache.path=/x", "log.trackers=[tensorboard, comet]"])
    with pytest.raises(ValueError, match="unknown tracker 'comet'.*mlflow.*tensorboard.*wandb"):
        tracker_names(cfg.log)
    if importlib.util.find_spec("mlflow") is None:
        cfg = load_config("distill", ["cache.path=/x", "log.trackers=[mlflow]"])
        with pytest.raises(ImportError, match="pip install mlflow"):
            tracker_names(cfg.log)
    # the former switch: true adds tensorboard, false removes it
    assert tracker_names(
        load_config("distill", ["cache.path=/x", "log.trackers=[]", "log.tensorboard=true"]).log
    ) == ["tensorboard"]
    assert tracker_names(load_config("distill", ["cache.path=/x", "log.tensorboard=false"]).log) == []
    assert tracker_names(load_config("distill", ["cache.path=/x"]).log) == ["tensorboard"]
    with pytest.raises(ValueError, match="eval.metric='iou'"):
        load_config("distill", ["cache.path=/x", "eval.metric=iou"])


def test_accelerate_deepspeed_plugin_and_precision_mismatch_refused(monkeypatch):
    from tipsdistill.distill.config import load_config
    from tipsdistill.distill.train import check_accelerate_env

    cfg = load_config("distill", ["cache.path=/x", "engine.precision=fp32"])
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(ValueError, match="engine.precision=fp32.*engine.precision=bf16"):
        check_accelerate_env(cfg)
    check_accelerate_env(load_config("distill", ["cache.path=/x", "engine.precision=bf16"]))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match="accelerate's DeepSpeed plugin.*configs/accelerate"):
        check_accelerate_env(cfg)
