"""Whether two benchmark runs agree on what must not change: every cell's bytes kept, peak and
exactness (timings differ from run to run).

    python -m tools.bench compare docs/bench-quick.json bench.json
"""

from __future__ import annotations

import json
from typing import Any

FIGURES = ("kept_bytes", "peak_bytes", "exact")


def differences(reference: dict[str, Any], candidate: dict[str, Any]) -> tuple[int, list[str]]:
    """(cells compared, one line per figure that differs)."""

    def cells(results: dict[str, Any]) -> dict[tuple[str, str, str], dict[str, Any]]:
        return {(row["model"], row["case"], key): cell for row in results["rows"] for key, cell in row["columns"].items()}

    ours, theirs = cells(reference), cells(candidate)
    lines = []
    for key, cell in sorted(ours.items()):
        other = theirs.get(key)
        if other is None:
            lines.append(f"{' / '.join(key)}: missing")
            continue
        for figure in FIGURES:
            if cell.get(figure) != other.get(figure):
                delta = ""
                if isinstance(cell.get(figure), int) and isinstance(other.get(figure), int):
                    delta = f" ({other[figure] - cell[figure]:+,d})"
                lines.append(f"{' / '.join(key)}: {figure} {cell.get(figure)} -> {other.get(figure)}{delta}")
    return len(ours), lines


def compare_main(argv: list[str]) -> int:
    """Print what differs; exit status 1 if anything does."""
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[-1].strip())
        return 2
    with open(argv[0]) as a, open(argv[1]) as b:
        count, lines = differences(json.load(a), json.load(b))
    for line in lines:
        print(line)
    print(f"{count} cells compared: " + ("bytes kept, peaks and exactness all equal" if not lines else f"{len(lines)} figures differ"))
    return 1 if lines else 0
