"""Codecs: compact, exact stand-ins for saved tensors, and the bit packing they share.

A codec encodes a tensor when its node would keep it and decodes, in backward, a tensor that
the stock backward kernel reads exactly as it would read the original: the gradients stay
stock's bit for bit.

- :class:`BitMaskCodec`: one yes/no decision per element (ReLU's ``y <= 0``, dropout's noise),
  one bit each.
- :class:`WindowOffsetCodec`: max pooling's argmax indices as offsets inside their pooling
  window, one byte or two bits each.

Encoding and decoding run on the tensor's own device and never read a value back to the host
(no ``.item()``, ``nonzero`` or ``unique`` on it), so on a GPU they never wait for it. What
they look values up in (bit tables, pooling windows) is made once per device: tables with
that device's own kernels, windows on the CPU (pure geometry) and copied over once.
"""

from __future__ import annotations

import collections
import math
import sys
import threading
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from ._compat import is_compiling

__all__ = [
    "Codec",
    "BitMask",
    "BitMaskCodec",
    "two_value_table",
    "PoolingWindows",
    "WindowOffsetCodec",
    "regular_windows",
    "adaptive_windows",
]


class BitMask(NamedTuple):
    """A boolean tensor stored as 1 bit per element (uint8 words), plus its layout.

    Bits follow the mask's memory order, so unpacking restores the exact strides and a
    backward computed from it allocates its output in the same layout as stock.
    """

    shape: torch.Size
    stride: tuple[int, ...]
    numel: int

    @staticmethod
    def pack(mask: Tensor) -> tuple[Tensor, BitMask]:
        """Pack a freshly computed (dense, offset-0) bool tensor into bits. The mask's own
        memory is the scratch space: it is overwritten."""
        numel = mask.numel()
        flat = mask.as_strided((numel,), (1,))
        if numel % 8:
            flat = torch.cat([flat, flat.new_zeros(8 - numel % 8)])
        return _gather_bits(flat.view(torch.int64)), BitMask(mask.shape, mask.stride(), numel)

    def lookup(self, bits: Tensor, table: Tensor) -> Tensor:
        """Every bit through ``table`` (256 x 8, on the bits' device: the eight values of each
        byte pattern), laid out like the packed mask: one gather per byte of bits, no per-bit
        arithmetic.

        Three operator calls: in a training step caches are cold between layers and every call
        costs tens of microseconds, more than a leaner gather would save."""
        values = torch.index_select(table, 0, bits.to(torch.int32))
        return values.as_strided(self.shape, self.stride)  # the padding after numel is ignored

    def unpack(self, bits: Tensor) -> Tensor:
        """The bool mask itself."""
        return self.lookup(bits, two_value_table(torch.bool, False, True, bits.device))

    def bytes(self, bits: Tensor) -> Tensor:
        """Every bit as a 0/1 byte, laid out like the mask."""
        return self.lookup(bits, two_value_table(torch.uint8, 0, 1, bits.device))


def gather_bits_by_shifts(words: Tensor) -> Tensor:
    """uint8 per int64 word of eight 0/1 bytes: byte j's bit becomes bit j."""
    gathered = words >> 7
    gathered |= words
    gathered |= gathered >> 14
    gathered |= gathered >> 28
    return gathered.to(torch.uint8)


def gather_bits_by_multiply(words: Tensor) -> Tensor:
    """Same in fewer passes: one multiply lines the eight bits up in the top byte, shifted
    down and kept. In place (``words`` is scratch). Relies on int64 products wrapping around
    and on little-endian bytes: checked once at import on the CPU; GPUs wrap and are
    little-endian too (``tools/gpu_check.py`` checks it on CUDA)."""
    return words.mul_(0x0102040810204080).bitwise_right_shift_(56).to(torch.uint8)


def byte_patterns(device: torch.device | str = "cpu") -> Tensor:
    """256 x 8 uint8: entry [byte, j] is bit j of ``byte``, made by ``device``'s own kernels
    (no copy from the host)."""
    every_byte = torch.arange(256, device=device)
    return ((every_byte.unsqueeze(1) >> torch.arange(8, device=device)) & 1).to(torch.uint8)


def _pick_gather() -> Callable[[Tensor], Tensor]:
    every_byte = torch.arange(256).to(torch.uint8)
    words = byte_patterns().view(torch.int64).view(-1)
    if sys.byteorder == "little" and torch.equal(gather_bits_by_multiply(words), every_byte):
        return gather_bits_by_multiply
    return gather_bits_by_shifts


