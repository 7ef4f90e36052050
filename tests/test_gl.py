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


def _vulkan_producer(sock_fd: int, kind: str, args: dict) -> None:
    """Child: create a Vulkan texture/buffer, fill it, send descriptor + fd, wait until the parent is done."""
    from texbridge.backends import get_backend

    sock = socket.socket(fileno=sock_fd)
    vk = get_backend("vulkan")
    if kind == "texture":
        res = vk.create_texture(args["width"], args["height"], args["format"])
    else:
        res = vk.create_buffer(args["size"])
    res.upload(args["data"])
    fds = res.export_fds()
    _send(sock, {"descriptor": res.descriptor.to_wire()}, fds)
    for fd in fds:
        os.close(fd)
    _recv(sock)  # the parent says it is done before we free the memory (it holds its own reference anyway)
    res.close()
    sock.close()


def _vulkan_consumer(sock_fd: int) -> None:
    """Child: import whatever arrives with the vulkan backend and send its contents back."""
    from texbridge._descriptor import Descriptor
    from texbridge.backends import get_backend

    sock = socket.socket(fileno=sock_fd)
    msg, fds = _recv(sock)
    res = get_backend("vulkan").import_resource(Descriptor.from_wire(msg["descriptor"]), fds)
    _send(sock, {"data": res.download()})
    res.close()
    sock.close()


def _spawn(target, *args):
    ctx = mp.get_context("spawn")
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = ctx.Process(target=target, args=(child.fileno(), *args))
    # spawn passes fds it is told about only; multiprocessing's spawn child inherits fds via pass_fds internally
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
