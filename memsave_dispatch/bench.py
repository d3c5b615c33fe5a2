"""The benchmark: what MemSaveMode saves, costs and keeps exact, eager and under torch.compile.

    memsave-dispatch bench --quick                  # ResNet-18, every case: under two minutes on 2 cores
    memsave-dispatch bench --json bench.json --png bench.png
    python -m memsave_dispatch bench --models vgg11_bn torchvision:resnet50 --cases bias lora

Rows are model x fine-tuning case (which parameters train, whether the input needs a
gradient, batch norm in training or eval mode); columns are stock eager PyTorch, eager under
MemSaveMode, torch.compile, and torch.compile under MemSaveMode. Every cell has:

- **kept**: bytes the graph keeps for backward after one forward pass (saved-tensor hooks,
  distinct storages, parameters and buffers excluded; see :mod:`memsave_dispatch.measure`);
- **peak**: the highest allocation above the step's starting point over one whole training
  step (forward, backward, optimizer step);
- **time**: the median, over interleaved rounds, of the step time against a baseline column
  in the same round (so drift and cache effects hit both alike);
- **exact**: gradients (input and every trainable parameter) against the baseline column.

Stock columns run with the interposing kernels uninstalled, so stock pays nothing for this
library being imported. The optimizer is SGD with momentum and learning rate 0: every step
does the full work of a training step but sees the same weights, so steps stay comparable.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import interposer
from .measure import saved_tensor_bytes
from .mode import MemSaveMode
from tools.bench.models import add_lora, mobilenet_v2, resnet18, set_batchnorm_eval, transformer_encoder, vgg11_bn
from .report import format_bytes

__all__ = [
    "MODELS",
    "CASES",
    "COLUMNS",
    "BenchConfig",
    "Cell",
    "ModelSpec",
    "Case",
    "bench_case",
    "run_bench",
    "step_peak_bytes",
    "cpu_peak_bytes",
    "interleaved_times",
    "median_ratio",
    "running",
    "time_step",
    "main",
]

NUM_CLASSES = 10
SEED = 0
LORA_RANK = 4


# -- models ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """A network and the batches it trains on.

    Image models get ``(batch, 3, size, size)`` inputs and a cross-entropy loss over
    ``NUM_CLASSES`` classes; sequence models (``features`` set) get ``(batch, size, features)``
    tokens and a mean-squared error against random targets.
    """

    name: str
    build: Callable[[], nn.Module]
    features: int | None = None

    def batch(self, batch: int, size: int, device: torch.device) -> tuple[Tensor, Tensor]:
        generator = torch.Generator().manual_seed(SEED + 1)
        if self.features is not None:
            x = torch.randn(batch, size, self.features, generator=generator)
            target = torch.randn(batch, size, self.features, generator=generator)
        else:
            x = torch.randn(batch, 3, size, size, generator=generator)
            target = torch.randint(0, NUM_CLASSES, (batch,), generator=generator)
        return x.to(device), target.to(device)

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        if self.features is not None:
            return F.mse_loss(output, target)
        return F.cross_entropy(output, target)

    def input_shape(self, batch: int, size: int) -> list[int]:
        return [batch, size, self.features] if self.features is not None else [batch, 3, size, size]


MODELS: dict[str, ModelSpec] = {
    "resnet18": ModelSpec("resnet18", lambda: resnet18(NUM_CLASSES)),
    "vgg11_bn": ModelSpec("vgg11_bn", lambda: vgg11_bn(NUM_CLASSES)),
    "mobilenet_v2": ModelSpec("mobilenet_v2", lambda: mobilenet_v2(NUM_CLASSES)),
    "transformer_encoder": ModelSpec("transformer_encoder", transformer_encoder, features=256),
}

_EXTERNAL_BUILDERS: dict[str, Callable[[Any, str], nn.Module]] = {
    "torchvision": lambda package, name: package.models.get_model(name, weights=None, num_classes=NUM_CLASSES),
    "timm": lambda package, name: package.create_model(name, pretrained=False, num_classes=NUM_CLASSES),
}


def model_spec(name: str) -> ModelSpec:
    """A built-in model by name, or ``torchvision:NAME`` / ``timm:NAME`` (randomly initialised
    image classifiers, when that package is installed)."""
    if name in MODELS:
        return MODELS[name]
    package_name, _, model_name = name.partition(":")
    if package_name not in _EXTERNAL_BUILDERS or not model_name:
        raise ValueError(
            f"unknown model {name!r}: use one of {', '.join(MODELS)}, or torchvision:NAME / timm:NAME"
        )
    try:
        package = importlib.import_module(package_name)
    except ImportError:
        raise ValueError(f"model {name!r} needs {package_name}, which is not installed (pip install {package_name})") from None
    builder = _EXTERNAL_BUILDERS[package_name]
    builder(package, model_name)  # fail now on a bad name, not in the middle of the run
    return ModelSpec(name, lambda: builder(package, model_name))


# -- cases -------------------------------------------------------------------------------
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # batch and instance norm
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


@dataclass(frozen=True)
class Case:
    """A fine-tuning setting: ``prepare`` sets requires_grad and train/eval on a fresh model."""

    key: str
    label: str
    prepare: Callable[[nn.Module], None]
    input_grad: bool = False


def _train_only(model: nn.Module, parameters: Iterator[nn.Parameter]) -> None:
    model.requires_grad_(False)
    for parameter in parameters:
        parameter.requires_grad_(True)


def _parameterised_layers(model: nn.Module) -> list[nn.Module]:
    """Modules owning parameters directly, in module (definition) order."""
    return [module for module in model.modules() if next(module.parameters(recurse=False), None) is not None]


def _quarter(model: nn.Module, first: bool) -> None:
    layers = _parameterised_layers(model)
    count = max(1, math.ceil(len(layers) / 4))
    chosen = layers[:count] if first else layers[-count:]
    _train_only(model, (p for layer in chosen for p in layer.parameters(recurse=False)))


def _lora(model: nn.Module) -> None:
    model.requires_grad_(False)
    add_lora(model, LORA_RANK)


CASES: dict[str, Case] = {
    case.key: case
    for case in (
        Case("all", "all trainable", lambda m: None),
        Case("input-bn-train", "input grad, BN train", lambda m: m.requires_grad_(False), input_grad=True),
        Case(
            "input-bn-eval",
            "input grad, BN eval",
            lambda m: (m.requires_grad_(False), set_batchnorm_eval(m)),
            input_grad=True,
        ),
        Case("bias", "bias only", lambda m: _train_only(m, (p for n, p in m.named_parameters() if n.endswith("bias")))),
        Case(
            "norm",
            "norm only",
            lambda m: _train_only(
                m, (p for module in m.modules() if isinstance(module, NORM_TYPES) for p in module.parameters(recurse=False))
            ),
        ),
        Case("first-quarter", "first quarter", lambda m: _quarter(m, first=True)),
        Case("last-quarter", "last quarter", lambda m: _quarter(m, first=False)),
        Case("lora", f"LoRA (rank {LORA_RANK})", _lora),
    )
}


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

# How the compile columns compile: real Inductor, or Inductor's own graph capture,
# decompositions, joint-graph passes and partitioner (so the same tensors are saved for
# backward) with the partitioned graphs run by eager aten kernels instead of generated code.
COMPILE_BACKENDS = ("inductor", "partition", "none")
COMPILE_LABELS = {
    "inductor": "torch.compile (inductor)",
    "partition": "torch.compile (inductor partition, eager kernels)",
}


def _channels_last_weight_outputs(gm: torch.fx.GraphModule) -> list[int]:
    """Which outputs of a forward graph are conv weights that Inductor would convert to
    channels-last (its layout optimisation, always on for CPU convolutions with mkldnn) and so
    save for backward as a converted copy rather than as the parameter itself."""
    from torch._inductor.graph import GraphLowering

    if not GraphLowering.decide_layout_opt(gm, is_inference=False):
        return []
    weights = {
        node.args[1]
        for node in gm.graph.nodes
        if node.target is torch.ops.aten.convolution.default and node.args[1].op == "placeholder"
    }
    (outputs,) = (node.args[0] for node in gm.graph.nodes if node.op == "output")
    return [index for index, output in enumerate(outputs) if output in weights]


def _eager_kernels(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], *, is_backward: bool = False, is_inference: bool = False, **_: Any
) -> Any:
    """Inductor's inner compiler replaced: run the graph with aten kernels, reproducing the one
    lowering decision that changes what is kept (channels-last copies of saved conv weights)."""
    from functorch.compile import make_boxed_func

    converted = [] if is_backward or is_inference else _channels_last_weight_outputs(gm)
    if not converted:
        return make_boxed_func(gm.forward)

    def forward(*args: Any) -> list[Any]:
        # A copy of the same size, in the layout the backward graph was traced for.
        outputs = list(gm.forward(*args))
        for index in converted:
            if not outputs[index].is_contiguous(memory_format=torch.channels_last):
                outputs[index] = outputs[index].clone()
        return outputs

    return make_boxed_func(forward)


def inductor_partition_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Any:
    """``torch.compile`` backend: Inductor up to and including the forward/backward partition
    (graph capture, decompositions, joint-graph passes, min-cut partitioner), then the graphs
    run as they are, with no code generation: seconds instead of half a minute for a ResNet-18
    on two cores, and the same tensors kept for backward."""
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, inner_compile=_eager_kernels)


@contextlib.contextmanager
def _compile_settings(backend: str) -> Iterator[None]:
    """Compiled random operators draw from PyTorch's generator (Inductor's ``fallback_random``),
    so that dropout masks, and so gradients, can be compared with eager at all.

    The partition backend must also neither read nor write the compile caches: their keys do
    not include the inner compiler, so it would be handed real Inductor's artifacts (and
    would hand its own to later real compilations)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch._inductor.config.patch(fallback_random=True))
        if backend == "partition":
            stack.enter_context(torch._functorch.config.patch(enable_autograd_cache=False))
            stack.enter_context(torch._inductor.config.patch(fx_graph_cache=False))
        yield


