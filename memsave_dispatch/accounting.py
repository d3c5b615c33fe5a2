"""Per-call bookkeeping for the report: plain integers, never references to tensors."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor
from torch._ops import OpOverload
from torch.nn import Parameter

from ._compat import is_compiling
from .interposer import active_modes

__all__ = ["storage_of", "storage_bytes", "record_handled", "record_stock"]


def storage_of(tensor: Tensor, tracing: bool) -> tuple[int, int] | None:
    """(storage address, storage bytes) of a tensor; None for a parameter or a view of one
    (they live as long as the model, whatever autograd keeps). While tracing, tensors have no
    storage: each counts its own size under its own key."""
    # __class__ before isinstance: Parameter's metaclass makes isinstance slow here.
    kind = tensor.__class__
    if kind is Parameter or (kind is not Tensor and isinstance(tensor, Parameter)):
        return None
    base = tensor._base
    if base is not None and base.__class__ is Parameter:
        return None
    if tracing:
        return id(tensor), tensor.numel() * tensor.element_size()
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def storage_bytes(tensors: Iterable[Tensor | None], tracing: bool = False) -> int:
    """Bytes of the distinct storages behind ``tensors``, parameters excluded."""
    sizes: dict[int, int] = {}
    for tensor in tensors:
        if tensor is not None:
            found = storage_of(tensor, tracing)
            if found is not None:
                sizes[found[0]] = found[1]
    return sum(sizes.values())


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
    tracing = is_compiling()
    stock = _stock_bytes(handler, args, outputs, tracing)
    kept_bytes = storage_bytes(kept or (), tracing)
    for mode in modes:
        mode._tally(op, handler.family).add_handled(stock, kept_bytes, tracing)


def record_stock(op: OpOverload, family: str, reason: str) -> None:
    """A call was left to stock PyTorch, for ``reason``."""
    for mode in active_modes():
        mode._tally(op, family).add_stock(reason)
