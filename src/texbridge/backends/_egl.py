"""Headless EGL contexts for the GL backend, through ctypes on libEGL.

Why ctypes and not PyOpenGL's EGL module: EGL is only ~15 entry points, the device-enumeration ones
(eglQueryDevicesEXT) are missing from PyOpenGL, and this way the context code works whichever platform PyOpenGL
itself was loaded for (a GLFW/GLX application may have imported OpenGL before texbridge). Under GLVND every GL
entry point dispatches to whatever context is current, EGL or GLX alike.

Display choice ("pick automatically"):
  1. Mesa's surfaceless platform (EGL_MESA_platform_surfaceless) - no window system, no device node needed;
  2. the EGL device platform (EGL_EXT_platform_device), one display per GPU - the headless path on NVIDIA;
  3. the default display (eglGetDisplay(EGL_DEFAULT_DISPLAY)).
Under GLVND the client extension string is the union over vendors, so on an NVIDIA machine that also has Mesa the
surfaceless platform exists but renders on llvmpipe. A software renderer is therefore only kept when no hardware
EGL device exists, and a caller that knows which device it needs (a descriptor's device UUID) gets the display whose
GL context reports that UUID. TEXBRIDGE_EGL_PLATFORM=surfaceless|device|default forces one platform.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from .._errors import BackendError

# Enums. EGL_PLATFORM_SURFACELESS_MESA is not in PyOpenGL (nor in older eglext.h), so all are defined here.
EGL_PLATFORM_SURFACELESS_MESA = 0x31DD
EGL_PLATFORM_DEVICE_EXT = 0x313F
EGL_SUCCESS = 0x3000
EGL_NONE = 0x3038
EGL_VENDOR, EGL_VERSION, EGL_EXTENSIONS, EGL_CLIENT_APIS = 0x3053, 0x3054, 0x3055, 0x308D
EGL_OPENGL_API, EGL_OPENGL_ES_API = 0x30A2, 0x30A0
EGL_CONTEXT_MAJOR_VERSION, EGL_CONTEXT_MINOR_VERSION = 0x3098, 0x30FB
EGL_CONTEXT_OPENGL_PROFILE_MASK, EGL_CONTEXT_OPENGL_CORE_PROFILE_BIT = 0x30FD, 0x1
EGL_SURFACE_TYPE, EGL_PBUFFER_BIT, EGL_RENDERABLE_TYPE = 0x3033, 0x1, 0x3040
EGL_OPENGL_BIT, EGL_OPENGL_ES3_BIT = 0x8, 0x40
EGL_WIDTH, EGL_HEIGHT = 0x3057, 0x3056
EGL_DRM_DEVICE_FILE_EXT, EGL_DRM_RENDER_NODE_FILE_EXT = 0x3233, 0x3377
EGL_DEFAULT_DISPLAY = None
_GL_VENDOR, _GL_RENDERER, _GL_VERSION = 0x1F00, 0x1F01, 0x1F02

SOFTWARE_RENDERERS = ("llvmpipe", "softpipe", "swrast", "swiftshader", "lavapipe")

_c = ctypes
_vp = _c.c_void_p


def _load_egl() -> ctypes.CDLL:
    for name in ("libEGL.so.1", ctypes.util.find_library("EGL")):
        if name:
            try:
                return ctypes.CDLL(name)
            except OSError:
                continue
    raise ImportError("libEGL.so.1 not found (install libegl1)")


class _EGL:
    """Typed entry points; extension ones are looked up through eglGetProcAddress."""

    def __init__(self) -> None:
        lib = self.lib = _load_egl()

        def fn(name: str, restype: Any, *argtypes: Any) -> Callable[..., Any]:
            f = getattr(lib, name)
            f.restype, f.argtypes = restype, list(argtypes)
            return f

        self.GetProcAddress = fn("eglGetProcAddress", _vp, _c.c_char_p)
        self.GetError = fn("eglGetError", _c.c_int)
        self.QueryString = fn("eglQueryString", _c.c_char_p, _vp, _c.c_int)
        self.GetDisplay = fn("eglGetDisplay", _vp, _vp)
        self.Initialize = fn("eglInitialize", _c.c_uint, _vp, _c.POINTER(_c.c_int), _c.POINTER(_c.c_int))
        self.Terminate = fn("eglTerminate", _c.c_uint, _vp)
        self.BindAPI = fn("eglBindAPI", _c.c_uint, _c.c_uint)
        self.ChooseConfig = fn("eglChooseConfig", _c.c_uint, _vp, _c.POINTER(_c.c_int), _c.POINTER(_vp), _c.c_int,
                               _c.POINTER(_c.c_int))
        self.CreateContext = fn("eglCreateContext", _vp, _vp, _vp, _vp, _c.POINTER(_c.c_int))
        self.DestroyContext = fn("eglDestroyContext", _c.c_uint, _vp, _vp)
        self.CreatePbufferSurface = fn("eglCreatePbufferSurface", _vp, _vp, _vp, _c.POINTER(_c.c_int))
        self.DestroySurface = fn("eglDestroySurface", _c.c_uint, _vp, _vp)
        self.MakeCurrent = fn("eglMakeCurrent", _c.c_uint, _vp, _vp, _vp, _vp)
        self.GetCurrentContext = fn("eglGetCurrentContext", _vp)
        self.ReleaseThread = fn("eglReleaseThread", _c.c_uint)

        def ext(name: str, restype: Any, *argtypes: Any) -> Callable[..., Any] | None:
            addr = self.GetProcAddress(name.encode())
            return _c.CFUNCTYPE(restype, *argtypes)(addr) if addr else None

        self.GetPlatformDisplayEXT = ext("eglGetPlatformDisplayEXT", _vp, _c.c_uint, _vp, _c.POINTER(_c.c_int))
        self.QueryDevicesEXT = ext("eglQueryDevicesEXT", _c.c_uint, _c.c_int, _c.POINTER(_vp), _c.POINTER(_c.c_int))
        self.QueryDeviceStringEXT = ext("eglQueryDeviceStringEXT", _c.c_char_p, _vp, _c.c_int)

    def error(self, what: str) -> BackendError:
        return BackendError(f"{what} failed: EGL error {self.GetError():#x}")


_egl: _EGL | None = None


def egl() -> _EGL:
    global _egl
    if _egl is None:
        _egl = _EGL()
    return _egl


def client_extensions() -> set[str]:
    s = egl().QueryString(None, EGL_EXTENSIONS)
    egl().GetError()  # EGL_BAD_DISPLAY when client extensions are unsupported: not an error here
    return set(s.decode().split()) if s else set()


@dataclass
class EGLDevice:
    handle: int
    extensions: set[str]
    node: str

    @property
    def software(self) -> bool:
        return "EGL_MESA_device_software" in self.extensions


def devices() -> list[EGLDevice]:
    """The EGL devices (EGL_EXT_device_enumeration), hardware and software; [] where enumeration is missing."""
    e = egl()
    if e.QueryDevicesEXT is None or e.QueryDeviceStringEXT is None:
        return []
    n = _c.c_int(0)
    if not e.QueryDevicesEXT(0, None, _c.byref(n)) or n.value <= 0:
        return []
    arr = (_vp * n.value)()
    if not e.QueryDevicesEXT(n.value, arr, _c.byref(n)):
        return []
    out = []
    for h in arr[: n.value]:
        exts = e.QueryDeviceStringEXT(h, EGL_EXTENSIONS) or b""
        node = b""
        for attr in (EGL_DRM_RENDER_NODE_FILE_EXT, EGL_DRM_DEVICE_FILE_EXT):
            node = e.QueryDeviceStringEXT(h, attr) or b""
            e.GetError()
            if node:
                break
        out.append(EGLDevice(h, set(exts.decode().split()), node.decode()))
    return out


@dataclass
class EGLContext:
    """A texbridge-owned headless context. Current on at most one thread at a time (EGL's rule)."""

    display: int
    context: int
    surface: int  # a 1x1 pbuffer where EGL_KHR_surfaceless_context is missing, else 0
    platform: str
    api: str  # "gl" (desktop core profile) or "gles"
    version: str = ""
    renderer: str = ""
    vendor: str = ""
    egl_vendor: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def software(self) -> bool:
        return any(s in self.renderer.lower() for s in SOFTWARE_RENDERERS)

    def is_current(self) -> bool:
        return egl().GetCurrentContext() == self.context

    def make_current(self) -> None:
        """Make this context current on the calling thread (a no-op when it already is)."""
        e = egl()
        if e.GetCurrentContext() == self.context:
            return
        if not e.MakeCurrent(self.display, self.surface or None, self.surface or None, self.context):
            raise BackendError(
                f"eglMakeCurrent failed (EGL error {e.GetError():#x}): texbridge's headless GL context can be current "
                "on one thread at a time; call release_current() on the other thread, or use context='current'")

    def release_current(self) -> None:
        e = egl()
        if e.GetCurrentContext() == self.context:
            e.MakeCurrent(self.display, None, None, None)

    def destroy(self) -> None:
        e = egl()
        self.release_current()
        if self.surface:
            e.DestroySurface(self.display, self.surface)
        e.DestroyContext(self.display, self.context)
        # No eglTerminate: a platform display is one per (platform, device) in the whole process, shared with every
        # other context on it (ours included), and terminating it would pull those contexts' display away.
        self.context = self.surface = 0


def _initialize(display: int | None) -> tuple[int, str] | None:
    e = egl()
    if not display:
        return None
    major, minor = _c.c_int(), _c.c_int()
    if not e.Initialize(display, _c.byref(major), _c.byref(minor)):
        e.GetError()
        return None
    return display, f"{major.value}.{minor.value}"


def _attribs(*pairs: int) -> Any:
    vals = list(pairs) + [EGL_NONE]
    return (_c.c_int * len(vals))(*vals)


def _create_on(display: int, platform: str, gl_string: Callable[[int], str]) -> EGLContext | None:
    """A GL 4.5 core context on `display`, else GLES 3.2; None (display left initialized) if neither works."""
    e = egl()
    dexts = set((e.QueryString(display, EGL_EXTENSIONS) or b"").decode().split())
    apis = (e.QueryString(display, EGL_CLIENT_APIS) or b"").decode()
    attempts = []
    if "OpenGL" in apis.split():
        attempts.append(("gl", EGL_OPENGL_API, EGL_OPENGL_BIT,
                         _attribs(EGL_CONTEXT_MAJOR_VERSION, 4, EGL_CONTEXT_MINOR_VERSION, 5,
                                  EGL_CONTEXT_OPENGL_PROFILE_MASK, EGL_CONTEXT_OPENGL_CORE_PROFILE_BIT)))
    attempts.append(("gles", EGL_OPENGL_ES_API, EGL_OPENGL_ES3_BIT,
                     _attribs(EGL_CONTEXT_MAJOR_VERSION, 3, EGL_CONTEXT_MINOR_VERSION, 2)))
    surfaceless = "EGL_KHR_surfaceless_context" in dexts
    for api, api_enum, bit, ctx_attribs in attempts:
        if not e.BindAPI(api_enum):
            e.GetError()
            continue
        config: int | None = None
        if "EGL_KHR_no_config_context" not in dexts or not surfaceless:
            cfg, n = _vp(), _c.c_int(0)
            want = _attribs(EGL_SURFACE_TYPE, EGL_PBUFFER_BIT, EGL_RENDERABLE_TYPE, bit)
            if not e.ChooseConfig(display, want, _c.byref(cfg), 1, _c.byref(n)) or n.value < 1:
                e.GetError()
                continue
            config = cfg.value
        ctx = e.CreateContext(display, config, None, ctx_attribs)
        if not ctx:
            e.GetError()
            continue
        surface = 0
        if not surfaceless:
            surface = e.CreatePbufferSurface(display, config, _attribs(EGL_WIDTH, 1, EGL_HEIGHT, 1)) or 0
        c = EGLContext(display, ctx, surface, platform, api,
                       egl_vendor=(e.QueryString(display, EGL_VENDOR) or b"").decode())
        try:
            c.make_current()
        except BackendError:
            if surface:
                e.DestroySurface(display, surface)
            e.DestroyContext(display, ctx)
            continue
        c.version, c.renderer, c.vendor = gl_string(_GL_VERSION), gl_string(_GL_RENDERER), gl_string(_GL_VENDOR)
        return c
    return None


def _candidates(forced: str | None) -> list[tuple[str, Callable[[], int | None]]]:
    """(platform name, display opener) in preference order."""
    e = egl()
    cexts = client_extensions()
    out: list[tuple[str, Callable[[], int | None]]] = []
    gpd = e.GetPlatformDisplayEXT if "EGL_EXT_platform_base" in cexts else None
    if gpd and "EGL_MESA_platform_surfaceless" in cexts:
        out.append(("surfaceless", lambda: gpd(EGL_PLATFORM_SURFACELESS_MESA, None, None)))
    if gpd and "EGL_EXT_platform_device" in cexts:
        devs = devices()
        # hardware devices first: they are the reason to prefer the device platform at all
        for d in sorted(devs, key=lambda d: d.software):
            out.append((f"device:{d.node or ('software' if d.software else 'unknown')}",
                        lambda h=d.handle: gpd(EGL_PLATFORM_DEVICE_EXT, h, None)))
    out.append(("default", lambda: e.GetDisplay(EGL_DEFAULT_DISPLAY)))
    if forced:
        out = [c for c in out if c[0].split(":")[0] == forced]
        if not out:
            raise BackendError(f"TEXBRIDGE_EGL_PLATFORM={forced} is not available here (client extensions: "
                               f"{' '.join(sorted(cexts)) or 'none'})")
    return out


def create_headless(gl_string: Callable[[int], str],
                    accept: Callable[[EGLContext], bool] | None = None) -> EGLContext:
    """The best headless context: the first candidate that `accept`s, else the first hardware one, else any.

    `gl_string(enum)` reads glGetString on the new context (the GL loader lives in gl.py). The chosen context is left
    current on the calling thread; rejected ones are destroyed.
    """
    forced = os.environ.get("TEXBRIDGE_EGL_PLATFORM") or None
    have_hw_device = any(not d.software for d in devices())
    fallback: EGLContext | None = None
    tried: list[str] = []
    for platform, open_display in _candidates(forced):
        init = _initialize(open_display())
        if init is None:
            tried.append(f"{platform}: no display")
            continue
        ctx = _create_on(init[0], platform, gl_string)
        if ctx is None:
            tried.append(f"{platform}: no GL 4.5 core or GLES 3.2 context")
            continue
        tried.append(f"{platform}: {ctx.renderer}")
        if accept is not None:
            if accept(ctx):
                _drop(fallback)
                return ctx
        elif not ctx.software or not have_hw_device:
            _drop(fallback)
            return ctx
        if fallback is None:
            fallback = ctx
        else:
            _drop(ctx)
    if fallback is not None and accept is None:
        fallback.make_current()
        return fallback
    _drop(fallback)
    raise BackendError("no usable headless EGL context: " + "; ".join(tried or ["no EGL platform"]))


def _drop(ctx: EGLContext | None) -> None:
    if ctx is not None:
        ctx.destroy()