# -- measurement helpers -----------------------------------------------------------------
def cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak of (bytes allocated - bytes allocated when ``fn`` started) while ``fn`` runs, on
    PyTorch's CPU allocator.

    The CPU allocator keeps no statistics, but the profiler with ``profile_memory=True``
    records every allocation and free it serves as a ``[memory]`` event with a signed byte
    count; replaying them in time order gives the live bytes at every moment. Memory that
    does not come from the allocator (the library's ghost tensors map the zero page) is not
    counted, as it costs nothing.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    # Kineto prints two lines per profiling session unless told otherwise (read on first use).
    os.environ.setdefault("KINETO_LOG_LEVEL", "10")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = [
        (event.start_ns(), index, event.nbytes())
        for index, event in enumerate(prof.profiler.kineto_results.events())
        if event.name() == "[memory]" and event.device_type() == DeviceType.CPU
    ]
    live = peak = 0
    for _, _, delta in sorted(deltas):
        live += delta
        peak = max(peak, live)
    return peak


def step_peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak allocation above the starting point while ``fn`` runs: CUDA's allocator
    statistics on a GPU, :func:`cpu_peak_bytes` on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    return cpu_peak_bytes(fn)


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


@contextlib.contextmanager
def running(mode: MemSaveMode | None) -> Iterator[None]:
    """Stock PyTorch (the interposing kernels removed, so stock pays nothing for this library
    being imported), or ``mode``: kernels installed, then the mode entered."""
    if mode is None:
        interposer.uninstall()
        yield
    else:
        interposer.install()
        with mode:
            yield


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


def time_step(step: Callable[[], Any], synchronize: Callable[[], Any] = lambda: None) -> float:
    """Seconds ``step()`` takes. Switching between stock and the mode installs or removes
    kernels: that garbage is collected first, so the collection it would trigger does not land
    in whichever step comes next."""
    gc.collect()
    synchronize()
    start = time.perf_counter()
    step()
    synchronize()
    return time.perf_counter() - start


def median_ratio(times: Sequence[float], baseline: Sequence[float]) -> float:
    """The median of the per-round ratios: robust to a round disturbed for both alike."""
    return statistics.median(t / b for t, b in zip(times, baseline))


#: Compiled code sums in another order: its gradients are compared by relative error.
COMPILE_REL_TOL = 1e-2


def compare_gradients(
    candidate: Sequence[Tensor | None], reference: Sequence[Tensor | None], rel_tol: float = COMPILE_REL_TOL
) -> tuple[str, float | None]:
    """'bit-identical' (torch.equal), 'within tol' (relative L2 error of all gradients taken
    together, ``|a - b| / |b|``, at most ``rel_tol``) or 'DIFFERS', and that error (None when
    the gradients do not match up). Taken together, because a gradient that is zero in exact
    arithmetic (a bias before a batch norm in training) has no meaningful relative error."""
    pairs = list(zip(candidate, reference))
    if len(candidate) != len(reference) or any(
        (a is None) != (b is None) or (a is not None and (a.dtype, a.shape) != (b.dtype, b.shape)) for a, b in pairs
    ):
        return "DIFFERS", None
    pairs = [(a, b) for a, b in pairs if a is not None]
    if all(torch.equal(a, b) for a, b in pairs):
        return "bit-identical", 0.0
    difference = math.sqrt(sum((a.double() - b.double()).square().sum().item() for a, b in pairs))
    scale = math.sqrt(sum(b.double().square().sum().item() for _, b in pairs))
    error = difference / scale if scale else math.inf
    return ("within tol" if error <= rel_tol else "DIFFERS"), error


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
        synchronize = torch.cuda.synchronize if self.bench.device.type == "cuda" else (lambda: None)
        with self.active():
            return time_step(self.step, synchronize)


class _CaseSetup:
    """A fresh model prepared for one case, its batch, and an optimizer over what trains."""

    def __init__(self, spec: ModelSpec, case: Case, config: BenchConfig) -> None:
        self.spec = spec
        self.device = torch.device(config.device)
        torch.manual_seed(SEED)
        self.model = spec.build()
        case.prepare(self.model)
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


def _compile(model: nn.Module, backend: str) -> Callable[[Tensor], Tensor]:
    return torch.compile(model, backend=inductor_partition_backend if backend == "partition" else backend)


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
    compiled = _compile(setup.model, config.compile_backend) if config.compile_backend != "none" else None
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
                del runners[runner.column.key]
        return results

    with _compile_settings(config.compile_backend):
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
    interposer.uninstall()
    del setup, runners, compiled
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
    with progress:
        task = progress.add_task("benchmark", total=len(specs) * len(cases) * phases(config))
        for spec in specs:
            for case in cases:
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
        "compile_label": COMPILE_LABELS.get(config.compile_backend),
        "columns": {c.key: {"label": c.label, "baseline": c.baseline} for c in COLUMNS},
        "optimizer": "SGD(momentum=0.9, lr=0)",
    }


