"""`texbridge bench`: run the modules in texbridge.benchmarks (each has `run(quick) -> rows`), print one table."""

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

from .. import benchmarks
from ..benchmarks import _report as report_module
from ._common import WIDTH, console, err_console, fail, json_option, print_json


class _Source:
    """Where the benchmarks come from: the package's own (texbridge.benchmarks, present in an installed wheel), or
    the folder in $TEXBRIDGE_BENCHMARKS (a package of modules with `run(quick)` and a `_report.py`)."""

    def __init__(self) -> None:
        self.directory = Path(os.environ["TEXBRIDGE_BENCHMARKS"]) if os.environ.get("TEXBRIDGE_BENCHMARKS") else None
        if self.directory is None:
            self.names = dict(benchmarks.BENCHMARKS)
        elif not self.directory.is_dir():
            fail(f"no benchmarks directory at {self.directory} ($TEXBRIDGE_BENCHMARKS)")
        else:
            self.names = {p.stem: "" for p in sorted(self.directory.glob("*.py")) if not p.stem.startswith("_")}

    def load(self, stem: str):
        if self.directory is None:
            return benchmarks.load(stem) if stem != "_report" else report_module
        # Only the parent goes on sys.path, and the folder is imported as a package (relative imports work): the
        # folder itself there would let its vulkan.py shadow the `vulkan` package.
        if str(self.directory.parent) not in sys.path:
            sys.path.insert(0, str(self.directory.parent))
        return importlib.import_module(f"{self.directory.name}.{stem}")


@click.command()
@click.option("--quick", is_flag=True, help="Fewer iterations: a smoke run, not figures to quote.")
@click.option("--list", "list_only", is_flag=True, help="List the benchmark modules and exit.")
@click.option("--mps", is_flag=True, help="Let the cuda benchmark start a per-user CUDA MPS daemon for its MPS rows "
                                          "(stopped after them) when none runs.")
@json_option
@click.argument("names", nargs=-1)
def bench(quick: bool, list_only: bool, mps: bool, as_json: bool, names: tuple[str, ...]) -> None:
    """Run the benchmarks shipped in texbridge.benchmarks (all, or NAMES) and print one table (--json: one JSON
    object with the rows and the failed benchmarks; progress goes to stderr)."""
    if mps:
        os.environ["TEXBRIDGE_BENCH_MPS"] = "1"  # read by benchmarks/cuda.py (run(quick) takes nothing else)
    source = _Source()
    available = list(source.names)
    out = err_console if as_json else console
    if list_only and as_json:
        print_json(source.names)
        return
    if list_only:
        width = max(map(len, available), default=0)
        console.print("\n".join(f"{n:<{width}}  {d}".rstrip() for n, d in source.names.items()), markup=False)
        return
    unknown = [n for n in names if n not in available]
    if unknown:
        fail(f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(available)}")
    chosen = list(names) or available
    try:
        report = source.load("_report")
    except Exception as e:
        fail(f"cannot import the benchmarks' _report module: {e}")
    rows: list[Any] = []
    failures: list[str] = []
    for stem in chosen:
        out.print(f"[bold]bench[/] {stem}{' (quick)' if quick else ''} ...")
        sys.stdout.flush()
        t = time.perf_counter()
        try:
            module = source.load(stem)
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
        out.print(f"  {len(got)} row(s) in {time.perf_counter() - t:.1f}s")
    if as_json:
        print_json({"rows": rows, "failed": failures})
        if failures:
            raise SystemExit(1)
        return
    if rows:
        if not sys.stdout.isatty():
            os.environ["COLUMNS"] = str(WIDTH)  # _report's own Console: wide lines when piped
        report.print_rows(rows)
    if failures:
        fail(f"{len(failures)} benchmark(s) failed: {', '.join(failures)}")
