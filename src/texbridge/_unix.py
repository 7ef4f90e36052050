"""SOCK_SEQPACKET frames with fds attached (SCM_RIGHTS): the only socket code the broker and clients share."""

from __future__ import annotations

import array
import os
import socket
from typing import Iterable

from ._protocol import MAX_FDS, MAX_FRAME

# Room for more fds than a legal frame carries, so an over-full frame is seen (and its fds closed) rather than
# silently cut by the kernel.
_CMSG_SPACE = socket.CMSG_SPACE(MAX_FDS * 4 * 4)


def recv_frame(sock: socket.socket) -> tuple[bytes, list[int], bool]:
    """(data, fds, truncated). Fds are close-on-exec and belong to the caller; b"" with no fds means EOF."""
    data, anc, flags, _ = sock.recvmsg(MAX_FRAME + 1, _CMSG_SPACE, socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(payload[: len(payload) - len(payload) % a.itemsize])
            fds.extend(a)
    return data, fds, bool(flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC))


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
