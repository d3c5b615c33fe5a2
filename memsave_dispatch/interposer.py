"""Dispatcher-level interposition: the aten operator's Autograd kernel is ours.

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
while another thread runs it trips an internal assert). So the kernels are installed once,
on the first entry into a MemSaveMode, and stay installed; outside a mode (in this thread)
each call goes straight to the captured stock kernel, behaving exactly as stock.
:func:`uninstall` restores the stock kernels when no other thread is running PyTorch ops.
"""

from __future__ import annotations

import threading
import warnings

import torch
from torch import Tensor
from torch._C import DispatchKey
from torch._ops import OpOverload
from torch.autograd import forward_ad
from torch.library import Library
from torch.nn import Parameter

from . import registry
from ._compat import is_compiling

__all__ = ["install", "uninstall", "installed", "active_modes", "DEVICES"]

#: Device types a mode can be asked to handle, by the autograd dispatch key they run under.
DEVICES = {DispatchKey.AutogradCPU: "cpu", DispatchKey.AutogradCUDA: "cuda"}
_ALIAS = "Autograd"
_RUNTIME_KEYS = tuple(
    getattr(DispatchKey, name)
    for name in DispatchKey.__members__
    if name.startswith("Autograd") and name not in ("Autograd", "AutogradFunctionality")
)


class _ThreadState(threading.local):
    def __init__(self) -> None:
        self.modes: list = []  # MemSaveModes entered in this thread, innermost last
        self.caller_holds_outputs = 0  # > 0 inside a call whose caller keeps every output


_thread = _ThreadState()
_install_lock = threading.RLock()
_installed: dict[OpOverload, Library] = {}


def active_modes() -> list:
    """The MemSaveModes active in the calling thread, innermost last."""
    return _thread.modes


def push_mode(mode) -> None:
    _thread.modes.append(mode)


def pop_mode(mode) -> None:
    modes = _thread.modes
    # Exit in LIFO order normally; tolerate an out-of-order exit without leaving the mode behind.
    for index in range(len(modes) - 1, -1, -1):
        if modes[index] is mode:
            del modes[index]
            break
    if not modes:
        policy.forget_deferred()


def caller_holds_outputs() -> bool:
    """Whether the Python-level call being dispatched hands all outputs to its caller (a
    max pool with ``return_indices=True``), as the mode noted in ``__torch_function__``."""
    return _thread.caller_holds_outputs > 0


class holding_outputs:
    """Context of a call whose caller keeps every output (see :func:`caller_holds_outputs`)."""

    def __enter__(self) -> None:
        _thread.caller_holds_outputs += 1

    def __exit__(self, *exc_info) -> None:
        _thread.caller_holds_outputs -= 1


def installed() -> frozenset[OpOverload]:
    return frozenset(_installed)


def install() -> None:
    """Install the interposing kernel of every registered operator (idempotent)."""
    with _install_lock:
        for op in registry.registered_ops():
            _install_kernel(op)


def uninstall() -> None:
    """Restore every stock kernel. Only call this while no other thread runs PyTorch ops."""
    with _install_lock:
        for library in _installed.values():
            library._destroy()
        _installed.clear()


def _on_register(op: OpOverload) -> None:
    with _install_lock:
        if _installed:
            _install_kernel(op)


registry.on_register(_on_register)

from . import accounting, policy  # noqa: E402  (both read this module's thread state)


_stock_kernels: dict[OpOverload, dict] = {}


def _stock_kernels_of(op: OpOverload) -> dict:
    """The stock kernel of every per-backend autograd key, captured once (before ours)."""
    stocks = _stock_kernels.get(op)
    if stocks is None:
        stocks = {}
        for key in _RUNTIME_KEYS:
            try:
                stocks[key] = torch.library.get_kernel(op, key.name)
            except RuntimeError:
                pass  # no kernel for that backend
        _stock_kernels[op] = stocks
    return stocks


