"""Building blocks for handlers: keep-or-ghost saving and 1-bit masks.

Backward kernels often take a tensor only for its shape, strides and dtype (the input of a
pooling layer, the input of a convolution when only the input gradient is wanted). A handler
drops such a tensor in forward and hands backward a *ghost*: a tensor with the very same
sizes, strides, dtype and alignment whose memory is never allocated.

Why not a zero-stride ``torch.empty(()).expand(shape)``: measured on CPU, kernels take a
different path for it (channels_last gradients come back contiguous, batch-norm reductions
change order and bits) and several copy it to a full-size buffer (``convolution_backward``
calls ``input.contiguous()``). A ghost with the original strides takes the stock path, and on
CPU it views a private anonymous mapping that is only ever read, so every page is the
kernel's shared zero page: no physical memory, no allocator traffic.
"""

from __future__ import annotations

import math
import mmap
import operator
import threading
import sys
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "TensorLayout",
    "BitMask",
    "Codec",
    "BitMaskCodec",
    "two_value_table",
    "save_needed",
    "load_saved",
    "ghost_like",
]

_ALIGNMENT = 64  # bytes; CPU allocations are 64-byte aligned, ghosts keep the same phase


class _ZeroPages:
    """One growing anonymous mapping, only ever read, shared by all CPU ghosts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nbytes = 0
        self._views: dict[torch.dtype, Tensor] = {}

    def view(self, dtype: torch.dtype, nbytes: int) -> Tensor:
        """A 1-d ``dtype`` view of at least ``nbytes`` zero bytes."""
        if nbytes > self._nbytes:
            self._grow(nbytes)
        view = self._views.get(dtype)
        if view is None:
            view = self._views.setdefault(dtype, self._views[torch.uint8].view(dtype))
        return view

    def _grow(self, nbytes: int) -> None:
        with self._lock:
            if nbytes <= self._nbytes:
                return
            size = max(1 << 20, 1 << (nbytes - 1).bit_length())
            pages = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            # Older regions live on while ghosts still view them.
            self._views = {torch.uint8: torch.frombuffer(pages, dtype=torch.uint8)}
            self._nbytes = size


_zero_pages = _ZeroPages()


class TensorLayout(NamedTuple):
    """Everything a backward kernel may read from a tensor except its values."""

    shape: torch.Size
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    phase: int  # data pointer modulo the allocator alignment, in elements; -1: no data

    @classmethod
    def of(cls, tensor: Tensor) -> TensorLayout:
        dtype = tensor.dtype
        kind = tensor.__class__
        if kind is Tensor or kind is torch.nn.Parameter:
            phase = (tensor.data_ptr() % _ALIGNMENT) // dtype.itemsize
        else:  # tracing tensors (functional, fake) have no address
            phase = -1
        return cls(tensor.shape, tensor.stride(), dtype, tensor.device, phase)

    def ghost(self) -> Tensor:
        return ghost_like(self)


def ghost_like(layout: TensorLayout) -> Tensor:
    """A tensor laid out exactly as ``layout`` whose values are zeros it never allocated.

    Only for reading: backward kernels use it for sizes, strides and dispatch decisions.
    Off CPU (and under tracing) a zero-stride expand stands in; those backends are not
    verified bit-exact yet.
    """
    if layout.phase < 0 or layout.device.type != "cpu":
        return torch.empty((), dtype=layout.dtype, device=layout.device).expand(layout.shape)
    # Ghosts are never written and autograd wraps what an unpack hook returns in a variable of
    # its own, so one ghost per layout serves every node (a backward pass asks for the same few
    # layouts again and again, and each fresh view costs tens of microseconds there).
    ghost = _ghosts.get(layout)
    if ghost is None:
        # elements spanned: 1 + sum((n - 1) * step), as two C-level sums
        extent = 0 if 0 in layout.shape else 1 + sum(map(operator.mul, layout.shape, layout.stride)) - sum(layout.stride)
        nbytes = (layout.phase + extent) * layout.dtype.itemsize + _ALIGNMENT
        zeros = _zero_pages.view(layout.dtype, nbytes)
        ghost = zeros.as_strided(layout.shape, layout.stride, layout.phase)
        if len(_ghosts) >= _MAX_GHOSTS:
            _ghosts.clear()
        _ghosts[layout] = ghost
    return ghost


_MAX_GHOSTS = 1024
_ghosts: dict[TensorLayout, Tensor] = {}


def save_needed(ctx, *candidates: tuple[Tensor | None, bool]) -> None:
    """Save each tensor whose flag is true; remember only the layout of the others.

    Everything kept goes through ``ctx.save_for_backward`` so that saved-tensor hooks,
    ``save_on_cpu`` and in-place version checks see it.
    """
    ctx.save_for_backward(*(tensor if keep else None for tensor, keep in candidates))
    ctx.ghost_layouts = tuple(
        TensorLayout.of(tensor) if tensor is not None and not keep else None
        for tensor, keep in candidates
    )


def load_saved(ctx) -> tuple[Tensor | None, ...]:
    """The tensors given to :func:`save_needed`, with ghosts for the ones it dropped."""
    return tuple(
        layout.ghost() if layout is not None else tensor
        for tensor, layout in zip(ctx.saved_tensors, ctx.ghost_layouts)
    )


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
        """Every bit through ``table`` (256 x 8: the eight values of each byte pattern), laid
        out like the packed mask: one gather per byte of bits, no per-bit arithmetic.

        Three operator calls: in a training step caches are cold between layers and every call
        costs tens of microseconds, more than a leaner gather would save."""
        values = torch.index_select(table, 0, bits.to(torch.int32))
        return values.as_strided(self.shape, self.stride)  # the padding after numel is ignored

    def unpack(self, bits: Tensor) -> Tensor:
        """The bool mask itself."""
        return self.lookup(bits, _BIT_VALUES[torch.bool])

    def bytes(self, bits: Tensor) -> Tensor:
        """Every bit as a 0/1 byte, laid out like the mask."""
        return self.lookup(bits, _BIT_VALUES[torch.uint8])


def _gather_bits_by_shifts(words: Tensor) -> Tensor:
    """uint8 per int64 word of eight 0/1 bytes: byte j's bit becomes bit j."""
    gathered = words >> 7
    gathered |= words
    gathered |= gathered >> 14
    gathered |= gathered >> 28
    return gathered.to(torch.uint8)


