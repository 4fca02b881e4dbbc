"""Threads and workers fitted to the cores the process may use (cache/resources.py)."""

from __future__ import annotations

import pytest

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
