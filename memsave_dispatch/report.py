"""What a MemSaveMode intercepted, and the bytes its handlers kept against stock autograd.

Per-operator bytes are what each backward node holds: a storage shared by two nodes counts
in both (a ReLU output is also the next convolution's input). The whole-graph truth is the
number :func:`memsave_dispatch.measure.saved_tensor_bytes` measures.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

__all__ = ["OpTally", "OpReport", "Report", "format_bytes", "render_text"]


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
        self._lock = threading.Lock()

    def add_handled(
        self, stock_bytes: int | None, kept_bytes: int, traced: bool, encodings: list[str] | tuple = ()
    ) -> None:
        with self._lock:
            if traced:
                self.traced += 1
                return
            self.handled += 1
            self.kept_bytes += kept_bytes
            counts = self.encodings
            for encoding in encodings:
                counts[encoding] = counts.get(encoding, 0) + 1
            if stock_bytes is None:
                self.stock_unknown = True
            else:
                self.stock_bytes += stock_bytes

    def reencode(self, old: str, new: str, kept_delta: int) -> None:
        """A deferred encoding happened after the call was counted."""
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
    """The report of a MemSaveMode: one :class:`OpReport` per operator it saw."""

    ops: tuple[OpReport, ...] = field(default_factory=tuple)

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
        name = str(op)
        for line in self.ops:
            if line.op == name:
                return line
        raise KeyError(f"{name} was not seen; seen: {[line.op for line in self.ops]}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
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
        """A rich Table (rich is imported only here)."""
        from rich.table import Table

        table = Table(title=title, title_justify="left", show_footer=True)
        table.add_column("operator", "total", style="bold")
        table.add_column("family")
        table.add_column("handled", str(self.handled), justify="right")
        table.add_column("saved tensors became")
        table.add_column("to stock (why)", str(self.to_stock))
        table.add_column("stock keeps", format_bytes(self.stock_bytes), justify="right")
        table.add_column("kept", format_bytes(self.kept_bytes), justify="right")
        table.add_column("saved", format_bytes(self.saved_bytes), justify="right", style="green")
        for op in self.ops:
            handled = str(op.handled) + (f" (+{op.traced} traced)" if op.traced else "")
            reasons = ", ".join(f"{n} {why}" for why, n in sorted(op.to_stock.items())) or "-"
            became = ", ".join(f"{n} {what}" for what, n in sorted(op.encodings.items())) or "-"
            table.add_row(
                op.op,
                op.family,
                handled,
                became,
                reasons,
                format_bytes(op.stock_bytes),
                format_bytes(op.kept_bytes),
                format_bytes(op.saved_bytes),
            )
        table.caption = (
            "bytes are what each backward node holds, parameters excluded; a storage shared "
            "by two nodes counts in both. 'traced': calls seen while torch.compile traced."
        )
        return table

    def __str__(self) -> str:
        return render_text(self.table())


def render_text(renderable: Any, width: int = 140) -> str:
    """A rich renderable (a table) as plain text, printed nowhere."""
    from rich.console import Console

    console = Console(width=width, record=True, file=_NullFile())
    console.print(renderable)
    return console.export_text()


class _NullFile:
    def write(self, _text: str) -> int:
        return 0

    def flush(self) -> None:
        pass
