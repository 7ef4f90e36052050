"""`texbridge send-test [NAME]`, `texbridge senders`, `texbridge view [NAME]`: senders from the command line.

The window and the test pattern live in `viewer` (imported when a command needs them: GLFW and GL are optional).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any

import click
from rich.live import Live
from rich.table import Table

import texbridge

from .._errors import SenderNotFound, TexbridgeTimeout
from .._handle import Handle
from ..senders import active_sender, list_senders, watch_senders
from ._common import BACKEND_HELP, console, friendly, json_option, namespace_option, parse_size, print_json


def _info_row(info: Any, status: str = "live") -> tuple[str, ...]:
    return (info.name, info.app, str(info.pid), f"{info.width}x{info.height}", info.format, info.backend,
            f"{info.fps:.1f}", f"{info.frames:,}", status)


def _senders_table(rows: dict[str, tuple[str, ...]], active: str | None, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for col, just in (("name", "left"), ("app", "left"), ("pid", "right"), ("size", "right"), ("format", "left"),
                      ("backend", "left"), ("fps", "right"), ("frames", "right"), ("status", "left")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for name, row in rows.items():
        style = "dim" if row[-1] == "retired" else ("bold green" if name == active else "")
        table.add_row(*(row[:-1] + ((row[-1] + (" (active)" if name == active else "")),)), style=style)
    if not rows:
        table.add_row("[dim]no senders yet: try `texbridge send-test`[/]", *([""] * 8))
    return table


@click.command("send-test")
@click.argument("name", default="texbridge test pattern")
@click.option("--size", "-s", default="1280x720", callback=parse_size, show_default=True, help="WIDTHxHEIGHT.")
@click.option("--fps", default=60.0, show_default=True, help="Frames per second (0: as fast as possible).")
@click.option("--frames", default=None, type=int, help="Stop after this many frames (default: until Ctrl-C).")
@click.option("--backend", default="memfd", show_default=True, help=BACKEND_HELP)
@click.option("--format", "fmt", default="rgba8", show_default=True, type=click.Choice(["rgba8", "bgra8"]),
              help="The sender's pixel format (bgra8: Windows/Spout's usual order).")
@namespace_option
@friendly
def send_test(name: str, size: tuple[int, int], fps: float, frames: int | None, backend: str, fmt: str) -> None:
    """Publish an animated test pattern (moving gradient, colour bars, frame counter) as sender NAME."""
    from .viewer import send_test as run

    w, h = size
    click.secho(f"sending {name!r} {w}x{h} {fmt} at {fps:g} fps ({backend}); Ctrl-C to stop", fg="green")
    click.echo(f"  watch it:  texbridge view {name!r}      list senders:  texbridge senders")
    last = [time.monotonic()]
    interactive = sys.stdout.isatty()

    def status(sender: Any) -> None:
        now = time.monotonic()
        if interactive and now - last[0] >= 0.5:
            last[0] = now
            click.echo(f"\r  frame {sender.frame_number:,}  {sender.fps:5.1f} fps  "
                       f"{sender.receivers} receiver(s)   ", nl=False)

    sent = run(name, w, h, fps, frames, backend, status, fmt=fmt)
    click.echo(f"\nsent {sent:,} frames; {name!r} retired")


@click.command("senders")
@click.option("--once", is_flag=True, help="Print the list once and exit (no live view).")
@json_option
@namespace_option
@friendly
def senders(once: bool, as_json: bool) -> None:
    """List senders live (name, app, pid, size, format, backend, fps, frames), from broker events.

    Piped (not a terminal), the table is printed once and then one line per change, so columns stay readable;
    --json prints the list once as JSON (with "active": true on the active sender)."""
    if as_json:
        with texbridge.connect(app_name="texbridge senders") as session:
            active = active_sender(session)
            print_json([{**dataclasses.asdict(i), "handle": str(Handle(i.handle)), "active": i.name == active}
                        for i in list_senders(session)])
        return
    with texbridge.connect(app_name="texbridge senders") as session:
        with watch_senders(session, initial=True) as watch:
            rows: dict[str, tuple[str, ...]] = {}
            retired_at: dict[str, float] = {}

            def apply(ev: Any) -> None:
                if ev.kind == "retired":
                    if ev.name in rows:
                        rows[ev.name] = rows[ev.name][:-1] + ("retired",)
                        retired_at[ev.name] = time.monotonic()
                else:
                    rows[ev.name] = _info_row(ev.info)
                    retired_at.pop(ev.name, None)

            while (ev := watch.next(0)) is not None:
                apply(ev)
            title = f"senders in namespace {session.namespace!r}"
            if once:
                console.print(_senders_table(rows, active_sender(session), title))
                return
            if not sys.stdout.isatty():  # a pipe or a file: no live redraws, one line per change after the table
                console.print(_senders_table(rows, active_sender(session), title))
                sys.stdout.flush()
                try:
                    while True:
                        ev = watch.next(1.0)
                        if ev is None or ev.kind == "updated":
                            continue
                        what = "  ".join(_info_row(ev.info)[:-1]) if ev.info is not None else ev.name
                        console.print(f"{time.strftime('%H:%M:%S')} {ev.kind:<9} {what}",
                                      markup=False, soft_wrap=True)
                        sys.stdout.flush()
                except KeyboardInterrupt:
                    pass
                return
            active = active_sender(session)
            try:
                with Live(_senders_table(rows, active, title + "  (Ctrl-C to quit)"), console=console,
                          auto_refresh=False) as live:
                    while True:
                        ev = watch.next(1.0)
                        if ev is not None:
                            apply(ev)
                            if ev.kind != "updated":
                                active = active_sender(session)
                        for name, t in list(retired_at.items()):  # retired rows fade out after 5 s
                            if time.monotonic() - t > 5:
                                rows.pop(name, None)
                                retired_at.pop(name)
                        live.update(_senders_table(rows, active, title + "  (Ctrl-C to quit)"), refresh=True)
            except KeyboardInterrupt:
                pass


@click.command("view")
@click.argument("name", required=False)
@click.option("--size", "-s", default=None, callback=parse_size, help="Window WIDTHxHEIGHT.")
@click.option("--no-overlay", is_flag=True, help="Hide the name/size/fps/frame overlay (O toggles it).")
@click.option("--frames", default=None, type=int, help="Exit after showing this many new frames.")
@click.option("--screenshot", default=None, metavar="PATH",
              help="With --frames: save the window's pixels (.npy, else PPM) before exiting.")
@click.option("--timeout", default=None, type=float,
              help="Give up (exit status 2) when no sender, or fewer than --frames frames, came in this many "
                   "seconds; without --frames, stop after this many seconds.")
@namespace_option
@friendly
def view(name: str | None, size: tuple[int, int] | None, no_overlay: bool, frames: int | None,
         screenshot: str | None, timeout: float | None) -> None:
    """Show sender NAME (default: the active sender) live in a window. Esc/Q quits, O toggles the overlay."""
    from .viewer import view as run

    if screenshot and not frames:
        raise click.UsageError("--screenshot needs --frames N")
    try:
        run(name, overlay=not no_overlay, size=size, frames=frames, screenshot=screenshot, timeout=timeout,
            notify=lambda line: click.echo(f"texbridge view: {line}", err=True))
    except (SenderNotFound, TexbridgeTimeout) as e:
        click.secho(f"timed out: {e} [{type(e).__name__}]", fg="red", err=True)
        raise SystemExit(2) from None
