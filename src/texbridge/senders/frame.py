"""Frame: one received frame with its metadata, usable wherever an array is (np.asarray, np.from_dlpack, torch).

Times: `timestamp_ns` is the sender's capture time on its CLOCK_MONOTONIC (time.monotonic_ns() at send(), unless
the sender passed its own), and `realtime_offset_ns` the sender's CLOCK_REALTIME - CLOCK_MONOTONIC when it sent, so
`realtime_ns` places the frame on the wall clock another machine can compare with its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._errors import InvalidArgument
from .ring import MAX_USER_DATA


def realtime_offset_ns() -> int:
    """CLOCK_REALTIME - CLOCK_MONOTONIC now, in ns: add it to a monotonic time to get wall-clock time."""
    return time.time_ns() - time.monotonic_ns()


def check_metadata(timestamp_ns: Any, user_data: Any) -> tuple[int, bytes]:
    """The (timestamp_ns, user_data) a send() was given, checked: None = now / no data; InvalidArgument for a
    timestamp that is not an int in [0, 2**63) or user data that is not bytes-like or longer than MAX_USER_DATA."""
    if timestamp_ns is None:
        ts = time.monotonic_ns()
    elif isinstance(timestamp_ns, (int, np.integer)) and not isinstance(timestamp_ns, bool) \
            and 0 <= int(timestamp_ns) < 1 << 63:
        ts = int(timestamp_ns)
    else:
        raise InvalidArgument(f"timestamp_ns must be an int in [0, 2**63) (CLOCK_MONOTONIC ns), got "
                              f"{timestamp_ns!r:.60}")
    if user_data is None:
        return ts, b""
    if isinstance(user_data, str):
        raise InvalidArgument("user_data takes bytes, not str: encode it (e.g. text.encode())")
    try:
        data = bytes(memoryview(user_data).cast("B"))
    except TypeError:
        raise InvalidArgument(f"user_data takes bytes-like data, got {type(user_data).__name__}") from None
    if len(data) > MAX_USER_DATA:
        raise InvalidArgument(f"user_data is {len(data)} bytes; a frame carries at most {MAX_USER_DATA}")
    return ts, data


@dataclass(frozen=True, eq=False, slots=True)
class Frame:
    """A received frame. `pixels` is a NumPy array (H, W, C): a copy you own, or with copy=False a read-only view of
    the sender's slot (valid while pinned: see Receiver.still_valid()). `format` is the sender's pixel format and
    `pixel_format` the layout of `pixels` (the same unless the receiver asked for a conversion)."""

    pixels: Any
    frame_number: int
    timestamp_ns: int
    realtime_offset_ns: int
    user_data: bytes
    width: int
    height: int
    format: str
    pixel_format: str
    sender: str

    @property
    def realtime_ns(self) -> int:
        """The capture time on the sender's wall clock (CLOCK_REALTIME ns)."""
        return self.timestamp_ns + self.realtime_offset_ns

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.pixels.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.pixels.dtype

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        """np.asarray(frame) is `pixels` itself (no copy); np.array(frame) a copy."""
        arr = np.asarray(self.pixels)
        if dtype is not None and np.dtype(dtype) != arr.dtype:
            if copy is False:
                raise ValueError(f"a {arr.dtype} frame has no zero-copy {np.dtype(dtype)} view")
            return arr.astype(dtype)
        return arr.copy() if copy else arr

    def __dlpack__(self, **kwargs: Any) -> Any:
        """DLPack export of `pixels` (CPU; a read-only view is flagged read-only, DLPack 1.0)."""
        return np.asarray(self.pixels).__dlpack__(**kwargs)

    def __dlpack_device__(self) -> tuple[int, int]:
        return np.asarray(self.pixels).__dlpack_device__()

    def __repr__(self) -> str:
        extra = f" user_data={len(self.user_data)}B" if self.user_data else ""
        return (f"<Frame {self.frame_number} of {self.sender!r} {self.width}x{self.height} {self.pixel_format} "
                f"t={self.timestamp_ns}ns{extra}>")
