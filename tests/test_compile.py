"""torch.compile: the saving policy never leaks across the mode boundary, caches included."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memsave_dispatch import MemSaveMode
from memsave_dispatch import mode as mode_module
from tools.bench.models import SmallConvNet, freeze


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


def _inductor_cannot_compile() -> str | None:
    """Why Inductor cannot build CPU kernels here (it needs a C++ compiler), or None."""
    from torch._inductor import cpp_builder

    try:
        cpp_builder.get_cpp_compiler()
    except Exception as error:  # InvalidCxxCompiler, or whatever an older torch raises
        return f"Inductor needs a C++ compiler: {error}"
    return None


@pytest.fixture
def inductor():
    """Skip where Inductor has no C++ compiler (the library itself then runs its Python engine)."""
    why = _inductor_cannot_compile()
    if why is not None:
        pytest.skip(why)


@pytest.fixture
def fresh_compile_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("rounds", [2])
def test_policy_follows_the_mode_through_recompilation_and_caches(inductor, fresh_compile_caches, rounds):
    torch.manual_seed(0)
    net = SmallConvNet()
    freeze(net)
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    results = []
    for round in range(rounds):  # the second round runs against warm in-process and on-disk caches
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
        if round == 0:  # traced through our kernel; later rounds load it from the caches
            assert mode.report()["aten.convolution.default"].traced > 0
    for stock_bytes, mode_bytes, after_bytes in results:
        assert mode_bytes < stock_bytes
        assert after_bytes == stock_bytes


class EveryHandler(nn.Module):
    """One module reaching every built-in handler (frozen, so the input gradient drives it)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.norm = nn.LayerNorm(8)
        self.group = nn.GroupNorm(2, 8)
        self.head = nn.Linear(8 * 4 * 4, 5)
        for parameter in [*self.conv.parameters(), *self.bn.parameters(), *self.group.parameters()]:
            parameter.requires_grad_(False)

    def forward(self, x):
        y = torch.relu_(self.bn(self.conv(x)))
        y = F.max_pool2d(y, 2) + F.adaptive_max_pool2d(F.leaky_relu(y, 0.1), 8)
        y = F.relu6(self.group(y)) + F.threshold(y, 0.1, 0.0) + F.hardtanh(y, -0.5, 0.5)
        y = self.norm(F.avg_pool2d(y, 2).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        y = F.dropout(y, 0.25, training=True)
        return self.head(y.mean(1, keepdim=True).expand(-1, 8, -1, -1).flatten(1))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_every_handler_compiles_without_graph_breaks_and_keeps_its_savings(request, fresh_compile_caches, backend):
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    from memsave_dispatch import audit

    if backend == "inductor":
        request.getfixturevalue("inductor")

    torch.manual_seed(0)
    net = EveryHandler()
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    results = {}
    for use_mode in (False, True):
        torch._dynamo.reset()
        counters.clear()
        counter = CompileCounterWithBackend(backend)
        compiled = torch.compile(net, backend=counter)
        with MemSaveMode() if use_mode else torch.enable_grad() as mode:
            torch.manual_seed(1)
            out = compiled(x)
            kept = audit(out, model=net).total_bytes
            (grad,) = torch.autograd.grad(out.square().sum(), x)
        assert counter.frame_count == 1, "one graph, no fallback to eager"
        assert not counters["graph_break"], dict(counters["graph_break"])
        results[use_mode] = (out.detach(), grad, kept, mode)
    (stock_out, stock_grad, stock_kept, _), (out, grad, kept, mode) = results[False], results[True]
    torch.testing.assert_close(out, stock_out)
    torch.testing.assert_close(grad, stock_grad)
    assert kept < stock_kept
    report = mode.report()
    assert report["aten.convolution.default"].traced > 0  # the policy was compiled in
    assert report.handled == 0  # and nothing ran eagerly through the handlers
    with MemSaveMode():
        explanation = torch._dynamo.explain(net)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def _traced_forward(fn, x) -> str:
    """The forward graph AOTAutograd traces for ``fn(x)``."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_function

    graphs = []

    def keep(graph, _inputs):
        graphs.append(graph.code)
        return make_boxed_func(graph.forward)

    aot_function(fn, keep)(x)
    return graphs[0]


@pytest.mark.parametrize(
    "fn",
    [lambda x: F.dropout(x, 0.25, training=True), lambda x: F.batch_norm(x, torch.zeros(3), torch.ones(3), training=True)],
    ids=["dropout", "batch_norm"],
)
def test_tracing_outside_the_mode_sees_stock_after_the_mode_was_used(fn):
    """Installing the mode's kernels must not change what torch.compile traces outside it:
    stock's tracer decomposes dropout into native_dropout and batch norm in Python (a different
    graph would draw other random numbers, or round differently). Inside the mode, dropout
    traces as stock too (the mode's dropout encodings are eager-only)."""
    from memsave_dispatch import engine

    x = torch.randn(2, 3, 4, requires_grad=True)
    engine.uninstall()
    stock = _traced_forward(fn, x)
    with MemSaveMode():
        inside = _traced_forward(fn, x)
    assert engine.installed()
    assert _traced_forward(fn, x) == stock
    if "dropout" in stock:
        assert inside == stock


def test_make_fx_traces_stock_under_the_mode():
    """make_fx records every tensor operation, the handlers' own too, and cannot run
    data-dependent ones (building max-pool windows reads values): under the mode it traces
    stock's graph, and the report says why."""
    from torch.fx.experimental.proxy_tensor import make_fx

    torch.manual_seed(0)
    net = SmallConvNet(width=8)
    freeze(net)
    x = torch.randn(2, 3, 16, 16)

    def loss_and_input_grad(x):
        x = x.detach().requires_grad_(True)
        loss = F.cross_entropy(net(x), torch.arange(2))
        return loss, torch.autograd.grad(loss, x)[0]

    stock_graph = make_fx(loss_and_input_grad)(x)
    with MemSaveMode() as mode:
        mode_graph = make_fx(loss_and_input_grad)(x)
    operators = lambda graph: [node.target for node in graph.graph.nodes if node.op == "call_function"]
    assert operators(mode_graph) == operators(stock_graph)
    for a, b in zip(stock_graph(x), mode_graph(x)):
        assert torch.equal(a, b)
    report = mode.report()
    assert report.handled == 0
    assert report["aten.max_pool2d_with_indices.default"].to_stock == {"make_fx tracing": 2}


def test_the_compile_cache_tag_changes_with_the_handlers_and_the_package_code(monkeypatch):
    """Persistent compile caches must not serve a graph traced through other handlers, or
    through an older version of the engine, to this mode."""
    outside = torch.compiler.config.cache_key_tag
    with MemSaveMode():
        tag = torch.compiler.config.cache_key_tag
    assert tag != outside and torch.compiler.config.cache_key_tag == outside
    with MemSaveMode(exclude="pooling"):
        assert torch.compiler.config.cache_key_tag not in (outside, tag)
    monkeypatch.setattr(mode_module, "_package_identity", lambda: "an edited engine")
    with MemSaveMode():
        assert torch.compiler.config.cache_key_tag not in (outside, tag)


def test_a_graph_compiled_after_uninstall_runs_stock_autograd(fresh_compile_caches):
    """torch.compile's tracer caches which kernel serves each operator and key; installing and
    removing kernels must reset that, or a later compilation calls a kernel that is gone."""
    from memsave_dispatch import engine

    torch.manual_seed(0)
    net = SmallConvNet(width=8)
    freeze(net)
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    with MemSaveMode():
        pass  # installs the kernels
    torch.compile(net, backend="aot_eager")(x)  # traced while they are installed, outside the mode
    engine.uninstall()
    torch._dynamo.reset()
    (compiled_grad,) = torch.autograd.grad(torch.compile(net, backend="aot_eager")(x).sum(), x)
    (eager_grad,) = torch.autograd.grad(net(x).sum(), x)
    torch.testing.assert_close(compiled_grad, eager_grad)
