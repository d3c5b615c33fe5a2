"""The compiled engine against the Python engine, its reference.

One source of truth for what each operator keeps: for every operator the compiled engine runs
(compiled.RULES), over its configurations, both engines must leave every saved slot in the same
form holding the same bytes (encodings bit for bit), report the same, and give the same
outputs and gradients. Plus what only the compiled engine does: stock's own arguments outside
the mode, compiled autograd, the build and its fallback.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

from memsave_dispatch import MemSaveMode, compiled, extension, saved_tensor_bytes
from memsave_dispatch._compat import node_sequence_nr, read_saved_slot, saved_slot, saved_slot_names
from memsave_dispatch.meter import allocator_bytes
from memsave_dispatch.holders import NativeSlot, describe_holder, holder_of
from tests.engines import compiled_unavailable, use_engine
from tests.support import assert_bit_identical, seeded_randn

aten = torch.ops.aten
ROOT = Path(__file__).resolve().parent.parent


def _kept_slots(outputs) -> list[tuple]:
    """Every saved slot of the graph behind ``outputs``, in creation order: (node type, slot,
    form, what it keeps: dtype, shape, strides and bytes of each tensor, and the tensor)."""
    roots = [t.grad_fn for t in outputs if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    nodes, seen, stack = [], set(), roots
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes.append(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    found = []
    for node in sorted(nodes, key=node_sequence_nr):
        for name in saved_slot_names(node):
            value = saved_slot(node, name)
            for slot in value if isinstance(value, (list, tuple)) else (value,):
                unpack_hook, data = read_saved_slot(slot)
                holder = holder_of(node, name, unpack_hook)
                form, kept = describe_holder(holder) if holder is not None else ("as stock", () if data is None else (data,))
                tensors = [t for t in kept if isinstance(t, torch.Tensor)]
                found.append((type(node).__name__, name, form, [_described(t) for t in tensors], tensors))
    return found


def _described(tensor: torch.Tensor) -> tuple:
    return tensor.dtype, tuple(tensor.shape), tensor.stride(), tensor.untyped_storage().nbytes()


def _run(fn: Callable, inputs: dict, engine: str, monkeypatch) -> dict:
    use_engine(monkeypatch, engine)
    clones = {k: (v.detach().clone().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    clones = {k: (nn.Parameter(v, requires_grad=inputs[k].requires_grad) if isinstance(inputs[k], nn.Parameter) else v) for k, v in clones.items()}
    mode = MemSaveMode()
    assert mode.report().engine == engine
    with mode:
        torch.manual_seed(0)
        kept, outputs = saved_tensor_bytes(lambda: fn(**clones), exclude=[v for v in clones.values() if isinstance(v, nn.Parameter)])
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        slots = _kept_slots(outputs)
        differentiable = [o for o in outputs if isinstance(o, torch.Tensor) and o.requires_grad]
        torch.autograd.backward(differentiable, [torch.ones_like(o) for o in differentiable])
    report = mode.report().to_dict()
    report.pop("engine")
    grads = {k: v.grad for k, v in clones.items() if isinstance(v, torch.Tensor) and v.requires_grad}
    return {"kept": kept, "slots": slots, "report": report, "outputs": outputs, "grads": grads}


def _param(*shape, requires_grad=False, dtype=torch.float32):
    return nn.Parameter(seeded_randn(*shape, seed=3, dtype=dtype), requires_grad=requires_grad)


def _x(*shape, dtype=torch.float32, channels_last=False, requires_grad=True, specials=False):
    x = seeded_randn(*shape, seed=1, dtype=torch.float64)
    if specials:
        flat = x.view(-1)
        flat[:3] = torch.tensor([float("nan"), -0.0, float("inf")], dtype=torch.float64)
    x = x.to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x.requires_grad_(requires_grad)


def _then_mean(activation):
    """The activation, then a consumer that drops it: an unshared encoding is made."""
    return lambda x: activation(x).mean(-1)


CASES: dict[str, tuple[object, Callable, Callable[[], dict]]] = {}


def case(op, name, fn, inputs):
    CASES[f"{op}: {name}"] = (op, fn, inputs)


for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
    tag = str(dtype).removeprefix("torch.")
    case(aten.relu.default, f"returned, {tag}", lambda x: F.relu(x), lambda dtype=dtype: {"x": _x(2, 3, 4, 4, dtype=dtype, specials=True)})
    case(aten.relu.default, f"consumed, {tag}", _then_mean(F.relu), lambda dtype=dtype: {"x": _x(2, 3, 4, 4, dtype=dtype, specials=True)})
    case(aten.relu_.default, f"consumed, {tag}", _then_mean(lambda x: F.relu(x * 1, inplace=True)), lambda dtype=dtype: {"x": _x(2, 3, 4, 5, dtype=dtype)})
    case(aten.leaky_relu.default, f"consumed, {tag}", _then_mean(lambda x: F.leaky_relu(x * 1, 0.1)), lambda dtype=dtype: {"x": _x(2, 3, 4, 4, dtype=dtype, specials=True)})
    case(aten.leaky_relu_.default, f"consumed, {tag}", _then_mean(lambda x: F.leaky_relu(x * 1, 0.1, inplace=True)), lambda dtype=dtype: {"x": _x(2, 3, 4, 4, dtype=dtype)})
    case(aten.hardtanh.default, f"consumed, {tag}", _then_mean(lambda x: F.hardtanh(x * 1, -0.5, 0.5)), lambda dtype=dtype: {"x": _x(2, 3, 4, 4, dtype=dtype)})
    case(aten.hardtanh_.default, f"relu6 in place, {tag}", lambda x: F.relu6(x * 1, inplace=True), lambda dtype=dtype: {"x": _x(2, 3, 4, 4, dtype=dtype)})
    case(aten.threshold.default, f"consumed, {tag}", _then_mean(lambda x: F.threshold(x * 1, 0.1, 2.0)), lambda dtype=dtype: {"x": _x(2, 3, 4, 4, dtype=dtype)})
    case(aten.threshold_.default, f"in place, {tag}", lambda x: F.threshold(x * 1, -0.3, 2.0, inplace=True), lambda dtype=dtype: {"x": _x(2, 3, 4, 4, dtype=dtype)})
for layout in ("contiguous", "channels_last", "a strided view", "size-1 dimensions"):
    shapes = {"contiguous": (2, 3, 4, 4), "channels_last": (2, 3, 4, 4), "a strided view": (2, 3, 4, 8), "size-1 dimensions": (2, 1, 4, 1)}

    def _laid_out(layout=layout, shape=shapes[layout]):
        x = _x(*shape, channels_last=layout == "channels_last", requires_grad=False)
        if layout == "a strided view":
            x = x[..., ::2]
        return {"x": x.requires_grad_(True)}

    case(aten.relu.default, f"consumed, {layout}", _then_mean(lambda x: F.relu(x * 1)), _laid_out)
    case(aten.leaky_relu.default, f"its input consumed, {layout}", _then_mean(lambda x: F.leaky_relu(x * 1, 0.2)), _laid_out)
    case(aten.relu.default, f"on {layout}", _then_mean(F.relu), _laid_out)
case(aten.hardtanh.default, "input holding NaN", _then_mean(lambda x: F.hardtanh(x * 1, -0.5, 0.5)), lambda: {"x": _x(2, 3, 4, 4, specials=True)})
case(aten.threshold.default, "threshold at the largest float", _then_mean(lambda x: F.threshold(x * 1, 3.0e38, 0.0)), lambda: {"x": _x(2, 3, 4, 4)})
case(aten.relu.default, "kept by the caller and a square", lambda x: (F.relu(x), F.relu(x) ** 2), lambda: {"x": _x(2, 3, 4, 4)})

for need in ((True, False, False), (False, True, False), (True, True, True), (False, False, True)):
    tag = ["x", "w", "b"]
    label = "+".join(n for n, on in zip(tag, need) if on)
    case(aten.convolution.default, f"grad for {label}", lambda x, w, b: F.conv2d(x, w, b, padding=1), lambda need=need: {"x": _x(2, 3, 6, 6, requires_grad=need[0]), "w": _param(4, 3, 3, 3, requires_grad=need[1]), "b": _param(4, requires_grad=need[2])})
case(aten.convolution.default, "no bias, channels_last, stride 2", lambda x, w: F.conv2d(x, w, stride=2), lambda: {"x": _x(2, 3, 7, 7, channels_last=True), "w": _param(4, 3, 3, 3)})
case(aten.convolution.default, "weight an activation", lambda x, w: F.conv2d(x, w * 1), lambda: {"x": _x(2, 3, 6, 6, requires_grad=False), "w": _x(4, 3, 3, 3)})
case(aten.convolution.default, "transposed 1-d", lambda x, w: F.conv_transpose1d(x, w, stride=2), lambda: {"x": _x(2, 3, 6), "w": _param(3, 2, 3)})
case(aten.convolution.default, "3-d, bf16", lambda x, w: F.conv3d(x, w), lambda: {"x": _x(1, 2, 4, 4, 4, dtype=torch.bfloat16), "w": _param(2, 2, 2, 2, 2, dtype=torch.bfloat16)})

for p in (0.0, 0.3, 1.0):
    case(aten.dropout.default, f"p={p}", lambda x, p=p: F.dropout(x, p), lambda: {"x": _x(4, 5, 6)})
case(aten.dropout.default, "eval", lambda x: F.dropout(x, 0.5, training=False), lambda: {"x": _x(4, 5)})
case(aten.dropout_.default, "in place", lambda x: F.dropout(x * 1, 0.5, inplace=True), lambda: {"x": _x(4, 5, 6, dtype=torch.float64)})
case(aten.feature_dropout.default, "dropout2d", lambda x: F.dropout2d(x, 0.5), lambda: {"x": _x(2, 3, 4, 4, dtype=torch.bfloat16)})
case(aten.feature_dropout_.default, "dropout2d in place", lambda x: F.dropout2d(x * 1, 0.5, inplace=True), lambda: {"x": _x(2, 3, 4, 4)})
case(aten.native_dropout.default, "train, mask returned", lambda x: torch.native_dropout(x, 0.4, True), lambda: {"x": _x(3, 8)})
case(aten.native_dropout.default, "train, mask dropped", lambda x: torch.native_dropout(x, 0.4, True)[0], lambda: {"x": _x(3, 8)})

for need in ((True, False, True), (False, True, False), (True, True, True)):
    case(aten.addmm.default, f"linear, grads {need}", lambda x, w, b: F.linear(F.relu(x), w, b), lambda need=need: {"x": _x(3, 4, requires_grad=need[0]), "w": _param(5, 4, requires_grad=need[1]), "b": _param(5, requires_grad=need[2])})
    case(aten.mm.default, f"linear without bias, grads {need[:2]}", lambda x, w: F.linear(x, w), lambda need=need: {"x": _x(3, 4, requires_grad=need[0]), "w": _param(5, 4, requires_grad=need[1] or not need[0])})
# Where main's Python engine does more than the C++ rules, the compiled engine hands the call
# to it: an input a recipe rebuilds (GELU's output, kept by the linear layer and dropped once
# unshared), a LayerNorm (its handler notes epsilon for the recipe), an activation of a view
# (the Python engine waits for the view's base), an activation of a parameter (kept as is).
case(aten.addmm.default, "its input rebuilt from a GELU", lambda x, w, b: F.linear(F.gelu(x * 1), w, b).mean(-1), lambda: {"x": _x(3, 4), "w": _param(5, 4, requires_grad=True), "b": _param(5)})
case(aten.mm.default, "its input rebuilt from a LayerNorm", lambda x, w: F.linear(F.layer_norm(x * 1, (4,)), w).mean(-1), lambda: {"x": _x(3, 4), "w": _param(5, 4, requires_grad=True)})
case(aten.leaky_relu.default, "of a view, consumed", lambda x: F.leaky_relu((x * 1)[:, :2], 0.1).mean(-1), lambda: {"x": _x(2, 3, 4, 4)})
case(aten.hardtanh.default, "of a parameter", lambda w: F.hardtanh(w, -0.5, 0.5) * 2, lambda: {"w": _param(4, 4, requires_grad=True)})
# Calls that keep no input as it is take an input a recipe could rebuild on the compiled engine
# (a residual block's ReLU in place after its sum); dropout's goes to the Python engine, whose
# encoding of the noise lets a recipe rebuild the dropped-out output.
case(aten.relu_.default, "of a residual sum", lambda x, y: F.relu((x * 2).add_(y), inplace=True).mean(-1), lambda: {"x": _x(2, 3, 4, 4), "y": _x(2, 3, 4, 4)})
case(aten.relu.default, "of a sum", lambda x, y: F.relu(x + y).mean(-1), lambda: {"x": _x(2, 3, 4, 4), "y": _x(2, 3, 4, 4)})
case(aten.max_pool2d_with_indices.default, "of a sum", lambda x, y: F.max_pool2d(x + y, 2), lambda: {"x": _x(2, 3, 6, 6), "y": _x(2, 3, 6, 6)})
case(aten.convolution.default, "frozen, of a product (a recipe)", lambda x, s, w: F.conv2d(x * s, w), lambda: {"x": _x(2, 3, 6, 6), "s": _x(2, 3, 1, 1), "w": _param(4, 3, 3, 3)})
case(aten.convolution.default, "trained, of a product (a recipe)", lambda x, s, w: F.conv2d(x * s, w).mean(-1), lambda: {"x": _x(2, 3, 6, 6), "s": _x(2, 3, 1, 1), "w": _param(4, 3, 3, 3, requires_grad=True)})
case(aten.native_batch_norm.default, "eval, frozen, of a sum (a recipe)", lambda x, y, rm, rv: F.batch_norm(x + y, rm, rv).mean(-1), lambda: {"x": _x(3, 4, 5, 5), "y": _x(3, 4, 5, 5), "rm": torch.zeros(4), "rv": torch.ones(4)})
case(aten.dropout.default, "of a GELU, consumed by a linear layer", lambda x, w: F.linear(F.dropout(F.gelu(x * 1), 0.3), w).mean(-1), lambda: {"x": _x(3, 4), "w": _param(5, 4, requires_grad=True)})

for training in (False, True):
    for affine in ((False, False), (True, False), (False, True)):
        def _bn(x, w, b, rm, rv, training=training):
            return F.batch_norm(x, rm, rv, w, b, training=training)

        case(aten.native_batch_norm.default, f"train={training}, grads w/b {affine}", _bn, lambda affine=affine: {"x": _x(3, 4, 5, 5), "w": _param(4, requires_grad=affine[0]), "b": _param(4, requires_grad=affine[1]), "rm": torch.zeros(4), "rv": torch.ones(4)})
case(aten.native_batch_norm.default, "channels_last, frozen", lambda x, rm, rv: F.batch_norm(x, rm, rv, training=True), lambda: {"x": _x(3, 4, 5, 5, channels_last=True), "rm": torch.zeros(4), "rv": torch.ones(4)})
for grads in ((True, False, False), (False, False, True), (False, True, False)):
    case(aten.native_layer_norm.default, f"grads {grads}", lambda x, w, b: F.layer_norm(x, (6,), w, b), lambda grads=grads: {"x": _x(3, 4, 6, requires_grad=grads[0]), "w": _param(6, requires_grad=grads[1]), "b": _param(6, requires_grad=grads[2])})
    case(aten.native_group_norm.default, f"grads {grads}", lambda x, w, b: F.group_norm(x, 2, w, b), lambda grads=grads: {"x": _x(3, 4, 5, 5, requires_grad=grads[0]), "w": _param(4, requires_grad=grads[1]), "b": _param(4, requires_grad=grads[2])})

for return_indices in (False, True):
    tag = "indices returned" if return_indices else "indices dropped"
    case(aten.max_pool2d_with_indices.default, f"2x2, {tag}", lambda x, r=return_indices: F.max_pool2d(x, 2, return_indices=r), lambda: {"x": _x(2, 3, 7, 7)})
    case(aten.max_pool2d_with_indices.default, f"3x3 s2 p1 channels_last, {tag}", lambda x, r=return_indices: F.max_pool2d(x, 3, 2, 1, return_indices=r), lambda: {"x": _x(2, 3, 9, 9, channels_last=True)})
    case(aten.max_pool2d_with_indices.default, f"1-d, {tag}", lambda x, r=return_indices: F.max_pool1d(x, 3, 2, 1, dilation=2, return_indices=r), lambda: {"x": _x(2, 3, 11)})
    case(aten.max_pool3d_with_indices.default, f"3-d, {tag}", lambda x, r=return_indices: F.max_pool3d(x, 2, return_indices=r), lambda: {"x": _x(1, 2, 5, 5, 5, dtype=torch.float64)})
    case(aten.adaptive_max_pool2d.default, f"adaptive 2-d, {tag}", lambda x, r=return_indices: F.adaptive_max_pool2d(x, 3, return_indices=r), lambda: {"x": _x(2, 3, 8, 7, dtype=torch.bfloat16)})
    case(aten.adaptive_max_pool2d.default, f"adaptive 1-d, {tag}", lambda x, r=return_indices: F.adaptive_max_pool1d(x, 4, return_indices=r), lambda: {"x": _x(2, 3, 9)})
    case(aten.adaptive_max_pool3d.default, f"adaptive 3-d, {tag}", lambda x, r=return_indices: F.adaptive_max_pool3d(x, 2, return_indices=r), lambda: {"x": _x(1, 2, 5, 4, 5)})
case(aten.max_pool2d_with_indices.default, "called as an aten operator", lambda x: aten.max_pool2d_with_indices.default(x, [2, 2])[0], lambda: {"x": _x(2, 3, 6, 6)})
case(aten.max_pool2d_with_indices.default, "a window too big for offsets", lambda x: F.max_pool2d(x, 16, 1), lambda: {"x": _x(1, 2, 17, 17)})
# More outputs than one parallel task encodes (a task starts inside a plane, and mid-byte of
# none): row-major, channels_last, two-bit and byte offsets.
case(aten.max_pool2d_with_indices.default, "2x2 over tasks", lambda x: F.max_pool2d(x, 2), lambda: {"x": _x(2, 17, 70, 70)})
case(aten.max_pool2d_with_indices.default, "3x3 s2 over tasks, channels_last", lambda x: F.max_pool2d(x, 3, 2, 1), lambda: {"x": _x(2, 17, 139, 139, channels_last=True)})
case(aten.max_pool2d_with_indices.default, "3x3 s1 over tasks", lambda x: F.max_pool2d(x, 3, 1), lambda: {"x": _x(1, 9, 63, 63)})
case(aten.avg_pool2d.default, "avg 2-d", lambda x: F.avg_pool2d(x, 3, 2, 1, ceil_mode=True), lambda: {"x": _x(2, 3, 7, 7, channels_last=True)})
case(aten.avg_pool3d.default, "avg 3-d", lambda x: F.avg_pool3d(x, 2), lambda: {"x": _x(1, 2, 4, 4, 4)})
case(aten._adaptive_avg_pool2d.default, "adaptive avg 2-d", lambda x: F.adaptive_avg_pool2d(x, 2), lambda: {"x": _x(2, 3, 5, 5)})
case(aten._adaptive_avg_pool3d.default, "adaptive avg 3-d", lambda x: F.adaptive_avg_pool3d(x, 2), lambda: {"x": _x(1, 2, 4, 5, 4, dtype=torch.float64)})


def test_every_operator_of_the_compiled_engine_has_cases():
    covered = {op for op, _fn, _inputs in CASES.values()}
    assert covered == set(compiled.RULES), sorted(map(str, set(compiled.RULES) - covered))


@pytest.mark.parametrize("name", sorted(CASES))
def test_both_engines_keep_the_same(name, monkeypatch):
    """What the C++ rule keeps is what the Python handler decides: slot by slot, the same form
    and the same kept tensors (encodings bit for bit), the same bytes and report, the same
    outputs and gradients."""
    why = compiled_unavailable()
    if why is not None:
        pytest.skip(why)
    op, fn, inputs = CASES[name]
    made = inputs()
    python = _run(fn, made, "python", monkeypatch)
    native = _run(fn, made, "compiled", monkeypatch)
    assert [slot[:4] for slot in native["slots"]] == [slot[:4] for slot in python["slots"]]
    for (node, slot, form, _described_, ours), (*_, theirs) in zip(native["slots"], python["slots"]):
        if form != "as stock":
            for a, b in zip(ours, theirs):
                assert_bit_identical(a, b, f"{node}.{slot} ({form})")
    assert native["kept"] == python["kept"]
    assert native["report"] == python["report"]
    assert any(line["op"] == str(op) for line in native["report"]["ops"]), "the case never reached its operator"
    for a, b in zip(native["outputs"], python["outputs"]):
        if isinstance(a, torch.Tensor):
            assert_bit_identical(a, b, "output")
    for key in python["grads"]:
        assert_bit_identical(native["grads"][key], python["grads"][key], f"grad of {key}")


#: A 1-d max pooling hands its caller a view of the indices; when the caller lets go of the view
#: before backward, the compiled engine encodes the indices (the Python engine counts the dying
#: view as another holder and keeps them): its backward then decodes, a few bytes above.
PEAKS_DIFFER = {
    "aten.max_pool2d_with_indices.default: 1-d, indices returned",
    "aten.adaptive_max_pool2d.default: adaptive 1-d, indices returned",
}
#: Where the forward pass sets the peak (the pooled sum still alive), the Python engine's window
#: offsets, made from int64 temporaries, peak above the compiled engine's single pass. And a
#: float32/float64 ReLU mask: the compiled engine's threshold_backward reads its bits in place,
#: where the Python engine decodes them into a tensor of the output's size first.
PEAKS_LOWER_COMPILED = {
    "aten.max_pool2d_with_indices.default: of a sum",
    # max_pool2d's backward reads the window offsets in place: no int64 indices decoded
    "aten.max_pool2d_with_indices.default: 1-d, indices dropped",
    "aten.max_pool2d_with_indices.default: 2x2 over tasks",
    "aten.max_pool2d_with_indices.default: 2x2, indices dropped",
    "aten.max_pool2d_with_indices.default: 2x2, indices returned",
    "aten.max_pool2d_with_indices.default: 3x3 s1 over tasks",
    "aten.max_pool2d_with_indices.default: called as an aten operator",
    "aten.addmm.default: linear, grads (True, False, True)",
    "aten.relu.default: consumed, a strided view",
    "aten.relu.default: consumed, channels_last",
    "aten.relu.default: consumed, contiguous",
    "aten.relu.default: consumed, float32",
    "aten.relu.default: consumed, float64",
    "aten.relu.default: consumed, size-1 dimensions",
    "aten.relu.default: of a sum",
    "aten.relu.default: on a strided view",
    "aten.relu.default: on channels_last",
    "aten.relu.default: on contiguous",
    "aten.relu.default: on size-1 dimensions",
    "aten.relu_.default: consumed, float32",
    "aten.relu_.default: consumed, float64",
    "aten.relu_.default: of a residual sum",
}


@pytest.mark.parametrize("name", sorted(set(CASES) - PEAKS_DIFFER))
def test_both_engines_peak_alike(name, monkeypatch):
    """The whole call's allocator peak, forward and backward, is the same on both engines (or
    lower on the compiled one, where the Python engine's encoding makes temporaries or the
    compiled backward reads an encoding in place)."""
    why = compiled_unavailable()
    if why is not None:
        pytest.skip(why)
    _op, fn, inputs = CASES[name]
    made = inputs()
    peaks = {}
    for engine in ("python", "compiled"):
        use_engine(monkeypatch, engine)
        mode = MemSaveMode()
        x = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in made.items()}

        def step(mode=mode, x=x):
            with mode:
                torch.manual_seed(0)
                outputs = fn(**x)
                outputs = [o for o in (outputs if isinstance(outputs, tuple) else (outputs,)) if o.requires_grad]
                torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])

        step()  # warm caches (windows, tables) on both engines
        peaks[engine] = allocator_bytes(step).peak
    if name in PEAKS_LOWER_COMPILED:
        assert peaks["compiled"] < peaks["python"]
    else:
        assert peaks["compiled"] == peaks["python"]


def test_encodings_run_on_torchs_threads():
    """ATen's parallel_for is a header template: an extension not compiled with torch's OpenMP
    runs every encoding in one thread, whatever torch.set_num_threads says."""
    why = compiled_unavailable()
    if why is not None:
        pytest.skip(why)
    if not torch.backends.openmp.is_available() or not sys.platform.startswith("linux"):
        pytest.skip("the extension is compiled with OpenMP on Linux, where torch is")
    threads = torch.get_num_threads()
    try:
        for wanted in (2, 1, 3):  # the extension's OpenMP runtime is torch's: it follows set_num_threads
            torch.set_num_threads(wanted)
            assert extension.load().encoding_threads_allowed() == wanted
            assert extension.load().encoding_threads() == wanted
    finally:
        torch.set_num_threads(threads)


# -- what only the compiled engine does ------------------------------------------------------
@pytest.fixture
def compiled_engine(monkeypatch):
    use_engine(monkeypatch, "compiled")


def test_outside_the_mode_stock_gets_its_own_arguments(compiled_engine, each_engine):
    """D8: outside the mode, stock's kernel receives exactly its arguments: a bias-less
    convolution records its absent bias as stock does (sizes (0,)), not as None."""
    if each_engine == "python":
        pytest.skip("the Python engine's kernel cannot tell an undefined optional tensor from None: it records None")
    x = torch.randn(1, 3, 8, 8, requires_grad=True)
    w = torch.randn(4, 3, 3, 3)
    with MemSaveMode():
        pass  # installs the kernels
    out = F.conv2d(x, w)
    assert out.grad_fn._saved_bias_sym_sizes_opt == (0,)
    with MemSaveMode():
        inside = F.conv2d(x, w)
    assert inside.grad_fn._saved_bias_sym_sizes_opt == (0,)


@pytest.mark.parametrize("when", ["forward and backward", "backward only"])
def test_compiled_autograd_runs_and_matches_stock(compiled_engine, when):
    """Compiled autograd cannot run C++ saved-tensor hooks: while it is on, the compiled engine
    hands calls to the Python engine; a forward that ran before it was switched on is unpacked
    through the slots' Python view."""
    from torch._dynamo import compiled_autograd

    torch._dynamo.reset()
    w = torch.randn(4, 3, 3, 3)

    def loss(x):
        return F.max_pool2d(F.relu(F.conv2d(x, w)), 2).sum()

    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    (expected,) = torch.autograd.grad(loss(x), x)
    x.grad = None

    def compiler(graph):
        return torch.compile(graph, backend="eager")

    with MemSaveMode() as mode:
        if when == "forward and backward":
            with compiled_autograd._enable(compiler):
                loss(x).backward()
        else:
            out = loss(x)
            with compiled_autograd._enable(compiler):
                out.backward()
    assert_bit_identical(x.grad, expected, "gradient")
    report = mode.report()
    assert report.engine == "compiled" and report.handled == 3
    torch._dynamo.reset()


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-W", "default", "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


