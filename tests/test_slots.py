"""The slot engine (memsave_dispatch.slots): what each holder keeps, when an unshared encoding
is made, and stock's in-place semantics kept (where stock raises, the mode raises the same)."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

from memsave_dispatch import MemSaveMode, audit, engine
from tests.support import assert_bit_identical, compare_with_stock

pytestmark = pytest.mark.usefixtures("each_engine")  # on both engines

FROZEN = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(7))


def _stock_and_mode(run):
    """``run(x)`` stock and under a mode, each on its own leaf: (result or exception,
    gradient of x) per side."""
    outcomes = []
    for use_mode in (False, True):
        x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
        with MemSaveMode() if use_mode else torch.enable_grad():
            try:
                run(x)
            except RuntimeError as error:
                outcomes.append((str(error), None))
                continue
        outcomes.append((None, x.grad))
    return outcomes


def _assert_same_as_stock(run):
    (stock_error, stock_grad), (mode_error, mode_grad) = _stock_and_mode(run)
    assert mode_error == stock_error
    if stock_error is None:
        assert_bit_identical(mode_grad, stock_grad, "gradient of x")
    return stock_error


# -- in-place changes to a saved tensor: stock's error, word for word ----------------------
# Each case runs with its in-place change (``change`` applies it) or without it.
def _relu_output_after_max_pool(x, change):
    y = F.relu(x * 1)
    z = F.max_pool2d(y, 2)
    change(y.mul_, -1.0)
    z.sum().backward()


def _relu_output_after_frozen_conv(x, change):
    y = F.relu(x * 1)
    z = F.conv2d(y, FROZEN)
    change(y.mul_, -1.0)
    z.sum().backward()


def _relu_output_after_frozen_conv_under_no_grad(x, change):
    y = F.relu(x * 1)
    z = F.conv2d(y, FROZEN)
    with torch.no_grad():
        change(y.mul_, -1.0)
    z.sum().backward()


def _relu_output_through_a_view(x, change):
    y = F.relu(x * 1)
    z = F.avg_pool2d(y, 2)
    change(y[0].mul_, 2.0)
    z.sum().backward()


def _relu_output_kept_then_modified(x, change):
    """D2: the pool drops y (its mask is due), a trainable conv keeps it, then it changes."""
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    y = F.relu(x * 1)
    z = F.max_pool2d(y, 2)
    F.conv2d(y, w)
    change(y.mul_, -1.0)
    z.sum().backward()


def _relu_of_modified_after_release(x, change):
    y = F.relu(x * 1)
    z = F.max_pool2d(y, 2)
    change(lambda: F.relu_(y.mul_(-1.0)))
    (z.sum() + y.sum()).backward()


def _relu_output_modified_after_it_died(x, change):
    """The activation's Python object dies (its mask is made), an alias changes it."""
    y = F.relu(x * 1)
    alias = y.detach()
    z = F.avg_pool2d(y, 2)
    del y
    change(alias.mul_, -1.0)
    z.sum().backward()


def _input_of(activation):
    def run(x, change):
        h = x * 1
        y = activation(h)
        change(h.mul_, 2.0)
        y.sum().backward()

    return run


def _eval_batch_norm_input(x, change):
    h = x * 1
    y = F.batch_norm(h, torch.zeros(3), torch.ones(3), training=False)
    change(h.add_, 1.0)
    y.sum().backward()


def _max_pool_indices_returned_and_modified(x, change):
    out, indices = F.max_pool2d(x * 1, 2, return_indices=True)
    change(indices.mul_, 1)
    out.sum().backward()


MODIFIED = {
    "relu output after max pool": _relu_output_after_max_pool,
    "relu output after frozen conv": _relu_output_after_frozen_conv,
    "relu output after frozen conv, no_grad change": _relu_output_after_frozen_conv_under_no_grad,
    "relu output through a view": _relu_output_through_a_view,
    "relu output dropped, kept, modified": _relu_output_kept_then_modified,
    "relu_ of modified output after release": _relu_of_modified_after_release,
    "relu output modified by an alias after its death": _relu_output_modified_after_it_died,
    "leaky_relu input": _input_of(lambda h: F.leaky_relu(h, 0.1)),
    "hardtanh input": _input_of(lambda h: F.hardtanh(h, -0.5, 0.5)),
    "threshold input": _input_of(lambda h: F.threshold(h, 0.1, 2.0)),
    "frozen conv input": _input_of(lambda h: F.conv2d(h, FROZEN)),
    "max pool input": _input_of(lambda h: F.max_pool2d(h, 2)),
    "avg pool input": _input_of(lambda h: F.avg_pool2d(h, 2)),
    "eval batch norm input": _eval_batch_norm_input,
    "max pool indices the caller holds": _max_pool_indices_returned_and_modified,
}


