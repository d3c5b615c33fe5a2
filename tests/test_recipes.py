"""Rebuilding kept tensors from what the graph keeps anyway (memsave_dispatch.recipes): on a
BERT-shaped encoder under the usual fine-tuning cases, bit-identical to stock and keeping far
less; a tensor a recipe reads, modified in place, raises stock's error; a backward pass that
runs the producer first leaves the consumer its tensor."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from memsave_dispatch import MemSaveMode, audit, saved_tensor_bytes
from memsave_dispatch.meter import allocator_bytes
from memsave_dispatch.handlers import REBUILDS_AVAILABLE, Recipe, Slot, register_recipe, unregister_recipe
from tests.support import assert_bit_identical, compare_with_stock
from tools.bench.encoders import FINE_TUNING, Config, bert_shaped

BATCH, TOKENS = 8, 128

#: Tests of what rebuilding saves; where the release cannot rebuild, the others still check
#: that the mode matches stock.
rebuilds = pytest.mark.skipif(not REBUILDS_AVAILABLE, reason="rebuilds need torch >= 2.13")


def _bert(case: str, config: Config, seed: int = 0):
    torch.manual_seed(seed)
    model = bert_shaped(config)
    FINE_TUNING[case](model)
    if case == "lora":  # adapters start at zero; make them count in the gradients
        generator = torch.Generator().manual_seed(3)
        for name, parameter in model.named_parameters():
            if name.endswith("up.weight"):
                parameter.data.copy_(torch.randn(parameter.shape, generator=generator) * 0.01)
    return model.train()


def _batch(config: Config, batch: int, tokens: int):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab, (batch, tokens), generator=generator)
    mask = torch.ones(batch, tokens, dtype=torch.long)
    mask[1, tokens - tokens // 4 :] = 0  # some padding: the additive mask is not all zeros
    labels = torch.randint(0, config.num_labels, (batch,), generator=generator)
    return ids, mask, labels


def _run(case: str, config: Config, use_mode: bool, autocast: bool = False, batch: int = BATCH, tokens: int = TOKENS):
    model = _bert(case, config)
    ids, mask, labels = _batch(config, batch, tokens)
    with MemSaveMode() if use_mode else contextlib.nullcontext() as mode:
        torch.manual_seed(5)  # the same dropout noise on both sides
        with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
            kept, loss = saved_tensor_bytes(lambda: F.cross_entropy(model(ids, mask).float(), labels), exclude=model)
        loss.backward()
    grads = [(name, p.grad) for name, p in model.named_parameters() if p.requires_grad]
    return kept, loss.detach(), grads, mode.report() if use_mode else None


# The bounds, bytes kept mode/stock, on the BERT-shaped encoder (4 layers, d 256,
# 4 heads, ff 1024, dropout 0.1, batch 8 x 128); measured: 0.385, 0.501, 0.636, 0.651.
BOUNDS = {"lora": 0.40, "all": 0.55, "bias": 0.68, "norm": 0.66}


@pytest.mark.parametrize("case", sorted(BOUNDS))
def test_bert_keeps_within_bounds_and_matches_stock_bit_for_bit(case):
    stock_kept, stock_loss, stock_grads, _ = _run(case, Config(), use_mode=False)
    mode_kept, mode_loss, mode_grads, report = _run(case, Config(), use_mode=True)
    assert_bit_identical(mode_loss, stock_loss, "loss")
    for (name, mode_grad), (_, stock_grad) in zip(mode_grads, stock_grads):
        assert_bit_identical(mode_grad, stock_grad, f"grad of {name}")
    rebuilt = sum(line.encodings.get("rebuilt", 0) for line in report.ops)
    if REBUILDS_AVAILABLE:
        assert mode_kept <= BOUNDS[case] * stock_kept, f"{mode_kept / stock_kept:.3f}"
        assert rebuilt >= 4  # the attention probabilities at least, one per layer
    else:
        assert mode_kept < stock_kept and rebuilt == 0


SMALL = Config(vocab=100, d=32, heads=2, ff=64, layers=2)


@pytest.mark.parametrize("autocast", (False, True), ids=["fp32", "bf16 autocast"])
@pytest.mark.parametrize("dropout", (0.1, 0.0), ids=["dropout", "no dropout"])
@pytest.mark.parametrize("case", sorted(FINE_TUNING))
def test_small_bert_bit_identical_under_autocast_and_without_dropout(case, dropout, autocast):
    config = Config(**{**SMALL.__dict__, "dropout": dropout})
    stock = _run(case, config, use_mode=False, autocast=autocast, batch=3, tokens=16)
    mode = _run(case, config, use_mode=True, autocast=autocast, batch=3, tokens=16)
    assert_bit_identical(mode[1], stock[1], "loss")
    for (name, mode_grad), (_, stock_grad) in zip(mode[2], stock[2]):
        assert_bit_identical(mode_grad, stock_grad, f"grad of {name}")
    assert mode[0] <= stock[0]
    if case in ("all", "lora"):
        assert (sum(line.encodings.get("rebuilt", 0) for line in mode[3].ops) > 0) is REBUILDS_AVAILABLE


def _attention(x, v, change=None):
    probabilities = torch.softmax(x * 1, -1)
    dropped = F.dropout(probabilities, 0.25)
    out = torch.matmul(dropped, v)
    if change is not None:
        change(probabilities, dropped)
    return out


@rebuilds
def test_dropped_out_attention_probabilities_are_rebuilt_not_kept():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    v = torch.randn(2, 3, 8, 4, requires_grad=True)
    torch.manual_seed(0)

    def run(x, v):
        torch.manual_seed(0)
        return _attention(x, v)

    stock, mode = compare_with_stock(run, {"x": x, "v": v})
    probabilities = x.numel() * 4
    # stock: probabilities (softmax), noise (dropout), dropped-out probabilities and v (bmm);
    # the mode: the probabilities, the noise as bits, v
    assert stock.saved_bytes == 3 * probabilities + v.numel() * 4
    assert mode.saved_bytes == probabilities + x.numel() // 8 + v.numel() * 4
    assert mode.report["bmm"].encodings == {"rebuilt": 1}


@pytest.mark.parametrize("target", ("probabilities", "dropped-out probabilities"))
def test_a_tensor_a_recipe_reads_modified_in_place_raises_stocks_error(target):
    errors = []
    for use_mode in (False, True):
        x = torch.randn(2, 3, 8, 8, requires_grad=True)
        v = torch.randn(2, 3, 8, 4, requires_grad=True)

        def change(probabilities, dropped):
            with torch.no_grad():
                (probabilities if target == "probabilities" else dropped).mul_(2.0)

        with MemSaveMode() if use_mode else contextlib.nullcontext():
            torch.manual_seed(0)
            out = _attention(x, v, change)
            with pytest.raises(RuntimeError, match="modified by an inplace operation") as caught:
                out.sum().backward()
        errors.append(str(caught.value))
    assert errors[1] == errors[0]


def _scores_and_values(tokens: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention scores and values, the same on the stock and the mode side."""
    x = torch.randn(2, 3, tokens, tokens, generator=torch.Generator().manual_seed(1), requires_grad=True)
    v = torch.randn(2, 3, tokens, 4, generator=torch.Generator().manual_seed(2), requires_grad=True)
    return x, v


