"""The check's results: written as JSON as they come (a run cut short keeps what it finished),
judged (the verdict), and rendered as markdown, the README's tables included."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any

from tools.bench.render import markdown_table
from tools.bench.runner import COLUMN

MIB = 2**20


def write_json(out: dict, path: str | Path) -> None:
    """Replace ``path`` whole (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".partial")
    partial.write_text(json.dumps(out, indent=1, default=str))
    os.replace(partial, path)


# -- the verdict ---------------------------------------------------------------------------
def _bench_problems(out: dict) -> tuple[list[str], list[str]]:
    """(problems, not comparable): mode columns whose gradients differ, or that keep or peak
    above their baseline; differing gradients in a group where stock ran nondeterministic
    operators are not comparable instead."""
    problems, not_comparable = [], []
    for group in (out.get("bench") or {}).get("groups", []):
        for row in group["rows"]:
            cells = row["columns"]
            for key, cell in cells.items():
                column = COLUMN[key]
                if not column.mode:
                    continue
                where = f"{row['model']} / {row['case_label']} / {column.label}"
                baseline = cells.get(column.baseline) or {}
                if cell.get("error"):
                    problems.append(f"{where}: {cell['error'][:100]}")
                    continue
                if cell.get("exact") == "DIFFERS":
                    if group["nondeterministic"]:
                        not_comparable.append(f"{where} ({', '.join(group['nondeterministic'])})")
                    else:
                        problems.append(f"{where}: gradients differ from {column.baseline}")
                for figure in ("kept_bytes", "peak_bytes"):
                    if None not in (cell.get(figure), baseline.get(figure)) and cell[figure] > baseline[figure]:
                        problems.append(f"{where}: {figure.split('_')[0]} above {column.baseline}")
    return problems, not_comparable


def verdict(out: dict) -> dict[str, Any]:
    """Counts and every problem found: the run passes when there is none."""
    matrix = out.get("matrix", [])
    compared = [r for r in matrix if r["skipped"] is None and r["stock_repeatable"]]
    problems = [f"{r['family']} {r['config']}: {r['problem']}" for r in matrix if r["problem"]]
    ghosts = out.get("ghosts") or {}
    problems += [f"ghost {k['kernel']} ({k['layout']}): {k['problem']}" for k in ghosts.get("kernels", []) if k["problem"]]
    stack = ghosts.get("frozen_stack")
    if stack and not (stack["exact"] and stack["mode"]["kept"] < stack["stock"]["kept"]):
        problems.append("frozen stack: not exact or nothing saved")
    problems += [f"host sync {r['family']} {r['config']}: {r['problem']}" for r in out.get("host_sync") or [] if r["problem"]]
    problems += [f"codecs: {name} is false" for name, ok in (out.get("codecs") or {}).items() if not ok]
    bench_problems, bench_not_comparable = _bench_problems(out)
    problems += bench_problems
    return {
        "configurations": len(matrix),
        "skipped_by_stock": sum(r["skipped"] is not None for r in matrix),
        "compared": len(compared),
        "bit_identical": sum(r["outputs_equal"] and r["grads_equal"] for r in compared),
        "not_comparable": [f"{r['family']} {r['config']} ({', '.join(r['nondeterministic']) or 'stock differs from itself'})"
                           for r in matrix if r["skipped"] is None and not r["stock_repeatable"]] + bench_not_comparable,
        "problems": problems,
        "passed": not problems,
    }


# -- markdown ------------------------------------------------------------------------------
def _matrix_table(matrix: list[dict]) -> list[str]:
    lines = [
        "| family | configurations | bit-identical / compared | handled calls | kept / stock | backward growth, mode / stock | problems |",
        "|---|---|---|---|---|---|---|",
    ]
    for family, rows in itertools.groupby(sorted(matrix, key=lambda r: r["family"]), key=lambda r: r["family"]):
        rows = list(rows)
        ran = [r for r in rows if r["skipped"] is None]
        compared = [r for r in ran if r["stock_repeatable"]]
        exact = sum(r["outputs_equal"] and r["grads_equal"] for r in compared)
        stock, kept = sum(r["stock_bytes"] for r in ran), sum(r["mode_bytes"] for r in ran)
        growth = [(r["mode_backward_growth"], r["stock_backward_growth"]) for r in ran if r["mode_backward_growth"] is not None]
        growth_text = f"{sum(m for m, _ in growth) / max(1, sum(s for _, s in growth)):.2f}" if growth else "-"
        problems = [f"{r['config']}: {r['problem']}" for r in rows if r["problem"]]
        skipped = len(rows) - len(ran)
        count = f"{len(rows)}" + (f" ({skipped} stock cannot run)" if skipped else "")
        kept_text = f"{kept / stock:.2f}" if stock else "-"
        lines.append(
            f"| {family} | {count} | {exact} / {len(compared)} | {sum(r['handled'] for r in ran)} | {kept_text} | "
            f"{growth_text} | {'; '.join(problems[:2]) or 'none'} |"
        )
    return lines


