"""Holders: what a changed saved slot keeps in place of its tensor, and stock's in-place
check kept for it.

A ``SavedVariable`` slot accepts one pair of pack/unpack hooks; registering them packs the
tensor at once and releases the slot's reference to it. A holder supplies that pair: a
:class:`Ghost` keeps nothing (backward gets a zero-memory ghost of the same layout), an
:class:`Encoded` keeps a codec's encoding (backward gets its decoding), or, deferred, the
tensor itself until it is encoded.

A slot with hooks is no longer checked by autograd for in-place changes. Each holder
therefore keeps an :class:`Origin`: a *witness* of the tensor (a storage-less alias sharing
its version counter) and what stock's message names, and raises stock's own error when
backward unpacks a tensor modified in place since it was saved.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._compat import (
    SAVED_SLOTS_READABLE,
    Hooks,
    is_compiling,
    modified_in_place_error,
    no_torch_function,
    read_saved_slot,
    saved_slot,
    saved_value,
)
from .codecs import Codec
from .decisions import DROP, EncodeWhenUnshared
from .ghosts import TensorLayout, ghost_like

__all__ = [
    "Origin",
    "Ghost",
    "Encoded",
    "NativeSlot",
    "hook",
    "holder_of",
    "describe_holder",
    "inspect_slot",
    "SlotState",
    "UNSHARED_KEY",
]

#: Where a node notes its slots that wait for their tensor to be unshared: they may still become
#: an encoding that is not values-exact, so no recipe may read them.
UNSHARED_KEY = "memsave_dispatch.unshared"


# -- how stock would report an in-place change -------------------------------------------
_WITNESS_DATA: dict[tuple[torch.dtype, torch.device], Tensor] = {}


def _witness(tensor: Tensor) -> Tensor:
    """An alias of ``tensor`` that shares its version counter but not its storage: it reads
    the tensor's version without keeping its memory alive."""
    witness = tensor.detach()
    key = (tensor.dtype, tensor.device)
    empty = _WITNESS_DATA.get(key)
    if empty is None:
        empty = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
        if not is_compiling():  # (a tracing tensor must not be kept for eager calls)
            _WITNESS_DATA[key] = empty
    witness.data = empty  # keeps the version counter, drops the storage
    return witness


class Origin:
    """What stock's saved variable remembers of a tensor to report an in-place change of it:
    its version when saved, and who produced it."""

    __slots__ = ("witness", "version", "sizes", "output_nr", "leaf", "source")

    def __init__(self, tensor: Tensor, node_name: str | None, output_nr: int, leaf: bool) -> None:
        self.witness = _witness(tensor)
        self.version = tensor._version
        self.sizes = tensor.shape
        self.output_nr, self.leaf = output_nr, leaf
        # stock names the current grad_fn of a tensor it keeps as is, the node itself for one
        # of the node's outputs; once the tensor is gone here, the grad_fn it had when saved,
        # or, for a view whose base changed since, the one autograd regenerates for it
        if node_name is not None or leaf:
            self.source: Any = node_name
        else:
            self.source = (weakref.ref(tensor), tensor.grad_fn, tensor._base is not None)

    @classmethod
    def of(cls, tensor: Tensor, node_name: str | None) -> Origin:
        """``node_name``: the node's, when ``tensor`` is one of its outputs."""
        return cls(tensor, node_name, tensor.output_nr, tensor.is_leaf)

    def check(self) -> None:
        """Raise stock's error if the tensor was modified in place since it was saved."""
        current = self.witness._version
        if current != self.version:
            raise modified_in_place_error(
                self.witness.type(), self.sizes, self._grad_fn(), self.output_nr, current, self.version
            )

    def _grad_fn(self) -> Any:
        if self.leaf:
            return None
        if isinstance(self.source, str):
            return _Named(self.source)
        reference, grad_fn_when_saved, is_view = self.source
        tensor = reference()
        if tensor is not None:
            return tensor.grad_fn
        return _AS_STRIDED if is_view else grad_fn_when_saved


class _Named(NamedTuple):
    label: str

    def name(self) -> str:
        return self.label


# What autograd makes a view's grad_fn once its base was modified in place.
_AS_STRIDED = _Named("AsStridedBackward0")


# -- slot holders ------------------------------------------------------------------------
class Ghost:
    """A dropped tensor: nothing kept, a ghost in backward. ``origin`` is None where stock
    would not check the tensor's version either (under the user's saved-tensor hooks)."""

    __slots__ = ("origin", "layout", "__weakref__")

    def __init__(self, origin: Origin | None) -> None:
        self.origin = origin

    def pack(self, tensor: Tensor) -> None:
        self.layout = TensorLayout.of(tensor)

    def values_exact(self) -> bool:
        return False

    def unpack(self, _packed: None) -> Tensor:
        if self.origin is not None:
            self.origin.check()
        with no_torch_function():
            return ghost_like(self.layout)


