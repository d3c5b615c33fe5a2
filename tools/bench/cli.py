"""The command line, one entry point: ``python -m tools.bench [options]`` runs the benchmark,
``python -m tools.bench step [options]`` the step-time comparison (:mod:`tools.bench.step`),
``python -m tools.bench markdown RESULTS.json`` the README's table of a run,
``python -m tools.bench compare A.json B.json`` checks two runs agree on bytes and peaks."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from . import step
from .compare import compare_main
from .cases import CASES, MODELS, STEP_ROWS, model_spec
from .compile_backend import COMPILE_BACKENDS
from .measure import PEAK_METHODS
from .engines import MODE_ENGINES
from .render import MATPLOTLIB_MISSING, markdown, per_call_table, step_tables, tables, write_png
from .runner import COLUMN, BenchConfig, run_bench

QUICK = {"models": ["resnet18"], "batch": 8, "size": 128, "pairs": 7, "compile": "partition"}
# Inductor needs 20-45 s per compilation of ResNet-18 or the transformer on two cores (two per
# case), vgg11_bn steps take a second at this size, and mobilenet_v2 compiles for 1.5-3 minutes:
# those two are left to --models to keep a full run within about half an hour.
FULL = {"models": ["resnet18", "transformer_encoder"], "batch": 8, "size": 128, "pairs": 15, "compile": "inductor"}


def _split(values: list[str] | None) -> list[str]:
    return [item for value in values or [] for item in value.split(",") if item]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench",
        description="Bytes kept for backward, peak step memory, step time and gradient exactness: stock "
        "PyTorch against MemSaveMode, eager and under torch.compile, per model and fine-tuning case.",
        epilog="`python -m tools.bench step --help`: step time only, stock against MemSaveMode, in one process.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="ResNet-18 at batch 8, 128x128, 7 rounds, compile columns from Inductor's partitioner with eager "
        "kernels (bytes kept and exactness only): under two minutes on 2 cores",
    )
    parser.add_argument(
        "--models", "--model", action="extend", nargs="+", metavar="NAME",
        help=f"models: {', '.join(MODELS)}, torchvision:NAME, timm:NAME (default: {', '.join(FULL['models'])}; "
        "vgg11_bn and mobilenet_v2 add about 15 and 30 minutes with real Inductor)",
    )
    parser.add_argument(
        "--cases", "--case", action="extend", nargs="+", metavar="KEY", help=f"cases (default: all): {', '.join(CASES)}"
    )
    parser.add_argument("--batch", type=int, help=f"default {FULL['batch']} ({QUICK['batch']} with --quick)")
    parser.add_argument(
        "--size", type=int, help=f"image height and width, or sequence length: default {FULL['size']} ({QUICK['size']})"
    )
    parser.add_argument(
        "--pairs", type=int, help=f"interleaved timing rounds per model x case: default {FULL['pairs']} ({QUICK['pairs']})"
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu (verified) or cuda")
    parser.add_argument(
        "--compile", choices=COMPILE_BACKENDS,
        help="how the compile columns compile: real inductor (full default), inductor's partitioner "
        "with eager kernels (--quick default: bytes kept only), or none",
    )
    parser.add_argument("--no-compile", action="store_const", const="none", dest="compile", help="same as --compile none")
    parser.add_argument("--json", metavar="PATH", help="write every number here")
    parser.add_argument("--png", metavar="PATH", help="bar chart of bytes kept and peak (needs matplotlib)")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    args.models = _split(args.models) or defaults["models"]
    args.cases = _split(args.cases) or list(CASES)
    for key in ("batch", "size", "pairs", "compile"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    if torch.device(args.device).type not in PEAK_METHODS:
        parser.error(f"--device {args.device}: the benchmark measures peak memory on cpu or cuda only")
    unknown = [case for case in args.cases if case not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; cases: {', '.join(CASES)}")
    try:
        args.specs = [model_spec(name) for name in args.models]
    except ValueError as error:
        parser.error(str(error))
    if args.png:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error(MATPLOTLIB_MISSING)
    return args


def main(argv: list[str] | None = None) -> int:
    """``step ...``: the step-time comparison; ``markdown RESULTS.json``: the README's table of
    a benchmark run; anything else: the benchmark."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["step"]:
        step_main(argv[1:])
        return 0
    if argv[:1] == ["markdown"]:
        with open(argv[1]) as handle:
            sys.stdout.write(markdown(json.load(handle)))
        return 0
    if argv[:1] == ["compare"]:
        return compare_main(argv[1:])
    return bench_main(argv)


