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
# Spinning keeps a request/reply exchange on cores that are already awake: on a VM, waking an idle vCPU costs tens
# of microseconds, more than the whole exchange. Only where there is a second core to spin on.
SPIN_SECONDS = float(os.environ.get("TEXBRIDGE_SPIN_US", "500")) / 1e6 if (os.cpu_count() or 1) > 1 else 0.0


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


def recv_frame_spinning(sock: socket.socket) -> tuple[bytes, list[int], bool]:
    """recv_frame on a blocking socket, polling for up to SPIN_SECONDS before sleeping in the kernel."""
    if SPIN_SECONDS and sock.gettimeout() is None:
        deadline = time.perf_counter() + SPIN_SECONDS
        while True:
            try:
                return recv_frame(sock, nowait=True)
            except BlockingIOError:
                if time.perf_counter() > deadline:
                    break
    return recv_frame(sock)


def send_frame(sock: socket.socket, data: bytes, fds: Iterable[int] = ()) -> None:
    """Send one frame; the kernel installs copies of `fds` in the receiver (the caller keeps its own)."""
    fds = list(fds)
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sock.sendmsg([data], anc)


def close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
