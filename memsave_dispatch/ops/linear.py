"""Matrix products: ``addmm`` and ``mm`` (``nn.Linear`` with and without bias), ``bmm``
(attention, batched matmul).

Stock autograd already saves per requested gradient here (grad_mat1 needs mat2, grad_mat2
needs mat1). The handlers keep what stock keeps; an activation kept that backward can rebuild
from what the graph keeps anyway (a LayerNorm or GELU output, a dropped-out attention
probability: see ``memsave_dispatch.recipes``) is then dropped once unshared.
"""

from __future__ import annotations

import torch

from ..handlers import CPU_AND_CUDA, KEEP, Saved, SavingPolicy, register_handler

aten = torch.ops.aten


def _product_operands(mat1, mat2) -> dict[str, Saved]:
    return {
        "mat1": Saved(mat1 if mat2.requires_grad else None, KEEP),
        "mat2": Saved(mat2 if mat1.requires_grad else None, KEEP),
    }


@register_handler(aten.addmm.default)
class Addmm(SavingPolicy):
    """out = beta * bias + alpha * mat1 @ mat2 (``nn.Linear`` with bias, any leading dims)."""

    family = "linear"
    devices = CPU_AND_CUDA

    @staticmethod
    def saved(args, outputs):
        return _product_operands(args[1], args[2])


@register_handler(aten.mm.default, aten.bmm.default)
class Mm(SavingPolicy):
    """out = self @ mat2 (``nn.Linear`` without bias), batched too (attention's scores and
    context). Stock names the slots self/mat2."""

    family = "linear"
    devices = CPU_AND_CUDA

    @staticmethod
    def saved(args, outputs):
        operands = _product_operands(args[0], args[1])
        return {"self": operands["mat1"], "mat2": operands["mat2"]}
