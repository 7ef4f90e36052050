"""How clients find, start and stop the broker: auto-start like wineserver.

The first client that finds no broker runs `python -m texbridge._broker --daemon`, which detaches and returns once
the broker listens (or once it lost the start race to another one). Either way the client then connects. Many clients
starting at once is fine: the broker's lock lets exactly one win.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import time

from .._errors import AccessDenied, BrokerUnavailable
from .._paths import ensure_runtime_dir, namespace_name, socket_path

_RETRYABLE = (errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN)


def connect_socket(namespace: str | None = None, *, autostart: bool = True, timeout: float = 10.0) -> socket.socket:
    """A connected SOCK_SEQPACKET socket to the namespace's broker, starting one if allowed and needed."""
    ns = namespace_name(namespace)
    path = socket_path(ns)
    deadline = time.monotonic() + timeout
    started = False
    delay = 0.002
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.connect(str(path))
            return sock
        except OSError as e:
            sock.close()
            if e.errno in (errno.EACCES, errno.EPERM):
                raise AccessDenied(f"not allowed to reach the broker at {path}: {e.strerror}") from None
            if e.errno not in _RETRYABLE:
                raise BrokerUnavailable(f"cannot connect to {path}: {e.strerror}") from None
        if not autostart:
            raise BrokerUnavailable(f"no broker is running for namespace {ns!r} (socket {path})")
        if not started:
            start_broker(ns)
            started = True
        if time.monotonic() > deadline:
            raise BrokerUnavailable(f"the broker for namespace {ns!r} did not come up within {timeout:.0f}s")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def start_broker(namespace: str | None = None, *, persistent: bool = False, idle: float | None = None,
                 extra_args: list[str] | None = None) -> bool:
    """Start a detached broker. True if this call's broker won, False if one was already running."""
    ns = namespace_name(namespace)
    ensure_runtime_dir()
    cmd = [sys.executable, "-m", "texbridge._broker", "--daemon", "--namespace", ns]
    if persistent:
        cmd.append("--persistent")
    if idle is not None:
        cmd += ["--idle", str(idle)]
    cmd += extra_args or []
    env = dict(os.environ)
    # The broker must outlive this process and not inherit its stdio (a pipe would keep a parent's reader open).
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          env=env, close_fds=True, start_new_session=True, timeout=30)
    if proc.returncode not in (0, 3):
        raise BrokerUnavailable(f"the broker for namespace {ns!r} failed to start (exit {proc.returncode}); "
                                f"run `{' '.join(cmd[:3])} --namespace {ns}` to see why")
    return proc.returncode == 0
