"""Is this process alive: the one Python answer (stdlib only).

The rule, the same as `proc_alive()` in `_synccore.c` (which keeps its own C copy: the keyed-mutex core must not call
back into Python): a process is alive when it exists, is not a zombie (a dead process its parent has not reaped yet
runs no code and holds nothing in earnest), and, where its start time (field 22 of /proc/<pid>/stat, clock ticks
since boot) was recorded earlier, still has that start time: a pid reused by a new process is dead to the record.
A process whose /proc entry exists but cannot be read counts as alive (unknown is never taken for dead).

`watch()` is the guard for a caller that keeps a reference to one process: a pidfd where the kernel has them (it
names that very process, so reuse cannot fool it, and it polls readable on exit), else the start time taken now.
"""

from __future__ import annotations

import os
import select
import time

_DEAD_STATES = frozenset("ZXx")
_PID_MAX = 2**31 - 1  # pid_t: a larger value (read from shared memory a peer can scribble on) names no process


_UNREADABLE = ("?", 0)


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time) from /proc/<pid>/stat; None: no such process; _UNREADABLE: exists, unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read(1024)
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return _UNREADABLE
    if not raw:
        return None  # the process went away while we read
    # The command name may hold anything (spaces, parentheses): parse from the last ')'. Fields 3.. follow it.
    _, paren, tail = raw.rpartition(b")")
    fields = tail.split()
    if not paren:
        return _UNREADABLE
    try:
        return (fields[0].decode("ascii", "replace"), int(fields[19]))
    except (IndexError, ValueError):
        return _UNREADABLE


def start_time(pid: int) -> int:
    """The process's start time (field 22 of /proc/<pid>/stat) to record now and pass to `alive()` later; 0 when
    unknown (no such process, or unreadable), which `alive()` then does not check."""
    if not 0 < pid <= _PID_MAX:
        return 0
    st = _stat(pid)
    return st[1] if st else 0


def alive(pid: int, start: int = 0) -> bool:
    """Exists, is not a zombie, and (when `start` is not 0) started at `start`: see the module docstring."""
    if not 0 < pid <= _PID_MAX:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    st = _stat(pid)
    if st is None:
        return False
    if st is _UNREADABLE:
        return True
    state, s = st
    if state in _DEAD_STATES:
        return False
    return start == 0 or s == start


class Watch:
    """One process, followed by identity rather than by pid (see the module docstring)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._start = start_time(pid)
        self._fd = -1
        if 0 < pid <= _PID_MAX and hasattr(os, "pidfd_open"):
            try:
                self._fd = os.pidfd_open(pid)
            except OSError:
                self._fd = -1  # gone already (ESRCH), or no pidfds here (ENOSYS, seccomp): the start time guards
        self._gone = self._fd < 0 and not alive(pid, self._start)

    def alive(self) -> bool:
        """Still the same process, running (a zombie is dead)."""
        return not self.wait(0.0)

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the process to end; True once it has."""
        if self._gone:
            return True
        if self._fd >= 0:
            ready, _, _ = select.select([self._fd], [], [], max(timeout, 0.0))
            self._gone = bool(ready)
            return self._gone
        deadline = time.monotonic() + timeout
        while alive(self.pid, self._start):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(0.02, left))
        self._gone = True
        return True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def watch(pid: int) -> Watch:
    """Follow `pid` from now on; use as a context manager (it may hold a pidfd)."""
    return Watch(pid)
