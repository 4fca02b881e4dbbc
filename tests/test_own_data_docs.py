"""The "Your own data" commands of docs/own-data.md, run as written on generated example data.

``tests/own_data_check.py`` writes the files the commands name (shards, tables, an HF folder, with the bad
input the toolkit must survive), runs every ``bash`` block of the page in order and checks what the caches
hold. A test file of its own so that ``make test``'s workers run it beside the other files.
"""

from __future__ import annotations

import subprocess
import sys

from tests.launch_helpers import ROOT


def test_docs_own_data_commands_run_as_written(tmp_path):
    work = tmp_path / "own_data"
    cmd = [sys.executable, "-m", "tests.own_data_check", "--keep", str(work)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "own-data check: ok" in proc.stdout
    for f in ("caches/wds/index.h5", "caches/parquet/index.h5", "caches/hf/index.h5", "runs/wds/export"):
        assert (work / f).exists(), f