def _install_kernel(op: OpOverload) -> None:
    if op in _installed:
        return
    stocks = _stock_kernels_of(op)
    library = Library("aten", "IMPL")
    kernel = _make_kernel(op, stocks)
    # A composite operator's CompositeImplicitAutograd kernel takes precedence over an
    # Autograd alias registration, so those get per-backend registrations instead (their
    # compiled form is decomposed before it reaches autograd anyway).
    composite = torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CompositeImplicitAutograd")
    keys = [key.name for key in DEVICES] if composite else [_ALIAS]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="(?s).*Overriding a previously registered kernel")
        for key in keys:
            library.impl(op, kernel, key, with_keyset=True)
    _installed[op] = library


def _keyset_of(keys) -> torch._C.DispatchKeySet:
    keyset = torch._C.DispatchKeySet(keys[0])
    for key in keys[1:]:
        keyset = keyset | torch._C.DispatchKeySet(key)
    return keyset


# Masking a call's key set with this leaves the autograd key it runs under on top (the Python
# dispatcher, autocast and other keys can sit above it).
_AUTOGRAD_KEYS = _keyset_of(_RUNTIME_KEYS)
_AUTOGRAD_CPU = DispatchKey.AutogradCPU
_DisableTorchFunction = torch._C.DisableTorchFunction


def _make_kernel(op: OpOverload, stocks: dict):
    cpu_stock = stocks.get(DispatchKey.AutogradCPU)
    op_id = id(op)

    def kernel(keyset, *args, **kwargs):
        key = (keyset & _AUTOGRAD_KEYS).highestPriorityTypeId()
        stock = cpu_stock if key == _AUTOGRAD_CPU else stocks[key]
        modes = _thread.modes
        entry = modes[-1]._entries_by_id.get(op_id) if modes else None  # as of the mode's entry
        if entry is None:
            return stock.call_boxed(keyset, *args, **kwargs)
        # The mode's own __torch_function__ has nothing to do with the library's internal
        # tensor calls; with it off they skip a Python round trip each.
        with _DisableTorchFunction():
            return _route(entry, DEVICES.get(key, key), stock, modes[-1], keyset, args, kwargs)

    kernel.__name__ = f"memsave_{op._opname}"
    _run_without_dynamo(kernel.__code__)
    return kernel


def _run_without_dynamo(code) -> None:
    """Never let torch.compile trace the kernel, or anything it calls, as user code.

    Compiled code runs with dynamo's frame hook set; eager operators it runs (graph breaks,
    the aot_eager backend) reach this kernel, whose Python frames dynamo would otherwise
    compile one by one. Marking the code object is free per call, unlike
    ``torch.compiler.disable``'s wrapper. (The kernel still runs when AOTAutograd traces the
    operator: that is how the saving policy gets compiled in.)
    """
    try:  # the C module: importing torch._dynamo itself would take a second
        from torch._C._dynamo.eval_frame import _FrameAction, _FrameExecStrategy, set_code_exec_strategy
    except ImportError:  # pragma: no cover - older dynamo without per-code strategies
        return
    set_code_exec_strategy(code, _FrameExecStrategy(_FrameAction.SKIP, _FrameAction.SKIP))


def _route(entry, device: str | DispatchKey, stock, mode, keyset, args: tuple, kwargs: dict):
    handler = entry.handler
    full_arguments = entry.full_arguments(args, kwargs) if kwargs or len(args) < entry.arity else args
    if not _is_grad_enabled():
        reason = "grad mode off"
    elif handler.can_save is not None and not handler.can_save(*full_arguments):
        reason = "nothing to save"  # decided first: it is the cheapest way back to stock
        if policy.encodings_pending():
            keeps = handler.stock_keeps
            policy.keep(keeps(*full_arguments) if keeps is not None else entry.tensor_arguments(args, kwargs))
    else:
        reason = _reason_for_stock(entry, device, mode, args, kwargs)
        if reason is None and handler.unsupported is not None:
            reason = handler.unsupported(*full_arguments)
        if reason is None and entry.is_policy:
            if not (entry.in_place and full_arguments[0]._base is not None):
                return _run_policy(entry, stock, keyset, args, kwargs, full_arguments)
            # autograd wraps the node of an in-place call on a view in a CopySlices node on the
            # base: its saved slots are out of a policy's reach
            reason = "in place on a view"
    if reason is not None:
        accounting.record_stock(entry.op, entry.family, reason)
        return stock.call_boxed(keyset, *args, **kwargs)
    return entry.function.apply_untransformed(*full_arguments)


