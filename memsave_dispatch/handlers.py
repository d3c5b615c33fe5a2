"""Everything a custom handler needs, in one place.

A handler tells MemSaveMode what an aten operator's backward node keeps. A
:class:`SavingPolicy` keeps stock's formula and decides per saved tensor: ``KEEP``, ``DROP``
(backward reads a ghost: same layout, no memory), ``Encode(codec)`` or
``EncodeWhenUnshared(codec)`` (an exact compact stand-in, made at once or once nothing else
holds the tensor). A :class:`Handler` replaces the formula with your own autograd Function.

A :class:`Recipe`, registered per autograd node type with :func:`register_recipe`, says how
a node's output is rebuilt from what the graph keeps anyway: a kept tensor whose producer has
a recipe is dropped once unshared and rebuilt in backward by re-running the stock operator.

    import torch
    from memsave_dispatch.handlers import DROP, Saved, SavingPolicy, register_handler

    @register_handler(torch.ops.aten.reflection_pad2d.default)
    class ReflectionPad(SavingPolicy):
        @staticmethod
        def saved(args, outputs):  # backward reads the input only for its shape
            return {"self": Saved(args[0], DROP)}

Register globally with :func:`register_handler`, or for one mode only with
``MemSaveMode(handlers={op: ReflectionPad})``.
"""

from __future__ import annotations

from .authoring import (
    CPU_AND_CUDA,
    Handler,
    OutputsToCaller,
    SavingPolicy,
    caller_keeps_outputs,
    encodings_enabled,
    load_saved,
    save_needed,
)
from .codecs import BitMask, BitMaskCodec, Codec, two_value_table
from .decisions import DROP, KEEP, Decision, Encode, EncodeWhenUnshared, Saved
from .recipes import (
    REBUILDS_AVAILABLE,
    Attr,
    Input,
    Noted,
    OutputDtype,
    Recipe,
    Slot,
    keeps,
    note,
    register_recipe,
    unregister_recipe,
)
from .registry import RegistrationError, register_handler, registered_ops, unregister_handler

__all__ = [
    "CPU_AND_CUDA",
    "SavingPolicy",
    "Handler",
    "Saved",
    "Decision",
    "KEEP",
    "DROP",
    "Encode",
    "EncodeWhenUnshared",
    "Codec",
    "BitMaskCodec",
    "BitMask",
    "two_value_table",
    "save_needed",
    "load_saved",
    "encodings_enabled",
    "OutputsToCaller",
    "caller_keeps_outputs",
    "Recipe",
    "Slot",
    "Input",
    "Attr",
    "Noted",
    "OutputDtype",
    "register_recipe",
    "REBUILDS_AVAILABLE",
    "unregister_recipe",
    "note",
    "keeps",
    "register_handler",
    "unregister_handler",
    "registered_ops",
    "RegistrationError",
]
