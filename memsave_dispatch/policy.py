"""Saving policies: stock's autograd node and backward kernel, with less kept in it.

After the stock Autograd kernel ran, the node it created holds its saved tensors in
``SavedVariable`` slots (``node._raw_saved_<name>``). A slot accepts one pair of
pack/unpack hooks; registering them packs the tensor at once and releases the slot's
reference to it. That is how a policy drops a tensor (backward gets a zero-memory ghost of
the same layout) or keeps an exact encoding of it (backward gets the decoded stand-in).
The backward formula is stock's own, so the gradients are stock's bit for bit.

Share-aware saving: a ReLU output is usually also the next layer's input. Encoding it in
the ReLU node frees nothing while the next layer keeps it, and costs time. So such an
encoding is *deferred*: it happens only when a consumer handled by this library drops that
tensor (the consumer names it before its kernel runs: the activation is then still in
cache), and is skipped when one keeps it.

When the user's saved-tensor hooks are active (``save_on_cpu``, a custom pair, a memory
meter), the stock kernel runs without them and the user's hooks are then registered on
every slot stock would have packed, and on every encoding: they see everything kept.
Inside non-reentrant checkpointing nothing is changed (the region is recomputed anyway, and
its recomputation must save exactly what the first pass saved).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import accounting
from ._compat import SAVED_SLOTS_READABLE, is_compiling
from .saving import Codec, TensorLayout

__all__ = [
    "Decision",
    "KEEP",
    "DROP",
    "Encode",
    "EncodeWhenReleased",
    "Saved",
    "apply_policy",
    "default_hooks",
    "run_without_default_hooks",
    "forget_deferred",
    "release",
    "keep",
    "encodings_pending",
    "its_input",
    "encodings_enabled",
]


class Decision:
    """What a policy does with one tensor the stock node saves."""

    label = "kept"


class _Keep(Decision):
    label = "kept"

    def __repr__(self) -> str:
        return "KEEP"


class _Drop(Decision):
    label = "dropped"

    def __repr__(self) -> str:
        return "DROP"


KEEP: Decision = _Keep()
"""Leave the tensor in the node, as stock does."""

DROP: Decision = _Drop()
"""Release it; backward reads a ghost with the same sizes, strides and dtype."""


@dataclass(frozen=True)
class Encode(Decision):
    """Keep ``codec.encode(tensor)`` instead of the tensor."""

    codec: Codec

    @property
    def label(self) -> str:
        return self.codec.name


@dataclass(frozen=True)
class EncodeWhenReleased(Decision):
    """Keep the tensor while anything else may keep it; encode it once a consumer handled
    by this library drops it (for an op's *output* that the next layer consumes)."""

    codec: Codec

    label = "kept (shared with consumer)"


class Saved(NamedTuple):
    """One tensor of the stock node (``None`` if stock saves nothing there) and its fate."""

    tensor: Tensor | None
    decision: Decision


Hooks = tuple[Callable[[Tensor], Any], Callable[[Any], Tensor]]


def encodings_enabled() -> bool:
    """False while torch.compile traces: encodings are eager-only (a traced graph keeps the
    tensor instead), so a policy can skip preparing one, and must not run data-dependent
    tensor code on the tracing tensors."""
    return not is_compiling()


# -- hooks on one slot ------------------------------------------------------------------
class _Ghosted:
    """Slot hooks for a dropped tensor: nothing kept, a ghost in backward."""

    __slots__ = ("layout", "__weakref__")

    def pack(self, tensor: Tensor) -> None:
        self.layout = TensorLayout.of(tensor)

    def unpack(self, _packed: None) -> Tensor:
        with torch._C.DisableTorchFunction():
            return self.layout.ghost()



class _Encoded:
    """Slot hooks for an encoded tensor; the user's hooks, if any, pack the encoding.

    ``deferred``: pack keeps the original (through the user's hooks) until ``encode`` is
    called by a consumer that releases the tensor.
    """

    __slots__ = ("codec", "user_hooks", "deferred", "kept", "meta", "nbytes", "__weakref__")

    def __init__(self, codec: Codec, user_hooks: Hooks | None, deferred: bool = False) -> None:
        self.codec, self.user_hooks, self.deferred = codec, user_hooks, deferred
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
        encoded, self.meta = self.codec.encode(tensor.detach())
        self.nbytes = accounting.storage_bytes(encoded)
        self.kept = tuple(encoded) if self.user_hooks is None else tuple(self._user_pack(t) for t in encoded)
        self.deferred = False

    def keep_original(self, tensor: Tensor) -> None:
        """Undo :meth:`encode`: another consumer keeps ``tensor``, so its encoding is extra."""
        self.kept = (self._user_pack(tensor.detach()),)
        self.meta, self.nbytes, self.deferred = None, 0, True

    def unpack(self, _packed: None) -> Tensor:
        kept = self.kept if self.user_hooks is None else tuple(self._user_unpack(p) for p in self.kept)
        if self.deferred:
            return kept[0]
        with torch._C.DisableTorchFunction():
            return self.codec.decode(kept, self.meta)

    def _user_pack(self, tensor: Tensor) -> Any:
        return tensor if self.user_hooks is None else self.user_hooks[0](tensor)

    def _user_unpack(self, packed: Any) -> Tensor:
        return packed if self.user_hooks is None else self.user_hooks[1](packed)



_HOLDERS_KEY = "memsave_dispatch.slot_holders"


def _hook_slot(node, name: str, holder: _Ghosted | _Encoded) -> None:
    """Give the slot ``name`` of ``node`` the holder's hooks (this packs it at once).

    Where a slot cannot show its hooks (torch < 2.13), a weak reference to the holder is
    also noted in the node's metadata, for :func:`memsave_dispatch.audit` to read the slot
    without unpacking it (weak: what the holder keeps must go when backward frees the slot).
    """
    getattr(node, "_raw_saved_" + name).register_hooks(holder.pack, holder.unpack)
    if not SAVED_SLOTS_READABLE:
        node.metadata.setdefault(_HOLDERS_KEY, {})[name] = weakref.ref(holder)


# -- deferred encodings -----------------------------------------------------------------
class _Deferred:
    """An encoding waiting for a consumer to release its tensor.

    It stays in the table once encoded (``encoded`` is then the slot's holder), so that a
    later consumer keeping the tensor after all undoes the encoding: the bits would be extra.
    Until the tensor dies it also holds an alias of the tensor's storage (no extra memory: the
    tensor holds it too), to tell at the tensor's death whether anything else still does.
    """

    __slots__ = ("tensor_ref", "version", "node", "slot", "codec", "holder", "tallies", "nbytes", "encoded", "alias")

    def __init__(self, tensor, node, slot, codec, holder, tallies, nbytes) -> None:
        self.version = tensor._version
        self.node, self.slot, self.codec, self.holder = node, slot, codec, holder
        self.tallies, self.nbytes = tallies, nbytes
        self.encoded: _Encoded | None = None
        self.alias: Tensor | None = None  # once encoded, while the tensor lives: its storage


class _ThreadDeferred(threading.local):
    def __init__(self) -> None:
        self.by_tensor: dict[int, _Deferred] = {}


_deferred = _ThreadDeferred()


def _defer(tensor: Tensor, entry: _Deferred) -> None:
    table = _deferred.by_tensor
    key = id(tensor)
    # The table forgets a tensor when it dies (the callback captures this thread's table).
    entry.tensor_ref = weakref.ref(tensor, lambda _ref, key=key, table=table: _died(table.pop(key, None)))
    table[key] = entry


def _died(entry: _Deferred | None) -> None:
    """The tensor's Python object is gone. If its storage lives on in an alias that
    saved-tensor hooks packed for an operator this library does not see, undo the encoding."""
    if entry is None or entry.alias is None:
        return
    alias, entry.alias = entry.alias, None
    if _storage_references(alias) > _REFERENCES_AT_DEATH and alias._version == entry.version:
        _undo(entry, alias)


def _entry_of(tensor: Tensor) -> _Deferred | None:
    table = _deferred.by_tensor
    entry = table.get(id(tensor))
    if entry is None and tensor._base is not None:
        tensor = tensor._base  # a consumer of a view consumes its base too
        entry = table.get(id(tensor))
    if entry is None or entry.tensor_ref() is not tensor:
        return None
    return entry


def _forget(entry: _Deferred) -> None:
    tensor = entry.tensor_ref()
    if tensor is not None:
        _deferred.by_tensor.pop(id(tensor), None)


def _released(tensor: Tensor) -> None:
    """A consumer dropped ``tensor``: encode it in the node that deferred it, if any."""
    if not _deferred.by_tensor:
        return
    entry = _entry_of(tensor)
    if entry is None or entry.encoded is not None:
        return
    tensor = entry.tensor_ref()
    if tensor._version != entry.version:
        _forget(entry)  # modified in place since: leave stock's version check to report it
        return
    holder = entry.holder
    if holder is not None:
        holder.encode(tensor)
    else:
        holder = _Encoded(entry.codec, None)
        _hook_slot(entry.node, entry.slot, holder)
    entry.encoded, entry.node, entry.alias = holder, None, tensor.detach()
    for tally in entry.tallies:
        tally.reencode(EncodeWhenReleased.label, entry.codec.name, holder.nbytes - entry.nbytes)


def its_input(input: Tensor, *_rest) -> tuple[Tensor]:
    """``released`` of an operator whose node never keeps its first argument."""
    return (input,)


def release(tensors) -> None:
    """Consumers that read but do not keep these tensors: encode any deferred ones."""
    for tensor in tensors:
        _released(tensor)


def keep(tensors) -> None:
    """A consumer run by stock keeps these tensors: no deferred encoding of them is made, and
    one made already is undone."""
    for tensor in tensors:
        if tensor is not None:
            _kept(tensor)


def _undo_encodings_kept_elsewhere() -> None:
    """An operator this library does not see may keep an activation after a handled consumer
    released it (a squeeze-and-excitation block keeps x for ``x * scale`` after pooling it):
    the tensor or its storage then has another owner (a saved variable, an alias packed by
    saved-tensor hooks, or a view), and the encoding is undone. Checked whenever a new
    encoding is deferred: the consumers of earlier activations have run by then, and the table
    holds only live tensors, a few."""
    for entry in list(_deferred.by_tensor.values()):
        if entry.encoded is not None:
            tensor = entry.tensor_ref()
            if tensor is not None and _owned_elsewhere(tensor, entry.alias):
                _settle_kept(entry)


def _owned_elsewhere(tensor: Tensor, alias: Tensor) -> bool:
    """Whether anything besides its Python object holds the tensor (a node that saved it as it
    is) or its storage (an alias packed by saved-tensor hooks, a view) besides ``alias``."""
    return tensor._use_count() > 1 or _storage_references(alias) > _REFERENCES_WHILE_ALIVE


def _storage_references(tensor: Tensor) -> int:
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


def _baseline_references() -> tuple[int, int]:
    """A storage's count with nothing but a tensor and an alias of it, and from the alias in
    the tensor's death callback. Measured, not assumed: releases differ in whether the Python
    storage object asked for counts, and in whether the dying tensor still does."""
    tensor = torch.empty(1)
    alias = tensor.detach()
    while_alive = _storage_references(alias)
    at_death: list[int] = []
    _ref = weakref.ref(tensor, lambda _: at_death.append(_storage_references(alias)))
    del tensor
    return while_alive, at_death[0]


_REFERENCES_WHILE_ALIVE, _REFERENCES_AT_DEATH = _baseline_references()


def encodings_pending() -> bool:
    """Whether any deferred encoding in this thread could still be made or undone."""
    return bool(_deferred.by_tensor)


def _kept(tensor: Tensor) -> None:
    """A consumer keeps ``tensor``: whoever deferred its encoding keeps it for free, and an
    encoding an earlier consumer's release made is undone (the tensor lives on anyway)."""
    if not _deferred.by_tensor:
        return
    entry = _entry_of(tensor)
    if entry is not None:
        _settle_kept(entry)


def _settle_kept(entry: _Deferred) -> None:
    """The entry's tensor lives on elsewhere: no encoding of it, and none to decide on later."""
    _forget(entry)
    tensor = entry.tensor_ref()
    if entry.encoded is not None and tensor._version == entry.version:
        _undo(entry, tensor)
    entry.alias = None


def _undo(entry: _Deferred, original: Tensor) -> None:
    holder = entry.encoded
    encoded_bytes = holder.nbytes
    holder.keep_original(original)
    for tally in entry.tallies:
        tally.reencode(entry.codec.name, EncodeWhenReleased.label, entry.nbytes - encoded_bytes)


def forget_deferred() -> None:
    """Drop pending encodings (the outermost mode of this thread exited)."""
    _deferred.by_tensor.clear()


# -- the user's default hooks -----------------------------------------------------------
def default_hooks() -> Hooks | None:
    return torch._C._autograd._top_saved_tensors_default_hooks(False)


def is_checkpoint_hooks(hooks: Hooks) -> bool:
    """Non-reentrant checkpointing's forward or recomputation hooks."""
    qualname = getattr(hooks[0], "__qualname__", "")
    return "_checkpoint_hook" in qualname or "_recomputation_hook" in qualname


def run_without_default_hooks(call: Callable[[], Any]) -> Any:
    """Run ``call`` with the saved-tensor default hooks stack emptied, then restore it."""
    popped = []
    while (hooks := torch._C._autograd._top_saved_tensors_default_hooks(False)) is not None:
        popped.append(hooks)
        torch._C._autograd._pop_saved_tensors_default_hooks()
    try:
        return call()
    finally:
        for pack, unpack in reversed(popped):
            torch._C._autograd._push_saved_tensors_default_hooks(pack, unpack)


_SLOT_NAMES: dict[type, tuple[str, ...]] = {}


def _slot_names(node) -> tuple[str, ...]:
    kind = type(node)
    names = _SLOT_NAMES.get(kind)
    if names is None:
        names = _SLOT_NAMES.setdefault(
            kind, tuple(n[len("_raw_saved_") :] for n in dir(node) if n.startswith("_raw_saved_"))
        )
    return names


def _register_user_hooks(slot, user_hooks: Hooks) -> None:
    slots = slot if isinstance(slot, (list, tuple)) else (slot,)
    for one in slots:
        try:
            one.register_hooks(*user_hooks)
        except RuntimeError:
            pass  # an undefined optional tensor: stock packs nothing there either


# -- applying a policy ------------------------------------------------------------------
def apply_policy(
    op, family: str, saved: Mapping[str, Saved], node, user_hooks: Hooks | None, modes: list
) -> None:
    """Carry out ``saved`` on ``node``, the node stock just created; count it in ``modes``."""
    tracing = is_compiling()
    storage_of = accounting.storage_of
    stock_sizes: dict[int, int] = {}  # storage -> bytes, for every tensor stock keeps here
    kept_sizes: dict[int, int] = {}  # the same for those the node still holds
    labels: list[str] = []
    encoded_bytes = 0
    decided_slots = []  # slots given hooks of ours; the user's hooks go on all the others
    deferred = []
    pending = _deferred.by_tensor
    for name, (tensor, decision) in saved.items():
        if tensor is None:
            continue
        storage = storage_of(tensor, tracing)  # None for a parameter: it outlives the graph
        if storage is not None:
            stock_sizes[storage[0]] = storage[1]
        if decision is KEEP or (tracing and isinstance(decision, Encode)) or tensor.numel() == 0:
            # (encodings are eager-only: tracing keeps the tensor; an empty one costs nothing)
            if storage is not None:
                kept_sizes[storage[0]] = storage[1]
            if pending and tensor.requires_grad:  # (only graph outputs are ever deferred)
                _kept(tensor)
            continue
        if not isinstance(decision, Decision):
            raise TypeError(
                f"unknown saving decision {decision!r} for {op} slot {name!r}; use KEEP, DROP, "
                f"Encode(codec) or EncodeWhenReleased(codec)"
            )
        if decision.label not in labels:  # one count per call and kind of change
            labels.append(decision.label)
        if decision is DROP:
            holder = _Ghosted()
            _hook_slot(node, name, holder)
            if pending:
                _released(tensor)
        elif isinstance(decision, Encode):
            holder = _Encoded(decision.codec, user_hooks)
            _hook_slot(node, name, holder)
            encoded_bytes += holder.nbytes
        elif isinstance(decision, EncodeWhenReleased):
            holder = None
            if user_hooks is not None:
                holder = _Encoded(decision.codec, user_hooks, deferred=True)
                _hook_slot(node, name, holder)
            nbytes = 0
            if storage is not None:
                kept_sizes[storage[0]] = nbytes = storage[1]
            if not tracing:
                deferred.append((tensor, name, decision.codec, holder, nbytes))
        else:
            raise TypeError(f"unknown saving decision {decision!r} for {op} slot {name!r}")
        if user_hooks is not None and holder is not None:
            decided_slots.append(name)
    if user_hooks is not None:
        for name in _slot_names(node):
            if name not in decided_slots:
                _register_user_hooks(getattr(node, "_raw_saved_" + name), user_hooks)
    stock_bytes = sum(stock_sizes.values())
    kept_bytes = sum(kept_sizes.values()) + encoded_bytes
    tallies = [mode._tally(op, family) for mode in modes]
    for tally in tallies:
        tally.add_handled(stock_bytes, kept_bytes, tracing, labels)
    if deferred and pending:
        _undo_encodings_kept_elsewhere()
    for tensor, name, codec, holder, nbytes in deferred:
        _defer(tensor, _Deferred(tensor, node, name, codec, holder, tallies, nbytes))
