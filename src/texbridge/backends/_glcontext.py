"""Which GL context texbridge works in, and what it offers: texbridge's own headless EGL context (made by _egl.py)
or the caller's current one (``context="current"``: GLFW, pygame, Qt, moderngl), each with its capabilities read
once, plus the GL error checks every GL call goes through.

PYOPENGL_PLATFORM: PyOpenGL picks its platform once, at its first import. For a headless EGL context it has to be
"egl", so this module sets PYOPENGL_PLATFORM=egl - but only when the variable is unset AND OpenGL has not been
imported yet. An application that imported OpenGL first keeps its platform (GLX, say); with GLVND that still works
for texbridge's EGL context, because libOpenGL dispatches to whichever context is current.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator


def _choose_pyopengl_platform() -> None:
    """EGL for PyOpenGL, unless the user chose a platform or OpenGL is already loaded (too late to change)."""
    if "PYOPENGL_PLATFORM" not in os.environ and "OpenGL" not in sys.modules:
        os.environ["PYOPENGL_PLATFORM"] = "egl"


_choose_pyopengl_platform()

from OpenGL import GL  # noqa: E402  (ImportError here is how a missing PyOpenGL shows: get_backend reports it)
from OpenGL import error as _glerror  # noqa: E402
from OpenGL.raw.GL.EXT import memory_object as _mo  # noqa: E402

from .._errors import BackendError  # noqa: E402
from . import _egl  # noqa: E402

GL_NUM_DEVICE_UUIDS_EXT, GL_DEVICE_UUID_EXT, GL_DRIVER_UUID_EXT = 0x9596, 0x9597, 0x9598


@contextmanager
def gl_errors(what: str) -> Iterator[None]:
    """Turn PyOpenGL's GLError (and errors left in the queue) into BackendError, naming the operation."""
    try:
        yield
    except _glerror.GLError as e:
        raise BackendError(f"{what} failed: GL error {getattr(e, 'err', '?')!r} in "
                           f"{getattr(getattr(e, 'baseOperation', None), '__name__', '?')}") from None
    err = GL.glGetError()
    if err:
        raise BackendError(f"{what} failed: GL error {err:#x}")


def drain_errors() -> None:
    """Clear errors left by earlier (user) calls so they are not blamed on texbridge."""
    for _ in range(16):
        if not GL.glGetError():
            return


@dataclass
class GLCaps:
    """What one GL context offers; read once per context."""

    api: str  # "gl" or "gles"
    version: str
    renderer: str
    vendor: str
    extensions: frozenset[str]
    driver_uuid: bytes = b""
    device_uuids: tuple[bytes, ...] = ()

    @property
    def memory_object_fd(self) -> bool:
        return {"GL_EXT_memory_object", "GL_EXT_memory_object_fd"} <= self.extensions

    @property
    def semaphore_fd(self) -> bool:
        return {"GL_EXT_semaphore", "GL_EXT_semaphore_fd"} <= self.extensions

    @property
    def timeline_semaphore(self) -> bool:
        """GL can import a Vulkan *timeline* semaphore and wait/signal values on the GPU (NVIDIA)."""
        return self.semaphore_fd and "GL_NV_timeline_semaphore" in self.extensions

    @property
    def software(self) -> bool:
        return any(s in self.renderer.lower() for s in _egl.SOFTWARE_RENDERERS)


def gl_string(enum: int) -> str:
    s = GL.glGetString(enum)
    return s.decode(errors="replace") if s else ""


def read_caps() -> GLCaps:
    """Query the current context. Must run with the context current."""
    drain_errors()
    version = gl_string(GL.GL_VERSION)
    if not version:
        raise BackendError("no GL context is current on this thread")
    n = ctypes.c_int(0)
    GL.glGetIntegerv(GL.GL_NUM_EXTENSIONS, ctypes.byref(n))
    exts = frozenset(GL.glGetStringi(GL.GL_EXTENSIONS, i).decode() for i in range(n.value))
    caps = GLCaps("gles" if version.startswith("OpenGL ES") else "gl", version, gl_string(GL.GL_RENDERER),
                  gl_string(GL.GL_VENDOR), exts)
    if "GL_EXT_memory_object" in exts or "GL_EXT_semaphore" in exts:
        buf = (ctypes.c_ubyte * 16)()
        _mo.glGetUnsignedBytevEXT(GL_DRIVER_UUID_EXT, buf)
        caps.driver_uuid = bytes(buf)
        GL.glGetIntegerv(GL_NUM_DEVICE_UUIDS_EXT, ctypes.byref(n))
        uuids = []
        for i in range(n.value):
            _mo.glGetUnsignedBytei_vEXT(GL_DEVICE_UUID_EXT, i, buf)
            uuids.append(bytes(buf))
        caps.device_uuids = tuple(uuids)
    drain_errors()
    return caps


