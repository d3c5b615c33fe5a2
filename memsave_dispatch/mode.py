"""MemSaveMode: the public context manager."""

from __future__ import annotations

import functools
import hashlib
import inspect
import sys
import threading
import warnings
from collections.abc import Iterable
from typing import Union

import torch
from torch._ops import OpOverload, OpOverloadPacket
from torch.overrides import TorchFunctionMode

from . import interposer, registry
from .report import OpTally, Report

__all__ = ["MemSaveMode", "VERIFIED_DEVICES"]

OpSelector = Union[OpOverload, OpOverloadPacket, str, type]
VERIFIED_DEVICES = frozenset({"cpu"})


class _CompileCacheTag:
    """Keeps torch.compile's persistent caches from handing a graph compiled under one saving
    policy to a compilation under another.

    Dynamo guards on the torch-function mode stack, so in-process code is never reused across
    the mode boundary. But AOTAutograd's and Inductor's caches key on the captured graph, which
    the mode does not change (it acts below, at the Autograd kernel), so they would. While any
    MemSaveMode is active, ``torch.compiler.config.cache_key_tag`` carries the policy of the
    latest one entered. That setting is process-wide: a thread compiling outside the mode at the
    same time also gets the tag (it then misses the cache; it never gets a wrong artifact
    unless two threads compile the same graph under different policies concurrently).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = 0
        self._base = ""

    def enter(self, fingerprint: str) -> None:
        from torch.compiler import config

        with self._lock:
            if self._active == 0:
                self._base = config.cache_key_tag
            self._active += 1
            config.cache_key_tag = f"{self._base}|memsave_dispatch:{fingerprint}"

    def exit(self) -> None:
        from torch.compiler import config

        with self._lock:
            self._active -= 1
            if self._active == 0:
                config.cache_key_tag = self._base


_compile_cache_tag = _CompileCacheTag()


@functools.lru_cache(maxsize=None)
def _code_identity(handler: type) -> str:
    """Name and source hash of a handler and the module defining it: an edited or upgraded
    handler must not be served a graph compiled with the old one from the on-disk caches."""
    module = sys.modules.get(handler.__module__)
    try:
        source = inspect.getsource(module) if module is not None else inspect.getsource(handler)
    except (OSError, TypeError):  # defined interactively: no source to hash
        source = repr(id(handler))
    digest = hashlib.sha256(source.encode()).hexdigest()[:12]
    return f"{handler.__module__}.{handler.__qualname__}@{digest}"

# Python entry points that always hand max pooling's indices to their caller (the functional
# forms say so with a ``return_indices`` argument, checked separately).
_RETURN_INDICES = frozenset(
    {
        torch._C._nn.max_pool2d_with_indices,
        torch._C._nn.max_pool3d_with_indices,
        torch._C._nn.adaptive_max_pool2d,
        torch._C._nn.adaptive_max_pool3d,
        torch.max_pool1d_with_indices,
        torch.adaptive_max_pool1d,
    }
)


class MemSaveMode(TorchFunctionMode):
    """Inside this context, autograd keeps only what the requested gradients need.

    Every registered aten operator called in this thread, with grad mode on and some
    argument requiring grad, runs through its handler; gradients are bit-identical to stock.
    Other threads, and this thread after exit, run stock PyTorch.

    Args:
        include: handle only these operators (aten overloads or packets, op family names
            such as ``"conv"``, or handler classes). Default: every registered handler.
        exclude: never handle these.
        devices: device types to handle. Only ``"cpu"`` is verified bit-exact; others warn.

    The mode is a ``TorchFunctionMode``: torch.compile guards on the mode stack, so a graph
    compiled inside the mode is never reused outside it, and vice versa.
    """

    def __init__(
        self,
        *,
        include: Iterable[OpSelector] | None = None,
        exclude: Iterable[OpSelector] | None = None,
        devices: Iterable[str] = ("cpu",),
    ) -> None:
        super().__init__()
        self._include = None if include is None else tuple(include)
        self._exclude = () if exclude is None else tuple(exclude)
        self.devices = frozenset(devices)
        known = set(interposer.DEVICES.values())
        if self.devices - known:
            raise ValueError(
                f"unknown device type(s) {sorted(self.devices - known)}; MemSaveMode handles {sorted(known)}"
            )
        unverified = self.devices - VERIFIED_DEVICES
        if unverified:
            warnings.warn(
                f"MemSaveMode on {sorted(unverified)} is not verified bit-exact against stock "
                f"PyTorch; run tools/gpu_check.py on that device first",
                stacklevel=2,
            )
        self._ops = self._select_ops()  # validates selectors now, refreshed on every entry
        self._entries: dict = {}
        self._entries_by_id: dict[int, registry.HandlerEntry] = {}  # id(op): OpOverload hashes in Python
        self._tallies: dict[int, OpTally] = {}  # by id(op), likewise
        self._tallies_lock = threading.Lock()

    # -- selection -------------------------------------------------------------------
    def _select_ops(self) -> frozenset[OpOverload]:
        registered = registry.registered_ops()
        chosen = set(registered) if self._include is None else _resolve(self._include, registered, "include")
        return frozenset(chosen - _resolve(self._exclude, registered, "exclude"))

    @property
    def ops(self) -> frozenset[OpOverload]:
        """The operators this mode handles."""
        return self._ops

    # -- context manager -------------------------------------------------------------
    def __enter__(self) -> MemSaveMode:
        self._ops = self._select_ops()
        self._entries = {op: registry.handler_for(op) for op in self._ops}
        self._entries_by_id = {id(op): entry for op, entry in self._entries.items()}
        interposer.install()
        _compile_cache_tag.enter(self._fingerprint())
        interposer.push_mode(self)
        try:
            super().__enter__()
        except BaseException:
            interposer.pop_mode(self)
            _compile_cache_tag.exit()
            raise
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        try:
            super().__exit__(exc_type, exc, traceback)
        finally:
            interposer.pop_mode(self)
            _compile_cache_tag.exit()

    def _fingerprint(self) -> str:
        """Which handler (and which version of its code) serves which operator, on which
        devices: what a compiled graph bakes in."""
        handlers = sorted(f"{op}={_code_identity(entry.handler)}" for op, entry in self._entries.items())
        return hashlib.sha256("\n".join([*handlers, *sorted(self.devices)]).encode()).hexdigest()[:16]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if kwargs.get("return_indices") or func in _RETURN_INDICES:
            # The caller keeps the argmax indices: re-encoding them would add a copy.
            with interposer.holding_outputs():
                return func(*args, **kwargs)
        return func(*args, **kwargs)

    # -- report ----------------------------------------------------------------------
    def _tally(self, op: OpOverload, family: str) -> OpTally:
        tally = self._tallies.get(id(op))
        if tally is None:
            with self._tallies_lock:
                tally = self._tallies.setdefault(id(op), OpTally(str(op), family))
        return tally

    def report(self) -> Report:
        """A snapshot of what this mode intercepted so far (``to_dict()`` for JSON)."""
        return Report(tuple(tally.snapshot() for tally in list(self._tallies.values())))

    def print_report(self, console=None) -> None:
        """Print the report as a rich table."""
        if console is None:
            from rich.console import Console

            console = Console()
        console.print(self.report().table())

    def reset_report(self) -> None:
        with self._tallies_lock:
            self._tallies.clear()


def _resolve(selectors: Iterable[OpSelector], registered, what: str) -> set[OpOverload]:
    chosen: set[OpOverload] = set()
    for selector in selectors:
        if isinstance(selector, OpOverload):
            if selector not in registered:
                raise ValueError(f"{what}: {selector} has no registered handler")
            chosen.add(selector)
        elif isinstance(selector, OpOverloadPacket):
            matches = {op for op in registered if op.overloadpacket is selector}
            if not matches:
                raise ValueError(f"{what}: no overload of {selector} has a registered handler")
            chosen |= matches
        elif isinstance(selector, str):
            if selector not in registry.FAMILIES:
                raise ValueError(f"{what}: unknown op family {selector!r}; families: {registry.FAMILIES}")
            chosen |= {op for op in registered if registry.handler_for(op).family == selector}
        elif isinstance(selector, type):
            matches = {op for op in registered if registry.handler_for(op).handler is selector}
            if not matches:
                raise ValueError(f"{what}: {selector.__name__} is not a registered handler")
            chosen |= matches
        else:
            raise TypeError(
                f"{what} takes aten operators, op family names or handler classes, got {selector!r}"
            )
    return chosen
