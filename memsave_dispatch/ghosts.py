"""Ghosts: stand-ins for dropped tensors that backward reads only for their layout.

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

import mmap
import operator
import threading
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["TensorLayout", "ghost_like"]

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
