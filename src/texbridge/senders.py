"""Senders and receivers: Spout/Syphon for Linux on top of shared resources (design: docs/senders.md).

A Sender owns a ring of shared textures (triple buffered by default) and one small shared *control* buffer published
under the sender's name. The control buffer holds the ring's slot handles, the latest (frame, slot) word, a seqlock
per slot, the fps, and one row per attached receiver (its pinned slot and the last frame it consumed).

Why a seqlock and not a keyed mutex per slot: with several receivers at different rates, exclusive slot locks would
serialize readers and can leave the sender with no free slot. Here the sender never waits (unless frame_sync): it
writes the oldest slot no receiver has pinned, bumping that slot's sequence to odd before and even after. A receiver
pins the newest slot, copies it, and keeps the copy only if the sequence did not move; pins keep fast senders from
starving slow readers, and the sequence check makes a lost race harmless (a retry, never a torn frame). Waiting uses
a futex on the latest-frame word, so `wait_frame()` sleeps in the kernel and wakes within microseconds.

Memory ordering: every control word is an aligned 8-byte store/load made by a separate C call (NumPy), and large
copies end with glibc's sfence; on x86-64 (TSO) that is the ordering a seqlock needs. The keyed mutex in the control
buffer only serializes receiver attach/detach.

Directory: each sender's metadata (app, pid, size, format, backend, fps, frames) lives at the broker (Session.update,
≤ 2 Hz from a background thread), so list_senders() is one LIST and watch_senders() follows the broker's event stream.
The *active sender* is the one named by a resource published as ACTIVE_NAME (set_active_sender; the choice lives as
long as the session that made it), else the most recently announced live sender.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from . import _synccore as _core
from ._client import Session, connect
from ._errors import (BackendError, BrokenError, ClosedError, InvalidArgument, InvalidDescriptor, KeyedMutexAbandoned,
                      NotASender, NotFound, SenderNotFound, TexbridgeError)
from ._formats import get_format
from ._resources import Resource, check_frame

__all__ = ["Sender", "Receiver", "SenderInfo", "SenderEvent", "list_senders", "watch_senders", "active_sender",
           "set_active_sender", "ACTIVE_NAME"]

ACTIVE_NAME = "texbridge:active-sender"
META_KEY = "texbridge.sender"  # marks a broker resource's meta as a sender's control buffer
META_INTERVAL = 0.5  # seconds between metadata pushes (≤ 2 Hz)

# -- control buffer layout: u64 words ---------------------------------------------------------------------------------
CONTROL_SIZE = 4096
MAGIC = 0x54425344_52303031  # "TBSDR001"
MAX_SLOTS = 15
MAX_READERS = 64
_MAGIC, _VERSION, _HSEQ, _GEN, _WIDTH, _HEIGHT, _NSLOTS, _LATEST = range(8)
_CLOSED, _FPS, _SYNC, _ACK, _PID, _SENT_NS, _MIRROR_GEN, _FMT = range(8, 16)
_HANDLES, _SEQ, _SLOT_FRAME, _MIRROR = 16, 32, 48, 64
_READERS, _READER_WORDS = 128, 4  # per reader: pid, pin mask, consumed frame, flags
_R_PID, _R_PIN, _R_CONSUMED, _R_FLAGS = range(4)
_WANT_COPY = 1
_SLOT_BITS = 4  # latest = frame << 4 | slot; the futex waits on its low 32 bits, which change every frame
_SLOT_MASK = (1 << _SLOT_BITS) - 1  # slot value a closing sender parks `latest` on (no ring slot has it)

# -- futex waits and fences come from the compiled core (texbridge._synccore): the only native code in texbridge --------
def _fence() -> None:
    """A full memory barrier, where a store must be visible before a later load (pin, then check the slot; mark
    the slot, then check the pins)."""
    _core.fence()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- directory --------------------------------------------------------------------------------------------------------
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

    @classmethod
    def from_meta(cls, name: str, meta: dict[str, Any], handle: int = 0) -> "SenderInfo":
        return cls(name, str(meta.get("app", "")), int(meta.get("pid", 0)), int(meta.get("width", 0)),
                   int(meta.get("height", 0)), str(meta.get("format", "")), str(meta.get("backend", "")),
                   float(meta.get("fps", 0.0)), int(meta.get("frames", 0)), int(meta.get("buffers", 0)),
                   bool(meta.get("frame_sync", False)), float(meta.get("announced", 0.0)), handle)


@dataclass(frozen=True)
class SenderEvent:
    """kind: "announced" (a sender appeared), "updated" (size/fps/frame count changed), "retired" (it is gone)."""

    kind: str
    name: str
    info: SenderInfo | None = None
    handle: int = 0  # the sender instance's control handle (a restarted sender has a new one)


def _is_sender(meta: Any) -> bool:
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
               for r in s.list(kind="buffer") if _is_sender(r.get("meta")) for name in r.get("names") or ()]
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
        self._pids: dict[int, int] = {}  # control handle -> sender pid (to tell a dead sender after a restart)
        self._pending: deque[SenderEvent] = deque()
        for info in list_senders(self._session):
            self._known[info.name] = info.handle
            self._pids[info.handle] = info.pid
            if initial:
                self._pending.append(SenderEvent("announced", info.name, info, info.handle))

    def _translate(self, ev: Any) -> list[SenderEvent]:
        f = ev.fields
        if ev.kind == "published":
            meta = (f.get("summary") or {}).get("meta")
            if _is_sender(meta) and f.get("name"):
                self._known[f["name"]] = f["handle"]
                self._pids[f["handle"]] = int(meta.get("pid", 0))
                return [SenderEvent("announced", f["name"], SenderInfo.from_meta(f["name"], meta, f["handle"]),
                                    f["handle"])]
        elif ev.kind == "updated" and _is_sender(f.get("meta")):
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
                self._pids[info.handle] = info.pid
                out.append(SenderEvent("announced", name, info, info.handle))
        for name, handle in list(self._known.items()):
            pid = self._pids.get(handle, 0)
            if name not in live and pid and not _pid_alive(pid):
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


# -- sender -------------------------------------------------------------------------------------------------------------
class _Control:
    """Views on a control buffer's words (u64 and, for fps, f64)."""

    def __init__(self, res: Resource) -> None:
        raw = res.numpy()
        self.res = res
        self.u = raw.view(np.uint64)
        self.f = raw.view(np.float64)
        self.readers = self.u[_READERS:_READERS + MAX_READERS * _READER_WORDS].reshape(MAX_READERS, _READER_WORDS)
        self.raw = raw

    def wait(self, index: int, expected: int, timeout: float | None) -> None:
        """Sleep while the low 32 bits of word `index` equal `expected` (they change with every update)."""
        if self.res.closed:
            raise ClosedError("the sender's control buffer is closed (sender or receiver closed while waiting)")
        _core.wait_word(self.raw, index * 8, expected & 0xFFFFFFFF, timeout)

    def wake(self, index: int) -> None:
        _core.wake_word(self.raw, index * 8)

    def close(self) -> None:
        """Drop the resource. The views stay valid (they keep the mapping alive: see _sharedmem.SharedMapping), so a
        thread still inside a wait or a read cannot touch unmapped memory; wait() refuses from now on."""
        self.res.close()


