"""Step time of a training step under MemSaveMode against stock PyTorch, same process, per
engine, with and without allocator trimming; and the per-call overhead of a handled call.

    python -m tools.bench step                        # every row, both engines, both allocator settings
    python -m tools.bench step --rows resnet18-eval --pairs 81 --json step.json
    python -m tools.bench step --engines compiled --trim no --threads 2

Rows (cases.STEP_ROWS): the ResNet-18-shaped net at batch 8, 3x128x128, frozen conv/BN with
BN in eval or training mode, and all trainable; torchvision's resnet50 (batch 2, 96x96) and
mobilenet_v3_large (batch 8, 128x128), frozen with BN in eval mode, where torchvision is
installed. Stock and mode steps are interleaved (ABC...CBA order, so drift and caches hit every
side alike) and each figure is the median of the per-round ratios mode/stock. Stock steps run
with the interposing kernels uninstalled, so stock pays nothing for this library being
imported. Bytes kept for backward are what ``saved_tensor_bytes`` reads off the graph,
parameters and buffers excluded, and gradients are compared as raw bits.

Allocator trimming: glibc returns large freed blocks to the OS and maps them again later, so
a step can pay thousands of page faults (milliseconds), on either side, varying from process
to process. Each allocator setting runs in a process of its own: "trim" is glibc's default;
"keep" keeps freed memory in the process
(``GLIBC_TUNABLES=glibc.malloc.trim_threshold=4294967296:glibc.malloc.mmap_threshold=4294967295``),
which shows the mode's own cost with page faults out of the picture.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import torch
from rich.progress import Progress

from memsave_dispatch import MemSaveMode, saved_tensor_bytes

from .cases import NUM_CLASSES, STEP_CASES, STEP_ROWS, StepRow, model_spec
from .engines import engine_selected
from .measure import compare_gradients, interleaved_times, median_ratio, minor_page_faults, time_step
from .percall import run_per_call
from .runner import running

KEEP_FREED_MEMORY = "glibc.malloc.trim_threshold=4294967296:glibc.malloc.mmap_threshold=4294967295"
ALLOCATORS = {"trim": None, "keep": KEEP_FREED_MEMORY}


def available_rows() -> tuple[list[StepRow], list[str]]:
    """The rows whose models can be built here, and why the others cannot."""
    rows, skipped = [], []
    for row in STEP_ROWS.values():
        try:
            model_spec(row.model)
        except ValueError as error:
            skipped.append(f"{row.key}: {error}")
            continue
        rows.append(row)
    return rows, skipped


def _build(row: StepRow, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = model_spec(row.model).build()
    STEP_CASES[row.case](model)
    return model


def _gradients(model, x, y) -> list[torch.Tensor]:
    x = x.detach().requires_grad_(True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    grads = [x.grad] + [p.grad for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return grads


def run_row(row: StepRow, pairs: int, engines: Sequence[str], batch: int | None = None, size: int | None = None,
            on_round=None) -> dict:
    """Interleaved stock and mode steps of one row, one mode per engine."""
    batch, size = batch or row.batch, size or row.size
    model = _build(row)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=torch.Generator().manual_seed(2))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.0, momentum=0.9) if trainable else None  # every step sees the same model
    modes = {}
    for name in engines:
        with engine_selected(name):
            modes[name] = MemSaveMode()

    def step() -> None:
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        x.grad = None
        torch.nn.functional.cross_entropy(model(x), y).backward()
        if optimizer is not None:
            optimizer.step()

    faults: dict[str, list[int]] = {"stock": [], **{name: [] for name in engines}}

    def timed(side: str, mode: MemSaveMode | None) -> float:
        with running(mode):
            before = minor_page_faults()
            seconds = time_step(step)
            if before is not None:
                faults[side].append(minor_page_faults() - before)
        return seconds

    # Exactness and bytes first, on fresh copies of the model (the timed one stays warm).
    reference = _build(row)
    stock_grads = _gradients(reference, x, y)
    stock_bytes, _ = saved_tensor_bytes(lambda: reference(x), exclude=reference)
    per_engine: dict[str, dict[str, Any]] = {}
    for name, mode in modes.items():
        candidate = _build(row)
        with mode:
            grads = _gradients(candidate, x, y)
            kept, _ = saved_tensor_bytes(lambda model=candidate: model(x), exclude=candidate)
        per_engine[name] = {
            "engine": mode.report().engine,
            "mode_bytes": kept,
            "bytes_ratio": kept / stock_bytes,
            "gradients_bit_identical": compare_gradients(grads, stock_grads, rel_tol=0.0)[0] == "bit-identical",
        }
        mode.reset_report()
    sides = {"stock": lambda: timed("stock", None), **{name: (lambda m=mode, n=name: timed(n, m)) for name, mode in modes.items()}}
    for _ in range(3):
        for run in sides.values():
            run()
    for samples in faults.values():
        samples.clear()
    times = interleaved_times(sides, pairs, on_round=on_round)
    for name in engines:
        ratios = [m / s for m, s in zip(times[name], times["stock"])]
        per_engine[name].update(
            mode_ms=statistics.median(times[name]) * 1e3,
            median_ratio=median_ratio(times[name], times["stock"]),
            ratio_quartiles=statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3,
            page_faults_per_step=statistics.median(faults[name]) if faults[name] else None,
        )
    return {
        "row": row.key,
        "model": row.model,
        "case": row.case,
        "batch": batch,
        "input": [3, size, size],
        "pairs": pairs,
        "stock_ms": statistics.median(times["stock"]) * 1e3,
        "stock_bytes": stock_bytes,
        "stock_page_faults_per_step": statistics.median(faults["stock"]) if faults["stock"] else None,
        "engines": per_engine,
    }


def measure(rows: Sequence[StepRow], engines: Sequence[str], pairs: int, batch: int | None, size: int | None,
            per_call_rounds: int, console: Any = None) -> dict:
    """Everything one allocator setting measures, in this process (no per-call rounds: none)."""
    load_before = os.getloadavg()
    results = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("interleaved steps", total=pairs * len(rows))
        for row in rows:
            progress.update(task, description=row.label)
            results.append(run_row(row, pairs, engines, batch, size, on_round=lambda: progress.advance(task)))
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average": [load_before, os.getloadavg()],
        "rows": results,
        "per_call": run_per_call(engines, per_call_rounds) if per_call_rounds else [],
    }


def measure_in_subprocess(allocator: str, argv: Sequence[str]) -> dict:
    """Run :func:`measure` with ``allocator``'s settings in a fresh process (glibc reads its
    tunables at start-up)."""
    env = dict(os.environ)
    env.pop("GLIBC_TUNABLES", None)
    if ALLOCATORS[allocator] is not None:
        env["GLIBC_TUNABLES"] = ALLOCATORS[allocator]
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "step.json")
        subprocess.run(
            [sys.executable, "-m", "tools.bench", "step", *argv, "--measure-only", path],
            env=env,
            check=True,
        )
        with open(path) as handle:
            return json.load(handle)
