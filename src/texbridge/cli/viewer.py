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

    def __init__(self, width: int, height: int, name: str = "", bgra: bool = False) -> None:
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
        if bgra:  # the same picture in B, G, R, A byte order (the box and the text are grey: the same either way)
            self._base[..., :3] = self._base[..., 2::-1].copy()
            self._bars[..., :3] = self._bars[..., 2::-1].copy()

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
              on_frame: Any = None, fmt: str = "rgba8") -> int:
    """Publish the test pattern under `name` (format rgba8 or bgra8) until Ctrl-C (or `frames`). Returns the frames
    sent."""
    from ..senders import Sender

    pattern = TestPattern(width, height, name, bgra=fmt == "bgra8")
    period = 1.0 / fps if fps > 0 else 0.0
    with Sender(name, width, height, fmt, backend=backend, app_name="texbridge send-test") as sender:
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


LINE_GAP = 4  # pixels between overlay lines and around the bar's text


def wrap_items(items: list[str], max_chars: int) -> list[str]:
    """Greedy line wrap of overlay items (joined by two spaces), never splitting an item unless it alone is too long."""
    lines: list[str] = []
    for item in items:
        while len(item) > max_chars:
            if lines and not lines[-1]:
                lines.pop()
            lines.append(item[:max_chars])
            item = item[max_chars:]
        if lines and len(lines[-1]) + 2 + len(item) <= max_chars:
            lines[-1] += "  " + item
        else:
            lines.append(item)
    return lines