def test_a_backward_through_the_producer_first_leaves_the_consumer_its_tensor():
    """An auxiliary loss backpropagated through the softmax (freeing its saved probabilities)
    before the head's backward: the head's tensor is rebuilt at that moment and kept, as stock
    keeps it, and the head's gradient is stock's."""
    results = []
    for use_mode in (False, True):
        x, v = _scores_and_values()
        with MemSaveMode() if use_mode else contextlib.nullcontext():
            torch.manual_seed(0)
            probabilities = torch.softmax(x * 1, -1)
            dropped = F.dropout(probabilities, 0.25)
            out = torch.matmul(dropped, v)
            del dropped
            probabilities.pow(2).sum().backward(inputs=[x])  # frees the softmax's saved output
            (grad_v,) = torch.autograd.grad(out.sum(), v)
        results.append((x.grad, grad_v))
    for mode, stock in zip(results[1], results[0]):
        assert_bit_identical(mode, stock)


@rebuilds
def test_audit_shows_what_a_rebuilt_slot_references():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    v = torch.randn(2, 3, 8, 4, requires_grad=True)
    with MemSaveMode():
        torch.manual_seed(0)
        out = _attention(x, v)
    forms = audit(out).node_types["BmmBackward0"].forms
    assert forms["rebuilt: mul.Tensor(SoftmaxBackward0.result, MulBackward0.other)"] == 1


