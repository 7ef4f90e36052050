"""Shared helpers for the benchmarks: timing statistics and one table format, so every figure reads the same.

Each benchmark module exposes `run(quick: bool) -> list[Row]`; `texbridge bench` runs them and prints the rows.
Peers are measured in the same run and every row names the peer it is compared with.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator


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


@contextmanager
def private_namespace(namespace: str) -> Iterator[dict[str, str]]:
    """A throwaway runtime dir and namespace for the figures, inherited by child processes (the yielded dict is the
    environment to give them); a user's own broker is never touched, and the broker started inside is stopped."""
    import texbridge

    keys = ("TEXBRIDGE_RUNTIME_DIR", "TEXBRIDGE_NAMESPACE")
    saved = {k: os.environ.get(k) for k in keys}
    directory = tempfile.mkdtemp(prefix="texbridge-bench-")
    os.environ.update({"TEXBRIDGE_RUNTIME_DIR": directory, "TEXBRIDGE_NAMESPACE": namespace})
    try:
        yield dict(os.environ)
    finally:
        try:
            with texbridge.connect(autostart=False, app_name="bench-stop") as s:
                s.shutdown()
        except texbridge.TexbridgeError:
            pass
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(directory, ignore_errors=True)
