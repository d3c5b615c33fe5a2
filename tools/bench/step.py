"""Step time of a training step under MemSaveMode against stock PyTorch, same process.

    python -m tools.bench step                 # ResNet-18-shaped net, batch 8, 3x128x128
    python -m tools.bench step --pairs 81 --json step.json

Stock and mode steps are interleaved (ABBA order, so drift and caches hit both alike) and
the figure is the median of the per-pair ratios mode/stock. Stock steps run with the
interposing kernels uninstalled, so stock pays nothing for this library being imported.
Bytes kept for backward are measured with saved-tensor hooks, parameters and buffers
excluded, and gradients are compared as raw bits.

The minor page faults per step are printed too: glibc returns large freed blocks to the OS
and maps them again, so a step can pay thousands of faults (milliseconds). How many, and on
which side, varies from process to process with the allocator's state, and moves the ratio
by several percent. The mode's own cost, with faults out of the picture, is measured by keeping freed
memory in the process:

    GLIBC_TUNABLES=glibc.malloc.trim_threshold=4294967296:glibc.malloc.mmap_threshold=4294967295 \
        python -m tools.bench step
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import torch
from rich.progress import Progress

from memsave_dispatch import MemSaveMode, saved_tensor_bytes

from .cases import STEP_CASES
from .measure import compare_gradients, interleaved_times, median_ratio, minor_page_faults, time_step
from .models import resnet18
from .runner import running


def _build(case: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = resnet18(num_classes=10)
    STEP_CASES[case](model)
    return model


def _gradients(model, x, y) -> list[torch.Tensor]:
    x = x.detach().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    grads = [x.grad] + [p.grad for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return grads


def run_case(case: str, batch: int, size: int, pairs: int, progress=None, task=None) -> dict:
    model = _build(case)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    y = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(2))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.0, momentum=0.9)  # lr 0: every step sees the same model
    mode = MemSaveMode()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        x.grad = None
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    faults: dict[str, list[int]] = {"stock": [], "mode": []}

    def timed(kind: str) -> float:
        before = minor_page_faults()
        seconds = time_step(step)
        if before is not None:
            faults[kind].append(minor_page_faults() - before)
        return seconds

    def stock_step() -> float:
        with running(None):
            return timed("stock")

    def mode_step() -> float:
        with running(mode):
            return timed("mode")

    # Exactness and bytes first (different model instances so the timing model stays warm).
    reference, candidate = _build(case), _build(case)
    stock_grads = _gradients(reference, x, y)
    with MemSaveMode():
        mode_grads = _gradients(candidate, x, y)
    exact = compare_gradients(mode_grads, stock_grads, rel_tol=0.0)[0] == "bit-identical"  # raw bits, each
    stock_bytes, _ = saved_tensor_bytes(lambda: reference(x), exclude=reference)
    with MemSaveMode():
        mode_bytes, _ = saved_tensor_bytes(lambda: candidate(x), exclude=candidate)

    for _ in range(3):
        stock_step()
        mode_step()
    faults["stock"].clear()
    faults["mode"].clear()
    times = interleaved_times(
        {"mode": mode_step, "stock": stock_step},
        pairs,
        on_round=None if progress is None else lambda: progress.advance(task),
    )
    stock_times, mode_times = times["stock"], times["mode"]
    ratios = [m / s for m, s in zip(mode_times, stock_times)]
    return {
        "case": case,
        "batch": batch,
        "input": [3, size, size],
        "pairs": pairs,
        "stock_ms": statistics.median(stock_times) * 1e3,
        "mode_ms": statistics.median(mode_times) * 1e3,
        "median_ratio": median_ratio(mode_times, stock_times),
        "ratio_quartiles": statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3,
        "stock_bytes": stock_bytes,
        "mode_bytes": mode_bytes,
        "bytes_ratio": mode_bytes / stock_bytes,
        "gradients_bit_identical": exact,
        "stock_page_faults_per_step": statistics.median(faults["stock"]) if faults["stock"] else None,
        "mode_page_faults_per_step": statistics.median(faults["mode"]) if faults["mode"] else None,
    }


def run_step(cases: Sequence[str], batch: int, size: int, pairs: int, console: Any = None) -> list[dict]:
    """Every case in turn, with a progress bar over all their interleaved pairs."""
    results = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("interleaved steps", total=pairs * len(cases))
        for case in cases:
            results.append(run_case(case, batch, size, pairs, progress, task))
    return results
