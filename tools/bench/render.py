"""The benchmark's output: one rich table per model with a caption saying what the figures
mean, the matplotlib bar chart of bytes kept and peaks, and the step-time comparison's table."""

from __future__ import annotations

from typing import Any


from memsave_dispatch.report import format_bytes

from .measure import COMPILE_REL_TOL
from .runner import COLUMNS


def _ratio(value: float | None, reference: float | None) -> str:
    return f" ({value / reference:.2f}x)" if value is not None and reference else ""


def format_cell(cell: dict[str, Any], baseline: dict[str, Any] | None) -> str:
    """The compact text of one table cell: bytes kept, peak, time, exactness."""
    if cell.get("error"):
        return f"[red]error[/red]: {cell['error'][:60]}"
    lines = []
    reference = baseline or {}
    if cell["kept_bytes"] is not None:
        lines.append(f"kept {format_bytes(cell['kept_bytes'])}{_ratio(cell['kept_bytes'], reference.get('kept_bytes'))}")
    if cell["peak_bytes"] is not None:
        lines.append(f"peak {format_bytes(cell['peak_bytes'])}{_ratio(cell['peak_bytes'], reference.get('peak_bytes'))}")
    if baseline is None and cell["step_ms"] is not None:
        lines.append(f"time {cell['step_ms']:.0f} ms")
    elif cell["time_ratio"] is not None:
        lines.append(f"time {cell['time_ratio']:.2f}x")
    if cell["exact"] == "within tol":
        lines.append(f"within tol ({cell['max_rel_diff']:.0e})")
    elif cell["exact"] is not None:
        lines.append(cell["exact"] if cell["exact"] != "DIFFERS" else f"[red]DIFFERS[/red] (rel. error {cell['max_rel_diff']:.1e})")
    if cell.get("graph_breaks"):
        lines.append(f"{cell['graphs']} graphs, {cell['graph_breaks']} graph breaks")
    return "\n".join(lines) or "-"


