"""OpenGL backend: Vulkan-exported memory seen as GL textures and buffers (GL_EXT_memory_object_fd).

GL cannot export memory, so GL is a producer by borrowing: create_texture() allocates through the Vulkan backend on
the Vulkan device whose UUIDs match the GL context, imports that memory into GL and shares the Vulkan export.

Context: by default texbridge creates its own headless EGL context (see _egl.py for how the display is chosen);
pass ``context="current"`` to use whatever context is current on the calling thread (GLFW, pygame, Qt, moderngl),
which is the common case for an application that draws in its own window. Which context, its capabilities and
the PYOPENGL_PLATFORM choice live in _glcontext.py.

Sync: GL_EXT_semaphore_fd (NVIDIA) lets GL wait/signal a Vulkan semaphore with explicit image layouts; Mesa's
llvmpipe has no semaphore import, so there GL work is completed with glFinish before the keyed mutex is released.
`GLResource.gl_sync` records which path ran ("semaphore" or "finish").
"""

from __future__ import annotations

import ctypes
import os
import threading
import warnings
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Iterator, Sequence

from . import _glcontext  # noqa: F401  (first: it picks PyOpenGL's platform, which must precede importing OpenGL)

import numpy as np  # noqa: E402
from OpenGL import GL  # noqa: E402  (ImportError here is how a missing PyOpenGL shows: get_backend reports it)
from OpenGL.raw.GL.EXT import memory_object as _mo  # noqa: E402
from OpenGL.raw.GL.EXT import memory_object_fd as _mofd  # noqa: E402
from OpenGL.raw.GL.EXT import semaphore as _sem  # noqa: E402
from OpenGL.raw.GL.EXT import semaphore_fd as _semfd  # noqa: E402
from OpenGL.raw.GL.NV import timeline_semaphore as _tl  # noqa: E402
from OpenGL.raw.GL.VERSION import GL_1_0 as _gl10, GL_1_1 as _gl11, GL_1_2 as _gl12  # noqa: E402
from OpenGL.raw.GL.VERSION import GL_1_5 as _gl15, GL_3_0 as _gl30, GL_3_2 as _gl32  # noqa: E402
from OpenGL.raw.GL.VERSION import GL_4_3 as _gl43  # noqa: E402

from .._descriptor import FD_MEMORY, FD_SEMAPHORE, Descriptor, Usage  # noqa: E402
from .._errors import (BackendError, IncompatibleDevice, InvalidArgument, InvalidDescriptor,  # noqa: E402
                       TexbridgeError)
from .._fdinfo import inspect_fd  # noqa: E402
from .._formats import Format, get_format  # noqa: E402
from .._sharedmem import SharedMapping  # noqa: E402
from .._memory_types import check_importer  # noqa: E402
from .._resources import Resource  # noqa: E402
from . import _egl  # noqa: E402
from ._glcontext import (GLCaps, GLContext, drain_errors, gl_errors, headless_context,  # noqa: E402
                         resolve_context)
from ._fds import OwnedFds, check_semaphore_fd, close_on_error  # noqa: E402

GL_HANDLE_TYPE_OPAQUE_FD_EXT = 0x9586
GL_TEXTURE_TILING_EXT, GL_OPTIMAL_TILING_EXT, GL_LINEAR_TILING_EXT = 0x9580, 0x9584, 0x9585
GL_DEDICATED_MEMORY_OBJECT_EXT = 0x9581
# VkImageLayout name -> GL_LAYOUT_*_EXT (the layout the other API leaves the image in / expects it in)
LAYOUTS = {
    "undefined": 0,
    "general": 0x958D,
    "color_attachment": 0x958E,
    "depth_stencil_attachment": 0x958F,
    "depth_stencil_read_only": 0x9590,
    "shader_read_only": 0x9591,
    "transfer_src": 0x9592,
    "transfer_dst": 0x9593,
}
_SWIZZLE = {"r": GL.GL_RED, "g": GL.GL_GREEN, "b": GL.GL_BLUE, "a": GL.GL_ALPHA, "0": GL.GL_ZERO, "1": GL.GL_ONE}
_VK_TILING = {0: "optimal", 1: "linear", "optimal": "optimal", "linear": "linear"}
# moderngl dtype per texbridge format (None: moderngl has no matching dtype)
_MODERNGL_DTYPE = {"u1": "f1", "<u2": "nu2", "<f2": "f2", "<f4": "f4"}

_GLuint1 = ctypes.c_uint * 1


_vk_lock = threading.Lock()
_vk_devices: dict[bytes, Any] = {}  # Vulkan devices picked by a GL context's device UUID (not the default one)


# -- save and restore the bits of GL state texbridge touches --------------------------------------------------------


def _get_int(pname: int) -> int:
    v = ctypes.c_int(0)
    GL.glGetIntegerv(pname, ctypes.byref(v))
    return v.value


def _get_tex_int(target: int, pname: int) -> int:
    v = ctypes.c_int(0)
    GL.glGetTexLevelParameteriv(target, 0, pname, ctypes.byref(v))
    return v.value


def _get_buffer_int(target: int, pname: int) -> int:
    v = ctypes.c_int(0)
    GL.glGetBufferParameteriv(target, pname, ctypes.byref(v))
    return v.value


@contextmanager
def _bound(bind: Any, target: int, binding: int, name: int) -> Iterator[None]:
    """Bind `name` for the duration and restore the caller's binding: the user's context state is not ours."""
    prev = _get_int(binding)
    bind(target, name)
    try:
        yield
    finally:
        bind(target, prev)


def _bound_texture(target: int, name: int) -> AbstractContextManager[None]:
    binding = GL.GL_TEXTURE_BINDING_2D if target == GL.GL_TEXTURE_2D else GL.GL_TEXTURE_BINDING_2D_ARRAY
    return _bound(GL.glBindTexture, target, binding, name)


def _bound_buffer(target: int, name: int) -> AbstractContextManager[None]:
    binding = {GL.GL_COPY_WRITE_BUFFER: GL.GL_COPY_WRITE_BUFFER_BINDING,
               GL.GL_COPY_READ_BUFFER: GL.GL_COPY_READ_BUFFER_BINDING}[target]
    return _bound(GL.glBindBuffer, target, binding, name)


