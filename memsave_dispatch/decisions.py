"""What a saving policy can decide for each tensor a stock autograd node keeps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from torch import Tensor

if TYPE_CHECKING:
    from .codecs import Codec

__all__ = ["Decision", "KEEP", "DROP", "Encode", "EncodeWhenUnshared", "Saved"]


class Decision:
    """What a policy does with one tensor the stock node saves; ``label`` names the outcome
    in the report."""

    label = "kept"


class _Keep(Decision):
    label = "kept"

    def __repr__(self) -> str:
        return "KEEP"


class _Drop(Decision):
    label = "dropped"

    def __repr__(self) -> str:
        return "DROP"


KEEP: Decision = _Keep()
"""Leave the tensor in the node, as stock does."""

DROP: Decision = _Drop()
"""Release it; backward reads a ghost with the same sizes, strides and dtype."""


@dataclass(frozen=True)
class Encode(Decision):
    """Keep ``codec.encode(tensor)`` instead of the tensor, from the call on. For a tensor
    nothing else can hold (an operator's internal noise, an in-place operator's copy)."""

    codec: Codec

    @property
    def label(self) -> str:
        return self.codec.name


@dataclass(frozen=True)
class EncodeWhenUnshared(Decision):
    """Keep the tensor while anything else holds it (the caller, the next layer, another
    node); encode it once this node is the last holder, which is when the encoding frees
    memory. A tensor the caller keeps is never encoded: the bits would be extra."""

    codec: Codec

    label = "kept (shared)"


class Saved(NamedTuple):
    """One tensor of the stock node (``None`` if stock saves nothing there) and its fate."""

    tensor: Tensor | None
    decision: Decision
