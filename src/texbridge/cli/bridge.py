"""`texbridge bridge`: serve/join a bridge (a shared file for VMs, TCP between hosts), vm-args, remove, status.

serve and join run a `bridge.Bridge` in the foreground until Ctrl-C / SIGTERM; either may start first (join waits
for the server, and both reconnect after the other restarts). Design: docs/bridge.md.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from typing import Any

import click
from rich.table import Table

from .._errors import InvalidArgument
from ..bridge import _ivshmem
from ..bridge._engine import Bridge, BridgeLimits, default_label, read_statuses
from ..bridge._link import Endpoint
from ._common import console, fail, friendly, namespace, namespace_option, parse_size

DEFAULT_MAX = (1920, 1080)


def _size_mb(max_size: tuple[int, int]) -> int:
    return _ivshmem.size_for(*max_size) >> 20


def _tcp_address(text: str, serving: bool) -> tuple[str, int]:
    """[HOST:]PORT (serve: HOST defaults to 127.0.0.1) or HOST:PORT (join); [v6]:PORT too."""
    host, sep, port = text.rpartition(":")
    if not sep:
        if not serving:
            raise click.BadParameter(f"{text!r}: join needs HOST:PORT", param_hint="--tcp")
        host, port = "127.0.0.1", text
    host = host.strip("[]")
    try:
        number = int(port)
    except ValueError:
        raise click.BadParameter(f"{text!r}: the port must be a number", param_hint="--tcp") from None
    if not (0 <= number <= 65535) or (number == 0 and not serving):
        raise click.BadParameter(f"{text!r}: port out of range", param_hint="--tcp")
    return host or "0.0.0.0", number


def _tls(cert: str | None, key: str | None, ca: str | None, server_name: str | None) -> Any:
    if not any((cert, key, ca, server_name)):
        return None
    from ..bridge._tcp import TlsOptions

    return TlsOptions(cert=cert, key=key, ca=ca, server_name=server_name)


def _endpoint(role: str, shm: str | None, tcp: str | None, find: str | None, label: str, token_file: str | None,
              size_mb: int | None, max_size: tuple[int, int], tls: Any, advertise: bool) -> Endpoint:
    if sum(x is not None for x in (shm, tcp, find)) != 1:
        fail(f"bridge {role}: give exactly one of --shm" + (" or --tcp" if role == "serve" else ", --tcp or --find"))
    if shm is not None:
        if token_file or tls is not None or advertise:
            fail("--token-file, TLS and --advertise apply to --tcp: a shared file is guarded by its permissions "
                 "(0600, this user) and, in a VM, by who may start the VM")
        from ..bridge._shmfile import ShmEndpoint

        if role == "join" and shm == "auto":
            path = _ivshmem.find_ivshmem()
        else:
            path = shm or _ivshmem.default_path(namespace())
        size = (size_mb or _size_mb(max_size)) << 20 if role == "serve" else None
        return ShmEndpoint(path, role, size=size, label=label, max_frame=max_size if role == "serve" else None)
    from ..bridge._tcp import TcpEndpoint, load_secret

    secret = load_secret(token_file) if token_file else None
    if find is not None:
        return TcpEndpoint("join", "", 0, secret=secret, tls=tls, label=label, find=find)
    host, port = _tcp_address(tcp, role == "serve")
    return TcpEndpoint(role, host, port, secret=secret, tls=tls, label=label, advertise=advertise)


def _run(role: str, endpoint: Endpoint, label: str, max_size: tuple[int, int]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    bridge = Bridge(endpoint, label=label, namespace=namespace(),
                    limits=BridgeLimits(max_width=max_size[0], max_height=max_size[1]))
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: bridge.stop())
    where = getattr(endpoint, "address", None)
    console.print(f"bridge {role}: {endpoint.describe()}" + (f" (listening on {where[0]}:{where[1]})" if where else "")
                  + f", namespace {namespace()!r}, label {label!r}; Ctrl-C stops", markup=False)
    sys.stdout.flush()
    bridge.run()


_common = [
    click.option("--label", "-l", default=None, metavar="L",
                 help="This side's name: its senders appear on the other side as NAME@L (default: the hostname)."),
    click.option("--token-file", type=click.Path(dir_okay=False), default=None, metavar="F",
                 help="TCP: file holding the shared secret (≥ 16 bytes; `head -c 32 /dev/urandom | base64 > F`)."),
    click.option("--max-size", callback=parse_size, default=None, metavar="WxH",
                 help=f"Largest frame accepted (and, serving --shm, the file sized for); default "
                      f"{DEFAULT_MAX[0]}x{DEFAULT_MAX[1]}."),
]


def _with_common(fn: Any) -> Any:
    for opt in reversed(_common):
        fn = opt(fn)
    return namespace_option(fn)


@click.group()
def bridge() -> None:
    """Bridge senders and keyed-mutex resources to a VM (shared file) or another host (TCP)."""


@bridge.command()
@click.option("--shm", is_flag=False, flag_value="", default=None, metavar="[PATH]",
              help="Serve over a shared file (default /dev/shm/texbridge-NS), for a VM's ivshmem device.")
@click.option("--size", "size_mb", type=click.IntRange(1, 1 << 20), default=None, metavar="MB",
              help="Shared file size in MiB (default: from --max-size, Looking Glass's rule as the floor).")
@click.option("--tcp", default=None, metavar="[HOST:]PORT",
              help="Serve over TCP (HOST default 127.0.0.1; :PORT listens on every interface and needs --token-file).")
@click.option("--tls-cert", type=click.Path(dir_okay=False, exists=True), default=None, help="TCP: TLS certificate.")
@click.option("--tls-key", type=click.Path(dir_okay=False, exists=True), default=None, help="TCP: TLS private key.")
@click.option("--advertise", is_flag=True, help="TCP: announce this server over mDNS (_texbridge._tcp).")
@_with_common
@friendly
def serve(shm: str | None, size_mb: int | None, tcp: str | None, tls_cert: str | None, tls_key: str | None,
          advertise: bool, label: str | None, token_file: str | None, max_size: tuple[int, int] | None) -> None:
    """Serve a bridge: create the shared file (or listen), wait for the other side, mirror both ways."""
    label = label or default_label()
    max_size = max_size or DEFAULT_MAX
    if size_mb is not None and shm is None:
        fail("--size applies to --shm")
    ep = _endpoint("serve", shm, tcp, None, label, token_file, size_mb, max_size,
                   _tls(tls_cert, tls_key, None, None), advertise)
    _run("serve", ep, label, max_size)


@bridge.command()
@click.option("--shm", is_flag=False, flag_value="", default=None, metavar="[PATH|auto]",
              help="Join over a shared file: a path (default /dev/shm/texbridge-NS) or, in a VM guest, auto (the "
                   "ivshmem device's BAR).")
@click.option("--tcp", default=None, metavar="HOST:PORT", help="Join a TCP bridge server.")
@click.option("--find", default=None, metavar="LABEL", help="TCP: find the server announcing LABEL over mDNS.")
@click.option("--tls-ca", type=click.Path(dir_okay=False, exists=True), default=None,
              help="TCP: use TLS, trusting this certificate (the server's own, or its CA).")
@click.option("--tls-server-name", default=None, help="TCP: the name the server's certificate must carry.")
@_with_common
@friendly
def join(shm: str | None, tcp: str | None, find: str | None, tls_ca: str | None, tls_server_name: str | None,
         label: str | None, token_file: str | None, max_size: tuple[int, int] | None) -> None:
    """Join a bridge (waits for the server if it is not there yet), mirror both ways."""
    label = label or default_label()
    max_size = max_size or DEFAULT_MAX
    ep = _endpoint("join", shm, tcp, find, label, token_file, None, max_size,
                   _tls(None, None, tls_ca, tls_server_name), False)
    _run("join", ep, label, max_size)


@bridge.command("vm-args")
@click.option("--shm", "path", default=None, metavar="PATH", help="The shared file (default /dev/shm/texbridge-NS).")
@click.option("--size", "size_mb", type=click.IntRange(1, 1 << 20), default=None, metavar="MB",
              help="Size in MiB, a power of two (default: from --max-size).")
@click.option("--max-size", callback=parse_size, default=None, metavar="WxH",
              help=f"Largest frame to carry (default {DEFAULT_MAX[0]}x{DEFAULT_MAX[1]}).")
@namespace_option
@friendly
def vm_args(path: str | None, size_mb: int | None, max_size: tuple[int, int] | None) -> None:
    """Print the QEMU arguments and the libvirt <shmem> XML that give a VM the bridge file (start `bridge serve
    --shm` with the same --size first, or let QEMU create the file)."""
    path = path or _ivshmem.default_path(namespace())
    try:
        text = _ivshmem.vm_args(path, size_mb or _size_mb(max_size or DEFAULT_MAX))
    except InvalidArgument as e:
        fail(str(e))
    console.print(text, markup=False, highlight=False, soft_wrap=True)


@bridge.command()
@click.option("--shm", "path", default=None, metavar="PATH", help="The shared file (default /dev/shm/texbridge-NS).")
@namespace_option
@friendly
def remove(path: str | None) -> None:
    """Delete the bridge's shared file (refused while a bridge serves it)."""
    path = path or _ivshmem.default_path(namespace())
    if _ivshmem.remove(path):
        console.print(f"removed {path}", markup=False)
    else:
        console.print(f"no file at {path}", markup=False)


