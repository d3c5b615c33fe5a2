"""Threads: each thread gets its own behaviour (mode or stock) and exact gradients, while
others enter, leave and train at the same time."""

from __future__ import annotations

import copy
import threading

import torch
import torch.nn.functional as F

from memsave_dispatch import MemSaveMode, saved_tensor_bytes, state
from tests.support import assert_bit_identical, frozen_small_net


def _step(model, x, y):
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return grads


def _run_threads(targets, timeout=120):
    errors = []

    def guarded(target):
        def run():
            try:
                target()
            except BaseException as error:  # reported to the test below
                errors.append(error)

        return run

    threads = [threading.Thread(target=guarded(t)) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
        assert not thread.is_alive(), "a thread hung"
    if errors:
        raise errors[0]


def test_threads_training_concurrently_inside_and_outside_the_mode():
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.arange(4)
    expected = _step(frozen_small_net(width=8, prompt_size=16), x, y)
    reference = frozen_small_net(width=8, prompt_size=16)
    stock_bytes, _ = saved_tensor_bytes(lambda: reference(x), exclude=reference)
    start = threading.Barrier(6)
    results: dict[int, list] = {}

    models = [copy.deepcopy(reference) for _ in range(6)]  # built here: seeding is process-wide

    def worker(index):
        def run():
            model = models[index]
            use_mode = index % 2 == 0
            start.wait()
            outcomes = []
            for _ in range(8):
                with MemSaveMode() if use_mode else torch.enable_grad():
                    grads = _step(model, x, y)
                    kept, _ = saved_tensor_bytes(lambda: model(x), exclude=model)
                outcomes.append((grads, kept))
            results[index] = outcomes

        return run

    _run_threads([worker(i) for i in range(6)])
    for index, outcomes in results.items():
        for grads, kept in outcomes:
            for a, b in zip(grads, expected):
                assert_bit_identical(a, b)
            assert kept == stock_bytes if index % 2 else kept < stock_bytes / 2


def test_entering_and_leaving_in_many_threads_is_race_free():
    """Many threads enter and leave modes (shared and private ones) as fast as they can;
    afterwards nothing is left active anywhere and the compile cache tag is restored."""
    shared = MemSaveMode()
    tag_before = torch.compiler.config.cache_key_tag
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    w = torch.randn(4, 3, 3, 3)

    def churn(index):
        def run():
            for step in range(200):
                mode = shared if (index + step) % 3 == 0 else MemSaveMode(exclude=["pooling"])
                with mode:
                    F.conv2d(x, w).sum().backward()

        return run

    _run_threads([churn(i) for i in range(8)])
    assert torch.compiler.config.cache_key_tag == tag_before
    assert state.scopes() == []
    assert shared.report()["aten.convolution.default"].handled > 0
    # and this thread still runs stock
    out = F.conv2d(x, w)
    assert type(out.grad_fn).__name__ == "ConvolutionBackward0"
    assert saved_tensor_bytes(lambda: F.conv2d(x, w))[0] == (x.numel() + w.numel()) * 4
