"""Ghosts: stand-ins for dropped tensors that backward reads only for their layout.

Backward kernels often take a tensor only for its shape, strides and dtype (the input of a
pooling layer, the input of a convolution when only the input gradient is wanted). A handler
drops such a tensor in forward and hands backward a *ghost*: a tensor with the very same
sizes, strides, dtype and alignment whose memory is never allocated.

Why not a zero-stride ``torch.empty(()).expand(shape)``: measured on CPU, kernels take a
different path for it (channels_last gradients come back contiguous, batch-norm reductions
change order and bits) and several copy it to a full-size buffer (``convolution_backward``
calls ``input.contiguous()``; cuDNN's batch-norm backward refuses a non-contiguous input). A
ghost with the original strides takes the stock path. It views zero memory (:mod:`.zeros`):
on CPU the kernel's zero page, on CUDA one granule mapped along a virtual range, so neither
backward nor the ghost itself allocates or copies a full-size tensor, and making one never
waits for the device.
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import torch
from torch import Tensor

from .zeros import ALIGNMENT, alignment, generation, zero_view

__all__ = ["TensorLayout", "ghost_like"]

_CPU_ALIGNMENT = ALIGNMENT["cpu"]


class TensorLayout(NamedTuple):
    """Everything a backward kernel may read from a tensor except its values."""

    shape: torch.Size
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    phase: int  # data pointer modulo the device's allocator alignment, in elements; -1: no data

    @classmethod
    def of(cls, tensor: Tensor) -> TensorLayout:
        dtype = tensor.dtype
        kind = tensor.__class__
        if kind is Tensor or kind is torch.nn.Parameter:
            align = _CPU_ALIGNMENT if tensor.is_cpu else alignment(tensor.device.type)
            phase = (tensor.data_ptr() % align) // dtype.itemsize
        else:  # tracing tensors (functional, fake) have no address
            phase = -1
        return cls(tensor.shape, tensor.stride(), dtype, tensor.device, phase)

    def ghost(self) -> Tensor:
        return ghost_like(self)


def ghost_like(layout: TensorLayout) -> Tensor:
    """A tensor laid out exactly as ``layout`` whose values are zeros it never allocated.

    Only for reading: backward kernels use it for sizes, strides and dispatch decisions.
    Under tracing (no address to keep the phase of) a zero-stride expand stands in.
    """
    if layout.phase < 0:
        return torch.empty((), dtype=layout.dtype, device=layout.device).expand(layout.shape)
    # Ghosts are never written and autograd wraps what an unpack hook returns in a variable of
    # its own, so one ghost per layout serves every node (a backward pass asks for the same few
    # layouts again and again, and each fresh view costs tens of microseconds there).
    global _ghosts_generation
    current = generation()
    ghost = _ghosts.get(layout) if _ghosts_generation == current else None
    if ghost is None:
        ghost = _new_ghost(layout)
        current = generation()  # (making it may have mapped a larger region)
        if _ghosts_generation != current or len(_ghosts) >= _MAX_GHOSTS:
            _ghosts.clear()  # views of a smaller region go once backward is done with them
            _ghosts_generation = current
        _ghosts[layout] = ghost
    return ghost


def _new_ghost(layout: TensorLayout) -> Tensor:
    itemsize = layout.dtype.itemsize
    align = alignment(layout.device.type)
    # elements spanned: 1 + sum((n - 1) * step), as two C-level sums
    extent = 0 if 0 in layout.shape else 1 + sum(map(operator.mul, layout.shape, layout.stride)) - sum(layout.stride)
    zeros = zero_view(layout.device, layout.dtype, extent * itemsize + align)
    # the original's address modulo the alignment, whatever the region's own alignment
    offset = (layout.phase * itemsize - zeros.data_ptr()) % align // itemsize
    return zeros.as_strided(layout.shape, layout.stride, offset)


_MAX_GHOSTS = 1024
_ghosts: dict[TensorLayout, Tensor] = {}
_ghosts_generation = -1
