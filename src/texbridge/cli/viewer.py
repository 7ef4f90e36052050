"""`texbridge view` and `texbridge send-test`: a GLFW window showing a sender live, and an animated test pattern.

The overlay text uses a built-in 5x7 bitmap font rendered with NumPy, so the viewer needs nothing beyond GLFW and
PyOpenGL (no font library, no pygame). The same font stamps the frame counter into the test pattern.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import numpy as np

from .._errors import BackendError, SenderNotFound, TexbridgeTimeout

# -- 5x7 bitmap font: 7 rows of 5 bits per glyph, MSB = leftmost column --------------------------------------------
_GLYPHS = {
    "0": (0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E), "1": (0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E),
    "2": (0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F), "3": (0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E),
    "4": (0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02), "5": (0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E),
    "6": (0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E), "7": (0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08),
    "8": (0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E), "9": (0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C),
    "A": (0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11), "B": (0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E),
    "C": (0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E), "D": (0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C),
    "E": (0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F), "F": (0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10),
    "G": (0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F), "H": (0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11),
    "I": (0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E), "J": (0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C),
    "K": (0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11), "L": (0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F),
    "M": (0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11), "N": (0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11),
    "O": (0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E), "P": (0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10),
    "Q": (0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D), "R": (0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11),
    "S": (0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E), "T": (0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04),
    "U": (0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E), "V": (0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04),
    "W": (0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A), "X": (0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11),
    "Y": (0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04), "Z": (0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F),
    " ": (0,) * 7, ".": (0, 0, 0, 0, 0, 0x0C, 0x0C), ":": (0, 0x0C, 0x0C, 0, 0x0C, 0x0C, 0),
    "-": (0, 0, 0, 0x1F, 0, 0, 0), "/": (0, 0x01, 0x02, 0x04, 0x08, 0x10, 0), "_": (0, 0, 0, 0, 0, 0, 0x1F),
    "#": (0x0A, 0x0A, 0x1F, 0x0A, 0x1F, 0x0A, 0x0A), "(": (0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02),
    ")": (0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08), "%": (0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03),
    "|": (0x04,) * 7, "?": (0x0E, 0x11, 0x01, 0x02, 0x04, 0, 0x04), "'": (0x04, 0x04, 0, 0, 0, 0, 0),
    ",": (0, 0, 0, 0, 0x0C, 0x04, 0x08),
}
_BITMAPS = {ch: ((np.array(rows, np.uint8)[:, None] >> np.arange(4, -1, -1)) & 1).astype(bool)
            for ch, rows in _GLYPHS.items()}


def text_mask(text: str, scale: int = 2) -> np.ndarray:
    """A boolean (7*scale, 6*scale*len) mask of `text` in the 5x7 font (lowercase drawn as capitals)."""
    cells = [np.pad(_BITMAPS.get(ch, _BITMAPS["?"]), ((0, 0), (0, 1))) for ch in text.upper()] or [np.zeros((7, 1), bool)]
    mask = np.hstack(cells)
    return mask.repeat(scale, 0).repeat(scale, 1)


def draw_text(img: np.ndarray, text: str, x: int, y: int, color: Any, scale: int = 2) -> None:
    """Stamp `text` into an (H, W, C) image at (x, y), clipped to the image."""
    mask = text_mask(text, scale)
    h, w = img.shape[:2]
    mh, mw = min(mask.shape[0], h - y), min(mask.shape[1], w - x)
    if mh > 0 and mw > 0:
        img[y:y + mh, x:x + mw][mask[:mh, :mw]] = color


# -- test pattern --------------------------------------------------------------------------------------------------------
class TestPattern:
    """A moving gradient with colour bars, a sweeping box and the frame counter, cheap enough for 60 fps at 1080p:
    the gradient is precomputed twice as wide and sliced, so each frame is one copy plus small stamps."""

    BARS = np.array([(255, 255, 255), (255, 255, 0), (0, 255, 255), (0, 255, 0), (255, 0, 255), (255, 0, 0),
                     (0, 0, 255), (0, 0, 0)], np.uint8)

    def __init__(self, width: int, height: int, name: str = "") -> None:
        self.width, self.height, self.name = width, height, name
        x = np.arange(2 * width) / width
        y = np.arange(height)[:, None] / max(1, height - 1)
        base = np.empty((height, 2 * width, 4), np.uint8)
        base[..., 0] = (127.5 + 127.5 * np.sin(2 * np.pi * x))[None, :]
        base[..., 1] = (255 * y).astype(np.uint8)
        base[..., 2] = (127.5 + 127.5 * np.cos(2 * np.pi * x))[None, :]
        base[..., 3] = 255
        self._base = base
        bar_h = max(1, height // 8)
        self._bars = np.empty((bar_h, width, 4), np.uint8)
        self._bars[..., :3] = self.BARS[(np.arange(width) * len(self.BARS)) // width][None, :, :]
        self._bars[..., 3] = 255

    def render(self, frame: int, out: np.ndarray) -> None:
        w, h = self.width, self.height
        shift = (frame * 4) % w
        out[...] = self._base[:, shift:shift + w]
        out[h - self._bars.shape[0]:] = self._bars
        box = max(8, h // 10)
        bx = int((w - box) * (0.5 + 0.5 * np.sin(frame / 30.0)))
        by = (h - box) // 2
        out[by:by + box, bx:bx + box, :3] = 255
        scale = max(2, h // 90)
        label = f"{self.name}  #{frame}" if self.name else f"#{frame}"
        draw_text(out, label, scale * 4, scale * 4, (0, 0, 0, 255), scale)
        draw_text(out, label, scale * 4 - scale // 2 - 1, scale * 4 - scale // 2 - 1, (255, 255, 255, 255), scale)


def send_test(name: str, width: int, height: int, fps: float, frames: int | None, backend: str,
              on_frame: Any = None) -> int:
    """Publish the test pattern under `name` until Ctrl-C (or `frames`). Returns the frames sent."""
    from ..senders import Sender

    pattern = TestPattern(width, height, name)
    period = 1.0 / fps if fps > 0 else 0.0
    with Sender(name, width, height, "rgba8", backend=backend, app_name="texbridge send-test") as sender:
        start = time.monotonic()
        try:
            while frames is None or sender.frame_number < frames:
                with sender.writing() as buf:
                    pattern.render(sender.frame_number + 1, buf)
                if on_frame is not None:
                    on_frame(sender)
                if period:
                    delay = start + sender.frame_number * period - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    elif delay < -1.0:
                        start = time.monotonic() - sender.frame_number * period  # fell behind: don't burst
        except KeyboardInterrupt:
            pass
        return sender.frame_number


# -- viewer ----------------------------------------------------------------------------------------------------------------
def _to_rgba8(frame: np.ndarray, fmt: str) -> tuple[np.ndarray, bool]:
    """Frame → (uint8 RGBA-or-BGRA array, is_bgra) for glTexImage2D."""
    if frame.dtype == np.uint8 and frame.shape[-1] == 4:
        return frame, fmt.startswith("bgra")
    if frame.dtype == np.uint16:
        return (frame >> 8).astype(np.uint8), False
    if frame.dtype.kind == "f":
        return (np.clip(frame, 0, 1) * 255).astype(np.uint8), False
    raise BackendError(f"the viewer cannot show {fmt} frames yet")


class Viewer:
    """One window following one receiver. Esc or Q quits, O toggles the overlay."""

    def __init__(self, name: str | None, *, overlay: bool = True, size: tuple[int, int] | None = None,
                 title: str = "texbridge view") -> None:
        if "PYOPENGL_PLATFORM" not in os.environ and os.environ.get("DISPLAY"):
            os.environ["PYOPENGL_PLATFORM"] = "glx"  # GLFW's X11 windows use GLX contexts
        try:
            import glfw
            from OpenGL import GL
        except ImportError as e:
            raise BackendError(f"the viewer needs glfw and PyOpenGL: {e}") from e
        from ..senders import Receiver

        self.glfw, self.GL = glfw, GL
        self.receiver = Receiver(name, app_name="texbridge view")  # NotASender here: before any window exists
        if not glfw.init():
            self.receiver.close()
            raise BackendError("GLFW could not initialise (no display? set DISPLAY, or run under Xvfb)")
        self.overlay = overlay
        self.first = self.receiver.wait_frame(2.0)
        w, h = size or self._initial_size()
        glfw.window_hint(glfw.RESIZABLE, True)
        self.window = glfw.create_window(w, h, title, None, None)
        if not self.window:
            self.receiver.close()
            glfw.terminate()
            raise BackendError("GLFW could not create a window (no OpenGL visual on this display?)")
        glfw.make_context_current(self.window)
        glfw.swap_interval(1)
        glfw.set_key_callback(self.window, self._on_key)
        self.tex = GL.glGenTextures(1)
        self.text_tex = GL.glGenTextures(1)
        for t in (self.tex, self.text_tex):
            GL.glBindTexture(GL.GL_TEXTURE_2D, t)
            GL.glTexParameteri(GL.GL_TEXTURE_2D, GL.GL_TEXTURE_MIN_FILTER, GL.GL_NEAREST)
            GL.glTexParameteri(GL.GL_TEXTURE_2D, GL.GL_TEXTURE_MAG_FILTER, GL.GL_NEAREST)
            GL.glTexParameteri(GL.GL_TEXTURE_2D, GL.GL_TEXTURE_WRAP_S, GL.GL_CLAMP_TO_EDGE)
            GL.glTexParameteri(GL.GL_TEXTURE_2D, GL.GL_TEXTURE_WRAP_T, GL.GL_CLAMP_TO_EDGE)
        self.tex_shape: tuple[int, int] | None = None
        self.text_shape = (0, 0)
        self.text = ""
        self.text_at = 0.0
        self.shown = 0  # new frames displayed
        self.display_fps = 0.0
        self._last_swap = 0.0
        if self.first is not None:
            self._upload(self.first)

    def _initial_size(self) -> tuple[int, int]:
        r = self.receiver
        if not r.width:
            return 640, 360
        w, h = r.width, r.height
        scale = min(1.0, 1280 / w, 720 / h)
        return max(160, int(w * scale)), max(90, int(h * scale))

    def _on_key(self, window: Any, key: int, scancode: int, action: int, mods: int) -> None:
        glfw = self.glfw
        if action != glfw.PRESS:
            return
        if key in (glfw.KEY_ESCAPE, glfw.KEY_Q):
            glfw.set_window_should_close(window, True)
        elif key == glfw.KEY_O:
            self.overlay = not self.overlay

    def _upload(self, frame: np.ndarray) -> None:
        GL = self.GL
        data, bgra = _to_rgba8(frame, self.receiver.format)
        data = np.ascontiguousarray(data)
        h, w = data.shape[:2]
        GL.glBindTexture(GL.GL_TEXTURE_2D, self.tex)
        GL.glPixelStorei(GL.GL_UNPACK_ALIGNMENT, 1)
        src = GL.GL_BGRA if bgra else GL.GL_RGBA
        if self.tex_shape != (w, h):
            GL.glTexImage2D(GL.GL_TEXTURE_2D, 0, GL.GL_RGBA8, w, h, 0, src, GL.GL_UNSIGNED_BYTE, data)
            self.tex_shape = (w, h)
        else:
            GL.glTexSubImage2D(GL.GL_TEXTURE_2D, 0, 0, 0, w, h, src, GL.GL_UNSIGNED_BYTE, data)

    def _overlay_text(self) -> str:
        r = self.receiver
        if not r.connected:
            return f"{r.name or 'active sender'}: waiting for a sender..."
        return (f"{r.name}  {r.width}x{r.height} {r.format}  {r.sender_fps:.1f} fps  frame {r.frame_number}"
                f"  (view {self.display_fps:.0f} fps, dropped {r.frames_dropped})")

    def _update_text(self) -> None:
        now = time.monotonic()
        if now - self.text_at < 0.25 and self.text:
            return
        self.text_at = now
        text = self._overlay_text()
        if text == self.text:
            return
        self.text = text
        mask = text_mask(text, 2)
        img = np.zeros((mask.shape[0] + 8, mask.shape[1] + 12, 4), np.uint8)
        img[..., 3] = 160
        img[4:4 + mask.shape[0], 6:6 + mask.shape[1]][mask] = (255, 255, 255, 255)
        GL = self.GL
        GL.glBindTexture(GL.GL_TEXTURE_2D, self.text_tex)
        GL.glPixelStorei(GL.GL_UNPACK_ALIGNMENT, 1)
        GL.glTexImage2D(GL.GL_TEXTURE_2D, 0, GL.GL_RGBA8, img.shape[1], img.shape[0], 0, GL.GL_RGBA,
                        GL.GL_UNSIGNED_BYTE, img)
        self.text_shape = (img.shape[1], img.shape[0])

    @staticmethod
    def _quad(GL: Any, x0: float, y0: float, x1: float, y1: float) -> None:
        """A textured quad in window pixels, y down; texture row 0 (the image's top) at y0."""
        GL.glBegin(GL.GL_QUADS)
        for (tx, ty), (x, y) in (((0, 0), (x0, y0)), ((1, 0), (x1, y0)), ((1, 1), (x1, y1)), ((0, 1), (x0, y1))):
            GL.glTexCoord2f(tx, ty)
            GL.glVertex2f(x, y)
        GL.glEnd()

    def draw(self) -> None:
        GL = self.GL
        fw, fh = self.glfw.get_framebuffer_size(self.window)
        GL.glViewport(0, 0, fw, fh)
        GL.glMatrixMode(GL.GL_PROJECTION)
        GL.glLoadIdentity()
        GL.glOrtho(0, fw, fh, 0, -1, 1)
        GL.glMatrixMode(GL.GL_MODELVIEW)
        GL.glLoadIdentity()
        GL.glClearColor(0.08, 0.08, 0.1, 1)
        GL.glClear(GL.GL_COLOR_BUFFER_BIT)
        GL.glEnable(GL.GL_TEXTURE_2D)
        GL.glTexEnvi(GL.GL_TEXTURE_ENV, GL.GL_TEXTURE_ENV_MODE, GL.GL_REPLACE)
        if self.tex_shape and self.receiver.connected:
            tw, th = self.tex_shape
            scale = min(fw / tw, fh / th)  # letterbox, keeping the aspect ratio
            dw, dh = tw * scale, th * scale
            x0, y0 = (fw - dw) / 2, (fh - dh) / 2
            GL.glDisable(GL.GL_BLEND)
            GL.glBindTexture(GL.GL_TEXTURE_2D, self.tex)
            self._quad(GL, x0, y0, x0 + dw, y0 + dh)
        if self.overlay or not self.receiver.connected:
            self._update_text()
            GL.glEnable(GL.GL_BLEND)
            GL.glBlendFunc(GL.GL_SRC_ALPHA, GL.GL_ONE_MINUS_SRC_ALPHA)
            GL.glBindTexture(GL.GL_TEXTURE_2D, self.text_tex)
            w, h = self.text_shape
            self._quad(GL, 0, 0, w, h)
            GL.glDisable(GL.GL_BLEND)
        GL.glDisable(GL.GL_TEXTURE_2D)

    def screenshot(self) -> np.ndarray:
        """The window's pixels as (H, W, 4) uint8, top row first."""
        GL = self.GL
        fw, fh = self.glfw.get_framebuffer_size(self.window)
        GL.glPixelStorei(GL.GL_PACK_ALIGNMENT, 1)
        GL.glReadBuffer(GL.GL_BACK)
        raw = GL.glReadPixels(0, 0, fw, fh, GL.GL_RGBA, GL.GL_UNSIGNED_BYTE)
        return np.frombuffer(raw, np.uint8).reshape(fh, fw, 4)[::-1].copy()

    def run(self, *, frames: int | None = None, screenshot: str | None = None, timeout: float | None = None,
            notify: Callable[[str], None] | None = None) -> int:
        """Show frames until the window closes, or until `frames` new frames were shown (then save `screenshot`).
        Returns 0; after `timeout` seconds raises SenderNotFound (no sender ever connected) or TexbridgeTimeout
        (fewer than `frames`, or without --frames none at all). `notify` hears when the viewer waits for a sender
        and when it connects, so a missing sender is never waited for silently."""
        glfw = self.glfw
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.first is not None:
            self.shown = 1
        waiting = False
        try:
            while not glfw.window_should_close(self.window):
                if notify is not None and (self.receiver.status == "no_sender") != waiting:
                    waiting = not waiting
                    notify(self._waiting_message() if waiting else f"showing sender {self.receiver.name!r}")
                frame = self.receiver.wait_frame(1 / 240)
                if frame is not None:
                    self._upload(frame)
                    self.shown += 1
                self.draw()
                done = frames is not None and self.shown >= frames
                if done and screenshot:
                    save_image(screenshot, self.screenshot())
                glfw.swap_buffers(self.window)
                now = time.monotonic()
                if self._last_swap:
                    dt = now - self._last_swap
                    self.display_fps = 1 / dt if not self.display_fps else 0.9 * self.display_fps + 0.1 / dt
                self._last_swap = now
                glfw.poll_events()
                if done:
                    return 0
                if deadline is not None and now > deadline:
                    if frames is None and self.shown:
                        return 0
                    self._give_up(timeout, frames)
        except KeyboardInterrupt:
            pass
        return 0

    def _live(self) -> str:
        from ..senders import list_senders

        return ", ".join(repr(i.name) for i in list_senders(self.receiver._session)) or "none"

    def _waiting_message(self) -> str:
        who = f"sender {self.receiver.requested!r}" if self.receiver.requested else "a sender"
        return f"waiting for {who} to appear (live senders: {self._live()}; Esc or Ctrl-C to stop)"

    def _give_up(self, timeout: float | None, frames: int | None) -> None:
        r = self.receiver
        if r.status == "no_sender":
            who = f"named {r.requested!r}" if r.requested else "at all"
            raise SenderNotFound(f"no sender {who} appeared within {timeout:g} s (live senders: {self._live()}): "
                                 "start it, or check the name with `texbridge senders`")
        want = f"{frames} frame(s)" if frames is not None else "a frame"
        raise TexbridgeTimeout(f"{r.name!r} is connected but sent only {self.shown} of {want} within {timeout:g} s "
                               f"(status: {r.status})")

    def close(self) -> None:
        try:
            self.receiver.close()
        finally:
            if self.window:
                self.glfw.destroy_window(self.window)
                self.window = None
            self.glfw.terminate()


def save_image(path: str, img: np.ndarray) -> None:
    """.npy keeps every byte (tests), .png is a PNG (RGB, written with zlib: no imaging library needed), anything
    else a binary PPM (RGB)."""
    if path.endswith(".npy"):
        np.save(path, img)
        return
    rgb = np.ascontiguousarray(img[..., :3])
    if path.lower().endswith(".png"):
        import struct
        import zlib

        def chunk(kind: bytes, body: bytes) -> bytes:
            return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

        rows = np.concatenate([np.zeros((rgb.shape[0], 1), np.uint8), rgb.reshape(rgb.shape[0], -1)], axis=1)
        header = struct.pack(">IIBBBBB", rgb.shape[1], rgb.shape[0], 8, 2, 0, 0, 0)
        with open(path, "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
                    + chunk(b"IEND", b""))
        return
    with open(path, "wb") as f:
        f.write(b"P6\n%d %d\n255\n" % (img.shape[1], img.shape[0]))
        f.write(np.ascontiguousarray(img[..., :3]).tobytes())


def view(name: str | None, *, overlay: bool = True, size: tuple[int, int] | None = None,
         frames: int | None = None, screenshot: str | None = None, timeout: float | None = None,
         notify: Callable[[str], None] | None = None) -> int:
    v = Viewer(name, overlay=overlay, size=size)
    try:
        return v.run(frames=frames, screenshot=screenshot, timeout=timeout, notify=notify)
    finally:
        v.close()


__all__ = ["TestPattern", "Viewer", "draw_text", "save_image", "send_test", "text_mask", "view"]
