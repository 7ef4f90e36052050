"""Benchmarks run by `texbridge bench`: each module exposes run(quick) -> list[_report.Row]."""
