"""The installed toolkit is one package, ``tipsdistill``: the wheel built from this checkout, installed into
a fresh virtualenv, runs the three stages' console scripts from a folder that holds ``cache/`` and
``scripts/`` packages of its own (which shadowed the toolkit when it installed them as top-level
packages). The virtualenv borrows this one's dependencies (torch, timm, ...) through a ``.pth`` line, so
nothing is downloaded; the toolkit itself comes only from the wheel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.launch_helpers import ROOT, subprocess_env

pytestmark = pytest.mark.slow


def _sh(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 600) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """``pip wheel`` of a copy of the tracked files (the build writes build/ and egg-info beside them)."""
    src = tmp_path_factory.mktemp("src")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    dist = tmp_path_factory.mktemp("dist")
    pip = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        str(dist),
        str(src),
    ]
    _sh(pip, cwd=src)
    (whl,) = dist.glob("tipsdistill-*.whl")
    return whl


def test_the_wheel_holds_one_top_level_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (top,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert z.read(top).decode().split() == ["tipsdistill"]
        entry = z.read(top.replace("top_level.txt", "entry_points.txt")).decode()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"tipsdistill"}
    for stage in ("cache", "distill", "distill/evaluation", "students", "teachers", "scripts"):
        assert f"tipsdistill/{stage}/__init__.py" in names
    assert "tipsdistill/distill/recipes/embedded.yaml" in names  # package data travels
    assert any(n.startswith("tipsdistill/teachers/assets/") for n in names)
    assert "tipsdistill-train = tipsdistill.scripts.train:main" in entry


def test_wheel_in_a_fresh_venv_runs_the_stages_beside_cache_and_scripts_folders(
    wheel: Path, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    _sh([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    py = venv / "bin" / "python"
    site = _sh(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path
    ).strip()
    # the dependencies of this environment, after the venv's own site-packages (where the wheel goes)
    deps = [p for p in sys.path if p.rstrip("/").endswith("-packages") and Path(p).is_dir()]
    Path(site, "zz_dependencies.pth").write_text("".join(f"{p}\n" for p in deps))
    _sh(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        tmp_path,
    )

    work = tmp_path / "work"  # a user's folder: its own cache/ and scripts/ packages
    for shadow in ("cache", "scripts", "distill"):
        (work / shadow).mkdir(parents=True)
        (work / shadow / "__init__.py").write_text("raise ImportError('the user folder was imported')\n")
    env = subprocess_env()
    env.pop("PYTHONPATH")  # nothing from this checkout
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    where = _sh(
        [
            str(py),
            "-c",
            "import tipsdistill.cache as c, tipsdistill; print(c.__file__, tipsdistill.__version__)",
        ],
        work,
    )
    assert where.startswith(site) and where.split()[1] != "0+unknown", where

    bin_ = venv / "bin"
    _sh(
        [str(bin_ / "tipsdistill-cache"), "--teacher", "embedded", "--dataset", "synthetic"]
        + ["--data-kw", '{"split": "train", "size": 16, "image_size": 32}', "--out", "cache/"]
        + ["--image-size", "32", "--batch-size", "8", "--num-workers", "0", "--quiet"],
        work,
        env,
    )
    assert (work / "cache" / "index.h5").is_file()
    _sh(
        [str(bin_ / "tipsdistill-train"), "--recipe", "embedded", "cache.path=cache/", "output_dir=runs/s"]
        + ["steps=2", "data.batch_size=8", "student.kwargs.depth=1", "head.out_dim=64", "head.hidden_dim=64"]
        + ["head.bottleneck_dim=32", "optim.warmup_steps=1", "eval.every=0", "checkpoint.every=2"]
        + ["engine.cpu_threads=1", "log.progress=false"],
        work,
        env,
    )
    export = work / "runs" / "s" / "export"
    assert (export / "model.safetensors").is_file(), sorted(p.name for p in (work / "runs" / "s").iterdir())
    _sh(
        [str(bin_ / "tipsdistill-eval"), "--model", f"student={export}", "--text-model", "teacher:embedded"]
        + ["--dataset", "synthetic", "--dataset-kwargs", '{"split": "validation"}', "--mode", "whole"]
        + ["--image-size", "64", "--max-images", "2", "--out", "eval", "--no-plots", "--quiet"]
        + ["--text-cache", "none", "--device", "cpu"],
        work,
        env,
    )
    res = json.loads((work / "eval" / "results.json").read_text())
    assert 0.0 <= res["models"]["student"]["metrics"]["miou"] <= 100.0
