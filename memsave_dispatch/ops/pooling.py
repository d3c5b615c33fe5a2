"""Pooling. ``F.max_pool1d``/``F.avg_pool1d`` and the adaptive 1-d forms route through the
2-d operators (unsqueeze, pool, squeeze), so the 2-d handlers cover them.

Backward of every pooling operator reads the input only for its layout: max pooling scatters
the gradient through the argmax indices, average pooling spreads it evenly. Stock keeps the
input anyway, and max pooling's indices as int64 (8 bytes per output). Here max pooling keeps
each argmax as its offset inside the pooling window, one byte, and rebuilds the int64 indices
in backward; average pooling keeps nothing.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor

from .._compat import BFLOAT16_ADAPTIVE_MAX_POOL2D_INDICES_IN_WINDOW
from ..interposer import caller_holds_outputs
from ..policy import DROP, KEEP, Encode, Saved, encodings_enabled, its_input
from ..registry import SavingPolicy, register_handler
from ..saving import BitMask, Codec

aten = torch.ops.aten


class _Windows:
    """Where each pooling window starts, and which flat-index steps stay inside a window.

    ``origin[o]``: flat index (into one input plane) of output ``o``'s window corner, negative
    under padding. ``deltas[k]``: the flat-index step to the window's k-th position. An argmax
    index is ``origin + deltas[offset]``; ``offset_of`` maps a step back to its offset.
    """

    def __init__(self, origin: Tensor, deltas: Tensor) -> None:
        self.origin = origin
        self.deltas = deltas
        low, high = int(deltas.min()), int(deltas.max())
        self.low = low
        offset_of = torch.full((high - low + 1,), 255, dtype=torch.uint8)
        offset_of[deltas - low] = torch.arange(len(deltas), dtype=torch.uint8)
        self.offset_of = offset_of
        self.origin_shifted = origin + low


def _plane_strides(sizes: list[int]) -> list[int]:
    strides, step = [], 1
    for size in reversed(sizes):
        strides.append(step)
        step *= size
    return strides[::-1]


def _regular_windows(in_sizes, out_sizes, kernel, stride, padding, dilation) -> _Windows | None:
    plane = _plane_strides(in_sizes)
    origin = torch.zeros((), dtype=torch.int64)
    for dim, (out, step, pad, flat) in enumerate(zip(out_sizes, stride, padding, plane)):
        corner = torch.arange(out, dtype=torch.int64) * step - pad
        origin = origin.unsqueeze(-1) + corner * flat
    deltas = torch.zeros((), dtype=torch.int64)
    for size, dil, flat in zip(kernel, dilation, plane):
        deltas = (deltas.unsqueeze(-1) + torch.arange(size, dtype=torch.int64) * dil * flat).flatten()
    return _Windows(origin, deltas) if len(torch.unique(deltas)) == len(deltas) <= 255 else None


def _adaptive_windows(in_sizes, out_sizes) -> _Windows | None:
    plane = _plane_strides(in_sizes)
    origin = torch.zeros((), dtype=torch.int64)
    deltas = torch.zeros((), dtype=torch.int64)
    for size_in, size_out, flat in zip(in_sizes, out_sizes, plane):
        starts = [(i * size_in) // size_out for i in range(size_out)]
        widest = max(-(-((i + 1) * size_in) // size_out) - start for i, start in enumerate(starts))
        origin = origin.unsqueeze(-1) + torch.tensor(starts, dtype=torch.int64) * flat
        deltas = (deltas.unsqueeze(-1) + torch.arange(widest, dtype=torch.int64) * flat).flatten()
    return _Windows(origin, deltas) if len(deltas) <= 255 else None


class WindowOffsetCodec(Codec):
    """Argmax indices of max pooling as offsets inside each pooling window.

    Exact by construction: an index is the window corner plus one of the window's steps, so
    the offset (the step's rank) and the corner rebuild it. Offsets take a byte each, or two
    bits (two 1-bit planes) when the window has at most four positions (2x2 pooling): four
    times smaller for a few more byte-sized passes.
    """

    def __init__(self, windows: _Windows) -> None:
        self.windows = windows
        self.two_bits = len(windows.deltas) <= 4
        self.name = "2-bit window offsets" if self.two_bits else "uint8 window offsets"

    def encode(self, indices: Tensor) -> tuple[tuple[Tensor, ...], object]:
        windows = self.windows
        steps = indices - windows.origin_shifted  # fresh and dense: flat in memory order
        numel = steps.numel()
        offsets = torch.index_select(windows.offset_of, 0, steps.as_strided((numel,), (1,)))
        layout = (steps.shape, steps.stride())
        if not self.two_bits:
            return (offsets,), layout
        low, low_mask = BitMask.pack((offsets & 1).view(torch.bool))
        high, _ = BitMask.pack((offsets >> 1).view(torch.bool))
        return (low, high), (layout, low_mask)

    def decode(self, kept: tuple[Tensor, ...], meta: object) -> Tensor:
        if self.two_bits:
            (shape, stride), mask = meta
            low, high = (mask.bytes(bits) for bits in kept)
            offsets = low.bitwise_or_(high.bitwise_left_shift_(1))
        else:
            (shape, stride), offsets = meta, kept[0]
        steps = torch.index_select(self.windows.deltas, 0, offsets.to(torch.int32))
        return steps.as_strided(shape, stride).add_(self.windows.origin)



_WINDOWS_CACHE: OrderedDict = OrderedDict()


def _cached_windows(key, build) -> _Windows | None:
    windows = _WINDOWS_CACHE.get(key)
    if windows is None and key not in _WINDOWS_CACHE:
        windows = build()
        _WINDOWS_CACHE[key] = windows
        if len(_WINDOWS_CACHE) > 256:
            _WINDOWS_CACHE.popitem(last=False)
    return windows


def _expand(values, dims: int) -> list[int]:
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    return values * dims if len(values) == 1 else values


class _MaxPool(SavingPolicy):
    """(out, indices) = maxpool(x): grad_x = scatter(grad, indices); x is never read.

    The indices stay int64 when the caller holds them too (``return_indices=True``): encoding
    them would only add a second copy.
    """

    family = "pooling"
    dims: int

    @classmethod
    def windows(cls, args, in_sizes: list[int], out_sizes: list[int]) -> _Windows | None:
        raise NotImplementedError

    @classmethod
    def saved(cls, args, outputs):
        input, indices = args[0], outputs[1]
        windows = None
        if encodings_enabled() and not caller_holds_outputs() and indices.numel() > 0:
            windows = cls.windows(args, list(input.shape[-cls.dims :]), list(indices.shape[-cls.dims :]))
        decision = KEEP if windows is None else Encode(WindowOffsetCodec(windows))
        return {"self": Saved(input, DROP), "result1": Saved(indices, decision)}

    released = staticmethod(its_input)


class _RegularMaxPool(_MaxPool):
    @classmethod
    def windows(cls, args, in_sizes, out_sizes):
        _input, kernel_size, stride, padding, dilation = args[:5]
        kernel = _expand(kernel_size, cls.dims)
        stride = _expand(stride, cls.dims) if stride else kernel
        padding, dilation = _expand(padding, cls.dims), _expand(dilation, cls.dims)
        key = ("max", tuple(in_sizes), tuple(out_sizes), tuple(kernel), tuple(stride), tuple(padding), tuple(dilation))
        return _cached_windows(key, lambda: _regular_windows(in_sizes, out_sizes, kernel, stride, padding, dilation))


@register_handler(aten.max_pool2d_with_indices.default)
class MaxPool2d(_RegularMaxPool):
    dims = 2


@register_handler(aten.max_pool3d_with_indices.default)
class MaxPool3d(_RegularMaxPool):
    dims = 3


class _AdaptiveMaxPool(_MaxPool):
    @classmethod
    def windows(cls, args, in_sizes, out_sizes):
        return _cached_windows(("adaptive", tuple(in_sizes), tuple(out_sizes)), lambda: _adaptive_windows(in_sizes, out_sizes))


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

    @staticmethod
    def saved(args, outputs):
        return {"self": Saved(args[0], DROP)}

    released = staticmethod(its_input)


@register_handler(aten.mean.dim)
class GlobalAveragePool(SavingPolicy):
    """``nn.AdaptiveAvgPool2d(1)`` and ``x.mean(dims)``: stock keeps only sizes. Handled so
    that a deferred encoding of the input (a ReLU output) happens: nothing keeps it here."""

    family = "pooling"

    @staticmethod
    def saved(args, outputs):
        return {}

    released = staticmethod(its_input)
