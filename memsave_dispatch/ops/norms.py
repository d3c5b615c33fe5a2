"""Normalization layers.

Which batch-norm operator ``nn.BatchNorm1d/2d/3d``, ``F.batch_norm`` and ``F.instance_norm``
reach (``_batch_norm_impl_index`` in ATen's Normalization.cpp): on CPU always
``aten.native_batch_norm``; on CUDA ``aten.cudnn_batch_norm`` when the input has at least 3
dimensions, weight and bias are both given, running statistics are given (or absent in
training), neither input nor weight is bfloat16 and a half input has a float weight;
``aten.miopen_batch_norm`` on ROCm under similar conditions; ``aten.native_batch_norm``
otherwise (no affine, 2-d input, bfloat16, ...). All three get the same decisions.
"""

from __future__ import annotations

import torch

from ..handlers import (
    CPU_AND_CUDA,
    DROP,
    KEEP,
    Attr,
    Noted,
    Recipe,
    Saved,
    SavingPolicy,
    Slot,
    note,
    register_handler,
    register_recipe,
)

aten = torch.ops.aten


def _batch_norm_can_save(input, weight, _bias, _running_mean, _running_var, training, *_) -> bool:
    return not _needs_input(input, weight, training)


def _batch_norm_saved(args, outputs) -> dict[str, Saved]:
    """The slots all three batch-norm nodes share: x, w, the running and the batch statistics."""
    input, weight, _bias, running_mean, running_var, training = args[:6]
    keep_input = KEEP if _needs_input(input, weight, training) else DROP
    return {
        "input": Saved(input, keep_input),
        "weight": Saved(weight, KEEP),
        "running_mean": Saved(running_mean, KEEP),
        "running_var": Saved(running_var, KEEP),
        "result1": Saved(outputs[1], keep_input),  # batch mean (empty in eval mode)
        "result2": Saved(outputs[2], keep_input),  # batch inverse std (or variance)
    }


@register_handler(aten.native_batch_norm.default)
class NativeBatchNorm(SavingPolicy):
    """y = (x - mean) * invstd * w + b, with batch statistics (training) or running ones (eval).

    grad_b = sum(grad) needs nothing. grad_w = sum(grad * x_hat) needs x and the statistics.
    grad_x needs w, and in training also x_hat (the batch statistics depend on x); in eval
    mode it is grad * w * invstd(running_var) and needs no activation. Stock keeps x always.
    Running statistics are buffers: keeping them costs nothing.
    """

    family = "norm"
    devices = CPU_AND_CUDA
    can_save = staticmethod(_batch_norm_can_save)
    saved = staticmethod(_batch_norm_saved)


@register_handler(aten.cudnn_batch_norm.default)
class CudnnBatchNorm(SavingPolicy):
    """cuDNN's batch norm (CUDA): the same formula and the same decisions as native batch norm.

    Backward (derivatives.yaml): in training ``cudnn_batch_norm_backward(x, grad, w, running
    stats, result1, result2, eps, result3)``, which computes all three gradients at once and
    needs x only for grad_x and grad_w (grad_b = sum(grad)); in eval mode
    ``native_batch_norm_backward`` on the running statistics, as native batch norm's. cuDNN
    requires x contiguous in its own memory format: a ghost keeps x's strides, a zero-stride
    placeholder would be refused. result3 is cuDNN's reserve space, kept (empty for plain
    batch norm).
    """

    family = "norm"
    devices = CPU_AND_CUDA
    can_save = staticmethod(_batch_norm_can_save)

    @staticmethod
    def saved(args, outputs):
        return {**_batch_norm_saved(args, outputs), "result3": Saved(outputs[3], KEEP)}


@register_handler(aten.miopen_batch_norm.default)
class MiopenBatchNorm(SavingPolicy):
    """MIOpen's batch norm (ROCm): backward as cuDNN's, without a reserve space."""

    family = "norm"
    devices = CPU_AND_CUDA
    can_save = staticmethod(_batch_norm_can_save)
    saved = staticmethod(_batch_norm_saved)


def _needs_input(input, weight, training) -> bool:
    return (weight is not None and weight.requires_grad) or (training and input.requires_grad)


def _affine_or_input_needs_grad(input, weight) -> bool:
    return input.requires_grad or (weight is not None and weight.requires_grad)


def _input_and_statistics(input, weight, outputs) -> dict:
    """Layer and group norm: x, mean and rstd serve grad_x and grad_w only."""
    keep = KEEP if _affine_or_input_needs_grad(input, weight) else DROP
    return {
        "input": Saved(input, keep),
        "result1": Saved(outputs[1], keep),
        "result2": Saved(outputs[2], keep),
        "weight": Saved(weight, KEEP),
    }


@register_handler(aten.native_layer_norm.default)
class NativeLayerNorm(SavingPolicy):
    """y = (x - mean) * rstd * w + b over the last dimensions (``nn.LayerNorm``).

    grad_x and grad_w need x and the statistics; grad_b = sum(grad) needs nothing. Stock
    keeps x, mean and rstd even when only the bias trains (BitFit): here they go then.
    Every call is handled, to note its epsilon: a later node that keeps y (a linear layer)
    can then drop it, and backward re-runs the kernel on what this node keeps.
    (``F.rms_norm`` on CPU is composed of elementwise operators, not one operator.)
    """

    family = "norm"
    devices = CPU_AND_CUDA

    @staticmethod
    def saved(args, outputs):
        input, _shape, weight, bias, eps = args[:5]
        note(outputs[0].grad_fn, eps=eps)
        return {**_input_and_statistics(input, weight, outputs), "bias": Saved(bias, KEEP)}


@register_handler(aten.native_group_norm.default)
class NativeGroupNorm(SavingPolicy):
    """``nn.GroupNorm``: as layer norm, per group; bias-only keeps nothing."""

    family = "norm"
    devices = CPU_AND_CUDA

    @staticmethod
    def can_save(input, weight, *_rest):
        return not _affine_or_input_needs_grad(input, weight)

    @staticmethod
    def saved(args, outputs):
        return _input_and_statistics(args[0], args[1], outputs)



@register_recipe("NativeLayerNormBackward0")
def _layer_norm(node):
    """y, from what the node keeps when x or w needs a gradient (never from mean and rstd by
    a formula: that differs from the fused kernel in the last bits)."""
    inputs = (Slot("input"), Attr("normalized_shape"), Slot("weight", optional=True), Slot("bias", optional=True))
    return Recipe(aten.native_layer_norm.default, (*inputs, Noted("eps")), output=0)
