"""Every operator test runs on both engines."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _on_each_engine(each_engine):
    return each_engine
