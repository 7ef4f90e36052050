"""The slot ring: a sender's control-buffer layout and the whole seqlock/pin handoff, over any writable buffer.

Everything that touches the control words lives here, so the ordering rules can be read (and tested) in one
place: `RingWriter` is the sender's side, `RingReader` a receiver's. Neither knows about brokers, resources or
pixels: a slot is an index, and the caller owns whatever buffer each slot names (shared textures for a Sender,
plain arrays in tests). A bytearray, an mmap or a NumPy array of CONTROL_SIZE bytes is enough to drive both sides.

`FrameSink` / `FrameSource` are the seam for other transports (a VM shared-memory file, TCP): a Sender writes
through a FrameSink, a Receiver reads through a FrameSource, and the memory ring is their first implementation.
See docs/senders.md, "Adding a transport".

Ordering (x86-64 TSO; see docs/senders.md): every control word is an aligned 8-byte load/store made by its own C
call, large copies end with glibc's sfence, and `_fence()` (a full barrier from the C core) separates a store from
a later load where the Dekker pair needs it: reader `pin; fence; read seq`, writer `seq odd; fence; re-read pins`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Generic, NamedTuple, Protocol, TypeVar, runtime_checkable

import numpy as np

from .. import _synccore as _core
from .._errors import ClosedError, InvalidArgument

# -- control buffer layout: u64 words in a 4 KiB page; a Sender's buffer adds each slot's user-data block -------------
CONTROL_SIZE = 4096  # the control page (all the words): enough for a ring without user data (a bridge stream)
MAGIC = 0x54425344_52303031  # "TBSDR001"
VERSION = 2  # 2: per-slot frame metadata (timestamp, realtime offset, user data)
MAX_SLOTS = 15
MAX_READERS = 64
MAX_USER_DATA = 4096  # bytes of user data per frame (the bridge carries the same bound)
_USER_DATA = CONTROL_SIZE  # byte offset of slot 0's user-data block; slot i's is at _USER_DATA + i * MAX_USER_DATA
SENDER_CONTROL_SIZE = _USER_DATA + MAX_SLOTS * MAX_USER_DATA  # 64 KiB: what a Sender publishes
_MAGIC, _VERSION, _HSEQ, _GEN, _WIDTH, _HEIGHT, _NSLOTS, _LATEST = range(8)
_CLOSED, _FPS, _SYNC, _ACK, _PID, _SENT_NS, _MIRROR_GEN, _FMT = range(8, 16)
_HANDLES, _SEQ, _SLOT_FRAME, _MIRROR = 16, 32, 48, 64
TRANSPORT_WORDS = 80  # words 80..127 are left to a transport's own per-stream words (bridge/_shmlayout.py)
# Per-slot frame metadata, written while the slot's sequence is odd and read inside the same seqlock window as the
# pixels: capture time (sender's CLOCK_MONOTONIC ns), CLOCK_REALTIME - CLOCK_MONOTONIC at send, user-data length.
_SLOT_TS, _SLOT_RT, _SLOT_UDLEN = 384, 399, 414  # after the reader rows; up to word 428
_READERS, _READER_WORDS = 128, 4  # per reader: pid, pin mask, consumed frame, flags
_R_PID, _R_PIN, _R_CONSUMED, _R_FLAGS = range(4)
_WANT_COPY = 1
_SLOT_BITS = 4  # latest = frame << 4 | slot; the futex waits on its low 32 bits, which change every frame
_SLOT_MASK = (1 << _SLOT_BITS) - 1  # slot value a closing sender parks `latest` on (no ring slot has it)
READ_ATTEMPTS = 1000  # a reader that loses this many races in a row gives up for now (returns None)

T = TypeVar("T")


# A full memory barrier, where a store must be visible before a later load (pin, then check the slot; mark the slot,
# then check the pins). Bound directly (no Python wrapper): it is on every frame's path.
_fence = _core.fence
_U64 = (1 << 64) - 1


def _bump(u: np.ndarray, index: int, by: int = 1) -> None:
    """Add to a shared word, wrapping silently: across a VM the other side may have left any value in it (NumPy's
    scalar `+= 1` would warn on overflow)."""
    u[index] = (int(u[index]) + by) & _U64


# -- the transport seam -------------------------------------------------------------------------------------------------
class Stale:
    """read() result: the ring was rebuilt (a resize) since the caller opened its slots; reopen and read again."""


class Read(NamedTuple, Generic[T]):
    """One frame a FrameSource read without tearing: `data` is what the copy callback returned for `slot`, and
    `seq` the slot's sequence it was verified against (for still_valid() on zero-copy views). The metadata was read
    under the same sequence check as the pixels, so it belongs to this frame."""

    frame: int
    slot: int
    seq: int
    data: T
    timestamp_ns: int = 0
    realtime_offset_ns: int = 0
    user_data: bytes = b""


@runtime_checkable
class FrameSink(Protocol):
    """The writing side of a frame transport. begin() picks the slot to fill (it never waits for readers), the
    caller fills that slot's storage, then commit() publishes it as the newest frame (or abort() discards it)."""

    @property
    def frame(self) -> int: ...  # number of the last frame committed (0: none yet)

    def begin(self) -> int: ...

    def commit(self, slot: int, *, timestamp_ns: int = 0, realtime_offset_ns: int = 0,
               user_data: bytes = b"") -> int: ...  # returns the new frame number

    def abort(self, slot: int) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class FrameSource(Protocol):
    """The reading side of a frame transport. newest() is the newest complete frame's number (0: none yet);
    latest() a token that changes with every frame and at close, for wait(token, timeout) to sleep on; read()
    calls `copy(slot)` for the newest frame and returns its result only if no write overlapped the copy (Stale:
    the slots were rebuilt since `generation`, reopen them; None: closing, or no untorn copy now)."""

    def newest(self) -> int: ...

    def latest(self) -> int: ...

    def read(self, copy: Callable[[int], T], *, nslots: int, generation: int, keep_pin: bool = False
             ) -> "Read[T] | None | type[Stale]": ...

    def still_valid(self, got: "Read[Any]", generation: int) -> bool: ...

    def release(self) -> None: ...

    def wait(self, seen: int, timeout: float | None, spin: float = 0.0) -> None: ...


