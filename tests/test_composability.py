"""The mode inside real training stacks: autocast, activation checkpointing, saved-tensor
hooks (save_on_cpu, user pairs): stock's gradients, and the hooks see everything kept."""

from __future__ import annotations

import contextlib
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from memsave_dispatch import MemSaveMode, audit
from memsave_dispatch.handlers import Handler
from memsave_dispatch._compat import SAVED_SLOTS_READABLE
from tests.support import assert_bit_identical, frozen_small_net
from tools.bench.models import freeze


def _gradients(model, x):
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    if x.grad is not None:
        grads.append(x.grad.clone())
    model.zero_grad(set_to_none=True)
    x.grad = None
    return grads


# -- autocast ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_gradients_match_stock_autocast_and_cast_ops_are_counted(dtype):
    model = frozen_small_net(width=8, prompt_size=16)
    x = torch.randn(4, 3, 16, 16)
    results = []
    for use_mode in (False, True):
        with MemSaveMode() if use_mode else contextlib.nullcontext() as mode:
            with torch.autocast("cpu", dtype=dtype):
                out = model(x)
            F.cross_entropy(out.float(), torch.arange(4)).backward()
        results.append([out.detach(), *_gradients(model, x)])
    for stock, ours in zip(*results):
        assert_bit_identical(stock, ours)
    report = mode.report()
    assert results[0][0].dtype == dtype
    # autocast casts before autograd: the handlers see the low-precision tensors
    conv = report["aten.convolution.default"]
    assert conv.handled == 2 and 0 < conv.kept_bytes < conv.stock_bytes
    assert report["aten.relu_.default"].encodings == {"1-bit mask": 2}


# -- checkpointing ----------------------------------------------------------------------
class _Checkpointed(nn.Module):
    """A frozen conv-BN-ReLU-pool trunk under activation checkpointing, a trainable head."""

    def __init__(self, use_reentrant: bool, mode_inside: bool):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8).eval(), nn.ReLU(), nn.MaxPool2d(2))
        freeze(self.trunk)
        self.head = nn.Linear(8 * 8 * 8, 4)
        self.use_reentrant, self.mode_inside = use_reentrant, mode_inside

    def _trunk(self, x):
        with MemSaveMode() if self.mode_inside else contextlib.nullcontext():
            return self.trunk(x)

    def forward(self, x):
        return self.head(checkpoint(self._trunk, x, use_reentrant=self.use_reentrant).flatten(1))


