"""Per-thread state: the MemSaveModes active in this thread, innermost last, and whether the
Python call being dispatched hands every output to its caller.

A mode pushes a :class:`Scope` when entered and pops it on exit; the interposing kernels
read the innermost scope to find the handler of an operator and where to record the call.
Only the thread that entered a mode sees it: every other thread runs stock PyTorch.
"""

from __future__ import annotations

import threading
from typing import Any, NamedTuple

__all__ = ["Scope", "scopes", "push", "pop", "outputs_held", "holding_outputs", "read_native_outputs_held"]


class Scope(NamedTuple):
    """What one active mode hands the engine."""

    mode: Any  # the MemSaveMode, for identity only
    entries: dict[int, Any]  # id(op) -> HandlerEntry (an OpOverload hashes in Python)
    devices: frozenset[str]
    tallies: Any  # the mode's report.Tallies


class _ThreadScopes(threading.local):
    def __init__(self) -> None:
        self.stack: list[Scope] = []
        self.outputs_held = 0  # > 0 inside a call whose caller keeps every output


_thread = _ThreadScopes()


def scopes() -> list[Scope]:
    """The scopes active in the calling thread, innermost last (the live list: read only)."""
    return _thread.stack


def push(scope: Scope) -> None:
    _thread.stack.append(scope)


def pop(mode: Any) -> bool:
    """Remove the innermost scope of ``mode`` (tolerating an out-of-order exit); returns
    whether no scope is left in this thread."""
    stack = _thread.stack
    for index in range(len(stack) - 1, -1, -1):
        if stack[index].mode is mode:
            del stack[index]
            break
    return not stack


def outputs_held() -> bool:
    """Whether the Python-level call being dispatched hands every output of the operator to
    its caller (``F.max_pool2d(..., return_indices=True)``). The compiled engine knows it from
    its own kernels where a CPU max pooling call of one of its modes came through them."""
    native = _native_outputs_held()
    return native > 0 if native >= 0 else _thread.outputs_held > 0


def _unknown() -> int:
    return -1


_native_outputs_held = _unknown


def read_native_outputs_held(reader) -> None:
    """Where the compiled engine answers :func:`outputs_held` (-1: it does not know)."""
    global _native_outputs_held
    _native_outputs_held = reader


class holding_outputs:
    """Context of a call whose caller keeps every output (see :func:`outputs_held`)."""

    def __enter__(self) -> None:
        _thread.outputs_held += 1

    def __exit__(self, *exc_info) -> None:
        _thread.outputs_held -= 1