@rebuilds
def test_a_recipe_registered_by_the_user_is_used():
    """sin keeps its input; with a recipe for its node, a product that keeps sin's output
    drops it, and backward re-runs sin on the input sin's node keeps anyway."""
    register_recipe("SinBackward0")(lambda node: Recipe(torch.ops.aten.sin.default, (Slot("self"),)))
    try:
        w = torch.randn(6, 5, requires_grad=True)
        x = torch.randn(4, 6, requires_grad=True)
        stock, mode = compare_with_stock(lambda x, w: torch.mm(torch.sin(x * 1), w), {"x": x, "w": w})
        assert stock.saved_bytes == 2 * x.numel() * 4 + w.numel() * 4  # sin's input and output
        assert mode.saved_bytes == x.numel() * 4 + w.numel() * 4
        assert mode.report["mm"].encodings == {"rebuilt": 1}
    finally:
        unregister_recipe("SinBackward0")


def _three_heads(x, v, aux_first: bool, retain: bool):
    """Attention probabilities dropped out once and read by three products (one base, three
    consumers of its rebuild); optionally an auxiliary backward through the softmax first."""
    probabilities = torch.softmax(x * 1, -1)
    dropped = F.dropout(probabilities, 0.25)
    outs = [torch.matmul(dropped, v * k) for k in (1.0, 2.0, 3.0)]
    if aux_first:  # while ``dropped`` is still alive: nothing has been dropped yet
        probabilities.pow(2).sum().backward(inputs=[x], retain_graph=retain)
    del dropped
    return outs, probabilities


@pytest.mark.parametrize("retain", (False, True), ids=["aux backward", "aux backward, retain_graph"])
@pytest.mark.parametrize("aux_first", (False, True), ids=["tensor dies first", "producer runs first"])
def test_three_consumers_of_one_rebuilt_tensor_match_stock(aux_first, retain):
    """However backward passes interleave with the forward (a producer backpropagated while its
    output lives, or after; retain_graph and a second pass), the gradients are stock's."""
    results = []
    for use_mode in (False, True):
        x, v = _scores_and_values()
        with MemSaveMode() if use_mode else contextlib.nullcontext():
            torch.manual_seed(0)
            outs, probabilities = _three_heads(x, v, aux_first, retain)
            loss = sum(out.sum() for out in outs)
            loss.backward(inputs=[v], retain_graph=True)  # reads the rebuilt tensor, not the softmax
            if not aux_first:
                probabilities.pow(2).sum().backward(inputs=[x], retain_graph=retain)
            loss.backward(inputs=[v])  # a second pass over the same graph
        results.append((x.grad, v.grad))
    for mode, stock in zip(results[1], results[0]):
        assert_bit_identical(mode, stock)


@rebuilds
def test_a_rebuilt_tensor_kept_for_three_consumers_costs_no_more_than_stocks():
    """A producer backpropagated first rebuilds the base once, and its three consumers share it:
    what is left allocated afterwards (the allocator's own count) is not above stock's, and the
    consumers' gradients are stock's."""
    left, grads = [], []
    for use_mode in (False, True):
        x, v = _scores_and_values(64)

        def forward_and_aux_backward():
            torch.manual_seed(0)
            probabilities = torch.softmax(x * 1, -1)
            dropped = F.dropout(probabilities, 0.25)
            outs = [torch.matmul(dropped, v * k) for k in (1.0, 2.0, 3.0)]
            del dropped
            probabilities.pow(2).sum().backward(inputs=[x])  # the softmax's slots are freed
            return outs

        with MemSaveMode() if use_mode else contextlib.nullcontext() as mode:
            measured = allocator_bytes(forward_and_aux_backward)
            sum(out.sum() for out in measured.result).backward(inputs=[v])
        left.append(measured.net)
        grads.append(v.grad)
        del measured
    stock, rebuilt = left
    probabilities_bytes = 2 * 3 * 64 * 64 * 4
    assert mode.report()["bmm"].encodings == {"rebuilt": 3}
    assert rebuilt <= stock and stock - rebuilt < probabilities_bytes  # one rebuild held, not three
    assert_bit_identical(grads[1], grads[0])


