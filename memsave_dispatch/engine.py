"""The engine: the aten operator's Autograd kernel is ours.

A ``TorchDispatchMode`` runs below autograd, after autograd has already decided what to
save, so it cannot save anything. Replacing the operator's kernel at the Autograd dispatch
key does: every entry point (``F.conv2d``, ``nn.Conv2d``, functional code, C++
decompositions) reaches it, autocast has already cast the arguments, and the kernel decides
what the backward node keeps.

The kernel is registered for the ``Autograd`` alias key, not ``AutogradCPU``: the Python
dispatcher that torch.compile traces with resolves an operator's autograd kernel through the
alias, so a per-backend registration would be bypassed while compiling. The stock kernel of
every per-backend autograd key is captured first, and each call is forwarded to the one its
dispatch key set selects.

Registration is process-wide and, in PyTorch's dispatcher, not safe against other threads
dispatching the same operator at that moment (measured: replacing and restoring a kernel
while another thread runs it trips an internal assert). So a kernel is installed when a mode
that handles its operator is first entered, and stays installed; outside a mode (in this
thread) each call goes straight to the captured stock kernel. :func:`uninstall` restores the
stock kernels when no other thread is running PyTorch ops.

Per call, the engine decides whether the handler may take it (grad mode, devices, tracing,
tensor types), runs the stock kernel, hands the handler's decisions to :mod:`.slots`, and
records the outcome in the tallies of every active mode.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.nn import Parameter

from . import compiled, slots, state
from ._compat import (
    AUTOGRAD_RUNTIME_KEYS,
    DispatchKey,
    OpOverload,
    apply_function_untransformed,
    autograd_keyset,
    backward_running,
    below_autograd,
    default_hooks,
    destroy_library,
    forget_dispatch_resolution,
    forward_ad_active,
    functorch_transforms_active,
    has_composite_implicit_kernel,
    is_checkpoint_hooks,
    is_compiling,
    is_zero_tensor,
    jit_tracing,
    library,
    no_torch_function,
    op_short_name,
    python_dispatcher_enabled,
    proxy_tracing,
    saved_tensor_hooks_enabled,
    skip_in_dynamo,
    stock_kernel,
    traced_stock_kernel,
)
from .reasons import (
    CHECKPOINTED_REGION,
    DURING_BACKWARD,
    GRAD_MODE_OFF,
    IN_PLACE_ON_A_VIEW,
    INPUT_HANDED_BACK,
    NO_INPUT_REQUIRES_GRAD,
    NOTHING_TO_SAVE,
    device_not_enabled,
)
from .recipes import REBUILDS_AVAILABLE, has_recipe
from .registry import HandlerEntry
from .storage import storage_bytes

__all__ = ["DEVICES", "install", "uninstall", "installed", "leave", "pending_count"]

#: Device types a mode can be asked to handle, by the autograd dispatch key they run under.
DEVICES = {DispatchKey.AutogradCPU: "cpu", DispatchKey.AutogradCUDA: "cuda"}
_ALIAS = "Autograd"
_AUTOGRAD_KEYS = autograd_keyset()
_AUTOGRAD_CPU = DispatchKey.AutogradCPU

_install_lock = threading.RLock()
_installed: dict[OpOverload, Any] = {}  # op -> the library holding its kernel
_stock_kernels: dict[OpOverload, dict] = {}
# Where stock's tracer runs a Python kernel instead (a decomposition: dropout's into native_dropout,
# batch norm's), by autograd key. Outside a mode tracing gets it, as without us; inside one too
# for a composite operator (its traced form never reaches autograd whole, and its parts meet
# their own handlers), so that a compiled graph draws the same random numbers as stock's.
_traced_stock_kernels: dict[OpOverload, dict] = {}


# -- installing ----------------------------------------------------------------------------
def installed() -> frozenset[OpOverload]:
    return frozenset(_installed)


def install(ops: Iterable[OpOverload]) -> None:
    """Install the interposing kernel of each operator (idempotent), and where the compiled
    engine is loaded, its kernels over them."""
    ops = list(ops)
    with _install_lock:
        for op in ops:
            if op in _installed and compiled.needs_stock(op):  # the compiled engine loaded since
                destroy_library(_installed.pop(op))
        new = [op for op in ops if op not in _installed]
        compiled.capture(new)  # stock's kernels, before anything overrides them
        for op in new:
            _installed[op] = _install_kernel(op)
        for op in (*new, *compiled.install(ops)):
            forget_dispatch_resolution(op)


def uninstall() -> None:
    """Restore every stock kernel. Only call this while no other thread runs PyTorch ops."""
    with _install_lock:
        touched = [*compiled.uninstall(), *_installed]
        for lib in _installed.values():
            destroy_library(lib)
        _installed.clear()
        for op in touched:
            forget_dispatch_resolution(op)


def leave(mode: object) -> None:
    """``mode`` exited in this thread; once no mode is left, pending encodings are dropped."""
    if state.pop(mode):
        slots.forget_pending()


def pending_count() -> int:
    """Tensors of this thread with encodings waiting for their death, in either engine."""
    return slots.pending_count() + compiled.pending_count()


def _stock_kernels_of(op: OpOverload) -> dict:
    """The stock kernel of every per-backend autograd key, captured once (before ours)."""
    stocks = _stock_kernels.get(op)
    if stocks is None:
        stocks = {key: kernel for key in AUTOGRAD_RUNTIME_KEYS if (kernel := stock_kernel(op, key)) is not None}
        _stock_kernels[op] = stocks
        _traced_stock_kernels[op] = {key: kernel for key in DEVICES if (kernel := traced_stock_kernel(op, key))}
    return stocks


def _install_kernel(op: OpOverload) -> Any:
    stocks = _stock_kernels_of(op)
    lib = library()
    composite = has_composite_implicit_kernel(op)
    kernel = _make_kernel(op, stocks, composite)
    # A composite operator's CompositeImplicitAutograd kernel takes precedence over an
    # Autograd alias registration, so those get per-backend registrations instead (their
    # compiled form is decomposed before it reaches autograd anyway).
    keys = [key.name for key in DEVICES] if composite else [_ALIAS]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="(?s).*Overriding a previously registered kernel")
        for key in keys:
            lib.impl(op, kernel, key, with_keyset=True)
    return lib


def _make_kernel(op: OpOverload, stocks: dict, composite: bool):
    cpu_stock = stocks.get(_AUTOGRAD_CPU)
    traced_stocks = _traced_stock_kernels[op]
    op_id = id(op)
    scopes = state.scopes

    def kernel(keyset, *args, **kwargs):
        key = (keyset & _AUTOGRAD_KEYS).highestPriorityTypeId()
        stock = cpu_stock if key == _AUTOGRAD_CPU else stocks[key]
        active = scopes()
        entry = active[-1].entries.get(op_id) if active else None  # as of the mode's entry
        if (entry is None or composite) and key in traced_stocks and python_dispatcher_enabled():
            # stock's tracer decomposes here; a composite's parts meet their own handlers
            return traced_stocks[key](*args, **kwargs)
        if entry is None:
            return stock.call_boxed(keyset, *args, **kwargs)
        # The mode's own __torch_function__ has nothing to do with the library's internal
        # tensor calls; with it off they skip a Python round trip each.
        with no_torch_function():
            return _route(entry, DEVICES.get(key, key), stock, active, keyset, args, kwargs)

    kernel.__name__ = f"memsave_{op_short_name(op)}"
    # Compiled code runs with dynamo's frame hook set; eager operators it runs (graph breaks,
    # the aot_eager backend) reach this kernel, whose Python frames dynamo must not compile.
    # (The kernel still runs when AOTAutograd traces the operator: that is how the saving
    # policy gets compiled in.)
    skip_in_dynamo(kernel.__code__)
    return kernel


# -- routing one call ----------------------------------------------------------------------
def _route(entry: HandlerEntry, device, stock, active: list, keyset, args: tuple, kwargs: dict):
    handler = entry.handler
    full_arguments = entry.full_arguments(args, kwargs) if kwargs or len(args) < entry.arity else args
    if backward_running():
        if not torch.is_grad_enabled():
            return stock.call_boxed(keyset, *args, **kwargs)  # a backward formula's or a rebuild's own
        # create_graph's formulas, a reentrant checkpoint's recomputation: left to stock, so no
        # rebuild or encoding starts inside a backward pass
        reason = DURING_BACKWARD
    elif not torch.is_grad_enabled():
        reason = GRAD_MODE_OFF
    elif (
        handler.can_save is not None
        and not handler.can_save(*full_arguments)
        and not (entry.is_policy and _an_input_is_rebuildable(entry, args, kwargs))
    ):
        reason = NOTHING_TO_SAVE  # decided first: it is the cheapest way back to stock
    else:
        reason = _reason_for_stock(entry, device, active[-1].devices, args, kwargs)
        if reason is None and handler.unsupported is not None:
            reason = handler.unsupported(*full_arguments)
        if reason is None and entry.in_place and full_arguments[0]._base is not None:
            # autograd wraps the node of an in-place call on a view in a CopySlices node on
            # the base: its saved slots are out of a handler's reach
            reason = IN_PLACE_ON_A_VIEW
    user_hooks = default_hooks() if reason is None else None
    if user_hooks is not None and (is_checkpoint_hooks(user_hooks) or not saved_tensor_hooks_enabled()):
        # Non-reentrant checkpointing recomputes the region during backward, where calls run
        # stock, and the recomputation must save exactly what the first pass saved
        reason = CHECKPOINTED_REGION
    if reason is not None:
        _tally_stock(entry, active, reason)
        return stock.call_boxed(keyset, *args, **kwargs)
    if entry.is_policy:
        return _run_policy(entry, stock, active, keyset, args, kwargs, full_arguments, user_hooks)
    return _run_handler(entry, active, full_arguments)


def _tally_stock(entry: HandlerEntry, active: list, reason: str) -> None:
    for scope in active:
        scope.tallies.of(entry.op, entry.family).add_stock(reason)


def _run_policy(
    entry: HandlerEntry, stock, active: list, keyset, args: tuple, kwargs: dict, full_arguments: tuple, user_hooks
):
    previous = full_arguments[0].grad_fn if entry.in_place else None
    if user_hooks is None:
        outputs = stock.call_boxed(keyset, *args, **kwargs)
    else:
        outputs = slots.run_without_default_hooks(lambda: stock.call_boxed(keyset, *args, **kwargs))
    as_tuple = outputs if isinstance(outputs, tuple) else (outputs,)
    node = as_tuple[0].grad_fn
    if node is None:  # nothing required grad after all (e.g. integer outputs)
        return outputs
    if node is previous or (not entry.in_place and any(output is argument for output in as_tuple for argument in args)):
        # stock handed an input back (an empty or no-op dropout): the node is not this call's
        # to change, or has nothing to spare
        if user_hooks is not None and node is not previous:
            slots.give_user_hooks(node, user_hooks)
        _tally_stock(entry, active, INPUT_HANDED_BACK)
        return outputs
    handler = entry.handler
    saved = handler.saved(full_arguments, as_tuple)
    slots.check_slot_names(handler, entry.op, node, saved)
    tallies = [scope.tallies.of(entry.op, entry.family) for scope in active]
    tracing = is_compiling()
    outcome = slots.apply(entry.op, saved, node, as_tuple, user_hooks, tracing, tallies)
    for tally in tallies:
        tally.add_handled(outcome.stock_bytes, outcome.kept_bytes, tracing, outcome.labels)
    return outputs


# -- Handlers: the handler's own autograd.Function -------------------------------------------
class _Recorder:
    """Handed to a Handler's Function as its first argument: where its forward records."""

    __slots__ = ("tallies", "entry")

    def __init__(self, tallies: list, entry: HandlerEntry) -> None:
        self.tallies, self.entry = tallies, entry

    def record(self, args: tuple, outputs: Any, kept: Iterable[Tensor | None]) -> None:
        tracing = is_compiling()
        handler = self.entry.handler
        stock = None
        if handler.stock_saved is not None:
            as_tuple = outputs if isinstance(outputs, tuple) else (outputs,)
            stock = storage_bytes(handler.stock_saved(args, as_tuple), tracing)
        kept_bytes = storage_bytes(kept or (), tracing)
        for tally in self.tallies:
            tally.add_handled(stock, kept_bytes, tracing)