_gather_bits = _pick_gather()


class Codec:
    """A compact, exact stand-in for a saved tensor.

    ``encode`` runs when the tensor would be saved and returns the tensors to keep plus
    metadata; ``decode`` runs in backward and returns a tensor that the stock backward
    formula reads exactly as it would read the original.
    """

    name: str = "encoded"
    values_exact: bool = False
    """Whether ``decode`` gives back the original's very values, not only what its backward
    kernel reads (a ReLU mask gives 0/1): only then may a recipe read it (see recipes)."""

    def encode(self, tensor: Tensor) -> tuple[tuple[Tensor, ...], object]:
        raise NotImplementedError

    def decode(self, kept: tuple[Tensor, ...], meta: object) -> Tensor:
        raise NotImplementedError

    def still_valid(self, meta: object) -> bool:
        """Whether the encoding, made when the tensor was unshared, can still be decoded
        (a rebuild whose inputs a backward pass freed meanwhile cannot)."""
        return True

    def commit(self, meta: object) -> None:
        """The encoding replaced the tensor for good (it was unshared)."""

    def describe(self, meta: object) -> str:
        """What the slot holds, for an audit."""
        return self.name


class BitMaskCodec(Codec):
    """For a saved tensor that backward reads through one yes/no decision per element (ReLU's
    ``y <= 0``, leaky ReLU's ``x > 0``, hardtanh's ``min < x < max``): keep the decision, one
    bit per element, and hand backward a stand-in holding ``low`` where the bit is 0 and
    ``high`` where it is 1 -- two values the stock kernel decides on exactly as it did on the
    original.

    ``decide(tensor)`` returns the decision as a fresh bool tensor. The stand-in has the
    original dtype: a narrower one would be fewer bytes, but backward would then mix dtypes,
    which TensorIterator runs through its per-element casting loop (measured on CPU: 4.4 ms
    instead of 0.9 ms to decode and run ReLU's backward over 2M elements with a bfloat16
    stand-in for float32).
    """

    name = "1-bit mask"

    def __init__(self, decide, low: float = 0.0, high: float = 1.0, values_exact: bool = False) -> None:
        self.decide, self.low, self.high, self.values_exact = decide, low, high, values_exact

    def encode(self, tensor: Tensor) -> tuple[tuple[Tensor, ...], object]:
        decided = self.decide(tensor)
        if decided is tensor:  # (a bool tensor's .bool() is itself) packing overwrites it
            decided = decided.clone()
        bits, mask = BitMask.pack(decided)
        return (bits,), (mask, tensor.dtype)

    def decode(self, kept: tuple[Tensor, ...], meta: object) -> Tensor:
        mask, dtype = meta
        bits = kept[0]
        return mask.lookup(bits, two_value_table(dtype, self.low, self.high, bits.device))


def two_value_table(dtype: torch.dtype, low: float, high: float, device: torch.device | str = "cpu") -> Tensor:
    """256 x 8 table on ``device``: entry [byte, j] is ``high`` if bit j of ``byte`` is set, else
    ``low``. Made once per device, by its own kernels; the CPU's 0/1 tables stay for the
    process, others are kept for the most recent ``_TABLES_KEPT`` pairs (bounds such as
    hardtanh's are user values: a long run must not grow a table per value ever seen)."""
    device = torch.device(device)
    key = (*_table_key(dtype, low, high), device)
    table = _PINNED_TABLES.get(key)
    if table is not None:
        return table
    with _TABLES_LOCK:
        table = _RECENT_TABLES.get(key)
        if table is not None:
            _RECENT_TABLES.move_to_end(key)
            return table
    if key == (*_table_key(torch.bool, False, True), device):
        bits = byte_patterns(device).bool()  # the one table the others are made from
    else:
        bits = two_value_table(torch.bool, False, True, device)
    table = torch.full(bits.shape, low, dtype=dtype, device=device).masked_fill_(bits, high)
    if not is_compiling():  # a table made while torch.compile traces is a fake tensor
        with _TABLES_LOCK:
            _RECENT_TABLES[key] = table
            if len(_RECENT_TABLES) > _TABLES_KEPT:
                _RECENT_TABLES.popitem(last=False)
    return table


def _table_key(dtype: torch.dtype, low: float, high: float) -> tuple:
    # -0.0 == 0.0, but a stand-in must hold the very value asked for
    return dtype, low, high, math.copysign(1.0, low), math.copysign(1.0, high)


