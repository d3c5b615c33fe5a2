"""Per-call bookkeeping for the report: plain integers, never references to tensors."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor
from torch._ops import OpOverload
from torch.nn import Parameter

from .interposer import active_modes

__all__ = ["storage_bytes", "stock_and_kept_bytes", "record_handled", "record_stock"]


def storage_bytes(tensors: Iterable[Tensor | None], tracing: bool = False) -> int:
    """Bytes of the distinct storages behind ``tensors``. Parameters (and views of them) do
    not count: they live as long as the model, whatever autograd keeps. While tracing,
    tensors have no storage and count their own size."""
    total = 0
    seen: list[int] = []
    for tensor in tensors:
        if tensor is None:
            continue
        # __class__ before isinstance: Parameter's metaclass makes isinstance slow here.
        kind = tensor.__class__
        if kind is Parameter or (kind is not Tensor and isinstance(tensor, Parameter)):
            continue
        base = tensor._base
        if base is not None and isinstance(base, Parameter):
            continue
        if tracing:
            total += tensor.numel() * tensor.element_size()
            continue
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in seen:
            seen.append(key)
            total += storage.nbytes()
    return total


def stock_and_kept_bytes(stock: list[Tensor], kept: list[Tensor], tracing: bool) -> tuple[int, int]:
    """Both byte counts in one pass when ``kept`` mostly repeats ``stock``."""
    stock_bytes = storage_bytes(stock, tracing)
    if len(kept) == len(stock) and all(a is b for a, b in zip(kept, stock)):
        return stock_bytes, stock_bytes
    return stock_bytes, storage_bytes(kept, tracing)


def _stock_bytes(handler: type, args: tuple, outputs: object, tracing: bool) -> int | None:
    if handler.stock_saved is None:
        return None
    if not isinstance(outputs, tuple):
        outputs = (outputs,)
    return storage_bytes(handler.stock_saved(args, outputs), tracing)


def record_handled(op: OpOverload, handler: type, args: tuple, outputs: object, kept) -> None:
    """A handler ran: count what stock would have kept and what the handler kept."""
    modes = active_modes()
    if not modes:
        return
    tracing = torch.compiler.is_compiling()
    stock = _stock_bytes(handler, args, outputs, tracing)
    kept_bytes = storage_bytes(kept or (), tracing)
    for mode in modes:
        mode._tally(op, handler.family).add_handled(stock, kept_bytes, tracing)


def record_stock(op: OpOverload, family: str, reason: str) -> None:
    """A call was left to stock PyTorch, for ``reason``."""
    for mode in active_modes():
        mode._tally(op, family).add_stock(reason)
