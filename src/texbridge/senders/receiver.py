"""Receiver: the newest frames of a sender, following it across resizes, restarts and broker restarts.

The receiver opens the sender's control buffer and slot textures through its session; the handoff itself (the
reader row, the pin, the seqlock-checked copy, the futex wait) is the ring's (ring.RingReader). Here: finding and
following the sender (directory events), opening slots (and the copy path), and the receive()/wait_frame() API.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import warnings
from collections import deque
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import _liveness
from .._client import Session, connect
from .._errors import (BackendError, ClosedError, InvalidArgument, InvalidDescriptor, KeyedMutexAbandoned,
                       NotASender, NotFound, SenderNotFound, TexbridgeError)
from .._formats import get_format
from .._pixels import from_format, get_layout
from .._memory_types import get_memory_type
from .._resources import Resource
from ._gpu import GPU_BACKENDS, GpuFrames, is_gpu_target
from .directory import SenderEvent, SenderInfo, active_sender, is_sender, list_senders, watch_senders
from .frame import Frame
from .ring import MAX_READERS, READ_ATTEMPTS, SENDER_CONTROL_SIZE, ControlWords, Read, RingReader, Stale


@dataclass
class _Link:
    """A receiver's connection to one sender instance."""

    name: str
    ctl: ControlWords
    ring: RingReader
    handle: int = 0
    generation: int = 0
    slots: list[Resource] = field(default_factory=list)
    views: list[np.ndarray | None] = field(default_factory=list)
    shape: tuple[int, ...] = ()
    dtype: Any = None
    copy_path: bool = False
    cpu_slots: bool = False  # the slots are opened as CPU memory (memfd views) although the receiver is a GPU one


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
    sender raises NotASender (here, or from receive() if the name is taken over later).

    backend="gl" | "vulkan" | "cuda" receives on the GPU: frames are that API's textures (GLResource: .texture,
    .moderngl_texture(ctx); VulkanResource: .image; CUDAResource: DLPack / __cuda_array_interface__), copied on the
    GPU or zero-copy; `gpu_path` says which (see senders/_gpu.py). `context` is the GL context for backend="gl"
    (None: texbridge's headless one; "current" or a moderngl.Context: yours).

    pixel_format="rgb8" | "bgr8" | "rgba8" | "bgra8" | "gray8" | "rgbf" | "rgbaf" | "grayf" | "float32" (NumPy
    receivers): frames arrive converted to that layout, whatever the sender's format (rules: texbridge._pixels,
    docs/senders.md); a conversion is a copy, made inside the slot's seqlock window."""

    def __init__(self, name: str | None = None, *, session: Session | None = None, backend: str | None = None,
                 app_name: str | None = None, require_sender: bool = False, context: Any = None,
                 device: int | None = None, pixel_format: str | None = None) -> None:
        self.requested = name
        self.backend = backend
        self.pixel_format = pixel_format
        if pixel_format is not None:
            get_layout(pixel_format)  # InvalidArgument for an unknown one
            if backend in GPU_BACKENDS:
                raise InvalidArgument(f"pixel_format converts NumPy frames; a backend={backend!r} receiver gives "
                                      "the sender's format as textures")
        self._gpu = GpuFrames(backend, context) if backend in GPU_BACKENDS else None
        self._context = context
        if device is not None and backend != "cuda":
            raise InvalidArgument(f"device= picks the GPU of a CUDA receiver (backend='cuda'), not backend={backend!r}")
        self._device = device  # CUDA: the GPU frames are wanted on; slots on another GPU arrive peer to peer
        self.gpu_path: str | None = None  # GPU receivers: "gpu-copy" | "upload" (and "zero-copy" for copy=False)
        self.gpu_path_reason: str | None = None  # why frames are uploaded rather than copied on the GPU
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
        self._pinned: Read[Any] | None = None  # the last zero-copy read, its slot still pinned
        self._got: Read[Any] | None = None  # the last read: its frame's metadata
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
        return "receiving" if link.ring.newest() else "no_frame"

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
        return link.ring.fps if link else 0.0

    @property
    def width(self) -> int:
        return self._link.shape[1] if self._link and self._link.shape else 0

    @property
    def height(self) -> int:
        return self._link.shape[0] if self._link and self._link.shape else 0

    @property
    def format(self) -> str:
        link = self._link
        return link.ring.format if link else ""

    @property
    def sender_frame(self) -> int:
        """The sender's newest frame number (0 when not connected)."""
        link = self._link
        return link.ring.newest() if link else 0

    @property
    def sent_ns(self) -> int:
        """CLOCK_MONOTONIC time at which the newest frame was published (for latency measurements)."""
        link = self._link
        return link.ring.sent_ns if link else 0

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
                        link.ring.wake()  # a waiter in wait_frame() learns of it now
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
        self._pinned = None
        if link is None:
            return
        try:
            if not link.ctl.closed:
                link.ring.detach()  # a frame_sync sender must not wait for us any more
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
        if not is_sender(summary.get("meta")):
            raise NotASender(_not_a_sender(name, summary, self._session))
        try:
            res = self._session.open(name, backend="memfd")
        except NotFound:
            return False
        if res.descriptor.kind != "buffer" or res.descriptor.size != SENDER_CONTROL_SIZE:  # or another layout
            res.close()
            raise NotASender(_not_a_sender(name, summary, self._session))
        ctl = ControlWords(res.numpy(), res, user_data=True)
        ring = RingReader(ctl)
        if not ring.valid:
            ctl.close()
            raise NotASender(_not_a_sender(name, summary, self._session))
        if ring.closed:
            ctl.close()  # a sender closing right now: its successor (if any) is announced
            return False
        if not self._attach(ctl, ring):
            ctl.close()
            raise TexbridgeError(f"sender {name!r} has {MAX_READERS} receivers attached already")
        self._link = _Link(name, ctl, ring, handle=res.handle.value)
        self._followed = res.handle.value
        try:
            self.info = SenderInfo.from_meta(name, self._session.info(name).get("meta") or {})
        except TexbridgeError:
            self.info = None
        self.frame_number = 0
        return True

    def _attach(self, ctl: ControlWords, ring: RingReader) -> bool:
        """Claim a reader row under the control buffer's keyed mutex (rows of dead receivers are reused)."""
        mutex = ctl.res.mutex
        try:
            mutex.acquire(0, 5.0)
        except KeyedMutexAbandoned:
            pass  # a receiver died attaching; the rows are plain words, nothing to repair
        try:
            return ring.attach(os.getpid(), _liveness.alive)
        finally:
            mutex.release(0)

    def _open_slots(self, link: _Link) -> bool:
        """(Re)open the ring of the sender's current generation; False while it is being rebuilt."""
        layout = link.ring.layout()
        if layout is None:
            return False
        gen, handles, mirror = layout.generation, layout.handles, layout.mirror
        for s in link.slots:
            s.close()
        link.slots, link.views = [], []
        options: dict[str, Any] = {}
        if link.copy_path:
            if not mirror:
                link.ring.request_copy()
                return False
            handles, backend = mirror, "memfd"
        else:
            backend = self.backend
            if self._gpu is not None and not self._gpu_imports(link, handles[0]):
                backend = "memfd"
            elif backend == "gl" and self._context is not None:
                options["context"] = self._context
            elif backend == "cuda" and self._device is not None:
                options["device"] = self._device
        try:
            for h in handles:
                link.slots.append(self._session.open(h, backend=backend, **options))
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
            if self._gpu is not None:
                self.gpu_path, self.gpu_path_reason = "upload", f"the copy path: {self.copy_path_reason}"
            link.ring.request_copy()
            return False
        if self._gpu is not None and not link.cpu_slots and not link.copy_path:
            self.gpu_path, self.gpu_path_reason = "gpu-copy", None
        link.views = [s.numpy() if s.host_visible else None for s in link.slots]
        link.shape = link.slots[0].shape
        link.dtype = get_format(link.slots[0].descriptor.format).numpy_dtype
        link.generation = gen
        return True

    def _gpu_imports(self, link: _Link, handle: int) -> bool:
        """A GPU receiver imports slots into its API unless they are CPU memory: then it maps them and uploads each
        frame from the shared pages (an import would only add a staging copy)."""
        memory = self._session.info(handle).get("memory", "")
        link.cpu_slots = get_memory_type(memory).host_mappable if memory else False
        if link.cpu_slots:
            self.gpu_path = "upload"
            self.gpu_path_reason = (f"the sender's slots are CPU memory ({memory}): each frame is uploaded once "
                                    "from the shared pages")
        return not link.cpu_slots

    def _ensure(self) -> _Link | None:
        if self._closed:
            raise ClosedError("the receiver is closed")
        link = self._link
        if link is not None and (self._gone or link.ring.closed):
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

        A GPU receiver (backend="gl" | "vulkan" | "cuda") returns textures of that API: copy=True (default) a
        receiver-owned texture holding the frame, valid until the next receive() but one (two alternate);
        copy=False the pinned slot itself, zero-copy where the slots import here (else as copy=True; still_valid()
        as for views); out=a texture of that API (a texbridge Resource, for GL also a moderngl texture or a GL
        name) gets the frame by a GPU copy (or an upload, see gpu_path) and is returned.

        On a NumPy receiver, out=a texbridge Resource (a GL texture, Vulkan image or CUDA array of the frame's size
        and format) has the frame uploaded into it when new, and is returned.

        copy=True (default) returns a new array you own. out=array copies into your array (no allocation) when it
        has the frame's shape and dtype, else (after a resize) a new array is returned: compare `frame is out`.
        copy=False returns a read-only view of the shared slot itself: the sender will not write that slot while
        this receiver has it pinned (until the next receive() or release()) unless all slots are pinned, so check
        `still_valid()` after using the view if you must be certain it was not overwritten.
        is_new tells whether it is a frame not returned before."""
        gpu_out = out is not None and self._gpu is not None and is_gpu_target(out, self._gpu.backend)
        if isinstance(out, Resource) and not gpu_out:
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
            ring = link.ring
            if link.generation != ring.generation and not self._open_slots(link):
                return None
            frame = ring.newest()
            if frame == 0:
                return None
            if frame == self.frame_number and self._last is not None and link.generation == ring.generation \
                    and not gpu_out:
                return self._last
            if self._gpu is not None:
                return self._read_gpu(link, copy, out)
            return self._read(link, copy, out)

    def _read_gpu(self, link: _Link, copy: bool, out: Any) -> Any:
        """A frame as a texture of the receiver's API (senders/_gpu.py): the GPU copy or upload runs inside the
        ring's read, so the slot's sequence is re-checked after it completes."""
        gpu = self._gpu
        assert gpu is not None
        fmt = link.ring.format
        zero_copy = not copy and out is None and not link.cpu_slots and not link.copy_path \
            and gpu.can_share(link.slots[0])

        def take(slot: int) -> Any:
            src, view = link.slots[slot], link.views[slot]
            if zero_copy:
                return src
            dst = out if out is not None else gpu.back(src, fmt)
            gpu.fill(dst, src, view, fmt)
            return dst

        for _ in range(READ_ATTEMPTS):
            got = link.ring.read(take, nslots=len(link.slots), generation=link.generation, keep_pin=zero_copy)
            if got is Stale:
                if not self._open_slots(link):
                    return None
                continue
            if got is None:
                return None
            assert isinstance(got, Read)
            self._pinned = got if zero_copy else None
            data = got.data if out is not None or zero_copy else gpu.swap()
            return self._received(got, data)
        return None

    def _received(self, got: Read[Any], data: Any) -> Any:
        if self.frame_number and got.frame > self.frame_number + 1:
            self.frames_dropped += got.frame - self.frame_number - 1
        self.frame_number = got.frame
        self._got = got
        self.frames_received += 1
        self.is_new = True
        self._last = data
        return data

    def _read(self, link: _Link, copy: bool, out: np.ndarray | None) -> np.ndarray | None:
        layout = self.pixel_format
        if layout is not None:
            copy, fmt = True, get_format(link.ring.format)  # a conversion is a copy

        def take(slot: int) -> np.ndarray:
            """Copy (or view) one slot; the ring keeps the result only if no write overlapped."""
            view = link.views[slot]
            if layout is not None:
                return from_format(view if view is not None else link.slots[slot].download(), fmt, layout, out,
                                   f"receiver of {link.name!r}")
            if not copy:
                if view is None:
                    return link.slots[slot].download()
                data = view.view()
                data.flags.writeable = False
                return data
            if out is not None:
                np.copyto(out, view if view is not None else link.slots[slot].download())
                return out
            return view.copy() if view is not None else link.slots[slot].download()

        for _ in range(READ_ATTEMPTS):  # receive() opened the current generation's slots
            if out is not None and layout is None and (out.shape != link.shape or out.dtype != link.dtype):
                out = None  # the sender resized: a new array this time (check `frame is out`)
            got = link.ring.read(take, nslots=len(link.slots), generation=link.generation, keep_pin=not copy)
            if got is Stale:
                if not self._open_slots(link):  # the ring was rebuilt: reopen its slots and read again
                    return None
                continue
            if got is None:
                return None
            assert isinstance(got, Read)
            self._pinned = None if copy else got
            return self._received(got, got.data)
        return None

    # -- frames with their metadata ---------------------------------------------------------------------------------
    def _frame(self, pixels: Any) -> Frame | None:
        got, link = self._got, self._link
        if pixels is None or got is None or link is None:
            return None
        fmt = link.ring.format
        return Frame(pixels, got.frame, got.timestamp_ns, got.realtime_offset_ns, got.user_data, link.shape[1],
                     link.shape[0], fmt, self.pixel_format or fmt, link.name)

    def receive_frame(self, *, copy: bool = True, out: np.ndarray | None = None) -> Frame | None:
        """receive() as a Frame: the newest frame's pixels with its number, timestamp and user data (read under the
        same seqlock as the pixels). None before the first frame / with no sender; `is_new` as for receive()."""
        with self._lock:
            return self._frame(self.receive(copy=copy, out=out))

    def next_frame(self, timeout: float | None = None, *, copy: bool = True,
                   out: np.ndarray | None = None, spin: float = 0.0) -> Frame | None:
        """wait_frame() as a Frame: block until a frame newer than the last one returned (None after `timeout`)."""
        pixels = self.wait_frame(timeout, copy=copy, out=out, spin=spin)
        with self._lock:
            return self._frame(pixels)

    _POLL = 0.25  # how often a blocked iterator notices close() (its futex wait is bounded by this)

    def __iter__(self) -> Iterator[Frame]:
        """`for frame in receiver:` every new frame (skipping those the sender replaced before we looked), following
        the sender across resizes and restarts, until the receiver is closed."""
        while not self._closed:
            try:
                frame = self.next_frame(self._POLL)
            except ClosedError:
                return
            if frame is not None:
                yield frame

    async def frames(self, *, copy: bool = True) -> AsyncIterator[Frame]:
        """`async for frame in receiver.frames():` as iteration, for asyncio programs: the futex wait runs on a
        worker thread of its own, so the event loop never blocks. Ends when the receiver is closed; cancelling the
        consumer leaves the worker to finish its current bounded wait (≤ 0.25 s)."""
        loop = asyncio.get_running_loop()
        worker = ThreadPoolExecutor(1, thread_name_prefix="texbridge-frames")
        try:
            while not self._closed:
                try:
                    frame = await loop.run_in_executor(worker, lambda: self.next_frame(self._POLL, copy=copy))
                except ClosedError:
                    return
                if frame is not None:
                    yield frame
        finally:
            worker.shutdown(wait=False)

    def still_valid(self) -> bool:
        """Whether the zero-copy view from the last receive(copy=False) still holds that frame's pixels."""
        link, pinned = self._link, self._pinned
        if link is None or pinned is None:
            return False
        return link.ring.still_valid(pinned, link.generation)

    def release(self) -> None:
        """Unpin the slot a zero-copy view points into, so the sender may reuse it."""
        link = self._link
        if link is not None:
            link.ring.release()
        self._pinned = None

    def wait_frame(self, timeout: float | None = None, *, copy: bool = True,
                   out: "np.ndarray | Resource | None" = None, spin: float = 0.0) -> Any:
        """Block until a frame newer than the last one returned arrives (or a sender appears and sends one).
        Returns it, or None after `timeout` seconds. Sleeps on a futex: no polling. spin: seconds to spin (GIL
        released, more than one CPU only) before sleeping, for a consumer that knows a frame is due now and cannot
        afford a scheduler wake-up (the bridge's exporter); the spin burns a core while it lasts."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            link = self._ensure()
            if link is None:
                if left is not None and left <= 0:
                    return None
                self._changed.wait(left)  # set by the watch thread when a sender is announced
                continue
            latest = link.ring.latest()
            newest = link.ring.frame_of(latest)
            if newest != self.frame_number and newest:
                frame = self.receive(copy=copy, out=out)
                if frame is not None and self.is_new:
                    return frame
            if left is not None and left <= 0:
                return None
            if self._gone or link.ring.closed:
                continue
            link.ring.wait(latest, left, spin)
            spin = 0.0

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
            self._last = None
            if self._gpu is not None:
                self._gpu.close()
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
