"""Slots: what a stock autograd node keeps, changed one saved slot at a time.

After the stock Autograd kernel ran, the node it created holds its saved tensors in
``SavedVariable`` slots. A slot accepts one pair of pack/unpack hooks; registering them packs
the tensor at once and releases the slot's reference to it. That is how a decision is carried
out: DROP (backward gets a zero-memory ghost of the same layout), Encode (backward gets the
decoded stand-in), EncodeWhenUnshared (encoded once the node is the tensor's last holder).
The backward formula is stock's own, so the gradients are stock's bit for bit.

The holders (and stock's in-place check they keep) are in :mod:`.holders`.

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
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._compat import (
    Hooks,
    backward_running,
    pop_all_default_hooks,
    push_default_hooks,
    saved_slot,
    saved_slot_names,
    storage_references,
)
from .decisions import DROP, KEEP, Decision, Encode, EncodeWhenUnshared, Saved
from .holders import UNSHARED_KEY, Encoded, Ghost, Origin, hook, inspect_slot
from .recipes import Rebuild, has_recipe, plan
from .storage import storage_key, view_in_base

__all__ = [
    "Outcome",
    "apply",
    "check_slot_names",
    "run_without_default_hooks",
    "give_user_hooks",
    "forget_pending",
    "pending_count",
]


# -- unshared encodings ------------------------------------------------------------------
class _Pending:
    """An EncodeWhenUnshared slot waiting for its tensor to be unshared.

    ``holder`` is None while stock's slot holds the tensor itself (a node's own output, no
    user hooks: nothing to do until the tensor dies); otherwise a weak reference to the
    deferred holder that keeps it (gone once backward freed the slot).
    """

    __slots__ = ("node", "slot", "codec", "holder", "version", "view", "node_name", "output_nr", "tallies", "nbytes")

    def __init__(self, node, slot, codec, holder, tensor, node_name, tallies, nbytes) -> None:
        self.node, self.slot, self.codec = node, slot, codec
        self.holder = None if holder is None else weakref.ref(holder)
        self.version = tensor._version
        _base, self.view = view_in_base(tensor)  # the waiting is for the base of a view
        self.node_name, self.output_nr = node_name, tensor.output_nr
        self.tallies, self.nbytes = tallies, nbytes

    def tensor_in(self, alias: Tensor) -> Tensor:
        """The slot's tensor, from an alias of the tensor waited for."""
        return alias if self.view is None else alias.as_strided(*self.view)

    def freed(self) -> bool:
        """Whether backward freed the slot meanwhile (nothing left to encode there)."""
        if self.holder is not None:
            return self.holder() is None
        return not inspect_slot(self.node, self.slot).defined


class _Tracked:
    """The slots waiting for one tensor. ``alias`` holds its storage (no extra memory: the
    tensor holds it too) so that the encodings can read it and tell, once the tensor is gone,
    whether anything else still holds it."""

    __slots__ = ("ref", "alias", "entries", "plan")


class _ThreadPending(threading.local):
    def __init__(self) -> None:
        self.by_tensor: dict[int, _Tracked] = {}


_pending = _ThreadPending()


def _tracked(base: Tensor) -> _Tracked | None:
    tracked = _pending.by_tensor.get(id(base))
    return tracked if tracked is not None and tracked.ref() is base else None


def _track(tensor: Tensor, entry: _Pending) -> None:
    """Wait for ``tensor`` (for a view, its base: the view often dies first) to die."""
    tensor, _view = view_in_base(tensor)
    tracked = _tracked(tensor)
    if tracked is not None:
        tracked.entries = [waiting for waiting in tracked.entries if not waiting.freed()]
    else:
        table = _pending.by_tensor
        key = id(tensor)
        tracked = _Tracked()
        # the callback captures this thread's table: the tensor may die in another thread
        tracked.ref = weakref.ref(tensor, lambda _ref, key=key, table=table: _died(table, key))
        tracked.alias = tensor.detach()
        tracked.entries = []
        tracked.plan = None
        table[key] = tracked
    tracked.entries.append(entry)
    if isinstance(entry.codec, Rebuild):
        tracked.plan = entry.codec.plan  # the next consumer of the tensor rebuilds it alike


def _died(table: dict[int, _Tracked], key: int) -> None:
    """The tensor is gone: encode every slot that waited for it, and keep the encodings only
    if nothing else holds its storage then (the storage is freed only when all let go)."""
    tracked = table.pop(key, None)
    if tracked is None:
        return
    alias, tracked.alias = tracked.alias, None
    if backward_running():
        return  # the graph is being consumed: nothing left to save
    encoded = [(entry, holder) for entry in tracked.entries if (holder := _encode_unshared(entry, alias)) is not None]
    if storage_references(alias) > _REFERENCES_ALONE or not all(h.codec.still_valid(h.meta) for _e, h in encoded):
        for entry, holder in encoded:
            holder.keep_original(entry.tensor_in(alias))  # something else holds the storage
        return
    for entry, holder in encoded:
        entry.node = None
        holder.codec.commit(holder.meta)
        for tally in entry.tallies:
            tally.reencode(EncodeWhenUnshared.label, entry.codec.name, holder.nbytes - entry.nbytes)


