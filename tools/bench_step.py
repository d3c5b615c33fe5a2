"""Step time of a training step under MemSaveMode against stock PyTorch, same process.

    python tools/bench_step.py                 # ResNet-18-shaped net, batch 8, 3x128x128
    python tools/bench_step.py --pairs 81 --json step.json

Stock and mode steps are interleaved (ABBA order, so drift and caches hit both alike) and
the figure is the median of the per-pair ratios mode/stock. Stock steps run with the
interposing kernels uninstalled, so stock pays nothing for this library being imported.
Bytes kept for backward are measured with saved-tensor hooks, parameters and buffers
excluded, and gradients are compared with torch.equal.

The minor page faults per step are printed too: glibc returns large freed blocks to the OS
and maps them again, so a step can pay thousands of faults (milliseconds). How many, and on
which side, varies from process to process with the allocator's state, and moves the ratio
by several percent. The mode's own cost, with faults out of the picture, is measured by keeping freed
memory in the process:

    GLIBC_TUNABLES=glibc.malloc.trim_threshold=4294967296:glibc.malloc.mmap_threshold=4294967295 \
        python tools/bench_step.py
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from memsave_dispatch import MemSaveMode, saved_tensor_bytes
from memsave_dispatch.bench import interleaved_times, median_ratio, minor_page_faults, running, time_step
from tools.bench.models import freeze, resnet18, set_batchnorm_eval
from memsave_dispatch.report import format_bytes

CASES: dict[str, Callable[[torch.nn.Module], None]] = {
    "frozen conv/BN, BN eval": lambda m: (freeze(m), set_batchnorm_eval(m)),
    "frozen conv/BN, BN train": freeze,
    "all trainable": lambda m: None,
}


def _build(case: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = resnet18(num_classes=10)
    CASES[case](model)
    return model


def _gradients(model, x, y) -> list[torch.Tensor]:
    x = x.detach().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    grads = [x.grad] + [p.grad for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return grads


def run_case(case: str, batch: int, size: int, pairs: int, progress=None, task=None) -> dict:
    model = _build(case)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    y = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(2))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.0, momentum=0.9)  # lr 0: every step sees the same model
    mode = MemSaveMode()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        x.grad = None
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    faults: dict[str, list[int]] = {"stock": [], "mode": []}

    def timed(kind: str) -> float:
        before = minor_page_faults()
        seconds = time_step(step)
        if before is not None:
            faults[kind].append(minor_page_faults() - before)
        return seconds

    def stock_step() -> float:
        with running(None):
            return timed("stock")

    def mode_step() -> float:
        with running(mode):
            return timed("mode")

    # Exactness and bytes first (different model instances so the timing model stays warm).
    reference, candidate = _build(case), _build(case)
    stock_grads = _gradients(reference, x, y)
    with MemSaveMode():
        mode_grads = _gradients(candidate, x, y)
    exact = all(torch.equal(a, b) for a, b in zip(stock_grads, mode_grads))
    stock_bytes, _ = saved_tensor_bytes(lambda: reference(x), exclude=reference)
    with MemSaveMode():
        mode_bytes, _ = saved_tensor_bytes(lambda: candidate(x), exclude=candidate)

    for _ in range(3):
        stock_step()
        mode_step()
    faults["stock"].clear()
    faults["mode"].clear()
    times = interleaved_times(
        {"mode": mode_step, "stock": stock_step},
        pairs,
        on_round=None if progress is None else lambda: progress.advance(task),
    )
    stock_times, mode_times = times["stock"], times["mode"]
    ratios = [m / s for m, s in zip(mode_times, stock_times)]
    return {
        "case": case,
        "batch": batch,
        "input": [3, size, size],
        "pairs": pairs,
        "stock_ms": statistics.median(stock_times) * 1e3,
        "mode_ms": statistics.median(mode_times) * 1e3,
        "median_ratio": median_ratio(mode_times, stock_times),
        "ratio_quartiles": statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3,
        "stock_bytes": stock_bytes,
        "mode_bytes": mode_bytes,
        "bytes_ratio": mode_bytes / stock_bytes,
        "gradients_bit_identical": exact,
        "stock_page_faults_per_step": statistics.median(faults["stock"]) if faults["stock"] else None,
        "mode_page_faults_per_step": statistics.median(faults["mode"]) if faults["mode"] else None,
    }


def _faults(result: dict) -> str:
    stock, mode = result["stock_page_faults_per_step"], result["mode_page_faults_per_step"]
    return "n/a" if stock is None else f"{stock:.0f}, {mode:.0f}"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=41, help="interleaved stock/mode step pairs per case")
    parser.add_argument("--case", choices=list(CASES), action="append", help="default: all cases")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = args.case or list(CASES)
    console = Console()
    results = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("interleaved steps", total=args.pairs * len(cases))
        for case in cases:
            results.append(run_case(case, args.batch, args.size, args.pairs, progress, task))
    table = Table(
        title=f"ResNet-18-shaped net, batch {args.batch}, 3x{args.size}x{args.size}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}",
        title_justify="left",
    )
    columns = ("case", "stock ms", "mode ms", "median ratio (IQR)", "kept stock", "kept mode", "bytes ratio", "grads exact", "page faults/step stock, mode")
    for column in columns:
        table.add_column(column, justify="left" if column == "case" else "right")
    for r in results:
        q1, _, q3 = r["ratio_quartiles"]
        table.add_row(
            r["case"],
            f"{r['stock_ms']:.1f}",
            f"{r['mode_ms']:.1f}",
            f"{r['median_ratio']:.3f} ({q1:.3f}-{q3:.3f})",
            format_bytes(r["stock_bytes"]),
            format_bytes(r["mode_bytes"]),
            f"{r['bytes_ratio']:.3f}",
            "yes" if r["gradients_bit_identical"] else "NO",
            _faults(r),
        )
    console.print(table)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
