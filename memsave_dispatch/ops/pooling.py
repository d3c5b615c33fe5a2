"""Pooling. ``F.max_pool1d``/``F.avg_pool1d`` and the adaptive 1-d forms route through the
2-d operators (unsqueeze, pool, squeeze), so the 2-d handlers cover them.

Backward of every pooling operator reads the input only for its layout: max pooling scatters
the gradient through the saved argmax indices, average pooling spreads it evenly. Stock
keeps the input anyway; these keep the indices (max) or nothing (average).
"""

from __future__ import annotations

import torch

from ..policy import DROP, KEEP, Saved
from ..registry import SavingPolicy, register_handler

aten = torch.ops.aten


@register_handler(
    aten.max_pool2d_with_indices.default,
    aten.max_pool3d_with_indices.default,
    aten.adaptive_max_pool2d.default,
    aten.adaptive_max_pool3d.default,
)
class MaxPool(SavingPolicy):
    """(out, indices) = maxpool(x): grad_x = scatter(grad, indices); x is never read."""

    family = "pooling"

    @staticmethod
    def saved(args, outputs):
        return {"self": Saved(args[0], DROP), "result1": Saved(outputs[1], KEEP)}


@register_handler(
    aten.avg_pool2d.default,
    aten.avg_pool3d.default,
    aten._adaptive_avg_pool2d.default,
    aten._adaptive_avg_pool3d.default,
)
class AvgPool(SavingPolicy):
    """out = avgpool(x): grad_x spreads grad evenly over each window; x is never read."""

    family = "pooling"

    @staticmethod
    def saved(args, outputs):
        return {"self": Saved(args[0], DROP)}


@register_handler(aten.mean.dim)
class GlobalAveragePool(SavingPolicy):
    """``nn.AdaptiveAvgPool2d(1)`` and ``x.mean(dims)``: stock keeps only sizes. Handled so
    that a deferred encoding of the input (a ReLU output) happens: nothing keeps it here."""

    family = "pooling"

    @staticmethod
    def saved(args, outputs):
        return {}

    @staticmethod
    def released(input, *_params):
        return (input,)