_TWO_MODES = """
    import torch
    from memsave_dispatch import MemSaveMode
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    for _ in range(2):
        with MemSaveMode() as mode:
            torch.nn.functional.relu(x).sum().backward()
    print("engine:", mode.report().engine)
"""


def test_without_a_compiler_one_warning_and_the_python_engine(tmp_path):
    done = _python(_TWO_MODES, CXX="/nonexistent", TORCH_EXTENSIONS_DIR=str(tmp_path), MEMSAVE_DISPATCH_ENGINE="auto")
    assert done.returncode == 0, done.stderr
    assert "engine: python" in done.stdout
    assert done.stderr.count("RuntimeWarning: memsave-dispatch: the compiled engine is unavailable") == 1, done.stderr


@pytest.mark.parametrize("serial_builds", [True, False])
def test_a_toolchain_without_openmp_builds_the_engine_without_it(tmp_path, monkeypatch, serial_builds):
    """Where the build with OpenMP fails and the one without works, the engine runs serial, and
    later loads go straight to that build; where both fail (no compiler), OpenMP is tried again
    next time."""
    attempts = []

    def build(openmp, directory, digest, name):
        attempts.append("openmp" if openmp else "serial")
        directory.mkdir(parents=True, exist_ok=True)
        if openmp or not serial_builds:
            raise extension._Unavailable("building it failed")
        return name

    monkeypatch.setattr(extension, "_OPENMP_FLAGS", ("-fopenmp",))
    monkeypatch.setattr(extension, "_build", build)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    for _ in range(2):
        if serial_builds:
            assert extension._build_and_import() == "memsave_dispatch_engine_serial"
        else:
            with pytest.raises(extension._Unavailable):
                extension._build_and_import()
    assert attempts == (["openmp", "serial", "serial"] if serial_builds else ["openmp", "serial"] * 2)