@bridge.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@friendly
def status(as_json: bool) -> None:
    """Running bridges of this user: peer, streams each way, fps, MB/s, latency, drops, peer errors.

    Latency: → from the sender's frame to its commit into the link; ← from the sender's capture (wall clock, so
    including clock skew between hosts) to the mirror's frame."""
    states = read_statuses()
    if as_json:
        console.print(json.dumps(states, indent=1), markup=False, highlight=False, soft_wrap=True)
        return
    if not states:
        console.print("no bridge is running", markup=False)
        return
    now = time.time()
    for st in states:
        peer = st.get("peer") or {}
        head = (f"[bold]{st['label']}[/] (namespace {st['namespace']}, pid {st['pid']}) {st['endpoint']}: "
                f"{st['state']}")
        if peer:
            head += f" with [bold]{peer.get('label')}[/] for {now - peer.get('since', now):.0f} s"
        elif st.get("last_peer"):
            head += f" (last peer {st['last_peer']})"
        console.print(head)
        table = Table(show_edge=False, pad_edge=False)
        for col in ("dir", "name", "size", "fps", "MB/s", "latency", "drops / receivers"):
            table.add_column(col)
        for s in st.get("out", []):
            lat = s.get("latency_us")
            table.add_row("→", s["name"], s["size"], f"{s['fps']:.1f}", f"{s['MBps']:.1f}",
                          "" if lat is None else f"{lat:.0f} µs", s.get("error") or "")
        for s in st.get("in", []):
            lat = s.get("latency_us")
            table.add_row("←", s["name"], s["size"], f"{s['fps']:.1f}", f"{s['MBps']:.1f}",
                          "" if lat is None else f"{lat:.0f} µs", f"{s['drops']} / {s['receivers']}")
        for k in st.get("keyed_mutex", []):
            table.add_row("⇄", k["name"], f"keyed-mutex {k['kind']}", "", "", "",
                          f"content {'here' if k['content_here'] else 'across'}; {k['to_peer']} out, "
                          f"{k['from_peer']} in")
        if table.row_count:
            console.print(table)
        if peer and (peer.get("bytes_out") or peer.get("bytes_in")):
            console.print(f"  link: {peer.get('frames_out', 0)} frames / {peer.get('bytes_out', 0) / 1e6:.1f} MB out, "
                          f"{peer.get('frames_in', 0)} frames / {peer.get('bytes_in', 0) / 1e6:.1f} MB in, "
                          f"{peer.get('drops', 0)} dropped", markup=False)
        for e in (st.get("errors") or [])[-4:] + (peer.get("errors") or [])[-4:]:
            console.print(f"  [red]{e}[/]", soft_wrap=True)


__all__ = ["bridge"]