@contextmanager
def _pixel_store() -> Iterator[None]:
    """Tightly packed client memory, no pixel buffer objects; restores what the caller had."""
    names = (GL.GL_PACK_ALIGNMENT, GL.GL_UNPACK_ALIGNMENT, GL.GL_PACK_ROW_LENGTH, GL.GL_UNPACK_ROW_LENGTH)
    saved = [_get_int(n) for n in names]
    pbo = (_get_int(GL.GL_PIXEL_PACK_BUFFER_BINDING), _get_int(GL.GL_PIXEL_UNPACK_BUFFER_BINDING))
    for n, v in zip(names, (1, 1, 0, 0)):
        GL.glPixelStorei(n, v)
    GL.glBindBuffer(GL.GL_PIXEL_PACK_BUFFER, 0)
    GL.glBindBuffer(GL.GL_PIXEL_UNPACK_BUFFER, 0)
    try:
        yield
    finally:
        for n, v in zip(names, saved):
            GL.glPixelStorei(n, v)
        GL.glBindBuffer(GL.GL_PIXEL_PACK_BUFFER, pbo[0])
        GL.glBindBuffer(GL.GL_PIXEL_UNPACK_BUFFER, pbo[1])


# -- semaphores -----------------------------------------------------------------------------------------------------


class GLSemaphore:
    """A Vulkan semaphore imported into GL (GL_EXT_semaphore_fd): GPU-side ordering without glFinish."""

    def __init__(self, ctx: GLContext, name: int, *, timeline: bool = False) -> None:
        self.ctx, self.name, self.timeline = ctx, name, timeline

    def wait(self, resources: Sequence["GLResource"] = (), layout: str = "general", value: int | None = None) -> None:
        """GL waits (on the GPU) for the other API's signal (of `value`, for a timeline semaphore); `layout` is the
        layout it left the images in."""
        self._op(_sem.glWaitSemaphoreEXT, resources, layout, "glWaitSemaphoreEXT", value)

    def signal(self, resources: Sequence["GLResource"] = (), layout: str = "general",
               value: int | None = None) -> None:
        """Signal (`value`, for a timeline) after GL's work, transitioning images to `layout` for the other API;
        flushes so it happens."""
        self._op(_sem.glSignalSemaphoreEXT, resources, layout, "glSignalSemaphoreEXT", value)
        GL.glFlush()

    def _op(self, fn: Any, resources: Sequence["GLResource"], layout: str, what: str, value: int | None) -> None:
        if self.name == 0:
            raise TexbridgeError(f"{self!r} is closed")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
        if self.timeline != (value is not None):
            raise ValueError("a timeline semaphore waits/signals a value; a binary one takes none")
        self.ctx.enter()
        if value is not None:
            with gl_errors("glSemaphoreParameterui64vEXT"):
                _sem.glSemaphoreParameterui64vEXT(self.name, _tl.GL_TIMELINE_SEMAPHORE_VALUE_NV,
                                                  (ctypes.c_uint64 * 1)(int(value)))
        bufs = [r.buffer for r in resources if r.buffer]
        texs = [r.texture for r in resources if r.texture]
        with gl_errors(what):
            fn(self.name, len(bufs), (ctypes.c_uint * max(1, len(bufs)))(*bufs), len(texs),
               (ctypes.c_uint * max(1, len(texs)))(*texs),
               (ctypes.c_uint * max(1, len(texs)))(*([LAYOUTS[layout]] * len(texs))))

    def close(self) -> None:
        name, self.name = self.name, 0
        if name and self.ctx.try_enter():
            _sem.glDeleteSemaphoresEXT(1, _GLuint1(name))

    def __repr__(self) -> str:
        return f"<GLSemaphore {self.name}>"


# -- resources ------------------------------------------------------------------------------------------------------


