"""The GStreamer elements: texbridgesink (a video sink publishing a texbridge sender) and texbridgesrc (a live source
receiving one). Loaded by GStreamer's Python plugin loader through the files `texbridge gst-plugin-path` writes.

Times: GStreamer's default pipeline clock is the system clock on CLOCK_MONOTONIC, the clock texbridge stamps frames
with, so a frame's timestamp_ns is base_time + running time exactly; with any other clock the two are related
through "now" on both clocks. Pixels: one copy each way (the sink copies a mapped buffer into the sender's slot;
the source copies a slot straight into a buffer it allocated).
"""

from __future__ import annotations

import time
from typing import Any

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstBase", "1.0")
gi.require_version("GstVideo", "1.0")
from gi.repository import GLib, GObject, Gst, GstBase, GstVideo  # noqa: E402

import numpy as np  # noqa: E402

import texbridge  # noqa: E402

Gst.init(None)

# GStreamer video format -> (texbridge sender format, pixel_format of the buffer when it is not the sender's own)
SINK_FORMATS = {"RGBA": ("rgba8", None), "BGRA": ("bgra8", None), "RGB": ("rgba8", "rgb8"), "BGR": ("bgra8", "bgr8"),
                "GRAY8": ("r8", None)}
# texbridge sender format -> GStreamer video format (what texbridgesrc outputs, without conversion)
SRC_FORMATS = {"rgba8": "RGBA", "bgra8": "BGRA", "rgba8_srgb": "RGBA", "bgra8_srgb": "BGRA", "r8": "GRAY8",
               "r16": "GRAY16_LE", "rgba16": "RGBA64_LE"}
_SIZE = "width=(int)[1,16384], height=(int)[1,16384], framerate=(fraction)[0/1,2147483647/1]"


def _caps(formats: Any) -> Gst.Caps:
    return Gst.Caps.from_string(f"video/x-raw, format=(string){{ {', '.join(dict.fromkeys(formats))} }}, {_SIZE}")


_RATES = [(24000, 1001), (24, 1), (25, 1), (30000, 1001), (30, 1), (48, 1), (50, 1), (60000, 1001), (60, 1),
          (72, 1), (75, 1), (90, 1), (100, 1), (120, 1), (144, 1), (165, 1), (240, 1)]


def framerate(fps: float) -> tuple[int, int]:
    """A caps framerate for a measured rate: the standard rate within 1.5 %, else whole frames per second (0/1:
    unknown, a variable rate)."""
    if fps <= 0:
        return 0, 1
    for n, d in _RATES:
        if abs(fps - n / d) <= 0.015 * n / d:
            return n, d
    return max(1, round(fps)), 1


def _fail(element: Gst.Element, text: str) -> None:
    """Post an error on the bus (gst-launch prints it and stops): the element's own words, not a traceback."""
    error = GLib.Error.new_literal(Gst.ResourceError.quark(), text, Gst.ResourceError.FAILED)
    element.post_message(Gst.Message.new_error(element, error, text))


def _write(buf: Gst.Buffer, info: GstVideo.VideoInfo, pixels: np.ndarray) -> None:
    """Copy a frame into a buffer laid out as `info` says, or as its video meta says (a pool's padded rows)."""
    meta = GstVideo.buffer_get_video_meta(buf)
    stride = meta.stride[0] if meta else info.stride[0]
    offset = meta.offset[0] if meta else info.offset[0]
    row = pixels.reshape(pixels.shape[0], -1)
    ok, mapped = buf.map(Gst.MapFlags.WRITE)
    if not ok:
        raise texbridge.TexbridgeError("cannot map an output buffer for writing")
    try:
        dst = np.ndarray(row.shape, np.uint8, buffer=mapped.data, offset=offset, strides=(stride, 1))
        np.copyto(dst, row.view(np.uint8))
    finally:
        buf.unmap(mapped)


def _monotonic_clock(clock: Gst.Clock | None) -> bool:
    return isinstance(clock, Gst.SystemClock) and clock.props.clock_type == Gst.ClockType.MONOTONIC


