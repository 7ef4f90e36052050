"""How clients find, start and stop the broker: auto-start like wineserver.

The first client that finds no broker runs `python -m texbridge._broker --daemon`, which detaches and returns once
the broker listens (or once it lost the start race to another one). Either way the client then connects. Many clients
starting at once is fine: the broker's lock lets exactly one win.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import subprocess
import sys
import threading
import time

from ._errors import AccessDenied, BrokerUnavailable
from ._paths import ensure_runtime_dir, lock_path, namespace_name, socket_path

_RETRYABLE = (errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN)


def connect_socket(namespace: str | None = None, *, autostart: bool = True, timeout: float = 10.0) -> socket.socket:
    """A connected SOCK_SEQPACKET socket to the namespace's broker, starting one if allowed and needed."""
    ns = namespace_name(namespace)
    path = socket_path(ns)
    deadline = time.monotonic() + timeout
    launcher: subprocess.Popen | None = None
    delay = 0.002
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.connect(str(path))
            if launcher is not None:
                _reap(launcher)
            return sock
        except OSError as e:
            sock.close()
            if e.errno in (errno.EACCES, errno.EPERM):
                raise AccessDenied(f"not allowed to reach the broker at {path}: {e.strerror}") from None
            if e.errno not in _RETRYABLE:
                raise BrokerUnavailable(f"cannot connect to {path}: {e.strerror}") from None
        if not autostart:
            raise BrokerUnavailable(f"no broker is running for namespace {ns!r} (socket {path})")
        if launcher is None:
            # Not waited for: when many clients lose their broker at once (it died), one launcher wins and the
            # others take a whole interpreter start-up to learn they lost; connecting to the winner meanwhile is
            # what makes re-attaching fast. And none at all while a broker holds the lock (it is starting up).
            if not _lock_held(ns):
                launcher = _launch(ns)
        elif launcher.poll() not in (None, 0, 3):
            raise BrokerUnavailable(f"the broker for namespace {ns!r} failed to start (exit {launcher.returncode}); "
                                    f"run `{python()} -m texbridge._broker --namespace {ns}` to see why")
        if time.monotonic() > deadline:
            if launcher is not None:
                _reap(launcher)
            raise BrokerUnavailable(f"the broker for namespace {ns!r} did not come up within {timeout:.0f}s")
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


def _lock_held(ns: str) -> bool:
    """Whether a broker holds the namespace's lock (running, or starting and about to listen). A shared lock taken
    and dropped at once: a daemon that loses its own start to it exits 3, but then this caller launches one."""
    try:
        fd = os.open(lock_path(ns), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # also drops the shared lock, if taken
    return False


def _reap(proc: subprocess.Popen) -> None:
    """Wait for a launcher in the background: it exits once its daemon is ready or has lost the start race."""
    if proc.poll() is None:
        threading.Thread(target=proc.wait, name="texbridge-launcher-reaper", daemon=True).start()


def start_broker(namespace: str | None = None, *, persistent: bool = False, idle: float | None = None,
                 extra_args: list[str] | None = None) -> bool:
    """Start a detached broker. True if this call's broker won, False if one was already running."""
    ns = namespace_name(namespace)
    proc = _launch(ns, persistent=persistent, idle=idle, extra_args=extra_args)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    cmd = proc.args
    if proc.returncode not in (0, 3):
        raise BrokerUnavailable(f"the broker for namespace {ns!r} failed to start (exit {proc.returncode}); "
                                f"run `{' '.join(cmd[:3])} --namespace {ns}` to see why")
    return proc.returncode == 0


def python() -> str:
    """The interpreter that runs a broker: $TEXBRIDGE_PYTHON, else this one. An embedded Python (GStreamer's plugin
    loader) has no sys.executable of texbridge's environment: its loader files set TEXBRIDGE_PYTHON."""
    return os.environ.get("TEXBRIDGE_PYTHON") or sys.executable


def _launch(ns: str, *, persistent: bool = False, idle: float | None = None,
            extra_args: list[str] | None = None) -> subprocess.Popen:
    """Run the broker's launcher (`--daemon`: it forks the broker and exits 0 when ready, 3 when another won)."""
    ensure_runtime_dir()
    cmd = [python(), "-m", "texbridge._broker", "--daemon", "--namespace", ns]
    if persistent:
        cmd.append("--persistent")
    if idle is not None:
        cmd += ["--idle", str(idle)]
    cmd += extra_args or []
    # The broker must outlive this process and not inherit its stdio (a pipe would keep a parent's reader open).
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ), close_fds=True, start_new_session=True)
