"""Activations whose backward reads the saved tensor through one yes/no decision per element:
one bit per element reproduces every gradient.

Reached by: ``nn.ReLU``/``F.relu`` (``aten.relu``, ``aten.relu_`` with ``inplace=True``),
``nn.LeakyReLU`` (``aten.leaky_relu``/``leaky_relu_``), ``nn.Hardtanh``/``nn.ReLU6``/``F.relu6``
(``aten.hardtanh``/``hardtanh_``), ``nn.Threshold`` (``aten.threshold``/``threshold_``).
Stock keeps the float input or output (4 bytes per element in fp32).
"""

from __future__ import annotations

import functools
import math

import torch

from ..handlers import KEEP, BitMaskCodec, Encode, EncodeWhenUnshared, Saved, SavingPolicy, encodings_enabled, register_handler

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

    @staticmethod
    def saved(args, outputs):
        return {"result": Saved(outputs[0], EncodeWhenUnshared(_RELU_MASK))}


@register_handler(aten.leaky_relu.default)
class LeakyRelu(SavingPolicy):
    """backward: leaky_relu_backward(grad, x, slope) = x > 0 ? grad : grad * slope.

    x is the caller's tensor: its bits replace it once nothing else holds it."""

    family = "activation"

    @staticmethod
    def saved(args, outputs):
        return {"self": Saved(args[0], EncodeWhenUnshared(_POSITIVE_MASK))}


@register_handler(aten.leaky_relu_.default)
class LeakyReluInplace(SavingPolicy):
    """In place, stock keeps the output (y > 0 exactly where x > 0): shared like ReLU's."""

    family = "activation"

    @staticmethod
    def saved(args, outputs):
        return {"result": Saved(outputs[0], EncodeWhenUnshared(_POSITIVE_MASK))}


@register_handler(aten.hardtanh.default, aten.hardtanh_.default)
class Hardtanh(SavingPolicy):
    """backward: hardtanh_backward(grad, x, lo, hi) zeroes where x <= lo or x >= hi.

    The bit is the kernel's own decision, asked once with a gradient of ones (so the bounds are
    rounded exactly as the kernel rounds them). Stock's kernel decides NaN differently in its
    vectorised body and its scalar tail, and which elements fall where depends on the incoming
    gradient's layout: a tensor holding NaN is kept as it is. In place, stock keeps a private
    copy of the input, encoded at once; out of place, the caller's input, encoded once nothing
    else holds it.
    """

    family = "activation"

    @staticmethod
    def saved(args, outputs):
        input, low, high = args[0], args[1], args[2]

        def backward(grad, tensor):
            return aten.hardtanh_backward.default(grad, tensor, low, high)

        if not encodings_enabled() or bool(torch.isnan(input).any()):
            # the kernel's NaN decision depends on where the element falls in its loop, which
            # depends on the incoming gradient's layout, unknown until backward
            return {"self": Saved(input, KEEP)}
        stand_ins = _hardtanh_stand_ins(input.dtype, low, high, _signs(low, high))
        return {"self": Saved(input, _decision_mask(backward, stand_ins, _encoding(args, outputs)))}


@register_handler(aten.threshold.default, aten.threshold_.default)
class Threshold(SavingPolicy):
    """backward: threshold_backward(grad, x, t) = (x <= t) ? 0 : grad.

    In place, stock keeps a private copy of the input: the same handling as hardtanh's.
    """

    family = "activation"

    @staticmethod
    def saved(args, outputs):
        input, threshold = args[0], args[1]

        def backward(grad, tensor):
            return aten.threshold_backward.default(grad, tensor, threshold)

        if not encodings_enabled():
            return {"self": Saved(input, KEEP)}
        stand_ins = _threshold_stand_ins(input.dtype, threshold, _signs(threshold))
        return {"self": Saved(input, _decision_mask(backward, stand_ins, _encoding(args, outputs)))}


def _encoding(args, outputs) -> type:
    """In place, the node keeps a private copy of the input: encode it at once. Out of place
    it keeps the caller's tensor: encode it once nothing else holds it."""
    return Encode if outputs[0] is args[0] else EncodeWhenUnshared


def _decision_mask(backward, stand_ins: tuple[float, float] | None, encoding: type):
    """Encode the per-element decision of ``backward`` (zero the gradient or pass it) as one
    bit, decoded as the stand-ins (zeroed, passed); KEEP where there are none."""
    if stand_ins is None:
        return KEEP

    def passes(tensor):
        return backward(torch.ones_like(tensor), tensor) != 0

    return encoding(BitMaskCodec(passes, *stand_ins))


# The stand-ins depend on the dtype and the bounds only: found once for each (the probe runs the
# kernel), as the compiled engine does, so neither engine allocates for it per call.
@functools.lru_cache(maxsize=256)
def _hardtanh_stand_ins(dtype, low, high, _signs) -> tuple[float, float] | None:
    def backward(grad, tensor):
        return aten.hardtanh_backward.default(grad, tensor, low, high)

    return _probed(backward, dtype, _below(low, dtype), _middle(low, high, dtype))


@functools.lru_cache(maxsize=256)
def _threshold_stand_ins(dtype, threshold, _signs) -> tuple[float, float] | None:
    def backward(grad, tensor):
        return aten.threshold_backward.default(grad, tensor, threshold)

    at = torch.tensor(threshold, dtype=dtype)
    above = torch.nextafter(at, torch.tensor(float("inf"), dtype=dtype)).item()
    return _probed(backward, dtype, _below(threshold, dtype), above)


def _signs(*values) -> tuple[float, ...]:
    """-0.0 == 0.0 as a cache key, but a stand-in must be found for the very value asked for."""
    return tuple(math.copysign(1.0, float(value)) for value in values)


def _probed(backward, dtype, zeroed: float | None, passed: float | None) -> tuple[float, float] | None:
    """(zeroed, passed) once the kernel is seen to decide alike on those two values in its
    vectorised body and its tail; None otherwise."""
    if zeroed is None or passed is None:
        return None
    probe = torch.tensor([zeroed] * 67 + [passed] * 67, dtype=dtype)
    decided = backward(torch.ones_like(probe), probe) != 0
    if decided[:67].any() or not decided[67:].all():
        return None
    return zeroed, passed


def _below(value, dtype) -> float | None:
    """The largest value of ``dtype`` below ``value`` as rounded to ``dtype`` (so <= value in
    both ``dtype`` and float arithmetic)."""
    at = torch.tensor(value, dtype=dtype)
    below = torch.nextafter(at, torch.tensor(float("-inf"), dtype=dtype))
    return below.item() if bool(torch.isfinite(below)) else None


def _middle(low, high, dtype) -> float | None:
    middle = torch.tensor((float(low) + float(high)) / 2, dtype=dtype)
    return middle.item() if bool(torch.isfinite(middle)) else None
