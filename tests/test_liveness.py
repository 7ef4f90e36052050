"""The one Python liveness helper (texbridge._liveness): zombies are dead, a reused pid is dead to its record.

The C core's copy of the rule (proc_alive in _synccore.c) is tested through the keyed mutex (test_keyed_mutex.py:
a SIGKILLed holder, zombie or reaped, is abandoned)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from texbridge import _liveness
from texbridge._liveness import alive, start_time, watch


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rpartition(b")")[2].split()[0].decode()


def _zombie() -> subprocess.Popen:
    """A child that has exited but is not reaped yet."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 5
    while _state(p.pid) != "Z":
        assert time.monotonic() < deadline, "child did not exit within 5 s"
        time.sleep(0.01)
    return p


@pytest.fixture
def sleeper():
    p = subprocess.Popen(["sleep", "60"])
    yield p
    p.kill()
    p.wait()


def test_this_process_is_alive_with_its_own_start_time():
    me = os.getpid()
    start = start_time(me)
    assert start > 0
    assert alive(me) and alive(me, start)


def test_a_different_start_time_is_a_reused_pid():
    assert not alive(os.getpid(), start_time(os.getpid()) + 1)


def test_no_such_process_and_nonpositive_pids_are_dead():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()  # reaped: the pid names nothing (until reused)
    for pid in (0, -1, -p.pid, 2**31, 2**64 - 1):  # out of pid_t's range: a scribbled word, never an OverflowError
        assert not alive(pid)
        assert start_time(pid) == 0
        with watch(pid) as w:
            assert not w.alive()


def test_a_zombie_is_dead():
    p = _zombie()
    try:
        assert not alive(p.pid)
        with watch(p.pid) as w:
            assert not w.alive()
            assert w.wait(0)
    finally:
        p.wait()


@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "start-time"])
def test_watch_sees_a_kill_within_5s(sleeper, pidfd, monkeypatch):
    if pidfd and not hasattr(os, "pidfd_open"):
        pytest.skip("no os.pidfd_open (Python built without it, or not Linux)")
    if not pidfd:
        monkeypatch.delattr(os, "pidfd_open", raising=False)
    with watch(sleeper.pid) as w:
        assert (w._fd >= 0) == pidfd
        assert w.alive()
        assert not w.wait(0.05)
        os.kill(sleeper.pid, signal.SIGKILL)  # not reaped: the watch must see the zombie as gone
        assert w.wait(5.0)
        assert not w.alive()


def test_the_start_time_guard_catches_a_reused_pid_without_pidfd(sleeper, monkeypatch):
    monkeypatch.delattr(os, "pidfd_open", raising=False)
    w = watch(sleeper.pid)
    assert w.alive()
    w._start += 1  # as if the pid now named a process started later than the one watched
    assert w.wait(0) and not w.alive()


def test_an_unreadable_proc_entry_counts_as_alive(monkeypatch):
    monkeypatch.setattr(_liveness, "_stat", lambda pid: _liveness._UNREADABLE)
    assert alive(os.getpid(), 12345)
