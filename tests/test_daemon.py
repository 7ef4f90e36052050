"""The broker daemon's start and exit: files it leaves, start races with an exiting broker, raw fd hygiene."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import texbridge
from texbridge._paths import namespace_name

from conftest import run_py, wait_until


def _files(runtime) -> set[str]:
    return {p.name for p in runtime.iterdir()} if runtime.exists() else set()


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in "ZX"
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("how", ["shutdown", "sigterm", "idle"])
def test_a_broker_that_exits_leaves_no_files(runtime, monkeypatch, how):
    monkeypatch.setenv("TEXBRIDGE_BROKER_IDLE", "0.3" if how == "idle" else "30")
    with texbridge.connect() as s:
        pid = s.broker_pid
        s.create_buffer(100).close()
        ns = namespace_name()
        assert {f"{ns}.sock", f"{ns}.lock"} <= _files(runtime)
        if how == "shutdown":
            s.shutdown()
        elif how == "sigterm":
            os.kill(pid, signal.SIGTERM)
    assert wait_until(lambda: _gone(pid), timeout=10)
    assert _files(runtime) == set()  # socket, lock and the (empty) log: about 100 files per test run before


def test_a_log_with_something_in_it_is_kept(runtime, monkeypatch):
    monkeypatch.setenv("TEXBRIDGE_LOG", "INFO")  # the broker says why it exits
    monkeypatch.setenv("TEXBRIDGE_BROKER_IDLE", "0.2")
    with texbridge.connect() as s:
        pid = s.broker_pid
    assert wait_until(lambda: _gone(pid), timeout=10)
    log = runtime / f"{namespace_name()}.log"
    assert _files(runtime) == {log.name} and "exiting" in log.read_text()


def test_clients_racing_exiting_brokers_always_get_one(runtime, monkeypatch):
    """Brokers that exit as soon as they are idle, and clients arriving meanwhile: an exiting broker holds the lock
    while it unlinks its files; a starter waits for it rather than losing to it, and locks the new file."""
    monkeypatch.setenv("TEXBRIDGE_BROKER_IDLE", "0")
    code = textwrap.dedent("""
        import sys, time, texbridge
        seen = set()
        for i in range(8):
            with texbridge.connect(timeout=20) as s:
                assert s.stats()["clients"] >= 1
                seen.add(s.broker_pid)
            time.sleep(0.003 * (i % 4))
        print(len(seen))
    """)
    restarts = 0
    for _ in range(5):  # clients that happen to overlap all along keep one broker alive: run until brokers turned over
        kids = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for _ in range(3)]
        for k in kids:
            out, err = k.communicate(timeout=120)
            assert k.returncode == 0, err  # every client got a broker, even while brokers were exiting
            restarts += int(out) - 1
        if restarts > 0:
            break
    assert restarts > 0  # brokers did come and go under the clients
    assert wait_until(lambda: _files(runtime) == set(), timeout=10), _files(runtime)


def test_a_starter_waits_for_an_exiting_broker_and_locks_the_new_file(runtime):
    """Here the test plays the exiting broker: it holds the lock with no socket answering, then unlinks the lock
    file and lets go. The starter must wait for that, not lose to it, and lock a fresh file."""
    runtime.mkdir(mode=0o700)
    lock = runtime / f"{namespace_name()}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    launcher = subprocess.Popen([sys.executable, "-m", "texbridge._broker", "--daemon"])
    time.sleep(0.5)
    assert launcher.poll() is None  # waiting, not lost
    lock.unlink()
    os.close(fd)
    assert launcher.wait(10) == 0  # it won
    with texbridge.connect(autostart=False) as s:
        holder = s.broker_pid
        assert os.path.samestat(os.stat(lock), os.stat(f"/proc/{holder}/fd/{_fd_of(holder, lock)}"))
        s.shutdown()


def _fd_of(pid: int, path) -> int:
    for fd in os.listdir(f"/proc/{pid}/fd"):
        if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
            return int(fd)
    raise AssertionError(f"{pid} does not hold {path} open")


# A broker whose serve() fails after clients registered memory: the daemon's exit paths run with the memfds open.
# (Fault injection in a real broker process: the third connection makes accept() raise. A BaseException, because
# the server loop survives any Exception: a bug there costs a request or a session, never the broker.)
FAILING_BROKER = """
import sys
from texbridge._broker import daemon, server
class InjectedFailure(BaseException):
    pass
