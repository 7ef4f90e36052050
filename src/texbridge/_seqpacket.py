"""SOCK_SEQPACKET frames with fds attached (SCM_RIGHTS): the only socket code the broker and clients share."""

from __future__ import annotations

import array
import os
import socket
import time
from typing import Iterable

from ._protocol import MAX_FDS, MAX_FRAME

# Room for more fds than a legal frame carries, so an over-full frame is seen (and its fds closed) rather than
# silently cut by the kernel.
_CMSG_SPACE = socket.CMSG_SPACE(MAX_FDS * 4 * 4)
_TRUNCATED = int(socket.MSG_TRUNC | socket.MSG_CTRUNC)  # plain ints: IntFlag arithmetic costs µs per frame
_RECV_FLAGS = int(socket.MSG_CMSG_CLOEXEC)
_DONTWAIT = int(socket.MSG_DONTWAIT)
_SOL_SOCKET, _SCM_RIGHTS = socket.SOL_SOCKET, socket.SCM_RIGHTS
# Spinning keeps a request/reply exchange on cores that are already awake: on a VM, waking an idle vCPU costs tens
# of microseconds, more than the whole exchange. Only where there is a second core to spin on.
SPIN_SECONDS = float(os.environ.get("TEXBRIDGE_SPIN_US", "500")) / 1e6 if (os.cpu_count() or 1) > 1 else 0.0
PREEMPTED_GAP = 200e-6  # two polls of one spin this far apart: the spinner was descheduled in between


class SpinPolicy:
    """Whether spinning pays now, in this process. It pays only while a core is free for each side: on an
    oversubscribed machine a spinner burns its time slice, is descheduled, and delays everyone, its peer included
    (measured on the 2-core dev VM at load 8-12: open -> NumPy view 1.1-1.9 ms median spinning, 95-200 us not).
    A spin that finds a gap over PREEMPTED_GAP between two of its polls was descheduled: then no spinning for a
    back-off (0.1 s, doubling while it keeps happening, at most 5 s), after which one spin probes again."""

    MIN_BACKOFF, MAX_BACKOFF = 0.1, 5.0

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._off_until = 0.0
        self._backoff = self.MIN_BACKOFF

    def window(self, now: float) -> float:
        """Seconds to spin now (0: sleep in the kernel at once)."""
        return self.seconds if now >= self._off_until else 0.0

    def preempted(self, now: float) -> None:
        self._off_until = now + self._backoff
        self._backoff = min(self._backoff * 2, self.MAX_BACKOFF)

    def clean(self) -> None:
        """A spin that ended without being descheduled: the machine has room again."""
        self._backoff = self.MIN_BACKOFF


SPIN = SpinPolicy(SPIN_SECONDS)  # one per process: the client's waits (the broker keeps its own, see server.py)


def recv_frame(sock: socket.socket, nowait: bool = False) -> tuple[bytes, list[int], bool]:
    """(data, fds, truncated). Fds are close-on-exec and belong to the caller; b"" with no fds means EOF."""
    data, anc, flags, _ = sock.recvmsg(MAX_FRAME + 1, _CMSG_SPACE, _RECV_FLAGS | (_DONTWAIT if nowait else 0))
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(payload[: len(payload) - len(payload) % a.itemsize])
            fds.extend(a)
    return data, fds, bool(flags & _TRUNCATED)


def recv_frame_spinning(sock: socket.socket, spin: SpinPolicy = SPIN) -> tuple[bytes, list[int], bool]:
    """recv_frame on a blocking socket, polling for up to the policy's window before sleeping in the kernel."""
    pc = time.perf_counter
    last = pc()
    window = spin.window(last)
    if window and sock.gettimeout() is None:
        deadline = last + window
        while True:
            try:
                frame = recv_frame(sock, nowait=True)
            except BlockingIOError:
                now = pc()
                if now - last > PREEMPTED_GAP:
                    spin.preempted(now)
                    break
                if now > deadline:
                    spin.clean()
                    break
                last = now
            else:
                spin.clean()
                return frame
    return recv_frame(sock)


def send_frame(sock: socket.socket, data: bytes, fds: Iterable[int] = ()) -> None:
    """Send one frame; the kernel installs copies of `fds` in the receiver (the caller keeps its own)."""
    if fds:
        sock.sendmsg([data], [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fds).tobytes())])
    else:
        sock.send(data)


def close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
