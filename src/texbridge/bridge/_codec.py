"""Pure codecs of the TCP bridge: message headers, frame headers, compression and frame deltas. No IO here.

A TCP link carries length-prefixed messages: an 8-byte header (type u8, 3 bytes zero, length u32 little-endian)
then `length` bytes. Every length is checked against the type's bound *before* anything is allocated; a frame's
bound comes from the format of the reader that will decode it. Frames carry a fixed sub-header, damage rectangles,
user data and a payload whose meaning depends on `kind`:

- KEY: the whole frame (compressed with the link's codec, or raw);
- XOR: the whole frame XOR the stream's previous frame, compressed (lossless; a small change is mostly zeros);
- RECTS: only the damage rectangles' pixels (the writer's, or found by comparing with the previous frame),
  packed row by row in rectangle order, compressed;
- SAME: no payload, the previous frame again (a static sender costs a few bytes per frame).

Decoding checks every rectangle against the stream format and every decompressed size against the exact size the
header implies (lz4 is decompressed into a buffer of that size, a zstd frame must announce it): a compressed bomb
costs at most one frame's bytes. Anything wrong is a BridgePeerError.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import numpy as np

from .._errors import InvalidArgument
from ._link import (MAX_DAMAGE, MAX_MESSAGE, MAX_STREAMS, MAX_USER_DATA, BridgePeerError, FrameMeta,
                    StreamFormat, decode_message, encode_message)

PROTOCOL_VERSION = 1
MAGIC = "texbridge-tcp"

HEADER = struct.Struct("<B3xI")  # type, length

HELLO, AUTH, READY, REFUSE, CTRL, PING, FRAME, RESYNC, ACK = range(1, 10)
MAX_HELLO = 1024
AUTH_SIZE = 32  # an HMAC-SHA256 proof
MAX_LABEL = 128
NONCE_SIZE = 32

# fixed-size messages and upper bounds of the others; FRAME is bounded per stream by frame_bound()
_BOUNDS = {HELLO: MAX_HELLO, AUTH: AUTH_SIZE, READY: 0, REFUSE: MAX_HELLO, CTRL: MAX_MESSAGE, PING: 0, RESYNC: 4,
           ACK: 8}
_EXACT = {AUTH, READY, PING, RESYNC, ACK}
ACK_BODY = struct.Struct("<II")  # stream, frames processed since the last ACK

FRAME_HDR = struct.Struct("<IQqIBBHH")  # stream, frame, timestamp_ns, fmt_tag, codec, kind, n_damage, user_len
RECT = struct.Struct("<4I")
KEY, XOR, RECTS, SAME = range(4)
RAW, LZ4, ZSTD = range(3)
CODEC_NAMES = {"raw": RAW, "lz4": LZ4, "zstd": ZSTD}
MAX_FRAME_EXTRA = FRAME_HDR.size + MAX_DAMAGE * RECT.size + MAX_USER_DATA
ZSTD_LEVEL = 1
ZSTD_MAX_WINDOW = 1 << 24  # a zstd frame asking more memory than this to decode is refused


def available_codecs() -> list[str]:
    """Codec names this process can encode and decode, raw always included (lz4/zstd are optional imports)."""
    names = ["raw"]
    try:
        import lz4.block  # noqa: F401

        names.append("lz4")
    except ImportError:
        pass
    try:
        import zstandard  # noqa: F401

        names.append("zstd")
    except ImportError:
        pass
    return names


def header(kind: int, length: int) -> bytes:
    return HEADER.pack(kind, length)


def check_header(data: bytes | memoryview) -> tuple[int, int]:
    """(type, length) of a message header, the length checked against the type's bound (FRAME: by the caller)."""
    kind, length = HEADER.unpack(data)
    if kind == FRAME:
        if length < FRAME_HDR.size:
            raise BridgePeerError(f"frame message of {length} bytes is shorter than its header")
        return kind, length
    bound = _BOUNDS.get(kind)
    if bound is None:
        raise BridgePeerError(f"unknown message type {kind}")
    if length > bound or (kind in _EXACT and length != bound):
        raise BridgePeerError(f"message type {kind} of {length} bytes (allowed: {bound})")
    return kind, length


