"""Ghosts on one device, measured with the allocator's own counters (``torch.cuda``'s statistics
on a GPU, the profiler's allocation events on the CPU), not read off the code.

- What the zero memory behind ghosts costs: a large ghost is made and the allocator asked
  what it handed out meanwhile; which source serves the device, and what it occupies.
- Backward kernels given a ghost, against the same kernel given the real tensor and given the
  zero-stride placeholder ghosts replaced: the allocation growth during the call, and whether
  the result has the real tensor's bits and strides. A kernel that copied its ghost to a
  full-size buffer would show that buffer in its growth; the placeholder is the control that
  shows the measurement catches it.
- A frozen conv -> batch norm (eval) -> ReLU -> pool stack end to end, stock against the mode:
  bytes kept, and the peak over backward.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from memsave_dispatch import MemSaveMode, saved_tensor_bytes, zeros
from memsave_dispatch.exactness import bit_identical
from memsave_dispatch.ghosts import TensorLayout, ghost_like
from memsave_dispatch.meter import allocator_bytes

aten = torch.ops.aten


@dataclass
class KernelRow:
    kernel: str
    layout: str
    input_bytes: int
    growth_real: int
    growth_ghost: int
    growth_placeholder: int | None  # None: the kernel refused the placeholder
    ghost_exact: bool  # same bits and strides as with the real input
    placeholder_note: str = ""

    @property
    def problem(self) -> str | None:
        if not self.ghost_exact:
            return "ghost changes the result"
        if self.growth_ghost > self.growth_real:
            return f"ghost makes backward allocate {self.growth_ghost - self.growth_real} bytes more"
        return None


def _placeholder(tensor: Tensor) -> Tensor:
    """The zero-stride stand-in ghosts replaced."""
    return torch.empty((), dtype=tensor.dtype, device=tensor.device).expand(tensor.shape)


def _growth(fn: Callable[[], Tensor | tuple], device: torch.device) -> tuple[int, tuple]:
    measured = allocator_bytes(fn, device)
    result = measured.result if isinstance(measured.result, tuple) else (measured.result,)
    return measured.peak, result


def _kernel_row(kernel: str, layout: str, call: Callable[[Tensor], Tensor | tuple], real: Tensor) -> KernelRow:
    device = real.device
    ghost = ghost_like(TensorLayout.of(real))
    growth_real, expected = _growth(lambda: call(real), device)
    growth_ghost, got = _growth(lambda: call(ghost), device)
    exact = all(
        (a is None and b is None) or (a is not None and b is not None and a.stride() == b.stride() and bit_identical(a, b))
        for a, b in zip(got, expected)
    )
    try:
        growth_placeholder, _ = _growth(lambda: call(_placeholder(real)), device)
        note = ""
    except RuntimeError as error:
        growth_placeholder, note = None, f"refused: {str(error).splitlines()[0][:80]}"
    size = real.numel() * real.element_size()
    return KernelRow(kernel, layout, size, growth_real, growth_ghost, growth_placeholder, exact, note)


def kernel_rows(device: torch.device, scale: int) -> list[KernelRow]:
    """Backward kernels that read a dropped tensor only for its layout. ``scale`` sizes the
    inputs (batch); a GPU gets tensors of hundreds of MiB, the CPU a few."""
    rows = []
    generator = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)

    dtypes = (torch.float32, torch.float16) if device.type == "cuda" else (torch.float32,)
    for dtype, channels_last in ((d, c) for d in dtypes for c in (False, True)):
        layout = f"{str(dtype).removeprefix('torch.')} {'channels_last' if channels_last else 'contiguous'}"
        x = randn(scale, 64, 56, 56, dtype=dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        weight = randn(64, 64, 3, 3, dtype=dtype)
        if channels_last:
            weight = weight.contiguous(memory_format=torch.channels_last)
        grad_conv = F.conv2d(x, weight, padding=1)
        rows.append(_kernel_row("convolution_backward (input grad only)", layout, lambda input: aten.convolution_backward.default(
            grad_conv, input, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, False, False]), x))
        bn_dtype = torch.float32 if dtype is torch.float16 else dtype
        w, mean, var = randn(64, dtype=bn_dtype), randn(64, dtype=bn_dtype), randn(64, dtype=bn_dtype).abs() + 0.5
        empty = torch.empty(0, device=device, dtype=bn_dtype)
        rows.append(_kernel_row("native_batch_norm_backward eval (input grad only)", layout, lambda input:
                                aten.native_batch_norm_backward.default(x, input, w, mean, var, empty, empty, False, 1e-5,
                                                                        [True, False, False]), x))
        pooled, indices = aten.max_pool2d_with_indices.default(x, [3, 3], [2, 2], [1, 1])
        rows.append(_kernel_row("max_pool2d_with_indices_backward", layout, lambda input:
                                aten.max_pool2d_with_indices_backward.default(pooled, input, [3, 3], [2, 2], [1, 1], [1, 1],
                                                                              False, indices), x))
        averaged = F.avg_pool2d(x, 2)
        rows.append(_kernel_row("avg_pool2d_backward", layout, lambda input:
                                aten.avg_pool2d_backward.default(averaged, input, [2, 2], [2, 2], [0, 0], False, True, None), x))
        if device.type == "cuda" and dtype is torch.float32:
            rows.append(_cudnn_bias_only_row(x, layout, randn))
    return rows


def _cudnn_bias_only_row(x: Tensor, layout: str, randn) -> KernelRow:
    """cuDNN's batch-norm backward in training, as the bias-only case runs it: it computes
    every gradient, so only grad_bias (the one used) is compared."""
    w, b = randn(64) + 1, randn(64)
    out, mean, invstd, reserve = aten.cudnn_batch_norm.default(x, w, b, None, None, True, 0.1, 1e-5)
    grad = torch.randn_like(out)

    def call(input):
        return (aten.cudnn_batch_norm_backward.default(input, grad, w, None, None, mean, invstd, 1e-5, reserve)[2],)

    return _kernel_row("cudnn_batch_norm_backward training (grad_bias)", layout, call, x)


def zero_memory(device: torch.device, nbytes: int) -> dict:
    """Allocator bytes a ghost of ``nbytes`` costs, and the source behind it."""
    layout = TensorLayout.of(torch.empty(0, device=device))._replace(shape=torch.Size([nbytes // 4]), stride=(1,))
    measured = allocator_bytes(lambda: ghost_like(layout), device)
    return {"ghost_bytes": nbytes, "allocated": measured.peak, "sources": zeros.describe()}


def frozen_stack(device: torch.device, batch: int) -> dict:
    """conv (frozen) -> batch norm (eval, frozen) -> ReLU -> max pool, input gradient only."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 64, 7, 2, 3, bias=False), torch.nn.BatchNorm2d(64), torch.nn.ReLU(inplace=True),
        torch.nn.MaxPool2d(3, 2, 1), torch.nn.Conv2d(64, 64, 3, padding=1, bias=False), torch.nn.BatchNorm2d(64),
    ).to(device).eval().requires_grad_(False)
    figures = {}
    for label in ("stock", "mode"):
        x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1)).to(device).requires_grad_(True)
        mode = MemSaveMode(devices=(device.type,)) if label == "mode" else None
        with mode if mode is not None else torch.enable_grad():
            kept, out = saved_tensor_bytes(lambda: model(x), exclude=model)
            measured = allocator_bytes(lambda: out.backward(torch.ones_like(out)), device)
        figures[label] = {"kept": kept, "backward_growth": measured.peak, "grad": x.grad}
    exact = bit_identical(figures["stock"].pop("grad"), figures["mode"].pop("grad"))
    return {"batch": batch, "exact": exact, **figures}


def run_ghost_checks(device: torch.device) -> dict:
    on_gpu = device.type == "cuda"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "not verified on cuda": verifying it is this check's job
        rows = kernel_rows(device, scale=32 if on_gpu else 2)
        stack = frozen_stack(device, batch=32 if on_gpu else 2)
    return {
        "zero_memory": zero_memory(device, (1 << 30) if on_gpu else (64 << 20)),
        "kernels": [{**asdict(row), "problem": row.problem} for row in rows],
        "frozen_stack": stack,
    }
