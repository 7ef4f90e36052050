"""The `texbridge` command: demo, ls, info, broker start|stop|status, doctor, bench.

Only the public Session API is used (plus the broker launcher and diagnostics), so the CLI exercises exactly what
applications use. Commands that only look (ls, info, broker status/stop) never auto-start a broker: asking "is
anything shared?" must not create the thing it asks about. Every TexbridgeError ends the command with its message
and exit status 1, never a traceback.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

from ._errors import AccessDenied, BrokerUnavailable, TexbridgeError
from ._liveness import watch

# Piped output (tests, `| grep`) gets wide lines instead of rich's 80-column default, so tables stay readable.
_WIDTH = None if sys.stdout.isatty() else max(200, int(os.environ.get("COLUMNS", "0") or 0))
console = Console(highlight=False, width=_WIDTH)
err_console = Console(stderr=True, highlight=False, width=_WIDTH)

namespace_option = click.option("--namespace", "-n", default=None, metavar="NS",
                                help="Namespace (default: $TEXBRIDGE_NAMESPACE or 'default').")


def _fail(message: str, status: int = 1) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise SystemExit(status)


def _friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn texbridge's typed errors into one line and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TexbridgeError as e:
            _fail(f"{e} [{type(e).__name__}]")
        except ValueError as e:  # bad namespace names and the like, raised before anything is sent
            _fail(str(e))

    return wrapper


def _connect(namespace: str | None, *, autostart: bool = False):
    import texbridge

    return texbridge.connect(namespace, app_name="texbridge-cli", autostart=autostart, timeout=5.0)


def _size_text(r: dict[str, Any]) -> str:
    if r.get("kind") == "texture2d":
        return f"{r['width']}x{r['height']}"
    return _bytes(r.get("size", 0))


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _handle_text(value: int) -> str:
    from ._handle import Handle

    return str(Handle(value))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="texbridge")
def main() -> None:
    """texbridge: DXGI-style shared textures and buffers between Linux processes."""


# -- demo -----------------------------------------------------------------------------------------------------------
def _parse_size(_ctx: Any, _param: Any, value: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not WIDTHxHEIGHT, e.g. 1280x720") from None
    if not (1 <= w <= 16384 and 1 <= h <= 16384):
        raise click.BadParameter("width and height must be 1..16384")
    return w, h


@main.command()
@click.option("--frames", default=600, show_default=True, type=click.IntRange(1, 10_000_000))
@click.option("--size", default="1280x720", show_default=True, callback=_parse_size, metavar="WxH")
@click.option("--backend", default="memfd", show_default=True, type=click.Choice(["memfd", "vulkan", "gl", "cuda"]))
@namespace_option
@click.option("--corrupt-frame", type=int, default=-1, hidden=True,
              help="Self-test: the producer damages one pixel of this frame, and the demo must fail.")
@_friendly
def demo(frames: int, size: tuple[int, int], backend: str, namespace: str | None, corrupt_frame: int) -> None:
    """Producer and consumer processes hand frames back and forth through a shared texture and its keyed mutex;
    the consumer verifies every frame pixel-exact."""
    from ._demo import DemoConfig, run_demo
    from ._errors import BackendError

    from .backends import get_backend

    try:
        chosen = get_backend(backend)
    except BackendError as e:
        _fail(str(e))
    if backend != "memfd":  # importable is not usable: ask the backend before starting two processes
        report = chosen.diagnostics()
        if not report.get("available"):
            _fail(f"backend {backend!r} is unavailable here: {report.get('detail', 'no detail')}")
    cfg = DemoConfig(frames=frames, width=size[0], height=size[1], backend=backend, namespace=namespace,
                     corrupt_frame=corrupt_frame)
    console.print(f"[bold]texbridge demo[/]: {frames} frames of {size[0]}x{size[1]} rgba8 in {backend} memory, "
                  "handed over with a keyed mutex")
    try:
        result = run_demo(cfg, log=lambda text: console.print(f"  {text}"))
    except BackendError as e:
        _fail(str(e))
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    verdict = (f"[green]{result.verified}/{frames} frames verified pixel-exact[/]" if result.ok
               else f"[red]{result.verified}/{frames} frames verified, {result.failed} failed[/]")
    table.add_row("verification", verdict)
    if result.first_failure:
        table.add_row("first failure", escape(result.first_failure))
    if result.frames_per_s:
        table.add_row("frames/s", f"{result.frames_per_s:,.0f} (write {result.write_ms:.3f} ms + verify "
                                  f"{result.verify_ms:.3f} ms a frame, {'zero-copy' if result.zero_copy else 'copied'})")
    if result.handoffs_per_s:
        table.add_row("handoffs/s", f"{result.handoffs_per_s:,.0f} keyed-mutex handoffs (round trip median "
                                    f"{result.round_trip_us:.1f} us, {cfg.pingpong} round trips, no content)")
    table.add_row("resource", f"{result.handle} '{escape(result.name)}', broker pid {result.broker_pid}")
    console.print(table)
    for e in result.errors:
        err_console.print(f"[bold red]error:[/] {escape(e)}", soft_wrap=True)
    if result.interrupted:
        err_console.print(f"interrupted after {result.verified + result.failed} of {frames} frames")
        raise SystemExit(130)
    if not result.ok:
        raise SystemExit(1)


# -- ls / info ------------------------------------------------------------------------------------------------------
def _resource_table(resources: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    for col, kw in (("handle", {"no_wrap": True}), ("name(s)", {}), ("kind", {}), ("size", {"justify": "right"}),
                    ("format", {}), ("backend", {}), ("creator pid", {"justify": "right"}),
                    ("open count", {"justify": "right"})):
        table.add_column(col, overflow="fold", **kw)  # fold, never "…": a cut name or size would mislead
    for r in resources:
        kind = r["kind"] + (" +mutex" if r.get("keyed_mutex") else "")
        table.add_row(_handle_text(r["handle"]), escape(", ".join(r.get("names") or [])) or "-", kind, _size_text(r),
                      r.get("format") or "-", r.get("backend") or "-", str(r.get("creator_pid", "")),
                      str(r.get("open_count", "")))
    return table


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


@main.command()
@namespace_option
@click.option("--watch", "-w", is_flag=True, help="Keep following events (published, retired, ...) live.")
@_friendly
def ls(namespace: str | None, watch: bool) -> None:
    """List the namespace's shared resources."""
    try:
        # A watcher waits for what will be shared, so it may start the broker; a one-shot listing never does.
        session = _connect(namespace, autostart=watch)
    except BrokerUnavailable:
        console.print(f"no broker is running for namespace {_ns(namespace)!r}: nothing is shared")
        return
    with session:
        stream = session.watch() if watch else None  # subscribe first, so nothing falls between list and watch
        try:
            resources = session.list()
            console.print(_resource_table(resources, f"namespace {session.namespace!r}: "
                                                     f"{len(resources)} resource(s)"))
            if stream is None:
                return
            console.print("[dim]watching; Ctrl-C to stop[/]")
            sys.stdout.flush()
            try:
                for ev in stream:
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


