"""The meter: bytes an autograd graph keeps for backward, measured on the path users run.

:func:`saved_tensor_bytes` reads what the graph's nodes hold (through
:func:`~memsave_dispatch.audit`), without installing saved-tensor hooks: hooks would change
what MemSaveMode does (it registers them on every slot it keeps), so a hook-based meter would
measure another path than the one a training loop takes. :func:`allocator_bytes` is the
outside check: what the allocator itself handed out and took back while a function ran.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from ._compat import next_sequence_nr
from .audit import audit

__all__ = ["saved_tensor_bytes", "allocator_bytes", "AllocatorBytes"]


def saved_tensor_bytes(
    fn: Callable[[], Any], exclude: nn.Module | Iterable[Tensor] | None = None
) -> tuple[int, Any]:
    """Run ``fn()`` and return (bytes the graph it built keeps for backward, its result).

    Counts the distinct storages held by the nodes created during ``fn`` that its result's
    graph reaches; a module's parameters and buffers (or the tensors given) in ``exclude``
    are not counted: they live as long as the model anyway.
    """
    start = next_sequence_nr()
    result = fn()
    if isinstance(exclude, nn.Module):
        report = audit(result, model=exclude, created_from=start)
    else:
        report = audit(result, exclude=() if exclude is None else tuple(exclude), created_from=start)
    return report.total_bytes, result


class AllocatorBytes(NamedTuple):
    net: int  # still allocated when fn returned (allocated during fn, minus freed during fn)
    peak: int  # the most allocated above the starting point at any moment
    result: Any


def allocator_bytes(fn: Callable[[], Any], device: torch.device | str = "cpu") -> AllocatorBytes:
    """Run ``fn()`` and count the bytes the allocator served meanwhile.

    On a GPU: the caching allocator's statistics. On the CPU, which keeps none: the profiler
    (``profile_memory=True``) records every allocation and free as a signed event, replayed
    in time order. Memory that does not come from the allocator (MemSaveMode's ghosts map the
    zero page) is not counted: it costs nothing.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        end = torch.cuda.memory_allocated(device)
        return AllocatorBytes(end - start, torch.cuda.max_memory_allocated(device) - start, result)
    # Kineto prints two lines per profiling session unless told otherwise (read on first use).
    os.environ.setdefault("KINETO_LOG_LEVEL", "10")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    deltas = sorted(
        (event.start_ns(), index, event.nbytes())
        for index, event in enumerate(prof.profiler.kineto_results.events())
        if event.name() == "[memory]" and event.device_type() == DeviceType.CPU
    )
    live = peak = 0
    for _, _, delta in deltas:
        live += delta
        peak = max(peak, live)
    return AllocatorBytes(live, peak, result)
