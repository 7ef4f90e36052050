"""An fd keeper: holds fds for the broker past the broker's own RLIMIT_NOFILE room (see fdstore.py).

Run as a script by path (`python -I .../_keeper.py SOCKFD`), without the texbridge package (fdstore imports it only
for its wire constants): it uses the standard library and `_fdlimit.py`, loaded by path, so each keeper costs a bare
interpreter (a few MB), not texbridge's imports.
Wire format on the SOCK_SEQPACKET socket, one request at a time: b"C" → b"C<capacity>"; b"P" + fd → 8-byte id
(or b"E" when the fd did not arrive); b"G" + id → b"K" + the fd (or b"E"); b"D" + id → no reply.
"""

from __future__ import annotations

import os
import socket
import struct
import sys

if __package__:
    from .._fdlimit import raise_fd_limit
else:  # run by path as a bare script (see above): load that stdlib-only file by path, without the package
    import importlib.util
    from pathlib import Path

    _spec = importlib.util.spec_from_file_location("_texbridge_fdlimit", Path(__file__).parents[1] / "_fdlimit.py")
    assert _spec is not None and _spec.loader is not None
    _fdlimit = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_fdlimit)
    raise_fd_limit = _fdlimit.raise_fd_limit

ID = struct.Struct("<q")
RESERVE = 64  # fds a keeper keeps free for itself


def serve(sock: socket.socket) -> None:
    capacity = max(0, raise_fd_limit() - RESERVE)
    held: dict[int, int] = {}
    next_id = 1
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(sock, 64, 4)
        except OSError:
            return
        if not data:
            return  # the broker went away: exiting closes every fd held
        op = data[:1]
        if op == b"P" and len(fds) == 1:
            held[next_id] = fds.pop()
            sock.send(ID.pack(next_id))
            next_id += 1
            continue
        for extra in fds:  # every fd that arrived and is not kept is closed here, once
            os.close(extra)
        if op == b"P":
            reply = b"E"  # the kernel dropped it (this keeper is full): say so, never go silent
        elif op == b"C":
            reply = b"C%d" % capacity
        elif op == b"G" and len(data) == 9:
            fd = held.get(ID.unpack(data[1:])[0])
            if fd is not None:
                socket.send_fds(sock, [b"K"], [fd])
                continue
            reply = b"E"
        elif op == b"D" and len(data) == 9:
            fd = held.pop(ID.unpack(data[1:])[0], None)
            if fd is not None:
                os.close(fd)
            continue
        else:
            reply = b"E"
        sock.send(reply)


if __name__ == "__main__":
    serve(socket.socket(fileno=int(sys.argv[1])))
