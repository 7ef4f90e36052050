"""Broker process start-up: one winner per namespace, detaching, readiness, clean exit.

Exactly one broker per namespace: the broker takes an exclusive flock on <namespace>.lock before touching the
socket path. A loser exits (status 3) and its client simply connects to the winner. The winner removes a
stale socket left by a crashed predecessor, binds, listens, and only then reports ready, so a client that waited for
readiness can always connect. On exit it unlinks the socket, its log when empty, and the lock file, all while still
holding the lock; so a starter re-checks after flock that the file it locked is still the one at the path, and a
starter that finds the lock held by a broker that is not answering (one on its way out) waits for it rather than
losing to it.

Raw fd numbers are reused by the kernel at once, and this process goes on to hold clients' memory: every raw fd
here is closed exactly once and never touched after (the ready pipe is an object that forgets its number).
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import socket
import sys
import time

from .._fdlimit import raise_fd_limit
from .._paths import ensure_runtime_dir, lock_path, namespace_name, runtime_dir, socket_path
from .registry import Policy, Quotas, Registry
from .server import BrokerServer

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
    ready = _Ready(None)
    if args.daemon:
        ready_r, ready_w = os.pipe()
        if os.fork():  # the launching process: wait for the daemon to say ready or lost
            os.close(ready_w)
            try:
                status = os.read(ready_r, 1)
            finally:
                os.close(ready_r)
            return {b"R": EXIT_READY, b"L": EXIT_LOST_RACE}.get(status, EXIT_FAILED)
        os.close(ready_r)
        ready = _Ready(ready_w)
        os.setsid()
        if os.fork():
            os._exit(0)
        devnull = os.open(os.devnull, os.O_RDWR)
        for std in (0, 1, 2):  # stderr goes to the log once the lock is ours (an exiting broker may unlink it)
            os.dup2(devnull, std)
        os.close(devnull)
    try:
        return _run(args, ns, ready)
    finally:
        ready.say(b"F")  # a no-op once it said R or L: the number may be a client's memfd by now


class _Ready:
    """The daemon's pipe to its launcher: says one status byte, once, and closes; then forgets the fd number."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    def say(self, status: bytes) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.write(fd, status)
        except OSError:
            pass
        finally:
            os.close(fd)


def _take_lock(ns: str, path) -> int | None:
    """The namespace's lock fd, or None when a live broker holds it.

    A held lock whose broker does not answer on the socket belongs to a broker starting (it binds in a moment) or
    exiting (it lets go in a moment): wait, bounded, rather than leave the caller with no broker at all."""
    deadline = time.monotonic() + 5.0
    while True:
        fd = os.open(lock_path(ns), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if _answers(path) or time.monotonic() > deadline:
                return None
            time.sleep(0.01)
            continue
        try:  # an exiting broker unlinks the file while holding it: what we locked must still be at the path
            same = os.path.samestat(os.fstat(fd), os.stat(lock_path(ns)))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _answers(path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def _open_log(ns: str) -> None:
    """stderr to <ns>.log (daemon only), opened under the lock so an exiting broker cannot unlink it under us."""
    logfd = os.open(runtime_dir() / f"{ns}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                    0o600)
    try:
        os.dup2(logfd, 2)  # dup2 clears close-on-exec on 2
    finally:
        os.close(logfd)


def _remove_if_empty_log(ns: str) -> None:
    """Remove <ns>.log if it is the file on our stderr and nothing was ever written to it."""
    try:
        log_file = runtime_dir() / f"{ns}.log"
        st = os.stat(log_file)
        if st.st_size == 0 and os.path.samestat(st, os.fstat(2)):
            log_file.unlink()
    except OSError:
        pass


def _run(args: argparse.Namespace, ns: str, ready: _Ready) -> int:
    ensure_runtime_dir(0o711 if args.allow_uid else 0o700)
    path = socket_path(ns)
    lock_fd = _take_lock(ns, path)
    if lock_fd is None:
        ready.say(b"L")
        return EXIT_LOST_RACE
    try:
        return _serve_locked(args, ns, path, ready)
    finally:
        # Still holding the lock: no other broker can have bound the path or taken the lock file meanwhile.
        for stale in (path, lock_path(ns)):
            try:
                stale.unlink()
            except FileNotFoundError:
                pass
        if args.daemon:
            _remove_if_empty_log(ns)
        os.close(lock_fd)


def _serve_locked(args: argparse.Namespace, ns: str, path, ready: _Ready) -> int:
    if args.daemon:
        _open_log(ns)
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
    ready.say(b"R")
    try:
        server.serve()
    finally:
        listener.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
