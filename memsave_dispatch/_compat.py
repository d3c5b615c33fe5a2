"""The one seam to torch's private APIs, and what differs between the releases this package
supports (2.9 and later).

Every private torch module, function and node attribute the library uses is reached here:
saved-variable internals (a node's ``_raw_saved_*`` and ``_saved_*``), the saved-tensor
default-hooks stack, checkpoint detection, dispatcher keys and kernels, tracing state,
dynamo's per-code execution strategy. A tensor's version counter and view base
(``Tensor._version``, ``Tensor._base``) are read where they are needed.
"""

from __future__ import annotations

import functools
import re
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch._C import DispatchKey
from torch._guards import TracingContext
from torch._ops import OpOverload, OpOverloadPacket
from torch.torch_version import TorchVersion
from torch.utils._pytree import tree_leaves

__all__ = [
    "DispatchKey",
    "OpOverload",
    "OpOverloadPacket",
    "tree_leaves",
    "nn_function",
    "op_schema",
    "packet_name",
    "op_short_name",
    "TORCH",
    "is_compiling",
    "proxy_tracing",
    "functorch_transforms_active",
    "jit_tracing",
    "backward_running",
    "AUTOGRAD_RUNTIME_KEYS",
    "autograd_keyset",
    "has_composite_implicit_kernel",
    "python_dispatcher_enabled",
    "traced_stock_kernel",
    "stock_kernel",
    "library",
    "destroy_library",
    "forget_dispatch_resolution",
    "forward_ad_active",
    "is_zero_tensor",
    "no_torch_function",
    "below_autograd",
    "apply_function_untransformed",
    "skip_in_dynamo",
    "saved_slot",
    "saved_slot_names",
    "saved_value",
    "node_sequence_nr",
    "autograd_function_of",
    "next_sequence_nr",
    "SAVED_SLOTS_READABLE",
    "read_saved_slot",
    "default_hooks",
    "pop_all_default_hooks",
    "push_default_hooks",
    "saved_tensor_hooks_enabled",
    "is_checkpoint_hooks",
    "storage_references",
    "is_wrapped_number",
    "modified_in_place_error",
    "inplace_error_wording",
    "compiled_autograd_enabled",
    "on_compiled_autograd_switch",
    "BFLOAT16_ADAPTIVE_MAX_POOL2D_INDICES_IN_WINDOW",
]

TORCH = TorchVersion(torch.__version__)

# -- tracing and transforms ----------------------------------------------------------------
_dynamo_compiling = torch.compiler.is_compiling
_tracing_context = TracingContext.try_get


def _compiling_or_tracing_for_compile() -> bool:
    return _dynamo_compiling() or _tracing_context() is not None


#: Whether torch.compile is tracing: Dynamo, or AOTAutograd behind it. Before torch 2.13
#: ``torch.compiler.is_compiling()`` is false while AOTAutograd traces the joint graph
#: (measured on 2.9.1 to 2.12.1); the tracing context torch.compile sets up for the whole
#: compilation is there in every release, but reading it costs 0.4 us a call.
is_compiling: Callable[[], bool] = _dynamo_compiling if TORCH >= "2.13" else _compiling_or_tracing_for_compile

_get_dispatch_mode = torch._C._get_dispatch_mode
_get_dispatch_mode_pre_dispatch = torch._ops._get_dispatch_mode_pre_dispatch
_PROXY = torch._C._TorchDispatchModeKey.PROXY


def proxy_tracing() -> bool:
    """A proxy tracing mode is active: make_fx's, or AOTAutograd's under torch.compile
    (``get_proxy_mode() is not None``, in a fifth of its time)."""
    return _get_dispatch_mode(_PROXY) is not None or _get_dispatch_mode_pre_dispatch(_PROXY) is not None


functorch_transforms_active: Callable[[], bool] = torch._C._are_functorch_transforms_active
_jit_tracing_state = torch._C._get_tracing_state


def jit_tracing() -> bool:
    return _jit_tracing_state() is not None


def forward_ad_active() -> bool:
    return torch.autograd.forward_ad._current_level >= 0


def is_zero_tensor(tensor: torch.Tensor) -> bool:
    """An efficient zero tensor: forward-AD formulas pass these for absent tangents."""
    return tensor._is_zerotensor()


_current_graph_task_id = torch._C._current_graph_task_id


def backward_running() -> bool:
    """Whether this thread is running a backward pass (the graph is being consumed)."""
    return _current_graph_task_id() != -1


