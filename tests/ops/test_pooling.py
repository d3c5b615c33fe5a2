"""Max and average pooling (1-d via 2-d, 2-d, 3-d, adaptive) against stock PyTorch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memsave_dispatch import MemSaveMode
from memsave_dispatch._compat import BFLOAT16_ADAPTIVE_MAX_POOL2D_INDICES_IN_WINDOW
from tests.support import DTYPES, compare_with_stock

FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}

# name: (dims, pool, positions per window: "what one argmax offset must tell apart")
MAX_POOLS = {
    "max1d": (1, lambda x: F.max_pool1d(x, 3, stride=2), 3),
    "max1d-pad-dil-ceil": (1, lambda x: F.max_pool1d(x, 3, stride=2, padding=1, dilation=2, ceil_mode=True), 3),
    "max2d": (2, lambda x: F.max_pool2d(x, 2), 4),
    "max2d-k3s2p1": (2, lambda x: F.max_pool2d(x, 3, stride=2, padding=1), 9),
    "max2d-dil-ceil": (2, lambda x: F.max_pool2d(x, 3, stride=2, dilation=2, ceil_mode=True), 9),
    "max2d-return-indices": (2, lambda x: F.max_pool2d(x, 2, return_indices=True), None),
    "max3d": (3, lambda x: F.max_pool3d(x, 2), 8),
    "max3d-k3s2p1-ceil": (3, lambda x: F.max_pool3d(x, 3, stride=2, padding=1, ceil_mode=True), 27),
    "adaptive-max1d": (1, lambda x: F.adaptive_max_pool1d(x, 3), 3),  # 7 -> 3: windows of up to 3
    "adaptive-max2d": (2, lambda x: F.adaptive_max_pool2d(x, (3, 2)), 12),  # up to 3 x 4
    "adaptive-max2d-indices": (2, lambda x: F.adaptive_max_pool2d(x, 3, return_indices=True), None),
    "adaptive-max3d": (3, lambda x: F.adaptive_max_pool3d(x, 2), 64),  # up to 4 x 4 x 4
}

AVG_POOLS = {
    "avg1d": (1, lambda x: F.avg_pool1d(x, 3, stride=2)),
    "avg1d-pad-ceil-exclude": (1, lambda x: F.avg_pool1d(x, 3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)),
    "avg2d": (2, lambda x: F.avg_pool2d(x, 2)),
    "avg2d-divisor": (2, lambda x: F.avg_pool2d(x, 3, stride=2, padding=1, divisor_override=5)),
    "avg2d-ceil-exclude": (2, lambda x: F.avg_pool2d(x, 3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)),
    "avg3d": (3, lambda x: F.avg_pool3d(x, 2)),
    "avg3d-pad-divisor": (3, lambda x: F.avg_pool3d(x, 3, stride=2, padding=1, divisor_override=7)),
    "adaptive-avg1d": (1, lambda x: F.adaptive_avg_pool1d(x, 3)),
    "adaptive-avg2d": (2, lambda x: F.adaptive_avg_pool2d(x, (3, 2))),
    "adaptive-avg3d": (3, lambda x: F.adaptive_avg_pool3d(x, 2)),
    "global-avg2d": (2, lambda x: F.adaptive_avg_pool2d(x, 1)),
}


def _input(dims, dtype, channels_last, size=7):
    x = torch.randn(2, 3, *(size,) * dims, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x.to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=FORMATS[x.dim()])
    return x.requires_grad_(True)


def _skip_if_stock_lacks_a_kernel(pool, x):
    """Where stock has no kernel (avg_pool3d in bf16 on CPU), the mode must fail alike."""
    try:
        pool(x.detach())
    except NotImplementedError as stock_error:
        with pytest.raises(NotImplementedError, match=str(stock_error).split(" not implemented")[0]):
            with MemSaveMode():
                pool(x)
        pytest.skip(f"stock: {stock_error}")


def _outputs(run) -> int:
    with torch.no_grad():
        outputs = run()
    out = outputs[0] if isinstance(outputs, tuple) else outputs
    return out.numel()


def _indices_may_leave_their_window(name: str, dtype: torch.dtype) -> bool:
    """torch < 2.11, bfloat16, adaptive 2-d max pooling (1-d runs through it): kept as int64."""
    adaptive_2d = name in ("adaptive-max1d", "adaptive-max2d")
    return adaptive_2d and dtype is torch.bfloat16 and not BFLOAT16_ADAPTIVE_MAX_POOL2D_INDICES_IN_WINDOW


def _layouts(pools):
    """(name, channels_last) pairs; 1-d pools have no channels_last layout."""
    return [(name, cl) for name in sorted(pools) for cl in (False, True) if not (cl and pools[name][0] == 1)]


@pytest.mark.parametrize("name,channels_last", _layouts(MAX_POOLS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_max_pool_keeps_window_offsets(name, dtype, channels_last):
    """The argmax becomes its offset in the window: 2 bits for windows of up to 4 positions,
    a byte otherwise. When the caller asked for the int64 indices (return_indices=True) it
    holds them anyway, and they are kept as they are."""
    dims, pool, positions = MAX_POOLS[name]
    x = _input(dims, dtype, channels_last)
    _skip_if_stock_lacks_a_kernel(pool, x)
    stock, mode = compare_with_stock(pool, {"x": x})
    outputs = _outputs(lambda: pool(x))
    assert stock.saved_bytes == x.numel() * x.element_size() + 8 * outputs
    if positions is None or _indices_may_leave_their_window(name, dtype):
        assert mode.saved_bytes == 8 * outputs
    elif positions <= 4:
        assert mode.saved_bytes == 2 * -(-outputs // 8)
    else:
        assert mode.saved_bytes == outputs


@pytest.mark.parametrize("channels_last", (False, True))
def test_bfloat16_adaptive_max_pool_matches_stock_where_its_indices_leave_the_window(channels_last):
    """torch < 2.11's bfloat16 kernel returns some indices outside their window for this
    geometry (17x17 to 5x5); no offset describes those, so the int64 indices are kept there."""
    pool = lambda x: F.adaptive_max_pool2d(x, 5)
    x = torch.randn(4, 8, 17, 17, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    stock, mode = compare_with_stock(pool, {"x": x.requires_grad_(True)})
    outputs = _outputs(lambda: pool(x))
    assert mode.saved_bytes == (outputs if BFLOAT16_ADAPTIVE_MAX_POOL2D_INDICES_IN_WINDOW else 8 * outputs)


@pytest.mark.parametrize("seed", range(40))
def test_window_offsets_rebuild_every_index(seed):
    """Random geometries, -inf and NaN included: decoded indices equal stock's int64 ones."""
    from memsave_dispatch.ops.pooling import MaxPool2d, MaxPool3d, WindowOffsetCodec

    generator = torch.Generator().manual_seed(seed)
    pick = lambda low, high: int(torch.randint(low, high + 1, (), generator=generator))
    dims = 2 + seed % 2
    kernel = [pick(1, 4) for _ in range(dims)]  # windows of 1 to 64 positions: both encodings
    dilation = [pick(1, 3) for _ in range(dims)]
    stride = [pick(1, 3) for _ in range(dims)]
    padding = [pick(0, k // 2) for k in kernel]
    sizes = [pick((k - 1) * d + 1, 12) for k, d in zip(kernel, dilation)]
    x = torch.randn(2, 3, *sizes, generator=generator)
    x.view(-1)[:: pick(3, 7)] = float("-inf")
    x.view(-1)[1 :: pick(5, 11)] = float("nan")
    ceil_mode = bool(seed % 3 == 0)
    op = torch.ops.aten.max_pool3d_with_indices if dims == 3 else torch.ops.aten.max_pool2d_with_indices
    args = (x, kernel, stride, padding, dilation, ceil_mode)
    out, indices = op(*args)
    handler = MaxPool3d if dims == 3 else MaxPool2d
    windows = handler.windows(args, sizes, list(indices.shape[-dims:]))
    assert windows is not None
    codec = WindowOffsetCodec(windows)
    kept, meta = codec.encode(indices)
    kept_bytes = sum(t.numel() for t in kept if t.dtype == torch.uint8)
    positions = len(windows.deltas)
    assert kept_bytes == (2 * -(-indices.numel() // 8) if positions <= 4 else indices.numel())
    assert torch.equal(codec.decode(kept, meta), indices)


@pytest.mark.parametrize("name,channels_last", _layouts(AVG_POOLS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_avg_pool_keeps_nothing(name, dtype, channels_last):
    dims, pool = AVG_POOLS[name]
    x = _input(dims, dtype, channels_last)
    _skip_if_stock_lacks_a_kernel(pool, x)
    stock, mode = compare_with_stock(pool, {"x": x})
    assert mode.saved_bytes == 0
    assert mode.saved_bytes <= stock.saved_bytes


def test_max_pool_on_a_non_contiguous_view():
    base = torch.randn(2, 3, 9, 12, requires_grad=True)
    stock, mode = compare_with_stock(lambda base: F.max_pool2d(base[:, :, 1:, ::2], 2), {"base": base})
    assert mode.saved_bytes < stock.saved_bytes
