"""An in-process bridge link (two ends over Python queues and arrays): drives the engine without a transport.

It implements the `bridge._link` seam as plainly as possible, so engine tests fail for the engine's reasons, not a
transport's. Frames are copied under a lock (never torn); each stream keeps only its newest frame.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, Callable

import msgpack
import numpy as np

from texbridge.bridge._link import MAX_MESSAGE, BridgeError, FrameMeta, LinkStats, StreamFormat


class _Shared:
    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.alive = True
        self.messages: list[deque] = [deque(), deque()]  # messages *to* end i
        self.frames: list[dict[int, tuple[StreamFormat, int, np.ndarray, FrameMeta]]] = [{}, {}]  # to end i
        self.epoch: list[dict[int, int]] = [{}, {}]


class _Writer:
    def __init__(self, end: "MemLink", stream: int, fmt: StreamFormat) -> None:
        self.end, self.stream, self.fmt = end, stream, fmt
        self.buf = np.zeros((fmt.height, fmt.row_bytes), np.uint8)
        sh = end.shared
        with sh.lock:
            sh.epoch[1 - end.side][stream] = sh.epoch[1 - end.side].get(stream, 0) + 1
            sh.frames[1 - end.side].pop(stream, None)
            self.epoch = sh.epoch[1 - end.side][stream]

    def begin(self) -> np.ndarray:
        self.end._check()
        return self.buf

    def progress(self, rows: int) -> None:
        pass

    def commit(self, meta: FrameMeta) -> None:
        sh = self.end.shared
        with sh.lock:
            self.end._check()
            if sh.epoch[1 - self.end.side].get(self.stream) == self.epoch:
                sh.frames[1 - self.end.side][self.stream] = (self.fmt, self.epoch, self.buf.copy(), meta)
                self.end._stats.frames_out += 1
                self.end._stats.bytes_out += self.buf.nbytes
            sh.lock.notify_all()

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass


class _Reader:
    def __init__(self, end: "MemLink", stream: int, fmt: StreamFormat) -> None:
        self.end, self.stream, self.fmt = end, stream, fmt

    def read(self, copy: Callable[[np.ndarray, FrameMeta], Any], after: int) -> Any:
        sh = self.end.shared
        with sh.lock:
            self.end._check()
            got = sh.frames[self.end.side].get(self.stream)
            if got is None or got[3].frame <= after or got[0] != self.fmt:
                return None
            view = got[2].view()
            view.flags.writeable = False
            self.end._stats.frames_in += 1
            return copy(view, got[3])

    def close(self) -> None:
        pass


class MemLink:
    def __init__(self, shared: _Shared, side: int, peer_label: str) -> None:
        self.shared, self.side, self._peer_label = shared, side, peer_label
        self._stats = LinkStats(peer_label=peer_label, alive=True)

    def _check(self) -> None:
        if not self.shared.alive:
            raise BridgeError("link down")

    @property
    def peer_label(self) -> str:
        return self._peer_label

    @property
    def alive(self) -> bool:
        return self.shared.alive

    def send(self, message: dict[str, Any]) -> None:
        assert len(msgpack.packb(message, use_bin_type=True)) <= MAX_MESSAGE
        with self.shared.lock:
            self._check()
            self.shared.messages[1 - self.side].append(message)
            self.shared.lock.notify_all()

    def receive(self) -> list[dict[str, Any]]:
        with self.shared.lock:
            self._check()
            q = self.shared.messages[self.side]
            out = list(q)
            q.clear()
            return out

    def open_writer(self, stream: int, fmt: StreamFormat) -> _Writer:
        self._check()
        return _Writer(self, stream, fmt)

    def open_reader(self, stream: int, fmt: StreamFormat) -> _Reader:
        self._check()
        return _Reader(self, stream, fmt)

    def wait(self, timeout: float, spin: float = 0.0) -> None:
        with self.shared.lock:
            self._check()
            if not self.shared.messages[self.side]:
                self.shared.lock.wait(timeout)

    def stats(self) -> LinkStats:
        self._stats.alive = self.shared.alive
        return self._stats

    def close(self) -> None:
        with self.shared.lock:
            self.shared.alive = False
            self.shared.lock.notify_all()


class MemEndpoint:
    """Both ends' endpoints share a rendezvous: each establish() pairs with the other side's."""

    def __init__(self, rendezvous: "Rendezvous", side: int, label: str) -> None:
        self.rv, self.side, self.label = rendezvous, side, label

    def establish(self, timeout: float) -> MemLink | None:
        return self.rv.establish(self.side, timeout)

    def describe(self) -> str:
        return f"memory link side {self.side}"

    def close(self) -> None:
        pass


class Rendezvous:
    def __init__(self, labels: tuple[str, str]) -> None:
        self.labels = labels
        self.cond = threading.Condition()
        self.current: _Shared | None = None
        self.taken = [False, False]
        self.enabled = True

    def establish(self, side: int, timeout: float) -> MemLink | None:
        with self.cond:
            if not self.enabled:
                self.cond.wait(timeout)
                return None
            if self.current is None or not self.current.alive or self.taken[side]:
                if self.current is not None and self.current.alive and self.taken[side]:
                    self.cond.wait(timeout)  # still linked: nothing new to establish
                    return None
                self.current, self.taken = _Shared(), [False, False]
            shared = self.current
            self.taken[side] = True
            self.cond.notify_all()
            if not self.cond.wait_for(lambda: self.taken[1 - side] or shared is not self.current, timeout):
                self.taken[side] = False
                return None
            if shared is not self.current:
                return None
            return MemLink(shared, side, self.labels[1 - side])

    def cut(self) -> None:
        """The link dies (a peer killed): both ends notice at their next call."""
        with self.cond:
            if self.current is not None:
                with self.current.lock:
                    self.current.alive = False
                    self.current.lock.notify_all()
            self.cond.notify_all()

    def endpoints(self) -> tuple[MemEndpoint, MemEndpoint]:
        return MemEndpoint(self, 0, self.labels[0]), MemEndpoint(self, 1, self.labels[1])
