"""GL backend on real drivers (Mesa llvmpipe + lavapipe in CI, NVIDIA on the GPU machine). Nothing is mocked.

Cross-process tests hand the exported fd to a 'spawn' child over a socketpair (SCM_RIGHTS), the same way the broker
does, so the memory really crosses a process boundary. Skips name the missing capability.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket

import numpy as np
import pytest

from texbridge._descriptor import Descriptor
from texbridge._errors import BackendError, IncompatibleDevice, InvalidDescriptor

pytestmark = pytest.mark.gpu


# -- capability probes, computed once --------------------------------------------------------------------------------


def _load(name: str):
    from texbridge.backends import get_backend

    try:
        return get_backend(name), ""
    except BackendError as e:
        return None, str(e)


@pytest.fixture(scope="module")
def gl():
    backend, why = _load("gl")
    if backend is None:
        pytest.skip(f"GL backend unavailable: {why}")
    diag = backend.diagnostics()
    if "gl_renderer" not in diag:
        pytest.skip(f"no headless EGL GL context: {diag.get('detail')}")
    if not diag["memory_object_fd"]:
        pytest.skip(f"GL_EXT_memory_object_fd not supported by {diag['gl_renderer']}")
    return backend


@pytest.fixture(scope="module")
def caps(gl):
    from texbridge.backends.gl import headless_context

    return headless_context().caps


@pytest.fixture(scope="module")
def vkb(gl):
    backend, why = _load("vulkan")
    if backend is None:
        pytest.skip(f"vulkan backend unavailable: {why}")
    return backend


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _pattern(shape, dtype, seed=1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    if dt.kind == "f":
        return rng.uniform(-4, 4, shape).astype(dt)
    return rng.integers(0, np.iinfo(dt).max, shape, dtype=dt, endpoint=True)


# -- child processes (spawned: a fresh interpreter, nothing inherited but the socket) --------------------------------


def _send(sock: socket.socket, obj: dict, fds: list[int] = ()) -> None:
    import pickle

    data = pickle.dumps(obj)
    socket.send_fds(sock, [len(data).to_bytes(8, "little") + data], list(fds))


def _recv(sock: socket.socket) -> tuple[dict, list[int]]:
    import pickle

    head, fds, _, _ = socket.recv_fds(sock, 8, 8)
    if not head:
        raise EOFError("peer closed")
    n = int.from_bytes(head, "little")
    buf = b""
    while len(buf) < n:
        buf += sock.recv(n - len(buf))
    return pickle.loads(buf), fds


def _vulkan_producer(sock: socket.socket, kind: str, args: dict) -> None:
    """Child: create a Vulkan texture/buffer, fill it, send descriptor + fd, wait until the parent is done."""
    from texbridge.backends import get_backend

    vk = get_backend("vulkan")
    if kind == "texture":
        res = vk.create_texture(args["width"], args["height"], args["format"], memory="opaque_fd")
        desc = res.descriptor
    else:
        # llvmpipe needs slack after a GL buffer's bytes; the exporter says how much is the buffer proper
        res = vk.create_buffer(args["size"] + args.get("pad", 0))
        desc = res.descriptor.with_(driver_private={**res.descriptor.driver_private, "gl_buffer_size": args["size"]})
        args["data"] = np.concatenate([args["data"], np.zeros(args.get("pad", 0), np.uint8)])
    res.upload(args["data"])
    fds = res.export_fds()
    _send(sock, {"descriptor": desc.to_wire()}, fds)
    for fd in fds:
        os.close(fd)
    _recv(sock)  # the parent says it is done before we free the memory (it holds its own reference anyway)
    res.close()
    sock.close()


def _vulkan_consumer(sock: socket.socket) -> None:
    """Child: import whatever arrives with the vulkan backend and send its contents back."""
    from texbridge._descriptor import Descriptor
    from texbridge.backends import get_backend

    msg, fds = _recv(sock)
    res = get_backend("vulkan").import_resource(Descriptor.from_wire(msg["descriptor"]), fds)
    _send(sock, {"data": res.download()})
    res.close()
    sock.close()


def _spawn(target, *args):
    ctx = mp.get_context("spawn")
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = ctx.Process(target=target, args=(child, *args))  # multiprocessing duplicates the socket into the child
    proc.start()
    child.close()
    return proc, parent


# -- context, diagnostics, platform ------------------------------------------------------------------------------


def test_diagnostics_describe_the_headless_context(gl, caps):
    d = gl.diagnostics()
    assert d["available"] is True
    assert d["egl_platform"] in ("surfaceless", "default") or d["egl_platform"].startswith("device")
    assert d["gl_renderer"] == caps.renderer and d["gl_version"]
    assert len(bytes.fromhex(d["driver_uuid"])) == 16
    assert d["device_uuids"] and all(len(bytes.fromhex(u)) == 16 for u in d["device_uuids"])
    assert d["sync"] == ("semaphore" if caps.semaphore_fd else "finish")


def test_pyopengl_platform_is_egl_only_when_unset(tmp_path):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYOPENGL_PLATFORM"}
    code = "import os, texbridge.backends.gl; print(os.environ.get('PYOPENGL_PLATFORM'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "egl"
    # already imported OpenGL: too late to choose, so texbridge leaves the choice alone and says so when asked
    code = ("import os, OpenGL.GL, texbridge.backends.gl as g; print(os.environ.get('PYOPENGL_PLATFORM'));"
            "print(g.BACKEND.diagnostics()['detail'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "None"
    assert "PYOPENGL_PLATFORM=egl" in lines[1] or "EGL" in lines[1]
    # the user's explicit choice is never overridden
    env["PYOPENGL_PLATFORM"] = "egl"
    code = "import os, texbridge.backends.gl; print(os.environ['PYOPENGL_PLATFORM'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "egl"


def test_current_context_mode(gl, caps):
    from texbridge.backends.gl import headless_context, resolve_context

    own = headless_context()
    cur = resolve_context("current")  # the headless context is current on this thread: use it as "the user's"
    assert cur.caps.renderer == caps.renderer and not cur.headless
    own.egl.release_current()
    try:
        with pytest.raises(BackendError, match="no GL context is current"):
            resolve_context("current")
    finally:
        own.enter()
    with pytest.raises(TypeError):
        resolve_context(42)


# -- refusals (before anything is imported; no fd may leak) ------------------------------------------------------


def _opaque_desc(caps, **kw) -> Descriptor:
    base = dict(kind="texture2d", size=1 << 16, width=64, height=64, format="rgba8", memory="opaque_fd",
                backend="vulkan", driver_uuid=caps.driver_uuid, device_uuid=caps.device_uuids[0])
    base.update(kw)
    return Descriptor(**base).validate()


@pytest.mark.parametrize("field", ["driver_uuid", "device_uuid"])
def test_mismatched_uuid_refused_without_leaking_the_fd(gl, caps, field):
    wrong = bytes(b ^ 0xFF for b in getattr(caps, field if field == "driver_uuid" else "device_uuids")[0:16]) \
        if field == "driver_uuid" else bytes(b ^ 0xFF for b in caps.device_uuids[0])
    desc = _opaque_desc(caps, **{field: wrong})
    with pytest.raises(IncompatibleDevice):  # warm-up: the first UUID lookup may make the driver open a device fd
        gl.import_resource(desc, [os.memfd_create("warm-up")])  # it keeps (seen on a 2-GPU NVIDIA host)
    before = _fd_count()
    for _ in range(50):
        fd = os.memfd_create("not-imported")
        with pytest.raises(IncompatibleDevice, match=wrong.hex()):
            gl.import_resource(desc, [fd])
        with pytest.raises(OSError):
            os.fstat(fd)  # closed by the refusal (nothing else opened an fd meanwhile)
    assert _fd_count() == before


def test_bad_input_is_typed_and_closes_fds(gl, caps):
    before = _fd_count()
    cases = [
        (_opaque_desc(caps).with_(memory="memfd", planes=((0, 256),)), InvalidDescriptor),
        (_opaque_desc(caps, driver_private={"tiling": 1000158000}), InvalidDescriptor),  # DRM modifier tiling
        (Descriptor(kind="keyed_mutex", size=4096, memory="opaque_fd"), InvalidDescriptor),
    ]
    for desc, exc in cases:
        with pytest.raises(exc):
            gl.import_resource(desc, [os.memfd_create("bad")])
    with pytest.raises(TypeError):
        gl.import_resource(_opaque_desc(caps), [os.memfd_create("bad")], bogus=1)
    with pytest.raises(InvalidDescriptor):
        gl.import_resource(_opaque_desc(caps), [])
    assert _fd_count() == before


# -- Vulkan → GL across processes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("format", ["rgba8", "bgra8", "rgba16f", "r32f", "rg8", "rgba32f"])
def test_vulkan_texture_to_gl_across_processes_pixel_exact(gl, vkb, format):
    from texbridge._formats import get_format

    fmt = get_format(format)
    w, h = 61, 37  # odd sizes: no row-alignment luck
    data = _pattern((h, w, fmt.channels), fmt.numpy_dtype)
    proc, sock = _spawn(_vulkan_producer, "texture", {"width": w, "height": h, "format": format, "data": data})
    try:
        msg, fds = _recv(sock)
        before = _fd_count() - len(fds)  # counted here: multiprocessing keeps fds of its own for the socket hand-over
        desc = Descriptor.from_wire(msg["descriptor"])
        assert desc.memory == "opaque_fd" and len(fds) == 1
        with gl.import_resource(desc, fds) as res:
            got = res.download()
            assert got.dtype == fmt.numpy_dtype and got.shape == (h, w, fmt.channels)
            np.testing.assert_array_equal(got.view(np.uint8), data.view(np.uint8))  # bit-exact, NaN-safe
            if fmt.gl_swizzle:  # sampling a bgra texture reads red from the third byte
                from OpenGL import GL

                GL.glBindTexture(GL.GL_TEXTURE_2D, res.texture)
                assert GL.glGetTexParameteriv(GL.GL_TEXTURE_2D, GL.GL_TEXTURE_SWIZZLE_R) == GL.GL_BLUE
                GL.glBindTexture(GL.GL_TEXTURE_2D, 0)
        assert _fd_count() == before  # the fd went to GL, which closed it with the memory object
        _send(sock, {"done": True})
    finally:
        sock.close()
        proc.join(30)
    assert proc.exitcode == 0


def test_vulkan_buffer_to_gl_across_processes(gl, vkb, caps):
    from texbridge.backends.gl import LLVMPIPE_BUFFER_PAD

    data = _pattern((10_000,), np.uint8, seed=7)
    pad = LLVMPIPE_BUFFER_PAD if "llvmpipe" in caps.renderer else 0
    proc, sock = _spawn(_vulkan_producer, "buffer", {"size": data.size, "pad": pad, "data": data})
    try:
        msg, fds = _recv(sock)
        with gl.import_resource(Descriptor.from_wire(msg["descriptor"]), fds) as res:
            assert res.buffer and res.shape == (data.size,)
            np.testing.assert_array_equal(res.download(), data)
            res.upload(data[::-1].copy())  # and GL writes land in the shared memory
            np.testing.assert_array_equal(res.download(), data[::-1])
        _send(sock, {"done": True})
    finally:
        sock.close()
        proc.join(30)
    assert proc.exitcode == 0


# -- GL as a producer → Vulkan consumer in another process, and → NumPy ---------------------------------------------


def _render(res, w, h) -> np.ndarray:
    """glClear the whole target, then a scissored rectangle; returns what the pixels must be (rgba8)."""
    from OpenGL import GL

    fbo = res.framebuffer()
    GL.glBindFramebuffer(GL.GL_FRAMEBUFFER, fbo)
    GL.glViewport(0, 0, w, h)
    GL.glClearColor(0.0, 0.0, 1.0, 1.0)
    GL.glClear(GL.GL_COLOR_BUFFER_BIT)
    GL.glEnable(GL.GL_SCISSOR_TEST)
    GL.glScissor(5, 3, 10, 7)
    GL.glClearColor(1.0, 0.0, 0.0, 1.0)
    GL.glClear(GL.GL_COLOR_BUFFER_BIT)
    GL.glDisable(GL.GL_SCISSOR_TEST)
    GL.glBindFramebuffer(GL.GL_FRAMEBUFFER, 0)
    want = np.zeros((h, w, 4), np.uint8)
    want[...] = (0, 0, 255, 255)
    want[3:10, 5:15] = (255, 0, 0, 255)  # GL rows count from the first row in memory
    return want


def test_gl_rendered_fbo_to_numpy_and_vulkan_in_another_process(gl, vkb, caps):
    w, h = 40, 24
    res = gl.create_texture(w, h, "rgba8")
    try:
        assert res.descriptor.backend == "gl" and res.descriptor.memory == "opaque_fd"
        want = _render(res, w, h)
        res.end_access()
        assert res.gl_sync == "finish"  # no semaphore given: glFinish is the ordering
        np.testing.assert_array_equal(res.download(), want)  # → NumPy
        np.testing.assert_array_equal(_read_in_vulkan_child(res), want)  # → Vulkan, another process
    finally:
        res.close()


def _read_in_vulkan_child(res) -> np.ndarray:
    """Send `res` to a child that imports it into Vulkan and sends back what it reads."""
    proc, sock = _spawn(_vulkan_consumer)
    try:
        fds = res.export_fds()
        _send(sock, {"descriptor": res.descriptor.to_wire()}, fds)
        for fd in fds:
            os.close(fd)
        msg, _ = _recv(sock)
    finally:
        sock.close()
        proc.join(30)
    assert proc.exitcode == 0
    return msg["data"]


def test_gl_buffer_to_vulkan_in_another_process(gl, vkb):
    data = _pattern((4099,), np.uint8, seed=3)
    with gl.create_buffer(data.size) as res:
        res.upload(data)
        res.end_access()
        np.testing.assert_array_equal(_read_in_vulkan_child(res)[: data.size], data)


def test_imported_resource_cannot_be_reexported(gl, vkb):
    with vkb.create_texture(8, 8, "rgba8", memory="opaque_fd") as v:
        with gl.import_resource(v.descriptor, v.export_fds()) as res:
            with pytest.raises(BackendError, match="cannot re-export"):
                res.export_fds()


def test_mismatched_uuid_of_a_real_export_refused(gl, vkb):
    with vkb.create_texture(8, 8, "rgba8", memory="opaque_fd") as v:
        desc = v.descriptor.with_(device_uuid=bytes(16 * [0xAB]))
        before = _fd_count()
        with pytest.raises(IncompatibleDevice):
            gl.import_resource(desc, v.export_fds())
        assert _fd_count() == before


# -- leaks ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_no_leaked_gl_objects_or_fds_after_1000_cycles(gl, vkb):
    from OpenGL import GL
    from OpenGL.GL.EXT.memory_object import glIsMemoryObjectEXT

    with vkb.create_texture(32, 32, "rgba8", memory="opaque_fd") as tex, vkb.create_buffer(4096 + 64) as buf:
        bdesc = buf.descriptor.with_(driver_private={**buf.descriptor.driver_private, "gl_buffer_size": 4096})
        for desc, src in ((tex.descriptor, tex), (bdesc, buf)):  # warm up caches before counting
            gl.import_resource(desc, src.export_fds()).close()
        before = _fd_count()
        released = []
        for i in range(1000):
            desc, src = (tex.descriptor, tex) if i % 2 else (bdesc, buf)
            res = gl.import_resource(desc, src.export_fds())
            if i % 10 == 0 and res.texture:
                res.framebuffer()
            names = res.gl_names()
            res.close()
            released.append(names)
        assert _fd_count() == before
        # every resource is closed now, so no name handed out in the loop may still be an object
        for names in released:
            if names["texture"]:
                assert not GL.glIsTexture(names["texture"])
            if names["buffer"]:
                assert not GL.glIsBuffer(names["buffer"])
            if names["framebuffer"]:
                assert not GL.glIsFramebuffer(names["framebuffer"])
            assert not glIsMemoryObjectEXT(names["memory_object"])


# -- through the Session API (broker, handles, keyed mutex) ----------------------------------------------------------


def _session_gl_consumer(namespace: str, name: str, frames: int, q) -> None:
    """Child: open the published texture in GL, check each frame the parent rendered, hand it back."""
    import texbridge

    bad = []
    with texbridge.connect(namespace) as s:
        res = s.open(name, backend="gl")
        for i in range(frames):
            res.mutex.acquire(1, timeout=20)
            px = res.download()[0, 0]
            if tuple(px) != (i % 256, 255 - i % 256, 7, 255):
                bad.append((i, tuple(int(x) for x in px)))
            res.mutex.release(0)
        res.close()
    q.put(bad)


def test_session_gl_keyed_mutex_ping_pong_1000_frames(gl, vkb):
    import uuid

    import texbridge
    from OpenGL import GL

    frames = 1000
    ns = f"gltest-{uuid.uuid4().hex[:8]}"
    name = "gl-frames"
    with texbridge.connect(ns) as s:
        res = s.create_texture(8, 8, "rgba8", backend="gl", keyed_mutex=True, name=name)
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        proc = ctx.Process(target=_session_gl_consumer, args=(ns, name, frames, q))
        proc.start()
        try:
            fbo = res.framebuffer()
            for i in range(frames):
                res.mutex.acquire(0, timeout=20)
                GL.glBindFramebuffer(GL.GL_FRAMEBUFFER, fbo)
                GL.glViewport(0, 0, 8, 8)
                GL.glClearColor((i % 256) / 255, (255 - i % 256) / 255, 7 / 255, 1)
                GL.glClear(GL.GL_COLOR_BUFFER_BIT)
                GL.glBindFramebuffer(GL.GL_FRAMEBUFFER, 0)
                res.mutex.release(1)  # folds in glFinish (llvmpipe) or the semaphore signal: no manual end_access
            bad = q.get(timeout=60)
        finally:
            proc.join(60)
        assert proc.exitcode == 0
        assert bad == []
        # NVIDIA (GL_NV_timeline_semaphore): ordered on the GPU through the resource's timeline; llvmpipe: glFinish
        assert res.gl_sync == ("semaphore" if res.context.caps.timeline_semaphore and res.descriptor.gpu_sync
                               else "finish")
        res.close()


def test_session_open_vulkan_texture_in_gl(gl, vkb):
    import uuid

    import texbridge

    data = _pattern((20, 30, 4), np.uint8, seed=11)
    with texbridge.connect(f"gltest-{uuid.uuid4().hex[:8]}") as s:
        src = s.create_texture(30, 20, "rgba8", backend="vulkan", memory="opaque_fd")
        src.upload(data)
        with s.open(src.handle, backend="gl") as res:
            np.testing.assert_array_equal(res.download(), data)
        src.close()


def test_semaphore_import_needs_gl_ext_semaphore_fd(gl, caps):
    if caps.semaphore_fd:
        pytest.skip("refusal path: this GL has GL_EXT_semaphore_fd (the semaphore path runs on the NVIDIA machine)")
    before = _fd_count()
    with pytest.raises(BackendError, match="GL_EXT_semaphore_fd"):
        gl.import_semaphore(os.memfd_create("not-a-semaphore"))
    assert _fd_count() == before


def test_moderngl_context_imports_and_wraps_the_texture(gl, vkb):
    """The user's own context (here moderngl's, on EGL): import into it and get a moderngl.Texture over the name."""
    moderngl = pytest.importorskip("moderngl", reason="moderngl is not installed")
    try:
        ctx = moderngl.create_context(standalone=True, backend="egl")
    except Exception as e:  # no EGL for moderngl's own loader: a capability, not a failure
        pytest.skip(f"moderngl cannot create an EGL context here: {e}")
    data = _pattern((4, 8, 4), np.uint8, seed=21)
    try:
        with vkb.create_texture(8, 4, "rgba8", memory="opaque_fd") as src:
            src.upload(data)
            with gl.import_resource(src.descriptor, src.export_fds(), context=ctx) as res:
                tex = res.moderngl_texture(ctx)
                assert tex.size == (8, 4) and tex.components == 4 and tex.glo == res.texture
                np.testing.assert_array_equal(np.frombuffer(tex.read(), np.uint8).reshape(4, 8, 4), data)
    finally:
        ctx.release()


GL_UPLOAD_READER = """
import sys, numpy as np, texbridge
backend, handle, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
with texbridge.connect() as s:
    res = s.open(handle, backend=backend)
    got = res.download()
    want = np.random.default_rng(seed).integers(0, 255, got.shape if got.ndim == 3 else (4099,), dtype=np.uint8,
                                                endpoint=True)
    print("match", bool(np.array_equal(got[: want.shape[0]] if got.ndim == 1 else got, want)))
    res.close()