def overlay_layout(lines_items: list[list[str]], window: tuple[int, int], image: tuple[int, int] | None
                   ) -> tuple[list[str], int, int, tuple[float, float, float, float] | None]:
    """Where things go in a window: (text lines, font scale, bar height, image rect x0, y0, x1, y1).

    The overlay is a bar across the top whose lines wrap to the window's width (never clipped, down to ~60 px); the
    image is letterboxed in the rest of the window, so the overlay never covers it. Pure: unit-tested without a
    display."""
    fw, fh = window
    lines: list[str] = []
    scale = 2 if fw >= 480 else 1
    if lines_items:
        max_chars = max(1, (fw - 2 * LINE_GAP) // (6 * scale))
        for items in lines_items:
            lines += wrap_items(items, max_chars)
    bar = len(lines) * (7 * scale + LINE_GAP) + LINE_GAP if lines else 0
    bar = min(bar, fh)
    if image is None:
        return lines, scale, bar, None
    tw, th = image
    area = fh - bar
    if area <= 0 or fw <= 0:
        return lines, scale, bar, None
    k = min(fw / tw, area / th)
    dw, dh = tw * k, th * k
    x0, y0 = float(int((fw - dw) / 2)), float(bar + int((area - dh) / 2))
    return lines, scale, bar, (x0, y0, x0 + dw, y0 + dh)


class Viewer:
    """One window following one sender at a time. Keys: Esc/Q quit, O overlay, L sender list, Tab/N/→ next sender,
    Shift-Tab/P/← previous, F (or F11) fullscreen. It redraws only when something changed (a new frame, a key, a
    resize, the overlay's text), sleeping on the receiver's futex in between."""

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
        self.show_list = False
        self.first = self.receiver.wait_frame(2.0, copy=False)
        self.display_fps = 0.0
        w, h = size or self._initial_size()
        glfw.window_hint(glfw.RESIZABLE, True)
        self.base_title = title
        self.window = glfw.create_window(w, h, self._title(), None, None)
        if not self.window:
            self.receiver.close()
            glfw.terminate()
            raise BackendError("GLFW could not create a window (no OpenGL visual on this display?)")
        glfw.make_context_current(self.window)
        glfw.swap_interval(1)
        glfw.set_key_callback(self.window, self._on_key)
        self.fb_size = tuple(glfw.get_framebuffer_size(self.window))  # kept by the callback: no X round trip per draw

        def resized(_window: Any, width: int, height: int) -> None:
            self.fb_size = (width, height)
            self._touch()

        glfw.set_framebuffer_size_callback(self.window, resized)
        glfw.set_window_refresh_callback(self.window, lambda *_: self._touch())
        # The image and the overlay bar each live in a texture attached to a framebuffer object, and are drawn
        # with glBlitFramebuffer: 1:1 (the window sized to the image) and in the driver's own layout, that is a
        # plain copy in llvmpipe, where a textured quad runs a shader per pixel (docs/senders.md, "view").
        self.tex, self.text_tex = GL.glGenTextures(2)
        self.fbo, self.text_fbo = GL.glGenFramebuffers(2)
        for t in (self.tex, self.text_tex):
            GL.glBindTexture(GL.GL_TEXTURE_2D, t)
            GL.glTexParameteri(GL.GL_TEXTURE_2D, GL.GL_TEXTURE_MIN_FILTER, GL.GL_NEAREST)
            GL.glTexParameteri(GL.GL_TEXTURE_2D, GL.GL_TEXTURE_MAG_FILTER, GL.GL_NEAREST)
            GL.glTexParameteri(GL.GL_TEXTURE_2D, GL.GL_TEXTURE_WRAP_S, GL.GL_CLAMP_TO_EDGE)  # the scaled quad's edges
            GL.glTexParameteri(GL.GL_TEXTURE_2D, GL.GL_TEXTURE_WRAP_T, GL.GL_CLAMP_TO_EDGE)
        GL.glPixelStorei(GL.GL_UNPACK_ALIGNMENT, 1)
        self.tex_shape: tuple[int, int] | None = None
        self.tex_bgra = False  # the texture's byte order (see _upload)
        self._row_length = 0  # GL_UNPACK_ROW_LENGTH as set (GL calls cost ~10 us each from Python: only changes)
        self.text_shape = (0, 0)
        self.text_key: tuple[Any, ...] = ()
        self.text_at = 0.0
        self.shown = 0  # new frames displayed
        self.draws = 0  # frames drawn (redraws happen only when something changed)
        self._last_new = 0.0
        self._dirty = True
        self._windowed: tuple[int, int, int, int] | None = None  # position and size to restore after fullscreen
        self._senders: list[Any] = []
        self._senders_at = 0.0
        self._items: list[list[str]] | None = None  # the overlay's lines as last drawn (None: recompute)
        self._layout_key: tuple[Any, ...] | None = None  # (window, image size) the layout below is for
        self._layout: tuple[int, tuple[int, int, int, int] | None, bool] = (0, None, False)  # see _layout_for
        if self.first is not None:
            self._upload(self.first)

    # -- state -----------------------------------------------------------------------------------------------------
    def _touch(self) -> None:
        self._dirty = True
        self._items = None

    def _title(self) -> str:
        r = self.receiver
        if r.connected and r.name:
            return f"{r.name} - {self.base_title}"
        who = repr(r.requested) if r.requested else "the active sender"
        return f"waiting for {who} - {self.base_title}"

    def _initial_size(self) -> tuple[int, int]:
        """The image's size plus the overlay bar's height, so the image starts out unscaled (1:1 is also the cheap
        way to draw it), or at 1/2, 1/3... when that does not fit the screen's work area (whole pixels, no
        uneven rows)."""
        r = self.receiver
        if not r.width:
            return 640, 360
        room_w, room_h = self._screen_room()
        k = 1
        while k < 64 and (r.width / k > room_w or r.height / k + 60 > room_h):
            k += 1
        w, h = max(160, r.width // k), max(90, r.height // k)
        self.show_list = False
        return w, h + (overlay_layout(self.overlay_items(), (w, h), None)[2] if self.overlay else 0)

    def _screen_room(self) -> tuple[int, int]:
        """The primary monitor's work area less room for the title bar (1280x760 when GLFW cannot say)."""
        glfw = self.glfw
        try:
            monitor = glfw.get_primary_monitor()
            _, _, w, h = glfw.get_monitor_workarea(monitor) if monitor else (0, 0, 0, 0)
        except Exception:  # an old GLFW without work areas
            w = h = 0
        return (w, h - 40) if w > 0 and h > 40 else (1280, 760)

    def senders(self) -> list[Any]:
        """The live senders (refreshed at most once a second: one LIST request)."""
        from ..senders import list_senders

        now = time.monotonic()
        if now - self._senders_at > 1.0:
            self._senders_at = now
            try:
                self._senders = list_senders(self.receiver._session)
            except Exception:
                pass
        return self._senders

    def switch(self, step: int) -> None:
        """Follow the next (step 1) or previous (-1) live sender, by announce order."""
        from ..senders import Receiver

        self._senders_at = 0.0
        names = [i.name for i in self.senders()]
        if not names:
            return
        current = self.receiver.name
        i = names.index(current) if current in names else -1
        name = names[(i + step) % len(names)]
        if name == current and self.receiver.connected:
            return
        old, self.receiver = self.receiver, Receiver(name, app_name="texbridge view")
        old.close()
        self.tex_shape = None
        self.glfw.set_window_title(self.window, self._title())
        self._touch()

    def toggle_fullscreen(self) -> None:
        glfw = self.glfw
        if self._windowed is None:
            monitor = glfw.get_primary_monitor()
            if not monitor:
                return
            mode = glfw.get_video_mode(monitor)
            x, y = glfw.get_window_pos(self.window)
            w, h = glfw.get_window_size(self.window)
            self._windowed = (x, y, w, h)
            glfw.set_window_monitor(self.window, monitor, 0, 0, mode.size.width, mode.size.height,
                                    mode.refresh_rate)
        else:
            x, y, w, h = self._windowed
            self._windowed = None
            glfw.set_window_monitor(self.window, None, x, y, w, h, 0)
        self._touch()

    def _on_key(self, window: Any, key: int, scancode: int, action: int, mods: int) -> None:
        glfw = self.glfw
        if action != glfw.PRESS:
            return
        if key in (glfw.KEY_ESCAPE, glfw.KEY_Q):
            glfw.set_window_should_close(window, True)
        elif key == glfw.KEY_O:
            self.overlay = not self.overlay
        elif key == glfw.KEY_L:
            self.show_list = not self.show_list
            self._senders_at = 0.0
        elif key in (glfw.KEY_F, glfw.KEY_F11):
            self.toggle_fullscreen()
        elif key in (glfw.KEY_TAB, glfw.KEY_N, glfw.KEY_RIGHT, glfw.KEY_P, glfw.KEY_LEFT):
            back = key in (glfw.KEY_P, glfw.KEY_LEFT) or (key == glfw.KEY_TAB and mods & glfw.MOD_SHIFT)
            self.switch(-1 if back else 1)
        self._touch()

    # -- drawing ---------------------------------------------------------------------------------------------------
    def _upload(self, frame: np.ndarray) -> None:
        """The frame (a zero-copy view of the sender's slot) straight into the texture: no intermediate copy."""
        GL = self.GL
        data, bgra = _to_rgba8(frame, self.receiver.format)
        h, w = data.shape[:2]
        row = 0
        if data.strides[1:] == (4, 1) and data.strides[0] % 4 == 0 and data.strides[0] >= 4 * w:
            row = data.strides[0] // 4  # pitched rows: let GL skip the padding instead of copying
            base = np.lib.stride_tricks.as_strided(data, (data.strides[0] * h,), (1,))[: data.strides[0] * (h - 1)
                                                                                      + 4 * w]
        else:
            base = np.ascontiguousarray(data)
        # Stored in the window's BGRA order when the image is shown 1:1 (then the blit is a plain copy) or already
        # comes that way; else in the frame's own order, so the upload is a copy and the scaling quad swizzles.
        order = bgra or self._layout_for((w, h))[2]
        if self.tex_shape != (w, h) or self.tex_bgra != order:
            self._storage(self.tex, self.fbo, w, h, order)
            self.tex_shape, self.tex_bgra = (w, h), order
        GL.glBindTexture(GL.GL_TEXTURE_2D, self.tex)
        self._unpack_row_length(row if row != w else 0)
        src = GL.GL_BGRA if bgra else GL.GL_RGBA
        GL.glTexSubImage2D(GL.GL_TEXTURE_2D, 0, 0, 0, w, h, src, GL.GL_UNSIGNED_BYTE, base)
        self._dirty = True

    def _unpack_row_length(self, row: int) -> None:
        if row != self._row_length:
            self.GL.glPixelStorei(self.GL.GL_UNPACK_ROW_LENGTH, row)
            self._row_length = row

    def _storage(self, tex: int, fbo: int, w: int, h: int, bgra: bool) -> None:
        """(Re)allocate `tex` at w x h, in B, G, R, A byte order or R, G, B, A, and attach it to `fbo`, the blit's
        source. An unsized GL_RGBA specified with GL_BGRA data lets the driver store it as the window does
        (B8G8R8A8: Mesa picks the layout matching the data only for unsized internal formats; GL_RGBA8 is always
        R8G8B8A8), so a 1:1 blit is a copy with no conversion; RGBA frames are then swizzled while uploading."""
        GL = self.GL
        GL.glBindTexture(GL.GL_TEXTURE_2D, tex)
        GL.glTexImage2D(GL.GL_TEXTURE_2D, 0, GL.GL_RGBA, w, h, 0, GL.GL_BGRA if bgra else GL.GL_RGBA,
                        GL.GL_UNSIGNED_BYTE, None)
        GL.glBindFramebuffer(GL.GL_READ_FRAMEBUFFER, fbo)
        GL.glFramebufferTexture2D(GL.GL_READ_FRAMEBUFFER, GL.GL_COLOR_ATTACHMENT0, GL.GL_TEXTURE_2D, tex, 0)
        status = GL.glCheckFramebufferStatus(GL.GL_READ_FRAMEBUFFER)
        GL.glBindFramebuffer(GL.GL_READ_FRAMEBUFFER, 0)
        if status != GL.GL_FRAMEBUFFER_COMPLETE:
            raise BackendError(f"the viewer's {w}x{h} texture cannot be read as a framebuffer (status {status:#x})")

    def overlay_items(self) -> list[list[str]]:
        """The overlay's lines, each a list of items (wrapped to the window by overlay_layout)."""
        r = self.receiver
        lines: list[list[str]] = []
        if not r.connected:
            who = f"sender {r.requested!r}" if r.requested else "a sender"
            lines.append([f"waiting for {who}..."])
        elif self.overlay:
            lines.append([str(r.name), f"{r.width}x{r.height} {r.format}"])
            lines.append([f"{r.sender_fps:.1f} fps", f"frame {r.frame_number}", f"dropped {r.frames_dropped}",
                          f"view {self.display_fps:.0f} fps"])
        if self.show_list:
            live = self.senders()
            lines.append(["senders (tab: next, shift-tab: previous):"] if live else ["no live senders"])
            for i in live:
                mark = ">" if i.name == r.name else " "
                lines.append([f"{mark} {i.name}", f"{i.width}x{i.height}", f"{i.fps:.0f} fps"])
        return lines

    def _update_text(self, items: list[list[str]], window: tuple[int, int]) -> tuple[int, int]:
        """Render the overlay's lines into its texture when they changed; returns (bar height, scale)."""
        lines, scale, bar, _ = overlay_layout(items, window, None)
        key = (tuple(lines), scale, window[0])
        if key != self.text_key:
            self.text_key = key
            line_h = 7 * scale + LINE_GAP
            img = np.zeros((max(1, bar), max(1, window[0]), 4), np.uint8)
            img[..., 3] = 200
            for i, line in enumerate(lines):
                mask = text_mask(line, scale)
                y, x = LINE_GAP + i * line_h, LINE_GAP
                mh, mw = min(mask.shape[0], img.shape[0] - y), min(mask.shape[1], img.shape[1] - x)
                if mh > 0 and mw > 0:
                    img[y:y + mh, x:x + mw][mask[:mh, :mw]] = (255, 255, 255, 255)
            GL = self.GL
            if self.text_shape != (img.shape[1], img.shape[0]):
                self._storage(self.text_tex, self.text_fbo, img.shape[1], img.shape[0], True)  # always 1:1
                self.text_shape = (img.shape[1], img.shape[0])
            GL.glBindTexture(GL.GL_TEXTURE_2D, self.text_tex)
            self._unpack_row_length(0)
            GL.glTexSubImage2D(GL.GL_TEXTURE_2D, 0, 0, 0, img.shape[1], img.shape[0], GL.GL_RGBA,
                               GL.GL_UNSIGNED_BYTE, img)
        return bar, scale

    def _blit(self, fbo: int, size: tuple[int, int], rect: tuple[int, int, int, int]) -> None:
        """Copy a texture (its framebuffer `fbo`, `size`) to window pixels rect = (x0, y0, x1, y1), y down: the
        texture's first row (the image's top) lands on row y0. Nearest-pixel when the sizes differ."""
        GL = self.GL
        fh = self.fb_size[1]
        x0, y0, x1, y1 = rect
        GL.glBindFramebuffer(GL.GL_READ_FRAMEBUFFER, fbo)  # left bound: screenshot() reads the window's again
        GL.glBlitFramebuffer(0, 0, size[0], size[1], x0, fh - y0, x1, fh - y1, GL.GL_COLOR_BUFFER_BIT, GL.GL_NEAREST)

    def _clear_around(self, rect: tuple[int, int, int, int] | None, top: int) -> None:
        """Clear the window below `top` except `rect` (y down): nothing at all when the image fills it, as a 1:1
        window does, so the frame costs no fill."""
        GL = self.GL
        fw, fh = self.fb_size
        if rect is None:
            strips = [(0, top, fw, fh)]
        else:
            x0, y0, x1, y1 = rect
            strips = [(0, top, fw, y0), (0, y1, fw, fh), (0, y0, x0, y1), (x1, y0, fw, y1)]
        strips = [(a, b, c, d) for a, b, c, d in strips if c > a and d > b]
        if not strips:
            return
        GL.glClearColor(0.08, 0.08, 0.1, 1)
        GL.glEnable(GL.GL_SCISSOR_TEST)
        for a, b, c, d in strips:
            GL.glScissor(a, fh - d, c - a, d - b)
            GL.glClear(GL.GL_COLOR_BUFFER_BIT)
        GL.glDisable(GL.GL_SCISSOR_TEST)  # a scissor would also clip the blits

    def draw(self) -> None:
        GL = self.GL
        fw, fh = self.fb_size
        image = self.tex_shape if self.tex_shape and self.receiver.connected else None
        bar, rect, one_to_one = self._layout_for(image)
        self._clear_around(rect, bar)
        if rect is not None and one_to_one:
            self._blit(self.fbo, image, rect)  # type: ignore[arg-type]
        elif rect is not None:  # scaled: a quad, cheaper than a scaling blit on llvmpipe (measured)
            GL.glViewport(0, 0, fw, fh)
            GL.glMatrixMode(GL.GL_PROJECTION)
            GL.glLoadIdentity()
            GL.glOrtho(0, fw, fh, 0, -1, 1)
            GL.glMatrixMode(GL.GL_MODELVIEW)
            GL.glLoadIdentity()
            GL.glEnable(GL.GL_TEXTURE_2D)
            GL.glTexEnvi(GL.GL_TEXTURE_ENV, GL.GL_TEXTURE_ENV_MODE, GL.GL_REPLACE)
            GL.glBindTexture(GL.GL_TEXTURE_2D, self.tex)
            self._quad(GL, *rect)
            GL.glDisable(GL.GL_TEXTURE_2D)
        if bar:
            w, h = self.text_shape
            self._blit(self.text_fbo, (w, h), (0, 0, w, h))
        self.draws += 1

    def _layout_for(self, image: tuple[int, int] | None) -> tuple[int, tuple[int, int, int, int] | None, bool]:
        """(bar height, the image's rect in whole window pixels or None, whether it is shown 1:1), recomputed (and
        the bar's texture redrawn) only when the overlay's lines, the window or the image size changed."""
        fw, fh = self.fb_size
        if self._items is None:
            self._items = self.overlay_items()  # counters move every frame: refreshed twice a second, not per draw
            self._layout_key = None
        key = (fw, fh, image)
        if key != self._layout_key:
            self._layout_key = key
            items = self._items
            bar = self._update_text(items, (fw, fh))[0] if items else 0
            area = overlay_layout(items, (fw, fh), image)[3] if image else None
            rect = None
            if area is not None:
                x0, y0 = int(area[0]), int(area[1])
                rect = (x0, y0, max(x0 + 1, round(area[2])), max(y0 + 1, round(area[3])))
            one = rect is not None and image is not None and (rect[2] - rect[0], rect[3] - rect[1]) == image
            self._layout = (bar, rect, one)
        return self._layout

    @staticmethod
    def _quad(GL: Any, x0: float, y0: float, x1: float, y1: float) -> None:
        """A textured quad in window pixels, y down; texture row 0 (the image's top) at y0."""
        GL.glBegin(GL.GL_QUADS)
        for (tx, ty), (x, y) in (((0, 0), (x0, y0)), ((1, 0), (x1, y0)), ((1, 1), (x1, y1)), ((0, 1), (x0, y1))):
            GL.glTexCoord2f(tx, ty)
            GL.glVertex2f(x, y)
        GL.glEnd()

    def screenshot(self) -> np.ndarray:
        """The window's pixels as (H, W, 4) uint8, top row first."""
        GL = self.GL
        fw, fh = self.glfw.get_framebuffer_size(self.window)
        GL.glPixelStorei(GL.GL_PACK_ALIGNMENT, 1)
        GL.glBindFramebuffer(GL.GL_READ_FRAMEBUFFER, 0)
        GL.glReadBuffer(GL.GL_BACK)
        raw = GL.glReadPixels(0, 0, fw, fh, GL.GL_RGBA, GL.GL_UNSIGNED_BYTE)
        return np.frombuffer(raw, np.uint8).reshape(fh, fw, 4)[::-1].copy()

    def run(self, *, frames: int | None = None, screenshot: str | None = None, timeout: float | None = None,
            notify: Callable[[str], None] | None = None) -> int:
        """Show frames until the window closes, or until `frames` new frames were shown (then save `screenshot`).
        Returns 0; after `timeout` seconds raises SenderNotFound (no sender ever connected) or TexbridgeTimeout
        (fewer than `frames`, or without --frames none at all). `notify` hears when the viewer waits for a sender
        and when it connects, so a missing sender is never waited for silently.

        Between changes it sleeps in the receiver's futex wait (up to 50 ms, so keys stay responsive) and draws
        nothing: a 60 fps sender costs one upload and one draw per frame."""
        glfw = self.glfw
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.first is not None:
            self.shown = 1
            self.receiver.release()
        waiting = False
        title = self._title()
        try:
            while not glfw.window_should_close(self.window):
                if notify is not None and (self.receiver.status == "no_sender") != waiting:
                    waiting = not waiting
                    notify(self._waiting_message() if waiting else f"showing sender {self.receiver.name!r}")
                if self._title() != title:
                    title = self._title()
                    glfw.set_window_title(self.window, title)
                    self._touch()
                frame = self.receiver.wait_frame(0 if self._dirty else 0.05, copy=False)
                if frame is not None:
                    self._upload(frame)
                    self.receiver.release()  # the texture has it: let the sender reuse the slot
                    self.shown += 1
                    now = time.monotonic()
                    if self._last_new:
                        dt = max(now - self._last_new, 1e-6)
                        self.display_fps = 1 / dt if not self.display_fps else 0.9 * self.display_fps + 0.1 / dt
                    self._last_new = now
                now = time.monotonic()
                if now - self.text_at >= 0.5:
                    self.text_at = now  # the fps and frame counters move: refresh the overlay twice a second
                    self._items = None
                    if self.overlay or self.show_list or waiting:
                        self._dirty = True
                glfw.poll_events()
                done = frames is not None and self.shown >= frames
                if self._dirty or done:
                    self._dirty = False
                    self.draw()
                    if done and screenshot:
                        save_image(screenshot, self.screenshot())
                    glfw.swap_buffers(self.window)
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


__all__ = ["TestPattern", "Viewer", "draw_text", "overlay_layout", "save_image", "send_test", "text_mask", "view",
           "wrap_items"]
