"""Recipes of elementwise operators whose outputs a later node may keep: products (dropout
applies its noise as ``input * noise``), sums, quotients, and casts (autocast's copies).
Operands are read where the node keeps them, else rebuilt by their own node's recipe."""

from __future__ import annotations

import torch

from ..handlers import Attr, Input, OutputDtype, Recipe, Slot, keeps, register_recipe

aten = torch.ops.aten


def _operand(node, name: str, index: int):
    """Where the node keeps an operand (stock's mul keeps each one only for the other's
    gradient), read it there; else rebuild it from the node's input edge."""
    return Slot(name) if keeps(node, name) else Input(index)


@register_recipe("MulBackward0")
def _mul(node):
    return Recipe(aten.mul.Tensor, (_operand(node, "self", 0), _operand(node, "other", 1)))


@register_recipe("MulBackward1")
def _mul_scalar(node):
    return Recipe(aten.mul.Scalar, (Input(0), Attr("other")))


@register_recipe("DivBackward1")
def _div_scalar(node):
    return Recipe(aten.div.Scalar, (Input(0), Attr("other")))


@register_recipe("AddBackward0")
def _add(node):
    return Recipe(aten.add.Tensor, (Input(0), Input(1)), {"alpha": Attr("alpha")})


@register_recipe("ToCopyBackward0")
def _cast(node):
    return Recipe(aten._to_copy.default, (Input(0),), {"dtype": OutputDtype()})