@rebuilds
def test_a_rebuild_reading_a_parameter_copies_nothing():
    """A product with a parameter, kept by the next layer: the rebuild reads the parameter
    where the graph keeps it, so the whole-step peak is not above stock's."""
    generator = torch.Generator().manual_seed(0)
    scales = [torch.nn.Parameter(torch.randn(256, 256, generator=generator)) for _ in range(4)]
    weights = [torch.nn.Parameter(torch.randn(256, 256, generator=generator)) for _ in range(4)]
    x = torch.randn(256, 256, generator=generator, requires_grad=True)

    def step():
        h = x * 1
        for scale, weight in zip(scales, weights):
            h = F.linear(h * scale, weight)
        h.sum().backward()

    peaks = []
    for use_mode in (False, True):
        with MemSaveMode() if use_mode else contextlib.nullcontext():
            peaks.append(allocator_bytes(step).peak)
    assert peaks[1] <= peaks[0]


@rebuilds
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_a_rebuilt_cast_to_channels_last_keeps_its_layout(dtype):
    """A GELU output cast to channels_last, read by a convolution whose weight trains: the cast
    is rebuilt from the GELU's input, in the layout (and dtype) the convolution saw."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, 8, 8, generator=generator, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, generator=generator, requires_grad=True)

    def fn(a, w):
        h = F.gelu(a * 1).to(dtype=dtype, memory_format=torch.channels_last)
        return F.conv2d(h, w.to(dtype))

    stock, mode = compare_with_stock(fn, {"a": a, "w": w})
    h_bytes = a.numel() * torch.finfo(dtype).bits // 8
    assert stock.saved_bytes - mode.saved_bytes == h_bytes
    assert mode.report["convolution"].encodings == {"rebuilt": 1}


@rebuilds
def test_two_rebuilt_slots_in_one_call_are_counted_once_each():
    """A product of two rebuildable tensors keeps neither: two rebuilds, and the report's bytes
    are stock's minus both, never negative."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 8, generator=generator, requires_grad=True)
    y = torch.randn(2, 8, 8, generator=generator, requires_grad=True)

    def fn(x, y):
        return torch.bmm(F.gelu(x * 1), F.gelu(y * 1))  # GELU keeps its input, not its output

    stock, mode = compare_with_stock(fn, {"x": x, "y": y})
    assert stock.saved_bytes - mode.saved_bytes == 2 * x.numel() * 4
    row = mode.report["bmm"]
    assert row.encodings == {"rebuilt": 2}
    assert row.stock_bytes == 2 * x.numel() * 4 and row.kept_bytes == 0


@rebuilds
def test_planning_a_rebuild_decodes_nothing_in_forward(monkeypatch):
    """Planning reads the slots a recipe will use without unpacking an encoding (dropout's
    noise): a decode in forward would allocate the whole tensor there."""
    from memsave_dispatch import holders

    unpacked = []
    unpack = holders.Encoded.unpack
    monkeypatch.setattr(holders.Encoded, "unpack", lambda self, packed: unpacked.append(1) or unpack(self, packed))
    x, v = _scores_and_values()
    monkeypatch.setenv("MEMSAVE_DISPATCH_ENGINE", "python")  # the Python engine's holders
    with MemSaveMode() as mode:
        torch.manual_seed(0)
        out = _attention(x, v)
        assert not unpacked
        out.sum().backward()
    assert unpacked and mode.report()["bmm"].encodings == {"rebuilt": 1}
