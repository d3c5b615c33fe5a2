"""What CUDA runs, checked on the CPU as far as the CPU allows.

- Which operators CUDA reaches: traced with fake CUDA tensors (routing below autograd only).
- Every built-in handler declares CUDA, and its decisions and encodings run on a device whose
  values cannot be read back to the host (meta: ``.item()``, ``bool()``, ``nonzero``,
  ``unique`` raise there), so they never make a GPU wait. Slot names are checked against the
  nodes stock autograd builds there (cuDNN's and MIOpen's batch norm included).
- cuDNN's and MIOpen's batch norm end to end, with CPU kernels standing in for the GPU ones
  (the stock autograd formula, node and saved slots are the real ones).

What only a GPU can show (the kernels' bits, memory, host synchronisation) is
``tools/gpu_check.py``'s; the tests needing a GPU are at the end and skip without one.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from memsave_dispatch import MemSaveMode
from memsave_dispatch.decisions import DROP, KEEP, Encode, EncodeWhenUnshared
from memsave_dispatch.ghosts import TensorLayout, ghost_like
from memsave_dispatch.handlers import CPU_AND_CUDA, registered_ops
from memsave_dispatch.ops import activations, dropout
from memsave_dispatch.registry import handler_for
from memsave_dispatch.slots import check_slot_names
from tests.support import compare_with_stock, seeded_randn

aten = torch.ops.aten
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run tools/gpu_check.py there)")


# -- routing on CUDA ------------------------------------------------------------------------
def _ops_reached(fn, *shape) -> list[str]:
    """The aten operators ``fn`` reaches below autograd on a (fake) CUDA tensor."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    reached = []

    class Trace(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            reached.append(str(func))
            return func(*args, **(kwargs or {}))

    with FakeTensorMode():
        try:
            x = torch.empty(shape, device="cuda")
        except Exception as error:  # pragma: no cover - a build that cannot fake CUDA tensors
            pytest.skip(f"no fake CUDA tensors here: {error}")
        with Trace():
            fn(x)
    return reached


def test_dropout_on_cuda_calls_the_fused_kernel_out_of_place_only():
    assert "aten.native_dropout.default" in _ops_reached(lambda x: F.dropout(x, 0.3), 4, 8)
    for in_place_or_feature in (lambda x: F.dropout(x, 0.3, inplace=True), lambda x: F.dropout2d(x, 0.3)):
        reached = _ops_reached(in_place_or_feature, 4, 8, 3, 3)
        assert "aten.bernoulli_.float" in reached and "aten.native_dropout.default" not in reached


def test_composite_dropout_leaves_cuda_inputs_to_the_native_dropout_handler():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        on_cuda = torch.empty(4, 8, device="cuda")
    assert dropout.Dropout.unsupported(on_cuda, 0.3, True) == "calls native_dropout (handled there)"
    assert dropout.Dropout.unsupported(torch.empty(4, 8), 0.3, True) is None
    assert not hasattr(dropout.NoiseDropout, "unsupported") or dropout.NoiseDropout.unsupported is None


def test_every_built_in_handler_takes_cuda_calls():
    for op in registered_ops():
        assert handler_for(op).handler.devices == CPU_AND_CUDA, op


def test_cuda_needs_asking_for_and_says_how_to_verify_it():
    assert MemSaveMode().devices == {"cpu"}
    with pytest.warns(UserWarning, match=r"python tools/gpu_check\.py"):
        MemSaveMode(devices=("cpu", "cuda"))


# -- decisions and encodings on a device nothing is read back from ---------------------------
def _meta(*shape, grad=False, dtype=torch.float32):
    return torch.empty(shape, device="meta", dtype=dtype).requires_grad_(grad)


def _calls(x_grad: bool, w_grad: bool):
    """(operator, arguments) on meta tensors, for every operator with a built-in handler."""
    x = _meta(2, 4, 9, 9, grad=x_grad)
    x5 = _meta(2, 4, 5, 5, 5, grad=True)
    w, b = _meta(4, grad=w_grad), _meta(4, grad=True)
    stats = (_meta(4), _meta(4))
    bn = (x, w, b, *stats)
    yield aten.convolution.default, (x, _meta(6, 4, 3, 3, grad=w_grad), b[:0], [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
    yield aten.addmm.default, (b, _meta(3, 5, grad=x_grad), _meta(5, 4, grad=w_grad))
    yield aten.mm.default, (_meta(3, 5, grad=x_grad), _meta(5, 4, grad=w_grad))
    yield aten.bmm.default, (_meta(2, 3, 5, grad=x_grad), _meta(2, 5, 4, grad=w_grad))
    for training in (True, False):
        yield aten.native_batch_norm.default, (*bn, training, 0.1, 1e-5)
        yield aten.cudnn_batch_norm.default, (*bn, training, 0.1, 1e-5)
        yield aten.miopen_batch_norm.default, (*bn, training, 0.1, 1e-5)
    yield aten.native_layer_norm.default, (x, [9], _meta(9, grad=w_grad), _meta(9, grad=True), 1e-5)
    yield aten.native_group_norm.default, (x, w, b, 2, 4, 81, 2, 1e-5)
    y = _meta(2, 4, 9, 9, grad=True)
    for op, extra in (
        (aten.relu.default, ()), (aten.leaky_relu.default, (0.1,)), (aten.hardtanh.default, (-0.5, 0.5)),
        (aten.threshold.default, (0.25, -1.0)), (aten.dropout.default, (0.3, True)),
        (aten.feature_dropout.default, (0.3, True)), (aten.native_dropout.default, (0.3, True)),
    ):
        yield op, (y, *extra)
    for op, extra in (
        (aten.relu_.default, ()), (aten.leaky_relu_.default, (0.1,)), (aten.hardtanh_.default, (-0.5, 0.5)),
        (aten.threshold_.default, (0.25, -1.0)), (aten.dropout_.default, (0.3, True)),
        (aten.feature_dropout_.default, (0.3, True)),
    ):
        yield op, (y * 1, *extra)  # in place on a fresh tensor
    yield aten.max_pool2d_with_indices.default, (y, [3, 3], [2, 2], [1, 1])
    yield aten.max_pool2d_with_indices.default, (y, [2, 2], [2, 2])
    yield aten.max_pool3d_with_indices.default, (x5, [2, 2, 2], [2, 2, 2])
    yield aten.adaptive_max_pool2d.default, (y, [4, 4])
    yield aten.adaptive_max_pool3d.default, (x5, [2, 2, 2])
    yield aten.avg_pool2d.default, (y, [3, 3], [2, 2], [1, 1])
    yield aten.avg_pool3d.default, (x5, [2, 2, 2])
    yield aten._adaptive_avg_pool2d.default, (y, [4, 4])
    yield aten._adaptive_avg_pool3d.default, (x5, [2, 2, 2])


def _same_layout(actual, expected) -> bool:
    return (actual.device, actual.shape, actual.stride(), actual.dtype) == (
        expected.device, expected.shape, expected.stride(), expected.dtype,
    )


def test_decisions_and_encodings_never_read_the_device(monkeypatch):
    """Every handler's saved() and every codec it chooses, on meta tensors, for each
    requires-grad pattern: the stand-ins backward would read have the tensors' layout on
    their device. The two values read back once per configuration and cached (hardtanh's and
    threshold's probe of the kernel, per bounds and dtype; dropout's kept value, per p and
    dtype) are stood in for."""
    monkeypatch.setattr(activations, "_decides_alike", lambda *args: True)
    monkeypatch.setattr(dropout, "_kept_value", lambda dtype, p, device: 1 / (1 - p))
    changed = set()
    with torch.enable_grad():
        for x_grad, w_grad in itertools.product([False, True], repeat=2):
            for op, args in _calls(x_grad, w_grad):
                entry = handler_for(op)
                full = entry.full_arguments(args, {})
                if entry.handler.can_save is not None and not entry.handler.can_save(*full):
                    continue
                outputs = op(*args)
                outputs = outputs if isinstance(outputs, tuple) else (outputs,)
                if outputs[0].grad_fn is None:
                    continue  # nothing requires grad
                saved = entry.handler.saved(full, outputs)
                check_slot_names(entry.handler, op, outputs[0].grad_fn, saved)
                for name, (tensor, decision) in saved.items():
                    if tensor is None or decision is KEEP:
                        continue
                    if decision is DROP:
                        stand_in = ghost_like(TensorLayout.of(tensor))
                    else:
                        assert isinstance(decision, (Encode, EncodeWhenUnshared)), decision
                        stand_in = decision.codec.decode(*decision.codec.encode(tensor.detach()))
                    assert _same_layout(stand_in, tensor), f"{op} {name}: {decision}"
                    changed.add(op)
    # the matrix products keep stock's node as it is (a kept operand may be rebuilt later, by
    # the slots engine, not by the handler's decisions)
    assert changed == set(registered_ops()) - {aten.addmm.default, aten.mm.default, aten.bmm.default}


# -- cuDNN's and MIOpen's batch norm, their GPU kernels stood in for on the CPU ------------------
def _contiguous_as_cudnn_wants(input):
    """cudnn_batch_norm_backward checks this (a zero-stride placeholder would fail it)."""
    formats = (torch.contiguous_format, torch.channels_last) if input.dim() == 4 else (torch.contiguous_format,)
    assert any(input.is_contiguous(memory_format=f) for f in formats), "cuDNN refuses this input"


def _gpu_batch_norm_on_cpu(input, weight, bias, running_mean, running_var, training, momentum, eps):
    output, mean, invstd = aten.native_batch_norm.default(input, weight, bias, running_mean, running_var, training, momentum, eps)
    return output, mean, invstd


def _gpu_batch_norm_backward_on_cpu(input, grad_output, weight, running_mean, running_var, save_mean, save_var, eps, *reserve):
    """Like cuDNN's: all three gradients at once, reading the input."""
    _contiguous_as_cudnn_wants(input)
    return aten.native_batch_norm_backward.default(
        grad_output, input, weight, running_mean, running_var, save_mean, save_var, True, eps, [True, True, True]
    )


@pytest.fixture(scope="module")
def gpu_batch_norm_kernels_on_cpu():
    lib = torch.library.Library("aten", "IMPL")
    lib.impl("cudnn_batch_norm", lambda *args: (*_gpu_batch_norm_on_cpu(*args), args[0].new_empty(0, dtype=torch.uint8)), "CPU")
    lib.impl("cudnn_batch_norm_backward", _gpu_batch_norm_backward_on_cpu, "CPU")
    lib.impl("miopen_batch_norm", _gpu_batch_norm_on_cpu, "CPU")
    lib.impl("miopen_batch_norm_backward", _gpu_batch_norm_backward_on_cpu, "CPU")
    yield
    lib._destroy()


GPU_BATCH_NORMS = {"cudnn": aten.cudnn_batch_norm.default, "miopen": aten.miopen_batch_norm.default}


@pytest.mark.parametrize("kind", sorted(GPU_BATCH_NORMS))
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("pattern", list(itertools.product([False, True], repeat=3))[1:], ids=lambda p: "".join(n for n, f in zip("xwb", p) if f))
def test_gpu_batch_norms_keep_what_native_batch_norm_keeps(gpu_batch_norm_kernels_on_cpu, kind, training, channels_last, pattern):
    """cudnn_batch_norm and miopen_batch_norm: bit-identical to stock (same formula, same
    node) and keep the input exactly when native batch norm would (mechanism §7)."""
    need_x, need_w, need_b = pattern
    x = seeded_randn(3, 4, 5, 5, requires_grad=need_x)
    if channels_last:
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(need_x)
    weight = torch.nn.Parameter(seeded_randn(4, seed=1) + 1, requires_grad=need_w)
    bias = torch.nn.Parameter(seeded_randn(4, seed=2), requires_grad=need_b)
    mean, var = seeded_randn(4, seed=3) * 0.1, seeded_randn(4, seed=4).abs() + 0.5

    def batch_norm(x, weight, bias, mean, var):
        return GPU_BATCH_NORMS[kind](x, weight, bias, mean, var, training, 0.1, 1e-5)[0]

    inputs = {"x": x, "weight": weight, "bias": bias, "mean": mean, "var": var}
    stock, mode = compare_with_stock(batch_norm, inputs, state=("weight", "bias", "mean", "var"))
    needs_input = need_w or (training and need_x)
    statistics = 2 * 4 * 4 if training else 0
    assert mode.saved_bytes == (x.numel() * 4 + statistics if needs_input else 0)
    assert stock.saved_bytes == x.numel() * 4 + statistics
    assert mode.report[str(GPU_BATCH_NORMS[kind])].handled == (0 if needs_input else 1)


# -- on a GPU --------------------------------------------------------------------------------
def _cuda_mode() -> MemSaveMode:
    with pytest.warns(UserWarning, match="not verified"):
        return MemSaveMode(devices=("cuda",))


@needs_cuda
def test_cuda_batch_norm_reaches_cudnn_and_matches_stock():
    x = seeded_randn(4, 8, 6, 6, requires_grad=True).cuda().detach().requires_grad_(True)
    bn = torch.nn.BatchNorm2d(8).cuda().eval().requires_grad_(False)
    stock, mode = compare_with_stock(lambda x: bn(x), {"x": x}, mode_factory=_cuda_mode)
    assert mode.report["aten.cudnn_batch_norm.default"].handled == 1
    assert mode.saved_bytes == 0 < stock.saved_bytes


@needs_cuda
def test_cuda_ghosts_allocate_nothing():
    from memsave_dispatch import zeros

    x = torch.randn(64, 64, 56, 56, device="cuda")
    before = torch.cuda.memory_allocated()
    ghost = ghost_like(TensorLayout.of(x))
    assert torch.cuda.memory_allocated() == before or zeros.describe()["cuda:0"]["source"] != zeros.MappedZeroGranule.name
    assert ghost.stride() == x.stride() and ghost.data_ptr() % 512 == x.data_ptr() % 512
