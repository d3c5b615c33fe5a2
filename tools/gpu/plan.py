"""The benchmark's GPU columns within a time budget, through ``tools.bench``'s own runner.

Groups of models share a batch and input size: ResNet-18 and ResNet-50 (torchvision) at batch
64, 224x224, and the transformer encoder at batch 32 x 512 tokens, each in four cases (frozen
with batch norm in eval or in training mode, all trainable, LoRA). First every row's eager
columns (stock and the mode), which cost seconds; then, as long as the budget lasts, the rows
again with all four columns (torch.compile and compile + mode added), which cost a
compilation each, most important first. Every finished row is handed to ``checkpoint`` at
once, so a run cut short still leaves its results.
"""

from __future__ import annotations

import importlib.util
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tools.bench.cases import CASES, model_spec
from tools.bench.runner import BenchConfig, run_bench

#: Cases in priority order: the frozen-BN-eval row shows the most, "all trainable" the least.
BENCH_CASES = ("input-bn-eval", "all", "lora", "input-bn-train")


@dataclass(frozen=True)
class Group:
    models: tuple[str, ...]
    batch: int
    size: int


@dataclass(frozen=True)
class BenchPlan:
    groups: tuple[Group, ...]
    pairs: int
    compile_backend: str
    compile_s_per_module: float  # first guess of a row's compile time, per module of the model

    @classmethod
    def for_device(cls, device: torch.device, compile_backend: str | None) -> BenchPlan:
        if device.type == "cuda":
            groups = (Group(("torchvision:resnet18", "torchvision:resnet50"), 64, 224), Group(("transformer_encoder",), 32, 512))
            return cls(groups, pairs=9, compile_backend=compile_backend or "inductor", compile_s_per_module=1.2)
        # the preparation run on the CPU: the same code path at toy sizes
        resnets = ("torchvision:resnet18", "torchvision:resnet50") if _has("torchvision") else ("resnet18",)
        groups = (Group(resnets, 2, 32), Group(("transformer_encoder",), 2, 16))
        return cls(groups, pairs=3, compile_backend=compile_backend or "partition", compile_s_per_module=0.3)


def _has(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


class Budget:
    """Seconds left until a deadline."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def run_plan(plan: BenchPlan, device: torch.device, budget: Budget, checkpoint: Callable[[dict], None]) -> dict:
    """Eager columns for every row, then compiled ones while the budget lasts. Returns (and
    checkpoints) ``{"groups": [{"batch", "size", "config", "rows", "nondeterministic"}],
    "skipped": [...]}``; a group's ``nondeterministic`` names the stock operators that warned
    they have no deterministic implementation (its rows' exactness then proves nothing)."""
    out: dict = {"groups": [], "skipped": []}
    for group in plan.groups:
        group_out = {"batch": group.batch, "size": group.size, "nondeterministic": []}
        group_out.update(_run(group, group.models, BENCH_CASES, plan, device, "none", group_out))
        out["groups"].append(group_out)
        checkpoint(out)
    if plan.compile_backend != "none":
        _add_compiled_rows(plan, device, budget, out, checkpoint)
    return out


def _run(group: Group, models, cases, plan: BenchPlan, device: torch.device, compile_backend: str, group_out: dict) -> dict:
    config = BenchConfig(batch=group.batch, size=group.size, pairs=plan.pairs, compile_backend=compile_backend, device=device.type)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = run_bench([model_spec(name) for name in models], [CASES[key] for key in cases], config)
    seen = {str(w.message).split(" ")[0] for w in caught if "deterministic implementation" in str(w.message)}
    group_out["nondeterministic"] = sorted(seen | set(group_out["nondeterministic"]))
    return results


def _add_compiled_rows(plan: BenchPlan, device: torch.device, budget: Budget, out: dict, checkpoint) -> None:
    """Rows with all four columns, most important case first, while the estimate of a row's
    time (two compilations, of a graph about as large as the model has modules; the rate is
    measured on the first row) fits in what is left."""
    modules = {model: sum(1 for _ in model_spec(model).build().modules()) for group in plan.groups for model in group.models}
    rate = plan.compile_s_per_module
    for case in BENCH_CASES:
        for group, group_out in zip(plan.groups, out["groups"]):
            for model in group.models:
                estimate = rate * modules[model]
                if estimate > budget.left():
                    out["skipped"].append({"model": model, "case": case,
                                           "why": f"time budget: about {estimate:.0f} s needed, {budget.left():.0f} s left"})
                    continue
                start = time.monotonic()
                compiled = _run(group, (model,), (case,), plan, device, plan.compile_backend, group_out)
                rate = (time.monotonic() - start) / modules[model]  # measured from now on
                group_out["compiled_config"] = compiled["config"]
                _replace_row(group_out["rows"], compiled["rows"][0])
                checkpoint(out)


def _replace_row(rows: list[dict], new: dict) -> None:
    for index, row in enumerate(rows):
        if (row["model"], row["case"]) == (new["model"], new["case"]):
            rows[index] = new
            return
    rows.append(new)
