"""Broker process start-up: one winner per namespace, detaching, readiness, clean exit.

Exactly one broker per namespace: the broker takes an exclusive flock on <namespace>.lock before touching the
socket path. A loser exits at once (status 3) and its client simply connects to the winner. The winner removes a
stale socket left by a crashed predecessor, binds, listens, and only then reports ready, so a client that waited for
readiness can always connect. On exit it unlinks the socket while still holding the lock.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import socket
import sys
import time

from .._paths import ensure_runtime_dir, lock_path, namespace_name, socket_path
from .registry import Policy, Quotas, Registry
from .server import BrokerServer, raise_fd_limit

EXIT_READY, EXIT_LOST_RACE, EXIT_FAILED = 0, 3, 1
DEFAULT_IDLE = 5.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="texbridge-broker", description="texbridge broker for one namespace")
    p.add_argument("--namespace", default=None)
    p.add_argument("--idle", type=float, default=float(os.environ.get("TEXBRIDGE_BROKER_IDLE", DEFAULT_IDLE)),
                   help="exit after this many seconds with no clients and no resources")
    p.add_argument("--persistent", action="store_true", help="never exit when idle")
    p.add_argument("--daemon", action="store_true", help="detach; the launching process exits once ready")
    p.add_argument("--allow-uid", type=int, action="append", default=[], help="also admit this uid (repeatable)")
    p.add_argument("--quota-resources", type=int, default=Quotas.resources)
    p.add_argument("--quota-bytes", type=int, default=Quotas.bytes)
    p.add_argument("--quota-names", type=int, default=Quotas.names)
    p.add_argument("--log-level", default=os.environ.get("TEXBRIDGE_LOG", "WARNING"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ns = namespace_name(args.namespace)
    logging.basicConfig(level=args.log_level.upper(), format=f"texbridge-broker[{ns}] %(levelname)s %(message)s")
    ready_w = None
    if args.daemon:
        ready_r, ready_w = os.pipe()
        if os.fork():  # the launching process: wait for the daemon to say ready or lost
            os.close(ready_w)
            status = os.read(ready_r, 1)
            return {b"R": EXIT_READY, b"L": EXIT_LOST_RACE}.get(status, EXIT_FAILED)
        os.close(ready_r)
        os.setsid()
        if os.fork():
            os._exit(0)
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        os.close(devnull)
        logfd = os.open(ensure_runtime_dir() / f"{ns}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(logfd, 2)
        os.close(logfd)
    try:
        return _run(args, ns, ready_w)
    finally:
        if ready_w is not None:
            try:
                os.write(ready_w, b"F")
            except OSError:
                pass


def _signal(ready_w: int | None, status: bytes) -> None:
    if ready_w is not None:
        os.write(ready_w, status)
        os.close(ready_w)


def _run(args: argparse.Namespace, ns: str, ready_w: int | None) -> int:
    ensure_runtime_dir(0o711 if args.allow_uid else 0o700)
    lock_fd = os.open(lock_path(ns), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        _signal(ready_w, b"L")
        return EXIT_LOST_RACE
    path = socket_path(ns)
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    listener.bind(str(path))
    os.chmod(path, 0o666 if args.allow_uid else 0o600)  # the directory mode and SO_PEERCRED are the gates
    listener.listen(4096)
    raise_fd_limit()
    registry = Registry(namespace=ns, broker_pid=os.getpid(), clock=time.monotonic,
                        quotas=Quotas(args.quota_resources, args.quota_bytes, args.quota_names),
                        policy=Policy(os.getuid(), frozenset(args.allow_uid)))
    try:
        from ..keyed_mutex import abandon_session
    except ImportError:  # the compiled core is missing: keyed mutexes still detect dead owners themselves
        abandon_session = None
    server = BrokerServer(listener, registry, idle_timeout=None if args.persistent else args.idle,
                          abandon=abandon_session)
    _signal(ready_w, b"R")
    try:
        server.serve()
    finally:
        try:
            path.unlink()  # still under the lock: no other broker can have bound this path meanwhile
        except FileNotFoundError:
            pass
        listener.close()
        os.close(lock_fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
