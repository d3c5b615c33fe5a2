"""Bit-identical, as this project means it: same dtype, shape, strides and raw bits.

``torch.equal`` calls ``-0.0`` and ``+0.0`` equal and NaN unequal to itself; comparing the raw
bits counts the sign of zero and NaN payloads, which is what "the same gradient as stock"
requires. The demo, the tests, the benchmark and the GPU check all compare through here.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["difference", "bit_identical"]

_AS_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def difference(actual: Tensor | None, expected: Tensor | None) -> str | None:
    """None when the two are bit-identical (or both None), else what differs."""
    if actual is None or expected is None:
        return None if actual is None and expected is None else f"{actual!r} vs {expected!r}"
    if actual.dtype != expected.dtype:
        return f"dtype {actual.dtype} vs {expected.dtype}"
    if actual.shape != expected.shape:
        return f"shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    if actual.numel() > 1 and actual.stride() != expected.stride():
        return f"strides {actual.stride()} vs {expected.stride()}"
    if actual.device != expected.device:
        return f"device {actual.device} vs {expected.device}"
    actual, expected = actual.detach(), expected.detach()
    if actual.is_floating_point() or actual.is_complex():
        bits = _AS_BITS[actual.element_size() // (2 if actual.is_complex() else 1)]
        actual = torch.view_as_real(actual) if actual.is_complex() else actual
        expected = torch.view_as_real(expected) if expected.is_complex() else expected
        same = torch.equal(actual.view(bits), expected.view(bits))
    else:
        same = torch.equal(actual, expected)
    if same:
        return None
    if actual.is_floating_point():
        return f"values differ (max abs diff {(actual.double() - expected.double()).abs().max().item()})"
    return "values differ"


def bit_identical(actual: Tensor | None, expected: Tensor | None) -> bool:
    return difference(actual, expected) is None
