"""ReLU (aten.relu, aten.relu_): 1-bit masks, exact on NaN, +-inf and -0.0."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

from memsave_dispatch import MemSaveMode, audit, slots
from memsave_dispatch.meter import allocator_bytes
from tests.support import DTYPES, assert_bit_identical, compare_with_stock

SPECIAL = [math.nan, -math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-45, -1e-45, 1.0, -1.0]


def _input(shape, dtype, channels_last=False):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    flat = x.view(-1)
    flat[: len(SPECIAL)] = torch.tensor(SPECIAL, dtype=torch.float64).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _special_gradients(out):
    """Make the gradient flowing back into ``out`` carry NaN, inf and -0.0 too."""
    scale = torch.ones(out.numel(), dtype=out.dtype)
    scale[: len(SPECIAL)] = torch.tensor(SPECIAL, dtype=torch.float64).to(out.dtype)
    scale = scale.view(out.shape)
    out.register_hook(lambda grad: grad * scale)
    return out


RELUS = {
    "relu": (lambda x: F.relu(x * 1), "aten.relu.default"),
    "relu_": (lambda x: F.relu(x * 1, inplace=True), "aten.relu_.default"),
    "module-inplace": (lambda x: torch.nn.ReLU(inplace=True)(x * 1), "aten.relu_.default"),
}


@pytest.mark.parametrize("name", sorted(RELUS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", (False, True))
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (4, 4, 8, 8)], ids=["odd", "even"])
def test_relu_before_a_consumer_that_drops_it_keeps_one_bit(name, dtype, channels_last, shape):
    """relu -> 1x1 average pool (which keeps nothing): the ReLU keeps 1 bit per element.
    Inputs and incoming gradients include NaN, +-inf, +-0.0 and denormals."""
    relu, op = RELUS[name]
    x = _input(shape, dtype, channels_last).requires_grad_(True)
    stock, mode = compare_with_stock(lambda x: _special_gradients(F.avg_pool2d(relu(x), 1)), {"x": x})
    assert stock.saved_bytes == x.numel() * x.element_size()  # the ReLU output (the pool keeps it too)
    assert mode.saved_bytes == -(-x.numel() // 8)  # ceil(n / 8) bytes of mask
    assert mode.report[op].encodings == {"1-bit mask": 1}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inplace", (False, True))
def test_relu_alone_before_a_dropping_consumer_keeps_exactly_the_bits(dtype, inplace):
    x = _input((3, 4, 5, 6), dtype).requires_grad_(True)

    def run(x):
        return F.relu(x * 1, inplace=inplace).mean((2, 3))

    stock, mode = compare_with_stock(run, {"x": x})
    assert stock.saved_bytes == x.numel() * x.element_size()
    assert mode.saved_bytes == -(-x.numel() // 8)


def test_relu_output_kept_by_the_next_layer_costs_nothing_extra():
    """relu -> trainable conv: the conv keeps the activation, so the ReLU keeps it too (shared)."""
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(4, 3, 3, 3))
    stock, mode = compare_with_stock(lambda x, w: F.conv2d(F.relu(x * 1), w), {"x": x, "w": w}, state=("w",))
    assert mode.saved_bytes == stock.saved_bytes
    assert mode.report["aten.relu.default"].encodings == {"kept (shared)": 1}


# consumer (which keeps its input, run by stock: nothing to save) and its weight's shape
LATER_KEEPERS = {
    "trainable conv": (lambda y, w: F.conv2d(y, w), (4, 3, 3, 3)),
    "batch norm, train": (lambda y, w: F.batch_norm(y, None, None, w, training=True), (3,)),
    "linear": (lambda y, w: F.linear(y.flatten(1), w), (5, 3 * 8 * 8)),
}


@pytest.mark.parametrize("keeper", sorted(LATER_KEEPERS))
def test_relu_output_dropped_then_kept_by_a_later_consumer_costs_nothing_extra(keeper):
    """relu -> pool (drops it: the mask is made) and, later, a consumer that keeps it (as a
    LoRA branch after its frozen base does): the mask would be extra, so it is undone."""
    keep, weight_shape = LATER_KEEPERS[keeper]
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(weight_shape))

    def run(x, w):
        y = F.relu(x * 1)
        return F.avg_pool2d(y, 2).sum() + keep(y, w).sum()

    stock, mode = compare_with_stock(run, {"x": x, "w": w}, state=("w",))
    assert mode.saved_bytes == stock.saved_bytes
    assert mode.report["aten.relu.default"].encodings == {"kept (shared)": 1}


def _squeeze_excite(y):
    return y * torch.sigmoid(F.adaptive_avg_pool2d(y, 1))


def test_relu_output_kept_by_an_operator_the_library_does_not_see_costs_nothing_extra():
    """A squeeze-and-excitation block pools its input (a release: the mask is made), then keeps
    it for ``x * scale``, an operator this library does not handle: the next deferred ReLU
    finds the activation owned by that node and undoes the mask."""
    x = torch.randn(2, 3, 8, 8, requires_grad=True)

    def squeeze_excite_then_relu(x):
        y = F.relu(x * 1)
        return F.adaptive_avg_pool2d(F.relu(_squeeze_excite(y)), 1)

    stock, mode = compare_with_stock(squeeze_excite_then_relu, {"x": x})
    y_bytes = x.numel() * x.element_size()
    assert mode.saved_bytes == stock.saved_bytes - y_bytes + -(-x.numel() // 8)  # only the last ReLU's bits
    assert mode.report["aten.relu.default"].encodings == {"kept (shared)": 1, "1-bit mask": 1}


def test_relu_output_kept_unseen_after_its_python_object_died_costs_nothing_extra():
    """The same inside a block whose return drops the last Python reference to the activation:
    the node that keeps it for ``x * scale`` holds its storage, so at its death no mask is kept
    (in every torch release: the check is on the storage, whoever holds it)."""
    x = torch.randn(2, 3, 8, 8, requires_grad=True)

    def run(x):
        excited = _squeeze_excite(F.relu(x * 1))
        return F.adaptive_avg_pool2d(F.relu(excited), 1)

    stock, mode = compare_with_stock(run, {"x": x})
    assert mode.saved_bytes == stock.saved_bytes - x.numel() * x.element_size() + -(-x.numel() // 8)
    assert mode.report["aten.relu.default"].encodings.get("1-bit mask") == 1


def test_relu_output_dropped_then_passed_through_a_dropout_of_zero_keeps_the_bits():
    """A consumer that stock runs without keeping its input (dropout with p=0 returns it) does
    not cancel the mask."""
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    stock, mode = compare_with_stock(lambda x: F.avg_pool2d(F.dropout(F.relu(x * 1), 0.0), 2), {"x": x})
    assert mode.saved_bytes == -(-x.numel() // 8)
    assert mode.report["aten.relu.default"].encodings == {"1-bit mask": 1}


def test_relu_modified_in_place_before_the_consumer_is_left_to_stock():
    """If the output changes in place after the ReLU, stock's version check must still fire."""
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    from memsave_dispatch import MemSaveMode

    for use_mode in (False, True):
        with MemSaveMode() if use_mode else torch.enable_grad():
            y = F.relu(x * 1)
            y.add_(1)
            out = F.adaptive_avg_pool2d(y, 2)
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                out.sum().backward()


