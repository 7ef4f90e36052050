"""Receivers on the GPU: Receiver(backend="gl" | "vulkan" | "cuda") hands frames out as that API's textures.

Runs for real on Mesa (lavapipe for Vulkan, llvmpipe for GL); the CUDA tests skip naming the missing capability and
run on an NVIDIA machine. Every frame a test sender publishes is filled with one value derived from its frame
number, so each frame received can be checked for tearing (two values) and for the right value.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import texbridge
from texbridge._errors import BackendError, InvalidArgument

from conftest import spawn_py

pytestmark = pytest.mark.gpu


def _backend_reason(name: str) -> str | None:
    try:
        diag = texbridge.backends.get_backend(name).diagnostics()
    except BackendError as e:
        return f"the {name} backend is unavailable: {e}"
    return None if diag.get("available") else f"no {name} device with external memory: {diag.get('detail')}"


def _needs(*names: str) -> None:
    for n in names:
        reason = _backend_reason(n)
        if reason:
            pytest.skip(reason)


def _fill(shape: tuple[int, ...], n: int) -> np.ndarray:
    return np.full(shape, n % 256, np.uint8)


def _uniform(tex: texbridge.Resource, n: int) -> bool:
    px = tex.download()
    return int(px.min()) == int(px.max()) == n % 256


# The pixels of the second frame differ from the first everywhere, so a copy of the wrong frame cannot pass.
def _pattern(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return ((np.arange(int(np.prod(shape))) * 7 + seed) % 251).astype(np.uint8).reshape(shape)


@pytest.mark.parametrize("sender", ["memfd", "vulkan", "gl"])
@pytest.mark.parametrize("receiver", ["gl", "vulkan"])
def test_frames_arrive_as_textures_of_the_receivers_api(runtime, sender, receiver):
    _needs(*{sender, receiver} - {"memfd"})
    with texbridge.Sender("gpu", 40, 24, backend=sender) as tx, texbridge.Receiver("gpu", backend=receiver) as rx:
        a, b = _pattern(tx.shape, 1), _pattern(tx.shape, 2)
        tx.send(a)
        first = rx.wait_frame(5)
        assert isinstance(first, texbridge.Resource) and first.backend_name == receiver
        assert np.array_equal(first.download(), a) and rx.is_new and rx.frame_number == 1
        # memfd slots are uploaded from the shared pages; GPU slots are copied on the GPU
        assert rx.gpu_path == ("upload" if sender == "memfd" else "gpu-copy"), rx.gpu_path_reason
        assert (rx.gpu_path_reason is None) == (sender != "memfd")
        assert rx.receive() is first and not rx.is_new  # nothing new: the same texture
        tx.send(b)
        second = rx.wait_frame(5)
        assert second is not first and np.array_equal(second.download(), b)
        assert np.array_equal(first.download(), a), "the previous frame's texture must survive one receive()"
        if receiver == "gl":
            assert second.texture and second.target
        else:
            assert second.image is not None


@pytest.mark.parametrize("receiver", ["gl", "vulkan"])
def test_zero_copy_gives_the_pinned_slot(runtime, receiver):
    _needs("vulkan", receiver)
    with texbridge.Sender("zc", 16, 8, backend="vulkan") as tx, \
            texbridge.Receiver("zc", backend=receiver) as rx:
        tx.send(_fill(tx.shape, 5))
        view = rx.wait_frame(5, copy=False)
        assert view is not None and _uniform(view, 5) and rx.still_valid()
        assert view.handle is not None  # the imported slot itself, not a receiver-owned copy
        for n in range(6, 11):  # more frames than slots: without the pin, frame 5's slot would be rewritten
            tx.send(_fill(tx.shape, n))
        assert rx.still_valid() and _uniform(view, 5), "the sender must avoid the slot a zero-copy view pins"
        rx.release()
        later = rx.wait_frame(5, copy=False)
        assert later is not None and _uniform(later, 10)


def test_receive_into_the_callers_gl_texture(runtime):
    """out= a GLResource or a bare GL texture name: the frame is copied on the GPU into it."""
    _needs("vulkan", "gl")
    from OpenGL import GL

    from texbridge.backends.gl import BACKEND as GLB

    with texbridge.Sender("out", 32, 16, backend="vulkan") as tx, texbridge.Receiver("out", backend="gl") as rx:
        mine = GLB.create_texture(32, 16, "rgba8")
        try:
            tx.send(_pattern(tx.shape, 3))
            assert rx.wait_frame(5, out=mine) is mine and rx.is_new and rx.gpu_path == "gpu-copy"
            assert np.array_equal(mine.download(), _pattern(tx.shape, 3))
            # a plain GL texture name, created in the receiver's (headless) context
            mine.context.enter()
            name = int(GL.glGenTextures(1))
            try:
                GL.glBindTexture(GL.GL_TEXTURE_2D, name)
                GL.glTexStorage2D(GL.GL_TEXTURE_2D, 1, GL.GL_RGBA8, 32, 16)
                tx.send(_pattern(tx.shape, 4))
                assert rx.wait_frame(5, out=name) == name
                px = np.empty(tx.shape, np.uint8)
                GL.glBindTexture(GL.GL_TEXTURE_2D, name)
                GL.glPixelStorei(GL.GL_PACK_ALIGNMENT, 1)
                GL.glGetTexImage(GL.GL_TEXTURE_2D, 0, GL.GL_RGBA, GL.GL_UNSIGNED_BYTE, px)
                assert np.array_equal(px, _pattern(tx.shape, 4))
            finally:
                GL.glDeleteTextures(1, [name])
            with pytest.raises(InvalidArgument, match="GL texture"):
                tx.send(_pattern(tx.shape, 5))
                rx.wait_frame(5, out=-3)
        finally:
            mine.close()


def test_receive_into_a_moderngl_texture(runtime):
    """A moderngl program receives straight into its own texture (context=the moderngl context)."""
    _needs("vulkan", "gl")
    moderngl = pytest.importorskip("moderngl", reason="moderngl is not installed")
    try:
        ctx = moderngl.create_standalone_context(backend="egl")
    except Exception as e:  # moderngl raises plain Exceptions for a missing EGL/GL
        pytest.skip(f"moderngl cannot create an EGL context here: {e}")
    try:
        tex = ctx.texture((32, 16), 4)
        with texbridge.Sender("mgl", 32, 16, backend="vulkan") as tx, \
                texbridge.Receiver("mgl", backend="gl", context=ctx) as rx:
            for seed in (6, 7):
                tx.send(_pattern(tx.shape, seed))
                assert rx.wait_frame(5, out=tex) is tex
                assert np.frombuffer(tex.read(), np.uint8).reshape(tx.shape).tolist() == \
                    _pattern(tx.shape, seed).tolist()
            assert rx.gpu_path == "gpu-copy"
            tx.send(_pattern(tx.shape, 8))
            own = rx.wait_frame(5)  # the receiver's own texture, wrapped for moderngl
            wrapped = own.moderngl_texture(ctx)
            assert wrapped.size == (32, 16)
            assert np.frombuffer(wrapped.read(), np.uint8).reshape(tx.shape).tolist() == \
                _pattern(tx.shape, 8).tolist()
    finally:
        ctx.release()


def test_receive_into_the_callers_vulkan_image(runtime):
    _needs("vulkan")
    from texbridge.backends.vulkan import BACKEND as VK

    with texbridge.Sender("vkout", 24, 8, backend="vulkan") as tx, \
            texbridge.Receiver("vkout", backend="vulkan") as rx:
        mine = VK.create_texture(24, 8, "rgba8")
        wrong = VK.create_texture(8, 8, "rgba8")
        try:
            tx.send(_pattern(tx.shape, 8))
            assert rx.wait_frame(5, out=mine) is mine and np.array_equal(mine.download(), _pattern(tx.shape, 8))
            tx.send(_pattern(tx.shape, 9))
            with pytest.raises(InvalidArgument, match="same size and format"):
                rx.wait_frame(5, out=wrong)
        finally:
            mine.close()
            wrong.close()


def test_gpu_receiver_follows_a_resize(runtime):
    _needs("vulkan", "gl")
    with texbridge.Sender("rs", 16, 8, backend="vulkan") as tx, texbridge.Receiver("rs", backend="gl") as rx:
        tx.send(_fill(tx.shape, 1))
        assert rx.wait_frame(5) is not None
        tx.resize(20, 12)
        tx.send(_fill(tx.shape, 2))
        f = rx.wait_frame(5)
        assert f is not None and f.shape == (12, 20, 4) and _uniform(f, 2)


# argv: name backend width height frames ; fills frame n with n % 256 as fast as it can, then waits on stdin.
SENDER = """
import sys, numpy as np, texbridge
name, backend, w, h, frames = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
s = texbridge.Sender(name, w, h, backend=backend)
print("ready", flush=True)
assert s.wait_for_receivers(1, 30)
for i in range(frames):
    s.send(np.full(s.shape, (s.frame_number + 1) % 256, np.uint8))