def _ns(namespace: str | None) -> str:
    from ._paths import namespace_name

    return namespace_name(namespace)


@main.command()
@click.argument("target", metavar="HANDLE|NAME")
@namespace_option
@_friendly
def info(target: str, namespace: str | None) -> None:
    """Show a resource's descriptor: geometry, format in every API, memory type, device identity, blobs."""
    from ._d3d11 import parse_d3d11_texture_desc
    from ._descriptor import Descriptor, Usage
    from ._handle import Handle
    from ._formats import get_format

    with _connect(namespace) as s:
        fields = s.info(target)
    desc = Descriptor.from_wire(fields["descriptor"])
    table = Table(title=f"{_handle_text(fields['handle'])}", show_header=False)
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
    table.add_row("bytes", f"{desc.size:,} ({_bytes(desc.size)})")
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


# -- broker ---------------------------------------------------------------------------------------------------------
@main.group()
def broker() -> None:
    """Start, stop or inspect a namespace's broker."""


@broker.command("start")
@namespace_option
@click.option("--persistent", is_flag=True, help="Never exit when idle.")
@click.option("--idle", type=click.FloatRange(min=0), default=None, metavar="S",
              help="Exit after S seconds with no clients and no resources (default 5).")
@click.option("--allow-uid", type=int, multiple=True, help="Also admit this uid (repeatable).")
@_friendly
def broker_start(namespace: str | None, persistent: bool, idle: float | None, allow_uid: tuple[int, ...]) -> None:
    """Start the namespace's broker (detached)."""
    from ._launch import start_broker

    ns = _ns(namespace)
    extra = [a for uid in allow_uid for a in ("--allow-uid", str(uid))]
    won = start_broker(ns, persistent=persistent, idle=idle, extra_args=extra)
    with _connect(ns) as s:
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
@_friendly
def broker_stop(namespace: str | None, force: bool) -> None:
    """Stop the namespace's broker. Refused while other clients are connected, naming them, unless --force: a
    client holding resources re-attaches them to a new broker under the same handles and names."""
    ns = _ns(namespace)
    try:
        s = _connect(ns)
    except BrokerUnavailable:
        console.print(f"no broker is running for namespace {ns!r}")
        return
    with watch(s.broker_pid) as broker_proc:  # followed from before the shutdown: its pid cannot be reused on us
        with s:
            pid = s.broker_pid
            try:
                s.shutdown(force=force)
            except AccessDenied as e:
                _fail(f"not stopping the broker of namespace {ns!r} (pid {pid}): {e}. Use --force to stop it anyway.")
        # A detached broker is reaped by init, maybe not at once: a zombie counts as gone.
        if broker_proc.wait(10.0):
            console.print(f"stopped the broker for namespace {ns!r} (pid {pid})")
        else:
            _fail(f"the broker (pid {pid}) acknowledged the shutdown but is still running after 10s")


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
@_friendly
def broker_status(namespace: str | None) -> None:
    """Show the broker's statistics; exit status 1 when none is running (never starts one)."""
    from ._paths import socket_path

    ns = _ns(namespace)
    try:
        s = _connect(ns)
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
        table.add_row("memory (RSS)", _bytes(rss))
    for key in ("clients", "resources", "names", "bytes", "fds"):
        if key in stats:
            table.add_row(key, f"{stats[key]:,}" + (f" ({_bytes(stats[key])})" if key == "bytes" else ""))
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


