"""The two kinds of handler, and helpers for writing them.

``SavingPolicy`` keeps stock's autograd formula (same ``grad_fn``, same backward kernel) and
only decides, per tensor the stock node saves, whether to keep it, drop it (backward reads a
zero-memory ghost of the same layout) or keep an exact encoding::

    class Convolution(SavingPolicy):
        family = "conv"

        @staticmethod
        def saved(args, outputs):
            input, weight = args[0], args[1]
            return {
                "input": Saved(input, KEEP if weight.requires_grad else DROP),
                "weight": Saved(weight, KEEP),
            }

``Handler`` replaces the formula with your own, written like a ``torch.autograd.Function``.
Both receive every operator argument positionally, defaults filled in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, NamedTuple

from torch import Tensor

from ._compat import is_compiling
from .decisions import Saved
from .ghosts import TensorLayout
from .state import outputs_held

__all__ = [
    "CPU_AND_CUDA",
    "SavingPolicy",
    "Handler",
    "OutputsToCaller",
    "caller_keeps_outputs",
    "save_needed",
    "load_saved",
    "encodings_enabled",
]


class OutputsToCaller(NamedTuple):
    """The Python entry points that hand all of an operator's outputs to their caller, who
    then holds them anyway (max pooling's indices with ``return_indices=True``)."""

    functions: frozenset = frozenset()  # always (torch.max_pool1d_with_indices, ...)
    when: str | None = None  # or when this keyword argument is true ("return_indices")


CPU_AND_CUDA: frozenset[str] = frozenset({"cpu", "cuda"})
"""``devices`` of a handler written for both (the built-in ones): it assumes nothing of the
CPU's kernels, and its encodings run on the tensor's device without reading values back."""


class _HandlerBase:
    family: ClassVar[str] = "custom"
    """A name to select handlers by (``MemSaveMode(include=["conv"])``); any string."""
    devices: ClassVar[frozenset[str]] = frozenset({"cpu"})
    """Device types whose calls this handler takes; others run stock (``CPU_AND_CUDA`` for
    both). A mode also takes only the devices it was given."""
    unsupported: ClassVar[Callable[..., str | None] | None] = None
    """``unsupported(*args) -> str | None``: a reason to leave this call to stock PyTorch
    (counted in the report), or None to handle it."""
    can_save: ClassVar[Callable[..., bool] | None] = None
    """``can_save(*args) -> bool``, decided before the call: False when the handler's own
    decisions cannot reduce what is kept (every tensor stock keeps is needed). The call then
    runs stock untouched, counted as "nothing to save", and skips the handler's overhead,
    unless a tensor it keeps could be rebuilt (the engine checks that itself)."""
    outputs_to_caller: ClassVar[OutputsToCaller | None] = None
    """Where the caller gets every output (see :func:`caller_keeps_outputs`)."""


class SavingPolicy(_HandlerBase):
    """Stock's autograd formula; ``saved(args, outputs)`` decides what its node keeps.

    ``saved`` returns, by slot name (the ``<name>`` of ``grad_fn._saved_<name>``), a
    :class:`~memsave_dispatch.handlers.Saved` pair: the tensor stock saves there (None if
    none) and a decision: ``KEEP``, ``DROP``, ``Encode(codec)`` or
    ``EncodeWhenUnshared(codec)``. Slots it does not name are kept. The report counts the
    bytes of every tensor named.
    """

    saved: ClassVar[Callable[[tuple, tuple], Mapping[str, Saved]]]


class Handler(_HandlerBase):
    """Your own autograd formula for an operator, as ``forward``/``backward`` static methods:
    ``forward(ctx, *op_args)`` runs below autograd (call the operator directly),
    ``backward(ctx, *grad_outputs)`` returns one gradient (or None) per operator argument.

    Optional: ``stock_saved(args, outputs) -> Iterable[Tensor | None]``, the tensors stock
    autograd would have kept for this call, for the report's "stock keeps" column.

    Save tensors with ``ctx.save_for_backward`` (:func:`save_needed` helps) so that
    saved-tensor hooks, ``save_on_cpu`` and version checks see them.
    """

    forward: ClassVar[Callable[..., Any]]
    backward: ClassVar[Callable[..., Any]]
    stock_saved: ClassVar[Callable[[tuple, tuple], Iterable[Tensor | None]] | None] = None


def save_needed(ctx, *candidates: tuple[Tensor | None, bool]) -> None:
    """In a Handler's forward: save each tensor whose flag is true; remember only the layout
    of the others (backward gets a ghost of them from :func:`load_saved`).

    Everything kept goes through ``ctx.save_for_backward`` so that saved-tensor hooks,
    ``save_on_cpu`` and in-place version checks see it.
    """
    ctx.save_for_backward(*(tensor if keep else None for tensor, keep in candidates))
    ctx.ghost_layouts = tuple(
        TensorLayout.of(tensor) if tensor is not None and not keep else None for tensor, keep in candidates
    )


def load_saved(ctx) -> tuple[Tensor | None, ...]:
    """In a Handler's backward: the tensors given to :func:`save_needed`, with ghosts for the
    ones it dropped."""
    return tuple(
        layout.ghost() if layout is not None else tensor for tensor, layout in zip(ctx.saved_tensors, ctx.ghost_layouts)
    )


def caller_keeps_outputs() -> bool:
    """In ``saved``: whether the call came through one of the handler's ``outputs_to_caller``
    entry points, so the caller holds every output anyway (encoding one would add a copy)."""
    return outputs_held()


def encodings_enabled() -> bool:
    """False while torch.compile traces: encodings are eager-only (a traced graph keeps the
    tensor instead), so a policy can skip preparing one, and must not run data-dependent
    tensor code on the tracing tensors."""
    return not is_compiling()
