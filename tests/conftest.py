"""Fixtures shared by the test modules (the builders behind them are in tests/support.py)."""

from __future__ import annotations

import pytest

from memsave_dispatch.handlers import registered_ops, unregister_handler
from tests.engines import ENGINES, use_engine
from tests.support import frozen_small_net


@pytest.fixture(params=ENGINES)
def each_engine(request, monkeypatch):
    """Run the test once per engine: compiled (C++) and the pure-Python reference."""
    use_engine(monkeypatch, request.param)
    return request.param


@pytest.fixture
def frozen_net():
    """The demo network, every conv and BN layer frozen (input gradients only, or a prompt)."""
    return frozen_small_net()


@pytest.fixture
def prompt_tuned_net():
    """A narrow demo network with a learnable input prompt, conv and BN layers frozen."""
    return frozen_small_net(width=8, prompt_size=16)


@pytest.fixture
def handler_cleanup():
    """Append the operators a test registers handlers for: they are unregistered after it."""
    registered: list = []
    yield registered
    for op in registered:
        if op in registered_ops():
            unregister_handler(op)
