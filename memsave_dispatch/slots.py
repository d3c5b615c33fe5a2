"""Slots: what a stock autograd node keeps, changed one saved slot at a time.

After the stock Autograd kernel ran, the node it created holds its saved tensors in
``SavedVariable`` slots. A slot accepts one pair of pack/unpack hooks; registering them packs
the tensor at once and releases the slot's reference to it. That is how a decision is carried
out: DROP (backward gets a zero-memory ghost of the same layout), Encode (backward gets the
decoded stand-in), EncodeWhenUnshared (encoded once the node is the tensor's last holder).
The backward formula is stock's own, so the gradients are stock's bit for bit.

A slot with hooks is no longer checked by autograd for in-place changes. Each holder here
therefore keeps a *witness* of the tensor (a storage-less alias sharing its version counter)
and, when backward unpacks the slot, raises stock's own error if the tensor was modified
since it was saved.

Unshared encodings: a ReLU output is usually also the next layer's input and often the
caller's too; encoding it while anything else holds it frees nothing and adds the bits. So
the encoding waits for the tensor's death (the death of its last owner besides this node) and
is made only if nothing else holds its storage then. Backward never sees the difference.

When the user's saved-tensor hooks are active (``save_on_cpu``, a custom pair), the stock
kernel runs without them and the user's hooks are then registered on every slot stock would
have packed, and on every encoding: they see everything kept.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._compat import (
    SAVED_SLOTS_READABLE,
    Hooks,
    backward_running,
    modified_in_place_error,
    no_torch_function,
    pop_all_default_hooks,
    push_default_hooks,
    saved_slot,
    saved_slot_names,
    storage_references,
)
from .codecs import Codec
from .decisions import DROP, KEEP, Decision, Encode, EncodeWhenUnshared, Saved
from .ghosts import TensorLayout, ghost_like
from .storage import storage_key

__all__ = [
    "Outcome",
    "apply",
    "check_slot_names",
    "run_without_default_hooks",
    "forget_pending",
    "pending_count",
    "describe_holder",
    "holder_of",
    "NativeSlot",
]


# -- how stock would report an in-place change -------------------------------------------
_WITNESS_DATA: dict[tuple[torch.dtype, torch.device], Tensor] = {}


def _witness(tensor: Tensor) -> Tensor:
    """An alias of ``tensor`` that shares its version counter but not its storage: it reads
    the tensor's version without keeping its memory alive."""
    witness = tensor.detach()
    key = (tensor.dtype, tensor.device)
    empty = _WITNESS_DATA.get(key)
    if empty is None:
        empty = _WITNESS_DATA.setdefault(key, torch.empty(0, dtype=tensor.dtype, device=tensor.device))
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
        # stock names the current grad_fn of a tensor it keeps as is (the one it had when the
        # tensor's last reference here died), the node itself for one of the node's outputs
        self.source: Any = node_name if node_name is not None or leaf else (weakref.ref(tensor), tensor.grad_fn)

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
        reference, grad_fn_when_saved = self.source
        tensor = reference()
        return grad_fn_when_saved if tensor is None else tensor.grad_fn


class _Named(NamedTuple):
    label: str

    def name(self) -> str:
        return self.label


# -- slot holders ------------------------------------------------------------------------
class _Ghost:
    """A dropped tensor: nothing kept, a ghost in backward. ``origin`` is None where stock
    would not check the tensor's version either (under the user's saved-tensor hooks)."""

    __slots__ = ("origin", "layout", "__weakref__")

    def __init__(self, origin: Origin | None) -> None:
        self.origin = origin

    def pack(self, tensor: Tensor) -> None:
        self.layout = TensorLayout.of(tensor)

    def unpack(self, _packed: None) -> Tensor:
        if self.origin is not None:
            self.origin.check()
        with no_torch_function():
            return ghost_like(self.layout)


class _Encoded:
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

    def unpack(self, _packed: None = None) -> Tensor:
        return self._unpack()


_HOLDERS_KEY = "memsave_dispatch.slot_holders"


def _hook(node: Any, name: str, holder: _Ghost | _Encoded) -> None:
    """Give the slot ``name`` of ``node`` the holder's hooks (this packs it at once).

    Where a slot cannot show its hooks (torch < 2.13), a weak reference to the holder is
    also noted in the node's metadata, for :func:`holder_of` (weak: what the holder keeps
    must go when backward frees the slot).
    """
    saved_slot(node, name).register_hooks(holder.pack, holder.unpack)
    if not SAVED_SLOTS_READABLE:
        node.metadata.setdefault(_HOLDERS_KEY, {})[name] = weakref.ref(holder)


def holder_of(node: Any, name: str, unpack_hook: Any = None) -> _Ghost | _Encoded | NativeSlot | None:
    """The holder of this library on a slot, if any (either engine's): from the slot's unpack
    hook where it shows (torch >= 2.13), else from the node's metadata."""
    if unpack_hook is not None:
        holder = getattr(unpack_hook, "__self__", None)
        return holder if isinstance(holder, (_Ghost, _Encoded, NativeSlot)) else None
    reference = node.metadata.get(_HOLDERS_KEY, {}).get(name) if not SAVED_SLOTS_READABLE else None
    return None if reference is None else reference()