# -- the shared words ---------------------------------------------------------------------------------------------------
class _Owner(Protocol):
    closed: bool

    def close(self) -> None: ...


class ControlWords:
    """Views on a control buffer's words (u64 and, for fps, f64), plus futex wait/wake on them.

    `owner` (optional) is what holds the mapping, e.g. the broker resource: wait() refuses once it is closed, and
    close() closes it. The views stay valid after close (they keep the mapping alive), so a thread still inside a
    wait or a read cannot touch unmapped memory. user_data=True: the buffer is a Sender's (SENDER_CONTROL_SIZE
    bytes, the per-slot user-data blocks after the page); else only the page is used and frames carry no user data."""

    def __init__(self, buffer: Any, owner: _Owner | None = None, *, user_data: bool = False) -> None:
        raw = buffer if isinstance(buffer, np.ndarray) else np.frombuffer(buffer, np.uint8)
        size = SENDER_CONTROL_SIZE if user_data else CONTROL_SIZE
        if raw.nbytes < size or raw.dtype != np.uint8 or raw.ndim != 1:
            raise InvalidArgument(f"a control buffer is {size} bytes of uint8, got {raw.dtype} {raw.shape}")
        raw = raw[:size]
        self.user_data = user_data
        self.res: Any = owner  # the Sender's / Receiver's control resource (handle, mutex, publish) or None
        self.raw = raw
        self.u = raw.view(np.uint64)
        self.i = raw.view(np.int64)
        self.f = raw.view(np.float64)
        self.readers = self.u[_READERS:_READERS + MAX_READERS * _READER_WORDS].reshape(MAX_READERS, _READER_WORDS)
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed or (self.res is not None and self.res.closed)

    def wait(self, index: int, expected: int, timeout: float | None, spin: float = 0.0) -> None:
        """Sleep while the low 32 bits of word `index` equal `expected` (they change with every update); spin (GIL
        released) up to `spin` seconds first."""
        if self.closed:
            raise ClosedError("the sender's control buffer is closed (sender or receiver closed while waiting)")
        _core.wait_word(self.raw, index * 8, expected & 0xFFFFFFFF, timeout, spin)

    def wake(self, index: int) -> None:
        _core.wake_word(self.raw, index * 8)

    def close(self) -> None:
        """Drop the owner; wait() refuses from now on."""
        self._closed = True
        if self.res is not None:
            self.res.close()


