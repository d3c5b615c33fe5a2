"""memsave_dispatch.audit: bytes a graph keeps, per node type and module, each storage once."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memsave_dispatch import MemSaveMode, audit, track_modules
from memsave_dispatch._compat import SAVED_SLOTS_READABLE
from memsave_dispatch.report import format_bytes, render_text
from tests.support import HookMeter
from tools.bench.encoders import FINE_TUNING, Config, bert_shaped
from tools.bench.models import SmallConvNet, freeze, resnet18, set_batchnorm_eval, transformer_encoder

CASES = {
    "resnet18 frozen, BN eval": (lambda: resnet18(num_classes=10), lambda m: (freeze(m), set_batchnorm_eval(m))),
    "resnet18 frozen, BN train": (lambda: resnet18(num_classes=10), freeze),
    "resnet18 all trainable": (lambda: resnet18(num_classes=10), lambda m: None),
    "small net prompt-tuned": (lambda: SmallConvNet(prompt_size=32), freeze),
}


def _model(case):
    torch.manual_seed(0)
    build, prepare = CASES[case]
    model = build()
    prepare(model)
    return model


@pytest.mark.parametrize("use_mode", (False, True), ids=["stock", "mode"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_totals_equal_the_saved_tensor_hooks_count_and_every_byte_has_a_node_type(case, use_mode):
    model = _model(case)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    with MemSaveMode() if use_mode else torch.enable_grad():
        with HookMeter(exclude=model) as meter:
            metered = model(x)
        plain = model(x)
    assert meter.bytes > 0
    assert audit(metered, model=model).total_bytes == meter.bytes  # the same graph
    result = audit(plain, model=model)  # an identical graph without hooks
    assert result.total_bytes == meter.bytes
    assert sum(row.bytes for row in result.node_types.values()) == result.total_bytes
    assert result.excluded_bytes > 0  # the frozen weights the convolutions keep
    changed = sum(row.changed_by_memsave for row in result.node_types.values())
    assert (changed > 0) == use_mode


def test_transformer_bias_only():
    torch.manual_seed(0)
    model = transformer_encoder(d_model=64, feed_forward=128, layers=2)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.endswith("bias"))
    x = torch.randn(2, 16, 64)
    for use_mode in (False, True):
        with MemSaveMode() if use_mode else torch.enable_grad():
            with HookMeter(exclude=model) as meter:
                out = model(x)
        assert audit(out, model=model).total_bytes == meter.bytes


def test_shared_storage_counts_once_for_the_first_holder():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    w = nn.Parameter(torch.randn(4, 3, 3, 3))
    out = F.conv2d(F.relu(x + 1), w)  # relu output kept by the ReLU node and by the conv
    result = audit(out)
    assert result.total_bytes == x.numel() * 4
    assert result.node_types["ReluBackward0"].bytes == x.numel() * 4
    assert result.node_types["ConvolutionBackward0"].bytes == 0
    assert result.excluded_bytes == w.numel() * 4  # the parameter, not counted


class _Cube(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * x * x * grad


def test_custom_functions_and_saved_tensor_hooks_are_counted():
    x = torch.randn(1000, requires_grad=True)
    assert audit(_Cube.apply(x + 1)).total_bytes == 4000
    with torch.autograd.graph.save_on_cpu():
        result = audit(_Cube.apply(x + 1))
    assert result.total_bytes == 4000
    # before torch 2.13 a slot hides its hooks: audit unpacks it and cannot tell them apart
    form = "packed by saved-tensor hooks" if SAVED_SLOTS_READABLE else "as stock"
    assert result.node_types["_CubeBackward"].forms == {form: 1}


def test_compiled_graphs_are_counted():
    torch.manual_seed(0)
    model = SmallConvNet(width=8)
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    compiled = torch.compile(model, backend="aot_eager")
    with HookMeter(exclude=model) as meter:
        out = compiled(x)
    result = audit(out, model=model)
    assert result.total_bytes == meter.bytes > 0
    assert result.node_types["CompiledFunctionBackward"].bytes == result.total_bytes


def test_nothing_is_counted_once_backward_freed_the_graph():
    model = _model("small net prompt-tuned")
    out = model(torch.randn(2, 3, 32, 32))
    assert audit(out, model=model).total_bytes > 0
    out.sum().backward()
    assert audit(out, model=model).total_bytes == 0


def test_encodings_are_read_without_decoding():
    model = _model("small net prompt-tuned")
    with MemSaveMode():
        out = model(torch.randn(2, 3, 32, 32))
    forms = audit(out, model=model).node_types
    assert forms["ReluBackward0"].forms == {"1-bit mask": 2}
    assert forms["MaxPool2DWithIndicesBackward0"].forms == {"dropped": 2, "2-bit window offsets": 2}
    assert forms["ConvolutionBackward0"].forms["dropped"] == 2


def test_per_module_attribution():
    model = _model("resnet18 frozen, BN train")
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    with MemSaveMode(), track_modules(model):
        out = model(x)
    result = audit(out, model=model)
    modules = result.modules
    assert modules["ResNet"] == result.total_bytes  # everything ran inside the model
    children = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"]
    assert sum(modules.get(name, 0) for name in children) == result.total_bytes
    blocks = [name for name in modules if name.count(".") == 1 and name.startswith("layer1.")]
    assert sum(modules[name] for name in blocks) == modules["layer1"]
    assert modules["layer1.0.bn1"] > 0 and modules["maxpool"] > 0
    # the hooks are gone afterwards, and a forward outside the tracker is unlabelled
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert audit(model(x), model=model).modules is None


def test_report_renders_and_serialises():
    model = _model("small net prompt-tuned")
    with track_modules(model):
        out = model(torch.randn(2, 3, 32, 32))
    result = audit(out, model=model)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["total_bytes"] == result.total_bytes
    assert set(data["node_types"]) == set(result.node_types)
    text = str(result)
    assert "per autograd node type" in text and "per module" in text and "features" in text


@pytest.mark.parametrize("width", (80, 120))
def test_audit_tables_read_whole_in_an_ordinary_terminal(width):
    """Every node type, module name and number whole, on one line, at 80 and 120 columns."""
    model = _model("resnet18 frozen, BN train")
    with MemSaveMode(), track_modules(model):
        out = model(torch.randn(2, 3, 32, 32, requires_grad=True))
    result = audit(out, model=model)
    lines = render_text(result.table(depth=1), width=width).splitlines()
    assert max(len(line) for line in lines) <= width
    for name, row in result.node_types.items():
        found = next(line for line in lines if line.split() and line.split()[0] == name)
        for number in (str(row.nodes), str(row.changed_by_memsave), format_bytes(row.bytes)):
            assert number in found, f"{number!r} not whole in {found!r}"
    for module, nbytes in result.modules.items():
        if module.count(".") == 0:
            assert any(module in line and format_bytes(nbytes) in line for line in lines), module


def test_every_byte_of_an_encoder_belongs_to_a_module():
    """Attention's scores, softmax and mask add run in no submodule of their own but between
    two (the projections and the dropout): they belong to the attention module, not outside."""
    torch.manual_seed(0)
    model = bert_shaped(Config(vocab=50, d=16, heads=2, ff=32, layers=2))
    FINE_TUNING["bias"](model)
    ids = torch.randint(0, 50, (2, 8))
    with track_modules(model):
        out = model(ids)
    result = audit(out, model=model)
    assert "(outside any module)" not in result.modules
    attention = "bert.encoder.layer.0.attention.self"
    assert result.modules[attention] > result.modules.get(f"{attention}.dropout", 0)