# -- the dispatcher ------------------------------------------------------------------------
def nn_function(name: str) -> Callable[..., Any]:
    """A ``torch._C._nn`` binding (the Python entry point of an aten nn operator)."""
    return getattr(torch._C._nn, name)


def op_schema(op: torch._ops.OpOverload) -> torch._C.FunctionSchema:
    return op._schema


def packet_name(packet: torch._ops.OpOverloadPacket) -> str:
    """``relu`` for ``torch.ops.aten.relu``."""
    return packet._qualified_op_name.split("::")[1]


def op_short_name(op: torch._ops.OpOverload) -> str:
    """``convolution`` for ``aten.convolution.default``, ``mean.dim`` for ``aten.mean.dim``."""
    name = op._opname
    return name if op._overloadname == "default" else f"{name}.{op._overloadname}"


#: Every per-backend autograd dispatch key (AutogradCPU, AutogradCUDA, ...).
AUTOGRAD_RUNTIME_KEYS: tuple[DispatchKey, ...] = tuple(
    getattr(DispatchKey, name)
    for name in DispatchKey.__members__
    if name.startswith("Autograd") and name not in ("Autograd", "AutogradFunctionality")
)


def autograd_keyset() -> torch._C.DispatchKeySet:
    """The key set of every per-backend autograd key: masking a call's key set with it
    leaves the autograd key the call runs under on top."""
    keyset = torch._C.DispatchKeySet(AUTOGRAD_RUNTIME_KEYS[0])
    for key in AUTOGRAD_RUNTIME_KEYS[1:]:
        keyset = keyset | torch._C.DispatchKeySet(key)
    return keyset


def has_composite_implicit_kernel(op: torch._ops.OpOverload) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CompositeImplicitAutograd")


def traced_stock_kernel(op: torch._ops.OpOverload, key: DispatchKey) -> Callable[..., Any] | None:
    """The Python kernel torch's Python dispatcher (torch.compile's tracer) runs for ``op`` at
    ``key`` now (a composite's Python decomposition, e.g. dropout's), or None where it runs the
    C++ kernel. Read before registering over ``key``: a registration there changes the answer."""
    return op.py_kernels.get(torch._ops.resolve_key(op, key))


def python_dispatcher_enabled() -> bool:
    """Whether this call comes through torch's Python dispatcher (tracing)."""
    return torch._C._dispatch_tls_is_dispatch_key_included(DispatchKey.PythonDispatcher)


def stock_kernel(op: torch._ops.OpOverload, key: DispatchKey) -> Any | None:
    """The kernel registered for ``key`` now (None if there is none); call it with
    ``kernel.call_boxed(keyset, *args, **kwargs)``."""
    try:
        return torch.library.get_kernel(op, key.name)
    except RuntimeError:
        return None


def library() -> torch.library.Library:
    """A fresh aten IMPL library: its registrations replace kernels until destroyed."""
    return torch.library.Library("aten", "IMPL")


def destroy_library(lib: torch.library.Library) -> None:
    """Remove a library's registrations: the kernels they replaced are back."""
    lib._destroy()


def forget_dispatch_resolution(op: OpOverload) -> None:
    """Drop what torch's Python dispatcher (torch.compile's tracer) resolved for ``op``: it
    caches which kernel serves each dispatch key, and registering or removing a per-backend
    autograd kernel (AutogradCPU) does not reset that cache."""
    op._dispatch_cache.clear()


no_torch_function = torch._C.DisableTorchFunction
below_autograd = torch._C._AutoDispatchBelowAutograd
_C_APPLY = torch._C._FunctionBase.__dict__["apply"]


def apply_function_untransformed(function: type) -> Callable[..., Any]:
    """The C-level ``apply`` of an autograd.Function: its Python wrapper only adds functorch
    bookkeeping, and calls under functorch transforms never reach a handler."""
    return _C_APPLY.__get__(None, function)


def skip_in_dynamo(code) -> None:
    """Never let torch.compile trace ``code`` as user code (free per call, unlike
    ``torch.compiler.disable``'s wrapper)."""
    try:  # the C module: importing torch._dynamo itself would take a second
        from torch._C._dynamo.eval_frame import _FrameAction, _FrameExecStrategy, set_code_exec_strategy
    except ImportError:  # pragma: no cover - older dynamo without per-code strategies
        return
    set_code_exec_strategy(code, _FrameExecStrategy(_FrameAction.SKIP, _FrameAction.SKIP))


