"""Running the benchmark: the four columns (stock PyTorch or MemSaveMode, eager or compiled),
one model x case measured column by column (gradients, bytes kept, peak, interleaved timing
rounds), and every model x case of a run as JSON-ready results."""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from memsave_dispatch import engine, saved_tensor_bytes
from memsave_dispatch.mode import MemSaveMode

from .cases import SEED, Case, ModelSpec
from .compile_backend import COMPILE_LABELS, compile_model, compile_settings
from .measure import (
    COMPILE_REL_TOL,
    PEAK_METHODS,
    TIME_METHODS,
    compare_gradients,
    interleaved_times,
    median_ratio,
    step_peak_bytes,
    time_step,
)


# -- columns -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    """One way to run the step. Ratios and exactness are against ``baseline``: the mode
    against the same execution without it, compile against stock eager."""

    key: str
    label: str
    compiled: bool
    mode: bool
    baseline: str | None


COLUMNS: tuple[Column, ...] = (
    Column("eager", "stock eager", compiled=False, mode=False, baseline=None),
    Column("mode", "eager + MemSaveMode", compiled=False, mode=True, baseline="eager"),
    Column("compile", "torch.compile", compiled=True, mode=False, baseline="eager"),
    Column("compile_mode", "torch.compile + MemSaveMode", compiled=True, mode=True, baseline="compile"),
)
COLUMN = {column.key: column for column in COLUMNS}


@contextlib.contextmanager
def running(mode: MemSaveMode | None) -> Iterator[None]:
    """Stock PyTorch (the interposing kernels removed, so stock pays nothing for this library
    being imported), or ``mode`` (entering it installs its kernels)."""
    if mode is None:
        engine.uninstall()
        yield
    else:
        with mode:
            yield


# -- one model x case ----------------------------------------------------------------------
@dataclass
class Cell:
    """The figures of one column in one row; None where not measured."""

    kept_bytes: int | None = None
    peak_bytes: int | None = None
    step_ms: float | None = None
    time_ratio: float | None = None  # median per-round ratio against the column's baseline
    time_ratio_vs_eager: float | None = None
    exact: str | None = None  # against the baseline: bit-identical / within tol / DIFFERS
    max_rel_diff: float | None = None  # relative L2 error of the gradients against the baseline
    graphs: int | None = None  # graphs dynamo captured for the column (more than 1: breaks or recompiles)
    graph_breaks: int | None = None
    error: str | None = None


@dataclass(frozen=True)
class BenchConfig:
    batch: int = 8
    size: int = 128
    pairs: int = 15
    compile_backend: str = "inductor"
    device: str = "cpu"
    warmup: int = 2

    @property
    def compiled_figures_measured(self) -> bool:
        """Only real Inductor's step time and peak mean anything: with eager kernels the
        partitioned graphs allocate and run differently."""
        return self.compile_backend == "inductor"


class _Runner:
    """Runs one column's training step on the shared model, input and optimizer."""

    def __init__(self, column: Column, forward: Callable[[Tensor], Tensor], bench: _CaseSetup) -> None:
        self.column = column
        self.forward = forward
        self.bench = bench
        self.mode = MemSaveMode(devices=(bench.device.type,)) if column.mode else None
        self.graphs = 0
        self.graph_breaks = 0

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Stock: kernels uninstalled. Mode: kernels installed, then the mode entered. Also
        counts the graphs torch.compile builds meanwhile."""
        from torch._dynamo.utils import counters

        graphs = counters["stats"]["unique_graphs"]
        breaks = sum(counters["graph_break"].values())
        try:
            with running(self.mode):
                yield
        finally:
            self.graphs += counters["stats"]["unique_graphs"] - graphs
            self.graph_breaks += sum(counters["graph_break"].values()) - breaks

    def loss(self) -> Tensor:
        return self.bench.spec.loss(self.forward(self.bench.x), self.bench.target)

    def step(self) -> None:
        """Forward, backward, optimizer step, gradients released (as a training loop would)."""
        self.loss().backward()
        self.bench.optimizer_step()

    def gradients(self) -> list[Tensor | None]:
        bench = self.bench
        bench.clear_gradients()
        with self.active():
            torch.manual_seed(SEED)  # the same dropout masks in every column
            self.loss().backward()
        grads = [bench.x.grad] if bench.x.requires_grad else []
        grads += [p.grad for p in bench.trainable]
        bench.clear_gradients()
        return grads

    def kept_bytes(self) -> int:
        with self.active():
            kept, _ = saved_tensor_bytes(self.loss, exclude=self.bench.model)
        return kept

    def peak_bytes(self) -> int:
        with self.active():
            return step_peak_bytes(self.step, self.bench.device)

    def warm_up(self, steps: int) -> None:
        with self.active():
            for _ in range(steps):
                self.step()

    def timed_step(self) -> float:
        with self.active():
            return time_step(self.step, self.bench.device)


class _CaseSetup:
    """A fresh model prepared for one case, its batch, and an optimizer over what trains."""

    def __init__(self, spec: ModelSpec, case: Case, config: BenchConfig) -> None:
        self.spec = spec
        self.device = torch.device(config.device)
        torch.manual_seed(SEED)
        self.model = spec.build()
        spec.prepare(case)(self.model)
        self.model.to(self.device)
        self.x, self.target = spec.batch(config.batch, config.size, self.device)
        self.x.requires_grad_(case.input_grad)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        # Learning rate 0: the step does all its work but the weights stay put.
        self.optimizer = torch.optim.SGD(self.trainable, lr=0.0, momentum=0.9) if self.trainable else None

    def optimizer_step(self) -> None:
        if self.optimizer is not None:
            self.optimizer.step()
        self.clear_gradients()

    def clear_gradients(self) -> None:
        self.model.zero_grad(set_to_none=True)
        self.x.grad = None


def bench_case(
    spec: ModelSpec,
    case: Case,
    config: BenchConfig,
    advance: Callable[[str], None] = lambda phase: None,
) -> dict[str, Cell]:
    """Measure every column for one model and case. ``advance(phase)`` is called after each of
    the phases returned by :func:`phases`."""
    torch._dynamo.reset()  # a fresh model must not count against the previous one's recompiles
    setup = _CaseSetup(spec, case, config)
    columns = [c for c in COLUMNS if not c.compiled or config.compile_backend != "none"]
    compiled = compile_model(setup.model, config.compile_backend) if config.compile_backend != "none" else None
    runners = {c.key: _Runner(c, compiled if c.compiled else setup.model, setup) for c in columns}
    cells = {c.key: Cell() for c in columns}

    def each(measure: Callable[[_Runner], Any], runners_: Sequence[_Runner]) -> dict[str, Any]:
        """Run ``measure`` per column; a column that fails keeps its error and drops out."""
        results = {}
        for runner in runners_:
            try:
                results[runner.column.key] = measure(runner)
            except Exception as error:  # a model torch.compile cannot handle must not stop the run
                cells[runner.column.key].error = f"{type(error).__name__}: {error}"[:300]
                runners.pop(runner.column.key)
        return results

    with compile_settings(config.compile_backend):
        grads = each(_Runner.gradients, list(runners.values()))
        for key, cell in cells.items():
            baseline = COLUMN[key].baseline
            if key in grads and baseline in grads:
                # Eager, the mode must not change a single bit. Compiled, it changes what the
                # partitioner saves, so Inductor may fuse and sum in another order.
                rel_tol = 0.0 if COLUMN[key].mode and not COLUMN[key].compiled else COMPILE_REL_TOL
                cell.exact, cell.max_rel_diff = compare_gradients(grads[key], grads[baseline], rel_tol)
        del grads
        advance("gradients")

        for key, kept in each(_Runner.kept_bytes, list(runners.values())).items():
            cells[key].kept_bytes = kept
        advance("bytes kept")

        measured = [r for r in runners.values() if not r.column.compiled or config.compiled_figures_measured]
        each(lambda r: r.warm_up(config.warmup), measured)
        measured = [r for r in measured if r.column.key in runners]
        for key, peak in each(_Runner.peak_bytes, measured).items():
            cells[key].peak_bytes = peak
        advance("peak")

        measured = [r for r in measured if r.column.key in runners]
        times = interleaved_times(
            {r.column.key: r.timed_step for r in measured}, config.pairs, on_round=lambda: advance("timing")
        )
    _record_times(cells, times)
    for key, runner in runners.items():
        if runner.column.compiled:
            cells[key].graphs, cells[key].graph_breaks = runner.graphs, runner.graph_breaks
    engine.uninstall()
    runners.clear()  # the models they hold go before the collection below
    del setup, compiled
    torch._dynamo.reset()
    gc.collect()
    return cells


def _record_times(cells: dict[str, Cell], times: dict[str, list[float]]) -> None:
    """Median step time, and median per-round ratios against the baseline and stock eager."""
    for key, samples in times.items():
        cell = cells[key]
        cell.step_ms = statistics.median(samples) * 1e3
        baseline = COLUMN[key].baseline
        if baseline in times:
            cell.time_ratio = median_ratio(samples, times[baseline])
        if key != "eager" and "eager" in times:
            cell.time_ratio_vs_eager = median_ratio(samples, times["eager"])


def phases(config: BenchConfig) -> int:
    """Progress units per model x case: gradients, bytes kept, peak, one per timing round."""
    return 3 + config.pairs


# -- the whole run -------------------------------------------------------------------------
def run_bench(
    specs: Sequence[ModelSpec],
    cases: Sequence[Case],
    config: BenchConfig,
    console: Any = None,
) -> dict[str, Any]:
    """Every model x case, with a progress bar; returns JSON-ready results."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    rows = []
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True,
    )
    pairs = [(spec, case) for spec in specs for case in cases if not (case.input_grad and spec.vocab is not None)]
    with progress:
        task = progress.add_task("benchmark", total=len(pairs) * phases(config))
        for spec, case in pairs:  # (token ids take no input gradient: such cases are left out)
            label = f"{spec.name} / {case.label}"
            progress.update(task, description=f"{label}: gradients")

            def advance(phase: str, label: str = label) -> None:
                progress.update(task, advance=1, description=f"{label}: {phase}")

            start = time.perf_counter()
            cells = bench_case(spec, case, config, advance)
            rows.append(
                {
                    "model": spec.name,
                    "case": case.key,
                    "case_label": case.label,
                    "input_shape": spec.input_shape(config.batch, config.size),
                    "seconds": time.perf_counter() - start,
                    "columns": {key: asdict(cell) for key, cell in cells.items()},
                }
            )
    return {"config": _describe(config), "rows": rows}


def _describe(config: BenchConfig) -> dict[str, Any]:
    device = torch.device(config.device)
    return {
        **asdict(config),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "peak_method": PEAK_METHODS[device.type],
        "time_method": TIME_METHODS[device.type],
        "compile_label": COMPILE_LABELS.get(config.compile_backend),
        "columns": {c.key: {"label": c.label, "baseline": c.baseline} for c in COLUMNS},
        "optimizer": "SGD(momentum=0.9, lr=0)",
    }
