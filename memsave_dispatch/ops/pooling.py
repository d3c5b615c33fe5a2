"""Pooling. ``F.max_pool1d``/``F.avg_pool1d`` and the adaptive 1-d forms route through the
2-d operators (unsqueeze, pool, squeeze), so the 2-d handlers cover them.

Backward of every pooling operator reads the input only for its layout: max pooling scatters
the gradient through the argmax indices, average pooling spreads it evenly. Stock keeps the
input anyway, and max pooling's indices as int64 (8 bytes per output). Here max pooling keeps
each argmax as its offset inside the pooling window, one byte, and rebuilds the int64 indices
in backward; average pooling keeps nothing.

CUDA's kernels (NCHW and channels-last alike) use the CPU's index format, a flat index into
one input plane, and start each argmax at a position inside its window. (``F.adaptive_avg_pool2d``
to 1x1 is a ``mean``, on both devices: no pooling operator is called.)
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from .._compat import BFLOAT16_ADAPTIVE_MAX_POOL2D_INDICES_IN_WINDOW, nn_function
from ..codecs import PoolingWindows, WindowOffsetCodec, adaptive_windows, regular_windows
from ..handlers import (
    CPU_AND_CUDA,
    DROP,
    KEEP,
    Encode,
    EncodeWhenUnshared,
    OutputsToCaller,
    Saved,
    SavingPolicy,
    caller_keeps_outputs,
    encodings_enabled,
    register_handler,
)

aten = torch.ops.aten


_WINDOWS_CACHE: OrderedDict = OrderedDict()


def _cached_windows(key, device: torch.device, build) -> PoolingWindows | None:
    """The windows of one pooling geometry on ``device``: built on the CPU (host decisions
    over pure geometry) and copied to another device once, never per call."""
    key = (*key, device)
    windows = _WINDOWS_CACHE.get(key)
    if windows is None and key not in _WINDOWS_CACHE:
        windows = build()
        if windows is not None and device.type != "cpu":
            windows = windows.to(device)
        _WINDOWS_CACHE[key] = windows
        if len(_WINDOWS_CACHE) > 256:
            _WINDOWS_CACHE.popitem(last=False)
    return windows


def _expand(values, dims: int) -> list[int]:
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    return values * dims if len(values) == 1 else values


class _MaxPool(SavingPolicy):
    """(out, indices) = maxpool(x): grad_x = scatter(grad, indices); x is never read.

    Where the caller gets the indices too (``return_indices=True``), they stay int64 while
    the caller holds them: encoding them would only add a second copy. Otherwise they are
    encoded at once (inside a composite, a view of them may outlive them for a moment).
    """

    family = "pooling"
    devices = CPU_AND_CUDA
    dims: int
    outputs_to_caller = OutputsToCaller(
        frozenset(
            {
                nn_function("max_pool2d_with_indices"),
                nn_function("max_pool3d_with_indices"),
                nn_function("adaptive_max_pool2d"),
                nn_function("adaptive_max_pool3d"),
                torch.max_pool1d_with_indices,
                torch.adaptive_max_pool1d,
            }
        ),
        when="return_indices",
    )

    @classmethod
    def windows(cls, args, in_sizes: list[int], out_sizes: list[int]) -> PoolingWindows | None:
        raise NotImplementedError

    @classmethod
    def saved(cls, args, outputs):
        input, indices = args[0], outputs[1]
        windows = None
        if encodings_enabled() and indices.numel() > 0:
            windows = cls.windows(args, list(input.shape[-cls.dims :]), list(indices.shape[-cls.dims :]))
        if windows is None:
            decision = KEEP
        elif caller_keeps_outputs():
            decision = EncodeWhenUnshared(WindowOffsetCodec(windows))  # once the caller lets go
        else:
            decision = Encode(WindowOffsetCodec(windows))
        return {"self": Saved(input, DROP), "result1": Saved(indices, decision)}


class _RegularMaxPool(_MaxPool):
    @classmethod
    def windows(cls, args, in_sizes, out_sizes):
        _input, kernel_size, stride, padding, dilation = args[:5]
        kernel = _expand(kernel_size, cls.dims)
        stride = _expand(stride, cls.dims) if stride else kernel
        padding, dilation = _expand(padding, cls.dims), _expand(dilation, cls.dims)
        key = ("max", tuple(in_sizes), tuple(out_sizes), tuple(kernel), tuple(stride), tuple(padding), tuple(dilation))
        return _cached_windows(
            key, args[0].device, lambda: regular_windows(in_sizes, out_sizes, kernel, stride, padding, dilation)
        )


@register_handler(aten.max_pool2d_with_indices.default)
class MaxPool2d(_RegularMaxPool):
    dims = 2


@register_handler(aten.max_pool3d_with_indices.default)
class MaxPool3d(_RegularMaxPool):
    dims = 3


class _AdaptiveMaxPool(_MaxPool):
    @classmethod
    def windows(cls, args, in_sizes, out_sizes):
        key = ("adaptive", tuple(in_sizes), tuple(out_sizes))
        return _cached_windows(key, args[0].device, lambda: adaptive_windows(in_sizes, out_sizes))


@register_handler(aten.adaptive_max_pool2d.default)
class AdaptiveMaxPool2d(_AdaptiveMaxPool):
    """Where stock's bfloat16 kernel may return an index outside its window (torch < 2.11),
    no offset can describe it: the indices are kept as stock keeps them."""

    dims = 2

    @classmethod
    def windows(cls, args, in_sizes, out_sizes):
        if args[0].dtype is torch.bfloat16 and not BFLOAT16_ADAPTIVE_MAX_POOL2D_INDICES_IN_WINDOW:
            return None
        return super().windows(args, in_sizes, out_sizes)


@register_handler(aten.adaptive_max_pool3d.default)
class AdaptiveMaxPool3d(_AdaptiveMaxPool):
    dims = 3


@register_handler(
    aten.avg_pool2d.default,
    aten.avg_pool3d.default,
    aten._adaptive_avg_pool2d.default,
    aten._adaptive_avg_pool3d.default,
)
class AvgPool(SavingPolicy):
    """out = avgpool(x): grad_x spreads grad evenly over each window; x is never read."""

    family = "pooling"
    devices = CPU_AND_CUDA

    @staticmethod
    def saved(args, outputs):
        return {"self": Saved(args[0], DROP)}