# -- output ------------------------------------------------------------------------------
def _ratio(value: float | None, reference: float | None) -> str:
    return f" ({value / reference:.2f}x)" if value is not None and reference else ""


def format_cell(cell: dict[str, Any], baseline: dict[str, Any] | None) -> str:
    """The compact text of one table cell: bytes kept, peak, time, exactness."""
    if cell.get("error"):
        return f"[red]error[/red]: {cell['error'][:60]}"
    lines = []
    reference = baseline or {}
    if cell["kept_bytes"] is not None:
        lines.append(f"kept {format_bytes(cell['kept_bytes'])}{_ratio(cell['kept_bytes'], reference.get('kept_bytes'))}")
    if cell["peak_bytes"] is not None:
        lines.append(f"peak {format_bytes(cell['peak_bytes'])}{_ratio(cell['peak_bytes'], reference.get('peak_bytes'))}")
    if baseline is None and cell["step_ms"] is not None:
        lines.append(f"time {cell['step_ms']:.0f} ms")
    elif cell["time_ratio"] is not None:
        lines.append(f"time {cell['time_ratio']:.2f}x")
    if cell["exact"] == "within tol":
        lines.append(f"within tol ({cell['max_rel_diff']:.0e})")
    elif cell["exact"] is not None:
        lines.append(cell["exact"] if cell["exact"] != "DIFFERS" else f"[red]DIFFERS[/red] (rel. error {cell['max_rel_diff']:.1e})")
    if cell.get("graph_breaks"):
        lines.append(f"{cell['graphs']} graphs, {cell['graph_breaks']} graph breaks")
    return "\n".join(lines) or "-"


