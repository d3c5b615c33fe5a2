"""Convolution, all of 1-d/2-d/3-d and transposed: ``aten.convolution``.

``F.conv*d``, ``nn.Conv*d`` (any ``padding_mode``: non-zero modes pad in a separate op),
``padding='same'`` and ``conv_transpose*d`` all reach this one operator, on CUDA too: cuDNN
(or another backend) is chosen below autograd, and every backend's backward goes through
``convolution_backward``, which reads a dropped input only for its layout (the ghost keeps it,
so cuDNN's memory-format choice is stock's).
"""

from __future__ import annotations

import torch
from torch.nn import Parameter

from ..handlers import CPU_AND_CUDA, DROP, KEEP, Saved, SavingPolicy, register_handler

aten = torch.ops.aten


@register_handler(aten.convolution.default)
class Convolution(SavingPolicy):
    """out = conv(x, W) + b.

    grad_x = conv_transposed(grad, W) needs W; grad_W = correlate(x, grad) needs x;
    grad_b = sum(grad) needs neither. Stock keeps x and W whatever was requested.
    A parameter W is kept regardless: it outlives the graph anyway.
    """

    family = "conv"
    devices = CPU_AND_CUDA

    @staticmethod
    def can_save(input, weight, *_params):
        return not weight.requires_grad or _drops_weight(input, weight)

    @staticmethod
    def saved(args, outputs):
        input, weight = args[0], args[1]
        return {
            "input": Saved(input, KEEP if weight.requires_grad else DROP),
            "weight": Saved(weight, DROP if _drops_weight(input, weight) else KEEP),
        }


def _drops_weight(input, weight) -> bool:
    """A weight that is an activation (not a parameter) is dropped when x needs no gradient."""
    return not input.requires_grad and not isinstance(weight, Parameter)
