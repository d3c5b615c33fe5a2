"""Differential fuzzing: random configurations of every handled operator, compared with stock
PyTorch bit for bit (outputs, every gradient, in-place effects) and for bytes kept; and random
in-place changes after a handled call, where the mode must raise exactly where stock raises.

Every family runs on both engines (compiled and Python). CI runs the ``ci`` profile (250
examples per family and engine, a sixth of that for whole encoders; derandomised). The
extended run:  MEMSAVE_FUZZ=extended python -m pytest tests/test_fuzz.py   (2,500 per family
and engine).
Failures hypothesis finds are kept below as explicit ``@example``s.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from torch import nn

from memsave_dispatch import MemSaveMode
from tests.support import compare_with_stock, run_once
from tools.bench.encoders import FINE_TUNING, Config, bert_shaped

pytestmark = pytest.mark.usefixtures("each_engine")  # on both engines

settings.register_profile(
    "ci", max_examples=250, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
settings.register_profile(
    "extended", max_examples=2500, deadline=None, suppress_health_check=list(HealthCheck)
)
settings.load_profile(os.environ.get("MEMSAVE_FUZZ", "ci"))

DTYPES = st.sampled_from([torch.float32, torch.float64, torch.bfloat16])
FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


def _tensor(draw, shape, dtype, *, layout: str, requires_grad: bool, specials: bool = True):
    """A tensor of ``shape``: contiguous, channels_last, or a strided view of a larger one;
    with NaN, inf and -0.0 sprinkled in when ``specials``."""
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    strided = layout == "strided-view" and len(shape) > 0 and shape[-1] > 0
    base_shape = (*shape[:-1], 2 * shape[-1]) if strided else shape
    x = torch.randn(base_shape, generator=generator, dtype=torch.float64)
    if specials and x.numel() > 0:
        flat = x.view(-1)
        positions = torch.randint(0, flat.numel(), (3,), generator=generator)
        flat[positions] = torch.tensor([float("nan"), float("inf"), -0.0], dtype=torch.float64)
    x = x.to(dtype)
    if strided:
        x = x[..., ::2]
    elif layout == "channels_last" and x.dim() in FORMATS:
        x = x.contiguous(memory_format=FORMATS[x.dim()])
    return x.requires_grad_(requires_grad)


class _Named:
    """A test function that hypothesis prints by what it does."""

    def __init__(self, fn, description: str) -> None:
        self.fn, self.description = fn, description

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return self.description


def _layout(draw):
    return draw(st.sampled_from(["contiguous", "channels_last", "strided-view"]))


def _check(fn, inputs, state=()):
    """Compare with stock; where stock itself raises (some zero-size inputs), the mode must
    raise the same error."""
    try:
        stock_error = None
        run_once(fn, inputs, state, mode=None)
    except Exception as error:  # noqa: BLE001 -- any stock failure is what we compare with
        stock_error = error
    if stock_error is not None:
        try:
            run_once(fn, inputs, state, mode=MemSaveMode())
        except Exception as error:  # noqa: BLE001
            assert type(error) is type(stock_error) and str(error) == str(stock_error)
            return
        raise AssertionError(f"stock raised {stock_error!r}, the mode did not")
    stock, mode = compare_with_stock(fn, inputs, state=state)
    assert mode.saved_bytes <= stock.saved_bytes


@st.composite
def convolutions(draw):
    dims = draw(st.integers(1, 3))
    transposed = draw(st.booleans())
    groups = draw(st.sampled_from([1, 2]))
    in_channels = groups * draw(st.integers(1, 2))
    out_channels = groups * draw(st.integers(1, 2))
    kernel = [draw(st.integers(1, 3)) for _ in range(dims)]
    stride = [draw(st.integers(1, 2)) for _ in range(dims)]
    dilation = [draw(st.integers(1, 2)) for _ in range(dims)]
    padding = [draw(st.integers(0, 1)) for _ in range(dims)]
    sizes = [draw(st.integers((k - 1) * d + 1, (k - 1) * d + 4)) for k, d in zip(kernel, dilation)]
    batch = draw(st.integers(0, 2))
    dtype = draw(DTYPES)
    need = draw(st.tuples(st.booleans(), st.booleans(), st.booleans()).filter(any))
    bias = draw(st.booleans()) or need[2]
    x = _tensor(draw, (batch, in_channels, *sizes), dtype, layout=_layout(draw), requires_grad=need[0], specials=False)
    w_shape = (in_channels, out_channels // groups, *kernel) if transposed else (out_channels, in_channels // groups, *kernel)
    w = nn.Parameter(torch.randn(w_shape, dtype=torch.float64).to(dtype), requires_grad=need[1])
    b = nn.Parameter(torch.randn(out_channels, dtype=torch.float64).to(dtype), requires_grad=need[2]) if bias else None
    output_padding = [draw(st.integers(0, min(s, d) - 1)) for s, d in zip(stride, dilation)] if transposed else [0] * dims

    def run(x, w, b):
        return torch.ops.aten.convolution(x, w, b, stride, padding, dilation, transposed, output_padding, groups)

    return run, {"x": x, "w": w, "b": b}, ("w", "b")


@given(convolutions())
def test_convolution(case):
    _check(*case)


@st.composite
def batch_norms(draw):
    dims = draw(st.integers(1, 3))
    channels = draw(st.integers(1, 4))
    spatial = [] if dims == 1 and draw(st.booleans()) else [draw(st.integers(1, 4)) for _ in range(dims if dims > 1 else 1)]
    batch = draw(st.integers(2, 3))
    dtype = draw(DTYPES)
    affine, track = draw(st.booleans()), draw(st.booleans())
    module = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims](
        channels, affine=affine, track_running_stats=track, momentum=draw(st.sampled_from([0.1, None]))
    ).to(dtype)
    module.train(draw(st.booleans()))
    need_x = draw(st.booleans())
    if affine:
        module.weight.requires_grad_(draw(st.booleans()))
        module.bias.requires_grad_(draw(st.booleans()))
    assume(need_x or any(p.requires_grad for p in module.parameters()))
    x = _tensor(draw, (batch, channels, *spatial), dtype, layout=_layout(draw), requires_grad=need_x, specials=False)
    state = {**dict(module.named_parameters()), **dict(module.named_buffers())}

    def run(x, **state):
        return torch.func.functional_call(module, state, (x,))

    return run, {"x": x, **state}, tuple(state)


@given(batch_norms())
def test_batch_norm(case):
    _check(*case)


@st.composite
def poolings(draw):
    dims = draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["max", "avg", "adaptive-max", "adaptive-avg"]))
    kernel = [draw(st.integers(1, 3)) for _ in range(dims)]
    dilation = [draw(st.integers(1, 2)) for _ in range(dims)] if kind == "max" else [1] * dims
    sizes = [draw(st.integers((k - 1) * d + 1, (k - 1) * d + 5)) for k, d in zip(kernel, dilation)]
    stride = [draw(st.integers(1, 3)) for _ in range(dims)]
    padding = [draw(st.integers(0, k // 2)) for k in kernel]
    ceil_mode = draw(st.booleans())
    dtype = draw(DTYPES)
    x = _tensor(draw, (draw(st.integers(1, 2)), draw(st.integers(1, 3)), *sizes), dtype, layout=_layout(draw), requires_grad=True)
    output = [draw(st.integers(1, s)) for s in sizes]
    return_indices = draw(st.booleans())
    functional = {
        ("max", 1): F.max_pool1d, ("max", 2): F.max_pool2d, ("max", 3): F.max_pool3d,
        ("avg", 1): F.avg_pool1d, ("avg", 2): F.avg_pool2d, ("avg", 3): F.avg_pool3d,
        ("adaptive-max", 1): F.adaptive_max_pool1d, ("adaptive-max", 2): F.adaptive_max_pool2d, ("adaptive-max", 3): F.adaptive_max_pool3d,
        ("adaptive-avg", 1): F.adaptive_avg_pool1d, ("adaptive-avg", 2): F.adaptive_avg_pool2d, ("adaptive-avg", 3): F.adaptive_avg_pool3d,
    }[(kind, dims)]
    if kind == "max":
        def run(x):
            return functional(x, kernel, stride, padding, dilation, ceil_mode=ceil_mode, return_indices=return_indices)
    elif kind == "avg":
        def run(x):
            return functional(x, kernel, stride, padding, ceil_mode=ceil_mode)
    elif kind == "adaptive-max":
        def run(x):
            return functional(x, output, return_indices=return_indices)
    else:
        def run(x):
            return functional(x, output)
    if kind == "avg" and dims == 3 and dtype == torch.bfloat16:
        dtype = torch.float32  # stock has no bf16 avg_pool3d on CPU
        x = x.detach().float().requires_grad_(True)
    return run, {"x": x}, ()


@given(poolings())
def test_pooling(case):
    _check(*case)


@st.composite
def activations(draw):
    name = draw(st.sampled_from(["relu", "relu_", "leaky", "leaky_", "hardtanh", "hardtanh_", "relu6", "threshold", "threshold_"]))
    low = draw(st.floats(-2, 1, allow_nan=False, width=32))
    high = low + draw(st.floats(0.015625, 3, allow_nan=False, width=32))
    slope = draw(st.floats(0, 1, allow_nan=False, width=32))
    threshold = draw(st.floats(-1, 1, allow_nan=False, width=32))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=1, max_size=4)))
    x = _tensor(draw, shape, dtype, layout=_layout(draw), requires_grad=True)
    consumer = draw(st.sampled_from(["sum-of-square", "mean", "none"]))
    activation = {
        "relu": lambda t: F.relu(t),
        "relu_": lambda t: F.relu(t * 1, inplace=True),
        "leaky": lambda t: F.leaky_relu(t, slope),
        "leaky_": lambda t: F.leaky_relu(t * 1, slope, inplace=True),
        "hardtanh": lambda t: F.hardtanh(t, low, high),
        "hardtanh_": lambda t: F.hardtanh(t * 1, low, high, inplace=True),
        "relu6": lambda t: F.relu6(t),
        "threshold": lambda t: F.threshold(t, threshold, 7.0),
        "threshold_": lambda t: F.threshold(t * 1, threshold, 7.0, inplace=True),
    }[name]

    def run(x):
        y = activation(x)
        if consumer == "mean" and y.dim() > 0:
            return y.mean(-1)  # drops y: a ReLU encodes it
        if consumer == "sum-of-square":
            return y * y  # keeps y: a ReLU keeps it too
        return y

    described = _Named(run, f"{name}(low={low}, high={high}, slope={slope}, threshold={threshold}) -> {consumer}, {dtype}")
    return described, {"x": x}, ()


@given(activations())
@example(case=(lambda x: F.relu(x).mean(-1), {"x": torch.tensor([[float("nan"), -0.0, 0.0, 1.0]], requires_grad=True)}, ()))
def test_activation(case):
    _check(*case)


@st.composite
def dropouts(draw):
    name = draw(st.sampled_from(["dropout", "dropout_", "dropout2d", "native"]))
    p = draw(st.sampled_from([0.0, 0.1, 0.5, 0.99, 1.0]))
    train = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    dtype = draw(DTYPES)
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=2, max_size=4)))
    x = _tensor(draw, shape, dtype, layout=_layout(draw), requires_grad=True, specials=False)
    dropout = {
        "dropout": lambda t: F.dropout(t, p, train),
        "dropout_": lambda t: F.dropout(t * 1, p, train, inplace=True),
        "dropout2d": lambda t: F.dropout2d(t, p, train),
        "native": lambda t: torch.native_dropout(t, p, train)[0],
    }[name]

    def run(x):
        torch.manual_seed(seed)
        return dropout(x)

    return run, {"x": x}, ()


@given(dropouts())
def test_dropout(case):
    _check(*case)


@st.composite
def norms(draw):
    kind = draw(st.sampled_from(["layer", "group"]))
    dtype = draw(DTYPES)
    groups = draw(st.integers(1, 3))
    channels = groups * draw(st.integers(1, 2))
    shape = (draw(st.integers(2, 3)), channels, draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    need = draw(st.tuples(st.booleans(), st.booleans(), st.booleans()).filter(any))
    layout = _layout(draw)
    if kind == "group" and layout == "channels_last":
        layout = "contiguous"  # stock PyTorch 2.13 segfaults on channels_last group-norm backward
    x = _tensor(draw, shape, dtype, layout=layout, requires_grad=need[0], specials=False)
    parameter_shape = shape[-1:] if kind == "layer" else (channels,)
    w = nn.Parameter(torch.rand(parameter_shape, dtype=torch.float64).to(dtype) + 0.5, requires_grad=need[1])
    b = nn.Parameter(torch.randn(parameter_shape, dtype=torch.float64).to(dtype), requires_grad=need[2])
    if kind == "layer":
        def run(x, w, b):
            return F.layer_norm(x, parameter_shape, w, b)
    else:
        def run(x, w, b):
            return F.group_norm(x, groups, w, b)
    return run, {"x": x, "w": w, "b": b}, ("w", "b")


@given(norms())
def test_layer_and_group_norm(case):
    _check(*case)


@st.composite
def linears(draw):
    dtype = draw(DTYPES)
    leading = tuple(draw(st.lists(st.integers(0, 3), min_size=1, max_size=3)))
    features_in, features_out = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    need = draw(st.tuples(st.booleans(), st.booleans(), st.booleans()).filter(any))
    bias = draw(st.booleans()) or need[2]
    x = _tensor(draw, (*leading, features_in), dtype, layout=_layout(draw), requires_grad=need[0], specials=False)
    w = nn.Parameter(torch.randn(features_out, features_in, dtype=torch.float64).to(dtype), requires_grad=need[1])
    b = nn.Parameter(torch.randn(features_out, dtype=torch.float64).to(dtype), requires_grad=need[2]) if bias else None
    assume(need[0] or need[1] or b is not None)
    return (lambda x, w, b: F.linear(F.relu(x), w, b)), {"x": x, "w": w, "b": b}, ("w", "b")


@given(linears())
def test_linear(case):
    _check(*case)


@st.composite
def small_networks(draw):
    """Operators in sequence, so that deferred encodings meet their consumers."""
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    activation = draw(st.sampled_from([nn.ReLU(), nn.ReLU(inplace=True), nn.LeakyReLU(0.1), nn.ReLU6(inplace=True)]))
    layers = [nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), activation, nn.MaxPool2d(2), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Dropout(0.3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)]
    model = nn.Sequential(*layers).to(draw(st.sampled_from([torch.float32, torch.float64])))
    model.train(draw(st.booleans()))
    for parameter in model.parameters():
        parameter.requires_grad_(draw(st.booleans()))
    x = torch.randn(2, 3, 8, 8, dtype=next(model.parameters()).dtype).requires_grad_(draw(st.booleans()))
    assume(x.requires_grad or any(p.requires_grad for p in model.parameters()))
    params = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    seed = draw(st.integers(0, 2**31 - 1))

    def run(x, **state):
        torch.manual_seed(seed)
        return torch.func.functional_call(model, state, (x,))

    return run, {"x": x, **params}, tuple(params)


@given(small_networks())
def test_small_networks(case):
    _check(*case)


@st.composite
def in_place_changes(draw):
    """A handled operator, a consumer of its output, then an in-place change to its input or
    output (directly, through a view, through a detached alias, or under no_grad) before
    backward: stock raises its version error or not, and the mode must do the same."""
    operator = draw(st.sampled_from(sorted(_OPERATORS)))
    consumer = draw(st.sampled_from(sorted(_CONSUMERS)))
    target = draw(st.sampled_from(["input", "output"]))
    how = draw(st.sampled_from(["direct", "view", "alias", "no_grad", "none"]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    x = _tensor(draw, (2, 3, 6, 6), dtype, layout=_layout(draw), requires_grad=True, specials=False)
    apply, consume = _OPERATORS[operator], _CONSUMERS[consumer]
    alive = []  # the changed tensor lives until backward (see tests/test_slots.py for one that dies)

    def run(x):
        torch.manual_seed(0)  # the same dropout noise on both sides
        h = x * 1
        y = apply(h)
        z = consume(y)
        changed = h if target == "input" else y
        alive[:] = [changed]
        if how == "direct":
            changed.mul_(-1.0)
        elif how == "view":
            changed[0].mul_(2.0)
        elif how == "alias":
            changed.detach().add_(1.0)
        elif how == "no_grad":
            with torch.no_grad():
                changed.add_(1.0)
        return z

    return _Named(run, f"{operator} -> {consumer}, change the {target} ({how}), {dtype}"), {"x": x}, ()


_FROZEN = torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

_OPERATORS = {
    "relu": F.relu,
    "relu_": lambda h: F.relu_(h * 1),
    "leaky_relu": lambda h: F.leaky_relu(h, 0.1),
    "hardtanh": lambda h: F.hardtanh(h, -0.5, 0.5),
    "threshold": lambda h: F.threshold(h, 0.1, 2.0),
    "frozen conv": lambda h: F.conv2d(h, _FROZEN.to(h.dtype), padding=1)[:, :3],
    "max pool": lambda h: F.max_pool2d(h, 2, 1, 1),
    "avg pool": lambda h: F.avg_pool2d(h, 3, 1, 1),
    "batch norm eval": lambda h: F.batch_norm(h, torch.zeros(3, dtype=h.dtype), torch.ones(3, dtype=h.dtype)),
    "layer norm": lambda h: F.layer_norm(h, (6,)),
    "dropout": lambda h: F.dropout(h, 0.3),
}

_CONSUMERS = {
    "none": lambda y: y,
    "frozen conv": lambda y: F.conv2d(y, _FROZEN.to(y.dtype)),
    "max pool": lambda y: F.max_pool2d(y, 2),
    "mean": lambda y: y.mean((2, 3)),
    "square": lambda y: y * y,
}


@given(in_place_changes())
def test_in_place_change_after_a_handled_call(case):
    _check(*case)


@st.composite
def encoder_layers(draw):
    """A small BERT-shaped encoder under a random fine-tuning case, dropout and precision:
    the kept tensors the recipes rebuild (attention probabilities, LayerNorm and GELU outputs,
    LoRA inputs) meet every consumer pattern."""
    config = Config(
        vocab=50,
        d=8 * draw(st.integers(1, 3)),
        heads=draw(st.sampled_from([1, 2])),
        ff=draw(st.sampled_from([16, 32])),
        layers=draw(st.integers(1, 2)),
        dropout=draw(st.sampled_from([0.0, 0.1, 0.5])),
    )
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    model = bert_shaped(config)
    FINE_TUNING[draw(st.sampled_from(sorted(FINE_TUNING)))](model)
    for parameter in model.parameters():
        if parameter.requires_grad and draw(st.integers(0, 9)) == 0:
            parameter.requires_grad_(False)  # odd patterns too
    autocast = draw(st.booleans())
    batch, tokens = draw(st.integers(1, 3)), draw(st.integers(1, 9))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    ids = torch.randint(0, config.vocab, (batch, tokens), generator=generator)
    mask = (torch.rand(batch, tokens, generator=generator) > 0.2).long()
    params = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    seed = draw(st.integers(0, 2**31 - 1))

    def run(ids, mask, **state):
        torch.manual_seed(seed)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return torch.func.functional_call(model, state, (ids, mask)).float()

    described = _Named(run, f"{config}, autocast={autocast}, batch {batch} x {tokens}")
    return described, {"ids": ids, "mask": mask, **params}, tuple(params)


@given(encoder_layers())
@settings(max_examples=max(1, settings.default.max_examples // 6))  # each example trains an encoder
def test_encoder_layers(case):
    _check(*case)