# -- doctor ---------------------------------------------------------------------------------------------------------
def _tree_add(node: Tree, value: Any) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(v, (dict, list)) and v:
                _tree_add(node.add(f"[bold]{k}[/]"), v)
            else:
                node.add(f"[bold]{k}[/]: {escape(_scalar(v))}")
    elif isinstance(value, list):
        if all(not isinstance(v, (dict, list)) for v in value):
            node.add(escape(", ".join(_scalar(v) for v in value)))
        else:
            for i, v in enumerate(value):
                _tree_add(node.add(f"[{i}]"), v)
    else:
        node.add(escape(_scalar(value)))


def _scalar(v: Any) -> str:
    if isinstance(v, bytes):
        return v.hex() or "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return str(v)


@main.command()
def doctor() -> None:
    """What this machine can share: memfd, Vulkan, EGL/GL, CUDA, and the keyed mutex core."""
    from ._diagnostics import collect

    for topic, report in collect().items():
        ok = bool(report.get("available"))
        mark = "[green]✔[/]" if ok else "[red]✘[/]"
        tree = Tree(f"{mark} [bold]{topic}[/]: {escape(str(report.get('detail', '')))}")
        _tree_add(tree, {k: v for k, v in report.items() if k not in ("available", "detail")})
        console.print(tree, soft_wrap=True)


# -- bench ----------------------------------------------------------------------------------------------------------
def benchmarks_dir() -> Path:
    """$TEXBRIDGE_BENCHMARKS, else the source checkout's benchmarks/ (benchmarks are not installed)."""
    env = os.environ.get("TEXBRIDGE_BENCHMARKS")
    if env:
        return Path(env)
    import texbridge

    return Path(texbridge.__file__).resolve().parents[2] / "benchmarks"


def _load_benchmark(directory: Path, stem: str):
    """Import benchmarks/<stem>.py as `benchmarks.<stem>` (a package, so relative imports work). Only the parent
    goes on sys.path: benchmarks/ itself there would let benchmarks/vulkan.py shadow the `vulkan` package."""
    if str(directory.parent) not in sys.path:
        sys.path.insert(0, str(directory.parent))
    return importlib.import_module(f"{directory.name}.{stem}")


@main.command()
@click.option("--quick", is_flag=True, help="Fewer iterations: a smoke run, not figures to quote.")
@click.option("--list", "list_only", is_flag=True, help="List the benchmark modules and exit.")
@click.argument("names", nargs=-1)
def bench(quick: bool, list_only: bool, names: tuple[str, ...]) -> None:
    """Run the benchmarks in benchmarks/ (all, or NAMES) and print one table."""
    directory = benchmarks_dir()
    if not directory.is_dir():
        _fail(f"no benchmarks directory at {directory} (set TEXBRIDGE_BENCHMARKS)")
    available = sorted(p.stem for p in directory.glob("*.py") if not p.stem.startswith("_"))
    if list_only:
        console.print("\n".join(available))
        return
    unknown = [n for n in names if n not in available]
    if unknown:
        _fail(f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(available)}")
    chosen = list(names) or available
    try:
        report = _load_benchmark(directory, "_report")
    except Exception as e:
        _fail(f"cannot import {directory / '_report.py'}: {e}")
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
            os.environ["COLUMNS"] = str(_WIDTH)  # _report's own Console: wide lines when piped
        report.print_rows(rows)
    if failures:
        _fail(f"{len(failures)} benchmark(s) failed: {', '.join(failures)}")


importlib.import_module("texbridge._senders_cli").register(main)  # send-test, senders, view


if __name__ == "__main__":
    main()
