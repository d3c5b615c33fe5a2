"""The benchmark's measurements on a tiny network: structure, savings, exactness, and that the
CPU peak accounting counts what a step allocates."""

from __future__ import annotations

import gc
import json

import pytest
import torch
from torch import nn

from memsave_dispatch import MemSaveMode, saved_tensor_bytes
from memsave_dispatch.meter import allocator_bytes
from tools.bench.cases import CASES, ModelSpec, model_spec
from tools.bench.cli import main
from tools.bench.compile_backend import inductor_partition_backend
from tools.bench.measure import (
    COMPILE_REL_TOL,
    compare_gradients,
    interleaved_times,
    median_ratio,
)
from tools.bench.models import LoRA, SmallConvNet, add_lora, resnet18, transformer_encoder
from tools.bench.render import tables, write_png
from tools.bench.runner import BenchConfig, bench_case, run_bench

TINY = ModelSpec("small", lambda: SmallConvNet(width=8))
CONFIG = BenchConfig(batch=2, size=16, pairs=2, compile_backend="none", warmup=1)
MiB = 2**20


def test_eager_columns_structure_savings_and_exactness():
    cells = bench_case(TINY, CASES["input-bn-eval"], CONFIG)
    assert set(cells) == {"eager", "mode"}
    stock, mode = cells["eager"], cells["mode"]
    assert mode.kept_bytes < stock.kept_bytes
    assert mode.peak_bytes <= stock.peak_bytes
    assert mode.exact == "bit-identical" and mode.max_rel_diff == 0
    assert stock.exact is None  # the reference
    assert stock.step_ms > 0 and mode.time_ratio > 0
    for cell in cells.values():
        assert cell.peak_bytes >= cell.kept_bytes > 0  # what is kept was allocated during the step
        assert cell.error is None


def test_cheap_compile_path_columns():
    torch.manual_seed(0)
    config = BenchConfig(batch=2, size=16, pairs=1, compile_backend="partition", warmup=1)
    cells = bench_case(TINY, CASES["input-bn-train"], config)
    assert set(cells) == {"eager", "mode", "compile", "compile_mode"}
    compiled, compiled_mode = cells["compile"], cells["compile_mode"]
    assert compiled_mode.kept_bytes < compiled.kept_bytes
    assert compiled.exact in ("bit-identical", "within tol")
    assert compiled_mode.exact in ("bit-identical", "within tol")
    # Eager kernels do not allocate or run as Inductor's code would: neither is reported.
    assert compiled.peak_bytes is None and compiled.step_ms is None
    assert compiled.graphs >= 1 and compiled_mode.graph_breaks == 0