def _encode_unshared(entry: _Pending, alias: Tensor) -> Encoded | None:
    if alias._version != entry.version or entry.freed():
        return None  # modified in place since (the slot reports it in backward, as stock does), or freed
    holder = entry.holder() if entry.holder is not None else None
    if holder is None:
        # (only a node's own output, requiring grad, waits this way: not a leaf)
        holder = Encoded(entry.codec, None, Origin(alias, entry.node_name, entry.output_nr, leaf=False))
        try:
            hook(entry.node, entry.slot, holder)  # packs: encodes from the slot's own tensor
        except RuntimeError:
            return None  # backward already freed the slot
    else:
        holder.encode(entry.tensor_in(alias))
    return holder


def _baseline_references() -> int:
    """A storage's count from an alias in its tensor's death callback, with nothing else
    holding it. Measured, not assumed: releases differ in who counts (the dying tensor, the
    storage object asked)."""
    counts: list[int] = []
    lone = torch.ones(2)
    lone_alias = lone.detach()
    alone = weakref.ref(lone, lambda _: counts.append(storage_references(lone_alias)))
    del lone
    assert alone() is None
    return counts[0]


_REFERENCES_ALONE = _baseline_references()


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


def give_user_hooks(node: Any, user_hooks: Hooks, skip: Iterable[str] = ()) -> None:
    """Register the user's saved-tensor hooks on the node's slots (but ``skip``): stock ran
    without them, and they must see every tensor stock keeps."""
    for name in saved_slot_names(node):
        if name not in skip:
            _register_user_hooks(saved_slot(node, name), user_hooks)


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
    labels: list[str] = []  # what each changed slot became
    encoded_bytes = 0
    decided = []  # slots given hooks of ours; the user's hooks go on all the others
    waiting = []
    waited_storages: set[object] = set()  # counted once when several slots wait on one storage
    for name, (tensor, decision) in saved.items():
        if tensor is None:
            continue
        if not isinstance(decision, Decision):
            raise _unknown(decision, op, name)
        storage = storage_key(tensor, tracing)  # None for a parameter: it outlives the graph
        if storage is not None:
            stock_sizes[storage[0]] = storage[1]
        if decision is KEEP and storage is not None and not tracing and tensor.requires_grad:
            decision = _rebuild_or_keep(tensor)
        if isinstance(decision, EncodeWhenUnshared) and storage is None:
            decision = KEEP  # a parameter: it lives on, unshared never
        if decision is KEEP or (tracing and decision is not DROP) or tensor.numel() == 0:
            # (encodings are eager-only: tracing keeps the tensor; an empty one costs nothing)
            if storage is not None:
                kept_sizes[storage[0]] = storage[1]
            continue
        labels.append(decision.label)
        output = _output_index(tensor, outputs)
        node_name = node.name() if output is not None else None
        # stock checks a saved tensor's version only where no saved-tensor hooks are in play
        origin = Origin.of(tensor, node_name) if user_hooks is None and not tracing else None
        if decision is DROP:
            hook(node, name, Ghost(origin))
            decided.append(name)
        elif isinstance(decision, Encode):
            holder = Encoded(decision.codec, user_hooks, origin)
            hook(node, name, holder)
            encoded_bytes += holder.nbytes
            decided.append(name)
        elif isinstance(decision, EncodeWhenUnshared):
            kept_sizes[storage[0]] = storage[1]
            nbytes = 0 if storage[0] in waited_storages else storage[1]
            waited_storages.add(storage[0])
            holder = None
            # stock keeps a node's own output (one that requires grad) as a separate alias:
            # the tensor can die before the node; anything else it keeps as is, so a
            # deferred holder takes its place now
            if user_hooks is not None or output is None or not tensor.requires_grad:
                holder = Encoded(decision.codec, user_hooks, origin, deferred=True)
                hook(node, name, holder)
                decided.append(name)
            elif not decision.codec.values_exact and has_recipe(node):
                node.metadata.setdefault(UNSHARED_KEY, set()).add(name)  # no recipe may read it
            waiting.append((tensor, _Pending(node, name, decision.codec, holder, tensor, node_name, tallies, nbytes)))
        else:
            raise _unknown(decision, op, name)
    if user_hooks is not None:
        give_user_hooks(node, user_hooks, skip=decided)
    for tensor, entry in waiting:
        _track(tensor, entry)
    return Outcome(sum(stock_sizes.values()), sum(kept_sizes.values()) + encoded_bytes, labels)


def _rebuild_or_keep(tensor: Tensor) -> Decision:
    """A tensor this node keeps as it is, and that backward could rebuild from what the graph
    keeps anyway: rebuild it, once unshared (see :mod:`.recipes`)."""
    base, _view = view_in_base(tensor)
    grad_fn = base.grad_fn
    if grad_fn is None or not has_recipe(grad_fn):
        return KEEP
    tracked = _tracked(base)
    found = plan(tensor, None if tracked is None else tracked.plan)
    if found is None:
        return KEEP
    return EncodeWhenUnshared(Rebuild(*found))


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