def _made(method, *args):
    method(*args)


def _skipped(method, *args):
    pass


@pytest.mark.parametrize("case", sorted(MODIFIED))
def test_in_place_change_of_a_saved_tensor_raises_stocks_error(case):
    error = _assert_same_as_stock(lambda x: MODIFIED[case](x, _made))
    assert error is not None and "modified by an inplace operation" in error


@pytest.mark.parametrize("case", sorted(MODIFIED))
def test_the_same_code_without_the_change_matches_stock(case):
    assert _assert_same_as_stock(lambda x: MODIFIED[case](x, _skipped)) is None


def test_a_tensor_changed_through_a_view_then_gone_still_raises():
    """The one difference left: stock keeps a dropped tensor alive and names the node it had
    last (here the view's CopySlices); the mode, which let it go, names the node it had when
    it was saved. The error itself is stock's."""

    def run(x):
        h = x * 1
        y = F.avg_pool2d(h, 2)
        h[0].mul_(2.0)
        del h
        y.sum().backward()

    (stock_error, _), (mode_error, _) = _stock_and_mode(run)
    assert "which is output 0 of torch::autograd::CopySlices," in stock_error
    # (the node's name as this torch release prints it: "Mul" from 2.13 on, "MulBackward0" before)
    assert mode_error in (stock_error.replace("torch::autograd::CopySlices", name) for name in ("Mul", "MulBackward0"))


def test_in_place_error_under_anomaly_detection_has_stocks_hint():
    with torch.autograd.set_detect_anomaly(True), pytest.warns(UserWarning):
        error = _assert_same_as_stock(lambda x: _relu_output_after_frozen_conv(x, _made))
    assert "Good luck!" in error


# -- D1: a consumer of an activation whose graph was already backpropagated ---------------------
CONSUMERS = {
    "max pool": lambda y: F.max_pool2d(y, 2),
    "avg pool": lambda y: F.avg_pool2d(y, 2),
    "frozen conv": lambda y: F.conv2d(y, FROZEN),
}


@pytest.mark.parametrize("consumer", sorted(CONSUMERS))
def test_consumer_of_an_activation_already_backpropagated(consumer):
    """An auxiliary loss backpropagated through the trunk (freeing the ReLU node's saved
    output), then a head on the same activation: stock runs it, so must the mode."""

    def run(x):
        y = F.relu(x * 1)
        y.sum().backward()
        z = CONSUMERS[consumer](y)
        (grad,) = torch.autograd.grad(z.sum(), y)
        del y
        x.grad = x.grad + grad.sum()

    assert _assert_same_as_stock(run) is None


# -- D5: never above stock when the caller keeps an activation --------------------------------
def _features_returned(x):
    y = F.relu(x * 1)
    return F.avg_pool2d(y, 2), y


def _features_kept_by_an_unseen_operator(x):
    y = F.relu(x * 1)
    return F.avg_pool2d(y, 2).sum() + y.pow(2).sum()


def _relu_before_a_dropping_consumer(x):
    return F.avg_pool2d(F.relu(x * 1), 2)


@pytest.mark.parametrize(
    "run,encoded",
    [(_features_returned, False), (_features_kept_by_an_unseen_operator, False), (_relu_before_a_dropping_consumer, True)],
    ids=["caller keeps the activation", "pow keeps it", "nothing else keeps it"],
)
def test_a_mask_is_made_only_where_it_replaces_the_activation(run, encoded):
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    stock, mode = compare_with_stock(run, {"x": x})
    relu = mode.report["relu"]
    if encoded:
        assert relu.encodings == {"1-bit mask": 1}
        assert mode.saved_bytes == stock.saved_bytes - x.numel() * 4 + x.numel() // 8
    else:
        assert relu.encodings == {"kept (shared)": 1}
        assert mode.saved_bytes == stock.saved_bytes


def test_nothing_waits_for_a_tensor_once_it_died_or_the_mode_exited():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    with MemSaveMode():
        kept = F.relu(x * 1)
        F.avg_pool2d(F.relu(x * 1), 2)
        assert engine.pending_count() == 1  # the temporary died and was encoded; kept waits
        out = kept.sum()
    assert engine.pending_count() == 0
    del kept  # dies after the mode exited: its node keeps it as stock does, no mask is made
    gc.collect()
    assert engine.pending_count() == 0
    assert audit(out).node_types["ReluBackward0"].forms == {"as stock": 1}
    assert audit(out).total_bytes == x.numel() * 4