def test_the_python_engine_on_request_builds_nothing(tmp_path):
    done = _python(_TWO_MODES, MEMSAVE_DISPATCH_ENGINE="python", TORCH_EXTENSIONS_DIR=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "engine: python" in done.stdout and "Warning" not in done.stderr
    assert not any(tmp_path.iterdir())


def test_an_unknown_engine_is_refused():
    done = _python("from memsave_dispatch import MemSaveMode; MemSaveMode()", MEMSAVE_DISPATCH_ENGINE="fast")
    assert done.returncode != 0 and "MEMSAVE_DISPATCH_ENGINE='fast'; use one of auto, compiled, python" in done.stderr


def test_the_sources_ship_with_the_package():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["package-data"]["memsave_dispatch"]
    sources = sorted(p.relative_to(ROOT / "memsave_dispatch") for p in (ROOT / "memsave_dispatch" / "csrc").iterdir())
    assert sources and all(any(path.match(pattern) for pattern in patterns) for path in sources), (sources, patterns)


@pytest.mark.parametrize(
    ("activation", "native"),
    [(lambda t: F.relu(t, inplace=True), True), (F.relu, True), (lambda t: F.max_pool2d(t, 2), True),
     (lambda t: F.conv2d(t, _param(4, 3, 3, 3)), True), (lambda t: F.dropout(t, 0.3), False)],
    ids=["relu_", "relu", "max_pool2d", "frozen conv2d", "dropout"],
)
def test_an_input_with_a_recipe_leaves_calls_that_keep_no_input_compiled(compiled_engine, activation, native):
    """A residual block's ReLU (its input a sum, which has a recipe) runs on the compiled
    engine, as does a frozen convolution of it: no rebuild can start at a call that keeps no
    input as it is. Dropout goes to the Python engine, whose encoding of the noise a later
    rebuild reads."""
    x, y = _x(2, 3, 4, 4), _x(2, 3, 4, 4)
    with MemSaveMode():
        torch.manual_seed(0)
        hidden = activation(x * 2 + y)
        node, loss = hidden.grad_fn, hidden.sum()
        del hidden  # unshared: encoded now
        holders = {name: holder_of(node, name, read_saved_slot(saved_slot(node, name))[0]) for name in saved_slot_names(node)}
        assert any(holders.values()), holders
        assert all(isinstance(holder, NativeSlot) == native for holder in holders.values() if holder is not None), holders
        loss.backward()


def _relu_gradients(x: torch.Tensor, grad: torch.Tensor, *, create_graph: bool = False, before_backward=None):
    """d(relu(x * 1))/dx against ``grad`` (relu's output unshared: its mask is what backward gets)."""
    y = F.relu(x * 1).mul(1.5)
    if before_backward is not None:
        before_backward()
    (dx,) = torch.autograd.grad(y, x, grad, create_graph=create_graph)
    if create_graph:
        (ddx,) = torch.autograd.grad(dx.square().sum(), x)  # through threshold_backward's own backward
        return dx, ddx
    return (dx,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "a strided view"])
