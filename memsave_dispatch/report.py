"""What a MemSaveMode intercepted, and the bytes its handlers kept against stock autograd.

Per-operator bytes are what each backward node holds: a storage shared by two nodes counts
in both (a ReLU output is also the next convolution's input). The whole-graph truth is what
:func:`memsave_dispatch.saved_tensor_bytes` measures. Everything here is plain integers:
the report never keeps a tensor alive.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

__all__ = ["OpTally", "Tallies", "OpReport", "Report", "format_bytes", "render_text", "short_op_name"]


def format_bytes(count: float | None) -> str:
    """1536 -> '1.50 KiB'; None -> 'n/a'."""
    if count is None:
        return "n/a"
    sign = "-" if count < 0 else ""
    count = abs(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{sign}{count:.0f} {unit}" if unit == "B" else f"{sign}{count:.2f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def short_op_name(name: str) -> str:
    """'convolution' for 'aten.convolution.default'; the overload stays where it is not the
    default one ('mean.dim')."""
    parts = name.split(".")
    if len(parts) == 3 and parts[0] == "aten":
        return parts[1] if parts[2] == "default" else f"{parts[1]}.{parts[2]}"
    return name


class OpTally:
    """Mutable counters of one operator inside one mode (guarded by a lock)."""

    def __init__(self, op_name: str, family: str) -> None:
        self.op_name = op_name
        self.family = family
        self.handled = 0
        self.traced = 0  # calls seen while torch.compile traced: trace-time, not run-time
        self.to_stock: Counter[str] = Counter()
        self.stock_bytes = 0
        self.stock_unknown = False
        self.kept_bytes = 0
        self.encodings: Counter[str] = Counter()  # what happened to the tensors stock keeps
        self.first_seen_ns = time.monotonic_ns()  # the compiled engine's counters stamp with this clock too
        self._lock = threading.Lock()

    def add_handled(self, stock_bytes: int | None, kept_bytes: int, traced: bool, labels: list[str] | tuple = ()) -> None:
        with self._lock:
            if traced:
                self.traced += 1
                return
            self.handled += 1
            self.kept_bytes += kept_bytes
            counts = self.encodings
            for label in labels:
                counts[label] = counts.get(label, 0) + 1
            if stock_bytes is None:
                self.stock_unknown = True
            else:
                self.stock_bytes += stock_bytes

    def reencode(self, old: str, new: str, kept_delta: int) -> None:
        """A tensor counted as ``old`` became ``new`` after the call (an encoding made once
        the tensor was no longer shared); ``kept_delta`` bytes more are kept."""
        with self._lock:
            self.encodings[old] -= 1
            if not self.encodings[old]:
                del self.encodings[old]
            self.encodings[new] += 1
            self.kept_bytes += kept_delta

    def add_stock(self, reason: str) -> None:
        with self._lock:
            self.to_stock[reason] += 1

    def snapshot(self) -> OpReport:
        with self._lock:
            return OpReport(
                op=self.op_name,
                family=self.family,
                handled=self.handled,
                traced=self.traced,
                to_stock=dict(self.to_stock),
                stock_bytes=None if self.stock_unknown else self.stock_bytes,
                kept_bytes=self.kept_bytes,
                encodings=dict(self.encodings),
            )


class Tallies:
    """One mode's tallies, one per operator seen; safe to update from several threads."""

    def __init__(self) -> None:
        self._by_op: dict[int, OpTally] = {}  # by id(op): an OpOverload hashes in Python
        self._lock = threading.Lock()

    def of(self, op: object, family: str) -> OpTally:
        tally = self._by_op.get(id(op))
        if tally is None:
            with self._lock:
                tally = self._by_op.setdefault(id(op), OpTally(str(op), family))
        return tally

    def report(self, engine: str, compiled_lines: Iterable[tuple[int, OpReport]] = ()) -> Report:
        """The report, with the lines the compiled engine counted for the same mode merged in
        (first seen, in monotonic ns; line): one line per operator, in the order first seen."""
        lines = [(tally.first_seen_ns, tally.snapshot()) for tally in list(self._by_op.values())]
        return Report(_merged([*lines, *compiled_lines]), engine)

    def clear(self) -> None:
        with self._lock:
            self._by_op.clear()


def _merged(lines: Iterable[tuple[int, OpReport]]) -> tuple[OpReport, ...]:
    by_op: dict[str, tuple[int, OpReport]] = {}
    for first_seen, line in lines:
        found = by_op.get(line.op)
        by_op[line.op] = (first_seen, line) if found is None else (min(found[0], first_seen), found[1].merged(line))
    return tuple(line for _first_seen, line in sorted(by_op.values(), key=lambda item: item[0]))


