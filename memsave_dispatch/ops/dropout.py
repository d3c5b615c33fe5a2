"""Dropout.

``F.dropout``/``nn.Dropout`` reach the composite ``aten.dropout``. On CPU it draws a float noise
tensor (0 or 1/(1-p)) and multiplies, so stock keeps that float noise, 4 bytes per element in
fp32. On CUDA (ATen's ``is_fused_kernel_acceptable``: a CUDA input, 0 < p < 1, not empty) it
calls the fused ``aten.native_dropout`` instead, which keeps a bool mask (1 byte). In place
(``dropout_``) and feature-wise (``feature_dropout`` for ``nn.Dropout1d/2d/3d``) dropout draw
the float noise on every device.

Both keep 1 bit per element here. The operator still runs stock, so the random stream is
consumed exactly as stock does and outputs are bit-identical under the same seed; the noise
is rebuilt exactly in backward (the kept value is computed by the same division stock used,
on the same device).
"""

from __future__ import annotations

import functools

import torch

from .._compat import saved_value
from ..handlers import (
    CPU_AND_CUDA,
    KEEP,
    BitMaskCodec,
    Encode,
    EncodeWhenUnshared,
    Saved,
    SavingPolicy,
    encodings_enabled,
    register_handler,
)

aten = torch.ops.aten


def _is_nonzero(tensor):
    return tensor != 0


@functools.lru_cache(maxsize=64)
def _kept_value(dtype: torch.dtype, p: float, device: torch.device) -> float:
    """What stock's ``noise.bernoulli_(1 - p).div_(1 - p)`` holds where it keeps an element,
    divided by ``device``'s own kernel (CUDA multiplies by the reciprocal): read back once per
    dtype, p and device, not per call."""
    return torch.ones((), dtype=dtype, device=device).div_(1 - p).item()


def _train_and_random(input, p, train) -> bool:
    return bool(train) and 0 < p < 1  # otherwise stock returns x itself or multiplies by 0


class _NoiseDropout(SavingPolicy):
    """out = x * noise; backward: grad * noise. The noise is two-valued: one bit each."""

    family = "dropout"
    devices = CPU_AND_CUDA
    can_save = staticmethod(_train_and_random)

    @staticmethod
    def saved(args, outputs):
        p = args[1]
        noise = saved_value(outputs[0].grad_fn, "other")  # the Mul node the composite built
        if not encodings_enabled() or not _train_and_random(*args[:3]):  # a product with 0
            return {"other": Saved(noise, KEEP)}
        codec = BitMaskCodec(_is_nonzero, 0.0, _kept_value(noise.dtype, p, noise.device), values_exact=True)  # two-valued
        return {"other": Saved(noise, Encode(codec))}


_FUSED_DROPOUT_DEVICES = frozenset({"cuda", "xpu", "lazy"})


def _calls_native_dropout(input, p, train) -> str | None:
    """The composite's fused path (``can_save`` already asked for 0 < p < 1 in training)."""
    if input.device.type in _FUSED_DROPOUT_DEVICES and input.numel() > 0:
        return "calls native_dropout (handled there)"
    return None


@register_handler(aten.dropout.default)
class Dropout(_NoiseDropout):
    """Out of place: on CUDA the composite calls the fused ``native_dropout``, whose handler
    takes that call; this one leaves it to stock."""

    unsupported = staticmethod(_calls_native_dropout)


@register_handler(aten.dropout_.default, aten.feature_dropout.default, aten.feature_dropout_.default)
class NoiseDropout(_NoiseDropout):
    """In place and feature-wise: the float noise on every device."""


def _as_bool(tensor):
    return tensor.clone()


_BOOL_MASK = BitMaskCodec(_as_bool, False, True, values_exact=True)


@register_handler(aten.native_dropout.default)
class NativeDropout(SavingPolicy):
    """The fused kernel (CUDA, and CPU when called directly): stock keeps a bool mask, which
    the caller may hold too (``torch.native_dropout`` returns it): encoded once unshared."""

    family = "dropout"
    devices = CPU_AND_CUDA
    can_save = staticmethod(_train_and_random)

    @staticmethod
    def saved(args, outputs):
        if not encodings_enabled():
            return {"result1": Saved(outputs[1], KEEP)}
        return {"result1": Saved(outputs[1], EncodeWhenUnshared(_BOOL_MASK))}
