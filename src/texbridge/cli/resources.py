"""`texbridge ls [--watch]` and `texbridge info HANDLE|NAME`: what the namespace's broker holds."""

from __future__ import annotations

import sys
import time
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from .._d3d11 import parse_d3d11_texture_desc
from .._descriptor import Descriptor, Usage
from .._errors import BrokerUnavailable, TexbridgeError
from .._formats import get_format
from .._handle import Handle
from ._common import bytes_text, connect, console, friendly, json_option, namespace, namespace_option, print_json


def _size_text(r: dict[str, Any]) -> str:
    if r.get("kind") == "texture2d":
        return f"{r['width']}x{r['height']}"
    return bytes_text(r.get("size", 0))


def _resource_table(resources: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    for col, kw in (("handle", {"no_wrap": True}), ("name(s)", {}), ("kind", {}), ("size", {"justify": "right"}),
                    ("format", {}), ("backend", {}), ("creator pid", {"justify": "right"}),
                    ("open count", {"justify": "right"})):
        table.add_column(col, overflow="fold", **kw)  # fold, never "…": a cut name or size would mislead
    for r in resources:
        kind = r["kind"] + (" +mutex" if r.get("keyed_mutex") else "")
        table.add_row(str(Handle(r["handle"])), escape(", ".join(r.get("names") or [])) or "-", kind, _size_text(r),
                      r.get("format") or "-", r.get("backend") or "-", str(r.get("creator_pid", "")),
                      str(r.get("open_count", "")))
    return table


def _resource_json(r: dict[str, Any]) -> dict[str, Any]:
    """A LIST entry for --json: the handle in its printed form (tb:...), everything else as the broker said."""
    return {**r, "handle": str(Handle(r["handle"]))}


def _event_line(ev: Any) -> str:
    f = ev.fields
    parts = [time.strftime("%H:%M:%S"), f"[bold]{ev.kind:<11}[/]"]
    if ev.handle is not None:
        parts.append(str(ev.handle))
    if ev.name:
        parts.append(escape(repr(ev.name)))
    for key in ("pid", "app", "open_count"):
        if key in f:
            parts.append(f"{key}={f[key]}")
    summary = f.get("summary")
    if isinstance(summary, dict):
        parts.append(f"{summary.get('kind')} {_size_text(summary)} {summary.get('format') or ''}".rstrip())
    if f.get("meta"):
        parts.append(escape(f"meta={f['meta']}"))
    return " ".join(parts)


@click.command()
@namespace_option
@click.option("--watch", "-w", is_flag=True, help="Keep following events (published, retired, ...) live.")
@json_option
@friendly
def ls(watch: bool, as_json: bool) -> None:
    """List the namespace's shared resources (--json: one JSON list; with --watch, then one JSON event per line)."""
    try:
        # A watcher waits for what will be shared, so it may start the broker; a one-shot listing never does.
        session = connect(autostart=watch)
    except BrokerUnavailable:
        if as_json:
            print_json([])
            return
        console.print(f"no broker is running for namespace {namespace()!r}: nothing is shared")
        return
    with session:
        stream = session.watch() if watch else None  # subscribe first, so nothing falls between list and watch
        try:
            resources = session.list()
            if as_json:
                print_json([_resource_json(r) for r in resources])
            else:
                console.print(_resource_table(resources, f"namespace {session.namespace!r}: "
                                                         f"{len(resources)} resource(s)"))
            if stream is None:
                return
            if not as_json:
                console.print("[dim]watching; Ctrl-C to stop[/]")
            sys.stdout.flush()
            try:
                for ev in stream:
                    if as_json:
                        print_json({"event": ev.kind, "handle": str(ev.handle) if ev.handle is not None else None,
                                    "name": ev.name, **{k: v for k, v in ev.fields.items() if k != "handle"}})
                        sys.stdout.flush()
                        continue
                    console.print(_event_line(ev), soft_wrap=True)
                    if ev.kind == "reconnected":  # a new broker: what it holds now, as events of the gap are lost
                        resources = session.list()
                        console.print(_resource_table(resources, f"namespace {session.namespace!r} (new broker "
                                                                 f"pid {session.broker_pid}): {len(resources)} "
                                                                 f"resource(s)"))
                    sys.stdout.flush()
            except KeyboardInterrupt:
                pass
        finally:
            if stream is not None:
                stream.close()


@click.command()
@click.argument("target", metavar="HANDLE|NAME")
@namespace_option
@json_option
@friendly
def info(target: str, as_json: bool) -> None:
    """Show a resource's descriptor: geometry, format in every API, memory type, device identity, blobs."""
    with connect() as s:
        fields = s.info(target)
    desc = Descriptor.from_wire(fields["descriptor"])
    if as_json:
        print_json({**fields, "handle": str(Handle(fields["handle"])), "descriptor": desc.to_wire()})
        return
    table = Table(title=str(Handle(fields['handle'])), show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("handle", str(Handle(fields["handle"])))
    table.add_row("names", escape(", ".join(fields.get("names") or [])) or "-")
    table.add_row("kind", desc.kind)
    if desc.kind == "texture2d":
        table.add_row("size", f"{desc.width}x{desc.height}, {desc.mip_levels} mip level(s), array size {desc.array_size}")
        fmt = get_format(desc.format)
        table.add_row("format", f"{fmt.name}: DXGI_FORMAT {fmt.dxgi}, VkFormat {fmt.vk}, GL {fmt.gl_internal:#06x}, "
                                f"DRM fourcc {fmt.drm_fourcc:#010x}, NumPy {fmt.numpy_dtype} x{fmt.channels}")
        for i, (off, pitch) in enumerate(desc.planes):
            table.add_row(f"plane {i}", f"offset {off}, row pitch {pitch} B")
    table.add_row("bytes", f"{desc.size:,} ({bytes_text(desc.size)})")
    table.add_row("memory", desc.memory)
    table.add_row("backend", desc.backend)
    if desc.driver_uuid or desc.device_uuid:
        table.add_row("driver uuid", desc.driver_uuid.hex() or "-")
        table.add_row("device uuid", desc.device_uuid.hex() or "-")
    table.add_row("usage", " | ".join(u.name for u in Usage if u.name != "DEFAULT" and u in Usage(desc.usage))
                  or str(desc.usage))
    table.add_row("keyed mutex", "yes" if desc.keyed_mutex or desc.kind == "keyed_mutex" else "no")
    table.add_row("creator pid", str(fields.get("creator_pid", "")))
    table.add_row("open count", str(fields.get("open_count", "")))
    if desc.runtime_private:
        try:
            d3d = parse_d3d11_texture_desc(desc.runtime_private)
            table.add_row("runtime private", "D3D11_TEXTURE2D_DESC " + ", ".join(f"{k}={v:#x}" if k.endswith("Flags")
                                                                               else f"{k}={v}" for k, v in d3d.items()))
        except TexbridgeError:
            table.add_row("runtime private", f"{len(desc.runtime_private)} bytes: {desc.runtime_private[:32].hex()}")
    if desc.driver_private:
        table.add_row("driver private", escape(repr(desc.driver_private)))
    if fields.get("meta"):
        table.add_row("meta", escape(repr(fields["meta"])))
    console.print(table)
