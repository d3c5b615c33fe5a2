"""Run the same computation with stock PyTorch and under MemSaveMode, and compare.

Outputs and gradients must be bit-identical (compared as raw bits, so NaN payloads and the
sign of zero count, and with the same strides). Bytes kept for backward are measured with
saved-tensor hooks, excluding the storages of the tensors named in ``state`` (parameters,
running statistics).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from memsave_dispatch import MemSaveMode, SavedTensorMeter

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def assert_bit_identical(actual, expected, what: str = "tensor") -> None:
    if expected is None or actual is None:
        assert actual is None and expected is None, f"{what}: {actual!r} vs {expected!r}"
        return
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} vs {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} vs {expected.shape}"
    if actual.numel() > 1:
        assert actual.stride() == expected.stride(), f"{what}: strides {actual.stride()} vs {expected.stride()}"
    if actual.is_floating_point():
        bits = _BITS[actual.element_size()]
        same = torch.equal(actual.detach().view(bits), expected.detach().view(bits))
    else:
        same = torch.equal(actual, expected)
    assert same, f"{what}: values differ (max abs diff {(actual.double() - expected.double()).abs().max()})"


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


def _run(fn, inputs, state: Iterable[str], upstream_seed: int, mode: MemSaveMode | None, measure: bool) -> Run:
    clones = _clone(inputs)
    excluded = [clones[name] for name in state if clones.get(name) is not None]
    meter = SavedTensorMeter(exclude=excluded) if measure else None
    context = mode if mode is not None else torch.enable_grad()
    with context:
        if meter is not None:
            with meter:
                outputs = _as_tuple(fn(**clones))
        else:
            outputs = _as_tuple(fn(**clones))
        differentiable = [o for o in outputs if isinstance(o, Tensor) and o.requires_grad]
        generator = torch.Generator().manual_seed(upstream_seed)
        upstream = [torch.randn(o.shape, generator=generator, dtype=torch.float64).to(o.dtype) for o in differentiable]
        if differentiable:
            torch.autograd.backward(differentiable, upstream)
    grads = {name: (t.grad if t is not None and t.requires_grad else None) for name, t in clones.items()}
    return Run(
        outputs=tuple(o.detach() if isinstance(o, Tensor) else o for o in outputs),
        grads=grads,
        inputs_after={name: t.detach() for name, t in clones.items() if t is not None},
        saved_bytes=meter.bytes if meter is not None else -1,
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
    path and with saved-tensor hooks active; return (stock, mode) measured runs."""
    state = tuple(state)
    stock = _run(fn, inputs, state, upstream_seed, None, measure=False)
    plain = _run(fn, inputs, state, upstream_seed, mode_factory(), measure=False)
    stock_measured = _run(fn, inputs, state, upstream_seed, None, measure=True)
    mode_measured = _run(fn, inputs, state, upstream_seed, mode_factory(), measure=True)
    for candidate, label in ((plain, "mode"), (mode_measured, "mode with saved-tensor hooks")):
        assert len(candidate.outputs) == len(stock.outputs)
        for index, (a, b) in enumerate(zip(candidate.outputs, stock.outputs)):
            if isinstance(b, Tensor):
                assert_bit_identical(a, b, f"{label}: output {index}")
        for name in inputs:
            assert_bit_identical(candidate.grads[name], stock.grads[name], f"{label}: grad of {name}")
            if name in stock.inputs_after:
                assert_bit_identical(candidate.inputs_after[name], stock.inputs_after[name], f"{label}: {name} after")
    mode_measured.report = plain.report
    return stock_measured, mode_measured


def requires_grad_patterns(names: Iterable[str]) -> list[tuple[bool, ...]]:
    """Every non-empty combination of which of ``names`` require grad."""
    names = tuple(names)
    patterns = []
    for code in range(1, 2 ** len(names)):
        patterns.append(tuple(bool(code >> i & 1) for i in range(len(names))))
    return patterns


DTYPES = (torch.float32, torch.float64, torch.bfloat16)
