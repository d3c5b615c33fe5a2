"""Where activation memory goes: the bytes an autograd graph keeps for backward.

:func:`audit` walks the graph behind an output and tabulates the storages it keeps, per
autograd node type and, when the forward pass ran inside :func:`track_modules`, per module
(with depth, like ``FlopCounterMode``). It reads what each node holds *without unpacking
it* (unpacking would decode encodings and run the user's hooks): built-in nodes' saved
slots, custom ``autograd.Function`` saved tensors (compiled graphs included), MemSaveMode's
encodings, and whatever the user's saved-tensor hooks packed. A storage held by several
nodes counts once, for the node created first in forward; parameters, the model's buffers
and the tensors in ``exclude`` are counted apart, as they live whatever autograd keeps.

    with track_modules(model):          # optional: per-module attribution
        loss = loss_fn(model(x), y)
    audit(loss, model=model).print(depth=2)

Tensors a custom Function hides in ``ctx`` attributes instead of ``save_for_backward``
cannot be seen by any tool; none of this library's handlers does that. Before torch 2.13 a
slot cannot be read in place: this library's slots are found through the node's metadata,
and any other slot is unpacked.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text
from torch import Tensor, nn

from ._compat import (
    SAVED_SLOTS_READABLE,
    autograd_function_of,
    is_wrapped_number,
    next_sequence_nr,
    node_sequence_nr,
    read_saved_slot,
    saved_slot,
    saved_slot_names,
    saved_value,
    tree_leaves,
)
from .holders import describe_holder, holder_of
from .report import format_bytes, render_text
from .storage import is_parameter, storage_key

__all__ = ["audit", "track_modules", "AuditReport", "NodeTypeSummary"]

_MODULE_KEY = "memsave_dispatch.module"
AS_STOCK = "as stock"
USER_HOOKS = "packed by saved-tensor hooks"


# -- reading a node without unpacking it ------------------------------------------------
def _tensors_in(packed: Any, depth: int = 0) -> Iterator[Tensor]:
    """Tensors inside what a pack hook returned (a tensor, containers, small objects)."""
    if isinstance(packed, Tensor):
        yield packed
    elif depth > 4 or packed is None or isinstance(packed, (str, bytes, int, float, bool, torch.device)):
        return
    elif isinstance(packed, (tuple, list)):
        for item in packed:
            yield from _tensors_in(item, depth + 1)
    elif isinstance(packed, dict):
        for item in packed.values():
            yield from _tensors_in(item, depth + 1)
    else:
        names = list(getattr(packed, "__dict__", {}))
        for cls in type(packed).__mro__:
            slots = cls.__dict__.get("__slots__", ())
            names.extend((slots,) if isinstance(slots, str) else slots)
        for name in names:
            yield from _tensors_in(getattr(packed, name, None), depth + 1)


def _read_slot(node, name: str, slot) -> tuple[str, list[Tensor]]:
    """(form, tensors) for one SavedVariable: what it holds and in which form."""
    try:
        unpack, packed = read_saved_slot(slot)
    except RuntimeError:  # released by a backward pass that did not retain the graph
        return "freed", []
    holder = holder_of(node, name, unpack)
    if holder is not None:
        form, kept = describe_holder(holder)
        return form, list(_tensors_in(kept))
    if unpack is not None:
        return USER_HOOKS, list(_tensors_in(packed))
    return AS_STOCK, [] if packed is None else [packed]


def _read_slot_by_unpacking(node, name: str) -> tuple[str, list[Tensor]]:
    """The same where slots cannot show what they hold (torch < 2.13): MemSaveMode's slots
    are found through the node's metadata; any other slot is unpacked, so one packed by the
    user's saved-tensor hooks shows as what their unpack hook returns."""
    holder = holder_of(node, name)
    if holder is not None:
        form, kept = describe_holder(holder)
        return form, list(_tensors_in(kept))
    try:
        try:
            value = saved_value(node, name)
        except AttributeError:  # a custom Function: its ctx's saved_tensors
            value = node.saved_tensors
    except RuntimeError as error:  # released by a backward pass, or modified in place since
        return ("freed" if "freed" in str(error) else "unreadable"), []
    return AS_STOCK, list(_tensors_in(value))


def _slots(node) -> Iterator[tuple[str, list[Tensor]]]:
    """(form, tensors) for every saved slot of ``node``."""
    for name in saved_slot_names(node):
        if not SAVED_SLOTS_READABLE:
            yield _read_slot_by_unpacking(node, name)
            continue
        try:
            value = saved_slot(node, name)
        except RuntimeError:  # a freed list of saved tensors
            continue
        for slot in value if isinstance(value, (list, tuple)) else (value,):
            yield _read_slot(node, name, slot)


def _is_memsave_node(node) -> bool:
    function = autograd_function_of(node)
    return function is not None and getattr(function, "memsave_handler", None) is not None


