"""MemSaveMode as a context manager: scope, threads, nesting, exceptions, options."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memsave_dispatch import MemSaveMode, saved_tensor_bytes


def _graph_signature(fn):
    """Node types of the graph fn builds, and the bytes it keeps."""
    saved, out = saved_tensor_bytes(fn)
    types, seen, stack = [], set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        types.append(type(node).__name__)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return sorted(types), saved


def test_graph_types_are_stock_inside_the_mode_too(frozen_net):
    net = frozen_net
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    stock_types, stock_bytes = _graph_signature(lambda: net(x))
    with MemSaveMode():
        mode_types, mode_bytes = _graph_signature(lambda: net(x))
    assert mode_types == stock_types  # same backward nodes; only what they keep differs
    assert mode_bytes < stock_bytes


@pytest.mark.parametrize("exit_by", ("normal", "exception"))
def test_after_exit_behaviour_is_stock(exit_by, frozen_net):
    net = frozen_net
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    before = _graph_signature(lambda: net(x))
    if exit_by == "normal":
        with MemSaveMode():
            net(x).sum().backward()
    else:
        with pytest.raises(ZeroDivisionError):
            with MemSaveMode():
                net(x)
                1 / 0
    assert _graph_signature(lambda: net(x)) == before


def test_other_threads_run_stock_while_one_is_inside(frozen_net):
    net = frozen_net
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    stock = _graph_signature(lambda: net(x))
    inside, outside = threading.Event(), threading.Event()
    results = {}

    def in_mode():
        with MemSaveMode():
            inside.set()
            outside.wait(timeout=30)
            results["mode"] = _graph_signature(lambda: net(x))

    def not_in_mode():
        inside.wait(timeout=30)
        results["stock"] = _graph_signature(lambda: net(x))
        outside.set()

    threads = [threading.Thread(target=in_mode), threading.Thread(target=not_in_mode)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results["stock"] == stock
    assert results["mode"][1] < stock[1]


def test_nested_and_reentered_modes(frozen_net):
    net = frozen_net
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    outer, inner = MemSaveMode(), MemSaveMode(exclude=["conv"])
    with outer:
        full, _ = saved_tensor_bytes(lambda: net(x))
        with inner:
            partial, _ = saved_tensor_bytes(lambda: net(x))
            with outer:  # the same mode entered again, nested
                again, _ = saved_tensor_bytes(lambda: net(x))
        after, _ = saved_tensor_bytes(lambda: net(x))
    stock, _ = saved_tensor_bytes(lambda: net(x))
    assert full == after == again < partial < stock
    assert outer.report().handled > 0 and inner.report().handled > 0


def test_reusable_across_steps_and_report_accumulates(frozen_net):
    net = frozen_net
    mode = MemSaveMode()
    for step in range(3):
        x = torch.randn(2, 3, 16, 16, requires_grad=True)
        with mode:
            net(x).sum().backward()
        assert mode.report()["aten.convolution.default"].handled == 2 * (step + 1)
    mode.reset_report()
    assert mode.report().ops == ()


def test_include_and_exclude_select_ops(frozen_net):
    net = frozen_net
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    with MemSaveMode(include=["conv"]) as only_conv:
        net(x)
    assert {line.op for line in only_conv.report().ops} == {"aten.convolution.default"}
    with MemSaveMode(exclude=[torch.ops.aten.convolution, "pooling"]) as no_conv:
        net(x)
    seen = {line.op for line in no_conv.report().ops}
    assert "aten.convolution.default" not in seen and not any("pool" in op for op in seen)
    assert "aten.native_batch_norm.default" in seen


@pytest.mark.parametrize(
    "kwargs,error",
    [
        (dict(include=["convolutions"]), ValueError),
        (dict(exclude=[torch.ops.aten.sin.default]), ValueError),
        (dict(include=[torch.ops.aten.sin]), ValueError),
        (dict(include=[3]), TypeError),
        (dict(devices=["tpu"]), ValueError),
    ],
)
def test_bad_options_raise_clear_errors(kwargs, error):
    with pytest.raises(error):
        MemSaveMode(**kwargs)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(devices=()), ValueError, "devices is empty: MemSaveMode would handle nothing"),
        (dict(devices="gpu"), ValueError, "unknown device type\\(s\\) 'gpu'"),
        (dict(include="convolutions"), ValueError, "unknown op family 'convolutions'; families: \\["),
    ],
)
def test_option_errors_say_what_to_give(kwargs, error, message):
    with pytest.raises(error, match=message):
        MemSaveMode(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(include="conv"),
        dict(include=torch.ops.aten.convolution.default),
        dict(include=["conv"], devices="cpu"),
        dict(include="conv", devices=(torch.device("cpu"),)),
        dict(include="conv", devices=torch.device("cpu")),
    ],
    ids=["family string", "one operator", "device string", "torch.device in a tuple", "a torch.device"],
)
def test_one_selector_or_device_needs_no_list(kwargs):
    mode = MemSaveMode(**kwargs)
    assert mode.ops == {torch.ops.aten.convolution.default}
    assert mode.devices == {"cpu"}


def test_unverified_device_warns():
    with pytest.warns(UserWarning, match="not verified"):
        MemSaveMode(devices=["cpu", "cuda"])


def test_grad_disabled_and_no_grad_inputs_pass_to_stock_with_reason():
    x = torch.randn(2, 3, 8, 8)
    w = torch.randn(4, 3, 3, 3)
    with MemSaveMode() as mode:
        F.conv2d(x, w)
        with torch.no_grad():
            F.conv2d(x.requires_grad_(), w)
    reasons = mode.report()["aten.convolution.default"].to_stock
    assert reasons == {"no input requires grad": 1, "grad mode off": 1}


def test_forward_mode_ad_gives_stock_tangents_and_gradients():
    conv = nn.Conv2d(3, 4, 3).requires_grad_(False)
    x = torch.randn(1, 3, 8, 8, requires_grad=True)
    results = []
    for use_mode in (False, True):
        with MemSaveMode() if use_mode else torch.enable_grad():
            with torch.autograd.forward_ad.dual_level():
                dual = torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))
                out = F.relu(conv(dual))
                primal, tangent = torch.autograd.forward_ad.unpack_dual(out)
                (grad,) = torch.autograd.grad(primal.sum(), x)
        results.append((primal, tangent, grad))
    for stock, mode in zip(*results):
        assert torch.equal(stock, mode)