_functions: dict[type, Any] = {}


def _function_of(handler: type) -> Any:
    """The autograd.Function running ``handler`` (built once per handler)."""
    found = _functions.get(handler)
    if found is not None:
        return found
    handler_forward, handler_backward = handler.forward, handler.backward

    # Handler code runs with torch-function handling off: the mode's own __torch_function__
    # has nothing to do there and would cost a Python round trip per call.
    def forward(ctx, recorder, *args):
        with no_torch_function(), below_autograd():
            outputs = handler_forward(ctx, *args)
        recorder.record(args, outputs, ctx.to_save)
        return outputs

    def backward(ctx, *grads):
        with no_torch_function():
            gradients = handler_backward(ctx, *grads)
        return (None, *(gradients if isinstance(gradients, tuple) else (gradients,)))

    function = type(
        f"{handler.__name__}Function",
        (torch.autograd.Function,),
        {
            "forward": staticmethod(forward),
            "backward": staticmethod(backward),
            "__doc__": handler.__doc__,
            "__module__": handler.__module__,
            "memsave_handler": handler,  # lets the audit recognise the nodes it creates
        },
    )
    apply = apply_function_untransformed(function)
    return _functions.setdefault(handler, apply)


def _run_handler(entry: HandlerEntry, active: list, full_arguments: tuple):
    tallies = [scope.tallies.of(entry.op, entry.family) for scope in active]
    return _function_of(entry.handler)(_Recorder(tallies, entry), *full_arguments)