def _format_word(format: str) -> int:
    return int.from_bytes(format.encode()[:8].ljust(8, b"\0"), "little")


@dataclass(frozen=True)
class RingLayout:
    """What a reader needs to open the slots of one ring generation: their handles (and the copy-path twins')."""

    generation: int
    handles: list[int]
    mirror: list[int]


# -- writer ---------------------------------------------------------------------------------------------------------------
class RingWriter:
    """The sender's side of the memory ring (a FrameSink): picks slots, runs the seqlock, publishes `latest`."""

    def __init__(self, ctl: ControlWords, nslots: int, *, pid: int, frame_sync: bool = False) -> None:
        if not isinstance(nslots, int) or not 2 <= nslots <= MAX_SLOTS:
            raise InvalidArgument(f"a ring has 2..{MAX_SLOTS} slots, got {nslots!r}")
        self.ctl = ctl
        self.u, self.rows = ctl.u, ctl.readers  # bound once: every frame reads them
        self.nslots = nslots
        self.frame = 0
        self.overwrites = 0  # frames written into a slot a receiver had pinned (every slot was pinned)
        self._last = -1  # slot of the latest frame (-1: none in this ring generation)
        u = ctl.u
        u[_MAGIC], u[_VERSION], u[_PID], u[_SYNC] = MAGIC, VERSION, pid, int(frame_sync)

    # -- ring generations ---------------------------------------------------------------------------------------------
    def publish_ring(self, width: int, height: int, format: str, handles: list[int]) -> None:
        """Install a new ring generation (first ring or a resize). Every slot's sequence is bumped before and after,
        so a reader mid-copy of an old slot retries; the header seqlock (HSEQ) lets readers snapshot the handles."""
        if len(handles) != self.nslots:
            raise InvalidArgument(f"{len(handles)} slot handles for a ring of {self.nslots}")
        u, n = self.u, self.nslots
        u[_SEQ:_SEQ + n] += 1  # odd: a receiver mid-copy of an old slot will retry
        _bump(u, _HSEQ)
        for i, h in enumerate(handles):
            u[_HANDLES + i] = h
        u[_WIDTH], u[_HEIGHT], u[_NSLOTS] = width, height, n
        u[_FMT] = _format_word(format)
        u[_SLOT_FRAME:_SLOT_FRAME + MAX_SLOTS] = 0
        u[_MIRROR_GEN] = 0
        _bump(u, _GEN)
        _bump(u, _HSEQ)
        u[_SEQ:_SEQ + n] += 1
        self._last = -1

    def publish_mirror(self, handles: list[int]) -> None:
        """Announce the copy-path twins of the current generation's slots."""
        u = self.u
        for i, h in enumerate(handles):
            u[_MIRROR + i] = h
        u[_MIRROR_GEN] = u[_GEN]

    def copy_wanted(self) -> bool:
        """Some receiver asked for the copy path (it cannot import the slots' memory)."""
        return bool(self.rows[:, _R_FLAGS].any())

    # -- the seqlock --------------------------------------------------------------------------------------------------
    def _pins(self) -> int:
        return int(np.bitwise_or.reduce(self.rows[:, _R_PIN]))

    def begin(self) -> int:
        """The slot to write next, its sequence made odd: the oldest slot that is neither the latest nor pinned by a
        reader. Only when every slot is pinned is the oldest overwritten (counted in `overwrites`)."""
        u, n, last = self.u, self.nslots, self._last
        pinned = self._pins()
        for k in range(1, n):
            cand = (last + k) % n
            if (pinned >> cand) & 1:
                continue
            _bump(u, _SEQ + cand)  # odd: writing
            _fence()
            # Dekker with the reader (pin, fence, read seq): either it sees the odd seq, or we see its pin.
            pinned = self._pins()
            if not (pinned >> cand) & 1:
                return cand
            _bump(u, _SEQ + cand, -1)  # pinned meanwhile: untouched, restore the exact even value it read
        slot = (last + 1) % n  # every slot is pinned: overwrite the oldest; its readers see the seq move
        self.overwrites += 1
        _bump(u, _SEQ + slot)
        return slot

    def commit(self, slot: int, *, timestamp_ns: int = 0, realtime_offset_ns: int = 0, user_data: bytes = b"") -> int:
        """Publish the slot begun last as the next frame: its metadata and slot frame (the sequence still odd, so a
        reader never pairs them with other pixels), sequence even, then `latest`, then wake. user_data: at most
        MAX_USER_DATA bytes (the Sender checks; here it is cut to the block), and only in a buffer that has them."""
        u = self.u
        n = min(len(user_data), MAX_USER_DATA)
        if n and not self.ctl.user_data:
            raise InvalidArgument("this ring's control buffer has no user-data blocks (ControlWords(user_data=True))")
        if n:
            base = _USER_DATA + slot * MAX_USER_DATA
            self.ctl.raw[base:base + n] = np.frombuffer(user_data, np.uint8, n)
        u[_SLOT_UDLEN + slot] = n
        i = self.ctl.i
        i[_SLOT_TS + slot] = timestamp_ns
        i[_SLOT_RT + slot] = realtime_offset_ns
        self.frame += 1
        u[_SLOT_FRAME + slot] = self.frame
        _bump(u, _SEQ + slot)  # even: complete
        u[_SENT_NS] = time.monotonic_ns()
        u[_LATEST] = (self.frame << _SLOT_BITS) | slot
        self._last = slot
        self.ctl.wake(_LATEST)
        return self.frame

    def abort(self, slot: int) -> None:
        """The write failed: the slot holds no frame (and its sequence moved, so no reader keeps a half copy)."""
        u = self.u
        u[_SLOT_FRAME + slot] = 0
        _bump(u, _SEQ + slot)

    def set_fps(self, fps: float) -> None:
        self.ctl.f[_FPS] = fps

    def close(self) -> None:
        """Tell readers the sender is gone: the closed flag, then `latest` parked on a slot no ring has (its low 32
        bits change, so a reader about to sleep on the old value cannot miss the wake), then the wakes."""
        u = self.u
        u[_CLOSED] = 1
        u[_LATEST] = (self.frame << _SLOT_BITS) | _SLOT_MASK
        self.ctl.wake(_LATEST)
        self.ctl.wake(_ACK)

    # -- readers, seen from the writer ---------------------------------------------------------------------------------
    @property
    def readers(self) -> int:
        """Readers attached now."""
        return int(np.count_nonzero(self.rows[:, _R_PID]))

    def ack(self) -> int:
        """The ack word's value now: pass it to wait_ack() after checking the condition (no missed wake)."""
        return int(self.u[_ACK])

    def wait_ack(self, seen: int, timeout: float | None) -> None:
        """Sleep until a reader attaches, detaches or consumes a frame (frame_sync), or `timeout`."""
        self.ctl.wait(_ACK, seen, timeout)

    def all_consumed(self) -> bool:
        """Every attached reader has consumed the last frame committed (frame_sync)."""
        r = self.rows
        active = r[:, _R_PID] != 0
        return not active.any() or bool((r[active, _R_CONSUMED] >= self.frame).all())

    def drop_dead_readers(self, alive: Callable[[int], bool]) -> None:
        """Free the rows of readers behind on the last frame whose process died without detaching."""
        r = self.rows
        for i in np.flatnonzero(r[:, _R_PID] != 0):
            if r[i, _R_CONSUMED] < self.frame and not alive(int(r[i, _R_PID])):
                r[i] = 0


