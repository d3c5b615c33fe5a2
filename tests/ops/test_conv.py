"""aten.convolution: every dimensionality, transposed or not, against stock PyTorch."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.support import DTYPES, compare_with_stock, requires_grad_patterns

FORMATS = {2: torch.channels_last, 3: torch.channels_last_3d}


def _conv_inputs(dims, transposed, dtype, channels_last, pattern, *, groups=1, bias=True, size=7):
    generator = torch.Generator().manual_seed(0)
    in_channels, out_channels = 4, 6
    x = torch.randn(2, in_channels, *(size,) * dims, generator=generator, dtype=torch.float64).to(dtype)
    kernel = (3,) * dims
    if transposed:
        w = torch.randn(in_channels, out_channels // groups, *kernel, generator=generator, dtype=torch.float64)
    else:
        w = torch.randn(out_channels, in_channels // groups, *kernel, generator=generator, dtype=torch.float64)
    w = w.to(dtype)
    b = torch.randn(out_channels, generator=generator, dtype=torch.float64).to(dtype) if bias else None
    if channels_last:
        x = x.contiguous(memory_format=FORMATS[dims])
        w = w.contiguous(memory_format=FORMATS[dims])
    need_x, need_w, need_b = pattern
    return {
        "x": x.requires_grad_(need_x),
        "w": nn.Parameter(w, requires_grad=need_w),
        "b": None if b is None else nn.Parameter(b, requires_grad=need_b),
    }


def _functional(dims, transposed, **options):
    if transposed:
        op = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[dims]
    else:
        op = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    return lambda x, w, b: op(x, w, b, **options)


CORE = [
    (dims, transposed, dtype, channels_last, pattern)
    for dims, transposed, dtype, channels_last, pattern in itertools.product(
        (1, 2, 3), (False, True), DTYPES, (False, True), requires_grad_patterns("xwb")
    )
    if not (channels_last and dims == 1)
]


@pytest.mark.parametrize("dims,transposed,dtype,channels_last,pattern", CORE)
def test_matches_stock_and_keeps_the_minimum(dims, transposed, dtype, channels_last, pattern):
    inputs = _conv_inputs(dims, transposed, dtype, channels_last, pattern)
    stock, mode = compare_with_stock(_functional(dims, transposed), inputs, state=("w", "b"))
    need_x, need_w, _ = pattern
    x = inputs["x"]
    expected = x.numel() * x.element_size() if need_w else 0  # grad_W needs x; nothing else does
    assert mode.saved_bytes == expected
    assert mode.saved_bytes <= stock.saved_bytes


OPTIONS = {
    "stride2": dict(stride=2),
    "padding1": dict(padding=1),
    "dilation2": dict(dilation=2, padding=2),
    "groups2": dict(groups=2),
    "stride2-padding1-dilation2": dict(stride=2, padding=1, dilation=2),
    "same": dict(padding="same"),
    "same-dilated": dict(padding="same", dilation=2),
}


@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize("dims,channels_last", [(1, False), (2, False), (2, True), (3, False), (3, True)])
@pytest.mark.parametrize("pattern", [(True, False, False), (False, True, True), (True, True, False), (False, False, True)])
def test_options(option, dims, pattern, channels_last):
    options = dict(OPTIONS[option])
    groups = options.get("groups", 1)
    inputs = _conv_inputs(dims, False, torch.float32, channels_last, pattern, groups=groups)
    stock, mode = compare_with_stock(_functional(dims, False, **options), inputs, state=("w", "b"))
    assert mode.saved_bytes <= stock.saved_bytes


@pytest.mark.parametrize("dims", (1, 2, 3))
@pytest.mark.parametrize("options", [dict(stride=2, output_padding=1), dict(stride=2, padding=1, dilation=2), dict(groups=2)])
@pytest.mark.parametrize("pattern", [(True, False, False), (False, True, False), (True, True, True)])
def test_transposed_options(dims, options, pattern):
    inputs = _conv_inputs(dims, True, torch.float32, False, pattern, groups=options.get("groups", 1))
    stock, mode = compare_with_stock(_functional(dims, True, **options), inputs, state=("w", "b"))
    assert mode.saved_bytes <= stock.saved_bytes


@pytest.mark.parametrize("bias", (True, False))
@pytest.mark.parametrize("padding_mode", ("zeros", "reflect", "replicate", "circular"))
@pytest.mark.parametrize("frozen", (True, False))
def test_module_padding_modes(bias, padding_mode, frozen):
    """Non-zero padding modes pad in a separate op; the convolution after it stays exact."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, padding_mode=padding_mode, bias=bias)
    conv.requires_grad_(not frozen)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    params = dict(conv.named_parameters())

    def run(x, **parameters):
        return torch.func.functional_call(conv, parameters, (x,))

    inputs = {"x": x, **params}
    stock, mode = compare_with_stock(run, inputs, state=tuple(params))
    assert mode.saved_bytes <= stock.saved_bytes
    if frozen:
        assert mode.saved_bytes < stock.saved_bytes


def test_activation_weight_is_dropped_when_only_weight_grad_is_not_needed():
    """A weight that is an activation (not a parameter) is dropped when x needs no gradient."""
    x = torch.randn(2, 4, 8, 8)
    w = torch.randn(6, 4, 3, 3, requires_grad=True)
    inputs = {"x": x, "w": w}
    stock, mode = compare_with_stock(lambda x, w: F.conv2d(x, w * 2), inputs)
    assert mode.saved_bytes == x.numel() * 4  # grad of (w * 2) needs x only; the product is not kept
    assert stock.saved_bytes == x.numel() * 4 + w.numel() * 4
