"""The compiled engine: the built-in handlers run in C++ (``csrc/``), for speed.

Every operator of a built-in handler gets a C++ kernel at the ``AutogradCPU`` key, registered
over the Python engine's kernel (at the ``Autograd`` alias; see :mod:`.engine`). Outside a mode
it calls stock's kernel with the arguments exactly as received. Inside one, for a plain eager
CPU call, it makes :mod:`.engine`'s checks in the same order, runs stock, and carries out the
C++ twin of the handler's ``saved`` (``csrc/ops.cpp``) the way :func:`.slots.apply` does
(``csrc/saving.cpp``, ``csrc/holders.cpp``): ghosts, bit masks and window offsets made in one
parallel pass, stock's in-place error word for word, unshared encodings made when the
tensor dies. Every other call -- tracing and torch.compile, functorch, the user's saved-tensor
hooks and checkpointing, compiled autograd, tensor subclasses, handlers written in Python --
goes on to the Python engine's kernel, which stays the reference.

One source of truth: the Python handlers. :data:`RULES` names the handler each C++ rule
mirrors; the C++ rule runs only where a mode selected exactly that handler, and
tests/test_compiled.py checks, per operator and configuration, that both keep the same.

A mode is not a TorchFunctionMode on this engine (that costs a Python round trip on every
torch call): it marks its thread with a dispatch key that has a fallthrough kernel everywhere
(free per call), which torch.compile's guards see in every tensor's key set.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterable, Mapping
from types import ModuleType

import torch

from . import extension, reasons, recipes, state
from ._compat import (
    OpOverload,
    compiled_autograd_enabled,
    inplace_error_wording,
    on_compiled_autograd_switch,
)
from .codecs import BitMaskCodec, WindowOffsetCodec
from .decisions import DROP, EncodeWhenUnshared
from .ops import activations, conv, dropout, linear, norms, pooling
from .registry import HandlerEntry
from .report import OpReport
from .holders import NativeSlot

__all__ = [
    "RULES",
    "PYTHON_ONLY",
    "LABELS",
    "engine_for_new_mode",
    "loaded",
    "needs_stock",
    "capture",
    "install",
    "uninstall",
    "POOLING_SCOPES",
    "ModeState",
    "pending_count",
]

aten = torch.ops.aten

#: The Python handler each C++ saving rule mirrors (csrc/ops.cpp, in the same order).
RULES: dict[OpOverload, type] = {
    aten.relu.default: activations.Relu,
    aten.relu_.default: activations.Relu,
    aten.leaky_relu.default: activations.LeakyRelu,
    aten.leaky_relu_.default: activations.LeakyReluInplace,
    aten.hardtanh.default: activations.Hardtanh,
    aten.hardtanh_.default: activations.Hardtanh,
    aten.threshold.default: activations.Threshold,
    aten.threshold_.default: activations.Threshold,
    aten.convolution.default: conv.Convolution,
    aten.dropout.default: dropout.Dropout,
    aten.dropout_.default: dropout.Dropout,
    aten.feature_dropout.default: dropout.Dropout,
    aten.feature_dropout_.default: dropout.Dropout,
    aten.native_dropout.default: dropout.NativeDropout,
    aten.addmm.default: linear.Addmm,
    aten.mm.default: linear.Mm,
    aten.native_batch_norm.default: norms.NativeBatchNorm,
    aten.native_layer_norm.default: norms.NativeLayerNorm,
    aten.native_group_norm.default: norms.NativeGroupNorm,
    aten.max_pool2d_with_indices.default: pooling.MaxPool2d,
    aten.max_pool3d_with_indices.default: pooling.MaxPool3d,
    aten.adaptive_max_pool2d.default: pooling.AdaptiveMaxPool2d,
    aten.adaptive_max_pool3d.default: pooling.AdaptiveMaxPool3d,
    aten.avg_pool2d.default: pooling.AvgPool,
    aten.avg_pool3d.default: pooling.AvgPool,
    aten._adaptive_avg_pool2d.default: pooling.AvgPool,
    aten._adaptive_avg_pool3d.default: pooling.AvgPool,
}

#: Operators whose C++ rule no longer matches the Python handler, which does more: the
#: Python engine takes them (native_layer_norm's handler notes each call's epsilon on the
#: node, for the LayerNorm recipe that rebuilds its output).
PYTHON_ONLY: frozenset[OpOverload] = frozenset({aten.native_layer_norm.default})

#: What the C++ holders report, in the order of csrc/engine.h's Label.
LABELS = (
    DROP.label,
    BitMaskCodec.name,
    EncodeWhenUnshared.label,
    WindowOffsetCodec.BYTE_NAME,
    WindowOffsetCodec.TWO_BIT_NAME,
)

_native: ModuleType | None = None
_loading = threading.Lock()
_index: dict[OpOverload, int] = {}
_captured: set[OpOverload] = set()
_families: list[str] = []


def loaded() -> ModuleType | None:
    """The extension, if a mode on this engine loaded it (then its kernels serve every mode)."""
    return _native


def engine_for_new_mode() -> str:
    """"compiled" where it is requested (or not declined) and available, else "python"."""
    if extension.requested_engine() == "python":
        return "python"
    return "compiled" if _load() is not None else "python"


def _load() -> ModuleType | None:
    if _native is not None:
        return _native
    with _loading:
        return _native if _native is not None else _initialised(extension.load())


def _initialised(module: ModuleType | None) -> ModuleType | None:
    """Hand the extension what it reads off this torch release and this package, once."""
    global _native
    if module is None:
        return None
    names = module.op_names()
    ours = tuple(op.name() for op in RULES)
    if names != ours:
        raise RuntimeError(f"memsave_dispatch: the C++ rules {names} do not match compiled.RULES {ours}")
    prefix, hint_plain, _strips = inplace_error_wording(False)
    _prefix, hint_anomaly, strips = inplace_error_wording(True)
    module.init(prefix, hint_plain, hint_anomaly, strips, torch.Tensor, torch.nn.Parameter, functools.partial(_slot_view, module))
    _index.update({op: index for index, op in enumerate(RULES)})
    recipes.on_recipes_changed(module.set_recipe_nodes)
    on_compiled_autograd_switch(module.set_compiled_autograd)
    module.set_compiled_autograd(compiled_autograd_enabled())
    state.read_native_outputs_held(module.outputs_held)
    _native = module
    return module


def _slot_view(module: ModuleType, form: int, kept: tuple, holder: object) -> NativeSlot:
    return NativeSlot(LABELS[form], kept, functools.partial(module.unpack_slot, holder))


def _indices(ops: Iterable[OpOverload]) -> list[int]:
    return [_index[op] for op in ops if op in _index]


def needs_stock(op: OpOverload) -> bool:
    """Whether this engine runs ``op`` but has not captured its stock kernel yet."""
    return _native is not None and op in _index and op not in _captured


def capture(ops: Iterable[OpOverload]) -> None:
    """Capture stock's kernels of these operators, before the Python engine overrides them."""
    if _native is not None:
        ops = [op for op in ops if op in _index]
        _native.capture(_indices(ops))
        _captured.update(ops)


