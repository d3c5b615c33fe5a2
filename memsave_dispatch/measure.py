"""Measure what autograd keeps for backward, instead of inferring it from code.

:class:`SavedTensorMeter` installs ``saved_tensors_hooks`` around a forward pass and counts
the distinct storages that the graph still holds when the pass ends (a tensor saved by a
node that was later discarded does not count), minus the storages of excluded tensors
(the model's parameters and buffers: they live as long as the model anyway).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["SavedTensorMeter", "saved_tensor_bytes"]


class _Packed:
    """What the pack hook hands autograd: a detached alias, so outputs saved by their own
    node do not form a reference cycle through grad_fn."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor


def _excluded_storages(exclude: nn.Module | Iterable[Tensor] | None) -> set[int]:
    if exclude is None:
        return set()
    if isinstance(exclude, nn.Module):
        tensors: Iterable[Tensor] = [*exclude.parameters(), *exclude.buffers()]
    else:
        tensors = exclude
    return {t.untyped_storage().data_ptr() for t in tensors}


class SavedTensorMeter:
    """Context manager: bytes kept for backward by the graph built inside it.

    >>> with SavedTensorMeter(exclude=model) as meter:
    ...     loss = model(x).sum()
    >>> meter.bytes  # distinct storages held by the graph at exit, model state excluded
    """

    def __init__(self, exclude: nn.Module | Iterable[Tensor] | None = None) -> None:
        self._exclude = _excluded_storages(exclude)
        self._packed: weakref.WeakSet[_Packed] = weakref.WeakSet()
        self._hooks: Any = None
        self.bytes = 0
        self.tensors = 0

    def _pack(self, tensor: Tensor) -> _Packed:
        packed = _Packed(tensor.detach())
        self._packed.add(packed)
        return packed

    @staticmethod
    def _unpack(packed: _Packed) -> Tensor:
        return packed.tensor

    def __enter__(self) -> SavedTensorMeter:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self._hooks.__exit__(*exc_info)
        self.measure()

    def measure(self) -> int:
        """Recount from the tensors still held (call again after parts of the graph died)."""
        storages: dict[int, int] = {}
        alive = list(self._packed)
        for packed in alive:
            storage = packed.tensor.untyped_storage()
            key = storage.data_ptr()
            if key not in self._exclude:
                storages[key] = storage.nbytes()
        self.tensors = len(alive)
        self.bytes = sum(storages.values())
        return self.bytes


def saved_tensor_bytes(
    fn: Callable[[], Any], exclude: nn.Module | Iterable[Tensor] | None = None
) -> tuple[int, Any]:
    """Run ``fn()`` and return (bytes its graph keeps for backward, fn's result)."""
    with SavedTensorMeter(exclude) as meter:
        result = fn()
    return meter.bytes, result