@pytest.mark.parametrize("create_graph", [False, True], ids=["backward", "double backward"])
def test_relu_backward_reads_the_mask_in_place_like_stock(compiled_engine, dtype, layout, create_graph):
    """ReLU's backward reads the kept bits directly (no decoded tensor): the gradient is stock's
    bit for bit (NaN and -0.0 in the input, NaN in the incoming gradient) and laid out as stock
    lays it out, through double backward too."""
    x = _x(2, 3, 5, 8 if layout == "a strided view" else 4, dtype=dtype, specials=True, requires_grad=False,
           channels_last=layout == "channels_last")
    if layout == "a strided view":
        x = x[..., ::2]
    x.requires_grad_(True)
    grad = seeded_randn(*x.shape, seed=5, dtype=dtype)
    grad.view(-1)[4] = float("nan")
    stock = _relu_gradients(x, grad, create_graph=create_graph)
    with MemSaveMode() as mode:
        ours = _relu_gradients(x, grad, create_graph=create_graph)
    assert mode.report()["relu"].encodings == {"1-bit mask": 1}
    for a, b in zip(ours, stock):
        assert_bit_identical(a, b, "gradient")
        assert a.stride() == b.stride()


def _max_pool_gradients(x: torch.Tensor, grad: torch.Tensor, pool, *, create_graph: bool = False,
                        before_backward=None, backwards: int = 1):
    """d(pool(x * 1))/dx against ``grad`` (the indices dropped: their offsets are what backward
    gets), ``backwards`` times over the same graph; with ``create_graph``, also the gradient of
    |dx|^2 with respect to ``grad`` (max_pool_double_backward, which reads the indices)."""
    y = pool(x * 1)
    if before_backward is not None:
        before_backward()
    grads = []
    for _ in range(backwards):
        if create_graph:
            grad = grad.detach().requires_grad_(True)
        (dx,) = torch.autograd.grad(y, x, grad, create_graph=create_graph, retain_graph=True)
        grads.append(dx)
        if create_graph:
            grads.extend(torch.autograd.grad(dx.square().sum(), (x, grad), allow_unused=True, materialize_grads=True))
    return grads