class GLResource(Resource):
    """A texture or buffer whose memory another API (Vulkan) exported, imported into one GL context."""

    backend_name = "gl"

    def __init__(self, descriptor: Descriptor, ctx: GLContext, *, memory_object: int, texture: int = 0,
                 buffer: int = 0, target: int = 0, producer: Resource | None = None) -> None:
        super().__init__(descriptor)
        self.context = ctx
        self.memory_object = memory_object
        self.texture = texture
        self.buffer = buffer
        self.target = target  # GL_TEXTURE_2D / GL_TEXTURE_2D_ARRAY for textures
        self.gl_sync: str | None = None  # "semaphore" or "finish": how GL's work was last ordered before release
        self._producer = producer  # the Vulkan resource whose memory this is, when GL created it
        self._host_semaphore: Any = None  # an importer's view of the exporter's timeline semaphore, if any
        self._gl_semaphore: GLSemaphore | None = None  # the same, imported into GL (GL_NV_timeline_semaphore)
        self._fbo = 0
        self._moderngl: Any = None
        self._host_map: SharedMapping | None = None  # memfd imports: the pages this texture is a copy of
        self.zero_copy = True  # False for memfd imports (an uploaded copy: sync_to_image / sync_to_host)

    @property
    def pitched(self) -> bool:
        """A texture whose memory is pitch-linear rows (cuda_vmm): GL sees it as .buffer, read with the row pitch."""
        return self.descriptor.kind == "texture2d" and bool(self.buffer)

    @property
    def shape(self) -> tuple[int, ...]:
        if self.descriptor.kind == "buffer":
            return (_gl_buffer_size(self.descriptor),)
        return super().shape

    @property
    def format(self) -> Format:
        return get_format(self.descriptor.format)

    # -- sharing ---------------------------------------------------------------------------------------------------
    def export_fds(self) -> list[int]:
        """GL cannot export memory: the fds come from the Vulkan allocation GL borrowed (GL-created resources)."""
        self._check_open()
        if self._producer is None:
            raise BackendError("this GL resource was imported; GL cannot re-export memory (share its handle instead)")
        return self._producer.export_fds()

    @property
    def producer(self) -> Resource | None:
        """The Vulkan resource that owns the memory, for a resource GL created."""
        return self._producer

    # -- rendering -------------------------------------------------------------------------------------------------
    def framebuffer(self) -> int:
        """A framebuffer object with this texture (mip 0, layer 0) as GL_COLOR_ATTACHMENT0; made once, owned here."""
        self._check_open()
        if not self.texture:
            raise TypeError("a buffer has no framebuffer")
        if self._fbo:
            return self._fbo
        self.context.enter()
        with gl_errors("framebuffer"):
            prev = _get_int(GL.GL_FRAMEBUFFER_BINDING)
            fbo = int(GL.glGenFramebuffers(1))
            GL.glBindFramebuffer(GL.GL_FRAMEBUFFER, fbo)
            try:
                if self.target == GL.GL_TEXTURE_2D:
                    GL.glFramebufferTexture2D(GL.GL_FRAMEBUFFER, GL.GL_COLOR_ATTACHMENT0, GL.GL_TEXTURE_2D,
                                              self.texture, 0)
                else:
                    GL.glFramebufferTextureLayer(GL.GL_FRAMEBUFFER, GL.GL_COLOR_ATTACHMENT0, self.texture, 0, 0)
                status = GL.glCheckFramebufferStatus(GL.GL_FRAMEBUFFER)
            finally:
                GL.glBindFramebuffer(GL.GL_FRAMEBUFFER, prev)
        if status != GL.GL_FRAMEBUFFER_COMPLETE:
            GL.glDeleteFramebuffers(1, _GLuint1(fbo))
            raise BackendError(f"framebuffer for {self.descriptor.format} is incomplete (status {status:#x})")
        self._fbo = fbo
        return fbo

    def moderngl_texture(self, ctx: Any) -> Any:
        """This texture as a moderngl.Texture (ctx.external_texture; the GL name stays owned by this resource)."""
        self._check_open()
        if not self.texture or self.target != GL.GL_TEXTURE_2D:
            raise TypeError("only 2D textures have a moderngl wrapper")
        fmt = self.format
        dtype = _MODERNGL_DTYPE.get(fmt.dtype) if fmt.gl_format != GL.GL_RED_INTEGER else "u4"
        if dtype is None or fmt.channels not in (1, 2, 3, 4) or fmt.name == "rgb10a2":
            raise TypeError(f"moderngl has no dtype for {fmt.name}")
        d = self.descriptor
        return ctx.external_texture(self.texture, (d.width, d.height), fmt.channels, 0, dtype)

    # -- sync ------------------------------------------------------------------------------------------------------
    def _attach_timeline(self, fd: int) -> None:
        """The exporter orders its GPU work with a timeline semaphore (fd; taken). With GL_NV_timeline_semaphore
        GL imports it and waits/signals values on the GPU. Without, it is imported into Vulkan and waited/signalled
        from the host: correct everywhere, at the cost of a CPU wait per handoff."""
        with close_on_error(self.close), OwnedFds([fd], [FD_SEMAPHORE]) as owned:  # both imports take the fd
            if self.context.caps.timeline_semaphore:
                self._gl_semaphore = GLBackend().import_semaphore(owned.take_one(FD_SEMAPHORE), self.context,
                                                                  timeline=True)
            else:
                from ._vk import default_device
                dev = default_device()
                self._host_semaphore = dev.import_timeline_semaphore(owned.take_one(FD_SEMAPHORE))

    @property
    def _timeline(self) -> Any:
        producer_sem = getattr(self._producer, "semaphore", None)
        return producer_sem if producer_sem is not None else self._host_semaphore

    def gpu_acquired(self, value: int) -> None:
        """Order GL after the releaser: a GPU wait on the timeline value (GL semaphore), else a host wait."""
        if self._gl_semaphore is not None:
            self._gl_semaphore.wait([self], self.shared_layout, value)
            return
        sem = self._timeline
        if sem is not None and value and not sem.wait(value, timeout=10.0):
            raise BackendError(f"the previous owner's GPU work (timeline value {value}) did not finish within 10 s")

    def gpu_releasing(self, acquired_value: int) -> int | None:
        """GPU path: signal acquired+1 on the timeline after GL's work (+ glFlush). Otherwise glFinish and, where
        the resource's peers wait on a timeline, signal the next value from the host."""
        if self._gl_semaphore is not None:
            self._gl_semaphore.signal([self], self.shared_layout, acquired_value + 1)
            self.gl_sync = "semaphore"
            return acquired_value + 1
        self.end_access()
        sem = self._timeline
        if sem is None:
            return None
        sem.signal(acquired_value + 1)
        return acquired_value + 1

    @property
    def shared_layout(self) -> str:
        """The layout both APIs keep the image in between operations (the exporter's choice, default general)."""
        return str(self.descriptor.driver_private.get("shared_layout", "general"))

    def begin_access(self, semaphore: GLSemaphore | None = None, layout: str | None = None) -> None:
        """Order GL after the other API: wait on its semaphore (GL_EXT_semaphore_fd), else nothing is needed
        because the other side completed its work before releasing the keyed mutex."""
        self._check_open()
        if semaphore is not None:
            semaphore.wait([self], layout or self.shared_layout)

    def end_access(self, semaphore: GLSemaphore | None = None, layout: str | None = None) -> None:
        """Make GL's work visible before the keyed mutex is released: signal + glFlush with a semaphore, else
        glFinish (llvmpipe has no GL_EXT_semaphore_fd). Records the path in `gl_sync`."""
        self._check_open()
        self.context.enter()
        if semaphore is not None and self.context.caps.semaphore_fd:
            semaphore.signal([self], layout or self.shared_layout)
            self.gl_sync = "semaphore"
        else:
            GL.glFinish()
            self.gl_sync = "finish"

    # -- GPU copies ------------------------------------------------------------------------------------------------
    def copy_to(self, dst: Any) -> None:
        """Copy this texture (mip 0, layer 0) into `dst` on the GPU (glCopyImageSubData): a GLResource, a moderngl
        texture or a GL texture name living in this resource's context (or one sharing its objects), of the same
        size and a compatible format. Complete when it returns (a fence wait): a receiver re-checks the slot's
        sequence after it, so a copy the sender overlapped is retried, never shown."""
        self._check_open()
        name, target = texture_name(dst)
        d = self.descriptor
        self.context.enter()
        if self.pitched:  # rows in a buffer: unpack them into the texture on the GPU (a pixel-unpack buffer)
            fmt = self.format
            with gl_errors("glTexSubImage2D from a pixel-unpack buffer"), _pixel_store(), \
                    _bound_texture(target, name):
                GL.glPixelStorei(GL.GL_UNPACK_ROW_LENGTH, d.row_pitch // fmt.bytes_per_pixel)
                GL.glBindBuffer(GL.GL_PIXEL_UNPACK_BUFFER, self.buffer)
                _gl11.glTexSubImage2D(target, 0, 0, 0, d.width, d.height, fmt.gl_format, fmt.gl_type,
                                      ctypes.c_void_p(d.offset))
            finish()
            return
        if not self.texture:
            raise BackendError("copy_to copies textures; this GL resource is a buffer")
        with gl_errors("glCopyImageSubData"):
            _gl43.glCopyImageSubData(self.texture, self.target, 0, 0, 0, 0, name, target, 0, 0, 0, 0,
                                     d.width, d.height, 1)
        finish()

    # -- CPU transfers ---------------------------------------------------------------------------------------------
    def upload(self, array: np.ndarray) -> None:
        """Copy `array` in; complete for every other process and API when this returns (like Vulkan and CUDA):
        GL only queues the copy, and another process's import never sees this context's pending work. Holding
        this resource's keyed mutex, release() orders it (semaphore signal or glFinish), so a flush is enough."""
        self._check_open()
        self.context.enter()
        if self.pitched:
            rows = np.zeros((self.descriptor.height, self.descriptor.row_pitch), np.uint8)
            rows[:, :self.descriptor.width * self.format.bytes_per_pixel] = \
                np.ascontiguousarray(self._check_frame(array)).view(np.uint8).reshape(self.descriptor.height, -1)
            self._buffer_upload(rows.reshape(-1))
            self._uploaded()
            return
        if self.buffer:
            self._buffer_upload(self._check_bytes(array))
            self._uploaded()
            return
        data = self._texture_array(array)
        if self._host_map is not None and not np.may_share_memory(data, self._host_view()):
            self._host_view()[...] = data  # a memfd import: the shared pages are the truth, the texture a copy
        d, fmt = self.descriptor, self.format
        with gl_errors("glTexSubImage"), _pixel_store(), _bound_texture(self.target, self.texture):
            if self.target == GL.GL_TEXTURE_2D:
                _gl11.glTexSubImage2D(self.target, 0, 0, 0, d.width, d.height, fmt.gl_format, fmt.gl_type,
                                   data.ctypes.data_as(ctypes.c_void_p))
            else:
                _gl12.glTexSubImage3D(self.target, 0, 0, 0, 0, d.width, d.height, d.array_size, fmt.gl_format,
                                   fmt.gl_type, data.ctypes.data_as(ctypes.c_void_p))
        self._uploaded()

    def _uploaded(self) -> None:
        mutex = self._mutex
        if mutex is not None and mutex.owned:
            GL.glFlush()  # release() will finish or signal: the keyed mutex orders the peer after this work
        else:
            GL.glFinish()

    def download(self) -> np.ndarray:
        self._check_open()
        self.context.enter()
        d, caps = self.descriptor, self.context.caps
        if self.pitched:
            raw = np.empty(d.offset + d.row_pitch * d.height, np.uint8)
            self._buffer_download(raw)
            fmt = self.format
            rows = raw[d.offset:].reshape(d.height, d.row_pitch)[:, :d.width * fmt.bytes_per_pixel]
            return np.ascontiguousarray(rows).view(fmt.numpy_dtype).reshape(self.shape)
        if self.buffer:
            out = np.empty(self.shape, np.uint8)
            self._buffer_download(out)
            return out
        fmt = self.format
        shape = self.shape if d.array_size == 1 else (d.array_size, *self.shape)
        out = np.empty(shape, fmt.numpy_dtype)
        with gl_errors("glGetTexImage"), _pixel_store():
            if caps.api == "gl":
                with _bound_texture(self.target, self.texture):
                    _gl10.glGetTexImage(self.target, 0, fmt.gl_format, fmt.gl_type, out.ctypes.data_as(ctypes.c_void_p))
            else:  # GLES has no glGetTexImage: read back through the framebuffer, layer 0 only
                if d.array_size != 1:
                    raise BackendError("GLES cannot read back texture arrays")
                prev = _get_int(GL.GL_READ_FRAMEBUFFER_BINDING)
                GL.glBindFramebuffer(GL.GL_READ_FRAMEBUFFER, self.framebuffer())
                try:
                    _gl10.glReadPixels(0, 0, d.width, d.height, fmt.gl_format, fmt.gl_type,
                                    out.ctypes.data_as(ctypes.c_void_p))
                finally:
                    GL.glBindFramebuffer(GL.GL_READ_FRAMEBUFFER, prev)
        return out

    # -- memfd imports (an uploaded copy of the shared pages) ------------------------------------------------------
    def _host_view(self) -> np.ndarray:
        d, fmt = self.descriptor, self.format
        assert self._host_map is not None
        return self._host_map.array(self.shape, fmt.numpy_dtype, offset=d.offset,
                                    strides=(d.row_pitch, fmt.bytes_per_pixel, fmt.numpy_dtype.itemsize))

    def sync_to_image(self) -> None:
        """memfd → texture after CPU writes to the shared pages (memfd imports only; a no-op otherwise)."""
        self._check_open()
        if self._host_map is not None:
            self.upload(self._host_view())

    def sync_to_host(self) -> None:
        """texture → memfd after GL writes (memfd imports only; a no-op otherwise)."""
        self._check_open()
        if self._host_map is not None:
            self._host_view()[...] = self.download()

    def _texture_array(self, array: np.ndarray) -> np.ndarray:
        d = self.descriptor
        shape = self.shape if d.array_size == 1 else (d.array_size, *self.shape)
        return np.ascontiguousarray(self._check_frame(array, shape))

    def _buffer_upload(self, data: np.ndarray) -> None:
        """Memory-object buffers are immutable with no DYNAMIC_STORAGE_BIT, so glBufferSubData is illegal: copy
        from a staging buffer on the GPU instead."""
        with gl_errors("buffer upload"):
            staging = int(GL.glGenBuffers(1))
            try:
                with _bound_buffer(GL.GL_COPY_READ_BUFFER, staging), \
                        _bound_buffer(GL.GL_COPY_WRITE_BUFFER, self.buffer):
                    _gl15.glBufferData(GL.GL_COPY_READ_BUFFER, data.size, data.ctypes.data_as(ctypes.c_void_p),
                                    GL.GL_STREAM_DRAW)
                    GL.glCopyBufferSubData(GL.GL_COPY_READ_BUFFER, GL.GL_COPY_WRITE_BUFFER, 0, 0, data.size)
            finally:
                GL.glDeleteBuffers(1, _GLuint1(staging))

    def _buffer_download(self, out: np.ndarray) -> None:
        with gl_errors("buffer download"):
            if self.context.caps.api == "gl":
                with _bound_buffer(GL.GL_COPY_READ_BUFFER, self.buffer):
                    _gl15.glGetBufferSubData(GL.GL_COPY_READ_BUFFER, 0, out.size, out.ctypes.data_as(ctypes.c_void_p))
                return
            # GLES: no glGetBufferSubData and the imported buffer cannot be mapped; copy to a mappable one
            staging = int(GL.glGenBuffers(1))
            try:
                with _bound_buffer(GL.GL_COPY_READ_BUFFER, self.buffer), \
                        _bound_buffer(GL.GL_COPY_WRITE_BUFFER, staging):
                    _gl15.glBufferData(GL.GL_COPY_WRITE_BUFFER, out.size, None, GL.GL_STREAM_READ)
                    GL.glCopyBufferSubData(GL.GL_COPY_READ_BUFFER, GL.GL_COPY_WRITE_BUFFER, 0, 0, out.size)
                    ptr = _gl30.glMapBufferRange(GL.GL_COPY_WRITE_BUFFER, 0, out.size, GL.GL_MAP_READ_BIT)
                    ctypes.memmove(out.ctypes.data, ptr, out.size)
                    GL.glUnmapBuffer(GL.GL_COPY_WRITE_BUFFER)
            finally:
                GL.glDeleteBuffers(1, _GLuint1(staging))

    # -- lifetime --------------------------------------------------------------------------------------------------
    def gl_names(self) -> dict[str, int]:
        """Every GL object this resource owns (for leak checks and debugging)."""
        return {"texture": self.texture, "buffer": self.buffer, "memory_object": self.memory_object,
                "framebuffer": self._fbo}

    def _release(self) -> None:
        tex, buf, mem, fbo = self.texture, self.buffer, self.memory_object, self._fbo
        self.texture = self.buffer = self.memory_object = self._fbo = 0
        producer, self._producer = self._producer, None
        host_sem, self._host_semaphore = self._host_semaphore, None
        gl_sem, self._gl_semaphore = self._gl_semaphore, None
        host_map, self._host_map = self._host_map, None
        if host_map is not None:
            host_map.close()  # views of it (none handed out) would keep it alive
        try:
            if host_sem is not None:
                host_sem.destroy()
            if gl_sem is not None:
                gl_sem.close()
            if self.context.try_enter():
                _delete_objects(tex, buf, mem, fbo)
            elif tex or buf or mem:
                warnings.warn(f"GL objects of {self!r} not deleted: their context is not current on this thread",
                              ResourceWarning, stacklevel=3)
        finally:
            if producer is not None:
                producer.close()


def texture_name(tex: Any) -> tuple[int, int]:
    """(GL name, target) of a texture given as a GLResource, a moderngl texture (.glo) or a bare GL name."""
    if isinstance(tex, GLResource):
        tex._check_open()
        if not tex.texture:
            raise InvalidArgument(f"{tex!r} is a buffer, not a texture")
        return tex.texture, tex.target
    name = getattr(tex, "glo", tex)
    if isinstance(name, bool) or not isinstance(name, (int, np.integer)) or name <= 0:
        raise InvalidArgument(f"a GL texture is a GLResource, a moderngl texture or a GL texture name, not {tex!r}")
    return int(name), GL.GL_TEXTURE_2D


def finish() -> None:
    """Wait until the GL commands issued so far are complete (a fence: cheaper than glFinish on drivers that
    would also wait for presentation work)."""
    with gl_errors("glFenceSync"):
        sync = _gl32.glFenceSync(_gl32.GL_SYNC_GPU_COMMANDS_COMPLETE, 0)
    try:
        while _gl32.glClientWaitSync(sync, _gl32.GL_SYNC_FLUSH_COMMANDS_BIT, 1_000_000_000) == _gl32.GL_TIMEOUT_EXPIRED:
            pass
    finally:
        _gl32.glDeleteSync(sync)


def write_texture(tex: Any, array: np.ndarray, format: str) -> None:
    """Upload (H, W, C) pixels of texbridge `format` into a texture given as texture_name() takes, in the context
    current on this thread; complete when it returns."""
    name, target = texture_name(tex)
    fmt = get_format(format)
    data = np.ascontiguousarray(array)
    h, w = data.shape[:2]
    with gl_errors("glTexSubImage2D"), _pixel_store(), _bound_texture(target, name):
        _gl11.glTexSubImage2D(target, 0, 0, 0, w, h, fmt.gl_format, fmt.gl_type, data.ctypes.data_as(ctypes.c_void_p))
    finish()


def _delete_objects(tex: int = 0, buf: int = 0, mem: int = 0, fbo: int = 0) -> None:
    """Delete in dependency order: the FBO and texture/buffer hold the memory object's storage."""
    if fbo:
        GL.glDeleteFramebuffers(1, _GLuint1(fbo))
    if tex:
        GL.glDeleteTextures(1, _GLuint1(tex))
    if buf:
        GL.glDeleteBuffers(1, _GLuint1(buf))
    if mem:
        _mo.glDeleteMemoryObjectsEXT(1, _GLuint1(mem))


# -- the backend ----------------------------------------------------------------------------------------------------


def _tiling(descriptor: Descriptor) -> int:
    raw = descriptor.driver_private.get("tiling", "optimal")
    tiling = _VK_TILING.get(raw)
    if tiling is None:
        raise InvalidDescriptor(f"GL can import optimal or linear tiling only, not {raw!r} (DRM format modifiers "
                                "need EGLImage import)")
    return GL_OPTIMAL_TILING_EXT if tiling == "optimal" else GL_LINEAR_TILING_EXT


LLVMPIPE_BUFFER_PAD = 64  # llvmpipe over-reads buffers by one SIMD vector and so refuses memory without that slack


def _gl_buffer_size(descriptor: Descriptor) -> int:
    """Bytes of the GL buffer: the whole memory, unless the exporter left slack (driver_private gl_buffer_size)."""
    v = descriptor.driver_private.get("gl_buffer_size", descriptor.size)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= descriptor.size:
        raise InvalidDescriptor(f"driver_private['gl_buffer_size'] must be 1..{descriptor.size}, not {v!r}")
    return v


def _check_uuids(descriptor: Descriptor, caps: GLCaps) -> None:
    """OPAQUE_FD memory is only meaningful to the same driver on the same device: refuse before importing."""
    if descriptor.driver_uuid and descriptor.driver_uuid != caps.driver_uuid:
        raise IncompatibleDevice(
            f"memory exported by driver {descriptor.driver_uuid.hex()} cannot be imported by GL driver "
            f"{caps.driver_uuid.hex() or '(none reported)'} ({caps.renderer})")
    if descriptor.device_uuid and descriptor.device_uuid not in caps.device_uuids:
        raise IncompatibleDevice(
            f"memory exported by device {descriptor.device_uuid.hex()} cannot be imported by the GL context on "
            f"{', '.join(u.hex() for u in caps.device_uuids) or '(no device UUID)'} ({caps.renderer})")


class GLBackend:
    """Backend protocol for OpenGL (see the module docstring for contexts, producers and sync)."""

    name = "gl"

    # -- import ----------------------------------------------------------------------------------------------------
    def import_resource(self, descriptor: Descriptor, fds: Sequence[int], context: Any = None,
                        **options: Any) -> GLResource:
        """Import Vulkan-exported memory (fds[0], OPAQUE_FD). Takes ownership of every fd in `fds`."""
        with OwnedFds.for_import(descriptor, fds) as owned:  # closes what the import did not take
            if options:
                raise TypeError(f"gl backend import takes no options: {', '.join(options)}")
            if owned.get(FD_MEMORY) < 0:
                raise InvalidDescriptor("no memory fd to import")
            if check_importer(descriptor.memory, "gl").host_mappable:
                return self._import_memfd(descriptor, owned, context)
            res = self._import(descriptor, owned, context, None)
            sem_fd = owned.take_one(FD_SEMAPHORE)
            if sem_fd >= 0:
                res._attach_timeline(sem_fd)
            return res

    def _import(self, descriptor: Descriptor, fds: OwnedFds, context: Any, producer: Resource | None) -> GLResource:
        """Import the memory fd, taken from `fds` once GL owns it (a successful glImportMemoryFdEXT)."""
        check_importer(descriptor.memory, "gl", "dma_buf needs EGLImage import, which this backend does not do yet: "
                       "create the resource with memory='opaque_fd'" if descriptor.memory == "dma_buf" else "")
        if descriptor.kind not in ("texture2d", "buffer"):
            raise InvalidDescriptor(f"the gl backend imports textures and buffers, not {descriptor.kind}")
        ctx = resolve_context(context, descriptor.device_uuid)
        caps = ctx.caps
        if not caps.memory_object_fd:
            raise BackendError(f"GL_EXT_memory_object_fd is not supported by {caps.renderer} ({caps.version})")
        _check_uuids(descriptor, caps)
        priv = descriptor.driver_private
        alloc_size = int(priv.get("allocation_size", descriptor.size))
        offset = int(priv.get("offset", 0))
        pitched = descriptor.memory == "cuda_vmm"  # pitch-linear rows: seen as a buffer (see GLResource.pitched)
        if pitched and descriptor.kind == "texture2d" and (len(descriptor.planes) != 1 or descriptor.mip_levels != 1
                                                            or descriptor.array_size != 1):
            raise InvalidDescriptor("a cuda_vmm texture is one pitch-linear plane")
        if descriptor.kind == "texture2d" and not pitched:
            fmt = get_format(descriptor.format)
            tiling = _tiling(descriptor)
        drain_errors()
        mem = _GLuint1()
        with gl_errors("glCreateMemoryObjectsEXT"):
            _mo.glCreateMemoryObjectsEXT(1, mem)
        memory = int(mem[0])
        tex = buf = 0
        with close_on_error(lambda: _delete_objects(tex, buf, memory)):
            if priv.get("dedicated"):
                with gl_errors("glMemoryObjectParameterivEXT(GL_DEDICATED_MEMORY_OBJECT_EXT)"):
                    _mo.glMemoryObjectParameterivEXT(memory, GL_DEDICATED_MEMORY_OBJECT_EXT, (ctypes.c_int * 1)(1))
            with gl_errors("glImportMemoryFdEXT"):
                _mofd.glImportMemoryFdEXT(memory, alloc_size, GL_HANDLE_TYPE_OPAQUE_FD_EXT, fds.get(FD_MEMORY))
            fds.take(FD_MEMORY)  # a successful import transfers the fd to GL
            if descriptor.kind == "buffer" or pitched:
                buf = int(GL.glGenBuffers(1))
                gl_size = _gl_buffer_size(descriptor)
                try:
                    with gl_errors("glBufferStorageMemEXT"), _bound_buffer(GL.GL_COPY_WRITE_BUFFER, buf):
                        _mo.glBufferStorageMemEXT(GL.GL_COPY_WRITE_BUFFER, gl_size, memory, offset)
                        # Mesa reports no error when the fd was not importable memory: verify the storage exists
                        ok = _get_buffer_int(GL.GL_COPY_WRITE_BUFFER, GL.GL_BUFFER_SIZE) == gl_size
                except BackendError as e:
                    if "llvmpipe" in caps.renderer and gl_size + LLVMPIPE_BUFFER_PAD > alloc_size:
                        raise BackendError(
                            f"{e}: llvmpipe needs the memory {LLVMPIPE_BUFFER_PAD} bytes larger than a GL buffer "
                            "made from it; create the buffer with backend='gl' (which pads), or allocate "
                            f"{LLVMPIPE_BUFFER_PAD} more bytes and set driver_private['gl_buffer_size']") from None
                    raise
                target = 0
            else:
                target = GL.GL_TEXTURE_2D if descriptor.array_size == 1 else GL.GL_TEXTURE_2D_ARRAY
                tex = int(GL.glGenTextures(1))
                with gl_errors("glTexStorageMem2DEXT"), _bound_texture(target, tex):
                    GL.glTexParameteri(target, GL_TEXTURE_TILING_EXT, tiling)
                    if target == GL.GL_TEXTURE_2D:
                        _mo.glTexStorageMem2DEXT(target, descriptor.mip_levels, fmt.gl_internal, descriptor.width,
                                                 descriptor.height, memory, offset)
                    else:
                        _mo.glTexStorageMem3DEXT(target, descriptor.mip_levels, fmt.gl_internal, descriptor.width,
                                                 descriptor.height, descriptor.array_size, memory, offset)
                    ok = _get_tex_int(target, GL.GL_TEXTURE_WIDTH) == descriptor.width
                    GL.glTexParameteri(target, GL.GL_TEXTURE_MAX_LEVEL, descriptor.mip_levels - 1)
                    if descriptor.mip_levels == 1:
                        GL.glTexParameteri(target, GL.GL_TEXTURE_MIN_FILTER, GL.GL_LINEAR)
                    if fmt.gl_swizzle:
                        for pname, comp in zip((GL.GL_TEXTURE_SWIZZLE_R, GL.GL_TEXTURE_SWIZZLE_G,
                                                GL.GL_TEXTURE_SWIZZLE_B, GL.GL_TEXTURE_SWIZZLE_A), fmt.gl_swizzle):
                            GL.glTexParameteri(target, pname, _SWIZZLE[comp])
            if not ok:
                raise BackendError(f"{caps.renderer} did not attach the imported memory (not memory this driver "
                                   "exported, or exported by another device)")
        return GLResource(descriptor, ctx, memory_object=memory, texture=tex, buffer=buf, target=target,
                          producer=producer)

    def _import_memfd(self, d: Descriptor, fds: OwnedFds, context: Any) -> GLResource:
        """memfd → GL: GL cannot import CPU memory, so the texture is a GL-owned copy of the mapped pages, uploaded
        now and by sync_to_image() (sync_to_host() writes it back), as Vulkan's staged memfd path does."""
        if d.kind != "texture2d" or d.mip_levels != 1 or d.array_size != 1:
            raise InvalidDescriptor("the gl backend imports memfd textures (one mip, one layer) as an uploaded copy; "
                                    "map memfd buffers with the memfd backend")
        facts = inspect_fd(fds.get(FD_MEMORY))
        if not facts.size_sealed or facts.size < d.required_size():
            raise InvalidDescriptor("memory is not a size-sealed memfd large enough for its descriptor")
        ctx = resolve_context(context)
        fmt = get_format(d.format)
        mapping = SharedMapping(fds.get(FD_MEMORY), facts.size)
        tex = 0
        with close_on_error(lambda: (_delete_objects(tex), mapping.close())):
            drain_errors()
            tex = int(GL.glGenTextures(1))
            with gl_errors("glTexStorage2D"), _bound_texture(GL.GL_TEXTURE_2D, tex):
                GL.glTexStorage2D(GL.GL_TEXTURE_2D, 1, fmt.gl_internal, d.width, d.height)
                GL.glTexParameteri(GL.GL_TEXTURE_2D, GL.GL_TEXTURE_MIN_FILTER, GL.GL_LINEAR)
                GL.glTexParameteri(GL.GL_TEXTURE_2D, GL.GL_TEXTURE_MAX_LEVEL, 0)
                if fmt.gl_swizzle:
                    for pname, comp in zip((GL.GL_TEXTURE_SWIZZLE_R, GL.GL_TEXTURE_SWIZZLE_G,
                                            GL.GL_TEXTURE_SWIZZLE_B, GL.GL_TEXTURE_SWIZZLE_A), fmt.gl_swizzle):
                        GL.glTexParameteri(GL.GL_TEXTURE_2D, pname, _SWIZZLE[comp])
            res = GLResource(d, ctx, memory_object=0, texture=tex, target=GL.GL_TEXTURE_2D)
            res._host_map = mapping
            res.zero_copy = False
            res.sync_to_image()
        return res  # the mapping keeps the pages; the fd closes with `fds`

    def import_semaphore(self, fd: int, context: Any = None, *, timeline: bool = False) -> GLSemaphore:
        """Import a Vulkan semaphore (OPAQUE_FD) for GPU-side ordering; timeline=True for a timeline semaphore
        (needs GL_NV_timeline_semaphore). Takes ownership of `fd`."""
        with OwnedFds([fd], [FD_SEMAPHORE]) as owned:
            ctx = resolve_context(context)
            if not ctx.caps.semaphore_fd:
                raise BackendError(f"GL_EXT_semaphore_fd is not supported by {ctx.caps.renderer}")
            if timeline and not ctx.caps.timeline_semaphore:
                raise BackendError(f"GL_NV_timeline_semaphore is not supported by {ctx.caps.renderer}")
            check_semaphore_fd(fd, "glImportSemaphoreFdEXT")
            drain_errors()
            sem = _GLuint1()
            with gl_errors("glCreateSemaphoresNV" if timeline else "glGenSemaphoresEXT"):
                if timeline:  # the type must be set before the import, on a semaphore made by glCreateSemaphoresNV
                    _tl.glCreateSemaphoresNV(1, sem)
                    _tl.glSemaphoreParameterivNV(int(sem[0]), _tl.GL_SEMAPHORE_TYPE_NV,
                                                 (ctypes.c_int * 1)(_tl.GL_SEMAPHORE_TYPE_TIMELINE_NV))
                else:
                    _sem.glGenSemaphoresEXT(1, sem)
            with close_on_error(lambda: _sem.glDeleteSemaphoresEXT(1, sem)), gl_errors("glImportSemaphoreFdEXT"):
                _semfd.glImportSemaphoreFdEXT(int(sem[0]), GL_HANDLE_TYPE_OPAQUE_FD_EXT, fd)
            owned.take(FD_SEMAPHORE)  # a successful import transfers the fd to GL
            return GLSemaphore(ctx, int(sem[0]), timeline=timeline)

    # -- GL as a producer (memory from Vulkan) ---------------------------------------------------------------------
    def _vulkan(self) -> Any:
        """The Vulkan backend, imported directly (a sibling module; lazily: GL import alone does not need it)."""
        try:
            from . import vulkan
        except ImportError as e:
            raise BackendError(f"GL cannot allocate shareable memory itself and the vulkan backend is "
                               f"unavailable: {e} (install texbridge[vulkan])") from e
        return vulkan.BACKEND

    def _vulkan_device(self, caps: GLCaps) -> Any:
        """The Vulkan device GL can import from: the process's default one if its UUID is among the GL context's,
        else one selected by the GL context's device UUID (kept for the life of the process)."""
        from . import _vk

        default = _vk.default_device()
        if not caps.device_uuids or default.device_uuid in caps.device_uuids:
            return default
        with _vk_lock:
            for uuid in caps.device_uuids:
                dev = _vk_devices.get(uuid)
                if dev is None or dev.closed:
                    try:
                        dev = _vk_devices[uuid] = _vk.VulkanDevice(select=uuid)
                    except BackendError:
                        continue
                return dev
        raise IncompatibleDevice(f"no Vulkan device matches the GL context's device "
                                 f"{', '.join(u.hex() for u in caps.device_uuids)} ({caps.renderer})")

    def _produce(self, create: Any, context: Any, gl_buffer_size: int | None = None) -> GLResource:
        ctx = resolve_context(context)
        caps = ctx.caps
        if not caps.memory_object_fd:
            raise BackendError(f"GL_EXT_memory_object_fd is not supported by {caps.renderer} ({caps.version})")
        vk_res = create(self._vulkan_device(caps))
        ctx.enter()  # creating a Vulkan device may have run other GL/EGL code on this thread
        with close_on_error(vk_res.close):
            desc = vk_res.descriptor.with_(backend="gl")
            if gl_buffer_size is not None:
                desc = desc.with_(driver_private={**desc.driver_private, "gl_buffer_size": gl_buffer_size})
            with OwnedFds.for_import(desc, vk_res.export_fds()) as owned:
                res = self._import(desc, owned, ctx, vk_res)
                if caps.timeline_semaphore and owned.get(FD_SEMAPHORE) >= 0:
                    # GL itself waits/signals the resource's timeline on the GPU
                    res._attach_timeline(owned.take_one(FD_SEMAPHORE))
                return res

    def create_texture(self, width: int, height: int, format: str, *, usage: int = int(Usage.DEFAULT),
                       keyed_mutex: bool = False, context: Any = None, mip_levels: int = 1, array_size: int = 1,
                       **options: Any) -> GLResource:
        """A texture GL can render into (see framebuffer()), allocated by Vulkan on the GL context's device."""
        if options:
            raise TypeError(f"gl backend create_texture got unknown options: {', '.join(options)}")
        vk = self._vulkan()
        # OPAQUE_FD explicitly: "auto" would pick dma_buf where the driver can, which memory objects cannot import
        return self._produce(lambda dev: vk.create_texture(width, height, format, usage=usage,
                                                           keyed_mutex=keyed_mutex, device=dev, memory="opaque_fd",
                                                           mip_levels=mip_levels, array_size=array_size), context)

    def create_buffer(self, size: int, *, usage: int = int(Usage.DEFAULT), keyed_mutex: bool = False,
                      context: Any = None, **options: Any) -> GLResource:
        if options:
            raise TypeError(f"gl backend create_buffer got unknown options: {', '.join(options)}")
        vk = self._vulkan()
        ctx = resolve_context(context)
        pad = LLVMPIPE_BUFFER_PAD if "llvmpipe" in ctx.caps.renderer else 0
        return self._produce(lambda dev: vk.create_buffer(size + pad, usage=usage, keyed_mutex=keyed_mutex,
                                                          device=dev), ctx,
                             gl_buffer_size=size if pad else None)

    # -- doctor ----------------------------------------------------------------------------------------------------
    def diagnostics(self) -> dict[str, Any]:
        """EGL platform, GL strings, interop extensions and UUIDs of the headless context. Never raises."""
        info: dict[str, Any] = {"available": False, "pyopengl_platform": os.environ.get("PYOPENGL_PLATFORM", "")}
        try:
            info["egl_client_extensions"] = sorted(_egl.client_extensions())
            info["egl_devices"] = [{"node": d.node, "software": d.software} for d in _egl.devices()]
            ctx = headless_context()
            caps = ctx.caps
            info.update({
                "egl_platform": ctx.egl.platform if ctx.egl else "",
                "egl_vendor": ctx.egl.egl_vendor if ctx.egl else "",
                "gl_api": caps.api, "gl_vendor": caps.vendor, "gl_renderer": caps.renderer,
                "gl_version": caps.version,
                "memory_object": "GL_EXT_memory_object" in caps.extensions,
                "memory_object_fd": "GL_EXT_memory_object_fd" in caps.extensions,
                "semaphore": "GL_EXT_semaphore" in caps.extensions,
                "semaphore_fd": "GL_EXT_semaphore_fd" in caps.extensions,
                "driver_uuid": caps.driver_uuid.hex(), "device_uuids": [u.hex() for u in caps.device_uuids],
                "sync": "semaphore" if caps.semaphore_fd else "finish",
                "available": caps.memory_object_fd,
            })
            info["detail"] = (f"{info['egl_platform']} EGL, {caps.renderer}, {caps.version}; "
                              f"sync by {info['sync']}" if caps.memory_object_fd else
                              f"GL_EXT_memory_object_fd missing on {caps.renderer}")
        except Exception as e:  # diagnostics must never raise
            info["detail"] = f"{type(e).__name__}: {e}"
        return info


BACKEND = GLBackend()

__all__ = ["BACKEND", "GLBackend", "GLContext", "GLResource", "GLSemaphore", "LAYOUTS", "finish", "headless_context",
           "resolve_context", "texture_name", "write_texture"]