class Encoded:
    """An encoded tensor; the user's hooks, if any, pack the encoding.

    ``deferred``: pack keeps the original (through the user's hooks) until ``encode`` is
    called, once the tensor is unshared.
    """

    __slots__ = ("codec", "user_hooks", "origin", "deferred", "kept", "meta", "nbytes", "__weakref__")

    def __init__(self, codec: Codec, user_hooks: Hooks | None, origin: Origin | None, deferred: bool = False) -> None:
        self.codec, self.user_hooks, self.origin, self.deferred = codec, user_hooks, origin, deferred
        self.kept: tuple = ()
        self.meta: object = None
        self.nbytes = 0  # of the encoding, before the user's hooks packed it

    def values_exact(self) -> bool:
        """Whether unpacking gives back the tensor's very values, now and once encoded."""
        return self.codec.values_exact

    def pack(self, tensor: Tensor) -> None:
        if self.deferred:
            self.kept = (self._user_pack(tensor),)
        else:
            self.encode(tensor)

    def encode(self, tensor: Tensor) -> None:
        # detached: the encoding is no part of the graph (cheaper than a no_grad block)
        with no_torch_function():
            encoded, self.meta = self.codec.encode(tensor.detach())
        self.nbytes = sum(t.untyped_storage().nbytes() for t in encoded)
        self.kept = tuple(encoded) if self.user_hooks is None else tuple(self._user_pack(t) for t in encoded)
        self.deferred = False

    def keep_original(self, tensor: Tensor) -> None:
        """Undo :meth:`encode`: something else keeps ``tensor``, so its encoding is extra."""
        self.kept = (self._user_pack(tensor.detach()),)
        self.meta, self.nbytes, self.deferred = None, 0, True

    def unpack(self, _packed: None) -> Tensor:
        if self.origin is not None:
            self.origin.check()
        kept = self.kept if self.user_hooks is None else tuple(self.user_hooks[1](p) for p in self.kept)
        if self.deferred:
            return kept[0]
        with no_torch_function():
            return self.codec.decode(kept, self.meta)

    def _user_pack(self, tensor: Tensor) -> Any:
        return tensor if self.user_hooks is None else self.user_hooks[0](tensor)


class NativeSlot:
    """A slot the compiled engine holds (csrc/holders.cpp), as Python reads it: what it holds
    and keeps, for the audit; ``unpack`` rebuilds what backward reads (compiled autograd calls
    it, as it calls any slot's unpack hook)."""

    __slots__ = ("form", "kept", "_unpack")

    def __init__(self, form: str, kept: tuple, unpack: Callable[[], Tensor]) -> None:
        self.form, self.kept, self._unpack = form, kept, unpack

    def values_exact(self) -> bool:
        """Never read by a recipe: the compiled engine's encodings are not marked values-exact
        (no recipe reads a slot of a node it hooks but the LayerNorm's, which it only drops)."""
        return False

    def unpack(self, _packed: None = None) -> Tensor:
        return self._unpack()


_HOLDERS_KEY = "memsave_dispatch.slot_holders"


def hook(node: Any, name: str, holder: Ghost | Encoded) -> None:
    """Give the slot ``name`` of ``node`` the holder's hooks (this packs it at once).

    Where a slot cannot show its hooks (torch < 2.13), a weak reference to the holder is
    also noted in the node's metadata, for :func:`holder_of` (weak: what the holder keeps
    must go when backward frees the slot).
    """
    saved_slot(node, name).register_hooks(holder.pack, holder.unpack)
    if not SAVED_SLOTS_READABLE:
        node.metadata.setdefault(_HOLDERS_KEY, {})[name] = weakref.ref(holder)


def holder_of(node: Any, name: str, unpack_hook: Any = None) -> Ghost | Encoded | NativeSlot | None:
    """The holder of this library on a slot, if any (either engine's): from the slot's unpack
    hook where it shows (torch >= 2.13), else from the node's metadata."""
    if unpack_hook is not None:
        holder = getattr(unpack_hook, "__self__", None)
        return holder if isinstance(holder, (Ghost, Encoded, NativeSlot)) else None
    reference = node.metadata.get(_HOLDERS_KEY, {}).get(name) if not SAVED_SLOTS_READABLE else None
    return None if reference is None else reference()


class SlotState(NamedTuple):
    """What a saved slot holds, looked at without decoding anything of this library's."""

    holder: Ghost | Encoded | None  # this library's, if it changed the slot
    user_hooks: bool  # packed by saved-tensor hooks other than this library's
    defined: bool  # holds a tensor (False: an undefined optional tensor, or freed by backward)


def inspect_slot(node: Any, name: str) -> SlotState:
    """The state of slot ``name``. Before torch 2.13 a slot cannot be read in place: this
    library's holders are found through the node's metadata, any other slot is unpacked."""
    if SAVED_SLOTS_READABLE:
        try:
            unpack, packed = read_saved_slot(saved_slot(node, name))
        except RuntimeError:
            return SlotState(None, False, False)
        holder = holder_of(node, name, unpack)
        return SlotState(holder, unpack is not None and holder is None, packed is not None or unpack is not None)
    holder = holder_of(node, name)
    if holder is not None:
        return SlotState(holder, False, True)
    try:
        value = saved_value(node, name)
    except RuntimeError:  # freed by a backward pass
        return SlotState(None, False, False)
    return SlotState(None, False, value is not None)


def describe_holder(holder: Ghost | Encoded | NativeSlot) -> tuple[str, tuple]:
    """(what the slot holds, what it keeps: tensors, or what the user's hooks packed them
    into) for an audit."""
    if isinstance(holder, NativeSlot):
        return holder.form, holder.kept
    if isinstance(holder, Ghost):
        return DROP.label, ()
    form = EncodeWhenUnshared.label if holder.deferred else holder.codec.describe(holder.meta)
    return form, holder.kept
