"""torch.compile: the saving policy never leaks across the mode boundary, caches included."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from memsave_dispatch import MemSaveMode
from memsave_dispatch.models import SmallConvNet, freeze


def _compiled_graph_bytes(out) -> int:
    """Activation bytes the compiled autograd node keeps (parameters excluded)."""
    stack, seen, total = [out.grad_fn], set(), 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "CompiledFunction" in type(node).__name__:
            total += sum(t.numel() * t.element_size() for t in node.saved_tensors if not isinstance(t, nn.Parameter))
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return total


@pytest.fixture
def fresh_compile_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("rounds", [2])
def test_policy_follows_the_mode_through_recompilation_and_caches(fresh_compile_caches, rounds):
    torch.manual_seed(0)
    net = SmallConvNet()
    freeze(net)
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    results = []
    for _ in range(rounds):  # the second round runs against warm in-process and on-disk caches
        torch._dynamo.reset()
        compiled = torch.compile(net)
        stock_bytes = _compiled_graph_bytes(compiled(x))
        with MemSaveMode() as mode:
            mode_out = compiled(x)
            mode_bytes = _compiled_graph_bytes(mode_out)
            (mode_grad,) = torch.autograd.grad(mode_out.sum(), x)
        after_out = compiled(x)
        after_bytes = _compiled_graph_bytes(after_out)
        (stock_grad,) = torch.autograd.grad(after_out.sum(), x)
        results.append((stock_bytes, mode_bytes, after_bytes))
        torch.testing.assert_close(mode_grad, stock_grad)
        assert mode.report()["aten.convolution.default"].traced > 0  # traced through our kernel
    for stock_bytes, mode_bytes, after_bytes in results:
        assert mode_bytes < stock_bytes
        assert after_bytes == stock_bytes
