"""The report: per-operator counts and bytes, JSON-ready, a rich table, no tensors kept."""

from __future__ import annotations

import gc
import io
import json
import weakref

import pytest
import torch
from rich.console import Console

from memsave_dispatch import MemSaveMode, saved_tensor_bytes
from memsave_dispatch.demo import run_demo
from memsave_dispatch.report import format_bytes, render_text, short_op_name


def test_report_counts_and_bytes_match_what_the_graph_keeps(frozen_net):
    net = frozen_net
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    stock_bytes, _ = saved_tensor_bytes(lambda: net(x), exclude=net)
    with MemSaveMode() as mode:
        mode_bytes, out = saved_tensor_bytes(lambda: net(x), exclude=net)
    report = mode.report()
    conv = report["aten.convolution.default"]
    assert conv.handled == 2 and conv.encodings == {"dropped": 2}
    assert conv.kept_bytes == 0 and conv.stock_bytes == conv.saved_bytes > 0
    assert report["aten.relu_.default"].encodings == {"1-bit mask": 2}
    # per-node totals: what the handled nodes keep is what the whole graph keeps, minus the
    # parts outside handled ops (cross-entropy etc.: none here) and shared storages
    assert report.kept_bytes <= mode_bytes
    assert report.saved_bytes > 0 and mode_bytes < stock_bytes


def test_report_bytes_per_call_are_the_storages_the_node_keeps():
    """Batch norm in eval mode with frozen affine parameters: stock keeps the input and the
    running statistics (buffers, not parameters, so they count); the node under the mode
    keeps only the statistics, and the report says exactly that."""
    norm = torch.nn.BatchNorm2d(3).eval().requires_grad_(False)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    with MemSaveMode(include=["norm"]) as mode:
        norm(x)
    report = mode.report()["aten.native_batch_norm.default"]
    statistics = norm.running_mean.untyped_storage().nbytes() + norm.running_var.untyped_storage().nbytes()
    assert report.handled == 1 and report.encodings == {"dropped": 1}
    assert report.stock_bytes == x.untyped_storage().nbytes() + statistics
    assert report.kept_bytes == statistics


def test_to_dict_is_json_ready_and_complete(frozen_net):
    net = frozen_net
    with MemSaveMode() as mode:
        net(torch.randn(2, 3, 16, 16, requires_grad=True)).sum().backward()
        with torch.no_grad():
            net(torch.randn(2, 3, 16, 16))
    data = json.loads(json.dumps(mode.report().to_dict()))
    ops = {line["op"]: line for line in data["ops"]}
    assert ops["aten.convolution.default"]["to_stock"] == {"grad mode off": 2}
    assert data["totals"]["handled"] == sum(line["handled"] for line in data["ops"])
    assert data["totals"]["saved_bytes"] == data["totals"]["stock_bytes"] - data["totals"]["kept_bytes"]


def test_print_report_renders_a_table(frozen_net):
    net = frozen_net
    with MemSaveMode() as mode:
        net(torch.randn(2, 3, 16, 16, requires_grad=True))
    buffer = io.StringIO()
    mode.print_report(Console(file=buffer, width=200))
    text = buffer.getvalue()
    assert "convolution" in text and "dropped" in text and "total" in text
    assert "convolution: 2 dropped" in str(mode.report())


def test_accounting_keeps_no_tensor_alive(frozen_net):
    net = frozen_net
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    with MemSaveMode():
        hidden = net.features[:3](x)  # conv -> BN -> ReLU: every handled op sees it
        probe = weakref.ref(hidden)
        net.features[3:](hidden).sum().backward()
    del hidden
    gc.collect()
    assert probe() is None


def test_format_bytes():
    assert format_bytes(0) == "0 B"
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(-3 * 1024**2) == "-3.00 MiB"
    assert format_bytes(5 * 1024**4) == "5120.00 GiB"
    assert format_bytes(None) == "n/a"


@pytest.mark.parametrize("width", (80, 120))
def test_the_demos_report_reads_whole_in_an_ordinary_terminal(width):
    """Every operator name and every number whole, on one line, at 80 and 120 columns."""
    mode = MemSaveMode()
    run_demo(steps=1, batch=4, size=16, console=Console(file=io.StringIO(), width=200), mode=mode)
    report = mode.report()
    lines = render_text(report.table(), width=width).splitlines()
    assert max(len(line) for line in lines) <= width
    assert len(report.ops) >= 5
    for op in report.ops:
        name = short_op_name(op.op)
        row = next(line for line in lines if line.split() and line.split()[0] == name)
        for number in (str(op.handled), format_bytes(op.stock_bytes), format_bytes(op.kept_bytes), format_bytes(op.saved_bytes)):
            assert number in row, f"{number!r} not whole in {row!r}"
    total = next(line for line in lines if line.split() and line.split()[0] == "total")
    for number in (str(report.handled), format_bytes(report.stock_bytes), format_bytes(report.kept_bytes), format_bytes(report.saved_bytes)):
        assert number in total