def _added(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    total = Counter(a)
    total.update(b)
    return {key: count for key, count in total.items() if count}


@dataclass(frozen=True)
class OpReport:
    """One operator's line of the report."""

    op: str
    family: str
    handled: int
    traced: int
    to_stock: dict[str, int]
    stock_bytes: int | None  # None: the handler does not describe what stock keeps
    kept_bytes: int
    encodings: dict[str, int] = field(default_factory=dict)  # e.g. {"dropped": 20}

    @property
    def saved_bytes(self) -> int | None:
        return None if self.stock_bytes is None else self.stock_bytes - self.kept_bytes

    def merged(self, other: OpReport) -> OpReport:
        """The same operator counted by the other engine too: both counts together."""
        unknown = self.stock_bytes is None or other.stock_bytes is None
        return OpReport(
            op=self.op,
            family=self.family,
            handled=self.handled + other.handled,
            traced=self.traced + other.traced,
            to_stock=_added(self.to_stock, other.to_stock),
            stock_bytes=None if unknown else self.stock_bytes + other.stock_bytes,
            kept_bytes=self.kept_bytes + other.kept_bytes,
            encodings=_added(self.encodings, other.encodings),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "family": self.family,
            "handled": self.handled,
            "traced_by_compile": self.traced,
            "to_stock": dict(self.to_stock),
            "stock_bytes": self.stock_bytes,
            "kept_bytes": self.kept_bytes,
            "saved_bytes": self.saved_bytes,
            "encodings": dict(self.encodings),
        }


@dataclass(frozen=True)
class Report:
    """The report of a MemSaveMode: one :class:`OpReport` per operator it saw, and which
    engine ran the built-in handlers ("compiled" or "python")."""

    ops: tuple[OpReport, ...] = field(default_factory=tuple)
    engine: str = "python"

    @property
    def handled(self) -> int:
        return sum(op.handled for op in self.ops)

    @property
    def to_stock(self) -> int:
        return sum(sum(op.to_stock.values()) for op in self.ops)

    @property
    def stock_bytes(self) -> int:
        return sum(op.stock_bytes or 0 for op in self.ops)

    @property
    def kept_bytes(self) -> int:
        return sum(op.kept_bytes for op in self.ops)

    @property
    def saved_bytes(self) -> int:
        return sum(op.saved_bytes or 0 for op in self.ops)

    def __getitem__(self, op: object) -> OpReport:
        """The line of an operator: ``report[torch.ops.aten.relu.default]``,
        ``report["aten.relu.default"]`` or ``report["relu"]``."""
        name = str(op)
        for line in self.ops:
            if name in (line.op, short_op_name(line.op)):
                return line
        raise KeyError(f"{name} was not seen; seen: {[line.op for line in self.ops]}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "engine": self.engine,
            "ops": [op.to_dict() for op in self.ops],
            "totals": {
                "handled": self.handled,
                "to_stock": self.to_stock,
                "stock_bytes": self.stock_bytes,
                "kept_bytes": self.kept_bytes,
                "saved_bytes": self.saved_bytes,
            },
        }

    def table(self, title: str = "MemSaveMode: operators intercepted"):
        """A rich renderable: a table that fits 80 columns (numbers never wrap), then what
        the saved tensors became and why calls went to stock, one operator a line."""

        table = Table(
            title=title, title_justify="left", show_footer=True, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True
        )
        table.add_column("operator", "total", style="bold", no_wrap=True)
        for header, total in (
            ("handled", str(self.handled)),
            ("stock keeps", format_bytes(self.stock_bytes)),
            ("kept", format_bytes(self.kept_bytes)),
            ("saved", format_bytes(self.saved_bytes)),
        ):
            table.add_column(header, total, justify="right", no_wrap=True, style="green" if header == "saved" else None)
        notes = Text()
        for op in self.ops:
            name = short_op_name(op.op)
            handled = str(op.handled) + (f"+{op.traced}t" if op.traced else "")
            table.add_row(name, handled, format_bytes(op.stock_bytes), format_bytes(op.kept_bytes), format_bytes(op.saved_bytes))
            became = ", ".join(f"{n} {what}" for what, n in sorted(op.encodings.items()))
            why = ", ".join(f"{n} {reason}" for reason, n in sorted(op.to_stock.items()))
            if became or why:
                notes.append(f"{name}: ", style="bold")
                notes.append("; ".join(part for part in (became, why and f"to stock: {why}") if part) + "\n")
        caption = Text(
            "Bytes are what each backward node holds, parameters excluded; a storage shared "
            "by two nodes counts in both. '+Nt': calls traced by torch.compile (trace time, "
            f"not run time). Engine: {self.engine}.",
            style="dim",
        )
        return Group(table, notes, caption) if notes else Group(table, caption)

    def __str__(self) -> str:
        return render_text(self.table())


def render_text(renderable: Any, width: int = 100) -> str:
    """A rich renderable as plain text at ``width`` columns, printed nowhere."""

    console = Console(width=width, record=True, file=_NullFile())
    console.print(renderable)
    return console.export_text()


class _NullFile:
    def write(self, _text: str) -> int:
        return 0

    def flush(self) -> None:
        pass