class Sender:
    """Publish frames under `name`. `send(frame)` never waits for receivers unless frame_sync=True.

    A ring of `buffers` shared textures in `backend` memory; receivers always get the newest complete frame.
    """

    def __init__(self, name: str, width: int, height: int, format: str = "rgba8", *, backend: str = "memfd",
                 buffers: int = 3, frame_sync: bool = False, session: Session | None = None,
                 app_name: str | None = None, sync_timeout: float = 1.0) -> None:
        if not isinstance(buffers, int) or not 2 <= buffers <= MAX_SLOTS:
            raise InvalidDescriptor(f"buffers must be 2..{MAX_SLOTS}, got {buffers!r}")
        get_format(format)  # raises InvalidDescriptor for unknown formats
        self.name, self.backend, self.frame_sync, self.sync_timeout = name, backend, bool(frame_sync), sync_timeout
        self._own_session = session is None
        self._session = session or connect(app_name=app_name)
        self._slots: list[Resource] = []
        self._mirror: list[Resource] = []
        self._frame = 0
        self._latest_slot = -1
        self._fps = self._dt = 0.0
        self._last_t = 0.0
        self.sync_timeouts = 0
        self.overwrites = 0  # frames written into a slot a receiver had pinned (every slot was pinned)
        self._closed = False
        self._nslots = buffers
        self._meta_dirty = threading.Event()
        self._ctl: _Control | None = None
        try:
            self._ctl = _Control(self._session.create_buffer(CONTROL_SIZE, keyed_mutex=True))
            u = self._ctl.u
            u[_MAGIC], u[_VERSION], u[_PID], u[_SYNC] = MAGIC, 1, os.getpid(), int(self.frame_sync)
            self._make_ring(width, height, format)
            self._announced = time.time()
            self._session.update(self._ctl.res.handle, self._meta())
            self._ctl.res.publish(name)
        except BaseException:
            self._teardown()
            raise
        self._meta_thread = threading.Thread(target=self._meta_loop, name=f"texbridge-sender-{name}", daemon=True)
        self._meta_thread.start()

    # -- properties ---------------------------------------------------------------------------------------------------
    @property
    def width(self) -> int:
        return self._width

    @property
    def height(self) -> int:
        return self._height

    @property
    def format(self) -> str:
        return self._format

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def frame_number(self) -> int:
        """Frames sent so far (the number of the last one)."""
        return self._frame

    @property
    def fps(self) -> float:
        return self._fps

    @property
    def receivers(self) -> int:
        """Receivers attached now."""
        return int(np.count_nonzero(self._ctl.readers[:, _R_PID])) if self._ctl else 0

    @property
    def closed(self) -> bool:
        return self._closed

    # -- ring -----------------------------------------------------------------------------------------------------------
    def _new_slots(self, backend: str) -> list[Resource]:
        slots: list[Resource] = []
        try:
            for _ in range(self._nslots):
                slots.append(self._session.create_texture(self._width, self._height, self._format, backend=backend))
        except BaseException:
            for s in slots:
                s.close()
            raise
        return slots

    def _make_ring(self, width: int, height: int, format: str) -> None:
        if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
            raise InvalidDescriptor(f"sender size must be positive integers, got {width!r}x{height!r}")
        self._width, self._height, self._format = width, height, format
        old, old_mirror = self._slots, self._mirror
        self._slots = self._new_slots(self.backend)
        self._mirror = []
        self._views = [s.numpy() if s.host_visible else None for s in self._slots]
        self._shape = self._slots[0].shape
        u = self._ctl.u
        n = self._nslots
        u[_SEQ:_SEQ + n] += 1  # odd: a receiver mid-copy of an old slot will retry
        u[_HSEQ] += 1
        for i, s in enumerate(self._slots):
            u[_HANDLES + i] = s.handle.value
        u[_WIDTH], u[_HEIGHT], u[_NSLOTS] = width, height, n
        u[_FMT] = int.from_bytes(format.encode()[:8].ljust(8, b"\0"), "little")
        u[_SLOT_FRAME:_SLOT_FRAME + MAX_SLOTS] = 0
        u[_MIRROR_GEN] = 0
        u[_GEN] += 1
        u[_HSEQ] += 1
        u[_SEQ:_SEQ + n] += 1
        self._latest_slot = -1
        for s in old + old_mirror:
            s.close()  # receivers still holding them keep them alive until they follow the new generation

    def _make_mirror(self) -> None:
        """The copy path: memfd twins of the slots for receivers that cannot import `backend` memory."""
        self._mirror = self._new_slots("memfd")
        self._mirror_views = [s.numpy() for s in self._mirror]
        u = self._ctl.u
        for i, s in enumerate(self._mirror):
            u[_MIRROR + i] = s.handle.value
        u[_MIRROR_GEN] = u[_GEN]

    def resize(self, width: int, height: int, format: str | None = None) -> None:
        """Change the frame size (and format); receivers follow at their next frame."""
        self._check_open()
        fmt = format or self._format
        get_format(fmt)
        if (width, height, fmt) == (self._width, self._height, self._format):
            return
        self._make_ring(width, height, fmt)
        self._push_meta()

    # -- sending ------------------------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"sender {self.name!r} is closed")

    def wait_frame_sync(self, timeout: float | None = None) -> bool:
        """Spout's WaitFrameSync: wait until every attached receiver has consumed the latest frame sent. send()
        calls it first when frame_sync is on (timeout: sync_timeout). False (and sync_timeouts + 1) on timeout;
        receivers that died without detaching are dropped while waiting."""
        self._check_open()
        ctl = self._ctl
        deadline = time.monotonic() + (self.sync_timeout if timeout is None else timeout)
        while True:
            self._check_open()
            a = int(ctl.u[_ACK])
            r = ctl.readers
            active = r[:, _R_PID] != 0
            if not active.any() or (r[active, _R_CONSUMED] >= self._frame).all():
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                self.sync_timeouts += 1
                return False
            ctl.wait(_ACK, a, min(left, 0.05))
            for i in np.flatnonzero(active):
                pid = int(r[i, _R_PID])
                if r[i, _R_CONSUMED] < self._frame and not _pid_alive(pid):
                    r[i] = 0  # a receiver that died without detaching

    def wait_for_receivers(self, count: int = 1, timeout: float | None = None) -> bool:
        """Block until at least `count` receivers are attached (futex on the control buffer's ack word)."""
        self._check_open()
        ctl = self._ctl
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._check_open()  # close() from another thread wakes us
            a = int(ctl.u[_ACK])
            if self.receivers >= count:
                return True
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            ctl.wait(_ACK, a, left)

    def _begin(self) -> int:
        if self.frame_sync and self._frame:
            self.wait_frame_sync()
        ctl = self._ctl
        r = ctl.readers
        pinned = int(np.bitwise_or.reduce(r[:, _R_PIN]))
        if r[:, _R_FLAGS].any() and not self._mirror:
            self._make_mirror()
        n, last = self._nslots, self._latest_slot
        u = ctl.u
        for k in range(1, n):
            cand = (last + k) % n
            if (pinned >> cand) & 1:
                continue
            u[_SEQ + cand] += 1  # odd: writing
            _fence()
            # Dekker with the receiver (pin, fence, read seq): either it sees the odd seq, or we see its pin.
            pinned = int(np.bitwise_or.reduce(r[:, _R_PIN]))
            if not (pinned >> cand) & 1:
                return cand
            u[_SEQ + cand] -= 1  # pinned meanwhile: untouched, restore the exact even value it read
        slot = (last + 1) % n  # every slot is pinned: overwrite the oldest; its readers see the seq move
        self.overwrites += 1
        u[_SEQ + slot] += 1
        return slot

    def _end(self, slot: int, ok: bool = True) -> None:
        u = self._ctl.u
        if not ok:
            u[_SLOT_FRAME + slot] = 0
            u[_SEQ + slot] += 1
            return
        self._frame += 1
        u[_SLOT_FRAME + slot] = self._frame
        u[_SEQ + slot] += 1  # even: complete
        u[_SENT_NS] = time.monotonic_ns()
        u[_LATEST] = (self._frame << _SLOT_BITS) | slot
        self._latest_slot = slot
        self._ctl.wake(_LATEST)
        now = time.monotonic()
        if self._last_t:
            dt = now - self._last_t
            if dt > 0:  # average the interval, not its inverse (1/dt of jittery sleeps overestimates)
                self._dt = dt if not self._dt else 0.9 * self._dt + 0.1 * dt
                self._fps = 1.0 / self._dt
                self._ctl.f[_FPS] = self._fps
        self._last_t = now
        if self._frame == 1:
            self._meta_dirty.set()

    def _coerce(self, frame: Any) -> Any:
        if isinstance(frame, Resource):
            frame = frame.download()  # GL texture, Vulkan image, CUDA array: the resource's own download path
        cai = getattr(frame, "__cuda_array_interface__", None)
        if cai is not None:  # a torch/CuPy CUDA array: kept on the GPU when the slots are CUDA memory
            if tuple(cai["shape"]) not in (self._shape, self._shape[:2]) or np.dtype(cai["typestr"]) != \
                    get_format(self._format).numpy_dtype:
                raise InvalidArgument(f"CUDA frame of shape {tuple(cai['shape'])} / {cai['typestr']} sent to a "
                                        f"{self._width}x{self._height} {self._format} sender (shape {self._shape})")
            if all(slot.device_copy for slot in self._slots) and not self._mirror:
                return frame
            frame = frame.get() if hasattr(frame, "get") else frame.cpu().numpy()  # CuPy / torch to the host
        return check_frame(frame, self._shape, get_format(self._format).numpy_dtype,
                           f"sender {self.name!r} ({self._width}x{self._height} {self._format})")

    def send(self, frame: Any) -> int:
        """Publish `frame`: a NumPy array of the sender's shape, a texbridge Resource (GL texture, Vulkan image,
        CUDA array), or a torch/CuPy CUDA array (copied on the GPU into CUDA slots). Returns its frame number."""
        self._check_open()
        arr = self._coerce(frame)
        slot = self._begin()
        ok = False
        try:
            self._write(slot, arr)
            ok = True
        finally:
            self._end(slot, ok)
        return self._frame

    def _write(self, slot: int, arr: Any) -> None:
        cai = getattr(arr, "__cuda_array_interface__", None)
        if cai is not None:  # device to device into a CUDA slot; strides None means C-contiguous rows
            strides = cai.get("strides")
            pitch = strides[0] if strides else self._width * get_format(self._format).bytes_per_pixel
            self._slots[slot].copy_from_device(cai["data"][0], pitch)
            return
        view = self._views[slot]
        if view is not None:
            np.copyto(view, arr)
        else:
            self._slots[slot].upload(arr)
        if self._mirror:
            np.copyto(self._mirror_views[slot], arr)

    @contextmanager
    def writing(self) -> Iterator[np.ndarray]:
        """Zero-copy production: `with sender.writing() as buf: buf[...] = ...` writes straight into the next slot
        (memfd) and publishes it on exit. The buffer holds an older frame's pixels, not zeros."""
        self._check_open()
        slot = self._begin()
        ok = False
        try:
            view = self._views[slot]
            buf = view if view is not None else np.empty(self._shape, get_format(self._format).numpy_dtype)
            yield buf
            if view is None:
                self._slots[slot].upload(buf)
            if self._mirror:
                np.copyto(self._mirror_views[slot], buf)
            ok = True
        finally:
            self._end(slot, ok)

    # -- metadata -----------------------------------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        return {META_KEY: 1, "app": self._session.app_name, "pid": os.getpid(), "width": self._width,
                "height": self._height, "format": self._format, "backend": self.backend, "fps": round(self._fps, 2),
                "frames": self._frame, "buffers": self._nslots, "frame_sync": self.frame_sync,
                "announced": self._announced}

    def _push_meta(self) -> None:
        if self._ctl is not None:
            self._session.update(self._ctl.res.handle, self._meta())

    def _meta_loop(self) -> None:
        pushed = -1
        while not self._closed:
            self._meta_dirty.wait(META_INTERVAL)
            self._meta_dirty.clear()
            if self._closed:
                return
            if self._frame != pushed:
                pushed = self._frame
                try:
                    self._push_meta()
                except BrokenError:
                    pushed = -1  # no broker right now: the session re-attaches (meta included); try again later
                except (TexbridgeError, AttributeError):
                    return  # closing under us: nothing left to tell

    # -- lifetime -------------------------------------------------------------------------------------------------------
    def _teardown(self) -> None:
        ctl, self._ctl = self._ctl, None
        for s in self._slots + self._mirror:
            s.close()
        self._slots, self._mirror, self._views = [], [], []
        if ctl is not None:
            ctl.close()
        if self._own_session:
            self._session.close()

    def close(self) -> None:
        """Retire the sender: receivers see it go at once (closed flag + futex wake, and the broker's unpublish)."""
        if self._closed:
            return
        self._closed = True
        self._meta_dirty.set()
        if self._meta_thread.is_alive():
            self._meta_thread.join(2.0)
        ctl = self._ctl
        if ctl is not None:
            ctl.u[_CLOSED] = 1
            # Park `latest` on a slot no ring has: its low 32 bits change, so a receiver about to sleep on the
            # old value cannot miss this wake.
            ctl.u[_LATEST] = (self._frame << _SLOT_BITS) | _SLOT_MASK
            ctl.wake(_LATEST)
            ctl.wake(_ACK)
            try:
                self._session.unpublish(self.name)
            except TexbridgeError:
                pass
        self._teardown()

    def __enter__(self) -> "Sender":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"frame {self._frame}"
        return f"<Sender {self.name!r} {self._width}x{self._height} {self._format} {self.backend} {state}>"


