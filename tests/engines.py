"""Running a test on both engines: the compiled one (C++) and the pure-Python reference.

``MEMSAVE_DISPATCH_ENGINE`` is read when a MemSaveMode is built, so a test switches engines by
setting it. Where the compiled engine is unavailable, or the whole run was forced onto the
Python engine (``MEMSAVE_DISPATCH_ENGINE=python``), the compiled variants are skipped and say why.
"""

from __future__ import annotations

import os

import pytest

from memsave_dispatch import compiled, extension

ENGINES = ("compiled", "python")
_FORCED = os.environ.get(extension.ENGINE_VARIABLE, "").strip().lower() == "python"


def compiled_unavailable() -> str | None:
    """Why the compiled engine cannot run in this test session, or None."""
    if _FORCED:
        return f"{extension.ENGINE_VARIABLE}=python: this run checks the Python engine only"
    if compiled.loaded() is None:
        extension.load()  # (where it cannot be had, its one warning shows in the session's summary)
        if extension.unavailable_reason() is not None:
            return f"the compiled engine is unavailable: {extension.unavailable_reason()}"
    return None


def use_engine(monkeypatch: pytest.MonkeyPatch, engine: str) -> None:
    """Build the test's MemSaveModes on ``engine`` (skip where it cannot run)."""
    if engine == "compiled":
        why = compiled_unavailable()
        if why is not None:
            pytest.skip(why)
    monkeypatch.setenv(extension.ENGINE_VARIABLE, engine)
