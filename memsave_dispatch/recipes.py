"""Recipes: rebuilding a saved tensor in backward from what the graph keeps anyway.

A node often keeps a tensor that backward could recompute exactly from tensors other nodes
keep anyway: a transformer's dropped-out attention probabilities (the softmax keeps the
probabilities, the dropout its 1-bit mask), a LoRA branch's dropped-out input (the LayerNorm
before it keeps its input), the GELU output a linear layer keeps (the GELU keeps its input).
Re-running the same stock kernel on the same inputs gives the same bits, so such a tensor can
be dropped and rebuilt when backward unpacks it; the cost is one cheap kernel.

A recipe is registered per autograd node type (:func:`register_recipe`): given a node, it
says which operator produced the node's output, and from what: the node's saved tensors
(:class:`Slot`), its inputs, each rebuilt by its own node's recipe (:class:`Input`), the
node's saved non-tensor attributes (:class:`Attr`), or what a handler noted on the node
(:class:`Noted`, e.g. the LayerNorm's epsilon, which its node does not keep).

Rules that keep a rebuild exact and never above stock:

- the recipe re-runs the stock operator, never a formula (LayerNorm's output recomputed from
  mean and rstd differs in the last bits);
- it reads only slots that give back the very values saved: stock's own, or an encoding whose
  codec is ``values_exact`` (dropout's noise, two-valued), never a ReLU mask;
- the slots it reads belong to the producer's nodes, which backward runs after the consumer,
  so they are still there; reading them runs their own version checks: a tensor a recipe
  reads that was modified in place raises stock's error;
- whether to rebuild is decided by the bytes: the consumer's slot waits, like an unshared
  encoding, until the tensor dies, and drops it only if that frees its storage;
- if a backward pass runs a producer node first (an auxiliary loss through the trunk frees
  its slots), the consumer's tensor is rebuilt then and kept, as stock would have kept it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._compat import (
    SAVED_SLOTS_READABLE,
    OpOverload,
    no_torch_function,
    op_short_name,
    saved_slot_names,
    saved_value,
)
from .codecs import Codec
from .holders import UNSHARED_KEY, inspect_slot
from .storage import is_parameter, view_in_base

__all__ = [
    "REBUILDS_AVAILABLE",
    "Slot",
    "Input",
    "Attr",
    "Noted",
    "OutputDtype",
    "Recipe",
    "register_recipe",
    "unregister_recipe",
    "note",
    "plan",
    "has_recipe",
    "keeps",
    "Plan",
    "Rebuild",
    "MAX_DEPTH",
]


#: Whether this torch release lets the mode rebuild tensors (2.13 and later: a saved slot can be
#: read without unpacking it). Before, recipes are registered but never used: such tensors are
#: kept as stock keeps them.
REBUILDS_AVAILABLE: bool = SAVED_SLOTS_READABLE


class Slot(NamedTuple):
    """A tensor the node saved: ``node._saved_<name>`` (``optional``: may be None, like a
    LayerNorm's absent weight)."""

    name: str
    optional: bool = False


class Input(NamedTuple):
    """The node's ``index``-th input, rebuilt by the recipe of the node that produced it."""

    index: int


class Attr(NamedTuple):
    """A non-tensor the node saved: ``node._saved_<name>``."""

    name: str


class Noted(NamedTuple):
    """A value a handler noted on the node with :func:`note` (its node does not keep it)."""

    key: str


class OutputDtype(NamedTuple):
    """The dtype of the tensor being rebuilt (for a cast: ``_to_copy(x, dtype=...)``); known
    only for the tensor a node keeps, not for the inputs rebuilt on the way."""


class Recipe(NamedTuple):
    """``op(*args, **kwargs)`` (its ``output``-th result for a tuple) is the node's output.
    ``op=None`` with one ``Slot`` argument: the node keeps its own output there."""

    op: OpOverload | None
    args: tuple = ()
    kwargs: dict = {}
    output: int | None = None


RecipeFactory = Callable[[Any], "Recipe | None"]
_RECIPES: dict[str, RecipeFactory] = {}
#: Called with the node type names that have a recipe whenever they change (the compiled
#: engine hands every call with an input such a node produced to the Python engine).
_LISTENERS: list[Callable[[tuple[str, ...]], None]] = []


def recipe_node_types() -> tuple[str, ...]:
    """The node type names with a recipe that rebuilds can use (none before torch 2.13)."""
    return tuple(_RECIPES) if REBUILDS_AVAILABLE else ()


def on_recipes_changed(listener: Callable[[tuple[str, ...]], None]) -> None:
    """Call ``listener(recipe_node_types())`` now and whenever a recipe is registered or removed."""
    _LISTENERS.append(listener)
    listener(recipe_node_types())


def _changed() -> None:
    for listener in _LISTENERS:
        listener(recipe_node_types())


_NOTES_KEY = "memsave_dispatch.noted"
MAX_DEPTH = 8  # a recipe re-runs at most this many operators in a chain


def register_recipe(*node_types: str, override: bool = False) -> Callable[[RecipeFactory], RecipeFactory]:
    """Decorate ``factory(node) -> Recipe | None``: how the output of a node of these types
    (``type(grad_fn).__name__``, e.g. ``"GeluBackward0"``) is rebuilt; None where it cannot be
    (say, for an attribute value the recipe does not cover)."""
    if not node_types or not all(isinstance(name, str) and name for name in node_types):
        raise TypeError(
            f"register_recipe takes autograd node type names such as 'GeluBackward0' "
            f"(type(tensor.grad_fn).__name__), got {node_types!r}"
        )

    def decorate(factory: RecipeFactory) -> RecipeFactory:
        for name in node_types:
            if name in _RECIPES and not override:
                raise ValueError(f"{name} already has a recipe; pass override=True to replace it")
        for name in node_types:
            _RECIPES[name] = factory
        _changed()
        return factory

    return decorate


def unregister_recipe(node_type: str) -> RecipeFactory:
    factory = _RECIPES.pop(node_type)
    _changed()
    return factory


def note(node: Any, **values: Any) -> None:
    """In a handler: keep values a recipe needs that the node itself does not save."""
    node.metadata.setdefault(_NOTES_KEY, {}).update(values)


# -- binding recipes to a graph ------------------------------------------------------------
@dataclass(eq=False)
class _Bound:
    """A recipe bound to its node, and its inputs' bound recipes."""

    node: Any
    recipe: Recipe
    dtype: torch.dtype | None  # of the output, where known
    inputs: dict[int, _Bound] = field(default_factory=dict)

    def run(self) -> Tensor:
        recipe = self.recipe
        args = tuple(self._value(arg) for arg in recipe.args)
        if recipe.op is None:
            return args[0]
        kwargs = {key: self._value(value) for key, value in recipe.kwargs.items()}
        result = recipe.op(*args, **kwargs)
        return result if recipe.output is None else result[recipe.output]

    def _value(self, spec: Any) -> Any:
        if isinstance(spec, Slot):
            return saved_value(self.node, spec.name)  # unpacks: the slot's own version check
        if isinstance(spec, Input):
            return self.inputs[spec.index].run()
        if isinstance(spec, Attr):
            return saved_value(self.node, spec.name)
        if isinstance(spec, Noted):
            return self.node.metadata[_NOTES_KEY][spec.key]
        if isinstance(spec, OutputDtype):
            return self.dtype
        return spec

    def nodes(self) -> list[Any]:
        return [self.node, *(node for bound in self.inputs.values() for node in bound.nodes())]

    def readable(self) -> bool:
        """Whether every slot the recipe reads still holds its tensor (a backward pass that
        ran the node since freed them)."""
        for spec in self.recipe.args + tuple(self.recipe.kwargs.values()):
            if isinstance(spec, Slot) and not _readable(self.node, spec):
                return False
        return all(bound.readable() for bound in self.inputs.values())

    def describe(self) -> str:
        name = type(self.node).__name__
        parts = []
        for spec in self.recipe.args:
            if isinstance(spec, Slot):
                parts.append(f"{name}.{spec.name}")
            elif isinstance(spec, Input):
                parts.append(self.inputs[spec.index].describe())
        if self.recipe.op is None:
            return parts[0]
        return f"{op_short_name(self.recipe.op)}({', '.join(parts)})"


def _readable(node: Any, slot: Slot) -> bool:
    """Whether the slot gives back the very values saved, now and later: stock's own (no
    handler of this library will change it) or a values-exact encoding."""
    if slot.name not in saved_slot_names(node):
        return False
    state = inspect_slot(node, slot.name)
    if not state.defined:
        return slot.optional  # undefined, or freed by a backward pass: the same to look at
    if state.holder is not None:
        return state.holder.values_exact()
    return not state.user_hooks and slot.name not in node.metadata.get(UNSHARED_KEY, ())


def _a_freed_parameter(node: Any, name: str) -> bool:
    """Whether the slot holds a parameter whose memory is gone for now (FSDP2 frees a unit's
    gathered parameters after its forward): it is there again for its own node's backward, not
    necessarily for a consumer's rebuild."""
    if inspect_slot(node, name).holder is not None:
        return False  # an encoding of this library's, never a parameter: not decoded here
    value = saved_value(node, name)  # stock's own slot: the tensor itself
    return value is not None and is_parameter(value) and value.untyped_storage().nbytes() == 0


def keeps(node: Any, name: str) -> bool:
    """Whether the node keeps a tensor in slot ``name`` (stock's, or one of this library's
    holders): for a recipe to choose between reading an operand and rebuilding it."""
    return inspect_slot(node, name).defined


def has_recipe(node: Any) -> bool:
    return type(node).__name__ in _RECIPES


def _bind(node: Any, output_nr: int, dtype: torch.dtype | None, depth: int) -> _Bound | None:
    if node is None or depth > MAX_DEPTH:
        return None
    factory = _RECIPES.get(type(node).__name__)
    recipe = factory(node) if factory is not None else None
    if recipe is None or output_nr != 0:
        return None
    bound = _Bound(node, recipe, dtype)
    specs = (*recipe.args, *recipe.kwargs.values())
    for spec in specs:
        if isinstance(spec, Slot) and (not _readable(node, spec) or _a_freed_parameter(node, spec.name)):
            return None
        if isinstance(spec, OutputDtype) and dtype is None:
            return None
        if isinstance(spec, Noted) and spec.key not in node.metadata.get(_NOTES_KEY, {}):
            return None
        if isinstance(spec, Input):
            edges = node.next_functions
            if spec.index >= len(edges) or edges[spec.index][0] is None:
                return None
            child = _bind(edges[spec.index][0], edges[spec.index][1], None, depth + 1)
            if child is None:
                return None
            bound.inputs[spec.index] = child
    if recipe.op is None and not (len(recipe.args) == 1 and isinstance(recipe.args[0], Slot)):
        return None
    return bound


class Plan:
    """How to rebuild one base tensor. Its consumers (a view of it each, or itself) share the
    plan: the first unpack rebuilds the base, the others read the same tensor, which lives as
    long as a consumer may still need it, as stock's kept tensor would have."""

    def __init__(self, base: _Bound, tensor: Tensor) -> None:
        self.base = base
        self.layout = (tensor.shape, tensor.stride(), tensor.dtype, tensor.device)
        self.version = tensor._version
        self._rebuilt: Tensor | None = None
        self._armed = False

    def readable(self) -> bool:
        return self.base.readable()

    def run_base(self) -> Tensor:
        rebuilt = self._rebuilt
        if rebuilt is None:
            with torch.no_grad(), _autocast_off(), no_torch_function():
                rebuilt = self.base.run()
            shape, stride, dtype, device = self.layout
            if rebuilt.dtype != dtype or rebuilt.shape != shape:
                raise RuntimeError(
                    f"memsave_dispatch: rebuilding {self.base.describe()} gave {rebuilt.dtype} "
                    f"{tuple(rebuilt.shape)}, not the {dtype} {tuple(shape)} saved; a recipe "
                    f"registered for {type(self.base.node).__name__} is wrong"
                )
            if rebuilt.stride() != stride or rebuilt.device != device:  # (a cast to a layout)
                with torch.no_grad():
                    rebuilt = torch.empty_strided(shape, stride, dtype=dtype, device=device).copy_(rebuilt)
            self._rebuilt = rebuilt
        return rebuilt

    def arm(self) -> None:
        """A consumer dropped its tensor for good. If a backward pass runs one of the recipe's
        nodes before every consumer unpacked it (it frees their slots), rebuild the base then:
        the consumers read that instead."""
        if self._armed:
            return
        self._armed = True
        handles: list = []
        reference = weakref.ref(self)

        def before_a_producer_runs(_grad_outputs):
            for handle in handles:
                handle.remove()
            handles.clear()
            plan = reference()
            if plan is not None:
                plan.run_base()

        for node in self.base.nodes():
            handles.append(node.register_prehook(before_a_producer_runs))

    def describe(self) -> str:
        return self.base.describe()


class _autocast_off:
    """Rebuild with autocast off: the casts forward made are in the graph (ToCopy nodes)."""

    def __enter__(self) -> None:
        self._contexts = [torch.autocast(kind, enabled=False) for kind in ("cpu", "cuda") if _autocast_known(kind)]
        for context in self._contexts:
            context.__enter__()

    def __exit__(self, *exc_info) -> None:
        for context in reversed(self._contexts):
            context.__exit__(*exc_info)


def _autocast_known(kind: str) -> bool:
    return kind == "cpu" or torch.cuda.is_available()


def plan(tensor: Tensor, made: Plan | None = None) -> tuple[Plan, tuple | None] | None:
    """A plan to rebuild ``tensor`` (and, for a view, its place in its base), or None.
    ``made``: the plan another consumer of the same base already has (shared, so that one
    rebuild serves them all), if the base has not changed since."""
    if not REBUILDS_AVAILABLE:
        return None  # before torch 2.13, reading a slot would unpack it (and run its hooks)
    base, geometry = view_in_base(tensor)
    if made is None or made.version != base._version:
        bound = _bind(base.grad_fn, base.output_nr, base.dtype, 0)
        if bound is None:
            return None
        made = Plan(bound, base)
    return made, geometry


class Rebuild(Codec):
    """Keeps nothing of the tensor (the plan reads the slots the graph keeps anyway); decodes
    by rebuilding the base (then the view, for a view)."""

    name = "rebuilt"
    values_exact = True

    def __init__(self, plan: Plan, geometry: tuple | None) -> None:
        self.plan, self.geometry = plan, geometry

    def encode(self, tensor: Tensor) -> tuple[tuple[Tensor, ...], object]:
        return (), None

    def decode(self, kept: tuple[Tensor, ...], meta: object) -> Tensor:
        base = self.plan.run_base()
        return base if self.geometry is None else base.as_strided(*self.geometry)

    def still_valid(self, meta: object) -> bool:
        return self.plan.readable()

    def describe(self, meta: object) -> str:
        return f"rebuilt: {self.plan.describe()}"

    def commit(self, meta: object) -> None:
        self.plan.arm()