# -- receiver -----------------------------------------------------------------------------------------------------------
@dataclass
class _Link:
    """A receiver's connection to one sender instance."""

    name: str
    ctl: _Control
    reader: int
    handle: int = 0
    generation: int = 0
    slots: list[Resource] = field(default_factory=list)
    views: list[np.ndarray | None] = field(default_factory=list)
    shape: tuple[int, ...] = ()
    dtype: Any = None
    copy_path: bool = False


def _not_a_sender(name: str, summary: dict[str, Any], session: Session) -> str:
    what = summary.get("kind", "resource")
    if what == "texture2d":
        what = f"{summary.get('width')}x{summary.get('height')} {summary.get('format')} texture"
    live = ", ".join(repr(i.name) for i in list_senders(session)) or "none"
    return (f"{name!r} is a {what} published by pid {summary.get('creator_pid')}, not a sender: open it with "
            f"session.open({name!r}), or give a sender's name (live senders: {live})")


class Receiver:
    """Receive the newest frames of sender `name` (None: the active sender), following it across resizes and
    restarts. receive() never blocks; wait_frame(timeout) sleeps on a futex until a new frame arrives.

    A named sender that does not exist yet is waited for (Spout style): `status` tells "no_sender" from
    "no_frame"; require_sender=True raises SenderNotFound instead. A name published by something that is not a
    sender raises NotASender (here, or from receive() if the name is taken over later)."""

    def __init__(self, name: str | None = None, *, session: Session | None = None, backend: str | None = None,
                 app_name: str | None = None, require_sender: bool = False) -> None:
        self.requested = name
        self.backend = backend
        self._own_session = session is None
        self._session = session or connect(app_name=app_name)
        self._link: _Link | None = None
        self._lock = threading.RLock()
        self._closed = False
        self._gone = False  # the connected sender retired (set by the watch thread)
        self._changed = threading.Event()  # a sender appeared that we may connect to
        self.events: deque[SenderEvent] = deque(maxlen=1000)  # announced/updated/retired, newest last
        self.info: SenderInfo | None = None
        self.frame_number = 0
        self.frames_dropped = 0
        self.frames_received = 0
        self.is_new = False
        self.copy_path_reason: str | None = None
        self._last: np.ndarray | None = None
        self._pinned_seq: tuple[int, int] | None = None
        self._retry = False
        self._followed = 0  # control handle of the sender instance connected last
        self._watch = watch_senders(self._session, initial=False)
        self._thread = threading.Thread(target=self._watch_loop, name="texbridge-receiver-watch", daemon=True)
        self._thread.start()
        try:
            if not self._connect() and require_sender:
                live = ", ".join(repr(i.name) for i in list_senders(self._session)) or "none"
                raise SenderNotFound(f"no live sender {'named ' + repr(name) if name else 'at all'} in namespace "
                                     f"{self._session.namespace!r} (live senders: {live}); start it first, or "
                                     "leave require_sender off to wait for it")
        except BaseException:
            self.close()
            raise

    # -- properties -----------------------------------------------------------------------------------------------------
    @property
    def status(self) -> str:
        """"no_sender" (none connected: receive() gives None until one appears), "no_frame" (connected, nothing sent
        yet), "receiving", or "closed"."""
        if self._closed:
            return "closed"
        link = self._link
        if link is None or self._gone:
            return "no_sender"
        return "receiving" if int(link.ctl.u[_LATEST]) >> _SLOT_BITS else "no_frame"

    @property
    def name(self) -> str | None:
        """The sender connected now (or the one asked for)."""
        return self._link.name if self._link else self.requested

    @property
    def connected(self) -> bool:
        return self._link is not None and not self._gone

    @property
    def sender_fps(self) -> float:
        link = self._link
        return float(link.ctl.f[_FPS]) if link else 0.0

    @property
    def width(self) -> int:
        return self._link.shape[1] if self._link and self._link.shape else 0

    @property
    def height(self) -> int:
        return self._link.shape[0] if self._link and self._link.shape else 0

    @property
    def format(self) -> str:
        link = self._link
        return int(link.ctl.u[_FMT]).to_bytes(8, "little").rstrip(b"\0").decode() if link else ""

    @property
    def sender_frame(self) -> int:
        """The sender's newest frame number (0 when not connected)."""
        link = self._link
        return int(link.ctl.u[_LATEST]) >> _SLOT_BITS if link else 0

    @property
    def sent_ns(self) -> int:
        """CLOCK_MONOTONIC time at which the newest frame was published (for latency measurements)."""
        return int(self._link.ctl.u[_SENT_NS]) if self._link else 0

    # -- watch thread ---------------------------------------------------------------------------------------------------
    def _watch_loop(self) -> None:
        while not self._closed:
            try:
                ev = self._watch.next(0.25)
            except (TexbridgeError, OSError, ValueError):
                return
            if ev is None:
                if self._watch.closed:
                    return  # no broker and no way to start one: stop here rather than spin
                continue
            link = self._link
            if ev.kind == "retired" and ev.handle in (self._followed, link.handle if link else None):
                self.events.append(ev)  # also when receive() already saw the closed flag and let go
                if link is not None and ev.handle == link.handle:
                    self._gone = True
                    try:
                        link.ctl.wake(_LATEST)  # a waiter in wait_frame() learns of it now
                    except Exception:
                        pass
            elif ev.kind == "announced" and (self.requested is None or ev.name == self.requested):
                self.events.append(ev)
                self._changed.set()
            elif ev.kind == "updated" and link is not None and ev.name == link.name:
                self.info = ev.info
                self.events.append(ev)

    # -- connecting -----------------------------------------------------------------------------------------------------
    def _disconnect(self) -> None:
        link, self._link = self._link, None
        self._pinned_seq = None
        if link is None:
            return
        try:
            if not link.ctl.res.closed:
                link.ctl.readers[link.reader] = 0
                link.ctl.wake(_ACK)  # a frame_sync sender must not wait for us any more
        except Exception:
            pass
        for s in link.slots:
            try:
                s.close()
            except TexbridgeError:
                pass
        try:
            link.ctl.close()
        except TexbridgeError:
            pass

    def _connect(self) -> bool:
        """Open the sender's control buffer and attach as a reader. False when there is no such sender now."""
        self._changed.clear()
        self._gone = False
        name = self.requested or active_sender(self._session)
        if name is None:
            return False
        try:
            summary = self._session.info(name)
        except NotFound:
            return False
        if not _is_sender(summary.get("meta")):
            raise NotASender(_not_a_sender(name, summary, self._session))
        try:
            res = self._session.open(name, backend="memfd")
        except NotFound:
            return False
        if res.descriptor.kind != "buffer" or res.descriptor.size != CONTROL_SIZE:
            res.close()
            raise NotASender(_not_a_sender(name, summary, self._session))
        ctl = _Control(res)
        if int(ctl.u[_MAGIC]) != MAGIC:
            ctl.close()
            raise NotASender(_not_a_sender(name, summary, self._session))
        if int(ctl.u[_CLOSED]):
            ctl.close()  # a sender closing right now: its successor (if any) is announced
            return False
        reader = self._attach(ctl)
        if reader < 0:
            ctl.close()
            raise TexbridgeError(f"sender {name!r} has {MAX_READERS} receivers attached already")
        self._link = _Link(name, ctl, reader, handle=res.handle.value)
        self._followed = res.handle.value
        try:
            self.info = SenderInfo.from_meta(name, self._session.info(name).get("meta") or {})
        except TexbridgeError:
            self.info = None
        self.frame_number = 0
        return True

    def _attach(self, ctl: _Control) -> int:
        """Claim a reader row under the control buffer's keyed mutex (rows of dead receivers are reused)."""
        mutex = ctl.res.mutex
        try:
            mutex.acquire(0, 5.0)
        except KeyedMutexAbandoned:
            pass  # a receiver died attaching; the rows are plain words, nothing to repair
        try:
            r = ctl.readers
            for i in range(MAX_READERS):
                pid = int(r[i, _R_PID])
                if pid == 0 or not _pid_alive(pid):
                    r[i, _R_PIN] = r[i, _R_FLAGS] = 0
                    r[i, _R_CONSUMED] = 0
                    r[i, _R_PID] = os.getpid()
                    ctl.u[_ACK] += 1
                    ctl.wake(_ACK)  # wait_for_receivers()
                    return i
            return -1
        finally:
            mutex.release(0)

    def _open_slots(self, link: _Link) -> bool:
        """(Re)open the ring of the sender's current generation; False while it is being rebuilt."""
        u = link.ctl.u
        h1 = int(u[_HSEQ])
        if h1 & 1:
            return False
        gen, n = int(u[_GEN]), int(u[_NSLOTS])
        handles = [int(x) for x in u[_HANDLES:_HANDLES + n]]
        mirror = [int(x) for x in u[_MIRROR:_MIRROR + n]] if int(u[_MIRROR_GEN]) == gen else []
        if int(u[_HSEQ]) != h1:
            return False
        for s in link.slots:
            s.close()
        link.slots, link.views = [], []
        if link.copy_path:
            if not mirror:
                link.ctl.readers[link.reader, _R_FLAGS] = _WANT_COPY
                return False
            handles, backend = mirror, "memfd"
        else:
            backend = self.backend
        try:
            for h in handles:
                link.slots.append(self._session.open(h, backend=backend))
        except NotFound:
            for s in link.slots:
                s.close()
            link.slots = []
            return False  # the sender rebuilt its ring meanwhile
        except (BackendError, InvalidDescriptor) as e:
            for s in link.slots:
                s.close()
            link.slots = []
            if link.copy_path:
                raise
            self.copy_path_reason = f"{type(e).__name__}: {e}"
            warnings.warn(f"texbridge: receiver of {link.name!r} cannot import the sender's memory "
                          f"({self.copy_path_reason}); using the copy path", RuntimeWarning, stacklevel=3)
            link.copy_path = True
            link.ctl.readers[link.reader, _R_FLAGS] = _WANT_COPY
            return False
        link.views = [s.numpy() if s.host_visible else None for s in link.slots]
        link.shape = link.slots[0].shape
        link.dtype = get_format(link.slots[0].descriptor.format).numpy_dtype
        link.generation = gen
        return True

    def _ensure(self) -> _Link | None:
        if self._closed:
            raise ClosedError("the receiver is closed")
        link = self._link
        if link is not None and (self._gone or int(link.ctl.u[_CLOSED])):
            self._disconnect()
            self._retry = True  # a successor may be published already (its announcement set _changed too)
            link = None
        if link is None and (self._changed.is_set() or self._retry):
            self._retry = False
            self._connect()
            link = self._link
        return link

    # -- receiving ------------------------------------------------------------------------------------------------------
    def receive(self, *, copy: bool = True, out: "np.ndarray | Resource | None" = None) -> Any:
        """The newest frame without blocking, or None before the first frame / with no sender.

        out=a texbridge Resource (a GL texture, Vulkan image or CUDA array of the frame's size and format) puts
        the frame into that API: the frame is uploaded into it when new, and the resource is returned.

        copy=True (default) returns a new array you own. out=array copies into your array (no allocation) when it
        has the frame's shape and dtype, else (after a resize) a new array is returned: compare `frame is out`.
        copy=False returns a read-only view of the shared slot itself: the sender will not write that slot while
        this receiver has it pinned (until the next receive() or release()) unless all slots are pinned, so check
        `still_valid()` after using the view if you must be certain it was not overwritten.
        is_new tells whether it is a frame not returned before."""
        if isinstance(out, Resource):
            frame = self.receive()
            if frame is None:
                return None
            if self.is_new:
                out.upload(frame)
            return out
        with self._lock:
            link = self._ensure()
            self.is_new = False
            if link is None:
                return None
            u = link.ctl.u
            if link.generation != int(u[_GEN]) and not self._open_slots(link):
                return None
            frame = int(u[_LATEST]) >> _SLOT_BITS
            if frame == 0:
                return None
            if frame == self.frame_number and self._last is not None and link.generation == int(u[_GEN]):
                return self._last
            return self._read(link, copy, out)

    def _read(self, link: _Link, copy: bool, out: np.ndarray | None) -> np.ndarray | None:
        u, rows = link.ctl.u, link.ctl.readers
        for _ in range(1000):
            if link.generation != int(u[_GEN]) and not self._open_slots(link):
                return None
            latest = int(u[_LATEST])
            frame, slot = latest >> _SLOT_BITS, latest & _SLOT_MASK
            if slot >= len(link.slots):
                return None  # the sender is closing (it parks `latest` on slot _SLOT_MASK)
            rows[link.reader, _R_PIN] = 1 << slot
            _fence()  # the pin must be visible before we read the seq (see Sender._begin)
            s1 = int(u[_SEQ + slot])
            if s1 & 1 or int(u[_SLOT_FRAME + slot]) != frame:
                continue
            view = link.views[slot]
            if out is not None and (out.shape != link.shape or out.dtype != link.dtype):
                out = None  # the sender resized: a new array this time (check `frame is out`)
            if not copy:
                data = view if view is not None else link.slots[slot].download()
                if view is not None:
                    data = data.view()
                    data.flags.writeable = False
            elif out is not None:
                if view is not None:
                    np.copyto(out, view)
                else:
                    np.copyto(out, link.slots[slot].download())
                data = out
            else:
                data = view.copy() if view is not None else link.slots[slot].download()
            if int(u[_SEQ + slot]) != s1 or int(u[_GEN]) != link.generation:
                continue  # overwritten while we copied: the next attempt takes the (newer) latest
            if copy:
                rows[link.reader, _R_PIN] = 0
                self._pinned_seq = None
            else:
                self._pinned_seq = (slot, s1)
            if self.frame_number and frame > self.frame_number + 1:
                self.frames_dropped += frame - self.frame_number - 1
            self.frame_number = frame
            self.frames_received += 1
            self.is_new = True
            self._last = data
            rows[link.reader, _R_CONSUMED] = frame
            if int(u[_SYNC]):
                u[_ACK] += 1
                link.ctl.wake(_ACK)
            return data
        return None

    def still_valid(self) -> bool:
        """Whether the zero-copy view from the last receive(copy=False) still holds that frame's pixels."""
        link, pin = self._link, self._pinned_seq
        if link is None or pin is None:
            return False
        return int(link.ctl.u[_SEQ + pin[0]]) == pin[1] and int(link.ctl.u[_GEN]) == link.generation

    def release(self) -> None:
        """Unpin the slot a zero-copy view points into, so the sender may reuse it."""
        link = self._link
        if link is not None:
            link.ctl.readers[link.reader, _R_PIN] = 0
        self._pinned_seq = None

    def wait_frame(self, timeout: float | None = None, *, copy: bool = True,
                   out: "np.ndarray | Resource | None" = None) -> Any:
        """Block until a frame newer than the last one returned arrives (or a sender appears and sends one).
        Returns it, or None after `timeout` seconds. Sleeps on a futex: no polling."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            link = self._ensure()
            if link is None:
                if left is not None and left <= 0:
                    return None
                self._changed.wait(left)  # set by the watch thread when a sender is announced
                continue
            latest = int(link.ctl.u[_LATEST])
            if latest >> _SLOT_BITS != self.frame_number and latest >> _SLOT_BITS:
                frame = self.receive(copy=copy, out=out)
                if frame is not None and self.is_new:
                    return frame
            if left is not None and left <= 0:
                return None
            if self._gone or int(link.ctl.u[_CLOSED]):
                continue
            link.ctl.wait(_LATEST, latest, left)

    # -- lifetime -------------------------------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._thread.join(1.0)
        with self._lock:
            self._disconnect()
        self._watch.close()
        if self._own_session:
            self._session.close()

    def __enter__(self) -> "Receiver":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"frame {self.frame_number}" if self.connected else "waiting for a sender"
        return f"<Receiver {self.name!r} {state}>"
