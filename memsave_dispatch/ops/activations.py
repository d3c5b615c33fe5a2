"""Activations whose derivative is a 0/1 mask: one bit per element decides every gradient.

``nn.ReLU``/``F.relu`` reach ``aten.relu``; ``inplace=True`` (as torchvision uses) reaches
``aten.relu_``. Stock keeps the float output (4 bytes per element in fp32).
"""

from __future__ import annotations

import torch

from ..policy import EncodeWhenReleased, Saved
from ..registry import SavingPolicy, register_handler
from ..saving import ZeroMaskCodec

aten = torch.ops.aten

_RELU_MASK = EncodeWhenReleased(ZeroMaskCodec())


@register_handler(aten.relu.default, aten.relu_.default)
class Relu(SavingPolicy):
    """y = max(x, 0); stock backward is threshold_backward(grad, y, 0) = (y <= 0) ? +0 : grad.

    It reads y only through ``y <= 0``: one bit per element reproduces it exactly (NaN passes
    the gradient, -0.0 zeroes it). y is usually the next layer's input too, so the bits
    replace it only once that layer drops it.
    """

    family = "activation"

    @staticmethod
    def saved(args, outputs):
        return {"result": Saved(outputs[0], _RELU_MASK)}
