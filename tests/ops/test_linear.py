"""addmm / mm (nn.Linear): stock already keeps the minimum; handled, counted, unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memsave_dispatch import MemSaveMode
from tests.support import DTYPES, compare_with_stock, requires_grad_patterns


@pytest.mark.parametrize("shape", [(5, 4), (2, 3, 4), (2, 2, 3, 4)], ids=["2d", "3d", "4d"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "bias,pattern",
    [(bias, pattern) for bias in (True, False) for pattern in requires_grad_patterns("xwb") if bias or pattern[0] or pattern[1]],
)
def test_linear_matches_stock_and_keeps_the_same(shape, bias, dtype, pattern):
    need_x, need_w, need_b = pattern
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype).requires_grad_(need_x)
    w = nn.Parameter(torch.randn(3, 4, generator=generator, dtype=torch.float64).to(dtype), requires_grad=need_w)
    b = nn.Parameter(torch.randn(3, generator=generator, dtype=torch.float64).to(dtype), requires_grad=need_b) if bias else None
    stock, mode = compare_with_stock(lambda x, w, b: F.linear(x, w, b), {"x": x, "w": w, "b": b}, state=("w", "b"))
    assert mode.saved_bytes == stock.saved_bytes
    expected = x.numel() * x.element_size() if need_w else 0
    assert mode.saved_bytes == expected


@pytest.mark.parametrize("frozen", (True, False))
def test_linear_keeps_stock_grad_fn_and_is_counted(frozen):
    layer = nn.Linear(4, 3).requires_grad_(not frozen)
    x = torch.randn(5, 4, requires_grad=True)
    stock_fn = type(layer(x).grad_fn)
    with MemSaveMode() as mode:
        out = layer(x)
    assert type(out.grad_fn) is stock_fn
    line = mode.report()["aten.addmm.default"]
    assert line.handled == 1 and not line.to_stock
    # frozen: nothing keeps the input; trainable: grad_W needs x, kept as stock keeps it (x
    # has no recipe: it is a leaf)
    assert line.stock_bytes == line.kept_bytes == (0 if frozen else x.numel() * 4)