accept = server.BrokerServer._accept
def failing_accept(self):
    if self._next_id > 2:
        raise InjectedFailure("injected broker failure")
    accept(self)
server.BrokerServer._accept = failing_accept
sys.exit(daemon.main(["--daemon"]))
"""


@pytest.mark.parametrize("how", ["failing", "sigterm", "sigkill"])
def test_a_dying_broker_writes_into_no_clients_memory(runtime, how):
    """The ready pipe's fd number is reused once the broker runs (by a client's socket, then by a kept memfd): no
    exit path may write into it. Fill many memfds with a pattern, end the broker, check every byte."""
    if how == "failing":
        run_py(FAILING_BROKER)
    first = texbridge.connect()  # its socket takes the lowest free fd number in the broker: the old ready pipe's
    pid = first.broker_pid
    with texbridge.connect() as s:
        first.close()  # ... which the next memfd the broker receives takes over
        time.sleep(0.2)
        bufs = [s.create_buffer(4096) for _ in range(64)]
        for i, b in enumerate(bufs):
            b.numpy()[:] = 0xA5 ^ i
        if how == "failing":
            try:
                texbridge.connect(autostart=False).close()  # the third connection: the broker fails
            except texbridge.TexbridgeError:
                pass
        else:
            os.kill(pid, signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        assert wait_until(lambda: _gone(pid), timeout=10)
        for i, b in enumerate(bufs):
            assert np.all(b.numpy() == (0xA5 ^ i)), f"buffer {i} was written by the dying broker"
            b.numpy()[:] = 0
        del b


def test_a_token_dropped_twice_never_closes_another_fd():
    """The store hands out tokens, not fd numbers: the kernel reuses a closed number at once (for a client's
    memfd, say), so a stale token must not reach whatever has that number now."""
    from texbridge._broker.fdstore import FdStore

    store = FdStore(capacity=8)
    r, w = os.pipe()
    os.close(w)
    (token,) = store.keep([r])
    store.drop([token])
    again = os.open(os.devnull, os.O_RDONLY)  # most likely r's number
    try:
        (other,) = store.keep([again])
        assert other != token
        store.drop([token])  # a second drop: ignored
        with pytest.raises(KeyError):
            store.resolve([token])
        os.fstat(again)  # still open
        assert store.resolve([other])[0] == [again]
        store.drop([other])
        with pytest.raises(OSError):
            os.fstat(again)
    finally:
        store.close()


def test_a_broker_that_never_answers_the_hello_is_an_error_not_a_hang(runtime):
    """connect() succeeds against a listening socket nobody accepts (the backlog takes it): a stopped or wedged
    broker must still end in BrokerUnavailable within the caller's timeout."""
    import socket

    runtime.mkdir(mode=0o700)
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    mute.bind(str(runtime / f"{namespace_name()}.sock"))
    mute.listen(8)
    try:
        t0 = time.monotonic()
        with pytest.raises(texbridge.BrokerUnavailable, match="did not answer"):
            texbridge.connect(autostart=False, timeout=0.5)
        assert time.monotonic() - t0 < 5
    finally:
        mute.close()


@pytest.mark.parametrize("allow", [False, True])
def test_the_runtime_directory_and_socket_modes_are_the_first_gate(runtime, allow):
    """Without --allow-uid nobody else may even reach the socket (directory 0700, socket 0600): SO_PEERCRED is the
    second gate, not the only one. With it, the directory is 0711 and the socket 0666, so SO_PEERCRED decides."""
    import stat as stat_mod

    from texbridge._paths import socket_path

    run_py("import texbridge._launch as l, sys; l.start_broker(extra_args=sys.argv[1:])",
           *(["--allow-uid", "4242"] if allow else []))
    sock = socket_path()
    assert stat_mod.S_IMODE(os.stat(runtime).st_mode) == (0o711 if allow else 0o700)
    assert stat_mod.S_IMODE(os.stat(sock).st_mode) == (0o666 if allow else 0o600)
