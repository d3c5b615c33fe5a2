"""What differs between the torch releases this package supports (2.9 and later)."""

from __future__ import annotations

import torch
from torch._guards import TracingContext
from torch.torch_version import TorchVersion

__all__ = ["is_compiling", "SAVED_SLOTS_READABLE", "BFLOAT16_ADAPTIVE_MAX_POOL2D_INDICES_IN_WINDOW"]

_TORCH = TorchVersion(torch.__version__)
_dynamo_compiling = torch.compiler.is_compiling
_tracing_context = TracingContext.try_get


def _compiling_or_tracing_for_compile() -> bool:
    return _dynamo_compiling() or _tracing_context() is not None


#: Whether torch.compile is tracing: Dynamo, or AOTAutograd behind it. Before torch 2.13
#: ``torch.compiler.is_compiling()`` is false while AOTAutograd traces the joint graph
#: (measured on 2.9.1 to 2.12.1); the tracing context torch.compile sets up for the whole
#: compilation is there in every release, but reading it costs 0.4 us a call.
is_compiling = _dynamo_compiling if _TORCH >= "2.13" else _compiling_or_tracing_for_compile


#: Whether a saved-tensor slot shows what it holds without unpacking it
#: (``SavedTensor.data`` and ``.unpack_hook``, torch 2.13 and later).
SAVED_SLOTS_READABLE = hasattr(torch._C._autograd.SavedTensor, "unpack_hook")

#: Before torch 2.11, the CPU bfloat16 kernel of ``adaptive_max_pool2d`` on a contiguous input
#: can return argmax indices outside their pooling window (measured on 2.9.1 and 2.10.0, e.g.
#: a 17x17 input pooled to 5x5); stock's backward scatters through them as they are.
BFLOAT16_ADAPTIVE_MAX_POOL2D_INDICES_IN_WINDOW = _TORCH >= "2.11"