pack_ctrl = encode_message  # the one encoding of control messages lives in _link
unpack_map = decode_message


def fmt_tag(fmt: StreamFormat) -> int:
    """A 32-bit fingerprint of a stream format: a frame encoded for another geometry is recognised and skipped."""
    return zlib.crc32(f"{fmt.width}x{fmt.height}:{fmt.format}".encode())


def payload_bound(nbytes: int) -> int:
    """Largest payload a frame of `nbytes` may have on the wire (lz4 and zstd worst cases are below this)."""
    return nbytes + nbytes // 128 + 1024


def compress(codec: int, data: np.ndarray) -> bytes | memoryview:
    if codec == LZ4:
        import lz4.block

        return lz4.block.compress(data, store_size=False)
    if codec == ZSTD:
        return _zstd_c().compress(data)
    return memoryview(data).cast("B")


def decompress(codec: int, data: memoryview, size: int) -> memoryview:
    """Exactly `size` bytes from a payload, never more memory than `size` (a bomb is a BridgePeerError)."""
    if codec == RAW:
        if len(data) != size:
            raise BridgePeerError(f"raw payload of {len(data)} bytes, {size} expected")
        return data
    try:
        if codec == LZ4:
            import lz4.block

            out = lz4.block.decompress(data, uncompressed_size=size)
        elif codec == ZSTD:
            import zstandard

            announced = zstandard.frame_content_size(data)
            if announced != size:
                raise BridgePeerError(f"zstd frame announces {announced} bytes, {size} expected")
            out = _zstd_d().decompress(data, max_output_size=size)
        else:
            raise BridgePeerError(f"unknown codec {codec}")
    except BridgePeerError:
        raise
    except Exception as e:  # lz4/zstd raise their own types on corrupt input
        raise BridgePeerError(f"corrupt compressed payload ({type(e).__name__})") from None
    if len(out) != size:
        raise BridgePeerError(f"payload decompressed to {len(out)} bytes, {size} expected")
    return memoryview(out)


_zstd_cache: dict[str, Any] = {}


def _zstd_c() -> Any:
    c = _zstd_cache.get("c")
    if c is None:
        import zstandard

        c = _zstd_cache["c"] = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
    return c


def _zstd_d() -> Any:
    d = _zstd_cache.get("d")
    if d is None:
        import zstandard

        d = _zstd_cache["d"] = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
    return d


def check_damage(fmt: StreamFormat, damage: tuple[tuple[int, int, int, int], ...]) -> None:
    """Local check of a writer's damage rectangles (InvalidArgument: a bug on this side)."""
    for r in damage:
        if len(r) != 4 or not _rect_ok(fmt, *r):
            raise InvalidArgument(f"damage rectangle {r!r} outside a {fmt.width}x{fmt.height} frame")


def _rect_ok(fmt: StreamFormat, x: int, y: int, w: int, h: int) -> bool:
    return 0 <= x and 0 <= y and 0 < w and 0 < h and x + w <= fmt.width and y + h <= fmt.height


def union_damage(a: tuple | None, b: tuple) -> tuple | None:
    """Damage since the last sent frame: None = whole frame (unknown or too many rectangles)."""
    if a is None or not b:
        return None
    merged = a + tuple(b)
    return merged if len(merged) <= MAX_DAMAGE else None


def pack_frame_header(stream: int, meta: FrameMeta, tag: int, codec: int, kind: int,
                      damage: tuple[tuple[int, int, int, int], ...]) -> bytes:
    user = bytes(meta.user_data)
    if len(user) > MAX_USER_DATA:
        raise InvalidArgument(f"user_data of {len(user)} bytes (at most {MAX_USER_DATA})")
    parts = [FRAME_HDR.pack(stream, meta.frame, meta.timestamp_ns, tag, codec, kind, len(damage), len(user))]
    parts += [RECT.pack(*r) for r in damage]
    parts.append(user)
    return b"".join(parts)