POOLS = {
    "2x2": lambda t: F.max_pool2d(t, 2),
    "3x3 stride 1 (overlapping)": lambda t: F.max_pool2d(t, 3, stride=1, padding=1),
    "3x3 stride 2, dilated, ceil": lambda t: F.max_pool2d(t, 3, stride=2, dilation=2, ceil_mode=True),
    "1-d": lambda t: F.max_pool1d(t.flatten(-2), 4),
}

GRAD_LAYOUTS = {
    "contiguous": lambda g: g,
    "a transposed view": lambda g: g.transpose(-1, -2).contiguous().transpose(-1, -2),
    "channels_last": lambda g: g.contiguous(memory_format=torch.channels_last) if g.dim() == 4 else g,
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "no batch"])
@pytest.mark.parametrize("pool", list(POOLS))
@pytest.mark.parametrize("grad_layout", list(GRAD_LAYOUTS))
@pytest.mark.parametrize("create_graph", [False, True], ids=["backward", "double backward"])
def test_max_pool_backward_reads_the_offsets_in_place_like_stock(compiled_engine, dtype, layout, pool, grad_layout,
                                                                 create_graph):
    """max_pool2d's backward adds each output's gradient where its window offset points, without
    decoding the indices (float and double, row-major): stock's gradient bit for bit (NaN, -0.0
    and ties in the input, NaN in the incoming gradient, overlapping windows, any layout of the
    incoming gradient), laid out as stock lays it out; other dtypes and layouts, and double
    backward, get the decoded indices. (That the offsets are read in place, not decoded:
    test_both_engines_peak_alike, where such calls peak lower than on the Python engine.)"""
    shape = (3, 7, 9) if layout == "no batch" else (2, 3, 7, 9)
    x = _x(*shape, dtype=dtype, specials=True, requires_grad=False)
    x.view(-1)[5:9] = 0.5  # ties within a window
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    with torch.no_grad():
        out_shape = POOLS[pool](x).shape
    grad = seeded_randn(*out_shape, seed=5, dtype=dtype)
    grad.view(-1)[2] = float("nan")
    grad = GRAD_LAYOUTS[grad_layout](grad)
    stock = _max_pool_gradients(x, grad, POOLS[pool], create_graph=create_graph)
    with MemSaveMode() as mode:
        ours = _max_pool_gradients(x, grad, POOLS[pool], create_graph=create_graph)
    assert any(label.endswith("window offsets") for label in mode.report()["max_pool2d_with_indices"].encodings)
    assert len(ours) == len(stock)
    for a, b in zip(ours, stock):
        assert_bit_identical(a, b, "gradient")
        assert a.stride() == b.stride()


