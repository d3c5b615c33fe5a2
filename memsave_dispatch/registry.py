"""The handler registry: which aten operators MemSaveMode reroutes, and how to call them.

A registration checks the handler against the operator's schema and precomputes what the
interposing kernel needs per call (argument defaults, where the tensors are, whether the
operator writes its first argument).
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import Tensor

from ._compat import OpOverload, OpOverloadPacket, op_schema, packet_name
from .authoring import Handler, SavingPolicy

__all__ = [
    "HandlerEntry",
    "RegistrationError",
    "register_handler",
    "unregister_handler",
    "registered_ops",
    "handler_for",
    "make_entry",
    "check_op",
]


class RegistrationError(TypeError):
    """A handler cannot be registered as given; the message says what to change."""


H = TypeVar("H", bound=type)


@dataclass(frozen=True)
class HandlerEntry:
    """A registered handler together with what the interposer needs to call it."""

    op: OpOverload
    handler: type
    family: str
    is_policy: bool  # a SavingPolicy (stock's node, re-hooked), else a Handler (own Function)
    defaults: tuple[Any, ...]  # per positional argument; _REQUIRED where there is none
    kwarg_defaults: tuple[tuple[str, Any], ...]  # keyword-only arguments, in schema order
    tensor_positions: tuple[int, ...]  # positional arguments typed Tensor, Tensor? or Tensor[]
    tensor_kwargs: tuple[str, ...]  # keyword-only arguments typed so
    # args -> the tensor_positions as a tuple; None unless every tensor argument is a
    # positional Tensor or Tensor? (lists and keyword-only tensors need collecting)
    pick_tensors: Callable[[tuple], tuple] | None = None
    arity: int = 0  # schema arguments, keyword-only ones included: a call with fewer needs defaults
    in_place: bool = False  # writes its first argument (relu_, dropout_)

    def full_arguments(self, args: tuple, kwargs: dict) -> tuple:
        """All schema arguments positionally, defaults filled in (boxed calls omit them)."""
        if len(args) < len(self.defaults):
            args = args + self.defaults[len(args) :]
        if self.kwarg_defaults:
            args = args + tuple(kwargs.get(name, default) for name, default in self.kwarg_defaults)
        return args

    def tensor_arguments(self, args: tuple, kwargs: dict) -> Sequence[Tensor | None]:
        """The tensors among the arguments of a boxed call (lists flattened; absent optional
        ones may be None)."""
        if self.pick_tensors is not None and not kwargs and len(args) > self.tensor_positions[-1]:
            return self.pick_tensors(args)  # the common case: one C-level itemgetter
        found: list[Tensor] = []
        count = len(args)
        for position in self.tensor_positions:
            if position < count:
                _collect_tensors(args[position], found)
        for name in self.tensor_kwargs:
            _collect_tensors(kwargs.get(name), found)
        return found


def _collect_tensors(value: Any, found: list) -> None:
    if isinstance(value, Tensor):
        found.append(value)
    elif isinstance(value, (list, tuple)):
        found.extend(item for item in value if isinstance(item, Tensor))


_REQUIRED = object()
_REGISTRY: dict[OpOverload, HandlerEntry] = {}


def check_op(op: object) -> OpOverload:
    if isinstance(op, OpOverloadPacket):
        name = packet_name(op)
        overloads = ", ".join(f"torch.ops.aten.{name}.{o}" for o in op.overloads())
        raise RegistrationError(
            f"{op} is an operator packet, not an overload; register the overload you mean "
            f"(one of: {overloads})"
        )
    if not isinstance(op, OpOverload):
        raise RegistrationError(
            f"handlers are registered for aten operator overloads such as "
            f"torch.ops.aten.relu.default, got {op!r} ({type(op).__name__}); to change what a "
            f"Python function or module saves, find the aten operator it calls "
            f"(e.g. with torch.profiler or a TorchDispatchMode)"
        )
    if op.namespace != "aten":
        raise RegistrationError(
            f"{op} is not an aten operator; only aten operators can be intercepted "
            f"(a custom operator already controls what it saves via torch.library.register_autograd)"
        )
    return op


def _require(handler: type, part: str, count: int, what: str) -> None:
    fn = getattr(handler, part, None)
    if fn is None or not callable(fn):
        raise RegistrationError(f"{handler.__name__} has no {part}(); {what}")
    try:
        inspect.signature(fn).bind(*range(count))
    except TypeError as error:
        raise RegistrationError(f"{handler.__name__}.{part} has the wrong signature ({error}); {what}") from None


def _check_handler(op: OpOverload, handler: type) -> None:
    if not isinstance(handler, type) or not issubclass(handler, (Handler, SavingPolicy)):
        raise RegistrationError(
            f"register_handler({op}) decorates a subclass of memsave_dispatch.handlers.SavingPolicy "
            f"or memsave_dispatch.handlers.Handler, got {handler!r}"
        )
    family = getattr(handler, "family", None)
    if not isinstance(family, str) or not family:
        raise RegistrationError(
            f"{handler.__name__}.family is {family!r}; give it a non-empty name to select it by, "
            f"such as family = \"conv\" (any string)"
        )
    schema = op_schema(op)
    if issubclass(handler, SavingPolicy):
        _require(handler, "saved", 2, "a SavingPolicy defines saved(args, outputs) as a static method")
        return
    n_args, n_outputs = len(schema.arguments), len(schema.returns)
    _require(
        handler, "forward", 1 + n_args,
        f"a Handler defines forward(ctx, *op_args) taking ctx plus the {n_args} arguments of {schema}",
    )
    _require(
        handler, "backward", 1 + n_outputs,
        f"a Handler defines backward(ctx, *grad_outputs) taking ctx plus {n_outputs} output gradient(s)",
    )


def register_handler(*ops: OpOverload, override: bool = False) -> Callable[[H], H]:
    """Class decorator: route ``ops`` through the decorated handler inside MemSaveMode.

    Raises RegistrationError for something that is not an aten operator overload, a handler
    without its parts or with the wrong signature, and for an operator that already has a
    handler unless ``override=True``.
    """
    if not ops:
        raise RegistrationError("register_handler needs at least one aten operator overload")
    checked = [check_op(op) for op in ops]

    def decorate(handler: H) -> H:
        entries = [make_entry(op, handler) for op in checked]
        for op in checked:
            if op in _REGISTRY and not override:
                raise RegistrationError(
                    f"{op} already has the handler {_REGISTRY[op].handler.__qualname__}; pass "
                    f"override=True to replace it, or unregister_handler({op}) first"
                )
        for op, entry in zip(checked, entries):
            _REGISTRY[op] = entry
        return handler

    return decorate


def _is_tensor_typed(argument) -> bool:
    return "Tensor" in str(argument.type)


def make_entry(op: OpOverload, handler: type) -> HandlerEntry:
    """Check ``handler`` against ``op`` and precompute how to call it (RegistrationError
    says what is wrong). Used for the global registry and for a mode's own handlers."""
    check_op(op)
    _check_handler(op, handler)
    arguments = op_schema(op).arguments
    positional = [a for a in arguments if not a.kwarg_only]
    keyword_only = [a for a in arguments if a.kwarg_only]

    def default(argument) -> Any:
        return argument.default_value if argument.has_default_value() else _REQUIRED

    tensor_positions = tuple(i for i, a in enumerate(positional) if _is_tensor_typed(a))
    plain = not any(_is_tensor_typed(a) for a in keyword_only) and all(
        str(a.type) in ("Tensor", "Optional[Tensor]") for a in positional if _is_tensor_typed(a)
    )
    return HandlerEntry(
        op=op,
        handler=handler,
        family=handler.family,
        is_policy=issubclass(handler, SavingPolicy),
        defaults=tuple(default(a) for a in positional),
        kwarg_defaults=tuple((a.name, default(a)) for a in keyword_only),
        tensor_positions=tensor_positions,
        tensor_kwargs=tuple(a.name for a in keyword_only if _is_tensor_typed(a)),
        pick_tensors=_tuple_getter(tensor_positions) if plain and tensor_positions else None,
        arity=len(arguments),
        in_place=bool(positional) and positional[0].alias_info is not None and positional[0].alias_info.is_write,
    )


def _tuple_getter(positions: tuple[int, ...]) -> Callable[[tuple], tuple]:
    """``args -> tuple(args[i] for i in positions)`` in C (itemgetter returns a bare item for
    one position, so that case asks for it twice)."""
    return operator.itemgetter(*positions) if len(positions) > 1 else operator.itemgetter(positions[0], positions[0])


def unregister_handler(op: OpOverload) -> type:
    """Remove the handler of ``op`` (later calls run stock PyTorch); returns it."""
    check_op(op)
    try:
        entry = _REGISTRY.pop(op)
    except KeyError:
        raise KeyError(f"{op} has no registered handler; registered: {sorted(map(str, _REGISTRY))}") from None
    return entry.handler


def handler_for(op: OpOverload) -> HandlerEntry | None:
    return _REGISTRY.get(op)


def registered_ops() -> Sequence[OpOverload]:
    return tuple(_REGISTRY)