def describe_holder(holder: _Ghost | _Encoded | NativeSlot) -> tuple[str, tuple]:
    """(what the slot holds, what it keeps: tensors, or what the user's hooks packed them
    into) for an audit."""
    if isinstance(holder, NativeSlot):
        return holder.form, holder.kept
    if isinstance(holder, _Ghost):
        return DROP.label, ()
    form = EncodeWhenUnshared.label if holder.deferred else holder.codec.name
    return form, holder.kept


# -- unshared encodings ------------------------------------------------------------------
class _Pending:
    """An EncodeWhenUnshared slot waiting for its tensor to be unshared.

    ``holder`` is None while stock's slot holds the tensor itself (a node's own output, no
    user hooks: nothing to do until the tensor dies); otherwise a deferred holder keeps it.
    ``alias`` holds the storage (no extra memory: the tensor holds it too) so that the
    encoding can read it and tell whether anything else still holds it.
    """

    __slots__ = ("node", "slot", "codec", "holder", "version", "alias", "node_name", "output_nr", "tallies", "nbytes")

    def __init__(self, node, slot, codec, holder, tensor, node_name, tallies, nbytes) -> None:
        self.node, self.slot, self.codec, self.holder = node, slot, codec, holder
        self.version = tensor._version
        self.alias: Tensor | None = tensor.detach()
        self.node_name, self.output_nr = node_name, tensor.output_nr
        self.tallies, self.nbytes = tallies, nbytes


class _Tracked:
    __slots__ = ("ref", "entries")


class _ThreadPending(threading.local):
    def __init__(self) -> None:
        self.by_tensor: dict[int, _Tracked] = {}


_pending = _ThreadPending()


def _track(tensor: Tensor, entry: _Pending) -> None:
    table = _pending.by_tensor
    key = id(tensor)
    tracked = table.get(key)
    if tracked is None or tracked.ref() is not tensor:
        tracked = _Tracked()
        # the callback captures this thread's table: the tensor may die in another thread
        tracked.ref = weakref.ref(tensor, lambda _ref, key=key, table=table: _died(table, key))
        tracked.entries = []
        table[key] = tracked
    tracked.entries.append(entry)


def _died(table: dict[int, _Tracked], key: int) -> None:
    """The tensor is gone: encode what waited for it, where nothing else holds its storage."""
    tracked = table.pop(key, None)
    if tracked is None:
        return
    if backward_running():
        return  # the graph is being consumed: nothing left to save
    for entry in tracked.entries:
        _encode_unshared(entry)


def _encode_unshared(entry: _Pending) -> None:
    alias, entry.alias = entry.alias, None
    if alias._version != entry.version:
        return  # modified in place since: the slot reports it in backward, as stock does
    holder = entry.holder
    if holder is None:
        if storage_references(alias) > _REFERENCES_WITH_SLOT:
            return  # something else holds the storage: the bits would be extra
        # (only a node's own output, requiring grad, waits this way: not a leaf)
        holder = _Encoded(entry.codec, None, Origin(alias, entry.node_name, entry.output_nr, leaf=False))
        try:
            _hook(entry.node, entry.slot, holder)  # packs: encodes from the slot's own tensor
        except RuntimeError:
            return  # backward already freed the slot
    else:
        holder.encode(alias)
        if storage_references(alias) > _REFERENCES_ALONE:
            holder.keep_original(alias)  # something else holds the storage: keep it as it is
            return
    entry.node = None
    for tally in entry.tallies:
        tally.reencode(EncodeWhenUnshared.label, entry.codec.name, holder.nbytes - entry.nbytes)


def _baseline_references() -> tuple[int, int]:
    """A storage's count from an alias in its tensor's death callback: with the stock node's
    slot holding the tensor's data too (a ReLU's saved output), and alone. Measured, not
    assumed: releases differ in who counts (the dying tensor, the storage object asked)."""
    counts: list[int] = []
    with torch.enable_grad():
        tensor = torch.ones(2, requires_grad=True).relu()  # stock: the kernels are not ours yet
    node = tensor.grad_fn
    alias = tensor.detach()
    with_slot = weakref.ref(tensor, lambda _: counts.append(storage_references(alias)))
    del tensor
    lone = torch.ones(2)
    lone_alias = lone.detach()
    alone = weakref.ref(lone, lambda _: counts.append(storage_references(lone_alias)))
    del lone, node
    assert with_slot() is None and alone() is None
    return counts[0], counts[1]


_REFERENCES_WITH_SLOT, _REFERENCES_ALONE = _baseline_references()


def forget_pending() -> None:
    """Drop the encodings still waiting (the outermost mode of this thread exited)."""
    _pending.by_tensor.clear()


def pending_count() -> int:
    """How many tensors in this thread have encodings waiting for them."""
    return len(_pending.by_tensor)