def test_cpu_peak_counts_allocations_in_time_order():
    def allocate():
        a = torch.empty(MiB, dtype=torch.uint8)
        b = torch.empty(2 * MiB, dtype=torch.uint8)
        del a
        c = torch.empty(MiB // 2, dtype=torch.uint8)
        del b, c

    assert _cpu_peak(allocate) == 3 * MiB
    kept = torch.empty(4 * MiB, dtype=torch.uint8)
    assert _cpu_peak(lambda: kept.zero_()) == 0  # memory alive before the step is the baseline


def test_a_known_extra_buffer_raises_the_step_peak_by_its_size():
    torch.manual_seed(0)
    model = SmallConvNet(width=8)
    x = torch.randn(2, 3, 16, 16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)

    def step(extra: int = 0) -> None:
        buffer = torch.ones(extra, dtype=torch.uint8)  # alive across the whole step
        model(x).sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del buffer

    step()  # momentum buffers
    plain = _cpu_peak(step)
    extra = _cpu_peak(lambda: step(8 * MiB))
    assert plain == _cpu_peak(step)  # deterministic
    assert extra - plain == 8 * MiB
    kept, _ = saved_tensor_bytes(lambda: model(x).sum(), exclude=model)
    assert plain >= kept


def test_interleaving_alternates_order_and_median_ratio():
    calls = []
    steps = {key: (lambda key=key: calls.append(key) or 1.0) for key in "ab"}
    times = interleaved_times(steps, 3)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert times == {"a": [1.0] * 3, "b": [1.0] * 3}
    assert median_ratio([2.0, 3.0, 10.0], [1.0, 1.0, 1.0]) == 3.0


def test_rounds_collect_only_what_the_steps_made():
    """Objects alive before the rounds are out of the collections time_step runs before
    each step, and back in afterwards, also when a step fails; a heap the caller froze stays
    frozen."""
    frozen_during = []
    interleaved_times({"a": lambda: frozen_during.append(gc.get_freeze_count()) or 1.0}, 2)
    assert len(frozen_during) == 2 and min(frozen_during) > 0
    assert gc.get_freeze_count() == 0

    def failing() -> float:
        raise RuntimeError("step failed")

    with pytest.raises(RuntimeError, match="step failed"):
        interleaved_times({"a": failing}, 1)
    assert gc.get_freeze_count() == 0

    gc.freeze()
    try:
        before = gc.get_freeze_count()
        interleaved_times({"a": lambda: 1.0}, 1)
        assert gc.get_freeze_count() == before
    finally:
        gc.unfreeze()


def _trainable(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def test_cases_choose_what_trains():
    def prepared(key: str) -> nn.Module:
        torch.manual_seed(0)
        model = resnet18(10)
        CASES[key].prepare(model)
        return model

    assert not _trainable(prepared("input-bn-train")) and CASES["input-bn-train"].input_grad
    assert not prepared("input-bn-eval").bn1.training
    assert all(name.endswith("bias") for name in _trainable(prepared("bias")))
    assert all(".bn" in name or name.startswith("bn1") or ".downsample.1" in name for name in _trainable(prepared("norm")))
    first, last = _trainable(prepared("first-quarter")), _trainable(prepared("last-quarter"))
    assert first[0] == "conv1.weight" and last[-1] == "fc.bias" and not set(first) & set(last)
    assert all(".down." in name or ".up." in name for name in _trainable(prepared("lora")))


def test_lora_starts_as_the_base_and_trains_only_adapters():
    torch.manual_seed(0)
    model = transformer_encoder(d_model=32, heads=2, feed_forward=64, layers=1)
    x = torch.randn(2, 5, 32)
    torch.manual_seed(1)  # the same dropout masks before and after
    before = model(x)
    wrappers = add_lora(model, rank=4)
    assert len(wrappers) == 2  # linear1, linear2; attention's projections are left alone
    assert isinstance(model.layers[0].linear1, LoRA)
    torch.manual_seed(1)
    assert torch.equal(model(x), before)  # the up projection starts at zero
    assert all(not p.requires_grad for w in wrappers for p in w.base.parameters())
    conv = LoRA(nn.Conv2d(3, 8, 3, stride=2, padding=1), rank=2)
    assert conv(torch.randn(1, 3, 9, 9)).shape == (1, 8, 5, 5)


def test_cli_errors_are_clear(capsys):
    with pytest.raises(ValueError, match="unknown model"):
        model_spec("nope")
    try:
        import torchvision  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="pip install torchvision"):
            model_spec("torchvision:resnet50")
    with pytest.raises(SystemExit):
        main(["--cases", "nope"])
    assert "unknown case" in capsys.readouterr().err


def test_results_render_and_serialise(tmp_path):
    results = run_bench([TINY], [CASES["bias"]], CONFIG)
    json.dumps(results)
    (table,) = tables(results)
    assert table.row_count == 1 and len(table.columns) == 3
    pytest.importorskip("matplotlib")
    write_png(results, str(tmp_path / "bench.png"))
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_one_entry_point_runs_the_benchmark_or_the_step_comparison(monkeypatch):
    from tools.bench import cli

    seen = []
    monkeypatch.setattr(cli, "bench_main", lambda argv: seen.append(("bench", argv)) or 0)
    monkeypatch.setattr(cli, "step_main", lambda argv: seen.append(("step", argv)) or [])
    assert cli.main(["--quick"]) == 0
    assert cli.main(["step", "--pairs", "3"]) == 0
    assert seen == [("bench", ["--quick"]), ("step", ["--pairs", "3"])]


@pytest.mark.slow
def test_partition_backend_keeps_what_inductor_keeps(tmp_path, monkeypatch):
    """The quick run's compile columns: same bytes kept as real Inductor, stock and mode."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    model = SmallConvNet()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    kept = {}
    for backend in ("inductor", inductor_partition_backend):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=backend)
        with torch._functorch.config.patch(enable_autograd_cache=False), torch._inductor.config.patch(fx_graph_cache=False):
            stock, _ = saved_tensor_bytes(lambda: compiled(x), exclude=model)
            with MemSaveMode():
                mode, _ = saved_tensor_bytes(lambda: compiled(x), exclude=model)
        kept[backend if isinstance(backend, str) else "partition"] = (stock, mode)
    torch._dynamo.reset()
    assert kept["partition"] == kept["inductor"]
    assert kept["partition"][1] < kept["partition"][0]


def test_gradient_comparison_is_exact_for_the_mode_and_relative_for_compile():
    reference = [torch.ones(4), None]
    nudged = [torch.ones(4).nextafter(torch.full((4,), 2.0)), None]
    assert compare_gradients([torch.ones(4), None], reference) == ("bit-identical", 0.0)
    verdict, error = compare_gradients(nudged, reference, rel_tol=0.0)
    assert verdict == "DIFFERS" and 0 < error < 1e-6  # one ulp is a difference for the mode
    assert compare_gradients(nudged, reference)[0] == "within tol"
    assert compare_gradients([torch.ones(4) * (1 + 10 * COMPILE_REL_TOL), None], reference)[0] == "DIFFERS"
    assert compare_gradients([torch.ones(4), torch.ones(1)], reference) == ("DIFFERS", None)


def _cpu_peak(fn) -> int:
    return allocator_bytes(fn).peak


def test_compare_names_every_figure_that_moved():
    from tools.bench.compare import differences

    def run(peak):
        cell = {"kept_bytes": 10, "peak_bytes": peak, "exact": "bit-identical", "step_ms": 1.0}
        return {"rows": [{"model": "m", "case": "c", "columns": {"mode": cell}}]}

    assert differences(run(100), run(100)) == (1, [])
    count, lines = differences(run(100), run(68))
    assert count == 1 and lines == ["m / c / mode: peak_bytes 100 -> 68 (-32)"]
