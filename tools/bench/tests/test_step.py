"""The step-time comparison (``python -m tools.bench step``) runs, in its smallest setting."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_step_comparison_reports_ratio_bytes_exactness_and_page_faults(tmp_path):
    """The step-time comparison, smallest setting: it times both sides, keeps the acceptance
    byte ratios and says how many page faults each side's steps took."""
    out = tmp_path / "step.json"
    result = subprocess.run(
        [sys.executable, "-m", "tools.bench", "step", "--batch", "2", "--size", "32", "--pairs", "3", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = {row["case"]: row for row in json.loads(out.read_text())}
    assert set(rows) == {"frozen conv/BN, BN eval", "frozen conv/BN, BN train", "all trainable"}
    assert all(row["gradients_bit_identical"] for row in rows.values())
    assert rows["frozen conv/BN, BN eval"]["bytes_ratio"] < 0.1
    assert rows["frozen conv/BN, BN train"]["bytes_ratio"] < 0.56
    assert rows["all trainable"]["bytes_ratio"] <= 1.0
    for row in rows.values():
        assert row["stock_ms"] > 0 and row["mode_ms"] > 0 and row["median_ratio"] > 0
        if sys.platform != "win32":
            assert row["stock_page_faults_per_step"] >= 0 and row["mode_page_faults_per_step"] >= 0
