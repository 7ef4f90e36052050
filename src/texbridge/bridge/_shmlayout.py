"""The shared file's layout (pure: offsets, words, the control-message ring), so both ends compute the same map.

Everything is a function of the file's size (the header's SIZE word): no offset is ever read from the peer, so the
only layout value to validate is that size. All words are aligned little-endian u64, each written by one side only:

    header page          MAGIC, VERSION, SESSION (nonzero, new at every (re)init), SIZE      written by the server
    side 0 (serve), side 1 (join), each:
      side page          BEAT (+1 every ≤ 250 ms), SESSION (the session this side serves/joined), PID, CLOSING,
                         HEAD (bytes written into this side's ring), TAIL (bytes consumed of the *peer's* ring),
                         BELL (bumped and futex-woken at every message/begin/commit: a same-kernel peer sleeps on it),
                         LABEL (u8 length + UTF-8)                                            written by that side
      message ring       RING_SIZE bytes: records [u64 length][msgpack, padded to 8] that side produces
      stream table       MAX_STREAMS entries of CONTROL_SIZE: a senders.ring control page per stream that side writes
                         (reader rows in it are written by the peer: the ring's pin rules)
    frame area 0, 1      the rest, halved: slots of the streams side 0 / side 1 writes; a slot is META_SIZE bytes
                         of frame meta, then the pixel rows, padded to a page

A stream's control page is `senders.ring`'s (same seqlock, pins, `latest`), with the slot *handles* holding slot
offsets inside the writer's frame area; words in the ring's transport range carry the stream number and the slot
being written (for chunked progress).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..senders.ring import CONTROL_SIZE, TRANSPORT_WORDS
from ._link import (MAX_DAMAGE, MAX_MESSAGE, MAX_STREAMS, MAX_USER_DATA, BridgePeerError, StreamFormat,
                    decode_message, encode_message)

PAGE = 4096
MAGIC = int.from_bytes(b"TBBRIDGE", "little")
VERSION = 1
H_MAGIC, H_VERSION, H_SESSION, H_SIZE = range(4)

# side page words
S_BEAT, S_SESSION, S_PID, S_CLOSING = range(4)
S_HEAD, S_TAIL = 8, 16  # separate cache lines: HEAD is this side's producer word, TAIL its consumer word
S_BELL = 24  # doorbell: bumped (and futex-woken) at every message, frame begun, frame committed; a hint only
S_LABEL = 256  # byte offset: u8 length + up to LABEL_MAX bytes of UTF-8
LABEL_MAX = 63

RING_SIZE = 256 * 1024
TABLE_SIZE = MAX_STREAMS * CONTROL_SIZE
SIDE_SIZE = PAGE + RING_SIZE + TABLE_SIZE
FRAMES = PAGE + 2 * SIDE_SIZE  # first byte of frame area 0
MIN_AREA = 1 << 20
MIN_SIZE = FRAMES + 2 * MIN_AREA
MAX_SIZE = 1 << 40

# stream control page: words in the ring's transport range
C_STREAM = TRANSPORT_WORDS  # stream number + 1 (0: entry free)
C_WRITING = TRANSPORT_WORDS + 1  # (begin count << 4) | slot being written, 0: none (for chunked progress)

# slot meta block (at the slot's start), u64 words then arrays
META_SIZE = 2 * PAGE
M_PROGRESS, M_TIMESTAMP, M_NDAMAGE, M_ULEN = range(4)
M_DAMAGE = 64  # byte offset: MAX_DAMAGE x (x, y, w, h) u32
M_USER = M_DAMAGE + MAX_DAMAGE * 16  # byte offset: user data
MIN_SLOTS, DEFAULT_SLOTS = 3, 3


def pad8(n: int) -> int:
    return (n + 7) & ~7


def round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def slot_stride(fmt: StreamFormat) -> int:
    """Bytes one slot of `fmt` takes in a frame area: the meta block, then the rows padded to a page."""
    return META_SIZE + round_up(fmt.nbytes, PAGE)


def stream_bytes(fmt: StreamFormat, nslots: int = DEFAULT_SLOTS) -> int:
    return nslots * slot_stride(fmt)


@dataclass(frozen=True, slots=True)
class Layout:
    """Byte offsets of everything, from the file size alone."""

    size: int
    area_size: int  # bytes of each direction's frame area

    @classmethod
    def for_size(cls, size: int) -> "Layout":
        return cls(size, (size - FRAMES) // 2 // PAGE * PAGE)

    @staticmethod
    def side(side: int) -> int:
        return PAGE + side * SIDE_SIZE

    @classmethod
    def ring(cls, side: int) -> int:
        return cls.side(side) + PAGE

    @classmethod
    def table(cls, side: int) -> int:
        return cls.side(side) + PAGE + RING_SIZE

    def area(self, side: int) -> int:
        return FRAMES + side * self.area_size


def size_needed(area_bytes: int) -> int:
    """File size whose per-direction frame area holds `area_bytes`."""
    return FRAMES + 2 * round_up(max(area_bytes, MIN_AREA), PAGE)


# -- the control-message ring: one producer (its side), one consumer (the peer) ----------------------------------------
encode, decode = encode_message, decode_message  # the one encoding of control messages lives in _link


class RingProducer:
    """Our side's ring: records go in at `head` (kept locally, published to our HEAD word); the peer's TAIL word
    says how far it has read, and is checked (never behind its last value, never past head)."""

    def __init__(self, data: np.ndarray, head: np.ndarray, tail: np.ndarray) -> None:
        self.data, self.headw, self.tailw = data, head, tail  # headw/tailw: 1-word u64 views
        self.cap = data.nbytes
        self.head = 0
        self.tail = 0

    def try_push(self, payload: bytes) -> bool:
        tail = int(self.tailw[0])
        if tail < self.tail or tail > self.head:
            raise BridgePeerError(f"message ring tail {tail} outside [{self.tail}, {self.head}]")
        self.tail = tail
        n = 8 + pad8(len(payload))
        if self.head + n - tail > self.cap:
            return False
        pos = self.head % self.cap
        self.data[pos:pos + 8].view(np.uint64)[0] = len(payload)
        self._put((pos + 8) % self.cap, payload)
        self.head += n
        self.headw[0] = self.head  # after the record (x86-64 TSO keeps the stores in order)
        return True

    def _put(self, pos: int, payload: bytes) -> None:
        src = np.frombuffer(payload, np.uint8)
        first = min(len(src), self.cap - pos)
        self.data[pos:pos + first] = src[:first]
        if first < len(src):
            self.data[:len(src) - first] = src[first:]

    @property
    def empty(self) -> bool:
        return int(self.tailw[0]) == self.head


class RingConsumer:
    """The peer's ring, read from our `tail` (kept locally, published to our TAIL word). The peer's HEAD word is
    checked (never behind its last value, never more than a ring ahead) and so is every record length."""

    def __init__(self, data: np.ndarray, head: np.ndarray, tail: np.ndarray) -> None:
        self.data, self.headw, self.tailw = data, head, tail
        self.cap = data.nbytes
        self.tail = 0
        self.head = 0

    def pending(self) -> bool:
        return int(self.headw[0]) != self.tail

    def pop_all(self, limit: int = 1024) -> list[bytes]:
        head = int(self.headw[0])
        if head < self.head or head - self.tail > self.cap:
            raise BridgePeerError(f"message ring head {head} outside [{self.head}, {self.tail + self.cap}]")
        self.head = head
        out: list[bytes] = []
        while head - self.tail >= 8 and len(out) < limit:
            pos = self.tail % self.cap
            length = int(self.data[pos:pos + 8].view(np.uint64)[0])
            if not 0 < length <= MAX_MESSAGE or 8 + pad8(length) > head - self.tail:
                raise BridgePeerError(f"message record of {length} bytes (max {MAX_MESSAGE}, "
                                      f"{head - self.tail - 8} written)")
            out.append(self._get((pos + 8) % self.cap, length))
            self.tail += 8 + pad8(length)
        if head - self.tail and head - self.tail < 8:
            raise BridgePeerError("message ring holds a partial record")
        self.tailw[0] = self.tail
        return out

    def _get(self, pos: int, length: int) -> bytes:
        first = min(length, self.cap - pos)
        if first == length:
            return self.data[pos:pos + length].tobytes()
        return self.data[pos:pos + first].tobytes() + self.data[:length - first].tobytes()


# -- labels ----------------------------------------------------------------------------------------------------------
def write_label(page: np.ndarray, label: str) -> None:
    raw = label.encode()[:LABEL_MAX]
    page[S_LABEL + 1:S_LABEL + 1 + len(raw)] = np.frombuffer(raw, np.uint8)
    page[S_LABEL] = len(raw)


def read_label(page: np.ndarray) -> str:
    raw = page[S_LABEL:S_LABEL + 1 + LABEL_MAX].tobytes()  # one copy, then only the copy is used
    return raw[1:1 + min(raw[0], LABEL_MAX)].decode(errors="replace")


# -- frame meta inside a slot ---------------------------------------------------------------------------------------
META_USED = M_USER + MAX_USER_DATA
