"""The handler registry: which aten operators MemSaveMode reroutes, and how.

Two kinds of handler, both registered with :func:`register_handler`:

``SavingPolicy`` keeps stock's autograd formula (same ``grad_fn``, same backward kernel) and
only decides, per tensor the stock node saves, whether to keep it, drop it (backward reads a
zero-memory ghost of the same layout) or keep an exact encoding::

    @register_handler(torch.ops.aten.convolution.default)
    class Convolution(SavingPolicy):
        family = "conv"

        @staticmethod
        def saved(args, outputs):
            input, weight = args[0], args[1]
            return {
                "input": Saved(input, KEEP if weight.requires_grad else DROP),
                "weight": Saved(weight, KEEP),
            }

``Handler`` replaces the formula with your own, written like a ``torch.autograd.Function``::

    @register_handler(torch.ops.aten.my_op.default)
    class MyOp(Handler):
        @staticmethod
        def forward(ctx, *op_args):   # runs below autograd: call the op directly
            ...
        @staticmethod
        def backward(ctx, *grad_outputs):   # one gradient (or None) per op argument
            ...

Both receive every operator argument positionally, defaults filled in.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor
from torch._ops import OpOverload, OpOverloadPacket

__all__ = [
    "Handler",
    "SavingPolicy",
    "HandlerEntry",
    "RegistrationError",
    "register_handler",
    "unregister_handler",
    "registered_ops",
    "handler_for",
    "FAMILIES",
]

FAMILIES = ("conv", "linear", "norm", "pooling", "activation", "dropout", "custom")


class RegistrationError(TypeError):
    """A handler cannot be registered as given; the message says what to change."""


class _HandlerBase:
    family: ClassVar[str] = "custom"
    devices: ClassVar[frozenset[str]] = frozenset({"cpu"})
    unsupported: ClassVar[Callable[..., str | None] | None] = None
    """``unsupported(*args) -> str | None``: a reason to leave this call to stock PyTorch
    (counted in the report), or None to handle it."""
    can_save: ClassVar[Callable[..., bool] | None] = None
    """``can_save(*args) -> bool``, decided before the call: False when handling it cannot
    reduce what is kept (every tensor stock keeps is needed). The call then runs stock
    untouched, counted as "nothing to save", and skips the handler's overhead."""
    stock_keeps: ClassVar[Callable[..., Iterable[Tensor]] | None] = None
    """``stock_keeps(*args)``: where ``can_save`` is False, the inputs stock's node keeps
    (default: every tensor argument). A deferred encoding of one of them (a ReLU output) is
    then not made, or undone if an earlier consumer's release made it: the tensor lives on."""


class SavingPolicy(_HandlerBase):
    """Stock's autograd formula; ``saved(args, outputs)`` decides what its node keeps.

    ``saved`` returns, by slot name (the ``<name>`` of ``grad_fn._saved_<name>``), a
    :class:`~memsave_dispatch.policy.Saved` pair: the tensor stock saves there (None if
    none) and a decision: ``KEEP``, ``DROP``, ``Encode(codec)`` or
    ``EncodeWhenReleased(codec)``. Slots it does not name are kept. The report counts the
    bytes of every tensor named.
    """

    saved: ClassVar[Callable[[tuple, tuple], Mapping[str, Any]]]
    released: ClassVar[Callable[..., Iterable[Tensor]] | None] = None
    """``released(*args)``: the inputs this call will not keep (dropped in ``saved``, or never
    saved by stock, like the input of a ``mean``). Asked before the operator runs, so that a
    deferred encoding of such a tensor (a ReLU output) reads it while it is still in cache,
    not after the operator's kernel has evicted it. Inputs dropped in ``saved`` and not named
    here are released after the call."""


class Handler(_HandlerBase):
    """Your own autograd formula for an operator, as ``forward``/``backward`` static methods.

    Optional hooks:

    - ``stock_saved(args, outputs) -> Iterable[Tensor | None]``: the tensors stock autograd
      would have kept for this call, for the report's "stock keeps" column. None: unknown.

    Save tensors with ``ctx.save_for_backward`` (``memsave_dispatch.saving.save_needed``
    helps) so that saved-tensor hooks, ``save_on_cpu`` and version checks see them.
    """

    forward: ClassVar[Callable[..., Any]]
    backward: ClassVar[Callable[..., Any]]
    stock_saved: ClassVar[Callable[[tuple, tuple], Iterable[Tensor | None]] | None] = None


H = TypeVar("H", bound=type)