@pytest.mark.parametrize("use_reentrant", (False, True), ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize(
    "where",
    ["mode inside the checkpointed function", "mode around, backward inside", "mode around, backward outside"],
)
def test_checkpoint_gives_stock_gradients(use_reentrant, where):
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    stock_model = _Checkpointed(use_reentrant, mode_inside=False)
    stock_model(x).square().sum().backward()
    expected = _gradients(stock_model, x)

    model = _Checkpointed(use_reentrant, mode_inside=where.startswith("mode inside"))
    mode = MemSaveMode()
    if where == "mode around, backward outside":
        with mode:
            loss = model(x).square().sum()
        loss.backward()
    else:
        with mode if where.startswith("mode around") else contextlib.nullcontext():
            model(x).square().sum().backward()
    for a, b in zip(expected, _gradients(model, x)):
        assert_bit_identical(a, b)


def test_non_reentrant_checkpoint_region_is_left_to_stock_and_counted():
    model = _Checkpointed(use_reentrant=False, mode_inside=False)
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    with MemSaveMode() as mode:
        model(x).sum().backward()
    # the forward's call is counted as the region's; its recomputation runs during backward
    assert mode.report()["aten.convolution.default"].to_stock == {"checkpointed region": 1, "during backward": 1}


class _SinKeepingCosine(Handler):
    """A user's Handler that saves another tensor than stock (cos x instead of x)."""

    family = "activation"

    @staticmethod
    def forward(ctx, input):
        ctx.save_for_backward(torch.cos(input))
        return torch.sin(input)

    @staticmethod
    def backward(ctx, grad):
        (cosine,) = ctx.saved_tensors
        return grad * cosine


@pytest.mark.parametrize("use_reentrant", (False, True), ids=["non-reentrant", "reentrant"])
def test_a_users_handler_inside_a_checkpointed_region_runs_as_its_recomputation_does(use_reentrant):
    """The region's first pass and its recomputation in backward must save the same tensors:
    both run stock, also for a Handler (its Function saves other tensors than stock's node)."""
    x = torch.randn(5, generator=torch.Generator().manual_seed(0))
    grads = []
    for use_mode in (False, True):
        leaf = x.clone().requires_grad_()
        mode = MemSaveMode(handlers={torch.ops.aten.sin.default: _SinKeepingCosine})
        with mode if use_mode else contextlib.nullcontext():
            checkpoint(lambda t: torch.sin(t * 2) * 3, leaf, use_reentrant=use_reentrant).sum().backward()
        grads.append(leaf.grad)
    assert_bit_identical(grads[1], grads[0])
    assert mode.report()["sin"].handled == 0


# -- saved-tensor hooks -----------------------------------------------------------------
class _Box:
    """What the user's pack hook returns; alive exactly as long as autograd keeps it."""

    def __init__(self, tensor):
        self.tensor = tensor


def _recording_hooks(seen: weakref.WeakSet):
    def pack(tensor):
        box = _Box(tensor)
        seen.add(box)
        return box

    def unpack(box):
        return box.tensor

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def test_user_hooks_see_every_tensor_the_handlers_keep():
    model = frozen_small_net(width=8, prompt_size=16)
    x = torch.randn(4, 3, 16, 16)
    seen: weakref.WeakSet = weakref.WeakSet()
    with MemSaveMode():
        with _recording_hooks(seen):
            out = model(x)
        gc.collect()
        state = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        held = {box.tensor.untyped_storage().data_ptr(): box.tensor.untyped_storage().nbytes() for box in seen}
        kept = audit(out, model=model)
        # what the hooks still hold is exactly what the graph keeps, encodings included
        assert sum(n for ptr, n in held.items() if ptr not in state) == kept.total_bytes > 0
        forms = {form for row in kept.node_types.values() for form in row.forms}
        assert {"1-bit mask", "2-bit window offsets"} <= forms
        if SAVED_SLOTS_READABLE:  # (before torch 2.13 a slot hides the user's hooks from audit)
            assert "as stock" not in forms
        F.cross_entropy(out, torch.arange(4)).backward()
    with_hooks = _gradients(model, x)
    with MemSaveMode():
        F.cross_entropy(model(x), torch.arange(4)).backward()
    for a, b in zip(with_hooks, _gradients(model, x)):
        assert_bit_identical(a, b)


@pytest.mark.parametrize("pin_memory", (False, True))
def test_save_on_cpu_matches_stock(pin_memory):
    if pin_memory and not torch.cuda.is_available():
        pytest.skip("pinned memory needs an accelerator")
    model = frozen_small_net(width=8, prompt_size=16)
    x = torch.randn(4, 3, 16, 16)
    results = []
    for use_mode in (False, True):
        with MemSaveMode() if use_mode else contextlib.nullcontext():
            with torch.autograd.graph.save_on_cpu(pin_memory=pin_memory):
                out = model(x)
            F.cross_entropy(out, torch.arange(4)).backward()
        results.append([out.detach(), *_gradients(model, x)])
    for a, b in zip(*results):
        assert_bit_identical(a, b)


def test_hooks_entered_inside_a_handled_region_and_nested_modes():
    """Hooks pushed between two nested modes and popped before backward still unpack."""
    model = frozen_small_net(width=8, prompt_size=16)
    x = torch.randn(2, 3, 16, 16)
    seen: weakref.WeakSet = weakref.WeakSet()
    with MemSaveMode():
        with _recording_hooks(seen), MemSaveMode(exclude=["pooling"]):
            out = model(x)
    assert len(seen) > 0
    F.cross_entropy(out, torch.arange(2)).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
