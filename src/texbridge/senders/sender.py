"""Sender: publishes frames under a name through a ring of shared textures (design: docs/senders.md).

The sender owns the slot textures and the control buffer (a 64 KiB memfd published under its name); the handoff
itself (which slot to write, the seqlock, `latest`, the futex wake) is the ring's (ring.RingWriter). Here: the
resources, frame coercion and copies, resize, frame_sync, fps and the metadata thread.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np

from .. import _liveness
from .._client import Session, connect
from .._errors import BrokenError, ClosedError, InvalidArgument, InvalidDescriptor, TexbridgeError
from .._formats import get_format
from .._pixels import suggest, to_format
from .._resources import Resource, check_frame
from .directory import META_KEY
from .frame import check_metadata, realtime_offset_ns
from .ring import MAX_SLOTS, SENDER_CONTROL_SIZE, ControlWords, RingWriter

META_INTERVAL = 0.5  # seconds between metadata pushes (≤ 2 Hz)


class Sender:
    """Publish frames under `name`. `send(frame)` never waits for receivers unless frame_sync=True.

    A ring of `buffers` shared textures in `backend` memory; receivers always get the newest complete frame.
    """

    def __init__(self, name: str, width: int, height: int, format: str = "rgba8", *, backend: str = "memfd",
                 buffers: int = 3, frame_sync: bool = False, session: Session | None = None,
                 app_name: str | None = None, sync_timeout: float = 1.0, bridged: str = "") -> None:
        """bridged: the bridge peer's label when this sender mirrors a remote one (bridges never re-export it)."""
        if not isinstance(buffers, int) or not 2 <= buffers <= MAX_SLOTS:
            raise InvalidDescriptor(f"buffers must be 2..{MAX_SLOTS}, got {buffers!r}")
        get_format(format)  # raises InvalidDescriptor for unknown formats
        self.name, self.backend, self.frame_sync, self.sync_timeout = name, backend, bool(frame_sync), sync_timeout
        self.bridged = bridged
        self._own_session = session is None
        self._session = session or connect(app_name=app_name)
        self._slots: list[Resource] = []
        self._mirror: list[Resource] = []
        self._fps = self._dt = 0.0
        self._last_t = 0.0
        self.sync_timeouts = 0
        self._closed = False
        self._nslots = buffers
        self._meta_dirty = threading.Event()
        self._ctl: ControlWords | None = None
        self._ring: RingWriter | None = None
        self._frame = 0  # the last frame's number, kept here too: it outlives the ring at close()
        try:
            ctl = self._session.create_buffer(SENDER_CONTROL_SIZE, keyed_mutex=True)
            self._ctl = ControlWords(ctl.numpy(), ctl, user_data=True)
            self._ring = RingWriter(self._ctl, buffers, pid=os.getpid(), frame_sync=self.frame_sync)
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
        return self._ring.readers if self._ring and self._ctl else 0

    @property
    def overwrites(self) -> int:
        """Frames written into a slot a receiver had pinned (every slot was pinned)."""
        return self._ring.overwrites if self._ring else 0

    @property
    def closed(self) -> bool:
        return self._closed

    # -- ring -----------------------------------------------------------------------------------------------------------
    def _new_slots(self, backend: str) -> list[Resource]:
        slots: list[Resource] = []
        try:
            for _ in range(self._nslots):
                # Vulkan slots as OPAQUE_FD, which GL and CUDA receivers import too (dma_buf: Vulkan only)
                options = {"memory": "opaque_fd"} if backend == "vulkan" else {}
                slots.append(self._session.create_texture(self._width, self._height, self._format, backend=backend,
                                                          **options))
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
        self._ring.publish_ring(width, height, format, [s.handle.value for s in self._slots])
        for s in old + old_mirror:
            s.close()  # receivers still holding them keep them alive until they follow the new generation

    def _make_mirror(self) -> None:
        """The copy path: memfd twins of the slots for receivers that cannot import `backend` memory."""
        self._mirror = self._new_slots("memfd")
        self._mirror_views = [s.numpy() for s in self._mirror]
        self._ring.publish_mirror([s.handle.value for s in self._mirror])

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
        ring = self._ring
        deadline = time.monotonic() + (self.sync_timeout if timeout is None else timeout)
        while True:
            self._check_open()
            a = ring.ack()
            if ring.all_consumed():
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                self.sync_timeouts += 1
                return False
            ring.wait_ack(a, min(left, 0.05))
            ring.drop_dead_readers(_liveness.alive)

    def wait_for_receivers(self, count: int = 1, timeout: float | None = None) -> bool:
        """Block until at least `count` receivers are attached (futex on the control buffer's ack word)."""
        self._check_open()
        ring = self._ring
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._check_open()  # close() from another thread wakes us
            a = ring.ack()
            if ring.readers >= count:
                return True
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            ring.wait_ack(a, left)

    def _begin(self) -> int:
        if self.frame_sync and self._frame:
            self.wait_frame_sync()
        if self._ring.copy_wanted() and not self._mirror:
            self._make_mirror()
        return self._ring.begin()

    def _end(self, slot: int, ok: bool, timestamp_ns: int, user_data: bytes) -> None:
        ring = self._ring
        if not ok:
            ring.abort(slot)
            return
        self._frame = ring.commit(slot, timestamp_ns=timestamp_ns, realtime_offset_ns=realtime_offset_ns(),
                                  user_data=user_data)
        now = time.monotonic()
        if self._last_t:
            dt = now - self._last_t
            if dt > 0:  # average the interval, not its inverse (1/dt of jittery sleeps overestimates)
                self._dt = dt if not self._dt else 0.9 * self._dt + 0.1 * dt
                self._fps = 1.0 / self._dt
                ring.set_fps(self._fps)
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
        try:
            return check_frame(frame, self._shape, get_format(self._format).numpy_dtype,
                               lambda: f"sender {self.name!r} ({self._width}x{self._height} {self._format})")
        except InvalidArgument as e:
            hint = suggest(frame)
            if not hint:
                raise
            raise InvalidArgument(f"{e}; {hint}") from None

    def send(self, frame: Any, *, timestamp_ns: int | None = None, user_data: bytes | None = None,
             pixel_format: str | None = None) -> int:
        """Publish `frame`: a NumPy array of the sender's shape, a texbridge Resource (GL texture, Vulkan image,
        CUDA array), or a torch/CuPy CUDA array (copied on the GPU into CUDA slots). Returns its frame number.

        timestamp_ns: the capture time on CLOCK_MONOTONIC (time.monotonic_ns()); None = now. user_data: up to
        MAX_USER_DATA (4096) bytes that travel with this frame (Receiver frames' `.user_data`).
        pixel_format: the layout of an array that is not in the sender's own ("rgb8", "bgr8", "rgba8", "bgra8",
        "gray8", "rgbf", "rgbaf", "grayf"): it is converted into the sender's format (rules: docs/senders.md).
        Without it the array must be in the sender's own layout: texbridge never guesses (an (H, W, 3) array
        could be RGB or BGR)."""
        self._check_open()
        meta = check_metadata(timestamp_ns, user_data)
        if pixel_format is not None:
            frame = to_format(frame, pixel_format, get_format(self._format), self._shape,
                              where=f"sender {self.name!r} ({self._width}x{self._height} {self._format})")
        arr = self._coerce(frame)
        slot = self._begin()
        ok = False
        try:
            self._write(slot, arr)
            ok = True
        finally:
            self._end(slot, ok, *meta)
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
    def writing(self, *, timestamp_ns: int | None = None, user_data: bytes | None = None) -> Iterator[np.ndarray]:
        """Zero-copy production: `with sender.writing() as buf: buf[...] = ...` writes straight into the next slot
        (memfd) and publishes it on exit. The buffer holds an older frame's pixels, not zeros. timestamp_ns and
        user_data as for send() (None: the time writing() was entered)."""
        self._check_open()
        self._writing_meta = check_metadata(timestamp_ns, user_data)
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
            meta, self._writing_meta = self._writing_meta, None
            self._end(slot, ok, *meta)

    def set_frame_metadata(self, *, timestamp_ns: int | None = None, user_data: bytes | None = None) -> None:
        """Inside `with sender.writing()`: the timestamp and user data to publish this frame with, for a producer
        that learns them while filling the buffer (the bridge copies a peer's frame, then knows its metadata)."""
        if getattr(self, "_writing_meta", None) is None:
            raise InvalidArgument("set_frame_metadata() belongs inside `with sender.writing()`")
        self._writing_meta = check_metadata(timestamp_ns, user_data)

    # -- metadata -----------------------------------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        return {META_KEY: 1, "app": self._session.app_name, "pid": os.getpid(), "width": self._width,
                "height": self._height, "format": self._format, "backend": self.backend, "fps": round(self._fps, 2),
                "frames": self._frame, "buffers": self._nslots, "frame_sync": self.frame_sync,
                "announced": self._announced} | ({"bridged": self.bridged} if self.bridged else {})

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
        if self._ctl is not None and self._ring is not None:
            self._ring.close()  # closed flag, `latest` parked, waiters woken
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