# The CPU's 0/1 tables are built at import: a table first built while torch.compile traces would
# be a fake tensor. (Encodings are never made while tracing, so the others are built lazily, in
# eager code: other pairs, other devices.)
_PINNED_TABLES: dict[tuple, Tensor] = {}
_RECENT_TABLES: collections.OrderedDict[tuple, Tensor] = collections.OrderedDict()
_TABLES_KEPT = 64
_TABLES_LOCK = threading.Lock()  # backward runs decodes in a thread per device
for _dtype in (torch.bool, torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64):
    two_value_table(_dtype, 0, 1)
_PINNED_TABLES.update(_RECENT_TABLES)
_RECENT_TABLES.clear()
del _dtype


# -- max pooling: argmax indices as window offsets -----------------------------------------
class PoolingWindows(NamedTuple):
    """Where each pooling window starts, and which flat-index steps stay inside a window.

    ``origin[o]``: flat index (into one input plane) of output ``o``'s window corner, negative
    under padding. ``deltas[k]``: the flat-index step to the window's k-th position. An argmax
    index is ``origin + deltas[offset]``; ``offset_of[step - min(deltas)]`` maps a step back to
    its offset, ``origin_shifted`` is ``origin + min(deltas)``.
    """

    origin: Tensor
    deltas: Tensor
    offset_of: Tensor
    origin_shifted: Tensor

    @classmethod
    def of(cls, origin: Tensor, deltas: Tensor) -> PoolingWindows:
        """From CPU tensors (the geometry is decided on the host, once per shape)."""
        low, high = int(deltas.min()), int(deltas.max())
        offset_of = torch.full((high - low + 1,), 255, dtype=torch.uint8)
        offset_of[deltas - low] = torch.arange(len(deltas), dtype=torch.uint8)
        return cls(origin, deltas, offset_of, origin + low)

    def to(self, device: torch.device) -> PoolingWindows:
        """The same windows on ``device``: copied once, without waiting for the device."""
        return PoolingWindows(*(tensor.to(device, non_blocking=True) for tensor in self))


def _plane_strides(sizes: list[int]) -> list[int]:
    strides, step = [], 1
    for size in reversed(sizes):
        strides.append(step)
        step *= size
    return strides[::-1]


def regular_windows(in_sizes, out_sizes, kernel, stride, padding, dilation) -> PoolingWindows | None:
    plane = _plane_strides(in_sizes)
    origin = torch.zeros((), dtype=torch.int64)
    for dim, (out, step, pad, flat) in enumerate(zip(out_sizes, stride, padding, plane)):
        corner = torch.arange(out, dtype=torch.int64) * step - pad
        origin = origin.unsqueeze(-1) + corner * flat
    deltas = torch.zeros((), dtype=torch.int64)
    for size, dil, flat in zip(kernel, dilation, plane):
        deltas = (deltas.unsqueeze(-1) + torch.arange(size, dtype=torch.int64) * dil * flat).flatten()
    return PoolingWindows.of(origin, deltas) if len(torch.unique(deltas)) == len(deltas) <= 255 else None


def adaptive_windows(in_sizes, out_sizes) -> PoolingWindows | None:
    plane = _plane_strides(in_sizes)
    origin = torch.zeros((), dtype=torch.int64)
    deltas = torch.zeros((), dtype=torch.int64)
    for size_in, size_out, flat in zip(in_sizes, out_sizes, plane):
        starts = [(i * size_in) // size_out for i in range(size_out)]
        widest = max(-(-((i + 1) * size_in) // size_out) - start for i, start in enumerate(starts))
        origin = origin.unsqueeze(-1) + torch.tensor(starts, dtype=torch.int64) * flat
        deltas = (deltas.unsqueeze(-1) + torch.arange(widest, dtype=torch.int64) * flat).flatten()
    return PoolingWindows.of(origin, deltas) if len(deltas) <= 255 else None


class WindowOffsetCodec(Codec):
    """Argmax indices of max pooling as offsets inside each pooling window.

    Exact by construction: an index is the window corner plus one of the window's steps, so
    the offset (the step's rank) and the corner rebuild it. Offsets take a byte each, or two
    bits (two 1-bit planes) when the window has at most four positions (2x2 pooling): four
    times smaller for a few more byte-sized passes.
    """

    values_exact = True
    BYTE_NAME = "uint8 window offsets"
    TWO_BIT_NAME = "2-bit window offsets"

    def __init__(self, windows: PoolingWindows) -> None:
        self.windows = windows
        self.two_bits = len(windows.deltas) <= 4
        self.name = self.TWO_BIT_NAME if self.two_bits else self.BYTE_NAME

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
