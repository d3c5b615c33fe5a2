"""What one handled call costs: forward and backward of one operator on a small tensor, under
MemSaveMode against stock PyTorch, warm, in one thread.

Each round times a burst of calls stock (the interposing kernels uninstalled), under the mode,
and stock again, in the calling thread's CPU time (far less disturbed by other processes than
wall time), each after a few untimed calls (installing or removing kernels leaves the next
calls cold); the overhead is the median over rounds of mode minus the mean of the two stock
bursts around it.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from memsave_dispatch import MemSaveMode, engine

from .engines import engine_selected


@dataclass(frozen=True)
class Call:
    """One handled call and its backward: ``make()`` returns the step to repeat."""

    label: str
    make: Callable[[], Callable[[], None]]


def _frozen_conv() -> Callable[[], None]:
    x = torch.randn(1, 3, 16, 16, requires_grad=True)
    w = torch.randn(4, 3, 3, 3)
    grad = torch.randn(1, 4, 14, 14)
    return lambda: F.conv2d(x, w).backward(grad)


def _relu() -> Callable[[], None]:
    x = torch.randn(1, 8, 16, 16, requires_grad=True)
    grad = torch.randn(1, 8, 16, 16)
    return lambda: torch.relu(x).backward(grad)


def _max_pool() -> Callable[[], None]:
    x = torch.randn(1, 8, 16, 16, requires_grad=True)
    grad = torch.randn(1, 8, 8, 8)
    return lambda: F.max_pool2d(x, 2).backward(grad)


def _batch_norm_eval() -> Callable[[], None]:
    x = torch.randn(2, 8, 8, 8, requires_grad=True)
    mean, var, grad = torch.zeros(8), torch.ones(8), torch.randn(2, 8, 8, 8)
    return lambda: F.batch_norm(x, mean, var).backward(grad)


CALLS: tuple[Call, ...] = (
    Call("frozen conv2d, 1x3x16x16 -> 4 channels", _frozen_conv),
    Call("relu, 1x8x16x16", _relu),
    Call("max_pool2d 2x2, 1x8x16x16", _max_pool),
    Call("batch_norm eval, frozen, 2x8x8x8", _batch_norm_eval),
)


def _burst(step: Callable[[], None], calls: int, warm: int = 20) -> float:
    """Microseconds of the calling thread's CPU time per call, after ``warm`` untimed calls."""
    for _ in range(warm):
        step()
    start = time.thread_time_ns()
    for _ in range(calls):
        step()
    return (time.thread_time_ns() - start) / calls / 1e3


def run_per_call(engines: Sequence[str], rounds: int = 41, calls: int = 200) -> list[dict]:
    """Per handled call and engine: stock microseconds and the mode's overhead (median, IQR)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    results = []
    try:
        for call in CALLS:
            step = call.make()
            row = {"call": call.label, "calls_per_round": calls, "rounds": rounds, "engines": {}}
            for name in engines:
                with engine_selected(name):
                    mode = MemSaveMode()
                with mode:
                    for _ in range(calls):  # warm: kernels installed, caches filled
                        step()
                stock_us, overheads = [], []
                gc.collect()
                gc.freeze()
                try:
                    for _ in range(rounds):
                        engine.uninstall()
                        before = _burst(step, calls)
                        with mode:
                            inside = _burst(step, calls)
                        engine.uninstall()
                        after = _burst(step, calls)
                        stock_us.append(min(before, after))
                        overheads.append(inside - (before + after) / 2)
                finally:
                    gc.unfreeze()
                row["stock_us"] = statistics.median(stock_us)
                row["engines"][name] = {
                    "engine": mode.report().engine,
                    "overhead_us": statistics.median(overheads),
                    "overhead_quartiles_us": statistics.quantiles(overheads, n=4),
                }
            results.append(row)
    finally:
        torch.set_num_threads(threads)
    return results