# -- saved variables -----------------------------------------------------------------------
_RAW = "_raw_saved_"


def saved_slot(node: Any, name: str) -> Any:
    """The ``SavedVariable`` (or list of them) a stock node keeps under ``name``."""
    return getattr(node, _RAW + name)


def saved_value(node: Any, name: str) -> Any:
    """What the node keeps under ``name``, unpacked (a tensor: through its hooks and stock's
    version check; or a saved non-tensor attribute)."""
    return getattr(node, "_saved_" + name)


_SLOT_NAMES: dict[type, tuple[str, ...]] = {}


def saved_slot_names(node: Any) -> tuple[str, ...]:
    """Names of the saved slots of a node of this type."""
    kind = type(node)
    names = _SLOT_NAMES.get(kind)
    if names is None:
        names = _SLOT_NAMES.setdefault(kind, tuple(n[len(_RAW) :] for n in dir(node) if n.startswith(_RAW)))
    return names


def autograd_function_of(node: Any) -> type | None:
    """The ``torch.autograd.Function`` class whose backward a node runs (None for stock's)."""
    return getattr(type(node), "_forward_cls", None)


def node_sequence_nr(node: Any) -> int:
    """The order in which this thread created autograd nodes."""
    return node._sequence_nr()


def next_sequence_nr() -> int:
    """The sequence number the next node this thread creates will have, or a lower one."""
    with torch.enable_grad():
        probe = torch.empty(0, requires_grad=True).view(0)
    return node_sequence_nr(probe.grad_fn) + 1


#: Whether a saved-tensor slot shows what it holds without unpacking it
#: (``SavedTensor.data`` and ``.unpack_hook``, torch 2.13 and later).
SAVED_SLOTS_READABLE = hasattr(torch._C._autograd.SavedTensor, "unpack_hook")


def read_saved_slot(slot: Any) -> tuple[Any, Any]:
    """(unpack hook or None, what is packed) of one slot, without unpacking it (torch >= 2.13).
    Raises RuntimeError when backward freed the slot."""
    return slot.unpack_hook, slot.data


Hooks = tuple[Callable[[torch.Tensor], Any], Callable[[Any], torch.Tensor]]


def default_hooks() -> Hooks | None:
    """The innermost saved-tensor default hooks (``saved_tensors_hooks``, ``save_on_cpu``)."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False)


def pop_all_default_hooks() -> list[Hooks]:
    """Empty the default-hooks stack; returns what was there, innermost first."""
    popped = []
    while (hooks := torch._C._autograd._top_saved_tensors_default_hooks(False)) is not None:
        popped.append(hooks)
        torch._C._autograd._pop_saved_tensors_default_hooks()
    return popped


def push_default_hooks(popped: list[Hooks]) -> None:
    """Undo :func:`pop_all_default_hooks`."""
    for pack, unpack in reversed(popped):
        torch._C._autograd._push_saved_tensors_default_hooks(pack, unpack)


saved_tensor_hooks_enabled: Callable[[], bool] = torch._C._autograd._saved_tensors_hooks_is_enabled


def is_checkpoint_hooks(hooks: Hooks) -> bool:
    """Non-reentrant checkpointing's forward or recomputation hooks."""
    qualname = getattr(hooks[0], "__qualname__", "")
    return "_checkpoint_hook" in qualname or "_recomputation_hook" in qualname


# -- reference counts ------------------------------------------------------------------------
def storage_references(tensor: torch.Tensor) -> int:
    """Owners of the tensor's storage (tensors and views sharing it, storage objects)."""
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


_WRAPPED_NUMBER_PROBES = {
    torch.int64: torch.tensor(0, dtype=torch.int8),
    torch.float64: torch.tensor(0, dtype=torch.float16),
    torch.complex128: torch.tensor(0, dtype=torch.complex64),
}


def is_wrapped_number(tensor: torch.Tensor) -> bool:
    """A Python scalar argument autograd keeps as a 0-dim tensor (``x * 2``'s ``2``): not an
    activation, and never shown to saved-tensor hooks. Told apart from a real 0-dim tensor
    by type promotion, where a wrapped number ranks below any tensor of its category."""
    if tensor.dim() != 0 or tensor.device.type != "cpu":
        return False
    probe = _WRAPPED_NUMBER_PROBES.get(tensor.dtype)
    return probe is not None and torch.result_type(probe, tensor) == probe.dtype


