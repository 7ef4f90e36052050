"""Shared fixtures: every test gets its own runtime dir and namespace, so brokers never collide and always stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

import texbridge
from texbridge._launch import connect_socket

# A shell's background job starts with SIGINT ignored, and children inherit that: every test that interrupts a
# child (keyed mutex waits, the demo's Ctrl-C) would fail for the environment's sake. Children get the default.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# CI has 2 cores shared with the processes the tests start: judge hypothesis by examples, not wall time.
settings.register_profile("texbridge", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("texbridge")


@pytest.fixture
def runtime(tmp_path, monkeypatch):
    """A private runtime dir and namespace; brokers started inside are stopped at the end."""
    d = tmp_path / "run"
    monkeypatch.setenv("TEXBRIDGE_RUNTIME_DIR", str(d))
    ns = "t" + uuid.uuid4().hex[:10]
    monkeypatch.setenv("TEXBRIDGE_NAMESPACE", ns)
    monkeypatch.setenv("TEXBRIDGE_BROKER_IDLE", "30")
    yield d
    stop_brokers(d)


def stop_brokers(d: Path) -> None:
    for lock in d.glob("*.lock") if d.exists() else ():
        for pid in broker_pids(lock):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


def broker_pids(lock: Path) -> list[int]:
    """Pids of processes holding `lock` open (the broker keeps its lock file open for life)."""
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            for fd in (p / "fd").iterdir():
                if os.readlink(fd) == str(lock):
                    pids.append(int(p.name))
                    break
        except OSError:
            continue
    return pids


@pytest.fixture
def session(runtime):
    with texbridge.connect() as s:
        yield s


def fd_count(pid: int | None = None) -> int:
    return len(os.listdir(f"/proc/{pid or os.getpid()}/fd"))


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def run_py(code: str, *args: str, timeout: float = 60, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run Python code in a fresh process (same environment: same runtime dir and namespace)."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def spawn_py(code: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def raw_socket():
    """A connected socket to the running broker, without the client library (for malformed input)."""
    return connect_socket(autostart=False)


def assert_unguessable(handles: list[int]) -> None:
    """64-bit handles drawn at random: distinct, every bit both set and clear somewhere, no common stride, no
    small values. (For n random handles, a given bit is constant with probability 2**(1-n).)"""
    n = len(handles)
    assert len(set(handles)) == n
    for bit in range(64):
        ones = sum((h >> bit) & 1 for h in handles)
        assert 0 < ones < n, f"bit {bit} is the same in all {n} handles: {[hex(h) for h in handles[:4]]}..."
    steps = {b - a for a, b in zip(handles, handles[1:])}
    assert len(steps) > n // 2, "handles follow a pattern"
    assert min(handles) > 1 << 32, "a handle small enough to guess"
