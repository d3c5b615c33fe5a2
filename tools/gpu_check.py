"""CUDA readiness: the correctness matrix and the benchmark's GPU columns, in one run.

    python tools/gpu_check.py                      # about 5 minutes on one recent GPU
    python tools/gpu_check.py --skip-bench --json gpu.json

Part 1 runs every built-in handler family on CUDA, stock and under
``MemSaveMode(devices=("cuda",))``, over fp32/bf16/fp64, contiguous and channels_last, and
the requires-grad patterns that change what is kept, with cuDNN/cuBLAS set deterministic.
Each line reports whether forward outputs and gradients are bit-identical (raw bits, so the sign of zero and NaN payloads count),
how many calls the mode handled (CUDA batch norm reaches ``cudnn_batch_norm``, which has no
handler yet: it runs stock and says so) and the bytes kept against stock.

Part 2 is the benchmark, ``tools.bench``, on ``cuda`` (peak from ``torch.cuda.max_memory_allocated``).

Exit status 1 if any handled configuration differs from stock or keeps more than stock.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for tools.bench

from memsave_dispatch import MemSaveMode, saved_tensor_bytes  # noqa: E402
from memsave_dispatch.exactness import bit_identical  # noqa: E402
from tools.bench.cases import CASES  # noqa: E402
from tools.bench.cli import parse_args  # noqa: E402
from tools.bench.render import tables, write_png  # noqa: E402
from tools.bench.runner import BenchConfig, run_bench  # noqa: E402

# Deterministic kernels: stock against itself must repeat bit for bit, or no comparison means anything.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@dataclass
class CheckResult:
    family: str
    config: str
    outputs_equal: bool
    grads_equal: bool
    stock_repeatable: bool
    handled: int
    stock_bytes: int
    mode_bytes: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        if self.error is not None:
            return False
        exact = self.outputs_equal and self.grads_equal
        return (exact or not self.stock_repeatable) and self.mode_bytes <= self.stock_bytes


def _run(fn: Callable[..., Tensor], inputs: dict[str, Tensor], mode: MemSaveMode | None, seed: int):
    clones = {}
    for name, tensor in inputs.items():
        copy = tensor.detach().clone().requires_grad_(tensor.requires_grad)
        clones[name] = copy
    torch.manual_seed(seed)
    context = mode if mode is not None else torch.enable_grad()
    with context:
        kept, output = saved_tensor_bytes(lambda: fn(**clones))
        upstream = torch.randn(output.shape, generator=torch.Generator(output.device).manual_seed(seed), device=output.device, dtype=output.dtype)
        leaves = [t for t in clones.values() if t.requires_grad]
        grads = torch.autograd.grad(output, leaves, upstream) if leaves else ()
    return output.detach(), grads, kept


def _equal(a, b) -> bool:
    return all(bit_identical(x, y) for x, y in zip(a, b)) and len(a) == len(b)


def check(family: str, config: str, fn, inputs: dict[str, Tensor]) -> CheckResult:
    try:
        out_stock, grads_stock, bytes_stock = _run(fn, inputs, None, seed=1)
        out_again, grads_again, _ = _run(fn, inputs, None, seed=1)
        device = next(iter(inputs.values())).device.type
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "not verified on cuda": verifying it is this script's job
            mode = MemSaveMode(devices=(device,))
        out_mode, grads_mode, bytes_mode = _run(fn, inputs, mode, seed=1)
        handled = mode.report().handled
        return CheckResult(
            family,
            config,
            outputs_equal=bit_identical(out_stock, out_mode),
            grads_equal=_equal(grads_stock, grads_mode),
            stock_repeatable=bit_identical(out_stock, out_again) and _equal(grads_stock, grads_again),
            handled=handled,
            stock_bytes=bytes_stock,
            mode_bytes=bytes_mode,
        )
    except Exception as error:  # report and go on: one failing kernel must not hide the rest
        return CheckResult(family, config, False, False, False, 0, 0, 0, f"{type(error).__name__}: {error}"[:200])


def _tensor(shape, dtype, channels_last: bool, requires_grad: bool, device) -> Tensor:
    tensor = torch.randn(shape, dtype=dtype, device=device)
    if channels_last and tensor.dim() in (4, 5):
        tensor = tensor.contiguous(memory_format=torch.channels_last if tensor.dim() == 4 else torch.channels_last_3d)
    return tensor.requires_grad_(requires_grad)


def matrix(device: torch.device) -> list[CheckResult]:
    """Every handler family x dtype x layout x the requires-grad patterns that matter."""
    results = []
    dtypes = (torch.float32, torch.bfloat16, torch.float64)
    # (input, weight) requires grad; the bias always does: (False, False) is bias-only tuning
    grads = ((True, False), (False, True), (True, True), (False, False))
    for dtype, channels_last in itertools.product(dtypes, (False, True)):
        layout = "channels_last" if channels_last else "contiguous"

        def t(shape, requires_grad=False):
            return _tensor(shape, dtype, channels_last, requires_grad, device)

        for x_grad, w_grad in grads:
            tag = f"{dtype} {layout} x.grad={x_grad} w.grad={w_grad}"
            results.append(check("conv2d", tag, lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1),
                                 {"x": t((4, 8, 16, 16), x_grad), "w": t((16, 8, 3, 3), w_grad), "b": t((16,), True)}))
            results.append(check("conv3d", tag, lambda x, w: F.conv3d(x, w, padding=1, groups=2),
                                 {"x": t((2, 4, 6, 6, 6), x_grad), "w": t((8, 2, 3, 3, 3), w_grad)}))
            results.append(check("conv_transpose2d", tag, lambda x, w: F.conv_transpose2d(x, w, stride=2),
                                 {"x": t((2, 8, 8, 8), x_grad), "w": t((8, 4, 3, 3), w_grad)}))
            results.append(check("linear", tag, lambda x, w, b: F.linear(x, w, b),
                                 {"x": t((4, 7, 32), x_grad), "w": t((16, 32), w_grad), "b": t((16,), True)}))
            for training in (True, False):
                results.append(check(
                    "batch_norm", f"{tag} training={training}",
                    lambda x, w, b, training=training: F.batch_norm(
                        x, torch.zeros(8, device=device, dtype=x.dtype if x.dtype != torch.bfloat16 else torch.float32),
                        torch.ones(8, device=device, dtype=x.dtype if x.dtype != torch.bfloat16 else torch.float32),
                        w, b, training=training),
                    {"x": t((4, 8, 10, 10), x_grad),
                     "w": _tensor((8,), dtype if dtype != torch.bfloat16 else torch.float32, False, w_grad, device),
                     "b": _tensor((8,), dtype if dtype != torch.bfloat16 else torch.float32, False, True, device)}))
            results.append(check("layer_norm", tag, lambda x, w, b: F.layer_norm(x, (32,), w, b),
                                 {"x": t((4, 7, 32), x_grad), "w": t((32,), w_grad), "b": t((32,), True)}))
            if not (channels_last and device.type == "cpu"):  # stock CPU group_norm crashes on channels_last
                results.append(check("group_norm", tag, lambda x, w, b: F.group_norm(x, 4, w, b),
                                     {"x": t((4, 8, 6, 6), x_grad), "w": t((8,), w_grad), "b": t((8,), True)}))
        tag = f"{dtype} {layout}"
        results.append(check("max_pool2d", tag, lambda x: F.max_pool2d(x, 3, 2, 1), {"x": t((4, 8, 17, 17), True)}))
        results.append(check("max_pool3d", tag, lambda x: F.max_pool3d(x, 2), {"x": t((2, 4, 8, 8, 8), True)}))
        results.append(check("adaptive_max_pool2d", tag, lambda x: F.adaptive_max_pool2d(x, 5), {"x": t((4, 8, 17, 17), True)}))
        results.append(check("avg_pool2d", tag, lambda x: F.avg_pool2d(x, 3, 2, 1), {"x": t((4, 8, 17, 17), True)}))
        results.append(check("adaptive_avg_pool2d", tag, lambda x: F.adaptive_avg_pool2d(x, 1), {"x": t((4, 8, 17, 17), True)}))
        for name, act in (("relu", lambda x: F.relu(x)), ("relu_", lambda x: F.relu(x * 1, inplace=True)),
                          ("leaky_relu", lambda x: F.leaky_relu(x, 0.1)), ("relu6", lambda x: F.relu6(x)),
                          ("hardtanh", lambda x: F.hardtanh(x, -0.5, 0.5)), ("threshold", lambda x: F.threshold(x, 0.25, -1.0))):
            results.append(check(name, tag, act, {"x": t((4, 8, 16, 16), True)}))
        for p in (0.0, 0.3, 1.0):
            results.append(check("dropout", f"{tag} p={p}", lambda x, p=p: F.dropout(x, p, training=True), {"x": t((4, 8, 16, 16), True)}))
    return results


def _problem(result: CheckResult) -> str:
    if result.error is not None:
        return result.error
    if result.mode_bytes > result.stock_bytes:
        return "keeps more than stock"
    return "differs from stock"


def print_matrix(results: list[CheckResult], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{title}: MemSaveMode against stock", show_lines=False)
    for column in ("family", "configurations", "bit-identical", "handled calls", "kept/stock", "problems"):
        table.add_column(column)
    for family, rows in itertools.groupby(sorted(results, key=lambda r: r.family), key=lambda r: r.family):
        rows = list(rows)
        exact = sum(r.outputs_equal and r.grads_equal for r in rows)
        stock = sum(r.stock_bytes for r in rows)
        kept = sum(r.mode_bytes for r in rows)
        problems = [f"{r.config}: {_problem(r)}" for r in rows if not r.ok]
        table.add_row(family, str(len(rows)), f"{exact}/{len(rows)}", str(sum(r.handled for r in rows)),
                      f"{kept / stock:.2f}" if stock else "-", "\n".join(problems[:3]) or "none")
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-bench", action="store_true", help="correctness matrix only")
    parser.add_argument("--json", metavar="PATH", help="write every result here")
    parser.add_argument("--png", metavar="PATH", help="bar chart of the benchmark (needs matplotlib)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--cases", nargs="+", default=["all", "input-bn-eval", "bias", "lora"])
    parser.add_argument("--compile", default="inductor", choices=("inductor", "none"))
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to try the script itself")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: this script checks MemSaveMode on a GPU", file=sys.stderr)
        return 2
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, {name}")

    start = time.perf_counter()
    results = matrix(device)
    print_matrix(results, f"{name} correctness")
    print(f"matrix: {len(results)} configurations in {time.perf_counter() - start:.0f} s")
    out = {"device": name, "torch": torch.__version__, "matrix": [asdict(r) for r in results]}

    if not args.skip_bench:
        argv_bench = ["--device", device.type, "--models", "resnet18", "transformer_encoder", "--batch", str(args.batch),
                      "--size", str(args.size), "--pairs", "9", "--compile", args.compile, "--cases", *args.cases]
        config = parse_args(argv_bench)
        results_bench = run_bench(
            config.specs, [CASES[key] for key in config.cases],
            BenchConfig(batch=config.batch, size=config.size, pairs=config.pairs,
                        compile_backend=config.compile, device=device.type),
        )
        from rich.console import Console

        for table in tables(results_bench):
            Console().print(table)
        out["bench"] = results_bench
        if args.png:
            write_png(results_bench, args.png)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(out, handle, indent=2)
    failed = [r for r in results if not r.ok]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