def _gather_bits_by_multiply(words: Tensor) -> Tensor:
    """Same in fewer passes: one multiply lines the eight bits up in the top byte, shifted
    down and kept. In place (``words`` is scratch). Relies on int64 products wrapping around
    and on the byte order; both are checked once at import."""
    return words.mul_(0x0102040810204080).bitwise_right_shift_(56).to(torch.uint8)


def _byte_patterns() -> Tensor:
    """256 x 8 uint8: entry [byte, j] is bit j of ``byte``."""
    return torch.tensor([[(byte >> j) & 1 for j in range(8)] for byte in range(256)], dtype=torch.uint8)


def _pick_gather() -> Callable[[Tensor], Tensor]:
    every_byte = torch.arange(256).to(torch.uint8)
    words = _byte_patterns().view(torch.int64).view(-1)
    if sys.byteorder == "little" and torch.equal(_gather_bits_by_multiply(words), every_byte):
        return _gather_bits_by_multiply
    return _gather_bits_by_shifts


def _bit_values(dtype: torch.dtype) -> Tensor:
    """256 x 8 table: entry [byte, j] is 1 if bit j of ``byte`` is set, else 0, in ``dtype``."""
    return _byte_patterns().to(dtype)


# Built at import: a table first built while torch.compile traces would be a fake tensor.
_BIT_VALUES = {
    dtype: _bit_values(dtype)
    for dtype in (torch.bool, torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64)
}
_gather_bits = _pick_gather()


class Codec:
    """A compact, exact stand-in for a saved tensor.

    ``encode`` runs when the tensor would be saved and returns the tensors to keep plus
    metadata; ``decode`` runs in backward and returns a tensor that the stock backward
    formula reads exactly as it would read the original.
    """

    name: str = "encoded"

    def encode(self, tensor: Tensor) -> tuple[tuple[Tensor, ...], object]:
        raise NotImplementedError

    def decode(self, kept: tuple[Tensor, ...], meta: object) -> Tensor:
        raise NotImplementedError


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

    def __init__(self, decide, low: float = 0.0, high: float = 1.0) -> None:
        self.decide, self.low, self.high = decide, low, high

    def encode(self, tensor: Tensor) -> tuple[tuple[Tensor, ...], object]:
        decided = self.decide(tensor)
        if decided is tensor:  # (a bool tensor's .bool() is itself) packing overwrites it
            decided = decided.clone()
        bits, mask = BitMask.pack(decided)
        return (bits,), (mask, tensor.dtype)

    def decode(self, kept: tuple[Tensor, ...], meta: object) -> Tensor:
        mask, dtype = meta
        return mask.lookup(kept[0], two_value_table(dtype, self.low, self.high))


def two_value_table(dtype: torch.dtype, low: float, high: float) -> Tensor:
    """256 x 8 table: entry [byte, j] is ``high`` if bit j of ``byte`` is set, else ``low``."""
    key = _table_key(dtype, low, high)
    table = _TWO_VALUE_TABLES.get(key)
    if table is None:
        bits = _BIT_VALUES[torch.bool]
        table = torch.where(bits, torch.tensor(high, dtype=dtype), torch.tensor(low, dtype=dtype))
        _TWO_VALUE_TABLES[key] = table
    return table


def _table_key(dtype: torch.dtype, low: float, high: float) -> tuple:
    # -0.0 == 0.0, but a stand-in must hold the very value asked for
    return dtype, low, high, math.copysign(1.0, low), math.copysign(1.0, high)


# Built at import for the common pairs: a table first built while torch.compile traces would be
# a fake tensor (encodings are not made while tracing, so the others are safe to build lazily).
_TWO_VALUE_TABLES: dict[tuple, Tensor] = {_table_key(dtype, 0.0, 1.0): table for dtype, table in _BIT_VALUES.items()}