# -- the user's default hooks ------------------------------------------------------------
def run_without_default_hooks(call: Callable[[], Any]) -> Any:
    """Run ``call`` with the saved-tensor default hooks stack emptied, then restore it."""
    popped = pop_all_default_hooks()
    try:
        return call()
    finally:
        push_default_hooks(popped)


def _register_user_hooks(slot: Any, user_hooks: Hooks) -> None:
    for one in slot if isinstance(slot, (list, tuple)) else (slot,):
        try:
            one.register_hooks(*user_hooks)
        except RuntimeError:
            pass  # an undefined optional tensor: stock packs nothing there either


# -- checking a handler's slot names ---------------------------------------------------------
_CHECKED: set[tuple[type, type]] = set()


def check_slot_names(handler: type, op: object, node: Any, saved: Mapping[str, Saved]) -> None:
    """On a handler's first call for a node type: every slot it names must exist."""
    key = (handler, type(node))
    if key in _CHECKED:
        return
    real = saved_slot_names(node)
    unknown = [name for name in saved if name not in real]
    if unknown:
        raise AttributeError(
            f"{handler.__name__}.saved names slot(s) {unknown} that {op}'s autograd node "
            f"{type(node).__name__} does not have; its saved slots are {list(real)} "
            f"(the <name> of grad_fn._saved_<name>)"
        )
    _CHECKED.add(key)


# -- applying decisions ----------------------------------------------------------------------
class Outcome(NamedTuple):
    """What :func:`apply` did to one call's node, for the report."""

    stock_bytes: int
    kept_bytes: int
    labels: list[str]  # one per kind of change made


def apply(
    op: object,
    saved: Mapping[str, Saved],
    node: Any,
    outputs: tuple,
    user_hooks: Hooks | None,
    tracing: bool,
    tallies: list,
) -> Outcome:
    """Carry out ``saved`` on ``node``, the node stock just created for ``outputs``.
    ``tallies`` hear of encodings made later, once a tensor is unshared."""
    stock_sizes: dict[object, int] = {}  # storage -> bytes, for every tensor stock keeps here
    kept_sizes: dict[object, int] = {}  # the same for those the node still holds
    labels: list[str] = []
    encoded_bytes = 0
    decided = []  # slots given hooks of ours; the user's hooks go on all the others
    waiting = []
    for name, (tensor, decision) in saved.items():
        if tensor is None:
            continue
        if not isinstance(decision, Decision):
            raise _unknown(decision, op, name)
        storage = storage_key(tensor, tracing)  # None for a parameter: it outlives the graph
        if storage is not None:
            stock_sizes[storage[0]] = storage[1]
        if decision is KEEP or (tracing and decision is not DROP) or tensor.numel() == 0:
            # (encodings are eager-only: tracing keeps the tensor; an empty one costs nothing)
            if storage is not None:
                kept_sizes[storage[0]] = storage[1]
            continue
        if decision.label not in labels:  # one count per call and kind of change
            labels.append(decision.label)
        output = _output_index(tensor, outputs)
        node_name = node.name() if output is not None else None
        # stock checks a saved tensor's version only where no saved-tensor hooks are in play
        origin = Origin.of(tensor, node_name) if user_hooks is None else None
        if decision is DROP:
            _hook(node, name, _Ghost(origin))
            decided.append(name)
        elif isinstance(decision, Encode):
            holder = _Encoded(decision.codec, user_hooks, origin)
            _hook(node, name, holder)
            encoded_bytes += holder.nbytes
            decided.append(name)
        elif isinstance(decision, EncodeWhenUnshared):
            nbytes = 0
            if storage is not None:
                kept_sizes[storage[0]] = nbytes = storage[1]
            holder = None
            # stock keeps a node's own output (one that requires grad) as a separate alias:
            # the tensor can die before the node; anything else it keeps as is, so a
            # deferred holder takes its place now
            if user_hooks is not None or output is None or not tensor.requires_grad:
                holder = _Encoded(decision.codec, user_hooks, origin, deferred=True)
                _hook(node, name, holder)
                decided.append(name)
            waiting.append((tensor, _Pending(node, name, decision.codec, holder, tensor, node_name, tallies, nbytes)))
        else:
            raise _unknown(decision, op, name)
    if user_hooks is not None:
        for name in saved_slot_names(node):
            if name not in decided:
                _register_user_hooks(saved_slot(node, name), user_hooks)
    for tensor, entry in waiting:
        _track(tensor, entry)
    return Outcome(sum(stock_sizes.values()), sum(kept_sizes.values()) + encoded_bytes, labels)


def _output_index(tensor: Tensor, outputs: tuple) -> int | None:
    for index, output in enumerate(outputs):
        if output is tensor:
            return index
    return None


def _unknown(decision: object, op: object, name: str) -> TypeError:
    return TypeError(
        f"unknown saving decision {decision!r} for {op} slot {name!r}; use KEEP, DROP, "
        f"Encode(codec) or EncodeWhenUnshared(codec)"
    )