# -- stock's in-place error ----------------------------------------------------------------
def modified_in_place_error(
    tensor_type: str, sizes: torch.Size, grad_fn: Any | None, output_nr: int, current: int, saved: int
) -> RuntimeError:
    """The error stock autograd raises when backward reaches a saved tensor that was modified
    in place since it was saved, word for word (the wording is read off this torch release)."""
    form = _inplace_error_form(torch.is_anomaly_enabled())
    which = "" if grad_fn is None else f", which is output {output_nr} of {form.node_name(grad_fn.name())},"
    shape = "[" + ", ".join(str(size) for size in sizes) + "]"
    return RuntimeError(
        f"{form.prefix}{tensor_type} {shape}]{which} is at version {current}; expected version {saved} instead.{form.hint}"
    )


def inplace_error_wording(anomaly: bool) -> tuple[str, str, bool]:
    """Stock's in-place error as this release words it: (the text up to the tensor's type, the
    closing hint, whether nodes are named without their ``Backward<N>`` suffix)."""
    form = _inplace_error_form(anomaly)
    return form.prefix, form.hint, form.strips_backward


class _InplaceErrorForm:
    def __init__(self, prefix: str, hint: str, strips_backward: bool) -> None:
        self.prefix, self.hint, self.strips_backward = prefix, hint, strips_backward

    def node_name(self, name: str) -> str:
        return _BACKWARD_SUFFIX.sub("", name) if self.strips_backward else name


_BACKWARD_SUFFIX = re.compile(r"Backward\d*$")


@functools.cache
def _inplace_error_form(anomaly: bool) -> _InplaceErrorForm:
    """Read stock's wording once: modify a saved tensor of a stock graph (operators no
    handler intercepts) and take the message apart."""
    with torch.enable_grad(), warnings.catch_warnings(), torch.autograd.set_detect_anomaly(anomaly):
        warnings.simplefilter("ignore")  # anomaly mode warns with the forward's traceback
        leaf = torch.ones(1, requires_grad=True)
        saved = leaf.exp()  # its ExpBackward0 keeps its output: the message names that node
        node_name = saved.grad_fn.name()
        out = saved.exp()
        saved.add_(0)
        try:
            out.backward()
        except RuntimeError as error:
            message = str(error)
        else:  # pragma: no cover - stock always raises here
            raise AssertionError("stock autograd did not report the in-place change")
    marker = "[torch.FloatTensor [1]]"
    prefix = message[: message.index(marker) + 1]
    rendered = message[message.index(" of ", message.index(marker)) + 4 : message.index(", is at version")]
    hint = message[message.index("instead.") + len("instead.") :]
    return _InplaceErrorForm(prefix, hint, strips_backward=rendered != node_name)


# -- compiled autograd ------------------------------------------------------------------------
def compiled_autograd_enabled() -> bool:
    """Whether compiled autograd is on now (never imports torch._dynamo)."""
    module = sys.modules.get("torch._dynamo.compiled_autograd")
    if module is None:
        return False
    config = sys.modules.get("torch._dynamo.config")
    return bool(getattr(module, "compiled_autograd_enabled", False) or getattr(config, "compiled_autograd", False))


def on_compiled_autograd_switch(callback: Callable[[bool], None]) -> None:
    """Call ``callback(on)`` whenever compiled autograd is switched on or off: every switch goes
    through ``set_autograd_compiler``, which torch looks up on its module at each call."""
    try:
        from torch._C._dynamo import compiled_autograd as bindings
    except ImportError:  # pragma: no cover - a build without dynamo
        return
    original = bindings.set_autograd_compiler
    if getattr(original, "memsave_callbacks", None) is not None:
        original.memsave_callbacks.append(callback)
        return

    def set_autograd_compiler(compiler, dynamic):
        previous = original(compiler, dynamic)
        for notify in set_autograd_compiler.memsave_callbacks:
            notify(compiler is not None)
        return previous

    set_autograd_compiler.memsave_callbacks = [callback]
    bindings.set_autograd_compiler = set_autograd_compiler


#: Before torch 2.11, the CPU bfloat16 kernel of ``adaptive_max_pool2d`` on a contiguous input
#: can return argmax indices outside their pooling window (measured on 2.9.1 and 2.10.0, e.g.
#: a 17x17 input pooled to 5x5); stock's backward scatters through them as they are.
BFLOAT16_ADAPTIVE_MAX_POOL2D_INDICES_IN_WINDOW = TORCH >= "2.11"