def _ghost_lines(ghosts: dict) -> list[str]:
    zero = ghosts["zero_memory"]
    lines = [f"A ghost of {zero['ghost_bytes'] / MIB:.0f} MiB made the allocator hand out {zero['allocated']} bytes. Zero memory per device:", ""]
    lines += [f"- {device}: {info['source']}, {info['physical_bytes'] / MIB:.1f} MiB occupied, "
              f"region {info['region_bytes'] / MIB:.0f} MiB, {'read-only' if info['read_only'] else 'writable'}"
              for device, info in zero["sources"].items()]
    lines += ["", "| backward kernel | layout | input (MiB) | growth: real input / ghost / zero-stride placeholder (MiB) | ghost exact | problem |",
              "|---|---|---|---|---|---|"]
    for k in ghosts["kernels"]:
        placeholder = f"{k['growth_placeholder'] / MIB:.1f}" if k["growth_placeholder"] is not None else k["placeholder_note"]
        lines.append(f"| {k['kernel']} | {k['layout']} | {k['input_bytes'] / MIB:.1f} | {k['growth_real'] / MIB:.1f} / "
                     f"{k['growth_ghost'] / MIB:.1f} / {placeholder} | {'yes' if k['ghost_exact'] else 'NO'} | {k['problem'] or 'none'} |")
    stack = ghosts["frozen_stack"]
    lines += ["", f"Frozen conv-BN(eval)-ReLU-pool stack, batch {stack['batch']} at 224x224: kept {stack['stock']['kept'] / MIB:.1f} "
              f"MiB stock, {stack['mode']['kept'] / MIB:.1f} MiB under the mode; backward peak above its start "
              f"{stack['stock']['backward_growth'] / MIB:.1f} / {stack['mode']['backward_growth'] / MIB:.1f} MiB; gradients "
              f"{'bit-identical' if stack['exact'] else 'DIFFER'}."]
    return lines


def _bench_lines(bench: dict) -> list[str]:
    lines = []
    for group in bench["groups"]:
        config = group.get("compiled_config") or group["config"]
        lines += [f"Batch {group['batch']}, size {group['size']}; torch {config['torch']}, {config['device']}, "
                  f"peak: {config['peak_method']}, time: {config.get('time_method', 'wall clock')}, "
                  f"{config['pairs']} interleaved rounds; compile columns: {config.get('compile_label') or 'not run'}.", "",
                  markdown_table(group), ""]
    if bench.get("skipped"):
        lines.append("Compiled columns not run (time budget): "
                     + ", ".join(f"{s['model']} / {s['case']}" for s in bench["skipped"]) + ".")
    for group in bench["groups"]:
        if group["nondeterministic"]:
            lines.append(f"Stock operators without a deterministic implementation at batch {group['batch']}: "
                         + ", ".join(group["nondeterministic"]) + ".")
    return lines


def render_markdown(out: dict) -> str:
    """The whole report: what ran where, the verdict, every section's table."""
    meta = out["meta"]
    judged = verdict(out)
    lines = [
        f"# MemSaveMode on {meta['device_name']}", "",
        f"`{meta['command']}`: torch {meta['torch']}, CUDA {meta.get('cuda') or '-'}, cuDNN {meta.get('cudnn') or '-'}, "
        f"Python {meta['python']}, {meta['seconds']:.0f} s. Deterministic algorithms on (warnings only), TF32 off.", "",
        f"**Verdict: {'passed' if judged['passed'] else 'FAILED'}.** {judged['bit_identical']} of {judged['compared']} "
        f"comparable configurations bit-identical ({judged['configurations']} run, {judged['skipped_by_stock']} that "
        f"stock itself cannot run skipped, {len(judged['not_comparable'])} not comparable: stock differs from itself).",
    ]
    lines += [f"- {problem}" for problem in judged["problems"][:40]]
    if judged["not_comparable"]:
        lines += ["", "Not comparable: " + "; ".join(judged["not_comparable"][:20])]
    lines += ["", "## Correctness matrix", ""] + _matrix_table(out.get("matrix", []))
    if out.get("codecs"):
        lines += ["", "Codec assumptions on this device: " + ", ".join(f"{k}: {v}" for k, v in out["codecs"].items())]
    if out.get("ghosts"):
        lines += ["", "## Ghosts", ""] + _ghost_lines(out["ghosts"])
    lines += ["", "## Host synchronisation", ""]
    if out.get("host_sync") is None:
        lines.append("Not applicable on this device.")
    else:
        lines += ["| family | configuration | stock | mode |", "|---|---|---|---|"]
        lines += [f"| {r['family']} | {r['config']} | {r['stock'] or 'no sync'} | {r['mode'] or 'no sync'} |" for r in out["host_sync"]]
    if out.get("bench"):
        lines += ["", "## Benchmark (the README's table)", ""] + _bench_lines(out["bench"])
    return "\n".join(lines) + "\n"
