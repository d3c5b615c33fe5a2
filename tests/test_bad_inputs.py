"""Inputs the handlers do not take pass through to stock PyTorch, with the reason counted;
never a crash, never a different result."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.testing._internal.two_tensor import TwoTensor

from memsave_dispatch import MemSaveMode
from tests.support import assert_bit_identical

W = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(0))


class PlainSubclass(torch.Tensor):
    """A subclass relying on the default ``__torch_function__``."""


def _sparse():
    a = torch.randn(3, 4, generator=torch.Generator().manual_seed(1)).to_sparse().requires_grad_()
    torch.mm(a, torch.randn(4, 2, generator=torch.Generator().manual_seed(2))).sum().backward()
    return a.grad.to_dense()


def _complex():
    x = torch.randn(1, 3, 5, 5, dtype=torch.cfloat, generator=torch.Generator().manual_seed(1)).requires_grad_()
    F.conv2d(x, W.to(torch.cfloat)).abs().sum().backward()
    return x.grad


def _nested():
    parts = [torch.randn(2, 3, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    nested = torch.nested.nested_tensor(parts, requires_grad=True)
    return torch.cat([t for t in F.relu(nested).unbind()])


def _quantized():
    q = torch.quantize_per_tensor(torch.linspace(-1, 1, 12).view(3, 4), 0.1, 10, torch.quint8)
    return F.relu(q).dequantize()


def _meta():
    x = torch.randn(1, 3, 5, 5, device="meta", requires_grad=True)
    out = F.relu(F.conv2d(x, W.to("meta")))
    out.sum().backward()
    return torch.tensor([*out.shape, *x.grad.shape])


def _fake():
    with FakeTensorMode():
        x = torch.randn(1, 3, 5, 5, requires_grad=True)
        out = F.max_pool2d(F.relu(F.conv2d(x, torch.randn(4, 3, 3, 3))), 2)
        out.sum().backward()
        return [*out.shape, *x.grad.shape]


def _wrapper_subclass():
    a = torch.randn(1, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    x = TwoTensor(a, a * 2).requires_grad_()
    F.relu(F.conv2d(x, W)).sum().backward()
    return torch.stack([x.grad.a, x.grad.b])


def _plain_subclass():
    x = torch.randn(1, 3, 5, 5, generator=torch.Generator().manual_seed(1)).as_subclass(PlainSubclass).requires_grad_()
    F.relu(F.conv2d(x, W)).sum().backward()
    return x.grad.as_subclass(torch.Tensor)


CASES = {
    # name: (run, operator, reason the report gives)
    "sparse COO": (_sparse, "aten.mm.default", "layout sparse_coo"),
    "nested": (_nested, "aten.relu.default", "nested tensor"),
    "quantized": (_quantized, "aten.relu.default", "quantized tensor"),
    "meta": (_meta, "aten.convolution.default", "device meta not supported"),
    "FakeTensorMode": (_fake, "aten.convolution.default", "fake tensor"),
    "wrapper subclass (TwoTensor)": (_wrapper_subclass, "aten.convolution.default", "tensor subclass TwoTensor"),
    "plain subclass": (_plain_subclass, "aten.convolution.default", "tensor subclass PlainSubclass"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_unsupported_input_runs_stock_with_the_reason_counted(name):
    run, op, reason = CASES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # prototype/beta/deprecation notices of these features
        expected = run()
        with MemSaveMode() as mode:
            actual = run()
    if isinstance(expected, torch.Tensor):
        assert_bit_identical(actual, expected)
    else:
        assert actual == expected
    op_report = mode.report()[op]
    assert op_report.to_stock.get(reason, 0) >= 1, op_report.to_stock
    assert op_report.handled == 0


def test_complex_convolution_runs_as_real_convolutions_and_matches_stock():
    """Stock computes a complex convolution with three real ones; those are handled."""
    expected = _complex()
    with MemSaveMode() as mode:
        actual = _complex()
    assert_bit_identical(actual, expected)
    assert mode.report()["aten.convolution.default"].handled == 3


@pytest.mark.parametrize("context", ["inference_mode", "no_grad"])
def test_inference_and_no_grad(context):
    x = torch.randn(1, 3, 5, 5, requires_grad=True)
    with MemSaveMode() as mode, getattr(torch, context)():
        out = F.relu(F.conv2d(x, W))
    assert out.grad_fn is None
    assert_bit_identical(out, F.relu(F.conv2d(x, W)).detach())
    if context == "no_grad":
        assert mode.report()["aten.convolution.default"].to_stock == {"grad mode off": 1}
    else:  # inference mode skips the Autograd dispatch keys altogether: not even seen
        assert mode.report().ops == ()
