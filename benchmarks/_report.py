"""Shared helpers for the benchmarks: timing statistics and one table format, so every figure reads the same.

Each benchmark module exposes `run(quick: bool) -> list[Row]`; `texbridge bench` runs them and prints the rows.
Peers are measured in the same run and every row names the peer it is compared with.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass


@dataclass
class Row:
    group: str  # what is measured, e.g. "handoff round trip"
    subject: str  # who, e.g. "texbridge keyed mutex" or "multiprocessing.Event"
    value: float  # the headline number in `unit`
    unit: str  # "us", "ms", "ops/s", "frames/s", "B", "%"
    p99: float | None = None
    note: str = ""
    higher_is_better: bool = False


def percentile(samples: list[float], q: float) -> float:
    s = sorted(samples)
    if not s:
        return float("nan")
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


def median(samples: list[float]) -> float:
    return statistics.median(samples) if samples else float("nan")


def latency_row(group: str, subject: str, seconds: list[float], note: str = "") -> Row:
    """A latency row in microseconds from samples in seconds."""
    return Row(group, subject, median(seconds) * 1e6, "us", percentile(seconds, 99) * 1e6, note)


def rate_row(group: str, subject: str, count: int, seconds: float, unit: str = "ops/s", note: str = "") -> Row:
    return Row(group, subject, count / seconds if seconds > 0 else float("inf"), unit, None, note, True)


def ratio_text(base: Row, peer: Row) -> str:
    """How the group's first row (texbridge) compares with `peer`, as '3.2x faster' or '0.5x (slower)'."""
    if not base.value or not peer.value or base.unit != peer.unit:
        return ""
    better = base.value / peer.value if base.higher_is_better else peer.value / base.value
    return f"{better:.2f}x " + ("better" if better >= 1 else "(worse)")


def print_rows(rows: list[Row]) -> None:
    """Print rows grouped, each with its ratio against the first row of its group (texbridge goes first)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="texbridge benchmarks", show_lines=False)
    for col in ("group", "subject", "median / value", "p99", "vs first in group", "note"):
        table.add_column(col)
    first: dict[str, Row] = {}
    for r in rows:
        base = first.setdefault(r.group, r)
        ratio = "" if base is r else ratio_text(base, r)
        p99 = f"{r.p99:.2f} {r.unit}" if r.p99 is not None else ""
        table.add_row(r.group, r.subject, f"{r.value:,.2f} {r.unit}", p99, ratio, r.note)
    Console().print(table)
