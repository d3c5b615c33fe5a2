"""Batch norm (aten.native_batch_norm) against stock PyTorch, modules and functional."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from tests.support import DTYPES, compare_with_stock, requires_grad_patterns

MODULES = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
SHAPES = {"1d-NC": (1, (6, 4)), "1d-NCL": (1, (3, 4, 5)), "2d": (2, (3, 4, 5, 5)), "3d": (3, (2, 4, 3, 3, 3))}
FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


def _module_run(module):
    def run(x, **state):
        return torch.func.functional_call(module, state, (x,))

    return run


def _inputs(module, shape, dtype, channels_last, need_x):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=FORMATS[x.dim()])
    state = {name: value for name, value in module.named_parameters()}
    state.update({name: value for name, value in module.named_buffers()})
    return {"x": x.requires_grad_(need_x), **state}


def _expected_bytes(x, module, need_x, need_w) -> int:
    """mechanism §7: eval needs x only for grad_w; training needs x for grad_x or grad_w (plus
    per-channel batch statistics, two vectors of C)."""
    training = module.training or not module.track_running_stats
    if not (need_w or (training and need_x)):
        return 0
    channels = x.shape[1]
    stats = 2 * channels * x.element_size() if training else 0  # save_mean, save_invstd
    return x.numel() * x.element_size() + stats


CORE = [
    (shape_name, dtype, channels_last, training, pattern)
    for shape_name, dtype, channels_last, training, pattern in itertools.product(
        sorted(SHAPES), DTYPES, (False, True), (True, False), requires_grad_patterns("xwb")
    )
    if not (channels_last and len(SHAPES[shape_name][1]) < 4)  # channels_last needs 4-d or 5-d
]


@pytest.mark.parametrize("shape_name,dtype,channels_last,training,pattern", CORE)
def test_matches_stock_and_keeps_the_minimum(shape_name, dtype, channels_last, training, pattern):
    dims, shape = SHAPES[shape_name]
    need_x, need_w, need_b = pattern
    torch.manual_seed(0)
    module = MODULES[dims](shape[1]).to(dtype)
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.5, 0.5)
        module.running_mean.uniform_(-0.1, 0.1)
        module.running_var.uniform_(0.5, 1.5)
    module.weight.requires_grad_(need_w)
    module.bias.requires_grad_(need_b)
    module.train(training)
    inputs = _inputs(module, shape, dtype, channels_last, need_x)
    state = [name for name in inputs if name != "x"]
    stock, mode = compare_with_stock(_module_run(module), inputs, state=state)
    assert mode.saved_bytes == _expected_bytes(inputs["x"], module, need_x, need_w)
    assert mode.saved_bytes <= stock.saved_bytes


VARIANTS = {
    "affine=False": dict(affine=False),
    "track_running_stats=False": dict(track_running_stats=False),
    "momentum=None": dict(momentum=None),
    "affine=False,track=False": dict(affine=False, track_running_stats=False),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("training", (True, False))
@pytest.mark.parametrize("need_x", (True, False))
@pytest.mark.parametrize("dims", (1, 2, 3))
def test_module_variants_update_state_like_stock(variant, training, need_x, dims):
    """Running statistics and num_batches_tracked evolve exactly as stock over several steps."""
    shape = {1: (6, 4), 2: (3, 4, 5, 5), 3: (2, 4, 3, 3, 3)}[dims]
    modules = []
    for _ in range(2):
        torch.manual_seed(0)
        module = MODULES[dims](4, **VARIANTS[variant]).train(training)
        if module.affine:
            module.weight.requires_grad_(False)  # frozen affine: the case that saves memory
        modules.append(module)
    stock_module, mode_module = modules
    from memsave_dispatch import MemSaveMode

    for step in range(3):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(step), requires_grad=need_x)
        outputs = []
        for module, use_mode in ((stock_module, False), (mode_module, True)):
            with MemSaveMode() if use_mode else torch.enable_grad():
                out = module(x)
                if out.requires_grad:
                    out.sum().backward()
            outputs.append(out.detach())
        assert torch.equal(outputs[0], outputs[1])
    for (name, a), (_, b) in zip(stock_module.state_dict().items(), mode_module.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("training", (True, False))
def test_functional_batch_norm_and_instance_norm(training):
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    running_mean, running_var = torch.zeros(4), torch.ones(4)
    weight = nn.Parameter(torch.rand(4) + 0.5, requires_grad=False)
    bias = nn.Parameter(torch.zeros(4))

    def run(x, weight, bias, running_mean, running_var):
        a = torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias, training=training)
        b = torch.nn.functional.instance_norm(x, weight=weight, bias=bias)
        return a, b

    inputs = dict(x=x, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    stock, mode = compare_with_stock(run, inputs, state=("weight", "bias", "running_mean", "running_var"))
    assert mode.saved_bytes <= stock.saved_bytes


LAYER_LIKE = {
    "layer_norm": (lambda x, w, b: torch.nn.functional.layer_norm(x, (6,), w, b), 6),
    "layer_norm-2d": (lambda x, w, b: torch.nn.functional.layer_norm(x, (5, 6), w, b), (5, 6)),
    "group_norm": (lambda x, w, b: torch.nn.functional.group_norm(x, 2, w, b), 4),
}


@pytest.mark.parametrize("name", sorted(LAYER_LIKE))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pattern", requires_grad_patterns("xwb"))
def test_layer_and_group_norm_keep_nothing_for_bias_only(name, dtype, pattern):
    norm, parameter_shape = LAYER_LIKE[name]
    need_x, need_w, need_b = pattern
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 6, generator=generator, dtype=torch.float64).to(dtype).requires_grad_(need_x)
    w = nn.Parameter((torch.rand(parameter_shape, generator=generator, dtype=torch.float64) + 0.5).to(dtype), requires_grad=need_w)
    b = nn.Parameter(torch.randn(parameter_shape, generator=generator, dtype=torch.float64).to(dtype), requires_grad=need_b)
    stock, mode = compare_with_stock(norm, {"x": x, "w": w, "b": b}, state=("w", "b"))
    if need_x or need_w:
        assert mode.saved_bytes == stock.saved_bytes  # x and the statistics are needed
    else:
        assert mode.saved_bytes == 0 < stock.saved_bytes
