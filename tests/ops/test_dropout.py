"""Dropout (composite aten.dropout on CPU, and the fused aten.native_dropout) against stock:
outputs and gradients bit-identical under the same seed, 1 bit per element kept."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from memsave_dispatch import MemSaveMode
from tests.support import DTYPES, compare_with_stock

DROPOUTS = {
    "dropout": (lambda x, p, train: F.dropout(x, p, training=train), "aten.dropout.default"),
    "dropout-inplace": (lambda x, p, train: F.dropout(x * 1, p, training=train, inplace=True), "aten.dropout_.default"),
    "dropout2d": (lambda x, p, train: F.dropout2d(x, p, training=train), "aten.feature_dropout.default"),
    "module": (lambda x, p, train: torch.nn.Dropout(p).train(train)(x), "aten.dropout.default"),
    "native": (lambda x, p, train: torch.native_dropout(x, p, train)[0], "aten.native_dropout.default"),
}


def _seeded(dropout, p, train):
    def run(x):
        torch.manual_seed(1234)  # both runs draw the same noise: outputs must match
        return dropout(x, p, train)

    return run


@pytest.mark.parametrize("name", sorted(DROPOUTS))
@pytest.mark.parametrize("p", (0.0, 0.1, 0.5, 0.9, 1.0))
@pytest.mark.parametrize("train", (True, False))
@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_matches_stock(name, p, train, dtype):
    dropout, op = DROPOUTS[name]
    x = torch.randn(4, 6, 5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    stock, mode = compare_with_stock(_seeded(dropout, p, train), {"x": x.requires_grad_(True)})
    noise_elements = x.numel() if name != "dropout2d" else x.shape[0] * x.shape[1]
    if train and 0 < p < 1:
        assert mode.saved_bytes == -(-noise_elements // 8)
        assert mode.report[op].encodings == {"1-bit mask": 1}
    else:
        assert mode.saved_bytes == stock.saved_bytes  # identity or a product with 0: nothing to save


@pytest.mark.parametrize("dtype", DTYPES)
def test_inplace_dropout_on_a_view_runs_stock(dtype):
    """torchvision's classifiers drop out a flattened tensor in place: autograd then hides the
    Mul node inside a CopySlices node, so the call is left to stock, and says why."""

    def classifier_head(x):
        torch.manual_seed(1234)
        return F.dropout(torch.flatten(x * 1, 1), 0.2, training=True, inplace=True).sum(1)

    x = torch.randn(4, 6, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    stock, mode = compare_with_stock(classifier_head, {"x": x.requires_grad_(True)})
    assert mode.saved_bytes == stock.saved_bytes
    report = mode.report["aten.dropout_.default"]
    assert report.handled == 0 and report.to_stock == {"in place on a view": 1}


# stock's native_dropout hands an empty input back as its own output (a leaf in the graph's
# interior): its backward raises, stock and mode alike
@pytest.mark.parametrize("name", sorted(set(DROPOUTS) - {"native"}))
@pytest.mark.parametrize("shape", ((0, 6, 5, 7), (4, 0, 5, 7)), ids=["no batch", "no channels"])
def test_empty_dropout_matches_stock(name, shape):
    dropout, op = DROPOUTS[name]
    x = torch.randn(shape, requires_grad=True)
    stock, mode = compare_with_stock(_seeded(lambda t, p, train: dropout(t * 1, p, train), 0.5, True), {"x": x})
    assert mode.saved_bytes <= stock.saved_bytes
    row = mode.report[op]
    assert row.handled + sum(row.to_stock.values()) == 1  # counted, whichever way it went


def test_an_empty_dropout_handing_its_input_back_shows_the_users_hooks_what_stock_keeps():
    packed = []
    for use_mode in (False, True):
        shapes = []
        y = torch.randn(0, 4, requires_grad=True) * 1
        with MemSaveMode() if use_mode else contextlib.nullcontext() as mode:
            with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
                out, _ = torch.native_dropout(y, 0.5, True)
        packed.append(shapes)
    assert packed[1] == packed[0]
    assert mode.report()["native_dropout"].to_stock == {"input handed back": 1}