class TexbridgeSink(GstBase.BaseSink):
    """Publish the stream as texbridge sender `sender`; each buffer's time becomes the frame's timestamp_ns."""

    RANK = Gst.Rank.NONE
    __gtype_name__ = "TexbridgeSink"
    __gstmetadata__ = ("texbridge sink", "Sink/Video", "Publishes video as a texbridge sender (shared memory, "
                       "zero-copy for texbridge receivers)", "texbridge")
    __gsttemplates__ = Gst.PadTemplate.new("sink", Gst.PadDirection.SINK, Gst.PadPresence.ALWAYS,
                                           _caps(SINK_FORMATS))
    __gproperties__ = {
        "sender": (str, "Sender name", "Name the frames are published under", "gstreamer",
                   GObject.ParamFlags.READWRITE),
        "buffers": (int, "Ring slots", "Shared textures in the sender's ring", 2, 15, 3, GObject.ParamFlags.READWRITE),
    }

    def __init__(self) -> None:
        super().__init__()
        self.sender_name, self.buffers = "gstreamer", 3
        self._sender: texbridge.Sender | None = None
        self._info: GstVideo.VideoInfo | None = None
        self._pixel_format: str | None = None
        self.set_sync(True)

    def do_get_property(self, prop: Any) -> Any:
        return self.sender_name if prop.name == "sender" else self.buffers

    def do_set_property(self, prop: Any, value: Any) -> None:
        if prop.name == "sender":
            self.sender_name = value
        else:
            self.buffers = value

    def do_set_caps(self, caps: Gst.Caps) -> bool:
        info = GstVideo.VideoInfo.new_from_caps(caps)
        if info is None:
            return False
        fmt, self._pixel_format = SINK_FORMATS[info.finfo.name]
        try:
            if self._sender is None:
                self._sender = texbridge.Sender(self.sender_name, info.width, info.height, fmt, buffers=self.buffers,
                                                app_name="gstreamer")
            else:
                self._sender.resize(info.width, info.height, fmt)  # receivers follow at their next frame
        except texbridge.TexbridgeError as e:
            _fail(self, f"texbridgesink: {e}")
            return False
        self._info = info
        return True

    def _timestamp(self, buf: Gst.Buffer) -> int | None:
        if buf.pts == Gst.CLOCK_TIME_NONE:
            return None
        running = self.segment.to_running_time(Gst.Format.TIME, buf.pts)
        clock = self.get_clock()
        if running == Gst.CLOCK_TIME_NONE or clock is None:
            return None
        at = self.get_base_time() + running  # the buffer's time on the pipeline clock
        if _monotonic_clock(clock):
            return at
        return max(0, time.monotonic_ns() - (clock.get_time() - at))

    def do_render(self, buf: Gst.Buffer) -> Gst.FlowReturn:
        info, sender = self._info, self._sender
        if info is None or sender is None:
            return Gst.FlowReturn.NOT_NEGOTIATED
        meta = GstVideo.buffer_get_video_meta(buf)
        stride = meta.stride[0] if meta else info.stride[0]
        offset = meta.offset[0] if meta else info.offset[0]
        channels = info.finfo.n_components if info.finfo.name != "GRAY8" else 1
        pixel_size = 4 if info.finfo.name in ("RGBA", "BGRA") else channels
        ok, mapped = buf.map(Gst.MapFlags.READ)
        if not ok:
            return Gst.FlowReturn.ERROR
        try:
            shape = (info.height, info.width, pixel_size) if pixel_size > 1 else (info.height, info.width)
            strides = (stride, pixel_size, 1) if pixel_size > 1 else (stride, 1)
            pixels = np.ndarray(shape, np.uint8, buffer=mapped.data, offset=offset, strides=strides)
            sender.send(pixels, timestamp_ns=self._timestamp(buf), pixel_format=self._pixel_format)
        except texbridge.TexbridgeError as e:
            _fail(self, f"texbridgesink: {e}")
            return Gst.FlowReturn.ERROR
        finally:
            buf.unmap(mapped)
        return Gst.FlowReturn.OK

    def do_stop(self) -> bool:
        sender, self._sender = self._sender, None
        if sender is not None:
            sender.close()
        return True


