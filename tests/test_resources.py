"""Threads and workers fitted to the cores the process may use (cache/resources.py)."""

from __future__ import annotations

import pytest
import torch

from tipsdistill.cache import resources as rs


@pytest.fixture
def machine(monkeypatch):
    """A fake machine: ``set(cpus=, quota=, idle=)``; no OMP_NUM_THREADS, no local ranks."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)

    def set_(cpus: int = 8, quota: float | None = None, idle: float | None = None) -> None:
        monkeypatch.setattr(rs, "_affinity", lambda: set(range(cpus)))
        monkeypatch.setattr(rs, "_cgroup_quota", lambda root=rs.CGROUP: quota)
        monkeypatch.setattr(rs, "idle_cpus", lambda probe_s=0.2: idle)

    return set_


def test_cgroup_quota_files(tmp_path):
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert rs._cgroup_quota(tmp_path) == 2.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert rs._cgroup_quota(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert rs._cgroup_quota(v1) == 3.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1")
    assert rs._cgroup_quota(v1) is None


def test_available_cpus(machine, monkeypatch):
    machine(cpus=16, quota=4.5)
    assert rs.available_cpus() == (4, "affinity 16, cgroup quota 4.5")
    machine(cpus=16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert rs.available_cpus() == (2, "affinity 16, 8 local ranks")
    machine(cpus=1)
    assert rs.available_cpus(local_world=4)[0] == 1  # never below one


def test_fit_threads(machine, monkeypatch):
    machine(cpus=2, idle=2.0)
    p = rs.fit_threads(workers=0)
    assert (p.intra_op, p.workers, p.cpus) == (2, 0, 2)
    machine(cpus=2, idle=1.0)  # another process keeps one of the two cores busy
    assert rs.fit_threads(workers=0).intra_op == 1
    machine(cpus=8, idle=8.0)
    assert rs.fit_threads(workers=2).intra_op == 6  # the workers' cores are left to them
    p = rs.fit_threads(workers=-1)  # auto on the CPU: half the cores decode
    assert (p.workers, p.intra_op) == (4, 4)
    p = rs.fit_threads(workers=-1, cuda=True)
    assert (p.workers, p.intra_op) == (7, 1)
    assert rs.fit_threads(workers=2, threads=3).intra_op == 3  # explicit wins
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    p = rs.fit_threads(workers=2)
    assert p.intra_op == 5 and "OMP_NUM_THREADS" in p.line()
    assert rs.fit_threads(workers=2, threads=3).intra_op == 3
    with pytest.raises(ValueError, match="workers=-2: DataLoader workers must be a number >= 0"):
        rs.fit_threads(workers=-2)


def test_idle_probe_reads_proc_stat():
    idle = rs.idle_cpus(0.05)
    assert idle is None or 0.0 <= idle <= len(rs._affinity()) + 1e-6


# --------------------------------------------------------------------------- GPU-ready defaults (#29)
@pytest.mark.parametrize(
    "requested, device, accelerate, bf16, want",
    [
        ("auto", "cuda", "no", True, "bf16"),  # plain torchrun on a GPU: bf16, not float32
        ("auto", "cuda", "no", False, "none"),  # a GPU without bf16 (V100, T4): float32, never fp16
        ("auto", "cuda", "fp16", True, "fp16"),  # accelerate launch --mixed_precision fp16 wins
        ("auto", "cuda", "bf16", False, "bf16"),
        ("auto", "cpu", "no", False, "none"),  # the CPU: float32
        ("none", "cuda", "bf16", True, "none"),  # --autocast none: the float32 path, whatever accelerate says
        ("fp16", "cuda", "no", True, "fp16"),
    ],
)
def test_stage1_autocast_resolution(requested, device, accelerate, bf16, want):
    from tipsdistill.cache.plan import resolve_autocast

    assert resolve_autocast(requested, device, accelerate, bf16) == want


def test_stage1_tf32_resolution():
    from tipsdistill.cache.plan import resolve_tf32

    assert resolve_tf32(None, "cuda", "bf16") is True  # default on CUDA
    assert resolve_tf32(None, "cuda", "none") is False  # --autocast none: IEEE float32 throughout
    assert resolve_tf32(True, "cuda", "none") is True  # --autocast none --tf32
    assert resolve_tf32(False, "cuda", "bf16") is False  # --no-tf32
    assert resolve_tf32(None, "cpu", "none") is False and resolve_tf32(True, "cpu", "bf16") is False


@pytest.mark.parametrize(
    "requested, affinity, quota, local_world, cuda, want",
    [
        ("auto", 96, None, 8, True, 8),  # 8-GPU node: 12 cores per process, capped at 8
        ("auto", 32, None, 8, True, 3),  # 4 cores per process: one left to the main process
        ("auto", 64, 16.0, 4, True, 3),  # a cgroup quota of 16 CPUs over 4 ranks
        ("auto", 8, None, 1, False, 4),  # the CPU: half the cores decode, the forward needs the rest
        ("auto", 2, None, 2, False, 0),  # one core per process on the CPU: load in the main process
        (-1, 16, None, 1, True, 8),  # -1 is auto
        ("3", 96, None, 8, True, 3),  # explicit wins (a dotted override arrives as text)
        (0, 96, None, 8, True, 0),
    ],
)
def test_workers_auto_fitted_to_cores_per_process(requested, affinity, quota, local_world, cuda, want):
    cores, _ = rs.cores_per_process(affinity, quota, local_world)
    workers = rs.workers_setting(requested)
    assert (rs.auto_workers(cores, cuda) if workers == -1 else workers) == want


def test_workers_setting_refuses_what_is_not_a_count():
    for bad in ("many", -2, 1.5, True, "-3"):
        with pytest.raises(ValueError, match="DataLoader workers must be a number >= 0 .* or auto"):
            rs.workers_setting(bad, "data.num_workers")


def test_stage2_num_workers_defaults_to_auto_and_is_checked(machine, monkeypatch):
    from tipsdistill.distill.config import TrainConfig

    cfg = TrainConfig()
    assert cfg.data.num_workers == "auto"
    machine(cpus=16, idle=16.0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    p = rs.fit_threads(workers=cfg.data.num_workers, cuda=True)  # what distill.train does at start
    assert (p.workers, p.cpus) == (3, 4) and "workers auto" in p.line() and "4 local ranks" in p.line()
    cfg.data.num_workers = "lots"
    with pytest.raises(ValueError, match="data.num_workers='lots'"):
        cfg.validate()


def test_evaluation_picks_the_gpu_when_there_is_one(monkeypatch):
    """tipsdistill-eval's --device auto, and stage 2's rank device (which eval.every evaluates on)."""
    from tipsdistill.distill import train
    from tipsdistill.scripts.evaluate import resolve_device

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    assert resolve_device("auto") == ("cuda", False)
    assert train.device_for_rank() == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == ("cpu", False)
    assert train.device_for_rank() == torch.device("cpu")


def test_stage2_loader_built_directly_fits_auto_workers(machine, monkeypatch):
    """A ``_Loader`` built outside ``train()`` (benchmarks, tests) resolves ``data.num_workers=auto`` itself."""
    from types import SimpleNamespace

    from tipsdistill.distill.train import _Loader

    class Order:
        def order(self) -> list[int]:
            return list(range(8))

        def endless(self, batch: int):
            return iter(range(8))

    machine(cpus=4, idle=4.0)
    data = SimpleNamespace(batch_size=4, num_workers="auto", prefetch_factor=2)
    cfg = SimpleNamespace(data=data, cache=SimpleNamespace(prefetch=0))
    loader = _Loader(list(range(8)), Order(), cfg)
    assert loader._dl.num_workers == 2  # the CPU: half of the 4 cores


def test_apply_tf32_sets_what_every_library_reads_back():
    from tipsdistill.cache.plan import apply_tf32

    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    try:
        apply_tf32(True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        apply_tf32(False)  # --autocast none: IEEE float32, cuDNN's TF32 default turned off too
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]
