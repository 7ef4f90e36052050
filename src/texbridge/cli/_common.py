"""What every command shares: the consoles, THE `--namespace` option, THE error-to-exit wrapper, size parsing.

One home for each, so every command behaves alike: `--namespace/-n NS` means the same everywhere, and a
TexbridgeError (or a bad value such as a namespace name) ends any command with one line and exit status 1, never a
traceback.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from typing import Any, Callable, NoReturn

import click
from rich.console import Console
from rich.markup import escape

import texbridge

from .._errors import TexbridgeError
from .._paths import namespace_name
from ..backends import BACKENDS

# Piped output (tests, `| grep`) gets wide lines instead of rich's 80-column default, so tables stay readable.
WIDTH = None if sys.stdout.isatty() else max(200, int(os.environ.get("COLUMNS", "0") or 0))
console = Console(highlight=False, width=WIDTH)
err_console = Console(stderr=True, highlight=False, width=WIDTH)

# --backend's choices and help, from the one backend table
BACKEND_NAMES = list(BACKENDS)
BACKEND_HELP = "Where the memory lives: " + "; ".join(f"{name} ({what})" for name, what in BACKENDS.items()) + "."


def _apply_namespace(_ctx: Any, _param: Any, value: str | None) -> None:
    if value:
        os.environ["TEXBRIDGE_NAMESPACE"] = value


namespace_option = click.option(
    "--namespace", "-n", default=None, metavar="NS", expose_value=False, callback=_apply_namespace,
    help="Namespace (default: $TEXBRIDGE_NAMESPACE or 'default').")
"""--namespace/-n NS, applied through $TEXBRIDGE_NAMESPACE: everything the command opens without naming a namespace
(a session, Sender, Receiver, list_senders, an auto-started broker, the demo's child processes) then lands in NS.
Commands ask `namespace()` for the name; an invalid one raises ValueError there, which `friendly` reports."""


json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print JSON (machine-readable, stable keys) instead of a table.")
"""--json: the one spelling of machine-readable output; commands print it with print_json()."""


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def print_json(value: Any) -> None:
    """One JSON document on stdout (bytes as hex, dataclasses as objects; nothing rich touches it)."""
    click.echo(json.dumps(value, default=_jsonable, sort_keys=False))


def namespace() -> str:
    """The namespace this command works in (--namespace, else $TEXBRIDGE_NAMESPACE, else 'default')."""
    return namespace_name()


def error_line(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)


def fail(message: str, status: int = 1) -> NoReturn:
    error_line(message)
    raise SystemExit(status)


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn texbridge's typed errors into one line and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            namespace()  # a bad --namespace is the first thing said, before a command loads anything (the viewer)
            return fn(*args, **kwargs)
        except TexbridgeError as e:
            fail(f"{e} [{type(e).__name__}]")
        except ValueError as e:  # bad namespace names and the like, raised before anything is sent
            fail(str(e))

    return wrapper


def connect(*, autostart: bool = False):
    """A session in the command's namespace; no broker is started unless asked: a command that only looks ("is
    anything shared?") must not create the thing it asks about."""
    return texbridge.connect(namespace(), app_name="texbridge-cli", autostart=autostart, timeout=5.0)


def parse_size(_ctx: Any, _param: Any, value: str | None) -> tuple[int, int] | None:
    """click callback for WIDTHxHEIGHT options (1..16384 each); None stays None."""
    if value is None:
        return None
    try:
        w, h = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not WIDTHxHEIGHT, e.g. 1280x720") from None
    if not (1 <= w <= 16384 and 1 <= h <= 16384):
        raise click.BadParameter(f"{value!r}: width and height must be 1..16384")
    return w, h


def bytes_text(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