def tables(results: dict[str, Any]) -> list[Any]:
    """One rich table per model: rows are cases, columns the four ways to run the step."""
    from rich.table import Table

    config = results["config"]
    compile_label = config["compile_label"]
    out = []
    for model, rows in _rows_by_model(results).items():
        shape = "x".join(map(str, rows[0]["input_shape"]))
        compiled_with = f", {compile_label}" if compile_label else ""
        table = Table(
            title=f"{model}, input {shape}, {config['threads']} threads, torch {config['torch']}, "
            f"{config['device']}{compiled_with}",
            caption=caption(config),
            caption_justify="left",
            title_justify="left",
            show_lines=True,
        )
        table.add_column("case")
        present = [c for c in COLUMNS if any(c.key in row["columns"] for row in rows)]
        for column in present:
            table.add_column(column.label)
        for row in rows:
            cells = row["columns"]
            table.add_row(
                row["case_label"],
                *(format_cell(cells[c.key], cells.get(c.baseline)) if c.key in cells else "-" for c in present),
            )
        out.append(table)
    return out


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def _ratio_or_dash(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _exactness(cell: dict[str, Any] | None) -> str:
    if cell is None or cell.get("error"):
        return "error" if cell else "-"
    if cell["exact"] == "within tol":
        return f"within tol ({cell['max_rel_diff']:.0e})"
    return cell["exact"] or "-"


def markdown_table(results: dict[str, Any]) -> str:
    """The README's benchmark table: one line per model x case, the four columns side by side
    (MiB, time ratios against each column's baseline, gradient exactness); "-" where a column
    was not run."""
    keys = [column.key for column in COLUMNS]
    lines = [
        "| model | case | kept: eager / mode / compile / compile + mode (MiB) | peak: eager / mode / compile / "
        "compile + mode (MiB) | time: stock step; mode vs eager, compile vs eager, compile + mode vs compile | "
        "gradients: mode / compile / compile + mode |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        cells = [row["columns"].get(key) for key in keys]
        kept = " / ".join(_mib(cell and cell["kept_bytes"]) for cell in cells)
        peak = " / ".join(_mib(cell and cell["peak_bytes"]) for cell in cells)
        stock_ms = cells[0] and cells[0]["step_ms"]
        ratios = ", ".join(_ratio_or_dash(cell and cell["time_ratio"]) for cell in cells[1:])
        time = f"{stock_ms:.0f} ms; {ratios}" if stock_ms is not None else ratios
        gradients = " / ".join(_exactness(cell) for cell in cells[1:])
        lines.append(f"| {row['model']} | {row['case_label']} | {kept} | {peak} | {time} | {gradients} |")
    return "\n".join(lines)


def caption(config: dict[str, Any]) -> str:
    """What the figures mean and how they were measured."""
    text = (
        f"kept: bytes kept for backward after the forward pass (model state excluded). "
        f"peak: max allocation above the step's start over forward + backward + optimizer step "
        f"({config['peak_method']}). time: median of per-round step-time ratios over "
        f"{config['pairs']} interleaved rounds ({config.get('time_method', 'wall clock')}; stock eager: "
        f"median step time). Ratios and "
        f"exactness: MemSaveMode columns against the same execution without the mode, "
        f"torch.compile against stock eager; gradients compared as raw bits "
        f"(bit-identical; eager MemSaveMode must be) or, for torch.compile, a relative L2 error of "
        f"at most {COMPILE_REL_TOL:g} over all gradients (within tol)."
    )
    if config["compile_backend"] == "partition":
        text += (
            " torch.compile columns: Inductor's graph capture, decompositions and partitioner "
            "with the graphs run by eager kernels (same tensors kept as real Inductor, including "
            "its channels-last copies of saved conv weights); no peak or time."
        )
    elif config["compile_backend"] == "inductor":
        text += " Inductor on CPU keeps channels-last copies of the conv weights it saves: they count in kept."
    if config["compile_backend"] != "none":
        text += " Compiled random operators use PyTorch's generator (fallback_random), as eager does."
    return text


def markdown(results: dict[str, Any]) -> str:
    """The README's table, stock eager against the mode (:func:`markdown_table` has all four
    columns): per model and case, bytes kept and whole-step peak (with the ratio), the
    step-time ratio and gradient exactness."""
    config = results["config"]
    lines = [
        "| model, input | case | kept: stock | kept: mode | peak: stock | peak: mode | time: mode / stock | gradients |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, rows in _rows_by_model(results).items():
        shape = "x".join(map(str, rows[0]["input_shape"]))
        for index, row in enumerate(rows):
            stock, mode = row["columns"]["eager"], row["columns"]["mode"]
            lines.append(
                f"| {f'{model}, {shape}' if index == 0 else ''} | {row['case_label']} "
                f"| {_mib(stock['kept_bytes'])} | {_mib(mode['kept_bytes'])}{_ratio(mode['kept_bytes'], stock['kept_bytes'])} "
                f"| {_mib(stock['peak_bytes'])} | {_mib(mode['peak_bytes'])}{_ratio(mode['peak_bytes'], stock['peak_bytes'])} "
                f"| {_ratio_or_dash(mode['time_ratio'])} | {_exactness(mode)} |"
            )
    lines.append("")
    lines.append(
        f"MiB; torch {config['torch']}, {config['device']}, {config['threads']} threads, "
        f"{config['pairs']} interleaved rounds (median of per-round ratios)."
    )
    return "\n".join(lines) + "\n"


def _rows_by_model(results: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    by_model: dict[str, list[dict[str, Any]]] = {}
    for row in results["rows"]:
        by_model.setdefault(row["model"], []).append(row)
    return by_model


def write_png(results: dict[str, Any], path: str) -> None:
    """Grouped bars per model x case: bytes kept (left) and peak (right), one bar per column."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit(MATPLOTLIB_MISSING) from None

    by_model = _rows_by_model(results)
    figure, axes = plt.subplots(len(by_model), 2, figsize=(15, 4 * len(by_model)), squeeze=False)
    width = 0.8 / len(COLUMNS)
    figures = (("kept_bytes", "bytes kept for backward"), ("peak_bytes", "peak over a training step"))
    for axes_row, (model, rows) in zip(axes, by_model.items()):
        for axis, (key, title) in zip(axes_row, figures):
            for index, column in enumerate(COLUMNS):
                offset = (index - (len(COLUMNS) - 1) / 2) * width
                bars = [
                    (position + offset, row["columns"][column.key][key] / 2**20)
                    for position, row in enumerate(rows)
                    if row["columns"].get(column.key, {}).get(key) is not None
                ]
                if bars:
                    axis.bar(*zip(*bars), width, label=column.label, color=f"C{index}")
            axis.set_xticks(range(len(rows)))
            axis.set_xticklabels([row["case_label"] for row in rows], rotation=30, ha="right")
            axis.set_ylabel("MiB")
            axis.set_title(f"{model}: {title}")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="upper center", ncol=len(COLUMNS))
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (4 * len(by_model))))
    figure.savefig(path, dpi=110)
    plt.close(figure)


MATPLOTLIB_MISSING = "--png needs matplotlib: pip install 'memsave-dispatch[bench]' (or pip install matplotlib)"


# -- the step-time comparison ------------------------------------------------------------------
def step_tables(results: dict[str, Any]) -> list[Any]:
    """One table per allocator setting: per row, stock's step time, then per engine the
    median mode/stock ratio (quartiles), bytes kept and exactness, and page faults per step."""
    from rich.table import Table

    out = []
    for allocator, measured in results["allocators"].items():
        (before, after) = measured["load_average"]
        table = Table(
            title=f"Step time, allocator: {ALLOCATOR_LABELS[allocator]}; {measured['threads']} threads, "
            f"torch {measured['torch']}, load average {before[0]:.1f} -> {after[0]:.1f}",
            title_justify="left",
        )
        table.add_column("row", justify="left")
        table.add_column("stock ms", justify="right")
        engines = list(measured["rows"][0]["engines"]) if measured["rows"] else []
        for name in engines:
            table.add_column(f"{name}: ratio (IQR)", justify="right")
            table.add_column(f"{name}: kept, exact", justify="right")
        table.add_column("faults/step: stock, " + ", ".join(engines), justify="right")
        for row in measured["rows"]:
            cells = [f"{row['model']}, {row['case']}, batch {row['batch']}, {row['input'][1]}px", f"{row['stock_ms']:.1f}"]
            faults = [row["stock_page_faults_per_step"]]
            for name in engines:
                figures = row["engines"][name]
                q1, _, q3 = figures["ratio_quartiles"]
                cells.append(f"{figures['median_ratio']:.3f} ({q1:.3f}-{q3:.3f})")
                exact = "bit-identical" if figures["gradients_bit_identical"] else "[red]DIFFERS[/red]"
                cells.append(f"{format_bytes(figures['mode_bytes'])} of {format_bytes(row['stock_bytes'])}, {exact}")
                faults.append(figures["page_faults_per_step"])
            cells.append(", ".join("-" if count is None else f"{count:.0f}" for count in faults))
            table.add_row(*cells)
        out.append(table)
    return out


ALLOCATOR_LABELS = {"trim": "glibc default (freed memory returned to the OS)", "keep": "freed memory kept (GLIBC_TUNABLES)"}


def per_call_table(results: dict[str, Any]) -> Any:
    """Per handled call: stock microseconds and each engine's overhead, per allocator setting."""
    from rich.table import Table

    table = Table(
        title="Per handled call, forward + backward, 1 thread, warm: MemSaveMode's overhead over stock in us "
        "(median over rounds; quartiles)",
        title_justify="left",
    )
    table.add_column("call", justify="left")
    columns = []
    for allocator, measured in results["allocators"].items():
        for name in measured["per_call"][0]["engines"] if measured["per_call"] else ():
            columns.append((allocator, name))
            table.add_column(f"{name}, {allocator}", justify="right")
    table.add_column("stock us", justify="right")
    calls: dict[str, dict[str, dict]] = {}
    for allocator, measured in results["allocators"].items():
        for row in measured["per_call"]:
            calls.setdefault(row["call"], {})[allocator] = row
    for call, by_allocator in calls.items():
        cells = [call]
        for allocator, name in columns:
            figures = by_allocator[allocator]["engines"][name]
            q1, _, q3 = figures["overhead_quartiles_us"]
            cells.append(f"{figures['overhead_us']:+.2f} ({q1:+.1f}..{q3:+.1f})")
        cells.append(" / ".join(f"{row['stock_us']:.1f}" for row in by_allocator.values()))
        table.add_row(*cells)
    return table
