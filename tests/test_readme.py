"""The README says what the code does: its numbers come from what the code produces, and its
handler example runs and matches stock."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console

from memsave_dispatch.demo import run_demo
from memsave_dispatch.handlers import registered_ops, unregister_handler
from tests.support import compare_with_stock
from tools.bench.render import markdown, markdown_table

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _section(name: str, page: str = "README.md") -> str:
    text = README if page == "README.md" else (ROOT / page).read_text()
    match = re.search(rf"<!-- {name}:start -->\n(.*?)<!-- {name}:end -->", text, re.S)
    assert match, f"{page} has no {name} section"
    return match.group(1)


def _results(name: str) -> dict:
    return json.loads((ROOT / "docs" / name).read_text())


def test_the_benchmark_table_is_the_one_the_benchmark_wrote():
    assert _section("bench-table") == markdown(_results("bench-quick.json"))


def test_the_demo_summary_is_what_the_demo_prints():
    output = io.StringIO()
    result = run_demo(console=Console(file=output, width=120))
    printed = output.getvalue()
    summary = printed[printed.index("Bytes kept for backward") :]
    lines = [line.rstrip() for line in summary.strip().splitlines()]
    assert [line.rstrip() for line in _section("demo-summary").strip("`\n").splitlines()] == lines
    assert result["gradients_bit_identical"]


def test_the_handler_example_runs_and_matches_stock():
    example = README[README.index("<!-- handler-example -->") :]
    code = re.search(r"```python\n(.*?)```", example, re.S).group(1)
    assert "from memsave_dispatch.handlers import" in code and "memsave_dispatch import" not in code.replace(
        "memsave_dispatch.handlers import", ""
    )
    op = torch.ops.aten.reflection_pad2d.default
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    try:
        x = torch.randn(2, 3, 6, 6, requires_grad=True)
        stock, mode = compare_with_stock(lambda x: F.pad(x, (1, 2, 1, 2), mode="reflect"), {"x": x})
        assert stock.saved_bytes == x.numel() * 4
        assert mode.saved_bytes == 0
        assert mode.report["reflection_pad2d"].encodings == {"dropped": 1}
    finally:
        if op in registered_ops():
            unregister_handler(op)


def test_the_transformer_table_is_the_one_the_benchmark_wrote():
    results = _results("bench-transformers.json")
    assert _section("transformer-table") == markdown(results)
    assert all(row["columns"]["mode"]["exact"] for row in results["rows"])


def test_the_benchmark_pages_tables_are_the_ones_the_benchmark_wrote():
    assert _section("hf-table", "docs/benchmarks.md") == markdown(_results("bench-hf.json"))
    assert _section("full-table", "docs/benchmarks.md") == markdown_table(_results("bench-full.json"))