IN_PLACE_ON_A_VIEW = {
    "relu_": (lambda v: F.relu(v, inplace=True), "aten.relu_.default"),
    "leaky_relu_": (lambda v: F.leaky_relu(v, 0.1, inplace=True), "aten.leaky_relu_.default"),
    "hardtanh_": (lambda v: F.hardtanh(v, inplace=True), "aten.hardtanh_.default"),
    "threshold_": (lambda v: F.threshold(v, 0.1, 0.0, inplace=True), "aten.threshold_.default"),
}


@pytest.mark.parametrize("name", sorted(IN_PLACE_ON_A_VIEW))
def test_in_place_activation_on_a_view_runs_stock(name):
    """In place on a view, autograd wraps the activation's node in a CopySlices node on the
    base, out of a policy's reach: the call runs stock, and the report says why."""
    activation, op = IN_PLACE_ON_A_VIEW[name]
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    stock, mode = compare_with_stock(lambda x: activation((x * 1)[:, 1:]).mean((2, 3)), {"x": x})
    assert mode.saved_bytes == stock.saved_bytes
    assert mode.report[op].handled == 0 and mode.report[op].to_stock == {"in place on a view": 1}


def test_relu_on_a_strided_view():
    base = torch.randn(4, 6, 8, requires_grad=True)
    stock, mode = compare_with_stock(lambda base: F.relu(base[:, ::2, 1:] * 1).mean(-1), {"base": base})
    assert mode.saved_bytes < stock.saved_bytes


# The other 1-bit activations. Values straddle each boundary, NaN sits both in the
# vectorised body and in the scalar tail of the kernels (stock hardtanh treats the two
# differently), and the incoming gradients carry NaN, inf and -0.0 too.
BOUNDARY_VALUES = [0.1, 0.10009765625, 0.099609375, -0.5, 0.5, 6.0, 5.99, -1.0, 1.0, 0.7]