print("sent", s.frame_number, s.overwrites, flush=True)
sys.stdin.readline()
s.close()
"""


FRAMES = 3000


@pytest.mark.parametrize("sender,receiver", [("vulkan", "gl"), ("vulkan", "vulkan"), ("memfd", "gl")])
def test_no_torn_frames_while_the_sender_keeps_writing(runtime, sender, receiver):
    """The GPU copy (or upload) completes inside the seqlock window: a copy the sender overlapped is retried, so
    every texture handed out holds exactly the frame receive() says it does."""
    _needs(*{sender, receiver} - {"memfd"})
    p = spawn_py(SENDER, "tear", sender, "256", "128", str(FRAMES), stdin=__import__("subprocess").PIPE)
    try:
        assert p.stdout.readline().startswith("ready")
        got, bad = [], []
        with texbridge.Receiver("tear", backend=receiver) as rx:
            while True:
                f = rx.wait_frame(10)
                if f is None:
                    break
                px = f.download()
                lo, hi = int(px.min()), int(px.max())
                got.append(rx.frame_number)
                if not lo == hi == rx.frame_number % 256:
                    bad.append((rx.frame_number, lo, hi))
                if rx.frame_number == FRAMES:
                    break
        line = p.stdout.readline()
        assert line.startswith("sent"), line + p.stderr.read()
        p.communicate("\n", timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert len(got) > 20 and not bad, f"{len(bad)} of {len(got)} frames torn or mislabelled: {bad[:5]}"
    assert all(a < b for a, b in zip(got, got[1:]))


# -- CUDA (NVIDIA only) -------------------------------------------------------------------------------------------------
def _cuda_reason() -> str | None:
    try:
        import cuda.bindings.driver  # noqa: F401
    except ImportError:
        return "cuda-bindings not installed (texbridge[cuda])"
    from texbridge.backends.cuda import unavailable_reason

    return unavailable_reason()


@pytest.mark.parametrize("sender", ["cuda", "vulkan", "memfd"])
def test_cuda_receiver_gets_cuda_textures(runtime, sender):
    reason = _cuda_reason()
    if reason:
        pytest.skip(reason)
    _needs(*{sender} - {"memfd"})
    with texbridge.Sender("cu", 64, 32, backend=sender) as tx, texbridge.Receiver("cu", backend="cuda") as rx:
        a, b = _pattern(tx.shape, 1), _pattern(tx.shape, 2)
        tx.send(a)
        first = rx.wait_frame(5)
        assert first.backend_name == "cuda" and np.array_equal(first.download(), a)
        assert rx.gpu_path == ("upload" if sender == "memfd" else "gpu-copy"), rx.gpu_path_reason
        tx.send(b)
        second = rx.wait_frame(5)
        assert np.array_equal(second.download(), b) and np.array_equal(first.download(), a)
        torch = pytest.importorskip("torch", reason="torch is not installed (DLPack consumer)")
        t = torch.from_dlpack(second)
        assert t.is_cuda and tuple(t.shape) == tx.shape and np.array_equal(t.cpu().numpy(), b)
        del t
        tx.send(a)
        zc = rx.wait_frame(5, copy=False)
        if sender != "memfd":
            assert zc.handle is not None and rx.still_valid()
        assert np.array_equal(zc.download(), a)
