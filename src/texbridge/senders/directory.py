"""The sender directory: senders as the broker lists them, the active sender, and the sender event stream.

Each sender's metadata (app, pid, size, format, backend, fps, frames) lives at the broker (Session.update, ≤ 2 Hz
from the sender's background thread), so list_senders() is one LIST and never maps shared memory, and
watch_senders() follows the broker's event stream. The *active sender* is the one named by a resource published as
ACTIVE_NAME (set_active_sender; the choice lives as long as the session that made it), else the most recently
announced live sender.
"""

from __future__ import annotations

import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from .. import _liveness
from .._client import Session, connect
from .._errors import NotFound, TexbridgeError

ACTIVE_NAME = "texbridge:active-sender"
META_KEY = "texbridge.sender"  # marks a broker resource's meta as a sender's control buffer


@dataclass(frozen=True)
class SenderInfo:
    """One sender, as the broker knows it (no shared memory is touched to list senders)."""

    name: str
    app: str
    pid: int
    width: int
    height: int
    format: str
    backend: str
    fps: float
    frames: int
    buffers: int = 3
    frame_sync: bool = False
    announced: float = 0.0
    handle: int = 0
    bridged: str = ""  # a bridge's mirror of a sender on peer `bridged` (named NAME@bridged); "" = a local sender

    @classmethod
    def from_meta(cls, name: str, meta: dict[str, Any], handle: int = 0) -> "SenderInfo":
        return cls(name, str(meta.get("app", "")), int(meta.get("pid", 0)), int(meta.get("width", 0)),
                   int(meta.get("height", 0)), str(meta.get("format", "")), str(meta.get("backend", "")),
                   float(meta.get("fps", 0.0)), int(meta.get("frames", 0)), int(meta.get("buffers", 0)),
                   bool(meta.get("frame_sync", False)), float(meta.get("announced", 0.0)), handle,
                   str(meta.get("bridged", "")))


@dataclass(frozen=True)
class SenderEvent:
    """kind: "announced" (a sender appeared), "updated" (size/fps/frame count changed), "retired" (it is gone)."""

    kind: str
    name: str
    info: SenderInfo | None = None
    handle: int = 0  # the sender instance's control handle (a restarted sender has a new one)


def is_sender(meta: Any) -> bool:
    return isinstance(meta, dict) and meta.get(META_KEY) == 1


@contextmanager
def _maybe_session(session: Session | None) -> Iterator[Session]:
    if session is not None:
        yield session
        return
    with connect() as s:
        yield s


def list_senders(session: Session | None = None) -> list[SenderInfo]:
    """Every live sender in the namespace, oldest announcement first."""
    with _maybe_session(session) as s:
        out = [SenderInfo.from_meta(name, r["meta"], r["handle"])
               for r in s.list(kind="buffer") if is_sender(r.get("meta")) for name in r.get("names") or ()]
    return sorted(out, key=lambda i: i.announced)


def active_sender(session: Session | None = None) -> str | None:
    """The explicitly chosen sender if it is alive, else the most recently announced one, else None."""
    with _maybe_session(session) as s:
        senders = list_senders(s)
        names = {i.name for i in senders}
        try:
            chosen = (s.info(ACTIVE_NAME).get("meta") or {}).get("sender")
        except NotFound:
            chosen = None
        if chosen in names:
            return chosen
        return senders[-1].name if senders else None


def set_active_sender(name: str, session: Session) -> None:
    """Make `name` the active sender for receivers that ask for none. The choice lasts while `session` is open
    (it is a resource published as ACTIVE_NAME); a new choice from the same session replaces it."""
    for res in list(session._resources.values()):
        if res.handle is not None and getattr(res, "_texbridge_active", False):
            session.update(res.handle, {"sender": name})
            return
    res = session.create_buffer(64)
    res._texbridge_active = True  # type: ignore[attr-defined]
    session.update(res.handle, {"sender": name})
    res.publish(ACTIVE_NAME)


class _SenderWatch:
    """Iterator of SenderEvent built from the broker's event stream; close() hangs up."""

    def __init__(self, session: Session | None, initial: bool) -> None:
        self._own = session is None
        self._session = session or connect()
        self._stream = self._session.watch()  # subscribe before listing: nothing falls in between
        self._known: dict[str, int] = {}  # name -> control handle
        # control handle -> (sender pid, its start time): to tell a dead sender after a broker restart, pid reuse too
        self._pids: dict[int, tuple[int, int]] = {}
        self._pending: deque[SenderEvent] = deque()
        for info in list_senders(self._session):
            self._known[info.name] = info.handle
            self._remember(info.handle, info.pid)
            if initial:
                self._pending.append(SenderEvent("announced", info.name, info, info.handle))

    def _remember(self, handle: int, pid: int) -> None:
        self._pids[handle] = (pid, _liveness.start_time(pid))

    def _translate(self, ev: Any) -> list[SenderEvent]:
        f = ev.fields
        if ev.kind == "published":
            meta = (f.get("summary") or {}).get("meta")
            if is_sender(meta) and f.get("name"):
                self._known[f["name"]] = f["handle"]
                self._remember(f["handle"], int(meta.get("pid", 0)))
                return [SenderEvent("announced", f["name"], SenderInfo.from_meta(f["name"], meta, f["handle"]),
                                    f["handle"])]
        elif ev.kind == "updated" and is_sender(f.get("meta")):
            return [SenderEvent("updated", n, SenderInfo.from_meta(n, f["meta"], f["handle"]), f["handle"])
                    for n in f.get("names") or () if self._known.get(n) == f["handle"]]
        elif ev.kind == "unpublished" and self._known.get(f.get("name")) == f.get("handle"):
            del self._known[f["name"]]
            return [SenderEvent("retired", f["name"], None, f["handle"])]
        elif ev.kind == "reconnected":
            return self._resync()
        return []

    def _resync(self) -> list[SenderEvent]:
        """After a broker restart (events of the gap are lost): announce senders not known yet, retire known ones
        whose process died. A known sender missing from the list but alive is re-attaching: its re-announcement
        (the same handle) follows as a `published` event."""
        try:
            live = {i.name: i for i in list_senders(self._session)}
        except TexbridgeError:
            return []
        out = []
        for name, info in live.items():
            if self._known.get(name) != info.handle:
                self._known[name] = info.handle
                self._remember(info.handle, info.pid)
                out.append(SenderEvent("announced", name, info, info.handle))
        for name, handle in list(self._known.items()):
            pid, start = self._pids.get(handle, (0, 0))
            if name not in live and pid and not _liveness.alive(pid, start):
                del self._known[name]
                out.append(SenderEvent("retired", name, None, handle))
        return out

    def __iter__(self) -> "_SenderWatch":
        return self

    def __next__(self) -> SenderEvent:
        while not self._pending:
            ev = next(self._stream)
            self._pending.extend(self._translate(ev))
        return self._pending.popleft()

    def next(self, timeout: float | None = None) -> SenderEvent | None:
        """The next sender event, or None after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._pending:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            ev = self._stream.next(left)
            if ev is None:
                return None
            self._pending.extend(self._translate(ev))
        return self._pending.popleft()

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def closed(self) -> bool:
        return self._stream.closed

    def close(self) -> None:
        self._stream.close()
        if self._own:
            self._session.close()

    def __enter__(self) -> "_SenderWatch":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def watch_senders(session: Session | None = None, *, initial: bool = True) -> _SenderWatch:
    """Announce / update / retire events pushed by the broker. `initial` first announces the senders already live."""
    return _SenderWatch(session, initial)