def _run_policy(entry, stock, keyset, args: tuple, kwargs: dict, full_arguments: tuple):
    user_hooks = policy.default_hooks()
    handler = entry.handler
    if user_hooks is not None and (
        policy.is_checkpoint_hooks(user_hooks) or not torch._C._autograd._saved_tensors_hooks_is_enabled()
    ):
        accounting.record_stock(entry.op, entry.family, "checkpointed region")
        return stock.call_boxed(keyset, *args, **kwargs)
    if handler.released is not None:
        policy.release(handler.released(*full_arguments))  # while those inputs are still in cache
    if user_hooks is None:
        outputs = stock.call_boxed(keyset, *args, **kwargs)
    else:
        outputs = policy.run_without_default_hooks(lambda: stock.call_boxed(keyset, *args, **kwargs))
    first = outputs[0] if isinstance(outputs, tuple) else outputs
    node = first.grad_fn
    if node is None:  # nothing required grad after all (e.g. integer outputs)
        return outputs
    as_tuple = outputs if isinstance(outputs, tuple) else (outputs,)
    saved = handler.saved(full_arguments, as_tuple)
    policy.apply_policy(entry.op, entry.family, saved, node, user_hooks, _thread.modes)
    return outputs


def _not_enabled(device) -> str:
    if isinstance(device, str):
        return f"device {device} not enabled"
    kind = device.name.removeprefix("Autograd")  # a dispatch key without a device of ours
    return "nested tensor" if kind == "NestedTensor" else f"device {kind.lower()} not supported"


def _reason_for_stock(entry, device, mode, args: tuple, kwargs: dict) -> str | None:
    """Why this call must run stock PyTorch, or None when the handler may take it."""
    if device not in mode.devices or device not in entry.handler.devices:
        return _not_enabled(device)
    if _functorch_transforms_active():
        return "functorch transform"
    if _jit_tracing_state() is not None:
        return "torch.jit tracing"
    if _proxy_tracing() and not is_compiling():
        # make_fx (or export) records every tensor operation, the handlers' own included,
        # and cannot run data-dependent ones: trace stock's
        return "make_fx tracing"
    forward_ad_on = forward_ad._current_level >= 0
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
        if forward_ad_on and tensor._is_zerotensor():
            return "efficient zero tensor"  # forward-AD formulas pass these for absent tangents
        if tensor.requires_grad:
            needs_grad = True
    if not needs_grad:
        return "no input requires grad"
    return None


_is_grad_enabled = torch.is_grad_enabled
_functorch_transforms_active = torch._C._are_functorch_transforms_active
_jit_tracing_state = torch._C._get_tracing_state
_get_dispatch_mode = torch._C._get_dispatch_mode
_get_dispatch_mode_pre_dispatch = torch._ops._get_dispatch_mode_pre_dispatch
_PROXY = torch._C._TorchDispatchModeKey.PROXY


def _proxy_tracing() -> bool:
    """A proxy tracing mode is active: make_fx's, or AOTAutograd's under torch.compile
    (``get_proxy_mode() is not None``, in a fifth of its time)."""
    return _get_dispatch_mode(_PROXY) is not None or _get_dispatch_mode_pre_dispatch(_PROXY) is not None


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
        if _proxy_tracing():
            return None  # AOTAutograd traces the graph: handle it, the saving gets compiled
        return "shape propagation"  # dynamo running ops on fake tensors: only outputs matter
    if name == "FakeTensor":
        return "fake tensor"
    return f"tensor subclass {kind.__name__}"
