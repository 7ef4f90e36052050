"""The seam between the bridge engine and a transport: what one end of a bridge link offers.

A *link* joins two bridge ends (two namespaces, a VM guest and its host, two hosts). It carries two things:
control messages (small msgpack-able dicts, reliable and in order: announce, retire, keyed-mutex traffic) and
frames of numbered *streams* (newest frame wins; a reader may skip frames, never sees a torn one). The engine
(`_engine.py`) knows senders, receivers and keyed mutexes and nothing of bytes on a wire; a transport
(`_shmfile.py`: a shared file QEMU maps into a guest; `_tcp.py`: sockets) knows bytes and nothing of senders.

Everything a transport reads from its peer is untrusted: a transport checks every offset, length, count and
dimension before use and turns a malformed peer into `BridgePeerError` (the link is then dead; the engine drops
that peer's mirrors and the transport may reconnect). No peer input may crash, hang or grow memory unbounded.

How the engine uses a link (what a transport must allow):
- Threads: the engine's main thread calls send/receive/wait/open_reader and every StreamReader; each outgoing
  stream has its own thread calling its StreamWriter (and send()/open_writer() when that stream is resized). So
  send() and open_writer() must be safe from any thread; one StreamWriter/StreamReader is used by one thread.
- Stream numbers are per direction (0..MAX_STREAMS-1) and chosen by the writing side. The engine opens a writer,
  then announces the stream by a control message; the peer opens its reader when that message arrives, so frames
  may arrive before any reader exists (keep the newest or drop them: never an error). A number is reused only
  after the peer said it closed its reader (a control message), and open_writer() starts the stream afresh: a
  reader opened after it never sees an earlier writer's frame.
- FrameMeta.frame rises within a stream (the engine numbers frames; read(after=0) on a fresh reader).
  user_data (≤ MAX_USER_DATA) must arrive with its frame: keyed-mutex transfers carry key and private data there.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, TypeVar, runtime_checkable

import msgpack
import numpy as np

from .._errors import InvalidArgument, TexbridgeError
from .._formats import get_format

T = TypeVar("T")

MAX_MESSAGE = 64 * 1024  # bytes of one encoded control message
MAX_STREAMS = 64  # streams one peer may have open at once (per direction)
MAX_DAMAGE = 64  # damage rectangles per frame (Looking Glass's KVMFR limit); more = whole frame
MAX_USER_DATA = 4096  # bytes of per-frame user data
MAX_DIMENSION = 16384  # widest/tallest frame a peer may announce
HEARTBEAT_S = 0.25  # each end shows it is alive at least this often
PEER_TIMEOUT_S = 1.0  # silent this long = dead
FOLLOW_MIN_BYTES = 256 * 1024  # a smaller frame is copied out once committed: following its rows costs more than it saves


class BridgeError(TexbridgeError):
    """A bridge link could not be made or used (no peer, file too small, wrong secret, link down)."""

    code = "bridge"


class BridgePeerError(BridgeError):
    """The peer broke the bridge protocol (bad offset, length, count, dimension, magic...): its session ends."""

    code = "bridge_peer"


class BridgeAuthError(BridgeError):
    """The peer did not prove it knows the shared secret (or we could not prove it to the peer)."""

    code = "bridge_auth"


def encode_message(message: dict[str, Any]) -> bytes:
    """A control message's bytes, for every transport; one that is not a dict, not msgpack-able or larger than
    MAX_MESSAGE is this side's bug (InvalidArgument), never sent."""
    if not isinstance(message, dict):
        raise InvalidArgument(f"a control message is a dict, not {type(message).__name__}")
    try:
        data = msgpack.packb(message, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise InvalidArgument(f"control message not msgpack-able: {e}") from None
    if len(data) > MAX_MESSAGE:
        raise InvalidArgument(f"control message of {len(data)} bytes (at most {MAX_MESSAGE})")
    return data


def decode_message(data: bytes | memoryview, what: str = "control message") -> dict[str, Any]:
    """A msgpack map from the peer (bounded: the caller checked len(data)); anything else is a BridgePeerError.
    Map keys must be strings or bytes (strict_map_key): a peer cannot make us hash arbitrary objects."""
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several builtin types on garbage: all are the peer's fault
        raise BridgePeerError(f"{what}: not msgpack ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise BridgePeerError(f"{what}: expected a map, got {type(obj).__name__}")
    return obj


SPIN_MIN_S, SPIN_MAX_S = 30e-6, 250e-6  # half-width of the spin window around a periodic stream's next frame ...
SPIN_SHARE = 0.05  # ... and at most this share of its period (two windows per frame: ≤ 10 % of a core per thread)


def _spin_default() -> bool:
    """Spin windows need a core to spare: on a machine of 1-3 CPUs the spinner takes the core the sender or the
    receiver needs (measured on 2 cores: slower, not faster). TEXBRIDGE_BRIDGE_SPIN=1/0 forces them on/off."""
    forced = os.environ.get("TEXBRIDGE_BRIDGE_SPIN", "")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        return len(os.sched_getaffinity(0)) >= 4
    except (AttributeError, OSError):
        return (os.cpu_count() or 1) >= 4


SPIN_WINDOWS = _spin_default()


class Cadence:
    """When a periodic stream's next frame is due here, so the thread waiting for it sleeps until just before and
    spins across it: a sleeper pays a scheduler wake-up per frame (tens of microseconds, more from a deep idle
    state, the bulk of the bridge's added latency), a spinner none. The frames' own times (`event`: any clock with
    a steady offset to ours, e.g. the sender's wall clock) give the period; the least recent transit (arrival -
    event) maps them to our clock, so a frame seen late (from a sleep) does not drag the window late. No window for
    an irregular stream (too few frames within ±50 % of the period) or a period over a second, nor on a machine
    without a core to spare (SPIN_WINDOWS); the window is 2 x (SPIN_MIN_S + 3 x jitter + transit spread), capped
    by SPIN_MAX_S and SPIN_SHARE of the period."""

    __slots__ = ("last", "dt", "jitter", "regular", "transit")

    def __init__(self) -> None:
        self.last: float | None = None
        self.dt = self.jitter = 0.0
        self.regular = 0
        self.transit: deque[float] = deque(maxlen=32)

    def tick(self, event: float, arrival: float) -> None:
        if self.last is not None:
            d = event - self.last
            if self.dt and 0.5 * self.dt < d < 1.5 * self.dt:
                self.jitter += (abs(d - self.dt) - self.jitter) / 8
                self.dt += (d - self.dt) / 8
                self.regular += 1
            else:  # the first interval, a pause, a skipped frame, a new rate: learn afresh
                self.dt, self.jitter, self.regular = max(d, 0.0), 0.0, 0
        self.last = event
        self.transit.append(arrival - event)

    def window(self, now: float) -> tuple[float, float] | None:
        """(start, end) on time.monotonic() of the spin window around the next frame; None: just sleep."""
        if not SPIN_WINDOWS or self.regular < 8 or self.last is None or not 0 < self.dt <= 1.0:
            return None
        transit = sorted(self.transit)
        fastest = transit[0]
        margin = min(SPIN_MAX_S, SPIN_SHARE * self.dt,
                     SPIN_MIN_S + 3 * self.jitter + (transit[len(transit) // 2] - fastest))
        due = self.last + self.dt + fastest
        if now > due + margin:
            return None  # late (skipped, or the sender paused): no spinning until it comes
        return due - margin, due + margin


@dataclass(frozen=True, slots=True)
class StreamFormat:
    """Geometry of one stream's frames: packed rows of `width * bytes_per_pixel` bytes, `height` rows."""

    width: int
    height: int
    format: str
    row_bytes: int = field(init=False, repr=False, compare=False)  # computed once: read on every frame's path
    nbytes: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        bpp = get_format(self.format).bytes_per_pixel  # raises InvalidArgument for an unknown format
        if not (0 < self.width <= MAX_DIMENSION and 0 < self.height <= MAX_DIMENSION):
            raise InvalidArgument(f"stream size {self.width}x{self.height} outside 1..{MAX_DIMENSION}")
        object.__setattr__(self, "row_bytes", self.width * bpp)
        object.__setattr__(self, "nbytes", self.width * bpp * self.height)


@dataclass(frozen=True, slots=True)
class FrameMeta:
    """What travels with a frame besides its pixels. damage: (x, y, w, h) rectangles changed since the stream's
    previous frame, () = the whole frame. Timestamps are the sender's clocks (the peer's clock differs)."""

    frame: int
    timestamp_ns: int = 0
    damage: tuple[tuple[int, int, int, int], ...] = ()
    user_data: bytes = b""


@runtime_checkable
class StreamWriter(Protocol):
    """One outgoing stream. begin() gives the (height, row_bytes) uint8 array to fill (never waits for readers);
    progress(rows) may tell a reader that rows [0, rows) are final while the rest is still being written;
    commit(meta) publishes it as the newest frame, abort() discards it; close() retires the stream."""

    def begin(self) -> np.ndarray: ...

    def progress(self, rows: int) -> None: ...

    def commit(self, meta: FrameMeta) -> None: ...

    def abort(self) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class StreamReader(Protocol):
    """One incoming stream. read(copy, after) calls copy(view, meta) for the newest frame numbered above `after`
    and returns its result only if the frame was not overwritten during the copy (else retries, then None).
    `view` is a read-only (height, row_bytes) uint8 array valid only inside the call. None: nothing newer."""

    def read(self, copy: Callable[[np.ndarray, FrameMeta], T], after: int) -> T | None: ...

    def close(self) -> None: ...


def read_into(reader: StreamReader, out: np.ndarray, after: int) -> FrameMeta | None:
    """Copy the newest frame above `after` into `out` ((height, row_bytes) uint8), as read() would with a copying
    callback. A transport with chunked progress (the shared file: its readers have a `read_into` method) overlaps
    this copy with the peer's write, row chunks as the writer marks them final. `out` is undefined on None."""
    chunked = getattr(reader, "read_into", None)
    if chunked is not None:
        return chunked(out, after)
    return reader.read(lambda view, meta: (np.copyto(out, view), meta)[1], after)


@dataclass(slots=True)
class LinkStats:
    """Counters a transport keeps for `texbridge bridge status`."""

    peer_label: str = ""
    alive: bool = False
    frames_out: int = 0
    frames_in: int = 0
    bytes_out: int = 0  # on the wire / into the file, after compression
    bytes_in: int = 0
    drops: int = 0  # frames replaced by a newer one before they were read/sent
    errors: list[str] = field(default_factory=list)  # last few peer errors, newest last


@runtime_checkable
class Link(Protocol):
    """One end of an established bridge link. send()/receive() carry control messages (dicts of msgpack types,
    ≤ MAX_MESSAGE encoded); open_writer/open_reader give a numbered stream's ends (the engine agrees on numbers
    and formats through control messages first). wait() sleeps until something may have arrived (a futex is
    impossible across a VM: shared-file links poll, spin first then short sleeps); its `spin` is the engine's hint
    that a frame is due now (spin that long before sleeping; a transport may ignore it). Raises BridgeError once
    dead."""

    @property
    def peer_label(self) -> str: ...

    @property
    def alive(self) -> bool: ...

    def send(self, message: dict[str, Any]) -> None: ...

    def receive(self) -> list[dict[str, Any]]: ...

    def open_writer(self, stream: int, fmt: StreamFormat) -> StreamWriter: ...

    def open_reader(self, stream: int, fmt: StreamFormat) -> StreamReader: ...

    def wait(self, timeout: float, spin: float = 0.0) -> None: ...

    def stats(self) -> LinkStats: ...

    def close(self) -> None: ...


@runtime_checkable
class Endpoint(Protocol):
    """How an end finds its peer, for the engine's (re)connect loop: establish(timeout) waits up to `timeout` for
    the peer and returns a fresh Link, or None if it has not come (yet). After a link dies the engine calls it
    again (with backoff); a serving end re-initialises (a new session id) so a restarted peer joins cleanly.
    Transports: `_shmfile` (serve: create/size the file; join: a path or the guest's ivshmem BAR), `_tcp`
    (serve: listen; join: connect). `describe()` is a one-line text for logs and status."""

    def establish(self, timeout: float) -> Link | None: ...

    def describe(self) -> str: ...

    def close(self) -> None: ...


class Backoff:
    """Delays between establish() attempts after a link died or a peer was absent: doubling from `first` up to
    `cap`, ±20 % jitter so two ends do not retry in lockstep; reset() once a link worked. The cap stays small: a
    restarted peer must be back within 2 s, and establish() itself waits for the peer meanwhile."""

    def __init__(self, first: float = 0.05, cap: float = 0.5) -> None:
        self.first, self.cap = first, cap
        self._next = first

    def next(self) -> float:
        import random

        delay = self._next
        self._next = min(self.cap, self._next * 2)
        return delay * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self._next = self.first
