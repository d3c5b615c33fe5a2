"""The scripts under tools/ run (on CPU, in their smallest configuration)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def _gpu_check_on_cpu(folder: Path, *options: str):
    json_path, markdown_path = folder / "results.json", folder / "results.md"
    command = [sys.executable, str(TOOLS / "gpu_check.py"), "--device", "cpu", *options,
               "--json", str(json_path), "--markdown", str(markdown_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    return result, json.loads(json_path.read_text()), markdown_path.read_text(), json_path


@pytest.fixture(scope="module")
def cpu_preparation_run(tmp_path_factory):
    """The CUDA readiness script pointed at the CPU, as prepared for the GPU: every part, the
    benchmark at toy sizes without its compiled columns (minutes: ``pytest -m slow``)."""
    return _gpu_check_on_cpu(tmp_path_factory.mktemp("gpu_check"), "--compile", "none")


def test_gpu_check_matrix_and_ghosts_on_cpu(tmp_path):
    """The same script's checks, one precision, no benchmark: in every run of the suite."""
    result, out, markdown, _ = _gpu_check_on_cpu(tmp_path, "--precisions", "fp32", "--skip-bench")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert out["verdict"]["passed"] and "**Verdict: passed.**" in markdown
    ran = [row for row in out["matrix"] if row["skipped"] is None]
    assert len(ran) > 100 and all(row["outputs_equal"] and row["grads_equal"] for row in ran)
    assert out["ghosts"]["zero_memory"]["allocated"] == 0


@pytest.mark.slow
def test_gpu_check_passes_every_part_on_cpu(cpu_preparation_run):
    result, out, _, _ = cpu_preparation_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert out["verdict"]["passed"] and out["verdict"]["problems"] == []
    matrix = out["matrix"]
    assert len(matrix) > 800
    ran = [row for row in matrix if row["skipped"] is None]
    assert len(matrix) - len(ran) < 10  # only what stock itself cannot run on the CPU
    assert all(row["outputs_equal"] and row["grads_equal"] and row["mode_bytes"] <= row["stock_bytes"] for row in ran)
    assert {"conv2d", "batch_norm", "conv-bn-relu-pool-dropout", "max_pool2d 2x2", "native_dropout", "hardtanh"} <= {
        row["family"] for row in ran
    }
    assert sum(row["handled"] for row in ran) > 500


@pytest.mark.slow
def test_gpu_check_measures_ghosts_against_the_zero_stride_placeholder(cpu_preparation_run):
    _, out, _, _ = cpu_preparation_run
    ghosts = out["ghosts"]
    assert ghosts["zero_memory"]["allocated"] == 0
    for kernel in ghosts["kernels"]:
        assert kernel["ghost_exact"] and kernel["growth_ghost"] <= kernel["growth_real"], kernel
    conv = [k for k in ghosts["kernels"] if k["kernel"].startswith("convolution")]
    # the control: the placeholder makes convolution_backward copy the input, and it shows
    assert all(k["growth_placeholder"] >= k["growth_real"] + k["input_bytes"] for k in conv)
    assert out["host_sync"] is None  # nothing to wait for on the CPU


@pytest.mark.slow
def test_gpu_check_runs_the_benchmark_plan_and_renders_the_readme_table(cpu_preparation_run):
    _, out, markdown, json_path = cpu_preparation_run
    rows = [row for group in out["bench"]["groups"] for row in group["rows"]]
    assert {row["case"] for row in rows} == {"input-bn-eval", "input-bn-train", "all", "lora"}
    assert {row["model"] for row in rows} >= {"transformer_encoder"}
    for row in rows:
        mode, eager = row["columns"]["mode"], row["columns"]["eager"]
        assert mode["exact"] == "bit-identical" and mode["kept_bytes"] <= eager["kept_bytes"], row
    assert "**Verdict: passed.**" in markdown
    assert "| model | case | kept: eager / mode / compile / compile + mode (MiB) |" in markdown
    rendered = subprocess.run([sys.executable, str(TOOLS / "gpu_check.py"), "--render", str(json_path)],
                              capture_output=True, text=True, timeout=120)
    assert rendered.returncode == 0 and rendered.stdout.strip() == markdown.strip()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_gpu_check_says_when_there_is_no_gpu():
    result = subprocess.run([sys.executable, str(TOOLS / "gpu_check.py")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no CUDA device" in result.stderr