# -- reader ---------------------------------------------------------------------------------------------------------------
class RingReader:
    """A receiver's side of the memory ring (a FrameSource): one reader row, the pin, the seqlock-checked read."""

    def __init__(self, ctl: ControlWords) -> None:
        self.ctl = ctl
        self.u, self.rows = ctl.u, ctl.readers  # bound once: every frame reads them
        self.row = -1

    # -- the header -----------------------------------------------------------------------------------------------------
    @property
    def valid(self) -> bool:
        """The buffer holds a sender's control words (magic)."""
        return int(self.u[_MAGIC]) == MAGIC

    @property
    def closed(self) -> bool:
        """The sender closed (or is closing)."""
        return int(self.u[_CLOSED]) != 0

    @property
    def generation(self) -> int:
        return int(self.u[_GEN])

    @property
    def format(self) -> str:
        return int(self.u[_FMT]).to_bytes(8, "little").rstrip(b"\0").decode()

    @property
    def version(self) -> int:
        return int(self.u[_VERSION])

    @property
    def fps(self) -> float:
        return float(self.ctl.f[_FPS])

    @property
    def sent_ns(self) -> int:
        return int(self.u[_SENT_NS])

    def latest(self) -> int:
        """The raw `latest` word (frame << 4 | slot): what wait() compares against."""
        return int(self.u[_LATEST])

    def newest(self) -> int:
        """The newest complete frame's number (0: none yet)."""
        return self.frame_of(int(self.u[_LATEST]))

    @staticmethod
    def frame_of(latest: int) -> int:
        """The frame number a latest() token names."""
        return latest >> _SLOT_BITS

    def layout(self) -> RingLayout | None:
        """A consistent snapshot of the current generation's slot handles; None while the sender rebuilds it."""
        u = self.ctl.u
        h1 = int(u[_HSEQ])
        if h1 & 1:
            return None
        gen, n = int(u[_GEN]), int(u[_NSLOTS])
        handles = [int(x) for x in u[_HANDLES:_HANDLES + n]]
        mirror = [int(x) for x in u[_MIRROR:_MIRROR + n]] if int(u[_MIRROR_GEN]) == gen else []
        if int(u[_HSEQ]) != h1:
            return None
        return RingLayout(gen, handles, mirror)

    # -- the reader row -------------------------------------------------------------------------------------------------
    def attach(self, pid: int, alive: Callable[[int], bool]) -> bool:
        """Claim a free reader row (rows of dead readers are reused); False when all MAX_READERS are taken. Callers
        serialize attaches between processes (a Receiver holds the control buffer's keyed mutex)."""
        ctl = self.ctl
        r = ctl.readers
        for i in range(MAX_READERS):
            row_pid = int(r[i, _R_PID])
            if row_pid == 0 or not alive(row_pid):
                r[i, _R_PIN] = r[i, _R_FLAGS] = 0
                r[i, _R_CONSUMED] = 0
                r[i, _R_PID] = pid
                _bump(ctl.u, _ACK)
                ctl.wake(_ACK)  # wait_for_receivers()
                self.row = i
                return True
        return False

    def detach(self) -> None:
        """Free the row; a frame_sync sender waiting for this reader stops waiting."""
        if self.row >= 0:
            self.rows[self.row] = 0
            self.ctl.wake(_ACK)
            self.row = -1

    def request_copy(self) -> None:
        """Ask the sender for memfd twins of its slots (this reader cannot import their memory)."""
        self.rows[self.row, _R_FLAGS] = _WANT_COPY

    # -- reading -----------------------------------------------------------------------------------------------------------
    def read(self, copy: Callable[[int], T], *, nslots: int, generation: int, keep_pin: bool = False
             ) -> Read[T] | None | type[Stale]:
        """The newest frame, copied by `copy(slot)` and kept only if no write overlapped the copy.

        Pin the latest slot, fence, read its sequence (odd or holding another frame: retry), copy, re-read the
        sequence: a move means the copy may be torn, so it is dropped and the (newer) latest is tried. keep_pin
        leaves the slot pinned (a zero-copy view: release() unpins). Stale: the ring was rebuilt since
        `generation` (whose `nslots` slots the caller opened). None: the sender is closing, or every attempt lost."""
        u, rows, row = self.u, self.rows, self.row
        i, raw, has_user_data = self.ctl.i, self.ctl.raw, self.ctl.user_data
        for _ in range(READ_ATTEMPTS):
            if int(u[_GEN]) != generation:
                return Stale
            latest = int(u[_LATEST])
            frame, slot = latest >> _SLOT_BITS, latest & _SLOT_MASK
            if frame == 0:
                return None  # nothing sent yet
            if slot >= nslots:
                return None  # the sender is closing (it parks `latest` on slot _SLOT_MASK)
            rows[row, _R_PIN] = 1 << slot
            _fence()  # the pin must be visible before we read the seq (see RingWriter.begin)
            s1 = int(u[_SEQ + slot])
            if s1 & 1 or int(u[_SLOT_FRAME + slot]) != frame:
                continue
            data = copy(slot)
            # The metadata inside the same window: a sender's length word is untrusted, so the read is clamped to
            # the slot's block.
            n = min(int(u[_SLOT_UDLEN + slot]), MAX_USER_DATA) if has_user_data else 0
            base = _USER_DATA + slot * MAX_USER_DATA
            user_data = raw[base:base + n].tobytes() if n else b""
            ts, rt = int(i[_SLOT_TS + slot]), int(i[_SLOT_RT + slot])
            if int(u[_SEQ + slot]) != s1 or int(u[_GEN]) != generation:
                continue  # overwritten while we copied: the next attempt takes the (newer) latest
            if not keep_pin:
                rows[row, _R_PIN] = 0
            rows[row, _R_CONSUMED] = frame
            if int(u[_SYNC]):
                _bump(u, _ACK)
                self.ctl.wake(_ACK)
            return Read(frame, slot, s1, data, ts, rt, user_data)
        return None

    def pin(self, slot: int) -> int:
        """Pin `slot` and return its sequence, read after a fence (the Dekker pair with RingWriter.begin): for a
        transport that follows a slot still being written (chunked progress); release() unpins."""
        self.rows[self.row, _R_PIN] = 1 << slot
        _fence()
        return int(self.u[_SEQ + slot])

    def sequence(self, slot: int) -> int:
        return int(self.u[_SEQ + slot])

    def still_valid(self, got: Read[Any], generation: int) -> bool:
        """Whether the slot a kept-pin read returned still holds that frame (its sequence did not move)."""
        return int(self.u[_SEQ + got.slot]) == got.seq and int(self.u[_GEN]) == generation

    def release(self) -> None:
        """Unpin: the sender may reuse the slot."""
        self.rows[self.row, _R_PIN] = 0

    def wait(self, seen: int, timeout: float | None, spin: float = 0.0) -> None:
        """Sleep (futex) while `latest` still equals `seen` (a latest() value), or until `timeout`; spin up to
        `spin` seconds first (a frame is due: a spinner sees it at once, a sleeper after a scheduler wake-up)."""
        self.ctl.wait(_LATEST, seen, timeout, spin)

    def wake(self) -> None:
        """Wake this ring's waiters (wait_frame() threads), e.g. when the sender is known to be gone."""
        self.ctl.wake(_LATEST)
