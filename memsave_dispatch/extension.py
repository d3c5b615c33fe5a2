"""The compiled engine's extension: built on first use, cached, loaded; or one warning.

The C++ sources ship in the package (``csrc/``). The first MemSaveMode built in a process
compiles them against the installed torch with ``torch.utils.cpp_extension`` (ninja and a C++
compiler; about a minute on two cores, with a status line) into torch's extension cache
(``$TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``), one folder per torch
release (and per OpenMP or not); every later process loads it in milliseconds (ninja rebuilds
what changed when the package is upgraded).

``MEMSAVE_DISPATCH_ENGINE=python`` skips all of this: the pure-Python engine runs. Without a
compiler, with a failed build or a torch release the extension is not written for, a single
warning says so and the pure-Python engine runs: same savings, same gradients, more time per
call.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from types import ModuleType

import torch

from ._compat import TORCH

__all__ = ["ENGINE_VARIABLE", "ENGINES", "requested_engine", "load", "unavailable_reason"]

ENGINE_VARIABLE = "MEMSAVE_DISPATCH_ENGINE"
ENGINES = ("auto", "compiled", "python")
#: The oldest torch release whose private headers the C++ sources are written against.
OLDEST_TORCH = "2.13"
SOURCES = tuple(sorted((Path(__file__).parent / "csrc").glob("*.cpp")))
_HEADERS = tuple(sorted((Path(__file__).parent / "csrc").glob("*.h")))
_FLAGS = ("-O3",)
#: ATen's parallel_for is a header template: its tasks run on torch's OpenMP threads only where
#: the extension is compiled with OpenMP as torch is (else serially). Where torch's wheel ships
#: libgomp under its own soname, the library this links is the one torch loaded; where a build
#: with it fails, or its runtime is not torch's (it does not follow torch.set_num_threads), the
#: extension is built again without it: encodings then run in one thread.
_OPENMP_FLAGS = ("-fopenmp",) if sys.platform.startswith("linux") and torch.backends.openmp.is_available() else ()


def requested_engine() -> str:
    """``$MEMSAVE_DISPATCH_ENGINE``: auto (default: compiled where it builds), compiled, python."""
    value = os.environ.get(ENGINE_VARIABLE, "auto").strip().lower() or "auto"
    if value not in ENGINES:
        raise ValueError(f"{ENGINE_VARIABLE}={value!r}; use one of {', '.join(ENGINES)}")
    return value


class _Loader:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done = False
        self.module: ModuleType | None = None
        self.reason: str | None = None

    def load(self) -> ModuleType | None:
        if self.done:
            return self.module
        with self.lock:
            if not self.done:
                try:
                    self.module = _build_and_import()
                except _Unavailable as why:
                    self.reason = str(why)
                    warnings.warn(
                        f"memsave-dispatch: the compiled engine is unavailable ({self.reason}); MemSaveMode runs "
                        f"on the pure-Python engine: the same savings and gradients, more time per call. Set "
                        f"{ENGINE_VARIABLE}=python to choose it and silence this warning.",
                        RuntimeWarning,
                        stacklevel=4,
                    )
                self.done = True
        return self.module


class _Unavailable(Exception):
    pass


_loader = _Loader()


def load() -> ModuleType | None:
    """The extension module, built first if needed; None (after one warning per process)
    where it cannot be had."""
    return _loader.load()


def unavailable_reason() -> str | None:
    """Why :func:`load` returned None, once it did."""
    return _loader.reason


_NAME = "memsave_dispatch_engine"


def _digest(openmp: tuple[str, ...]) -> str:
    """What the build depends on besides the torch release (its folder)."""
    digest = hashlib.sha256()
    for path in (*SOURCES, *_HEADERS):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    digest.update(" ".join(_FLAGS + openmp).encode())
    return digest.hexdigest()


def _build_and_import() -> ModuleType:
    if TORCH < OLDEST_TORCH:
        raise _Unavailable(f"it is written for torch {OLDEST_TORCH} and later, this is torch {torch.__version__}")
    if not SOURCES:
        raise _Unavailable("its C++ sources are missing from the installed package")
    if not _OPENMP_FLAGS:
        return _build_serial()
    directory, digest = _directory("openmp"), _digest(_OPENMP_FLAGS)
    declined = directory / "declined.sha256"  # these sources built here without OpenMP only
    if declined.exists() and declined.read_text() == digest:
        return _build_serial()
    try:
        module = _build(_OPENMP_FLAGS, directory, digest, _NAME)
        if _follows_torchs_threads(module):
            return module
    except _Unavailable:
        pass
    module = _build_serial()  # (where this fails too, the compiler is the problem: OpenMP is tried again next time)
    try:
        declined.write_text(digest)
    except OSError:
        pass
    return module


def _build_serial() -> ModuleType:
    return _build((), _directory("serial"), _digest(()), f"{_NAME}_serial")


def _follows_torchs_threads(module: ModuleType) -> bool:
    """Whether the extension's OpenMP runtime agrees with torch's thread count (another
    runtime would not follow torch.set_num_threads; tests/test_compiled.py checks it does)."""
    return module.encoding_threads_allowed() == torch.get_num_threads()


def _cpp_extension() -> ModuleType:
    """torch.utils.cpp_extension, imported only where a build is needed (it is slow to import)."""
    from torch.utils import cpp_extension

    return cpp_extension


def _directory(flavour: str) -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or _cpp_extension().get_default_build_root()
    return Path(root) / "memsave_dispatch" / f"torch-{torch.__version__}" / flavour


def _build(openmp: tuple[str, ...], directory: Path, digest: str, name: str) -> ModuleType:
    stamp = directory / "sources.sha256"
    building = not (directory / f"{name}.so").exists() or not stamp.exists() or stamp.read_text() != digest
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with _status(building, directory):
            module = _cpp_extension().load(
                name=name,
                sources=[str(path) for path in SOURCES],
                extra_cflags=[*_FLAGS, *openmp],
                extra_ldflags=list(openmp),
                build_directory=str(directory),
                is_python_module=True,
                verbose=False,
            )
        if building:
            stamp.write_text(digest)
        return module
    except (RuntimeError, OSError, ImportError, SystemError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise _Unavailable(f"building it failed: {first_line[:300]}") from error


class _status:
    """A status line on stderr while the extension compiles (first use only)."""

    def __init__(self, building: bool, directory: Path) -> None:
        self.building, self.directory = building, directory

    def __enter__(self) -> None:
        self.start = time.monotonic()
        self.live = None
        if self.building:
            from rich.console import Console

            self.console = Console(stderr=True)
            self.live = self.console.status(
                f"memsave-dispatch: compiling its engine for torch {torch.__version__} (once, about a minute; "
                f"cached in {self.directory})"
            )
            self.live.__enter__()

    def __exit__(self, exc_type, exc, traceback) -> None:
        if self.live is None:
            return
        self.live.__exit__(exc_type, exc, traceback)
        if exc_type is None:
            seconds = time.monotonic() - self.start
            self.console.print(f"memsave-dispatch: engine compiled in {seconds:.0f} s", style="dim")
        sys.stderr.flush()
