"""Shared test support: build the usual inputs and networks, run the same computation with
stock PyTorch and under MemSaveMode, and compare.

Outputs and gradients must be bit-identical (raw bits, same strides: see
``memsave_dispatch.exactness``). Bytes kept for backward are measured on the path users run
(``saved_tensor_bytes`` reads the graph, no hooks), excluding the storages of the tensors
named in ``state`` (parameters, running statistics). Each comparison also runs once more
under saved-tensor hooks, which take another path through the mode.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from memsave_dispatch import MemSaveMode, saved_tensor_bytes
from memsave_dispatch.demo import SmallConvNet
from memsave_dispatch.exactness import difference
from tools.bench.models import freeze

__all__ = [
    "assert_bit_identical",
    "compare_with_stock",
    "run_once",
    "requires_grad_patterns",
    "seeded_randn",
    "frozen_small_net",
    "DTYPES",
    "HookMeter",
    "Run",
]

DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def seeded_randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32, requires_grad: bool = False) -> Tensor:
    """The same normal values on every run, drawn in fp64 and rounded to ``dtype``."""
    values = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return values.to(dtype).requires_grad_(requires_grad)


def frozen_small_net(width: int = 32, prompt_size: int | None = None, seed: int = 0) -> SmallConvNet:
    """The demo's conv-BN-ReLU-pool network, seeded, with its conv and BN layers frozen."""
    torch.manual_seed(seed)
    net = SmallConvNet(width=width, prompt_size=prompt_size)
    freeze(net)
    return net


def assert_bit_identical(actual, expected, what: str = "tensor") -> None:
    problem = difference(actual, expected)
    assert problem is None, f"{what}: {problem}"


class HookMeter:
    """Counts what saved-tensor hooks see packed inside it (distinct storages still held at
    exit, ``exclude``'s storages left out). Under MemSaveMode this is another path than the
    plain one: the tests use it to check that the user's hooks see everything kept."""

    def __init__(self, exclude: nn.Module | Iterable[Tensor] | None = None) -> None:
        tensors = [*exclude.parameters(), *exclude.buffers()] if isinstance(exclude, nn.Module) else list(exclude or ())
        self._exclude = {t.untyped_storage().data_ptr() for t in tensors}
        self._packed: weakref.WeakSet = weakref.WeakSet()
        self.bytes = 0

    class _Packed:
        __slots__ = ("tensor", "__weakref__")

        def __init__(self, tensor: Tensor) -> None:
            self.tensor = tensor

    def _pack(self, tensor: Tensor) -> Any:
        packed = self._Packed(tensor.detach())
        self._packed.add(packed)
        return packed

    def __enter__(self) -> HookMeter:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda packed: packed.tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self._hooks.__exit__(*exc_info)
        self.measure()

    def measure(self) -> int:
        storages = {}
        for packed in list(self._packed):
            storage = packed.tensor.untyped_storage()
            if storage.data_ptr() not in self._exclude:
                storages[storage.data_ptr()] = storage.nbytes()
        self.bytes = sum(storages.values())
        return self.bytes


@dataclass
class Run:
    outputs: tuple
    grads: dict[str, Tensor | None]
    inputs_after: dict[str, Tensor]
    saved_bytes: int
    report: object = None


def _clone(inputs: dict[str, Tensor | None]) -> dict[str, Tensor | None]:
    clones = {}
    for name, tensor in inputs.items():
        if tensor is None:
            clones[name] = None
            continue
        copy = tensor.detach().clone()  # clone keeps the strides of a dense tensor
        if isinstance(tensor, torch.nn.Parameter):
            copy = torch.nn.Parameter(copy, requires_grad=tensor.requires_grad)
        else:
            copy.requires_grad_(tensor.requires_grad)
        clones[name] = copy
    return clones


def _as_tuple(outputs) -> tuple:
    return outputs if isinstance(outputs, tuple) else (outputs,)


def run_once(
    fn, inputs, state: Iterable[str] = (), *, mode: MemSaveMode | None, upstream_seed: int = 0, hooks: bool = False
) -> Run:
    """``fn(**inputs)`` on clones of the inputs, stock (``mode=None``) or under ``mode``,
    then backward from every differentiable output with seeded upstream gradients."""
    clones = _clone(inputs)
    excluded = [clones[name] for name in state if clones.get(name) is not None]
    context = mode if mode is not None else torch.enable_grad()
    with context:
        if hooks:
            with HookMeter(exclude=excluded) as meter:
                outputs = _as_tuple(fn(**clones))
            saved = meter.bytes
        else:
            saved, outputs = saved_tensor_bytes(lambda: _as_tuple(fn(**clones)), exclude=excluded)
        differentiable = [o for o in outputs if isinstance(o, Tensor) and o.requires_grad]
        generator = torch.Generator().manual_seed(upstream_seed)
        upstream = [
            torch.randn(o.shape, generator=generator, dtype=torch.float64).to(o.device, o.dtype) for o in differentiable
        ]
        if differentiable:
            torch.autograd.backward(differentiable, upstream)
    grads = {name: (t.grad if t is not None and t.requires_grad else None) for name, t in clones.items()}
    return Run(
        outputs=tuple(o.detach() if isinstance(o, Tensor) else o for o in outputs),
        grads=grads,
        inputs_after={name: t.detach() for name, t in clones.items() if t is not None},
        saved_bytes=saved,
        report=mode.report() if mode is not None else None,
    )


def compare_with_stock(
    fn: Callable[..., object],
    inputs: dict[str, Tensor | None],
    *,
    state: Iterable[str] = (),
    mode_factory: Callable[[], MemSaveMode] = MemSaveMode,
    upstream_seed: int = 0,
) -> tuple[Run, Run]:
    """Run ``fn(**inputs)`` stock and under a fresh MemSaveMode (each on clones of the
    inputs); assert bit-identical outputs, gradients and in-place effects, both on the plain
    path and with saved-tensor hooks active; return the (stock, mode) plain runs, with the
    bytes each kept for backward."""
    state = tuple(state)
    stock = run_once(fn, inputs, state, mode=None, upstream_seed=upstream_seed)
    plain = run_once(fn, inputs, state, mode=mode_factory(), upstream_seed=upstream_seed)
    hooked = run_once(fn, inputs, state, mode=mode_factory(), upstream_seed=upstream_seed, hooks=True)
    for candidate, label in ((plain, "mode"), (hooked, "mode with saved-tensor hooks")):
        assert len(candidate.outputs) == len(stock.outputs)
        for index, (a, b) in enumerate(zip(candidate.outputs, stock.outputs)):
            if isinstance(b, Tensor):
                assert_bit_identical(a, b, f"{label}: output {index}")
        for name in inputs:
            assert_bit_identical(candidate.grads[name], stock.grads[name], f"{label}: grad of {name}")
            if name in stock.inputs_after:
                assert_bit_identical(candidate.inputs_after[name], stock.inputs_after[name], f"{label}: {name} after")
    return stock, plain


def requires_grad_patterns(names: Iterable[str]) -> list[tuple[bool, ...]]:
    """Every non-empty combination of which of ``names`` require grad."""
    names = tuple(names)
    return [tuple(bool(code >> i & 1) for i in range(len(names))) for code in range(1, 2 ** len(names))]