TILE_SHAPES = [(1, 1, 2, 2), (2, 3, 16, 16), (1, 2, 17, 33), (3, 1, 4, 18), (2, 2, 9, 35), (1, 1, 3, 300)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,ceil_mode", [(shape, False) for shape in TILE_SHAPES]
                         + [(shape, True) for shape in TILE_SHAPES if shape[-1] % 2 or shape[-2] % 2])
def test_max_pool_2x2_tiles_write_each_gradient_once_like_stock(compiled_engine, dtype, shape, ceil_mode):
    """2x2 windows with stride 2 tile the input: the backward writes each element once, +0 plus
    the gradient its offset points to, or +0 (eight outputs at a time where a row has them, rows
    starting mid-byte of the bit planes; an odd last row and column stay +0). Ceil mode's
    partial windows on an odd size are no tiles: those calls add, as before. Stock's gradient
    bit for bit: -0.0 in the incoming gradient becomes +0 as stock's addition to +0 makes it,
    NaN and infinities pass."""
    x = _x(*shape, dtype=dtype, specials=True, requires_grad=False)
    x.view(-1)[5:9] = 0.5  # ties within a window
    x.requires_grad_(True)
    pool = lambda t: F.max_pool2d(t, 2, ceil_mode=ceil_mode)
    with torch.no_grad():
        out_shape = pool(x).shape
    grad = seeded_randn(*out_shape, seed=5, dtype=dtype)
    grad.view(-1)[::3] = -0.0
    grad.view(-1)[1::11] = float("nan")
    grad.view(-1)[2::13] = float("-inf")
    stock = _max_pool_gradients(x, grad, pool)
    tiled_before = extension.load().tile_scatters()
    with MemSaveMode() as mode:
        ours = _max_pool_gradients(x, grad, pool)
    assert "2-bit window offsets" in mode.report()["max_pool2d_with_indices"].encodings
    assert extension.load().tile_scatters() - tiled_before == (0 if ceil_mode else 1)
    assert_bit_identical(ours[0], stock[0], "gradient")


def _nan(payload: int, dtype: torch.dtype, *, quiet: bool = True) -> torch.Tensor:
    """A NaN with its own payload, to tell NaNs apart by their bits (quiet, or signalling:
    arithmetic would quiet it, a copy keeps it)."""
    if dtype == torch.float64:
        return torch.tensor([(0x7FF8000000000000 if quiet else 0x7FF0000000000000) | payload]).view(torch.float64)
    return torch.tensor([(0x7FC00000 if quiet else 0x7F800000) | payload], dtype=torch.int32).view(torch.float32)