def _walk(roots: Iterable[Any]) -> Iterator[Any]:
    seen: set[int] = set()
    keep_alive = []  # ids stay unique while the wrappers live
    stack = [node for node in roots if node is not None]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        keep_alive.append(node)
        yield node
        stack.extend(next_node for next_node, _ in node.next_functions if next_node is not None)


# -- the result -------------------------------------------------------------------------
@dataclass
class NodeTypeSummary:
    """One autograd node type: how many nodes, how many MemSaveMode changed, what they keep."""

    nodes: int = 0
    changed_by_memsave: int = 0
    bytes: int = 0
    forms: Counter = field(default_factory=Counter)  # saved slots per form ("as stock", ...)

    def to_dict(self) -> dict[str, Any]:
        return {
            "nodes": self.nodes,
            "changed_by_memsave": self.changed_by_memsave,
            "bytes": self.bytes,
            "forms": dict(self.forms),
        }


@dataclass
class AuditReport:
    """Bytes an autograd graph keeps for backward, each storage counted once."""

    total_bytes: int
    excluded_bytes: int  # parameters, buffers and ``exclude``: alive regardless of the graph
    node_types: dict[str, NodeTypeSummary]
    modules: dict[str, int] | None  # bytes per module, submodules included (tracked forward)
    root_module: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "total_bytes": self.total_bytes,
            "excluded_bytes": self.excluded_bytes,
            "node_types": {name: row.to_dict() for name, row in self.node_types.items()},
            "modules": self.modules,
        }

    def table(self, depth: int = 2):
        """Rich tables that fit 80 columns (names and numbers never wrap): per node type, and
        per module down to ``depth`` when the forward pass was tracked."""

        by_type = Table(
            title="Kept for backward, per autograd node type",
            title_justify="left",
            show_footer=True,
            box=box.SIMPLE_HEAD,
            pad_edge=False,
            collapse_padding=True,
        )
        by_type.add_column("node type", "total", style="bold", no_wrap=True)
        by_type.add_column("nodes", str(sum(r.nodes for r in self.node_types.values())), justify="right", no_wrap=True)
        changed = str(sum(r.changed_by_memsave for r in self.node_types.values()))
        by_type.add_column("changed", changed, justify="right", no_wrap=True)
        by_type.add_column("bytes", format_bytes(self.total_bytes), justify="right", no_wrap=True)
        by_type.add_column("share", "100%", justify="right", no_wrap=True)
        forms = Text()
        for name, row in sorted(self.node_types.items(), key=lambda item: -item[1].bytes):
            share = f"{100 * row.bytes / self.total_bytes:.1f}%" if self.total_bytes else "-"
            by_type.add_row(name, str(row.nodes), str(row.changed_by_memsave), format_bytes(row.bytes), share)
            if row.forms:
                forms.append(f"{name}: ", style="bold")
                forms.append(", ".join(f"{n} {form}" for form, n in sorted(row.forms.items())) + "\n")
        caption = Text(
            f"Saved slots by what they hold, above. 'changed': nodes MemSaveMode changed. Each "
            f"storage counted once, for the node created first; parameters, buffers and excluded "
            f"tensors ({format_bytes(self.excluded_bytes)}) not counted.",
            style="dim",
        )
        by_type = Group(by_type, forms, caption)
        if self.modules is None:
            return by_type
        by_module = Table(title="Kept for backward, per module", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        by_module.add_column("module", style="bold", no_wrap=True)
        by_module.add_column("bytes", justify="right", no_wrap=True)
        by_module.add_column("share", justify="right", no_wrap=True)
        for name, nbytes in self.modules.items():
            level = 0 if name == self.root_module or name == _OUTSIDE else name.count(".") + 1
            if level > depth:
                continue
            share = f"{100 * nbytes / self.total_bytes:.1f}%" if self.total_bytes else "-"
            by_module.add_row("  " * level + name, format_bytes(nbytes), share)
        return Group(by_type, by_module)

    def print(self, depth: int = 2) -> None:

        Console().print(self.table(depth))

    def __str__(self) -> str:
        return render_text(self.table())


_OUTSIDE = "(outside any module)"


# -- the audit --------------------------------------------------------------------------
def audit(
    outputs: Tensor | Iterable[Tensor],
    *,
    model: nn.Module | None = None,
    exclude: Iterable[Tensor] = (),
    created_from: int | None = None,
) -> AuditReport:
    """Tabulate what the graph behind ``outputs`` keeps for backward.

    ``model``: its parameters and buffers are not counted (they live as long as the model);
    per-module rows need the forward pass to have run inside :func:`track_modules`.
    ``created_from``: count only nodes this thread created from that sequence number on
    (graphs the inputs came from are left out).
    """
    roots = [t.grad_fn for t in tree_leaves(outputs) if isinstance(t, Tensor)]
    nodes = list(_walk(roots))
    excluded: set[tuple] = set()

    state = [*exclude, *(() if model is None else (*model.parameters(), *model.buffers()))]
    for tensor in state:
        if (found := storage_key(tensor.detach())) is not None:
            excluded.add(found[0])

    owner: dict[tuple, tuple[int, str, int, str | None]] = {}  # storage -> (seq, type, bytes, module)
    excluded_bytes: dict[tuple, int] = {}
    node_types: dict[str, NodeTypeSummary] = defaultdict(NodeTypeSummary)
    tracked = False
    for node in nodes:
        sequence = node_sequence_nr(node)
        if created_from is not None and sequence < created_from:
            continue
        kind = type(node).__name__
        row = node_types[kind]
        row.nodes += 1
        module = None if kind == "AccumulateGrad" else node.metadata.get(_MODULE_KEY)
        tracked = tracked or module is not None
        changed = _is_memsave_node(node)
        for form, tensors in _slots(node):
            if form not in (AS_STOCK, USER_HOOKS, "freed"):
                changed = True
            if tensors or form != AS_STOCK:
                row.forms[form] += 1
            for tensor in tensors:
                if is_wrapped_number(tensor):
                    continue  # a Python scalar argument, not an activation
                found = storage_key(tensor.detach())
                if found is None:
                    continue
                key, nbytes = found
                if key in excluded or is_parameter(tensor):
                    excluded_bytes[key] = nbytes
                elif key not in owner or sequence < owner[key][0]:
                    owner[key] = (sequence, kind, nbytes, module)
        row.changed_by_memsave += changed
    for _sequence, kind, nbytes, _module in owner.values():
        node_types[kind].bytes += nbytes
    modules = None
    root = None
    if tracked:
        root = type(model).__name__ if model is not None else None
        modules = _module_totals(((module, nbytes) for _s, _k, nbytes, module in owner.values()), root)
    return AuditReport(
        total_bytes=sum(nbytes for _s, _k, nbytes, _m in owner.values()),
        excluded_bytes=sum(excluded_bytes.values()),
        node_types=dict(node_types),
        modules=modules,
        root_module=root,
    )


def _module_totals(attributed: Iterable[tuple[str | None, int]], root: str | None) -> dict[str, int]:
    """Bytes per module, each module including its submodules; rows in module order."""
    totals: dict[str, int] = {}
    for module, nbytes in attributed:
        if module is None:
            totals[_OUTSIDE] = totals.get(_OUTSIDE, 0) + nbytes
            continue
        parts = module.split(".") if module else []
        prefixes = [""] + [".".join(parts[: i + 1]) for i in range(len(parts))]
        for prefix in prefixes:
            name = prefix or (root or "(model)")
            totals[name] = totals.get(name, 0) + nbytes
    ordered = sorted(totals, key=lambda n: (n == _OUTSIDE, n != (root or "(model)"), n))
    return {name: totals[name] for name in ordered}


# -- module attribution -----------------------------------------------------------------
@contextmanager
def track_modules(model: nn.Module) -> Iterator[None]:
    """Record, in each autograd node built inside, the innermost module whose forward built it.

    Each module's forward-pre hook notes the nodes its inputs come from and where the node
    numbering stands; its forward hook walks back from its outputs, through the nodes its
    forward built (inner modules' included), and labels those no inner module labelled
    (innermost modules finish first, so they label first). The label lives in the node's
    ``metadata``, so it dies with the graph. Costs a few microseconds per node: for audits,
    not for training.
    """
    # per running forward: its input nodes (alive, so that their ids stay theirs), their ids,
    # and the number its first node gets
    boundaries: list[tuple[list, set[int], int]] = []

    def before(module, args, kwargs):
        inputs = [t.grad_fn for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor) and t.grad_fn is not None]
        boundaries.append((inputs, {id(node) for node in inputs}, next_sequence_nr()))

    def after(name: str):
        def hook(module, args, kwargs, output):
            _inputs, stop, first = boundaries.pop()
            stack = [t.grad_fn for t in tree_leaves(output) if isinstance(t, Tensor) and t.grad_fn is not None]
            visited, seen = [], set()
            while stack:
                node = stack.pop()
                if id(node) in stop or id(node) in seen:
                    continue
                seen.add(id(node))
                visited.append(node)  # ids stay unique while the wrappers live
                if type(node).__name__ == "AccumulateGrad" or node_sequence_nr(node) < first:
                    continue  # a leaf's node (keeps nothing), or built before this forward
                node.metadata.setdefault(_MODULE_KEY, name)  # an inner module's label stays
                stack.extend(n for n, _ in node.next_functions if n is not None)

        return hook

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(module.register_forward_hook(after(name), with_kwargs=True, always_call=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
