"""MemSaveMode: the public context manager."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import inspect
import pathlib
import sys
import threading
import warnings
from collections.abc import Iterable, Mapping
from typing import Union

import torch
from rich.console import Console
from torch.compiler import config as compiler_config
from torch.overrides import TorchFunctionMode

from . import compiled, engine, registry, state
from ._compat import OpOverload, OpOverloadPacket
from .registry import HandlerEntry
from .report import Report, Tallies

__all__ = ["MemSaveMode", "VERIFIED_DEVICES"]

OpSelector = Union[OpOverload, OpOverloadPacket, str, type]
VERIFIED_DEVICES = frozenset({"cpu"})
#: The one run that verifies a GPU (and writes docs/gpu-results.json and .md).
VERIFY_COMMAND = "timeout 360 python tools/gpu_check.py"


class MemSaveMode(TorchFunctionMode):
    """Inside this context, autograd keeps only what the requested gradients need.

    Every handled aten operator called in this thread, with grad mode on and some argument
    requiring grad, runs through its handler; gradients are bit-identical to stock. Other
    threads, and this thread after exit, run stock PyTorch.

    Args:
        include: handle only these operators (aten overloads or packets, family names such
            as ``"conv"``, or handler classes). Default: every registered handler.
        exclude: never handle these.
        handlers: ``{aten overload: handler class}`` for this mode only, on top of (and
            replacing) the registered handlers, like ``FlopCounterMode``'s custom mapping.
        devices: device types to handle (``"cpu"``, ``"cuda"`` or ``torch.device``s). Only
            ``"cpu"`` is verified bit-exact; others warn, naming the command that verifies them.

    Engines: the built-in handlers run compiled (C++, built on first use) unless
    ``MEMSAVE_DISPATCH_ENGINE=python`` asks for the pure-Python engine, or the extension cannot
    be built (one warning says why); handlers from Python always run on the Python engine, in
    the same mode. ``report().engine`` says which ran. Both keep the same bytes and give the
    same gradients.

    torch.compile never reuses a graph compiled inside the mode outside it, nor the reverse:
    on the Python engine the mode is an active ``TorchFunctionMode`` (dynamo guards on the
    mode stack); on the compiled engine it marks its thread with a dispatch key, which
    dynamo's guards see in every tensor's key set, at no cost per torch call.
    """

    def __init__(
        self,
        *,
        include: OpSelector | Iterable[OpSelector] | None = None,
        exclude: OpSelector | Iterable[OpSelector] | None = None,
        handlers: Mapping[OpOverload, type] | None = None,
        devices: str | torch.device | Iterable[str | torch.device] = ("cpu",),
    ) -> None:
        super().__init__()
        self._include = None if include is None else _as_items(include)
        self._exclude = () if exclude is None else _as_items(exclude)
        self._own = {op: registry.make_entry(op, handler) for op, handler in (handlers or {}).items()}
        self.devices = _device_types(devices)
        unverified = self.devices - VERIFIED_DEVICES
        if unverified:
            warnings.warn(
                f"MemSaveMode on {sorted(unverified)} is not verified bit-exact against stock PyTorch "
                f"yet; verify it on that device first: {VERIFY_COMMAND}, from a checkout of "
                f"memsave-dispatch (docs/gpu.md says what it checks)",
                stacklevel=2,
            )
        self._entries = self._select()  # validates the selectors now; refreshed on every entry
        self._holding_functions, self._holding_keywords = _entry_points_returning_outputs(self._entries.values())
        self._tallies = Tallies()
        self._engine = compiled.engine_for_new_mode()
        self._native: compiled.ModeState | None = None
        self._as_function_mode: list[bool] = []  # per entry: whether it entered as a TorchFunctionMode

    # -- selection -------------------------------------------------------------------------
    def _select(self) -> dict[OpOverload, HandlerEntry]:
        available = {op: registry.handler_for(op) for op in registry.registered_ops()}
        available.update(self._own)
        chosen = set(available) if self._include is None else _resolve(self._include, available, "include")
        chosen -= _resolve(self._exclude, available, "exclude")
        return {op: available[op] for op in chosen}

    @property
    def ops(self) -> frozenset[OpOverload]:
        """The operators this mode handles."""
        return frozenset(self._entries)

    # -- context manager -------------------------------------------------------------------
    def __enter__(self) -> MemSaveMode:
        self._entries = self._select()
        self._holding_functions, self._holding_keywords = _entry_points_returning_outputs(self._entries.values())
        engine.install(self._entries)
        _compile_cache_tag.enter(self._fingerprint())
        state.push(state.Scope(self, {id(op): e for op, e in self._entries.items()}, self.devices, self._tallies))
        native = self._native_state()
        if native is not None:
            native.enter(self._entries, self.devices, compiled=self._engine == "compiled")
        as_function_mode = self._needs_torch_function_mode()
        try:
            if as_function_mode:
                super().__enter__()
        except BaseException:
            self._leave()
            raise
        self._as_function_mode.append(as_function_mode)
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        try:
            if self._as_function_mode.pop():
                super().__exit__(exc_type, exc, traceback)
        finally:
            self._leave()

    def _leave(self) -> None:
        engine.leave(self)
        if self._native is not None:
            self._native.exit()
        _compile_cache_tag.exit()

    def _native_state(self) -> compiled.ModeState | None:
        """This mode's state in the compiled engine, once that is loaded (its kernels then see
        every call, whichever engine the mode runs on)."""
        if self._native is None and (module := compiled.loaded()) is not None:
            self._native = compiled.ModeState(module)
        return self._native

    def _needs_torch_function_mode(self) -> bool:
        """Whether some handler here asks which Python function was called (max pooling's
        ``return_indices``) and the compiled engine's kernels cannot answer it: all of them on
        the Python engine, handlers from Python, and other devices than the CPU."""
        if self._engine == "python" or self.devices != {"cpu"}:
            return True
        return any(
            entry.handler.outputs_to_caller is not None and compiled.RULES.get(op) is not entry.handler
            for op, entry in self._entries.items()
        )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._holding_functions or (self._holding_keywords and _any_true(kwargs, self._holding_keywords)):
            with state.holding_outputs():  # the caller keeps every output (handlers ask)
                return func(*args, **kwargs)
        return func(*args, **kwargs)

    def _fingerprint(self) -> str:
        """Which handler (and which version of its code) serves which operator, on which
        devices: what a compiled graph bakes in."""
        handlers = sorted(f"{op}={_code_identity(entry.handler)}" for op, entry in self._entries.items())
        lines = [_package_identity(), *handlers, *sorted(self.devices)]
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]

    # -- report ----------------------------------------------------------------------------
    def report(self) -> Report:
        """A snapshot of what this mode intercepted so far (``to_dict()`` for JSON)."""
        lines = self._native.lines() if self._native is not None else ()
        return self._tallies.report(engine=self._engine, compiled_lines=lines)

    def print_report(self, console=None) -> None:
        """Print the report as a rich table (fits an 80-column terminal)."""
        if console is None:

            console = Console()
        console.print(self.report().table())

    def reset_report(self) -> None:
        self._tallies.clear()
        if self._native is not None:
            self._native.clear()


def _entry_points_returning_outputs(entries: Iterable[HandlerEntry]) -> tuple[frozenset, tuple[str, ...]]:
    functions: set = set()
    keywords: set[str] = set()
    for entry in entries:
        declared = entry.handler.outputs_to_caller
        if declared is not None:
            functions |= declared.functions
            if declared.when:
                keywords.add(declared.when)
    return frozenset(functions), tuple(sorted(keywords))


def _any_true(kwargs: dict, names: tuple[str, ...]) -> bool:
    return any(kwargs.get(name) for name in names)


def _as_items(value: object) -> tuple:
    """One selector or several: a string, an operator or a class is one item."""
    if isinstance(value, (str, OpOverload, OpOverloadPacket, type)):
        return (value,)
    return tuple(value)


def _device_types(devices: object) -> frozenset[str]:
    items = (devices,) if isinstance(devices, (str, torch.device)) else tuple(devices)
    types = frozenset(item.type if isinstance(item, torch.device) else item for item in items)
    known = set(engine.DEVICES.values())
    if not types:
        raise ValueError(f"devices is empty: MemSaveMode would handle nothing; give some of {sorted(known)}")
    unknown = sorted(map(repr, types - known))
    if unknown:
        raise ValueError(f"unknown device type(s) {', '.join(unknown)}; MemSaveMode handles {sorted(known)}")
    return types


def _resolve(selectors: Iterable[OpSelector], available: Mapping[OpOverload, HandlerEntry], what: str) -> set[OpOverload]:
    chosen: set[OpOverload] = set()
    families = sorted({entry.family for entry in available.values()})
    for selector in selectors:
        if isinstance(selector, OpOverload):
            if selector not in available:
                raise ValueError(f"{what}: {selector} has no handler; handled operators: {sorted(map(str, available))}")
            chosen.add(selector)
        elif isinstance(selector, OpOverloadPacket):
            matches = {op for op in available if op.overloadpacket is selector}
            if not matches:
                raise ValueError(f"{what}: no overload of {selector} has a handler")
            chosen |= matches
        elif isinstance(selector, str):
            if selector not in families:
                raise ValueError(f"{what}: unknown op family {selector!r}; families: {families}")
            chosen |= {op for op, entry in available.items() if entry.family == selector}
        elif isinstance(selector, type):
            matches = {op for op, entry in available.items() if entry.handler is selector}
            if not matches:
                raise ValueError(f"{what}: {selector.__name__} is not a registered handler")
            chosen |= matches
        else:
            raise TypeError(f"{what} takes aten operators, op family names or handler classes, got {selector!r}")
    return chosen


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
        with self._lock:
            if self._active == 0:
                self._base = compiler_config.cache_key_tag
            self._active += 1
            compiler_config.cache_key_tag = f"{self._base}|memsave_dispatch:{fingerprint}"

    def exit(self) -> None:
        with self._lock:
            self._active -= 1
            if self._active == 0:
                compiler_config.cache_key_tag = self._base


_compile_cache_tag = _CompileCacheTag()


@functools.cache
def _package_identity() -> str:
    """A hash of this package's own sources: the engine, slots and codecs a compiled graph was
    traced through are baked into it as much as the handlers are."""
    digest = hashlib.sha256()
    try:  # also where the sources are not files (a zipped or bytecode-only install)
        digest.update(importlib.metadata.version("memsave-dispatch").encode())
    except importlib.metadata.PackageNotFoundError:
        pass
    package = pathlib.Path(__file__).parent
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


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
