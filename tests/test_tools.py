"""The scripts under tools/ run (on CPU, in their smallest configuration)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def test_gpu_check_runs_its_matrix_on_cpu(tmp_path):
    """The CUDA readiness script, pointed at the CPU: every configuration exact, none keeps more."""
    out = tmp_path / "matrix.json"
    result = subprocess.run(
        [sys.executable, str(TOOLS / "gpu_check.py"), "--device", "cpu", "--skip-bench", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = json.loads(out.read_text())["matrix"]
    assert len(rows) > 200
    assert all(row["error"] is None for row in rows)
    assert all(row["outputs_equal"] and row["grads_equal"] for row in rows)
    assert all(row["mode_bytes"] <= row["stock_bytes"] for row in rows)
    assert sum(row["handled"] for row in rows) > 100


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_gpu_check_says_when_there_is_no_gpu():
    result = subprocess.run([sys.executable, str(TOOLS / "gpu_check.py")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no CUDA device" in result.stderr