def tables(results: dict[str, Any]) -> list[Any]:
    """One rich table per model: rows are cases, columns the four ways to run the step."""
    from rich.table import Table

    config = results["config"]
    compile_label = config["compile_label"]
    out = []
    for model, rows in _rows_by_model(results).items():
        shape = "x".join(map(str, rows[0]["input_shape"]))
        compiled_with = f", {compile_label}" if compile_label else ""
        table = Table(
            title=f"{model}, input {shape}, {config['threads']} threads, torch {config['torch']}, "
            f"{config['device']}{compiled_with}",
            caption=caption(config),
            caption_justify="left",
            title_justify="left",
            show_lines=True,
        )
        table.add_column("case")
        present = [c for c in COLUMNS if any(c.key in row["columns"] for row in rows)]
        for column in present:
            table.add_column(column.label)
        for row in rows:
            cells = row["columns"]
            table.add_row(
                row["case_label"],
                *(format_cell(cells[c.key], cells.get(c.baseline)) if c.key in cells else "-" for c in present),
            )
        out.append(table)
    return out


def caption(config: dict[str, Any]) -> str:
    """What the figures mean and how they were measured."""
    text = (
        f"kept: bytes kept for backward after the forward pass (model state excluded). "
        f"peak: max allocation above the step's start over forward + backward + optimizer step "
        f"({config['peak_method']}). time: median of per-round step-time ratios over "
        f"{config['pairs']} interleaved rounds (stock eager: median step time). Ratios and "
        f"exactness: MemSaveMode columns against the same execution without the mode, "
        f"torch.compile against stock eager; gradients compared with torch.equal "
        f"(bit-identical; eager MemSaveMode must be) or, for torch.compile, a relative L2 error of "
        f"at most {COMPILE_REL_TOL:g} over all gradients (within tol)."
    )
    if config["compile_backend"] == "partition":
        text += (
            " torch.compile columns: Inductor's graph capture, decompositions and partitioner "
            "with the graphs run by eager kernels (same tensors kept as real Inductor, including "
            "its channels-last copies of saved conv weights); no peak or time."
        )
    elif config["compile_backend"] == "inductor":
        text += " Inductor on CPU keeps channels-last copies of the conv weights it saves: they count in kept."
    if config["compile_backend"] != "none":
        text += " Compiled random operators use PyTorch's generator (fallback_random), as eager does."
    return text


