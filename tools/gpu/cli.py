"""The command line of ``tools/gpu_check.py``: the parts in order of importance (correctness
matrix, codecs, ghosts, host synchronisation, benchmark), each written to JSON and markdown as
soon as it is done, all within a time budget."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from memsave_dispatch import zeros
from memsave_dispatch.mode import VERIFY_COMMAND

from .ghost_memory import run_ghost_checks
from .host_sync import run_sync_checks
from .matrix import PRECISIONS, codec_facts, deterministic, run_matrix
from .plan import BenchPlan, Budget, run_plan
from .results import render_markdown, verdict, write_json

REPOSITORY = Path(__file__).resolve().parents[2]
GPU_JSON, GPU_MARKDOWN = REPOSITORY / "docs" / "gpu-results.json", REPOSITORY / "docs" / "gpu-results.md"

# A fresh process makes the CUDA zero mapping and reads it back: a driver that misbehaves
# (the mapping is made with ctypes) must not take the whole run down with it.
_MAPPING_PROBE = """
import torch
from memsave_dispatch import zeros
from memsave_dispatch.ghosts import TensorLayout, ghost_like
layout = TensorLayout.of(torch.empty(0, device="cuda"))._replace(shape=torch.Size([1 << 28]), stride=(1,))
ghost = ghost_like(layout)
assert not bool(ghost[:: 1 << 14].any()) and not bool(ghost[-4096:].any())
print(zeros.describe()[str(ghost.device)]["source"])
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python tools/gpu_check.py",
        description="Verify MemSaveMode on a GPU against stock PyTorch and measure it; results as JSON and markdown.",
        epilog=f"On a GPU machine: {VERIFY_COMMAND} (writes docs/gpu-results.json and .md). Here: --device cpu.",
    )
    parser.add_argument("--device", default="cuda", help="cuda (the check); cpu runs the same code at toy sizes")
    parser.add_argument("--json", metavar="PATH", help="results (default on cuda: docs/gpu-results.json)")
    parser.add_argument("--markdown", metavar="PATH", help="report (default on cuda: docs/gpu-results.md)")
    parser.add_argument("--budget", type=float, help="seconds for the whole run (default 300 on cuda and cpu)")
    parser.add_argument("--skip-bench", action="store_true", help="no benchmark")
    parser.add_argument(
        "--precisions", nargs="+", choices=tuple(PRECISIONS), default=tuple(PRECISIONS),
        help="the matrix's precisions (default: all)",
    )
    parser.add_argument("--compile", choices=("inductor", "partition", "none"), help="compile columns (default: inductor on cuda)")
    parser.add_argument("--allocated-zeros", action="store_true", help="ghosts view allocator zeros, not the mapped granule")
    parser.add_argument("--render", metavar="JSON", help="print the markdown report of an earlier run's JSON and exit")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    on_gpu = args.device.type == "cuda"
    args.json = args.json or (GPU_JSON if on_gpu else None)
    args.markdown = args.markdown or (GPU_MARKDOWN if on_gpu else None)
    args.budget = args.budget or 300.0
    return args


def _meta(args: argparse.Namespace, argv: list[str] | None) -> dict:
    on_gpu = args.device.type == "cuda"
    return {
        "command": "python tools/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": str(args.device),
        "device_name": torch.cuda.get_device_name(args.device) if on_gpu else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if on_gpu else None,
        "python": platform.python_version(),
        "seconds": 0.0,
    }


def _choose_zero_memory(args: argparse.Namespace) -> str:
    if args.device.type != "cuda":
        return "not applicable"
    if args.allocated_zeros:
        zeros.use_allocated_zeros("cuda")
        return "allocator zeros (asked for)"
    probe = subprocess.run([sys.executable, "-c", _MAPPING_PROBE], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(REPOSITORY)})
    source = probe.stdout.strip().splitlines()[-1:] or [""]
    if probe.returncode != 0 or source[0] != zeros.MappedZeroGranule.name:
        zeros.use_allocated_zeros("cuda")
        return f"allocator zeros: the mapping probe failed (exit {probe.returncode}: {probe.stderr.strip()[-300:]})"
    return "one granule mapped many times (probe passed)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        print(render_markdown(json.loads(Path(args.render).read_text())))
        return 0
    if args.device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: this script checks MemSaveMode on a GPU (--device cpu tries it here)", file=sys.stderr)
        return 2
    start = time.monotonic()
    budget = Budget(args.budget)
    out: dict = {"meta": _meta(args, argv)}

    def checkpoint() -> None:
        out["meta"]["seconds"] = time.monotonic() - start
        out["verdict"] = verdict(out)
        if args.json:
            write_json(out, args.json)
        if args.markdown:
            Path(args.markdown).write_text(render_markdown(out))

    out["meta"]["zero_memory"] = _choose_zero_memory(args)
    print(f"torch {torch.__version__} on {out['meta']['device_name']}; zero memory: {out['meta']['zero_memory']}", flush=True)
    with deterministic():
        out["matrix"] = [_as_dict(r) for r in run_matrix(args.device, tuple(args.precisions))]
        _progress("matrix", out, start)
        checkpoint()
        out["codecs"] = codec_facts(args.device)
        out["ghosts"] = run_ghost_checks(args.device)
        _progress("ghosts", out, start)
        checkpoint()
        out["host_sync"] = run_sync_checks(args.device)
        _progress("host sync", out, start)
        checkpoint()
        if not args.skip_bench:
            torch.utils.deterministic.fill_uninitialized_memory = False  # the bench times steps
            plan = BenchPlan.for_device(args.device, args.compile)

            def bench_checkpoint(bench: dict) -> None:
                out["bench"] = bench
                checkpoint()

            run_plan(plan, args.device, budget, bench_checkpoint)
            _progress("benchmark", out, start)
    checkpoint()
    report = render_markdown(out)
    print(report)
    return 0 if out["verdict"]["passed"] else 1


def _as_dict(result) -> dict:
    return {**asdict(result), "problem": result.problem}


def _progress(part: str, out: dict, start: float) -> None:
    problems = len(verdict(out)["problems"])
    print(f"[{time.monotonic() - start:5.0f} s] {part} done; problems so far: {problems}", flush=True)
