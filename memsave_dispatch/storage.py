"""The one storage counter: which storage a tensor lives in and how many bytes it spans.

The report, :func:`~memsave_dispatch.audit` and the meter all count bytes through here, so
that they agree. Parameters (and views of them) are not counted: they live as long as the
model, whatever autograd keeps.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor
from torch.nn import Parameter

__all__ = ["storage_key", "storage_bytes", "is_parameter", "view_in_base"]


def is_parameter(tensor: Tensor) -> bool:
    """A parameter or a view of one."""
    # __class__ before isinstance: Parameter's metaclass makes isinstance slow here.
    kind = tensor.__class__
    if kind is Parameter or (kind is not Tensor and isinstance(tensor, Parameter)):
        return True
    base = tensor._base
    return base is not None and isinstance(base, Parameter)


def storage_key(tensor: Tensor, tracing: bool = False) -> tuple[object, int] | None:
    """(storage key, storage bytes) of a tensor; None for a parameter or a tensor without a
    storage (meta, sparse). While tracing, tensors have no storage: each counts its own size
    under its own key."""
    if is_parameter(tensor):
        return None
    if tracing:
        return id(tensor), tensor.numel() * tensor.element_size()
    try:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
    nbytes = storage.nbytes()
    return ((storage.device, pointer), nbytes) if nbytes else None


def storage_bytes(tensors: Iterable[Tensor | None], tracing: bool = False) -> int:
    """Bytes of the distinct storages behind ``tensors``, parameters excluded."""
    sizes: dict[object, int] = {}
    for tensor in tensors:
        if tensor is not None:
            found = storage_key(tensor, tracing)
            if found is not None:
                sizes[found[0]] = found[1]
    return sum(sizes.values())


def view_in_base(tensor: Tensor) -> tuple[Tensor, tuple | None]:
    """(the tensor's base, where in it the tensor lies: sizes, strides, storage offset), or
    (the tensor, None) for a tensor that is not a view."""
    base = tensor._base
    if base is None:
        return tensor, None
    return base, (tensor.shape, tensor.stride(), tensor.storage_offset())
