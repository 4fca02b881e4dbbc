"""One answer to "which rank am I, of how many, which local device" for stage 1, stage 2 and evaluation
(``cache.launch.process_place``): torchrun / accelerate launch variables, srun's SLURM task variables
(translated and exported), independent jobs, no launcher; bad values named."""

from __future__ import annotations

import os

import pytest

from tipsdistill.cache.launch import ProcessPlace, process_place

SLURM = {
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_NTASKS": "4",
    "SLURM_NTASKS_PER_NODE": "2(x2)",
    "SLURM_JOB_NODELIST": "gpu-[007-008]",
    "SLURM_JOB_ID": "42",
}


@pytest.fixture(autouse=True)
def _environment_restored():
    """``setup_env`` / ``process_place`` export RANK, WORLD_SIZE, MASTER_* into ``os.environ``: put the
    environment back exactly, or every later test of the session runs as rank 3 of 4 (monkeypatch's
    ``delenv`` of an absent key records nothing to undo)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_no_launcher_is_one_process() -> None:
    env: dict[str, str] = {}
    assert process_place(env) == ProcessPlace(rank=0, world=1, local_rank=0, launcher="none", group=False)
    assert env == {}  # nothing to translate, nothing written


def test_torchrun_variables_are_read_as_set() -> None:
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", **SLURM}
    p = process_place(env)
    assert (p.rank, p.world, p.local_rank, p.launcher, p.group) == (5, 8, 1, "env", True)
    assert env["RANK"] == "5" and "NODE_RANK" not in env  # a launcher's RANK wins over SLURM's task variables


def test_srun_task_variables_are_translated_and_exported() -> None:
    env = dict(SLURM)
    p = process_place(env)
    assert (p.rank, p.world, p.local_rank, p.launcher, p.group) == (3, 4, 1, "slurm", True)
    assert env["RANK"] == "3" and env["WORLD_SIZE"] == "4" and env["LOCAL_RANK"] == "1"
    assert (
        env["MASTER_ADDR"] == "gpu-007" and env["MASTER_PORT"] == "20042" and env["LOCAL_WORLD_SIZE"] == "2"
    )
    again = process_place(env)  # asked again (the exported variables): the same place
    assert (again.rank, again.world, again.local_rank, again.group) == (3, 4, 1, True)


def test_missing_local_rank_independent_jobs_and_one_group() -> None:
    independent = process_place({"RANK": "2", "WORLD_SIZE": "3"})  # a SLURM array: one shard per job
    assert (independent.local_rank, independent.group) == (0, False)
    hand = process_place({"RANK": "2", "WORLD_SIZE": "3"}, group=True)  # stage 2 always meets in one group
    assert (hand.local_rank, hand.group) == (2, True)
    assert process_place({"RANK": "2", "WORLD_SIZE": "3", "MASTER_ADDR": "h"}).local_rank == 2


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"RANK": "3", "WORLD_SIZE": "2"}, r"RANK=3 is not in \[0, WORLD_SIZE=2\)"),
        ({"RANK": "1"}, r"RANK=1 is not in \[0, WORLD_SIZE=1\)"),
        ({"RANK": "0", "WORLD_SIZE": "two"}, r"WORLD_SIZE='two' is not an integer"),
    ],
)
def test_bad_values_named(env: dict[str, str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        process_place(dict(env))


def test_stage2_exports_what_deepspeed_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    from tipsdistill.distill.train import setup_env

    for k in (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "NODE_RANK",
    ):
        monkeypatch.delenv(k, raising=False)
    for k, v in SLURM.items():
        monkeypatch.setenv(k, v)
    setup_env()

    got = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    assert got == {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "gpu-007",
        "MASTER_PORT": "20042",
    }
    for k in [*SLURM, "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"]:
        monkeypatch.delenv(k, raising=False)
    set_now = setup_env()  # no launcher: one process on a free local port
    assert {k: set_now[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")} == {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
    }
    assert int(set_now["MASTER_PORT"]) > 0 and os.environ["MASTER_PORT"] == set_now["MASTER_PORT"]