def parse_frame_header(data: memoryview) -> tuple[int, int, int, int, int, int, int, int]:
    """The fixed sub-header, its counts bounded: (stream, frame, ts, tag, codec, kind, n_damage, user_len)."""
    fields = FRAME_HDR.unpack(data)
    stream, _, _, _, codec, kind, n_damage, user_len = fields
    if stream >= MAX_STREAMS:
        raise BridgePeerError(f"stream {stream} (at most {MAX_STREAMS - 1})")
    if codec not in (RAW, LZ4, ZSTD) or kind not in (KEY, XOR, RECTS, SAME):
        raise BridgePeerError(f"frame with codec {codec} kind {kind}")
    if n_damage > MAX_DAMAGE or user_len > MAX_USER_DATA:
        raise BridgePeerError(f"frame with {n_damage} damage rectangles, {user_len} bytes of user data")
    return fields


def parse_damage(fmt: StreamFormat, data: memoryview, n: int) -> tuple[tuple[int, int, int, int], ...]:
    rects = tuple(RECT.unpack_from(data, i * RECT.size) for i in range(n))
    for r in rects:
        if not _rect_ok(fmt, *r):
            raise BridgePeerError(f"damage rectangle {r} outside a {fmt.width}x{fmt.height} frame")
    return rects


def rects_nbytes(fmt: StreamFormat, rects: tuple[tuple[int, int, int, int], ...]) -> int:
    bpp = fmt.row_bytes // fmt.width
    return sum(w * h * bpp for _, _, w, h in rects)


def gather_rects(frame: np.ndarray, fmt: StreamFormat, rects: tuple[tuple[int, int, int, int], ...]) -> np.ndarray:
    """The rectangles' pixels packed one after another (row by row), as one contiguous uint8 array."""
    bpp = fmt.row_bytes // fmt.width
    parts = [frame[y:y + h, x * bpp:(x + w) * bpp].reshape(-1) for x, y, w, h in rects]
    return np.concatenate(parts) if len(parts) > 1 else np.ascontiguousarray(parts[0])


def scatter_rects(frame: np.ndarray, fmt: StreamFormat, rects: tuple[tuple[int, int, int, int], ...],
                  data: memoryview) -> None:
    """Inverse of gather_rects, into `frame` (sizes were checked: len(data) == rects_nbytes)."""
    bpp = fmt.row_bytes // fmt.width
    src = np.frombuffer(data, np.uint8)
    off = 0
    for x, y, w, h in rects:
        n = w * h * bpp
        frame[y:y + h, x * bpp:(x + w) * bpp] = src[off:off + n].reshape(h, w * bpp)
        off += n


def dirty_rects(a: np.ndarray, b: np.ndarray, fmt: StreamFormat, band: int = 64) -> tuple | None:
    """Where frame `a` differs from `b`: () = nowhere, else rectangles (bands of changed rows, each narrowed to its
    changed columns), None = too much to be worth listing (over half the rows, or more than MAX_DAMAGE runs). One pass of compares, no allocation of a
    frame-sized array, so an unchanged or slightly changed frame costs about one memcmp."""
    samples = range(0, fmt.height, max(band, fmt.height // 4 // band * band))
    if len(samples) >= 4 and all(not np.array_equal(a[r:r + band], b[r:r + band]) for r in samples):
        return None  # changed at every sampled band: a moving picture, not worth a compare pass
    runs: list[list[int]] = []
    changed = 0
    for r in range(0, fmt.height, band):
        if not np.array_equal(a[r:r + band], b[r:r + band]):
            changed += band
            if changed > fmt.height // 2 or (len(runs) == MAX_DAMAGE and runs[-1][1] != r):
                return None  # a frame that changed everywhere costs half a compare, not a whole one
            if runs and runs[-1][1] == r:
                runs[-1][1] = min(r + band, fmt.height)
            else:
                runs.append([r, min(r + band, fmt.height)])
    bpp = fmt.row_bytes // fmt.width
    rects = []
    for y0, y1 in runs:
        cols = np.flatnonzero(np.any(a[y0:y1] != b[y0:y1], axis=0))
        rows = np.flatnonzero(np.any(a[y0:y1, cols[0]:cols[-1] + 1] != b[y0:y1, cols[0]:cols[-1] + 1], axis=1))
        x0, x1 = int(cols[0]) // bpp, int(cols[-1]) // bpp + 1
        rects.append((x0, y0 + int(rows[0]), x1 - x0, int(rows[-1]) - int(rows[0]) + 1))
    return tuple(rects)