"""


@pytest.mark.parametrize("reader", ["vulkan", "gl"])
def test_gl_upload_alone_is_visible_to_other_processes(gl, vkb, runtime, reader):
    """upload() is complete for other processes when it returns: no end_access, no keyed mutex (NVIDIA showed
    all zeros in every consumer before upload() finished its GL work)."""
    import texbridge

    from conftest import run_py

    with texbridge.connect() as s:
        tex = s.create_texture(48, 20, "rgba8", backend="gl")
        tex.upload(np.random.default_rng(5).integers(0, 255, tex.shape, dtype=np.uint8, endpoint=True))
        buf = s.create_buffer(4099, backend="gl")
        buf.upload(np.random.default_rng(6).integers(0, 255, (4099,), dtype=np.uint8, endpoint=True))
        for res, seed in ((tex, 5), (buf, 6)):
            out = run_py(GL_UPLOAD_READER, reader, str(res.handle), str(seed)).stdout
            assert "match True" in out, (res, out)
        tex.close()
        buf.close()


def test_gl_upload_under_the_keyed_mutex_reaches_the_next_owner(gl, vkb, runtime):
    """Holding the mutex, upload() only flushes; release() must then complete it for the peer (another process)."""
    import texbridge

    from conftest import run_py

    with texbridge.connect() as s:
        tex = s.create_texture(24, 8, "rgba8", backend="gl", keyed_mutex=True)
        data = np.random.default_rng(8).integers(0, 255, tex.shape, dtype=np.uint8, endpoint=True)
        tex.mutex.acquire(0, timeout=10)
        tex.upload(data)
        tex.mutex.release(1)
        out = run_py(f"""
            import numpy as np, texbridge
            with texbridge.connect() as s:
                r = s.open("{tex.handle}", backend="vulkan")
                r.mutex.acquire(1, timeout=10)
                want = np.random.default_rng(8).integers(0, 255, r.shape, dtype=np.uint8, endpoint=True)
                print("match", bool(np.array_equal(r.download(), want)))
                r.mutex.release(0)
                r.close()
        """).stdout
        assert "match True" in out
        tex.close()
