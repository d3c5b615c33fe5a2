"""The step-time comparison (``python -m tools.bench step``) runs, in its smallest setting."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_step_comparison_reports_ratio_bytes_exactness_and_page_faults(tmp_path):
    """The step-time comparison, smallest setting: per allocator setting (a process each) and
    engine it times both sides, keeps the acceptance byte ratios, says how many page faults
    each side's steps took, and prints the per-call overhead."""
    out = tmp_path / "step.json"
    result = subprocess.run(
        [sys.executable, "-m", "tools.bench", "step", "--rows", "resnet18-eval", "resnet18-train", "resnet18-all",
         "--batch", "2", "--size", "32", "--pairs", "3", "--per-call-rounds", "2", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Per handled call" in result.stdout
    results = json.loads(out.read_text())
    assert set(results["allocators"]) == {"trim", "keep"}
    for measured in results["allocators"].values():
        rows = {row["case"]: row for row in measured["rows"]}
        assert set(rows) == {"frozen conv/BN, BN eval", "frozen conv/BN, BN train", "all trainable"}
        for row in rows.values():
            assert row["stock_ms"] > 0
            if sys.platform != "win32":
                assert row["stock_page_faults_per_step"] >= 0
            for figures in row["engines"].values():
                assert figures["gradients_bit_identical"]
                assert figures["mode_ms"] > 0 and figures["median_ratio"] > 0
        for name in ("compiled", "python"):
            assert rows["frozen conv/BN, BN eval"]["engines"][name]["bytes_ratio"] < 0.1
            assert rows["frozen conv/BN, BN train"]["engines"][name]["bytes_ratio"] < 0.56
            assert rows["all trainable"]["engines"][name]["bytes_ratio"] <= 1.0
        assert {row["call"] for row in measured["per_call"]} and all(
            set(row["engines"]) == {"compiled", "python"} for row in measured["per_call"]
        )
