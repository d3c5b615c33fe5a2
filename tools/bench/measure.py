"""What the benchmark measures, and how: the peak allocation over a step (CPU allocator events
replayed from the profiler, or CUDA's statistics), step times in interleaved rounds with
garbage collection kept out of the timed steps, minor page faults, and gradients compared
against a baseline. Bytes kept for backward come from :func:`memsave_dispatch.saved_tensor_bytes`."""

from __future__ import annotations

import contextlib
import gc
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from memsave_dispatch.exactness import bit_identical
from memsave_dispatch.meter import allocator_bytes


def step_peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak allocation above the starting point while ``fn`` runs (the library's outside
    measure: CUDA's allocator statistics, or the CPU allocator's events replayed)."""
    return allocator_bytes(fn, device).peak


PEAK_METHODS = {
    "cpu": "CPU allocator events replayed from torch.profiler(profile_memory=True)",
    "cuda": "torch.cuda.max_memory_allocated after reset_peak_memory_stats",
}


def interleaved_times(
    steps: dict[str, Callable[[], float]], rounds: int, on_round: Callable[[], None] | None = None
) -> dict[str, list[float]]:
    """Run every step once per round and return each one's times (seconds).

    Rounds alternate between forward and reverse order (ABBA for two steps), so that
    whatever runs first or last in a round (warm caches, thermal state) is shared out.
    Each step times itself, which lets it keep set-up (such as installing kernels) out.
    """
    times: dict[str, list[float]] = {key: [] for key in steps}
    order = list(steps)
    with _collecting_only_new_objects():
        for index in range(rounds):
            for key in order if index % 2 == 0 else reversed(order):
                times[key].append(steps[key]())
            if on_round is not None:
                on_round()
    return times


@contextlib.contextmanager
def _collecting_only_new_objects() -> Iterator[None]:
    """Objects alive before the rounds start are set aside from garbage collection, so the
    collection :func:`time_step` runs before each step walks only what the steps made. After
    a torch.compile a full collection took 0.4 s, two per round: a fifth of a quick
    benchmark's run. A caller that froze objects itself keeps them so."""
    if gc.get_freeze_count():
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def minor_page_faults() -> int | None:
    """Minor page faults of this process so far (None where the OS does not say).

    A step that touches memory the allocator had returned to the OS pays a fault per page
    (glibc gives large freed blocks back and maps them again later): thousands per step, a few
    milliseconds, varying from process to process with the allocator's state.
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_step(step: Callable[[], Any], device: torch.device | str = "cpu") -> float:
    """Seconds ``step()`` takes: wall clock on the CPU; on a GPU, CUDA events recorded before
    and after it (the device's timeline from the step's first queued work to its last kernel,
    idle gaps included). Switching between stock and the mode installs or removes kernels:
    that garbage is collected first, so the collection it would trigger does not land in
    whichever step comes next."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start_time = time.perf_counter()
    step()
    return time.perf_counter() - start_time


TIME_METHODS = {"cpu": "wall clock (time.perf_counter)", "cuda": "CUDA events around the step"}


def median_ratio(times: Sequence[float], baseline: Sequence[float]) -> float:
    """The median of the per-round ratios: robust to a round disturbed for both alike."""
    return statistics.median(t / b for t, b in zip(times, baseline))


#: Compiled code sums in another order: its gradients are compared by relative error.
COMPILE_REL_TOL = 1e-2


def compare_gradients(
    candidate: Sequence[Tensor | None], reference: Sequence[Tensor | None], rel_tol: float = COMPILE_REL_TOL
) -> tuple[str, float | None]:
    """'bit-identical' (raw bits: the sign of zero and NaN payloads count), 'within tol' (relative L2 error of all gradients taken
    together, ``|a - b| / |b|``, at most ``rel_tol``) or 'DIFFERS', and that error (None when
    the gradients do not match up). Taken together, because a gradient that is zero in exact
    arithmetic (a bias before a batch norm in training) has no meaningful relative error."""
    pairs = list(zip(candidate, reference))
    if len(candidate) != len(reference) or any(
        (a is None) != (b is None) or (a is not None and (a.dtype, a.shape) != (b.dtype, b.shape)) for a, b in pairs
    ):
        return "DIFFERS", None
    pairs = [(a, b) for a, b in pairs if a is not None]
    if all(bit_identical(a, b) for a, b in pairs):
        return "bit-identical", 0.0
    difference = math.sqrt(sum((a.double() - b.double()).square().sum().item() for a, b in pairs))
    scale = math.sqrt(sum(b.double().square().sum().item() for _, b in pairs))
    error = difference / scale if scale else math.inf
    return ("within tol" if error <= rel_tol else "DIFFERS"), error