def _rows_by_model(results: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    by_model: dict[str, list[dict[str, Any]]] = {}
    for row in results["rows"]:
        by_model.setdefault(row["model"], []).append(row)
    return by_model


def write_png(results: dict[str, Any], path: str) -> None:
    """Grouped bars per model x case: bytes kept (left) and peak (right), one bar per column."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit(MATPLOTLIB_MISSING) from None

    by_model = _rows_by_model(results)
    figure, axes = plt.subplots(len(by_model), 2, figsize=(15, 4 * len(by_model)), squeeze=False)
    width = 0.8 / len(COLUMNS)
    figures = (("kept_bytes", "bytes kept for backward"), ("peak_bytes", "peak over a training step"))
    for axes_row, (model, rows) in zip(axes, by_model.items()):
        for axis, (key, title) in zip(axes_row, figures):
            for index, column in enumerate(COLUMNS):
                offset = (index - (len(COLUMNS) - 1) / 2) * width
                bars = [
                    (position + offset, row["columns"][column.key][key] / 2**20)
                    for position, row in enumerate(rows)
                    if row["columns"].get(column.key, {}).get(key) is not None
                ]
                if bars:
                    axis.bar(*zip(*bars), width, label=column.label, color=f"C{index}")
            axis.set_xticks(range(len(rows)))
            axis.set_xticklabels([row["case_label"] for row in rows], rotation=30, ha="right")
            axis.set_ylabel("MiB")
            axis.set_title(f"{model}: {title}")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="upper center", ncol=len(COLUMNS))
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (4 * len(by_model))))
    figure.savefig(path, dpi=110)
    plt.close(figure)


MATPLOTLIB_MISSING = "--png needs matplotlib: pip install 'memsave-dispatch[bench]' (or pip install matplotlib)"


# -- command line ----------------------------------------------------------------------------
QUICK = {"models": ["resnet18"], "batch": 8, "size": 128, "pairs": 7, "compile": "partition"}
# Inductor needs 20-45 s per compilation of ResNet-18 or the transformer on two cores (two per
# case), vgg11_bn steps take a second at this size, and mobilenet_v2 compiles for 1.5-3 minutes:
# those two are left to --models to keep a full run within about half an hour.
FULL = {"models": ["resnet18", "transformer_encoder"], "batch": 8, "size": 128, "pairs": 15, "compile": "inductor"}


def _split(values: list[str] | None) -> list[str]:
    return [item for value in values or [] for item in value.split(",") if item]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="memsave-dispatch bench",
        description="Bytes kept for backward, peak step memory, step time and gradient exactness: stock "
        "PyTorch against MemSaveMode, eager and under torch.compile, per model and fine-tuning case.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="ResNet-18 at batch 8, 128x128, 7 rounds, compile columns from Inductor's partitioner with eager "
        "kernels (bytes kept and exactness only): under two minutes on 2 cores",
    )
    parser.add_argument(
        "--models", "--model", action="extend", nargs="+", metavar="NAME",
        help=f"models: {', '.join(MODELS)}, torchvision:NAME, timm:NAME (default: {', '.join(FULL['models'])}; "
        "vgg11_bn and mobilenet_v2 add about 15 and 30 minutes with real Inductor)",
    )
    parser.add_argument(
        "--cases", "--case", action="extend", nargs="+", metavar="KEY", help=f"cases (default: all): {', '.join(CASES)}"
    )
    parser.add_argument("--batch", type=int, help=f"default {FULL['batch']} ({QUICK['batch']} with --quick)")
    parser.add_argument(
        "--size", type=int, help=f"image height and width, or sequence length: default {FULL['size']} ({QUICK['size']})"
    )
    parser.add_argument(
        "--pairs", type=int, help=f"interleaved timing rounds per model x case: default {FULL['pairs']} ({QUICK['pairs']})"
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu (verified) or cuda")
    parser.add_argument(
        "--compile", choices=COMPILE_BACKENDS,
        help="how the compile columns compile: real inductor (full default), inductor's partitioner "
        "with eager kernels (--quick default: bytes kept only), or none",
    )
    parser.add_argument("--no-compile", action="store_const", const="none", dest="compile", help="same as --compile none")
    parser.add_argument("--json", metavar="PATH", help="write every number here")
    parser.add_argument("--png", metavar="PATH", help="bar chart of bytes kept and peak (needs matplotlib)")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    args.models = _split(args.models) or defaults["models"]
    args.cases = _split(args.cases) or list(CASES)
    for key in ("batch", "size", "pairs", "compile"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    if torch.device(args.device).type not in PEAK_METHODS:
        parser.error(f"--device {args.device}: the benchmark measures peak memory on cpu or cuda only")
    unknown = [case for case in args.cases if case not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; cases: {', '.join(CASES)}")
    try:
        args.specs = [model_spec(name) for name in args.models]
    except ValueError as error:
        parser.error(str(error))
    if args.png:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error(MATPLOTLIB_MISSING)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; exit status 1 if some MemSaveMode column's gradients differ."""
    from rich.console import Console

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = BenchConfig(batch=args.batch, size=args.size, pairs=args.pairs, compile_backend=args.compile, device=args.device)
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 120)  # cells have four lines; do not squeeze them into 80 columns
    results = run_bench(args.specs, [CASES[key] for key in args.cases], config, console)
    for table in tables(results):
        console.print(table)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    if args.png:
        write_png(results, args.png)
    differs = any(
        cell.get("exact") == "DIFFERS"
        for row in results["rows"]
        for key, cell in row["columns"].items()
        if COLUMN[key].mode
    )
    return 1 if differs else 0