_glx_get_current: Any = None


def current_context_key() -> tuple[str, int]:
    """Identify the context current on this thread: ("egl", handle) or ("glx", handle); ("", 0) if none."""
    global _glx_get_current
    cur = _egl.egl().GetCurrentContext()
    if cur:
        return ("egl", cur)
    if _glx_get_current is None:
        try:
            lib = ctypes.CDLL("libGL.so.1")
            _glx_get_current = lib.glXGetCurrentContext
            _glx_get_current.restype = ctypes.c_void_p
        except (OSError, AttributeError):
            _glx_get_current = False
    if _glx_get_current:
        glx = _glx_get_current()
        if glx:
            return ("glx", glx)
    return ("", 0)


class GLContext:
    """A GL context texbridge works in: its own headless EGL one, or the caller's current one."""

    def __init__(self, caps: GLCaps, egl_ctx: _egl.EGLContext | None, key: tuple[str, int], user: Any = None):
        self.caps = caps
        self.egl = egl_ctx
        self.key = key
        self.user = user  # the object the caller passed (a moderngl.Context, say)

    @property
    def headless(self) -> bool:
        return self.egl is not None

    @property
    def platform(self) -> str:
        return f"egl:{self.egl.platform}" if self.egl else f"current ({self.key[0] or 'unknown'})"

    def enter(self) -> None:
        """Make sure this context is current on the calling thread."""
        if self.egl is not None:
            self.egl.make_current()
        elif current_context_key() != self.key:
            raise BackendError("the GL context these objects belong to is not current on this thread")

    def try_enter(self) -> bool:
        try:
            self.enter()
            return True
        except BackendError:
            return False

    def __repr__(self) -> str:
        return f"<GLContext {self.platform} {self.caps.renderer!r} {self.caps.version!r}>"


_lock = threading.Lock()
_headless: GLContext | None = None
_headless_by_uuid: dict[bytes, GLContext | None] = {}
_current_caps: dict[tuple[str, int], GLCaps] = {}


def pyopengl_platform() -> str:
    import OpenGL.platform

    return type(OpenGL.platform.PLATFORM).__name__.replace("Platform", "").lower()


def headless_context() -> GLContext:
    """texbridge's own headless context (created on first use, then current on the calling thread)."""
    global _headless
    with _lock:
        if _headless is None:
            if pyopengl_platform() != "egl":
                # PyOpenGL resolves GL>1.1 and extension entry points only while a context of ITS platform is
                # current (glXGetCurrentContext for GLX), so an EGL context would see null functions.
                raise BackendError(
                    f"PyOpenGL was loaded for the {pyopengl_platform()} platform before texbridge, so texbridge's "
                    "headless EGL context cannot be used: set PYOPENGL_PLATFORM=egl before OpenGL is first "
                    "imported, or pass context='current' with your own context current")
            ectx = _egl.create_headless(gl_string)
            _headless = GLContext(read_caps(), ectx, ("egl", ectx.context))
        ctx = _headless
    ctx.enter()
    return ctx


def _headless_for(device_uuid: bytes) -> GLContext:
    """The headless context on the device with `device_uuid` if one exists, else the default headless context."""
    default = headless_context()
    if not device_uuid or device_uuid in default.caps.device_uuids:
        return default
    with _lock:
        if device_uuid not in _headless_by_uuid:
            found: GLContext | None = None
            try:
                ectx = _egl.create_headless(gl_string, accept=lambda c: device_uuid in read_caps().device_uuids)
                found = GLContext(read_caps(), ectx, ("egl", ectx.context))
            except BackendError:
                found = None
            _headless_by_uuid[device_uuid] = found
        ctx = _headless_by_uuid[device_uuid] or default
    ctx.enter()
    return ctx


def resolve_context(context: Any = None, device_uuid: bytes = b"") -> GLContext:
    """None: headless (on the device with `device_uuid` when there is one); "current" or a moderngl.Context: the
    context current on this thread; a GLContext: itself."""
    if isinstance(context, GLContext):
        context.enter()
        return context
    if context is None:
        return _headless_for(device_uuid) if device_uuid else headless_context()
    if context == "current" or hasattr(context, "external_texture"):
        key = current_context_key()
        caps = _current_caps.get(key) if key[1] else None
        if caps is None:
            if not gl_string(GL.GL_VERSION):
                raise BackendError("context='current' but no GL context is current on this thread")
            caps = read_caps()
            if key[1]:
                _current_caps[key] = caps
        return GLContext(caps, None, key, None if context == "current" else context)
    raise TypeError(f"context must be None, 'current', a moderngl.Context or a GLContext, not {context!r}")