def bench_main(argv: list[str] | None = None) -> int:
    """Run the benchmark; exit status 1 if some MemSaveMode column's gradients differ."""
    from rich.console import Console

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = BenchConfig(batch=args.batch, size=args.size, pairs=args.pairs, compile_backend=args.compile, device=args.device)
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 120)  # cells have four lines; do not squeeze them into 80 columns
    results = run_bench(args.specs, [CASES[key] for key in args.cases], config, console)
    for table in tables(results):
        console.print(table)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    if args.png:
        write_png(results, args.png)
    differs = any(
        cell.get("exact") == "DIFFERS"
        for row in results["rows"]
        for key, cell in row["columns"].items()
        if COLUMN[key].mode
    )
    return 1 if differs else 0


def step_main(argv: list[str] | None = None) -> dict:
    """Run the step-time comparison, one process per allocator setting; returns its results."""
    from rich.console import Console

    parser = argparse.ArgumentParser(prog="python -m tools.bench step", description=step.__doc__.splitlines()[0])
    parser.add_argument("--rows", "--row", nargs="+", action="extend", choices=list(STEP_ROWS), metavar="ROW",
                        help=f"default: every row whose model is installed: {', '.join(STEP_ROWS)}")
    parser.add_argument("--engines", nargs="+", choices=MODE_ENGINES, default=list(MODE_ENGINES),
                        help="the engines MemSaveMode runs on (default: both)")
    parser.add_argument("--trim", choices=[*step.ALLOCATORS, "both"], default="both",
                        help="the allocator: glibc's default (trim), freed memory kept (keep), or both (default)")
    parser.add_argument("--pairs", type=int, default=41, help="interleaved rounds per row (default 41)")
    parser.add_argument("--batch", type=int, help="override every row's batch")
    parser.add_argument("--size", type=int, help="override every row's image size")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--per-call-rounds", type=int, default=41, help="rounds of the per-call microbenchmark (default 41)")
    parser.add_argument("--no-per-call", action="store_true", help="skip the per-call microbenchmark")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--measure-only", metavar="PATH", help=argparse.SUPPRESS)  # one allocator setting, in this process
    args = parser.parse_args(argv)
    console = Console()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, skipped = step.available_rows()
    if args.rows:
        rows = [row for row in rows if row.key in args.rows]
    if args.measure_only:
        per_call = 0 if args.no_per_call else args.per_call_rounds
        result = step.measure(rows, args.engines, args.pairs, args.batch, args.size, per_call, console)
        with open(args.measure_only, "w") as handle:
            json.dump(result, handle)
        return result
    forwarded = ["--engines", *args.engines, "--pairs", str(args.pairs), "--per-call-rounds", str(args.per_call_rounds)]
    forwarded += ["--rows", *(row.key for row in rows)]
    for flag in ("batch", "size", "threads"):
        if getattr(args, flag):
            forwarded += [f"--{flag}", str(getattr(args, flag))]
    if args.no_per_call:
        forwarded.append("--no-per-call")
    allocators = list(step.ALLOCATORS) if args.trim == "both" else [args.trim]
    results = {"allocators": {name: step.measure_in_subprocess(name, forwarded) for name in allocators}, "skipped": skipped}
    for table in step_tables(results):
        console.print(table)
    if not args.no_per_call:
        console.print(per_call_table(results))
    for reason in skipped:
        console.print(f"[dim]not measured: {reason}[/dim]")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return results