class TexbridgeSrc(GstBase.BaseSrc):
    """A live source of the frames of texbridge sender `sender` (empty: the active sender), following it across
    resizes (new caps) and restarts; buffer times come from the frames' timestamp_ns."""

    RANK = Gst.Rank.NONE
    __gtype_name__ = "TexbridgeSrc"
    __gstmetadata__ = ("texbridge source", "Source/Video", "Receives a texbridge sender's frames (shared memory)",
                       "texbridge")
    __gsttemplates__ = Gst.PadTemplate.new("src", Gst.PadDirection.SRC, Gst.PadPresence.ALWAYS,
                                           _caps(SRC_FORMATS.values()))
    __gproperties__ = {
        "sender": (str, "Sender name", "Sender to receive (empty: the active sender)", "",
                   GObject.ParamFlags.READWRITE),
    }
    _POLL = 0.1  # seconds between checks for flushing while waiting for a frame

    def __init__(self) -> None:
        super().__init__()
        self.sender_name = ""
        self._rx: texbridge.Receiver | None = None
        self._key: tuple[int, int, str] | None = None  # (width, height, format) of the caps set
        self._info: GstVideo.VideoInfo | None = None
        self._pending: Any = None  # the frame the first negotiation waited for, pushed by the first create()
        self._fps = 0.0
        self._unlocked = False
        self._last_pts = -1
        self.set_live(True)
        self.set_format(Gst.Format.TIME)

    def do_get_property(self, prop: Any) -> Any:
        return self.sender_name

    def do_set_property(self, prop: Any, value: Any) -> None:
        self.sender_name = value

    def do_start(self) -> bool:
        try:
            self._rx = texbridge.Receiver(self.sender_name or None, app_name="gstreamer")
        except texbridge.TexbridgeError as e:
            _fail(self, f"texbridgesrc: {e}")
            return False
        self._key, self._last_pts, self._pending = None, -1, None
        return True

    def do_stop(self) -> bool:
        rx, self._rx = self._rx, None
        if rx is not None:
            rx.close()
        return True

    def do_unlock(self) -> bool:
        self._unlocked = True
        return True

    def do_unlock_stop(self) -> bool:
        self._unlocked = False
        return True

    def do_negotiate(self) -> bool:
        """Caps are the first frame's, so the first negotiation waits for it (kept for create()): downstream never
        configures itself, or a buffer pool, for a placeholder size."""
        if self._key is None:
            frame = self._wait_frame(copy=True)
            if frame is None:
                return False
            self._pending = frame
            self._key, self._fps = (frame.width, frame.height, frame.format), self._rx.sender_fps
        if not GstBase.BaseSrc.do_negotiate(self):
            return False
        self._info = GstVideo.VideoInfo.new_from_caps(self._current_caps())
        return True

    def do_decide_allocation(self, query: Gst.Query) -> bool:
        """Downstream's pool, sized for one frame: BaseSrc keeps the size downstream proposed, and pipewiresink
        proposes 0, which PipeWire 0.3.65 turns into buffers without memory (critical warnings, a crash, no frame
        delivered). A source that knows its frame size says it, as videotestsrc does."""
        caps, _ = query.parse_allocation()
        info = GstVideo.VideoInfo.new_from_caps(caps) if caps else None
        if info is not None:
            for i in range(query.get_n_allocation_pools()):
                pool, size, lo, hi = query.parse_nth_allocation_pool(i)
                if size < info.size:
                    query.set_nth_allocation_pool(i, pool, info.size, lo, hi)
        return GstBase.BaseSrc.do_decide_allocation(self, query)

    def do_gst_base_src_query(self, query: Gst.Query) -> bool:  # BaseSrc's query vfunc (Element has one too)
        """Latency as a live video source reports it (v4l2src, videotestsrc): one frame, the time a buffer stamped
        with its capture time takes to be ready, with no upper bound. BaseSrc's default (0, 0) leaves synchronised
        sinks no room for their processing deadline ("Pipeline construction is invalid, please add queues") and makes
        every buffer a little late."""
        if query.type != Gst.QueryType.LATENCY:
            return GstBase.BaseSrc.do_query(self, query)
        frame = int(1e9 * self._info.fps_d / self._info.fps_n) if self._info and self._info.fps_n > 0 else 0
        query.set_latency(True, frame, Gst.CLOCK_TIME_NONE)
        return True

    def _wait_frame(self, copy: bool) -> Any:
        """The next new frame, or None once unlocked (flushing, stopping)."""
        rx = self._rx
        while rx is not None and not self._unlocked:
            frame = rx.next_frame(self._POLL, copy=copy)
            if frame is not None:
                if frame.format not in SRC_FORMATS:
                    _fail(self, f"texbridgesrc: sender format {frame.format} has no raw GStreamer format "
                                f"(supported: {', '.join(SRC_FORMATS)})")
                    return None
                return frame
        return None

    def do_get_caps(self, filter: Gst.Caps | None) -> Gst.Caps:
        caps = self._current_caps() if self._key else self.get_pad_template("src").get_caps()
        return caps.intersect(filter) if filter else caps

    def _current_caps(self) -> Gst.Caps:
        w, h, fmt = self._key  # type: ignore[misc]
        n, d = framerate(self._fps)
        caps = Gst.Caps.from_string(f"video/x-raw, format=(string){SRC_FORMATS[fmt]}, width=(int){w}, "
                                    f"height=(int){h}, framerate=(fraction){n}/{d}")
        if fmt.endswith("_srgb") or fmt in ("rgba8", "bgra8"):
            caps.set_value("colorimetry", "sRGB")
        return caps

    def _pts(self, timestamp_ns: int) -> int:
        clock = self.get_clock()
        if clock is None:
            return Gst.CLOCK_TIME_NONE
        base = self.get_base_time()
        if _monotonic_clock(clock):
            pts = timestamp_ns - base
        else:
            pts = clock.get_time() - base - (time.monotonic_ns() - timestamp_ns)
        pts = max(pts, 0, self._last_pts + 1)  # a frame captured before the pipeline started: its start
        self._last_pts = pts
        return pts

    def do_create(self, offset: int, size: int, buf: Any) -> tuple[Gst.FlowReturn, Gst.Buffer | None]:
        rx = self._rx
        if rx is None:
            return Gst.FlowReturn.FLUSHING, None
        try:
            while True:
                frame, pending, self._pending = self._pending, self._pending is not None, None
                if frame is None:
                    frame = self._wait_frame(copy=False)
                    if frame is None:
                        return (Gst.FlowReturn.FLUSHING if self._unlocked else Gst.FlowReturn.NOT_NEGOTIATED), None
                key = (frame.width, frame.height, frame.format)
                if key != self._key:  # a resize: caps and the allocation (pool) again
                    self._key, self._fps = key, rx.sender_fps
                    if not self.negotiate():
                        return Gst.FlowReturn.NOT_NEGOTIATED, None
                pixels = frame.pixels
                ret, out = GstBase.BaseSrc.do_alloc(self, offset, self._info.size)  # downstream's pool, if any
                if ret != Gst.FlowReturn.OK:
                    return ret, None
                _write(out, self._info, pixels)
                if pending:  # the negotiation's frame: a copy of our own
                    break
                valid = rx.still_valid()  # the pinned slot was not overwritten during the copy
                rx.release()
                if valid:  # else every slot was pinned and the sender overwrote ours: the next frame instead
                    break
        except texbridge.TexbridgeError as e:
            _fail(self, f"texbridgesrc: {e}")
            return Gst.FlowReturn.ERROR, None
        out.pts = self._pts(frame.timestamp_ns)
        out.duration = int(1e9 / self._fps) if self._fps > 0 else Gst.CLOCK_TIME_NONE
        out.offset = frame.frame_number
        return Gst.FlowReturn.OK, out


GObject.type_register(TexbridgeSink)
GObject.type_register(TexbridgeSrc)
