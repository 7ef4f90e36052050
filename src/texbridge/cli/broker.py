"""`texbridge broker start|stop|status`: a namespace's broker, seen from outside. stop and status never start one."""

from __future__ import annotations

import click
from rich.markup import escape
from rich.table import Table

from .._errors import AccessDenied, BrokerUnavailable
from .._launch import start_broker
from .._liveness import watch
from .._paths import socket_path
from ._common import bytes_text, connect, console, fail, friendly, namespace, namespace_option


@click.group()
def broker() -> None:
    """Start, stop or inspect a namespace's broker."""


@broker.command("start")
@namespace_option
@click.option("--persistent", is_flag=True, help="Never exit when idle.")
@click.option("--idle", type=click.FloatRange(min=0), default=None, metavar="S",
              help="Exit after S seconds with no clients and no resources (default 5).")
@click.option("--allow-uid", type=int, multiple=True, help="Also admit this uid (repeatable).")
@friendly
def broker_start(persistent: bool, idle: float | None, allow_uid: tuple[int, ...]) -> None:
    """Start the namespace's broker (detached)."""
    ns = namespace()
    extra = [a for uid in allow_uid for a in ("--allow-uid", str(uid))]
    won = start_broker(ns, persistent=persistent, idle=idle, extra_args=extra)
    with connect() as s:
        pid = s.broker_pid
    if won:
        console.print(f"started the broker for namespace {ns!r}: pid {pid}"
                      + (" (persistent)" if persistent else f" (exits after {idle if idle is not None else 5:g}s idle)"))
    else:
        console.print(f"a broker is already running for namespace {ns!r}: pid {pid}")


@broker.command("stop")
@namespace_option
@click.option("--force", is_flag=True, help="Stop it even while other clients are connected (they re-attach their "
                                             "resources to a new broker).")
@friendly
def broker_stop(force: bool) -> None:
    """Stop the namespace's broker. Refused while other clients are connected, naming them, unless --force: a
    client holding resources re-attaches them to a new broker under the same handles and names."""
    ns = namespace()
    try:
        s = connect()
    except BrokerUnavailable:
        console.print(f"no broker is running for namespace {ns!r}")
        return
    with watch(s.broker_pid) as broker_proc:  # followed from before the shutdown: its pid cannot be reused on us
        with s:
            pid = s.broker_pid
            try:
                s.shutdown(force=force)
            except AccessDenied as e:
                fail(f"not stopping the broker of namespace {ns!r} (pid {pid}): {e}. Use --force to stop it anyway.")
        # A detached broker is reaped by init, maybe not at once: a zombie counts as gone.
        if broker_proc.wait(10.0):
            console.print(f"stopped the broker for namespace {ns!r} (pid {pid})")
        else:
            fail(f"the broker (pid {pid}) acknowledged the shutdown but is still running after 10s")


def _rss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


@broker.command("status")
@namespace_option
@friendly
def broker_status() -> None:
    """Show the broker's statistics; exit status 1 when none is running (never starts one)."""
    ns = namespace()
    try:
        s = connect()
    except BrokerUnavailable:
        console.print(f"no broker is running for namespace {ns!r}")
        raise SystemExit(1) from None
    with s:
        stats = s.stats()
        pid = s.broker_pid
    table = Table(title=f"broker for namespace {ns!r}", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("pid", str(pid))
    table.add_row("socket", str(socket_path(ns)))
    rss = _rss(pid)
    if rss is not None:
        table.add_row("memory (RSS)", bytes_text(rss))
    for key in ("clients", "resources", "names", "bytes", "fds"):
        if key in stats:
            table.add_row(key, f"{stats[key]:,}" + (f" ({bytes_text(stats[key])})" if key == "bytes" else ""))
    codes, last = stats.pop("error_codes", None) or {}, stats.pop("last_errors", None) or []
    now = stats.pop("clock", None)
    for key, value in stats.items():
        if key not in ("clients", "resources", "names", "bytes", "fds"):
            text = f"{value:,}" if isinstance(value, int) else str(value)
            if key == "errors" and codes:  # say what they were: a bare count explains nothing
                text += " (" + ", ".join(f"{c} {n:,}" for c, n in sorted(codes.items(), key=lambda kv: -kv[1])) + ")"
            table.add_row(key, escape(text))
    console.print(table)
    if last:
        errors = Table(title="last errors", show_header=True)
        for column in ("age", "pid", "op", "code", "message"):
            errors.add_column(column)
        for when, pid_, op, code, message in last[::-1]:
            age = f"{now - when:.0f} s" if isinstance(now, (int, float)) else ""
            errors.add_row(age, str(pid_), escape(str(op)), escape(str(code)), escape(str(message)))
        console.print(errors)
