"""Dropout.

On CPU, ``F.dropout``/``nn.Dropout`` reach the composite ``aten.dropout`` (``dropout_`` with
``inplace=True``; ``feature_dropout`` for ``nn.Dropout1d/2d/3d``): it draws a float noise
tensor (0 or 1/(1-p)) and multiplies, so stock keeps that float noise, 4 bytes per element in
fp32. On CUDA they reach ``aten.native_dropout``, which keeps a bool mask (1 byte).

Both keep 1 bit per element here. The operator still runs stock, so the random stream is
consumed exactly as stock does and outputs are bit-identical under the same seed; the noise
is rebuilt exactly in backward (the kept value is computed by the same division stock used).
"""

from __future__ import annotations

import torch

from ..handlers import (
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


def _kept_value(dtype: torch.dtype, p: float) -> float:
    """What stock's ``noise.bernoulli_(1 - p).div_(1 - p)`` holds where it keeps an element."""
    return torch.ones((), dtype=dtype).div_(1 - p).item()


@register_handler(aten.dropout.default, aten.dropout_.default, aten.feature_dropout.default, aten.feature_dropout_.default)
class Dropout(SavingPolicy):
    """out = x * noise; backward: grad * noise. The noise is two-valued: one bit each."""

    family = "dropout"

    @staticmethod
    def can_save(input, p, train):
        return bool(train) and 0 < p < 1  # otherwise stock returns x itself or multiplies by 0

    @staticmethod
    def saved(args, outputs):
        p = args[1]
        noise = outputs[0].grad_fn._saved_other  # the Mul node the composite built
        if not encodings_enabled():
            return {"other": Saved(noise, KEEP)}
        codec = BitMaskCodec(_is_nonzero, 0.0, _kept_value(noise.dtype, p), values_exact=True)  # noise is two-valued
        return {"other": Saved(noise, Encode(codec))}


def _as_bool(tensor):
    return tensor.clone()


_BOOL_MASK = BitMaskCodec(_as_bool, False, True, values_exact=True)


@register_handler(aten.native_dropout.default)
class NativeDropout(SavingPolicy):
    """The fused kernel (CUDA, and CPU when called directly): stock keeps a bool mask, which
    the caller may hold too (``torch.native_dropout`` returns it): encoded once unshared."""

    family = "dropout"

    @staticmethod
    def can_save(input, p, train):
        return bool(train) and 0 < p < 1

    @staticmethod
    def saved(args, outputs):
        if not encodings_enabled():
            return {"result1": Saved(outputs[1], KEEP)}
        return {"result1": Saved(outputs[1], EncodeWhenUnshared(_BOOL_MASK))}
