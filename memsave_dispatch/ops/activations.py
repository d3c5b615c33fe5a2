"""Activations whose backward reads the saved tensor through one yes/no decision per element:
one bit per element reproduces every gradient. And the recipes of smooth activations and
softmax, whose outputs a later node may keep: GELU and SiLU re-run on the input their node
keeps; tanh, sigmoid and softmax keep their own output.

Reached by: ``nn.ReLU``/``F.relu`` (``aten.relu``, ``aten.relu_`` with ``inplace=True``),
``nn.LeakyReLU`` (``aten.leaky_relu``/``leaky_relu_``), ``nn.Hardtanh``/``nn.ReLU6``/``F.relu6``
(``aten.hardtanh``/``hardtanh_``), ``nn.Threshold`` (``aten.threshold``/``threshold_``).
Stock keeps the float input or output (4 bytes per element in fp32).

The same operators run on CUDA. Where a decision depends on how the device's kernel rounds or
decides (hardtanh's and threshold's bounds), the kernel itself is asked, on that device, once
per bounds and dtype: encoding never reads a tensor back to the host.
"""

from __future__ import annotations

import functools
import math

import torch

from ..handlers import (
    CPU_AND_CUDA,
    KEEP,
    Attr,
    BitMaskCodec,
    Encode,
    EncodeWhenUnshared,
    Recipe,
    Saved,
    SavingPolicy,
    Slot,
    encodings_enabled,
    register_handler,
    register_recipe,
)

aten = torch.ops.aten

# bool(NaN) is True and bool(-0.0) False: exactly "not y <= 0" for every ReLU output.
_RELU_MASK = BitMaskCodec(torch.Tensor.bool, 0.0, 1.0)
_POSITIVE_MASK = BitMaskCodec(lambda t: t > 0, 0.0, 1.0)


@register_handler(aten.relu.default, aten.relu_.default)
class Relu(SavingPolicy):
    """y = max(x, 0); backward is threshold_backward(grad, y, 0) = (y <= 0) ? +0 : grad.

    y is usually the next layer's input too (and may be the caller's), so the bits replace it
    only once nothing else holds it.
    """

    family = "activation"
    devices = CPU_AND_CUDA

    @staticmethod
    def saved(args, outputs):
        return {"result": Saved(outputs[0], EncodeWhenUnshared(_RELU_MASK))}


@register_handler(aten.leaky_relu.default)
class LeakyRelu(SavingPolicy):
    """backward: leaky_relu_backward(grad, x, slope) = x > 0 ? grad : grad * slope.

    x is the caller's tensor: its bits replace it once nothing else holds it."""

    family = "activation"
    devices = CPU_AND_CUDA

    @staticmethod
    def saved(args, outputs):
        return {"self": Saved(args[0], EncodeWhenUnshared(_POSITIVE_MASK))}


@register_handler(aten.leaky_relu_.default)
class LeakyReluInplace(SavingPolicy):
    """In place, stock keeps the output (y > 0 exactly where x > 0): shared like ReLU's."""

    family = "activation"
    devices = CPU_AND_CUDA

    @staticmethod
    def saved(args, outputs):
        return {"result": Saved(outputs[0], EncodeWhenUnshared(_POSITIVE_MASK))}


@register_handler(aten.hardtanh.default, aten.hardtanh_.default)
class Hardtanh(SavingPolicy):
    """backward: hardtanh_backward(grad, x, lo, hi) zeroes where x <= lo or x >= hi.

    The bit is the kernel's own decision, asked once with a gradient of ones (so the bounds are
    rounded exactly as the kernel rounds them). Stock's CPU kernel decides NaN differently in
    its vectorised body and its scalar tail, and which elements fall where depends on the
    incoming gradient's layout: on CPU a tensor holding NaN is kept as it is. CUDA's kernel
    applies one comparison to every element (NaN passes), so there the bit covers NaN too and
    nothing is read back. In place, stock keeps a private copy of the input, encoded at once;
    out of place, the caller's input, encoded once nothing else holds it.
    """

    family = "activation"
    devices = CPU_AND_CUDA

    @staticmethod
    def saved(args, outputs):
        input, low, high = args[0], args[1], args[2]
        if not encodings_enabled() or (input.is_cpu and bool(torch.isnan(input).any())):
            return {"self": Saved(input, KEEP)}
        zeroed, passed = _below(low, input.dtype), _middle(low, high, input.dtype)
        decision = _decision_mask(aten.hardtanh_backward.default, (low, high), input, zeroed, passed, _encoding(args, outputs))
        return {"self": Saved(input, decision)}