def _with_special_tiles(x: torch.Tensor) -> torch.Tensor:
    """x with its first 2x2 tiles (row-major over planes and rows of tiles: the first outputs)
    set to the cases stock's loop decides: all -inf, two NaNs (the last wins), -0.0 before +0.0
    (the first of a tie wins), four ties, a NaN before a larger value, -inf up to the last, a
    signalling NaN first."""
    nan_a, nan_b, nan_c, signalling = _nan(1, x.dtype), _nan(2, x.dtype), _nan(3, x.dtype), _nan(4, x.dtype, quiet=False)
    inf = float("inf")
    patterns = [[-inf, -inf, -inf, -inf], [nan_a, 1.0, nan_b, 2.0], [-0.0, 0.0, -1.0, -2.0], [0.5, 0.5, 0.5, 0.5],
                [1.0, nan_c, 3.0, 2.0], [-inf, -inf, -inf, 1.0], [0.0, -0.0, 0.0, -0.0], [signalling, 1.0, 2.0, 3.0]]
    planes = x.detach().view(-1, x.shape[-2], x.shape[-1])
    tiles = [(p, r, c) for p in range(planes.shape[0]) for r in range(planes.shape[1] // 2) for c in range(planes.shape[2] // 2)]
    for (p, r, c), values in zip(tiles, patterns):
        for k, value in enumerate(values):  # (NaNs as tensors: a Python float would not keep their bits)
            planes[p, 2 * r + k // 2, 2 * c + k % 2] = value[0] if isinstance(value, torch.Tensor) else value
    return x


def _between_nans(t: torch.Tensor) -> torch.Tensor:
    """t as a contiguous view into a buffer of NaNs on either side: a kernel reading one element
    past the tensor, or before it, takes a NaN for its maximum."""
    nans = torch.full((32,), float("nan"), dtype=t.dtype)
    return torch.cat([nans, t.flatten(), nans])[32:32 + t.numel()].view(t.shape)


ONE_PASS_SHAPES = [*TILE_SHAPES, (3, 6, 8), (2, 5, 8, 19), (2, 17, 70, 70)]  # the last over several tasks
WINDOW_SHAPES = [(2, 3, 16, 16), (1, 2, 17, 33), (3, 9, 35), (1, 3, 64, 64), (2, 17, 70, 70), (1, 2, 5, 19)]
# F.max_pool2d's arguments, and the shapes to pool: 2x2 tiles keep two bit planes, windows of
# more than four positions a byte each (eight outputs at a time with AVX2 at stride 2 along rows)
ONE_PASS_POOLS = {
    "2x2": (dict(kernel_size=2), ONE_PASS_SHAPES),
    "3x3 stride 2 padding 1 (ResNet's)": (dict(kernel_size=3, stride=2, padding=1), WINDOW_SHAPES),
    "3x3 stride 1 padding 1": (dict(kernel_size=3, stride=1, padding=1), WINDOW_SHAPES),
    "3x5 stride (1, 2) padding (1, 2) dilation (2, 1)": (
        dict(kernel_size=(3, 5), stride=(1, 2), padding=(1, 2), dilation=(2, 1)), WINDOW_SHAPES),
    "1x5 stride 2 padding 2": (dict(kernel_size=(1, 5), stride=2, padding=(0, 2)), WINDOW_SHAPES),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pool,shape,ceil_mode", [(pool, shape, ceil_mode) for pool, (_, shapes) in ONE_PASS_POOLS.items()
                                                  for shape in shapes for ceil_mode in (False, True)])
def test_max_pool_forward_in_one_pass_like_stock(compiled_engine, dtype, pool, shape, ceil_mode):
    """Where the caller drops the indices (F.max_pool2d), the CPU kernel finds each window's
    maximum and its window offset in one pass, with no int64 indices: stock's output bit for bit
    and laid out as stock's (the first of tied values, the last NaN by its payload, an all -inf
    window, -0.0 against +0.0, windows clipped by padding and ceil mode), stock's indices once
    decoded, and stock's gradient. 2x2 windows in ceil mode on an odd size are partly outside
    the input: no tiles, and too few positions for a byte each, so stock's kernel runs."""
    kwargs, _ = ONE_PASS_POOLS[pool]
    x = _with_special_tiles(_x(*shape, dtype=dtype, specials=True, requires_grad=False))
    x.view(-1, *shape[-2:])[-1, :3] = float("-inf")  # whole windows of -inf, some clipped by the padding
    x.requires_grad_(True)
    pool_fn = lambda t: F.max_pool2d(t, ceil_mode=ceil_mode, **kwargs)
    with torch.no_grad():
        out_shape = pool_fn(x).shape
    grad = seeded_randn(*out_shape, seed=5, dtype=dtype)
    grad.view(-1)[8::3] = -0.0  # (not on the special tiles: their gradients tell where the offsets point)

    def forward_and_backward():
        y = pool_fn(_between_nans(x * 1))
        indices = y.grad_fn._saved_result1  # the offsets, decoded for Python code under the mode
        (dx,) = torch.autograd.grad(y, x, grad)
        return y.detach(), indices, dx

    stock = forward_and_backward()
    one_pass_before = extension.load().one_pass_poolings()
    with MemSaveMode() as mode:
        ours = forward_and_backward()
    two_bits = pool == "2x2"
    partial = two_bits and ceil_mode and (shape[-1] % 2 or shape[-2] % 2)
    assert extension.load().one_pass_poolings() - one_pass_before == (0 if partial else 1)
    label = "2-bit window offsets" if two_bits else "uint8 window offsets"
    assert label in mode.report()["max_pool2d_with_indices"].encodings
    for a, b, what in zip(ours, stock, ["output", "indices", "gradient"]):
        assert_bit_identical(a, b, what)


def _dual_max_pool(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """F.max_pool2d on a dual tensor: stock computes the forward gradient from the indices."""
    with fwAD.dual_level():
        primal, tangent = fwAD.unpack_dual(F.max_pool2d(fwAD.make_dual(x * 1, seeded_randn(*x.shape, seed=7)), 2))
        return primal.detach(), tangent


NOT_ONE_PASS = {
    "the caller gets the indices": lambda x: F.max_pool2d(x, 2, return_indices=True),
    "called as an aten operator": lambda x: aten.max_pool2d_with_indices.default(x, [2, 2]),
    "channels_last": lambda x: F.max_pool2d(x.contiguous(memory_format=torch.channels_last), 2),
    "a transposed view": lambda x: F.max_pool2d(x.transpose(-1, -2), 2),
    "bfloat16": lambda x: F.max_pool2d(x.to(torch.bfloat16), 2),
    "2x2 stride 1 (no tiles, four positions)": lambda x: F.max_pool2d(x, 2, stride=1),
    "2x2 padding 1": lambda x: F.max_pool2d(x, 2, padding=1),
    "2x2 dilation 2": lambda x: F.max_pool2d(x, 2, dilation=2),
    "a window too big for offsets (256 positions)": lambda x: F.max_pool2d(x.repeat(1, 1, 3, 2)[..., :17, :17], 16, 1),
    "1-d, two positions": lambda x: F.max_pool1d(x.flatten(-2), 2),
    "batch 0": lambda x: F.max_pool2d(x[:0], 2),
    "a forward-mode gradient": _dual_max_pool,
}


@pytest.mark.parametrize("call", NOT_ONE_PASS)
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # stock's forward-mode max pooling
def test_max_pool_one_pass_only_where_nothing_reads_the_indices(compiled_engine, call):
    """Anywhere the indices reach the caller or stock's own formulas (the caller asked for
    them, forward mode gathers the gradient with them), or the layout is not a contiguous float
    tensor, or the windows have four positions or fewer without tiling the input, or too many
    for a byte, stock's kernel runs: every output, indices included, is stock's."""
    x = _with_special_tiles(_x(2, 3, 8, 10, specials=True, requires_grad=False)).requires_grad_(True)
    stock = NOT_ONE_PASS[call](x)
    one_pass_before = extension.load().one_pass_poolings()
    with MemSaveMode():
        ours = NOT_ONE_PASS[call](x)
    assert extension.load().one_pass_poolings() == one_pass_before
    stock, ours = (r if isinstance(r, tuple) else (r,) for r in (stock, ours))
    for a, b in zip(ours, stock, strict=True):
        assert_bit_identical(a, b, "output")


STOCK_ERRORS = {
    "an input too small (height)": ((2, 3, 1, 8), dict(kernel_size=2)),
    "an input too small (width)": ((2, 3, 8, 1), dict(kernel_size=2)),
    "padding past half the window": ((2, 3, 8, 8), dict(kernel_size=3, padding=2)),
    "stride 0": ((2, 3, 8, 8), dict(kernel_size=3, stride=0)),
    "a stride past int": ((2, 3, 8, 8), dict(kernel_size=3, stride=(1, 2**32 + 2), padding=1)),
    "a dilation past int": ((2, 3, 8, 8), dict(kernel_size=(1, 5), dilation=(2**32, 1))),
}


@pytest.mark.parametrize("case", STOCK_ERRORS)
def test_max_pool_one_pass_leaves_stock_s_errors_to_stock(compiled_engine, case):
    """Calls stock rejects (the one-pass kernel runs none of its checks): stock's own error,
    word for word."""
    shape, kwargs = STOCK_ERRORS[case]
    x = _x(*shape)
    with pytest.raises(RuntimeError) as stock:
        F.max_pool2d(x, **kwargs)
    one_pass_before = extension.load().one_pass_poolings()
    with MemSaveMode(), pytest.raises(RuntimeError) as ours:
        F.max_pool2d(x, **kwargs)
    assert str(ours.value) == str(stock.value)
    assert extension.load().one_pass_poolings() == one_pass_before


@pytest.mark.filterwarnings("ignore::UserWarning")  # anomaly mode's announcement
def test_max_pool_called_inside_another_is_a_call_of_its_own(compiled_engine):
    """Python code that runs inside a max pooling's call (here a profiler hook, while anomaly
    mode records the call's stack) and pools with the indices returned gets stock's indices:
    it is its own caller, not the composite's that drops them, and the outer call's one-pass
    request is not its to take."""
    x = _with_special_tiles(_x(1, 2, 4, 6, specials=True, requires_grad=False)).requires_grad_(True)
    other = _x(1, 2, 4, 6)

    def pool_inside(inner_input):
        nested = []

        def profile(frame, event, arg):
            if event == "call" and not nested and "traceback" in frame.f_code.co_filename:
                sys.setprofile(None)
                nested.extend(F.max_pool2d(inner_input * 1, 2, return_indices=True))

        with torch.autograd.detect_anomaly():
            outer_input = x * 1  # (its node records a stack too: before the hook)
            sys.setprofile(profile)
            try:
                y = F.max_pool2d(outer_input, 2)
            finally:
                sys.setprofile(None)
        assert nested, "the hook never ran inside the call"
        return (y, *nested)

    for inner_input in (x, other):
        stock = pool_inside(inner_input)
        one_pass_before = extension.load().one_pass_poolings()
        with MemSaveMode():
            ours = pool_inside(inner_input)
        assert extension.load().one_pass_poolings() - one_pass_before == 1  # the outer call's
        for a, b, what in zip(ours, stock, ["output", "nested output", "nested indices"], strict=True):
            assert_bit_identical(a, b, what)


def test_max_pool_offsets_read_in_place_serve_a_second_backward(compiled_engine):
    """retain_graph: the offsets stay kept, and a second backward reads them again."""
    x, grad = _x(2, 3, 8, 8), seeded_randn(2, 3, 8, 8, seed=5)
    pool = POOLS["3x3 stride 1 (overlapping)"]
    stock = _max_pool_gradients(x, grad, pool, backwards=2)
    with MemSaveMode():
        ours = _max_pool_gradients(x, grad, pool, backwards=2)
    for a, b in zip(ours, stock):
        assert_bit_identical(a, b, "gradient")


@pytest.mark.parametrize("name", ["relu", "max_pool2d"])
def test_a_python_mode_around_backward_gets_decoded_encodings(compiled_engine, name):
    """A Python dispatch mode on in the backward pass sees (and may copy) what a node unpacks:
    the node gets the decoded stand-in, not a ghost carrying the encoding (a copy of the ghost
    would lose it)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Cloning(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            clone = lambda t: t.clone() if isinstance(t, torch.Tensor) else t
            return func(*map(clone, args), **{k: clone(v) for k, v in (kwargs or {}).items()})

    x = _x(2, 3, 8, 8)
    op = {"relu": F.relu, "max_pool2d": POOLS["2x2"]}[name]

    def gradient():
        y = op(x * 1).mul(1.5)  # the op's output unshared: its encoding is what backward gets
        grad = seeded_randn(*y.shape, seed=5)
        with Cloning():
            (dx,) = torch.autograd.grad(y, x, grad)
        return dx

    stock = gradient()
    with MemSaveMode() as mode:
        ours = gradient()
    assert set(mode.report()[op.__name__ if name == "relu" else "max_pool2d_with_indices"].encodings) - {"dropped"}
    assert_bit_identical(ours, stock, "gradient")


def test_max_pool_offsets_decode_once_the_engine_is_uninstalled(compiled_engine):
    """A graph built in the mode, its backward run after the engine's kernels were removed: the
    offsets decode for stock's kernel."""
    from memsave_dispatch import engine

    x = _x(2, 3, 8, 8)
    grad = seeded_randn(2, 3, 4, 4, seed=5)
    stock = _max_pool_gradients(x, grad, POOLS["2x2"])
    with MemSaveMode():
        ours = _max_pool_gradients(x, grad, POOLS["2x2"], before_backward=engine.uninstall)
    assert_bit_identical(ours[0], stock[0], "gradient")


def test_python_reading_a_relu_slot_during_backward_gets_the_stand_in(compiled_engine):
    """Python code reading ReLU's saved result while backward runs (a hook) gets the decoded
    stand-in, as outside backward, not the ghost its node hands threshold_backward."""
    x = _x(2, 3, 4, 4)
    with MemSaveMode():
        hidden = F.relu(x * 1)
        node = hidden.grad_fn
        out = hidden.mul(2.0)
        del hidden  # unshared: the slot holds the mask
        before = node._saved_result.clone()
        seen = []
        out.register_hook(lambda grad: seen.append(node._saved_result.clone()))
        out.sum().backward()
    assert torch.equal(before, (F.relu(x.detach()) != 0).float())
    assert_bit_identical(seen[0], before, "saved result read during backward")


def test_relu_masks_decode_once_the_engine_is_uninstalled(compiled_engine):
    """A graph built in the mode, its backward run after the engine's kernels were removed:
    the masks decode for stock's kernel, as the Python engine's do."""
    from memsave_dispatch import engine

    x = _x(2, 3, 4, 4)
    grad = seeded_randn(2, 3, 4, 4, seed=5)
    stock = _relu_gradients(x, grad)
    with MemSaveMode():
        ours = _relu_gradients(x, grad, before_backward=engine.uninstall)
    assert_bit_identical(ours[0], stock[0], "gradient")


def test_a_handler_from_python_runs_beside_the_compiled_ones(each_engine):
    """The mode's own handler for a built-in operator runs on the Python engine, in the same
    mode as the built-in handlers of the others; include, exclude and devices select for both."""
    from memsave_dispatch.handlers import KEEP, Saved, SavingPolicy

    class KeepRelu(SavingPolicy):
        family = "mine"

        @staticmethod
        def saved(args, outputs):
            return {"result": Saved(outputs[0], KEEP)}

    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    w = torch.randn(4, 3, 3, 3)
    with MemSaveMode(handlers={aten.relu.default: KeepRelu}) as mode:
        F.relu(F.conv2d(x, w)).sum().backward()
    report = mode.report()
    assert report.engine == each_engine
    assert report["relu"].family == "mine" and report["relu"].encodings == {}
    assert report["convolution"].encodings == {"dropped": 1}
    with MemSaveMode(exclude="conv") as mode:
        F.relu(F.conv2d(x, w)).sum().backward()
    assert {line.op for line in mode.report().ops} == {"aten.relu.default"}
    with pytest.warns(UserWarning, match="not verified"):
        elsewhere = MemSaveMode(devices="cuda")
    with elsewhere:
        F.conv2d(x, w).sum().backward()
    assert elsewhere.report()["convolution"].to_stock == {"device cpu not enabled": 1}
