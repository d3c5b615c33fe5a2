"""The correctness matrix: every built-in handler family on one device, stock PyTorch against
``MemSaveMode``, over precisions (fp32, fp64, bf16, fp16, and fp16/bf16 autocast), contiguous
and channels-last inputs, and the requires-grad patterns that change what is kept.

Each configuration runs stock twice (deterministic algorithms on: a stock that does not repeat
itself bit for bit cannot be compared, and the nondeterministic operators are named) and
under the mode once; outputs and gradients are compared as raw bits. Bytes kept come from
``saved_tensor_bytes``; on a GPU the allocation growth during backward is measured too, and
for the families whose mode only drops tensors (ghosts, no decoding) it must not exceed
stock's: a ghost that made backward copy it would show there.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from memsave_dispatch import MemSaveMode, saved_tensor_bytes
from memsave_dispatch.exactness import bit_identical
from memsave_dispatch.meter import allocator_bytes

#: name -> (dtype of the tensors, autocast dtype or None)
PRECISIONS: dict[str, tuple[torch.dtype, torch.dtype | None]] = {
    "fp32": (torch.float32, None),
    "fp64": (torch.float64, None),
    "bf16": (torch.bfloat16, None),
    "fp16": (torch.float16, None),
    "fp16 autocast": (torch.float32, torch.float16),
    "bf16 autocast": (torch.float32, torch.bfloat16),
}
#: (input, weight) require grad; biases always do: (False, False) is bias-only tuning.
GRAD_PATTERNS = ((True, False), (False, True), (True, True), (False, False))


@dataclass
class CheckResult:
    family: str
    config: str
    outputs_equal: bool = False
    grads_equal: bool = False
    stock_repeatable: bool = False
    handled: int = 0
    stock_bytes: int = 0
    mode_bytes: int = 0
    stock_backward_growth: int | None = None
    mode_backward_growth: int | None = None
    expect_saving: bool = False
    ghosts_only: bool = False
    nondeterministic: list[str] = field(default_factory=list)
    skipped: str | None = None  # stock itself cannot run this configuration here
    error: str | None = None

    @property
    def exact(self) -> bool:
        return self.outputs_equal and self.grads_equal

    @property
    def problem(self) -> str | None:
        """Why this configuration fails the check, or None."""
        if self.skipped is not None:
            return None
        if self.error is not None:
            return self.error
        if self.mode_bytes > self.stock_bytes:
            return "keeps more than stock"
        if self.stock_repeatable and not self.exact:
            return "differs from stock"
        if self.expect_saving and self.mode_bytes >= self.stock_bytes:
            return "saves nothing"
        growths = (self.stock_backward_growth, self.mode_backward_growth)
        if self.ghosts_only and None not in growths and growths[1] > growths[0]:
            return f"backward allocates {growths[1] - growths[0]} bytes more than stock"
        return None


@dataclass(frozen=True)
class Case:
    """One configuration: ``fn(**inputs)``; ``params`` name the inputs that are parameters."""

    family: str
    config: str
    fn: Callable[..., Tensor]
    inputs: dict[str, Tensor]
    params: frozenset[str] = frozenset()
    expect_saving: bool = False
    ghosts_only: bool = False


def _clones(case: Case) -> dict[str, Tensor]:
    clones = {}
    for name, tensor in case.inputs.items():
        copy = tensor.detach().clone()
        grad = tensor.requires_grad
        clones[name] = torch.nn.Parameter(copy, grad) if name in case.params else copy.requires_grad_(grad)
    return clones


def run_case(case: Case, mode: MemSaveMode | None, autocast: torch.dtype | None, measure_backward: bool, seed: int = 1):
    """(output, gradients, bytes kept, backward growth or None, warnings raised meanwhile)."""
    clones = _clones(case)
    device = next(iter(clones.values())).device
    context = mode if mode is not None else torch.enable_grad()
    cast = torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(seed)
        with context:
            with cast:
                kept, output = saved_tensor_bytes(lambda: case.fn(**clones))
            generator = torch.Generator(device=device).manual_seed(seed)
            upstream = torch.randn(output.shape, generator=generator, device=device, dtype=output.dtype)
            leaves = [t for t in clones.values() if t.requires_grad]

            def backward():
                return torch.autograd.grad(output, leaves, upstream) if leaves else ()

            if measure_backward:
                measured = allocator_bytes(backward, device)
                grads, growth = measured.result, measured.peak
            else:
                grads, growth = backward(), None
    return output.detach(), grads, kept, growth, [str(w.message) for w in caught]


def _nondeterministic(messages: list[str]) -> list[str]:
    """The operators deterministic mode warned about (their names open the message)."""
    return sorted({message.split(" ")[0] for message in messages if "deterministic implementation" in message})


def _same(a, b) -> bool:
    return len(a) == len(b) and all(bit_identical(x, y) for x, y in zip(a, b))


def check(case: Case, precision: str, measure_backward: bool) -> CheckResult:
    """Stock twice, the mode once; a configuration stock cannot run is skipped, not failed."""
    result = CheckResult(case.family, f"{precision} {case.config}", expect_saving=case.expect_saving, ghosts_only=case.ghosts_only)
    autocast = PRECISIONS[precision][1]
    try:
        out, grads, result.stock_bytes, result.stock_backward_growth, notes = run_case(case, None, autocast, measure_backward)
        again, grads_again, *_ = run_case(case, None, autocast, measure_backward=False)
    except Exception as error:  # stock itself: not this library's problem
        result.skipped = f"stock: {type(error).__name__}: {error}"[:160]
        return result
    result.nondeterministic = _nondeterministic(notes)
    result.stock_repeatable = bit_identical(out, again) and _same(grads, grads_again)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "not verified on cuda": verifying it is this check's job
            mode = MemSaveMode(devices=(out.device.type,))
        out_mode, grads_mode, result.mode_bytes, result.mode_backward_growth, _ = run_case(case, mode, autocast, measure_backward)
        result.handled = mode.report().handled
    except Exception as error:  # report and go on: one failing kernel must not hide the rest
        result.error = f"{type(error).__name__}: {error}"[:200]
        return result
    result.outputs_equal = bit_identical(out, out_mode)
    result.grads_equal = _same(grads, grads_mode)
    return result


# -- the configurations ------------------------------------------------------------------------
def _tensor_maker(device: torch.device, dtype: torch.dtype, channels_last: bool, seed: Iterator[int]):
    def make(*shape: int, grad: bool = False, nan: bool = False, positive: bool = False) -> Tensor:
        generator = torch.Generator().manual_seed(next(seed))
        values = torch.randn(shape, generator=generator, dtype=torch.float64)
        if positive:
            values = values.abs() + 0.5
        if nan:
            values.view(-1)[::7] = float("nan")
        tensor = values.to(device=device, dtype=dtype)
        if channels_last and tensor.dim() in (4, 5):
            tensor = tensor.contiguous(memory_format=torch.channels_last if tensor.dim() == 4 else torch.channels_last_3d)
        return tensor.requires_grad_(grad)

    return make


def _layer_cases(t, x_grad: bool, w_grad: bool) -> Iterator[Case]:
    """Layers with weights, for one requires-grad pattern."""
    input_dropped = not w_grad  # conv: the input is kept only for the weight's gradient
    bias_only = not (x_grad or w_grad)
    tag = f"x.grad={x_grad} w.grad={w_grad}"
    params = frozenset({"w", "b"})
    yield Case("conv2d", tag, lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1),
               {"x": t(4, 8, 16, 16, grad=x_grad), "w": t(16, 8, 3, 3, grad=w_grad), "b": t(16, grad=True)},
               params, expect_saving=input_dropped, ghosts_only=True)
    if not bias_only:  # (no bias: nothing would need a gradient)
        yield Case("conv1d", tag, lambda x, w: F.conv1d(x, w, padding=2, dilation=2),
                   {"x": t(4, 8, 33, grad=x_grad), "w": t(12, 8, 5, grad=w_grad)}, params, input_dropped, True)
        yield Case("conv3d", tag, lambda x, w: F.conv3d(x, w, padding=1, groups=2),
                   {"x": t(2, 4, 6, 6, 6, grad=x_grad), "w": t(8, 2, 3, 3, 3, grad=w_grad)}, params, input_dropped, True)
        yield Case("conv_transpose2d", tag, lambda x, w: F.conv_transpose2d(x, w, stride=2),
                   {"x": t(2, 8, 8, 8, grad=x_grad), "w": t(8, 4, 3, 3, grad=w_grad)}, params, input_dropped, True)
    yield Case("linear", tag, lambda x, w, b: F.linear(x, w, b),
               {"x": t(4, 7, 32, grad=x_grad), "w": t(16, 32, grad=w_grad), "b": t(16, grad=True)}, params, False, True)
    for training in (True, False):
        drops_input = not w_grad and not (training and x_grad)
        bn_tag = f"{tag} training={training}"
        stats = {"mean": t(8) * 0.1, "var": t(8, positive=True)}

        def batch_norm(x, w, b, mean, var, training=training):
            return F.batch_norm(x, mean, var, w, b, training=training)

        yield Case("batch_norm", bn_tag, batch_norm,
                   {"x": t(4, 8, 10, 10, grad=x_grad), "w": t(8, grad=w_grad), "b": t(8, grad=True), **stats},
                   params, drops_input, True)
        yield Case("batch_norm1d", bn_tag, batch_norm,
                   {"x": t(16, 8, grad=x_grad), "w": t(8, grad=w_grad), "b": t(8, grad=True), **stats},
                   params, drops_input, True)
        if x_grad and not w_grad:  # no affine parameters: only the input can need a gradient
            yield Case("batch_norm no affine", f"training={training}",
                       lambda x, mean, var, training=training: F.batch_norm(x, mean, var, training=training),
                       {"x": t(4, 8, 10, 10, grad=True), **stats}, frozenset(), not training, True)
        block_inputs = {"x": t(4, 8, 16, 16, grad=x_grad), "w": t(8, 8, 3, 3, grad=w_grad),
                        "g": t(8, grad=w_grad, positive=True), "b": t(8, grad=True), **stats}
        yield Case("conv-bn-relu-pool-dropout", bn_tag, _block(training), block_inputs, frozenset({"w", "g", "b"}), True)
    yield Case("layer_norm", tag, lambda x, w, b: F.layer_norm(x, (32,), w, b),
               {"x": t(4, 7, 32, grad=x_grad), "w": t(32, grad=w_grad), "b": t(32, grad=True)}, params, bias_only, True)
    x = t(4, 8, 6, 6, grad=x_grad)
    if x.is_cpu and not x.is_contiguous():
        return  # stock's CPU group-norm backward crashes the process on channels-last input
    yield Case("group_norm", tag, lambda x, w, b: F.group_norm(x, 4, w, b),
               {"x": x, "w": t(8, grad=w_grad), "b": t(8, grad=True)}, params, bias_only, True)


def _block(training: bool):
    """conv -> batch norm (cuDNN's on a GPU, in half precision under fp16 autocast) -> ReLU in
    place -> max pool -> dropout: the common CNN chain, tensors shared between layers."""

    def block(x, w, g, b, mean, var):
        y = F.batch_norm(F.conv2d(x, w, padding=1), mean, var, g, b, training=training)
        return F.dropout(F.max_pool2d(F.relu(y, inplace=True), 3, 2, 1), 0.2, training=True) * 2

    return block


def _activation_cases(t, cpu: bool) -> Iterator[Case]:
    """Input and output are intermediates that die after the call, as inside a network: then
    the bits replace what the node keeps."""
    activations = {
        "relu": lambda x: F.relu(x),
        "relu_": lambda x: F.relu(x, inplace=True),
        "leaky_relu": lambda x: F.leaky_relu(x, 0.1),
        "relu6": lambda x: F.relu6(x),
        "hardtanh": lambda x: F.hardtanh(x, -0.5, 0.5),
        "threshold": lambda x: F.threshold(x, 0.25, -1.0),
    }
    for (name, act), nan in itertools.product(activations.items(), (False, True)):
        # hardtanh keeps a NaN-holding input on the CPU, whose kernel decides NaN by position
        saving = not (nan and cpu and name in ("hardtanh", "relu6"))
        yield Case(name, "with NaN" if nan else "", lambda x, act=act: act(x * 1) * 2,
                   {"x": t(4, 8, 16, 16, grad=True, nan=nan)}, expect_saving=saving)
    for p in (0.0, 0.3, 1.0):
        random = 0 < p < 1
        yield Case("dropout", f"p={p}", lambda x, p=p: F.dropout(x, p, training=True), {"x": t(4, 8, 16, 16, grad=True)},
                   expect_saving=random)
    yield Case("dropout_", "p=0.3", lambda x: F.dropout(x * 1, 0.3, training=True, inplace=True),
               {"x": t(4, 8, 16, 16, grad=True)}, expect_saving=True)
    yield Case("dropout2d", "p=0.3", lambda x: F.dropout2d(x, 0.3, training=True), {"x": t(4, 8, 16, 16, grad=True)},
               expect_saving=True)
    yield Case("native_dropout", "p=0.3", lambda x: torch.native_dropout(x, 0.3, True)[0] * 2,
               {"x": t(4, 8, 16, 16, grad=True)}, expect_saving=True)


def _pooling_cases(t) -> Iterator[Case]:
    pools = {
        "max_pool2d 3x3": (lambda x: F.max_pool2d(x, 3, 2, 1), (4, 8, 17, 17)),
        "max_pool2d 2x2": (lambda x: F.max_pool2d(x, 2), (4, 8, 16, 16)),
        "max_pool1d": (lambda x: F.max_pool1d(x, 3, 2), (4, 8, 33)),
        "max_pool3d": (lambda x: F.max_pool3d(x, 2), (2, 4, 8, 8, 8)),
        "adaptive_max_pool2d": (lambda x: F.adaptive_max_pool2d(x, 5), (4, 8, 17, 17)),
        "adaptive_max_pool3d": (lambda x: F.adaptive_max_pool3d(x, 3), (2, 4, 7, 7, 7)),
        "avg_pool2d": (lambda x: F.avg_pool2d(x, 3, 2, 1), (4, 8, 17, 17)),
        "avg_pool3d": (lambda x: F.avg_pool3d(x, 2), (2, 4, 8, 8, 8)),
        "adaptive_avg_pool2d": (lambda x: F.adaptive_avg_pool2d(x, 5), (4, 8, 17, 17)),
    }
    for name, (pool, shape) in pools.items():
        yield Case(name, "", pool, {"x": t(*shape, grad=True)}, expect_saving=True, ghosts_only=name.startswith(("avg", "adaptive_avg")))


def cases(device: torch.device, dtype: torch.dtype, channels_last: bool) -> Iterator[Case]:
    """Every configuration of one precision and layout."""
    seed = itertools.count()
    t = _tensor_maker(device, dtype, channels_last, seed)
    for x_grad, w_grad in GRAD_PATTERNS:
        yield from _layer_cases(t, x_grad, w_grad)
    yield from _pooling_cases(t)
    yield from _activation_cases(t, device.type == "cpu")


def save_on_cpu_cases(device: torch.device) -> Iterator[tuple[str, Case]]:
    """The block under ``save_on_cpu`` (pinned on a GPU): the user's hooks see every encoding."""
    t = _tensor_maker(device, torch.float32, True, itertools.count(1000))
    pin = device.type == "cuda"
    for training in (True, False):
        block = _block(training)

        def offloaded(block=block, **inputs):
            with torch.autograd.graph.save_on_cpu(pin_memory=pin):
                return block(**inputs)

        inputs = {"x": t(4, 8, 16, 16, grad=True), "w": t(8, 8, 3, 3), "g": t(8, positive=True), "b": t(8, grad=True),
                  "mean": t(8) * 0.1, "var": t(8, positive=True)}
        yield "fp32", Case("save_on_cpu block", f"training={training}", offloaded, inputs, frozenset({"w", "g", "b"}))


def run_matrix(device: torch.device, precisions: tuple[str, ...] = tuple(PRECISIONS)) -> list[CheckResult]:
    """Every configuration on ``device``, deterministic algorithms on (warnings only, so that a
    nondeterministic stock operator is named instead of stopping the run). Backward growth is
    measured for every configuration on a GPU (the allocator's counters cost nothing); on the
    CPU, whose measure replays profiler events, for the fp32 ones the growth is judged on."""
    on_gpu = device.type == "cuda"
    results = []
    with deterministic():
        for precision, channels_last in itertools.product(precisions, (False, True)):
            layout = "channels_last" if channels_last else "contiguous"
            for case in cases(device, PRECISIONS[precision][0], channels_last):
                case = Case(case.family, f"{layout} {case.config}".strip(), case.fn, case.inputs, case.params,
                            case.expect_saving, case.ghosts_only)
                results.append(check(case, precision, on_gpu or (precision == "fp32" and case.ghosts_only)))
        for precision, case in save_on_cpu_cases(device):
            results.append(check(case, precision, measure_backward=False))
    return results


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """Deterministic algorithms (cuDNN's and cuBLAS's included; CUBLAS_WORKSPACE_CONFIG is set
    before CUDA starts, by tools/gpu_check.py) and no TF32, restored afterwards."""
    saved = (
        torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
    )
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[4], saved[5]


def codec_facts(device: torch.device) -> dict[str, bool]:
    """What the codecs assume of a device: int64 products wrap and bytes are little-endian
    (the one-multiply bit gather agrees with the shift-only one on every byte)."""
    from memsave_dispatch import codecs

    words = codecs.byte_patterns(device).view(torch.int64).view(-1)
    return {
        "multiply gather agrees": torch.equal(codecs.gather_bits_by_multiply(words.clone()), codecs.gather_bits_by_shifts(words)),
    }