@register_handler(aten.threshold.default, aten.threshold_.default)
class Threshold(SavingPolicy):
    """backward: threshold_backward(grad, x, t) = (x <= t) ? 0 : grad.

    In place, stock keeps a private copy of the input: the same handling as hardtanh's.
    """

    family = "activation"
    devices = CPU_AND_CUDA

    @staticmethod
    def saved(args, outputs):
        input, threshold = args[0], args[1]
        if not encodings_enabled():
            return {"self": Saved(input, KEEP)}
        at = torch.tensor(threshold, dtype=input.dtype)
        above = torch.nextafter(at, torch.tensor(float("inf"), dtype=input.dtype)).item()
        zeroed = _below(threshold, input.dtype)
        decision = _decision_mask(aten.threshold_backward.default, (threshold,), input, zeroed, above, _encoding(args, outputs))
        return {"self": Saved(input, decision)}


def _encoding(args, outputs) -> type:
    """In place, the node keeps a private copy of the input: encode it at once. Out of place
    it keeps the caller's tensor: encode it once nothing else holds it."""
    return Encode if outputs[0] is args[0] else EncodeWhenUnshared


def _decision_mask(backward, bounds: tuple, input, zeroed: float | None, passed: float | None, encoding: type):
    """Encode the per-element decision of ``backward(grad, x, *bounds)`` (zero the gradient or
    pass it) as one bit, decoded as ``zeroed``/``passed``, once the kernel is seen to decide
    alike on those two values in its vectorised body and its tail; KEEP otherwise."""
    if zeroed is None or passed is None or not _decides_alike(
        backward, bounds, _signs(*bounds), input.dtype, input.device, zeroed, passed
    ):
        return KEEP

    def passes(tensor):
        return backward(torch.ones_like(tensor), tensor, *bounds) != 0

    return encoding(BitMaskCodec(passes, zeroed, passed))


def _signs(*values) -> tuple[float, ...]:
    """-0.0 == 0.0 as a cache key, but a decision must be probed for the very value asked for."""
    return tuple(math.copysign(1.0, float(value)) for value in values)


@functools.lru_cache(maxsize=256)
def _decides_alike(backward, bounds: tuple, _signs: tuple, dtype: torch.dtype, device: torch.device, zeroed: float, passed: float) -> bool:
    """Whether ``device``'s kernel zeroes 67 copies of ``zeroed`` and passes 67 of ``passed``
    (a vectorised body and a tail): asked once per bounds, dtype and device."""
    probe = torch.cat([torch.full((67,), zeroed, dtype=dtype, device=device), torch.full((67,), passed, dtype=dtype, device=device)])
    decided = backward(torch.ones_like(probe), probe, *bounds) != 0
    return not bool(decided[:67].any()) and bool(decided[67:].all())


def _below(value, dtype) -> float | None:
    """The largest value of ``dtype`` below ``value`` as rounded to ``dtype`` (so <= value in
    both ``dtype`` and float arithmetic)."""
    at = torch.tensor(value, dtype=dtype)
    below = torch.nextafter(at, torch.tensor(float("-inf"), dtype=dtype))
    return below.item() if bool(torch.isfinite(below)) else None


def _middle(low, high, dtype) -> float | None:
    middle = torch.tensor((float(low) + float(high)) / 2, dtype=dtype)
    return middle.item() if bool(torch.isfinite(middle)) else None


# -- recipes: outputs a later node keeps, rebuilt from what these nodes keep ---------------
@register_recipe("GeluBackward0")
def _gelu(node):
    return Recipe(aten.gelu.default, (Slot("self"),), {"approximate": Attr("approximate")})


@register_recipe("SiluBackward0")
def _silu(node):
    return Recipe(aten.silu.default, (Slot("self"),))


@register_recipe("TanhBackward0", "SigmoidBackward0", "SoftmaxBackward0", "SafeSoftmaxBackward0")
def _own_output(node):
    return Recipe(None, (Slot("result"),))