@dataclass(frozen=True)
class HandlerEntry:
    """A registered handler together with what the interposer needs to call it."""

    op: OpOverload
    handler: type
    family: str
    function: type[torch.autograd.Function] | None  # None for a SavingPolicy
    defaults: tuple[Any, ...]  # per positional argument; _REQUIRED where there is none
    kwarg_defaults: tuple[tuple[str, Any], ...]  # keyword-only arguments, in schema order
    tensor_positions: tuple[int, ...]  # positional arguments typed Tensor, Tensor? or Tensor[]
    tensor_kwargs: tuple[str, ...]  # keyword-only arguments typed so
    # args -> the tensor_positions as a tuple; None unless every tensor argument is a
    # positional Tensor or Tensor? (lists and keyword-only tensors need collecting)
    pick_tensors: Callable[[tuple], tuple] | None = None
    arity: int = 0  # schema arguments, keyword-only ones included: a call with fewer needs defaults
    in_place: bool = False  # writes its first argument (relu_, dropout_)

    @property
    def is_policy(self) -> bool:
        return self.function is None

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
_listeners: list[Callable[[OpOverload], None]] = []


def _check_op(op: object) -> OpOverload:
    if isinstance(op, OpOverloadPacket):
        name = op._qualified_op_name.split("::")[1]
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
            f"register_handler({op}) decorates a subclass of memsave_dispatch.SavingPolicy "
            f"or memsave_dispatch.Handler, got {handler!r}"
        )
    if handler.family not in FAMILIES:
        raise RegistrationError(f"{handler.__name__}.family is {handler.family!r}; choose one of {FAMILIES}")
    schema = op._schema
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


_C_APPLY = torch._C._FunctionBase.__dict__["apply"]


def _build_function(op: OpOverload, handler: type) -> type[torch.autograd.Function]:
    from . import accounting  # late: accounting imports the interposer, which imports us

    handler_forward = handler.forward
    handler_backward = handler.backward

    # Handler code runs with torch-function handling off: the mode's own __torch_function__
    # has nothing to do there and would cost a Python round trip per call.
    def forward(ctx, *args):
        with torch._C.DisableTorchFunction(), torch._C._AutoDispatchBelowAutograd():
            outputs = handler_forward(ctx, *args)
        accounting.record_handled(op, handler, args, outputs, ctx.to_save)
        return outputs

    def backward(ctx, *grads):
        with torch._C.DisableTorchFunction():
            return handler_backward(ctx, *grads)

    function = type(
        f"{handler.__name__}Function",
        (torch.autograd.Function,),
        {
            "forward": staticmethod(forward),
            "backward": staticmethod(backward),
            "__doc__": handler.__doc__,
            "__module__": handler.__module__,
        },
    )
    # The C-level apply: Function.apply's Python wrapper only adds functorch bookkeeping,
    # and calls under functorch transforms never reach a handler.
    function.apply_untransformed = _C_APPLY.__get__(None, function)
    function.memsave_handler = handler  # lets the audit recognise the nodes it creates
    return function


def register_handler(*ops: OpOverload, override: bool = False) -> Callable[[H], H]:
    """Class decorator: route ``ops`` through the decorated handler inside MemSaveMode.

    Raises RegistrationError for something that is not an aten operator overload, a handler
    without its parts or with the wrong signature, and for an operator that already has a
    handler unless ``override=True``.
    """
    if not ops:
        raise RegistrationError("register_handler needs at least one aten operator overload")
    checked = [_check_op(op) for op in ops]

    def decorate(handler: H) -> H:
        for op in checked:
            _check_handler(op, handler)
            if op in _REGISTRY and not override:
                raise RegistrationError(
                    f"{op} already has the handler {_REGISTRY[op].handler.__qualname__}; pass "
                    f"override=True to replace it, or unregister_handler({op}) first"
                )
        for op in checked:
            _REGISTRY[op] = _make_entry(op, handler)
            for listener in _listeners:
                listener(op)
        return handler

    return decorate


def _is_tensor_typed(argument) -> bool:
    return "Tensor" in str(argument.type)


def _make_entry(op: OpOverload, handler: type) -> HandlerEntry:
    arguments = op._schema.arguments
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
        function=None if issubclass(handler, SavingPolicy) else _build_function(op, handler),
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
    _check_op(op)
    try:
        entry = _REGISTRY.pop(op)
    except KeyError:
        raise KeyError(f"{op} has no registered handler; registered: {sorted(map(str, _REGISTRY))}") from None
    return entry.handler


def handler_for(op: OpOverload) -> HandlerEntry | None:
    return _REGISTRY.get(op)


def registered_ops() -> Sequence[OpOverload]:
    return tuple(_REGISTRY)


def on_register(listener: Callable[[OpOverload], None]) -> None:
    """Call ``listener(op)`` for every later registration (the interposer installs it)."""
    _listeners.append(listener)
