"""Choosing the engine a benchmark's MemSaveMode runs on (compiled or python), the way a user
does: ``MEMSAVE_DISPATCH_ENGINE``, read when the mode is built."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from memsave_dispatch.extension import ENGINE_VARIABLE, ENGINES

__all__ = ["ENGINE_VARIABLE", "MODE_ENGINES", "engine_selected"]

MODE_ENGINES = tuple(name for name in ENGINES if name != "auto")


@contextlib.contextmanager
def engine_selected(name: str) -> Iterator[None]:
    """MemSaveModes built inside run on ``name`` ("compiled" falls back to "python", with the
    library's warning, where the extension cannot be built)."""
    before = os.environ.get(ENGINE_VARIABLE)
    os.environ[ENGINE_VARIABLE] = name
    try:
        yield
    finally:
        if before is None:
            del os.environ[ENGINE_VARIABLE]
        else:
            os.environ[ENGINE_VARIABLE] = before
