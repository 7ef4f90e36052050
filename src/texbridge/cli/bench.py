"""`texbridge bench`: run the modules in benchmarks/ (each has `run(quick) -> rows`) and print one table."""

from __future__ import annotations

import importlib
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import click
from rich.markup import escape

import texbridge

from ._common import WIDTH, console, err_console, fail


def benchmarks_dir() -> Path:
    """$TEXBRIDGE_BENCHMARKS, else the source checkout's benchmarks/ (benchmarks are not installed)."""
    env = os.environ.get("TEXBRIDGE_BENCHMARKS")
    if env:
        return Path(env)
    return Path(texbridge.__file__).resolve().parents[2] / "benchmarks"


def _load_benchmark(directory: Path, stem: str):
    """Import benchmarks/<stem>.py as `benchmarks.<stem>` (a package, so relative imports work). Only the parent
    goes on sys.path: benchmarks/ itself there would let benchmarks/vulkan.py shadow the `vulkan` package."""
    if str(directory.parent) not in sys.path:
        sys.path.insert(0, str(directory.parent))
    return importlib.import_module(f"{directory.name}.{stem}")


@click.command()
@click.option("--quick", is_flag=True, help="Fewer iterations: a smoke run, not figures to quote.")
@click.option("--list", "list_only", is_flag=True, help="List the benchmark modules and exit.")
@click.argument("names", nargs=-1)
def bench(quick: bool, list_only: bool, names: tuple[str, ...]) -> None:
    """Run the benchmarks in benchmarks/ (all, or NAMES) and print one table."""
    directory = benchmarks_dir()
    if not directory.is_dir():
        fail(f"no benchmarks directory at {directory} (set TEXBRIDGE_BENCHMARKS)")
    available = sorted(p.stem for p in directory.glob("*.py") if not p.stem.startswith("_"))
    if list_only:
        console.print("\n".join(available))
        return
    unknown = [n for n in names if n not in available]
    if unknown:
        fail(f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(available)}")
    chosen = list(names) or available
    try:
        report = _load_benchmark(directory, "_report")
    except Exception as e:
        fail(f"cannot import {directory / '_report.py'}: {e}")
    rows: list[Any] = []
    failures: list[str] = []
    for stem in chosen:
        console.print(f"[bold]bench[/] {stem}{' (quick)' if quick else ''} ...")
        sys.stdout.flush()
        t = time.perf_counter()
        try:
            module = _load_benchmark(directory, stem)
            got = list(module.run(quick))
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # noqa: BLE001 - one broken benchmark must not hide the others' figures
            failures.append(stem)
            err_console.print(f"[bold red]benchmark {stem} failed:[/] {escape(f'{type(e).__name__}: {e}')}",
                              soft_wrap=True)
            err_console.print(traceback.format_exc(limit=-3), soft_wrap=True, markup=False)
            continue
        rows.extend(got)
        console.print(f"  {len(got)} row(s) in {time.perf_counter() - t:.1f}s")
    if rows:
        if not sys.stdout.isatty():
            os.environ["COLUMNS"] = str(WIDTH)  # _report's own Console: wide lines when piped
        report.print_rows(rows)
    if failures:
        fail(f"{len(failures)} benchmark(s) failed: {', '.join(failures)}")