def _an_input_is_rebuildable(entry: HandlerEntry, args: tuple, kwargs: dict) -> bool:
    """Whether a tensor this call keeps could be rebuilt instead (its producer has a recipe):
    then the call is handled even where its handler would keep everything."""
    if not REBUILDS_AVAILABLE:
        return False
    for tensor in entry.tensor_arguments(args, kwargs):
        if tensor is not None and tensor.requires_grad:
            base = tensor if tensor._base is None else tensor._base
            if base.grad_fn is not None and has_recipe(base.grad_fn):
                return True
    return False


# -- when a call must run stock ----------------------------------------------------------------
def _not_enabled(device) -> str:
    if isinstance(device, str):
        return device_not_enabled(device)
    kind = device.name.removeprefix("Autograd")  # a dispatch key without a device of ours
    return "nested tensor" if kind == "NestedTensor" else f"device {kind.lower()} not supported"


def _reason_for_stock(entry: HandlerEntry, device, devices: frozenset[str], args: tuple, kwargs: dict) -> str | None:
    """Why this call must run stock PyTorch, or None when the handler may take it."""
    if device not in devices or device not in entry.handler.devices:
        return _not_enabled(device)
    if functorch_transforms_active():
        return "functorch transform"
    if jit_tracing():
        return "torch.jit tracing"
    if proxy_tracing() and not is_compiling():
        # make_fx (or export) records every tensor operation, the handlers' own included,
        # and cannot run data-dependent ones: trace stock's
        return "make_fx tracing"
    forward_ad_on = forward_ad_active()
    if forward_ad_on and not entry.is_policy:
        return "forward-mode AD"  # a Handler's Function has no jvp; policies keep stock's
    needs_grad = False
    for tensor in entry.tensor_arguments(args, kwargs):
        if tensor is None:
            continue
        kind = tensor.__class__
        if kind is not Tensor and kind is not Parameter:
            problem = _unsupported_tensor_type(kind)
            if problem is not None:
                return problem
        if tensor.layout is not _STRIDED:
            return f"layout {str(tensor.layout).removeprefix('torch.')}"
        if tensor.dtype in _UNSUPPORTED_DTYPES:
            return _UNSUPPORTED_DTYPES[tensor.dtype]
        if forward_ad_on and is_zero_tensor(tensor):
            return "efficient zero tensor"  # forward-AD formulas pass these for absent tangents
        if tensor.requires_grad:
            needs_grad = True
    if not needs_grad:
        return NO_INPUT_REQUIRES_GRAD
    return None


_TRACING_TENSORS = ("FunctionalTensor", "FakeTensor")
_STRIDED = torch.strided
# One dtype lookup instead of is_complex() and is_quantized per tensor.
_UNSUPPORTED_DTYPES = {
    **{dtype: "complex dtype" for dtype in (torch.complex32, torch.complex64, torch.complex128)},
    **{
        dtype: "quantized tensor"
        for dtype in (torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4)
        if isinstance(dtype, torch.dtype)
    },
}


def _unsupported_tensor_type(kind: type) -> str | None:
    name = kind.__name__
    if name in _TRACING_TENSORS and is_compiling():
        if proxy_tracing():
            return None  # AOTAutograd traces the graph: handle it, the saving gets compiled
        return "shape propagation"  # dynamo running ops on fake tensors: only outputs matter
    if name == "FakeTensor":
        return "fake tensor"
    return f"tensor subclass {kind.__name__}"