#: Composite max poolings whose calls the C++ engine follows (csrc/ops.cpp, PoolingScope).
POOLING_SCOPES = (
    aten.max_pool1d.default,
    aten.max_pool2d.default,
    aten.max_pool3d.default,
    aten.max_pool1d_with_indices.default,
    aten.adaptive_max_pool1d.default,
)
_registered: set[OpOverload] = set()


def install(ops: Iterable[OpOverload]) -> list[OpOverload]:
    """Install the C++ kernels of these operators over the Python engine's (idempotent);
    returns the operators whose kernels changed."""
    if _native is None:
        return []
    ops = [op for op in ops if op in _index and op not in _registered]
    if not ops:
        return []
    _native.install(_indices(ops))
    _registered.update(ops)
    if any(RULES[op].outputs_to_caller is not None for op in ops):
        ops += [op for op in POOLING_SCOPES if op not in _registered]  # installed with the max poolings
        _registered.update(POOLING_SCOPES)
    return ops


def uninstall() -> list[OpOverload]:
    """Remove every C++ kernel; returns the operators whose kernels changed."""
    if _native is None:
        return []
    _native.uninstall()
    removed = list(_registered)
    _registered.clear()
    return removed


def pending_count() -> int:
    """Tensors of this thread whose encodings this engine makes when they die."""
    return 0 if _native is None else _native.pending_count()


def _family_id(family: str) -> int:
    try:
        return _families.index(family)
    except ValueError:
        _families.append(family)
        return len(_families) - 1


class ModeState:
    """One MemSaveMode's state in the compiled engine: its counters, and what it says about
    each operator, pushed onto the thread's C++ scope stack on every entry. Modes on the
    Python engine push one too (every entry handed on to the Python kernel): once the C++
    kernels are installed, they see every call."""

    def __init__(self, native: ModuleType) -> None:
        self._native = native
        self._tallies = native.new_tallies()

    def enter(self, entries: Mapping[OpOverload, HandlerEntry], devices: frozenset[str], compiled: bool) -> None:
        rows = []
        for op, entry in entries.items():
            index = _index.get(op)
            if index is None:
                continue  # no C++ kernel: the Python kernel runs it directly
            runs_here = compiled and RULES[op] is entry.handler and op not in PYTHON_ONLY
            cpu = "cpu" in devices and "cpu" in entry.handler.devices
            rows.append((index, runs_here, cpu, _family_id(entry.family)))
        self._native.push(self._tallies, rows)

    def exit(self) -> None:
        """This mode exited the thread; once none is left, waiting encodings are dropped."""
        if self._native.pop(self._tallies):
            self._native.forget_pending()

    def lines(self) -> list[tuple[int, OpReport]]:
        """(first seen, in steady-clock ns) and the report line of every operator counted here."""
        found = []
        ops = list(RULES)
        for index, first_seen, family, handled, stock_bytes, kept_bytes, why, became in self._native.snapshot(self._tallies):
            line = OpReport(
                op=str(ops[index]),
                family=_families[family],
                handled=handled,
                traced=0,
                to_stock={reason: count for reason, count in zip(reasons.COMPILED, why) if count},
                stock_bytes=stock_bytes,
                kept_bytes=kept_bytes,
                encodings={label: count for label, count in zip(LABELS, became) if count},
            )
            found.append((first_seen, line))
        return found

    def clear(self) -> None:
        self._native.clear(self._tallies)