ACTIVATIONS = {
    "leaky_relu": (lambda x: F.leaky_relu(x * 1, 0.1), "aten.leaky_relu.default"),
    "leaky_relu_": (lambda x: F.leaky_relu(x * 1, 0.1, inplace=True), "aten.leaky_relu_.default"),
    "hardtanh": (lambda x: F.hardtanh(x * 1, -0.5, 0.5), "aten.hardtanh.default"),
    "hardtanh-0.1-0.7": (lambda x: F.hardtanh(x * 1, 0.1, 0.7), "aten.hardtanh.default"),
    "hardtanh_": (lambda x: F.hardtanh(x * 1, -0.5, 0.5, inplace=True), "aten.hardtanh_.default"),
    "relu6": (lambda x: F.relu6(x * 1), "aten.hardtanh.default"),
    "relu6_": (lambda x: torch.nn.ReLU6(inplace=True)(x * 1), "aten.hardtanh_.default"),
    "threshold": (lambda x: F.threshold(x * 1, 0.1, 20.0), "aten.threshold.default"),
    "threshold_": (lambda x: F.threshold(x * 1, 0.1, 20.0, inplace=True), "aten.threshold_.default"),
}


def _input_with_specials_everywhere(shape, dtype, channels_last, with_nan=True):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    specials = SPECIAL if with_nan else [v for v in SPECIAL if not math.isnan(v)]
    values = torch.tensor(specials + BOUNDARY_VALUES, dtype=torch.float64)
    flat = x.view(-1)
    flat[: len(values)] = values
    flat[-len(values) :] = values  # the kernels' scalar tails
    flat[len(flat) // 2 : len(flat) // 2 + len(values)] = values
    x = x.to(torch.promote_types(torch.float16, torch.float16) if dtype is None else dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
@pytest.mark.parametrize("dtype", [*DTYPES, torch.float16])
@pytest.mark.parametrize("channels_last", (False, True))
@pytest.mark.parametrize("with_nan", (False, True), ids=["finite", "nan"])
def test_activation_keeps_one_bit_and_matches_stock(name, dtype, channels_last, with_nan):
    activation, op = ACTIVATIONS[name]
    x = _input_with_specials_everywhere((3, 5, 7, 9), dtype, channels_last, with_nan).requires_grad_(True)
    stock, mode = compare_with_stock(lambda x: _special_gradients(F.avg_pool2d(activation(x), 1)), {"x": x})
    assert stock.saved_bytes >= x.numel() * x.element_size()
    if with_nan and op.startswith("aten.hardtanh"):
        # stock hardtanh's NaN gradient depends on the incoming gradient's layout: kept as is
        assert mode.saved_bytes == x.numel() * x.element_size()
        assert mode.report[op].handled == 1 and mode.report[op].encodings == {}
        return
    assert mode.saved_bytes == -(-x.numel() // 8)
    assert mode.report[op].encodings == {"1-bit mask": 1}


def test_relu_mask_is_made_once_the_activation_is_no_longer_shared():
    """While anything else holds the ReLU output (here the caller), the node keeps it as
    stock does; its bits replace it when that last other holder lets go."""
    from memsave_dispatch import MemSaveMode

    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    weight = torch.randn(4, 3, 3, 3)  # frozen: the convolution drops its input
    with MemSaveMode() as mode:
        y = F.relu(x * 1)
        out = F.conv2d(y, weight)
        assert mode.report()["aten.relu.default"].encodings == {"kept (shared)": 1}
        del y
        assert mode.report()["aten.relu.default"].encodings == {"1-bit mask": 1}
    out.sum().backward()


@pytest.mark.parametrize("name", ("leaky_relu", "hardtanh", "threshold", "relu"))
def test_an_activation_of_a_parameter_grows_nothing(name):
    """An activation applied to a parameter itself (a learned gate, a clamped scale): the
    parameter lives anyway, so keeping it costs nothing, and an encoding would only add its
    bytes. What the forward leaves allocated (the allocator's count) is not above stock's."""
    activation = {
        "leaky_relu": lambda w: F.leaky_relu(w, 0.1),
        "hardtanh": lambda w: F.hardtanh(w, -0.5, 0.5),
        "threshold": lambda w: F.threshold(w, 0.1, 20.0),
        "relu": F.relu,
    }[name]
    weight = torch.nn.Parameter(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))
    frozen = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    left = []
    for use_mode in (False, True):
        with MemSaveMode() if use_mode else contextlib.nullcontext():
            measured = allocator_bytes(lambda: F.linear(frozen, activation(weight)))
            if use_mode:  # the parameter never dies: nothing may wait for it, nothing encoded
                assert slots.pending_count() == 0
                node_type = f"{name.title().replace('_', '')}Backward0"
                # the input kept is the parameter itself; relu keeps its output, a new tensor
                expected = {"1-bit mask"} if name == "relu" else {"as stock"}
                assert set(audit(measured.result).node_types[node_type].forms) == expected
            measured.result.sum().backward()
        left.append(measured.net)
        gradient, weight.grad = weight.grad, None
        left.append(gradient)
    stock_bytes, stock_gradient, mode_bytes, mode_gradient = left
    assert mode_bytes <= stock_bytes
    assert_bit_identical(mode_gradient, stock_gradient)
