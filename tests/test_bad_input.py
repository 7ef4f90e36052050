"""Bad input from Python gets a typed, clear error; importers never leak an fd they were handed."""

from __future__ import annotations

import os

from texbridge._descriptor import Descriptor, texture_layout
from texbridge._sharedmem import create_sealed

from conftest import fd_count, wait_until


def test_memfd_import_closes_the_gpu_sync_fd():
    """A descriptor carrying a GPU semaphore (fd 1) opened as memfd: the semaphore fd must not pile up. Driven at
    the importer (Session.open hands it exactly these fds): the broker refuses a memfd as a semaphore, and no
    driver here exports a real one."""
    from texbridge.backends import get_backend

    pitch, size = texture_layout(8, 8, "rgba8")
    desc = Descriptor(kind="texture2d", size=size, width=8, height=8, format="rgba8", planes=((0, pitch),),
                      gpu_sync="timeline_opaque_fd").validate()
    mem = create_sealed("leak-test", size)
    memfd = get_backend("memfd")
    try:
        memfd.import_resource(desc, [os.dup(mem), create_sealed("semaphore-stand-in", 4096)]).close()
        before = fd_count()
        for _ in range(50):
            res = memfd.import_resource(desc, [os.dup(mem), create_sealed("semaphore-stand-in", 4096)])
            assert res.descriptor.gpu_sync and res.download().shape == (8, 8, 4)
            res.close()
        assert fd_count() == before
    finally:
        os.close(mem)


# -- geometry ----------------------------------------------------------------------------------------------------------
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import texbridge  # noqa: E402
from texbridge import (InvalidArgument, InvalidDescriptor, NoKeyedMutex, NotASender, NotHostVisible,  # noqa: E402
                       SenderNotFound, TexbridgeError)


@pytest.mark.parametrize("w,h", [(-1, 8), (8, -3), (8.0, 8), (8, 2.5), (True, 8), (0, 8), (8, 1 << 20), ("8", 8)])
def test_bad_texture_dimensions_are_invalid_descriptor(session, w, h):
    with pytest.raises(InvalidDescriptor, match="must be an integer"):
        session.create_texture(w, h, "rgba8")


@pytest.mark.parametrize("size", [-1, 0, 2.5, None])
def test_bad_buffer_sizes_are_invalid_descriptor(session, size):
    with pytest.raises(InvalidDescriptor, match="buffer size"):
        session.create_buffer(size)


# -- uploads: one check for every backend --------------------------------------------------------------------------
def _backends() -> list[str]:
    out = ["memfd"]
    for name in ("vulkan", "gl"):
        try:
            b = texbridge.backends.get_backend(name)
            if b.diagnostics().get("available"):
                out.append(name)
        except texbridge.BackendError:
            pass
    return out


@pytest.mark.parametrize("backend", _backends())
def test_upload_never_reshapes_or_casts(session, backend):
    tex = session.create_texture(8, 4, "rgba8", backend=backend)
    good = np.arange(4 * 8 * 4, dtype=np.uint8).reshape(4, 8, 4)
    with pytest.raises(InvalidArgument, match="transposed"):
        tex.upload(good.reshape(8, 4, 4))  # (W, H, C): same size, would scramble rows
    with pytest.raises(InvalidArgument, match="float32"):
        tex.upload(good.astype(np.float32))  # would be cast silently
    with pytest.raises(InvalidArgument):
        tex.upload(good[:2])
    tex.upload(good.reshape(-1))  # flat, row-major: unambiguous
    assert np.array_equal(tex.download(), good)
    tex.upload(np.ascontiguousarray(good[::-1])[::-1])  # any strides of the right shape are copied as they are
    assert np.array_equal(tex.download(), good)
    buf = session.create_buffer(64, backend=backend)
    with pytest.raises(InvalidArgument, match="bytes"):
        buf.upload(np.zeros(buf.shape[0] + 1, np.uint8))
    with pytest.raises(InvalidArgument, match="numeric"):
        buf.upload(np.array([object()]))
    buf.upload(np.arange(4, dtype=np.uint32))  # raw bytes of any numeric array fill a prefix
    assert buf.download()[:16].view(np.uint32).tolist() == [0, 1, 2, 3]
    tex.close()
    buf.close()


# -- mutex, asarray --------------------------------------------------------------------------------------------------
def test_mutex_of_a_resource_without_one_is_typed(session):
    tex = session.create_texture(8, 8)
    with pytest.raises(NoKeyedMutex, match="keyed_mutex=True"):
        tex.mutex.acquire(0)
    assert getattr(tex, "mutex", None) is None  # still an AttributeError for duck typing
    tex.close()
    with pytest.raises(texbridge.ClosedError):
        tex.mutex


def test_asarray_of_a_memfd_resource_is_the_zero_copy_view(session):
    tex = session.create_texture(8, 4, "rgba8")
    a = np.asarray(tex)
    assert a.shape == (4, 8, 4) and a.dtype == np.uint8
    a[...] = 3
    assert int(tex.numpy().max()) == 3  # the same memory
    c = np.array(tex)  # a copy
    c[...] = 4
    assert int(tex.numpy().max()) == 3
    assert np.asarray(tex, dtype=np.float32).dtype == np.float32
    tex.close()


def test_asarray_of_gpu_memory_says_use_download(session):
    if "vulkan" not in _backends():
        pytest.skip("no Vulkan device")
    tex = session.create_texture(8, 4, "rgba8", backend="vulkan")
    with pytest.raises(NotHostVisible, match="download"):
        np.asarray(tex)
    tex.close()


# -- handles and names --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["tb:xyz", "TB:123", "tb:", " tb:0123456789abcdeg"])
def test_malformed_handle_text_is_reported_not_looked_up(session, text):
    with pytest.raises(InvalidArgument, match="not a texbridge handle"):
        session.open(text)
    with pytest.raises(InvalidArgument):
        session.info(text)


# -- receivers -------------------------------------------------------------------------------------------------------
def test_receiver_of_a_plain_texture_is_not_a_sender(session):
    tex = session.create_texture(8, 8, name="plain")
    buf = session.create_buffer(4096, name="plainbuf", keyed_mutex=True)  # shaped like a control buffer
    for name in ("plain", "plainbuf"):
        with pytest.raises(NotASender, match="not a sender") as e:
            texbridge.Receiver(name)
        assert "session.open" in str(e.value)
    tex.close()
    buf.close()


def test_missing_sender_is_told_apart_from_no_frame_yet(session):
    with pytest.raises(SenderNotFound, match="'nosuch'"):
        texbridge.Receiver("nosuch", require_sender=True)
    with texbridge.Receiver("nosuch") as rx:
        assert rx.receive() is None and rx.status == "no_sender"
        with texbridge.Sender("nosuch", 8, 8) as snd:
            assert wait_until(lambda: rx.receive() is None and rx.status == "no_frame", timeout=10)
            snd.send(np.zeros(snd.shape, np.uint8))
            assert rx.wait_frame(10) is not None and rx.status == "receiving"
    assert rx.status == "closed"
    assert issubclass(SenderNotFound, TexbridgeError)


def test_names_with_the_handle_prefix_are_refused(session):
    """Text starting with tb: is always read as a handle, so such a name could never be opened."""
    with pytest.raises(InvalidDescriptor, match="tb:"):
        session.create_texture(8, 8, name="tb:camera")
    tex = session.create_texture(8, 8)
    with pytest.raises(InvalidDescriptor, match="tb:"):
        tex.publish("TB:camera")
    tex.close()
