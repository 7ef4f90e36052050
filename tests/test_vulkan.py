"""Vulkan backend on a real driver (Mesa lavapipe in CI, NVIDIA on the GPU machine): real fds, real processes."""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from texbridge import FORMATS, Descriptor, IncompatibleDevice, InvalidDescriptor, Usage
from texbridge._errors import BackendError

from conftest import fd_count, run_py, spawn_py
from test_descriptor import d3d11_fields, expected_d3d11

vulkan_mod = pytest.importorskip("vulkan", reason="the `vulkan` Python package (texbridge[vulkan]) is not installed")

from texbridge.backends import _vk  # noqa: E402
from texbridge.backends import memfd as memfd_backend  # noqa: E402
from texbridge.backends.vulkan import BACKEND, live_objects  # noqa: E402


def _device_or_skip() -> _vk.VulkanDevice:
    try:
        return _vk.default_device()
    except BackendError as e:
        pytest.skip(f"no Vulkan device with VK_KHR_external_memory_fd: {e}")


pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def dev():
    return _device_or_skip()


def _random(shape, fmt, seed=0) -> np.ndarray:
    """Random bytes viewed as the format's dtype: every bit pattern must survive (compare as bytes)."""
    rng = np.random.default_rng(seed)
    dt = FORMATS[fmt].numpy_dtype
    return rng.integers(0, 256, size=int(np.prod(shape)) * dt.itemsize, dtype=np.uint8).view(dt).reshape(shape)


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.ascontiguousarray(a).view(np.uint8).tobytes() == \
        np.ascontiguousarray(b).view(np.uint8).tobytes()


# -- a child process that receives fds over a socket ----------------------------------------------------------------
CHILD = r"""
import os, pickle, socket, sys
import numpy as np
from texbridge import Descriptor
from texbridge.backends.vulkan import BACKEND

sock = socket.socket(fileno=int(sys.argv[1]))
def recv_exact(n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, "parent went away"
        buf += chunk
    return buf
def recv_obj():
    return pickle.loads(recv_exact(int.from_bytes(recv_exact(8), "little")))
def send(obj):
    data = pickle.dumps(obj)
    sock.sendall(len(data).to_bytes(8, "little") + data)

msg, fds, _, _ = socket.recv_fds(sock, 1 << 16, 4)
res = BACKEND.import_resource(Descriptor.from_wire(pickle.loads(msg)), fds)
send(("seen", res.download()))
res.upload(recv_obj())
send(("wrote", None))
res.close()
"""


def _recv_obj(sock: socket.socket):
    n = int.from_bytes(_recv_exact(sock, 8), "little")
    return pickle.loads(_recv_exact(sock, n))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("child went away")
        buf += chunk
    return buf


def _cross_process(res, new: np.ndarray) -> np.ndarray:
    """Send res's descriptor + a new memory fd to a fresh process; it downloads (returned) then uploads `new`."""
    parent, child = socket.socketpair()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(child.fileno())], pass_fds=[child.fileno()],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    child.close()
    try:
        fds = res.export_fds()
        try:
            socket.send_fds(parent, [pickle.dumps(res.descriptor.to_wire())], fds)
        finally:
            for fd in fds:
                os.close(fd)
        tag, seen = _recv_obj(parent)
        assert tag == "seen"
        data = pickle.dumps(new)
        parent.sendall(len(data).to_bytes(8, "little") + data)
        assert _recv_obj(parent) == ("wrote", None)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        return seen
    finally:
        parent.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- tests -------------------------------------------------------------------------------------------------------------
def test_device_identity_and_capabilities(dev):
    assert len(dev.driver_uuid) == 16 and len(dev.device_uuid) == 16
    assert dev.has("VK_KHR_external_memory_fd")
    caps = dev.capabilities
    # the sync path follows the capability, whatever the driver
    expect = "timeline_semaphore" if caps["external_semaphore_fd"] and caps["timeline_semaphore"] else "cpu_wait"
    assert dev.gpu_sync in (expect, "cpu_wait")
    if not caps["external_semaphore_fd"]:
        assert dev.gpu_sync == "cpu_wait"
    # selection by index, name substring and UUID all find the same device
    for sel in (dev.info.index, dev.name[:6], dev.device_uuid, dev.device_uuid.hex()):
        with _vk.VulkanDevice(sel) as d2:
            assert d2.device_uuid == dev.device_uuid and d2.name == dev.name
    with pytest.raises(BackendError):
        _vk.VulkanDevice("no such gpu anywhere")


def test_user_supplied_handles_are_not_destroyed(dev):
    """A VulkanDevice wrapping someone else's VkInstance/VkDevice works and leaves them alive on close."""
    before = live_objects().get("VkDevice", 0)
    with _vk.VulkanDevice(instance=dev.instance, physical_device=dev.physical_device, device=dev.device,
                          queue_family=dev.queue_family, enabled_extensions=dev.enabled_extensions) as d2:
        t = BACKEND.create_texture(8, 8, "rgba8", device=d2)
        t.clear((1.0, 0.0, 0.0, 1.0))
        assert (t.download()[..., 0] == 255).all()
        t.close()
    assert live_objects().get("VkDevice", 0) == before
    t = BACKEND.create_texture(4, 4, "r8")  # the shared device still works
    t.close()


def test_descriptor_records_everything_an_importer_needs(dev):
    with BACKEND.create_texture(100, 50, "rgba16f", usage=int(Usage.DEFAULT | Usage.STORAGE)) as t:
        d = t.descriptor
        assert d.backend == "vulkan" and d.memory in ("opaque_fd", "dma_buf")
        assert (d.driver_uuid, d.device_uuid) == (dev.driver_uuid, dev.device_uuid)
        dp = d.driver_private
        assert dp["allocation_size"] == d.size >= 100 * 50 * 8
        assert dp["vk_format"] == FORMATS["rgba16f"].vk
        assert dp["vk_usage"] & vulkan_mod.VK_IMAGE_USAGE_STORAGE_BIT
        assert dp["dedicated"] is True and dp["handle_type"] == d.memory
        if d.memory == "dma_buf":
            assert "drm_modifier" in dp and dp["plane_layouts"]
        assert Descriptor.from_wire(d.to_wire()) == d
        assert d3d11_fields(d.runtime_private) == expected_d3d11(100, 50, "rgba16f")


@pytest.mark.parametrize("keyed", [False, True])
def test_d3d11_description_of_a_mipmapped_array_image(dev, keyed):
    with BACKEND.create_texture(64, 32, "rgba8", mip_levels=4, array_size=3, keyed_mutex=keyed) as t:
        assert (t.descriptor.mip_levels, t.descriptor.array_size) == (4, 3)
        assert d3d11_fields(t.descriptor.runtime_private) == expected_d3d11(64, 32, "rgba8", 4, 3, keyed)


def test_export_gives_a_new_fd_each_call(dev):
    with BACKEND.create_texture(16, 16, "rgba8") as t:
        a, b = t.export_fds()[0], t.export_fds()[0]
        try:
            assert a != b
        finally:
            os.close(a)
            os.close(b)


def test_download_to_numpy_after_clear_and_upload(dev):
    with BACKEND.create_texture(33, 17, "rgba8") as t:
        assert (t.download() == 0).all()  # created zeroed, like memfd memory
        t.clear((0.2, 0.4, 0.6, 1.0))
        got = t.download()
        assert got.shape == (17, 33, 4) and got.dtype == np.uint8
        assert (got == np.array([51, 102, 153, 255], np.uint8)).all()
        data = _random((17, 33, 4), "rgba8")
        t.upload(data)
        assert _same_bytes(t.download(), data)
        t.transition("shader_read_only_optimal")
        t.upload(255 - data)  # helpers work from, and return to, the current layout
        assert _same_bytes(t.download(), 255 - data)
        assert t.layout == vulkan_mod.VK_IMAGE_LAYOUT_SHADER_READ_ONLY_OPTIMAL
        t.transition("general")


def test_vulkan_to_vulkan_across_processes_after_clear(dev):
    with BACKEND.create_texture(64, 48, "rgba8") as t:
        t.clear((1.0, 0.0, 0.2, 1.0))
        reply = np.full((48, 64, 4), 7, np.uint8)
        seen = _cross_process(t, reply)
        assert (seen == np.array([255, 0, 51, 255], np.uint8)).all()
        assert (t.download() == 7).all()  # the child's upload landed in our image: same memory


@pytest.mark.parametrize("memory", ["opaque_fd", "dma_buf"])
def test_vulkan_to_vulkan_across_processes_after_upload(dev, memory):
    if memory == "dma_buf" and not dev.dma_buf:
        pytest.skip(f"VK_EXT_external_memory_dma_buf + VK_EXT_image_drm_format_modifier not supported by {dev.name}")
    with BACKEND.create_texture(640, 360, "rgba8", memory=memory) as t:
        assert t.descriptor.memory == memory
        data = _random((360, 640, 4), "rgba8", seed=1)
        t.upload(data)
        reply = _random((360, 640, 4), "rgba8", seed=2)
        seen = _cross_process(t, reply)
        assert _same_bytes(seen, data)
        assert _same_bytes(t.download(), reply)


def test_buffer_across_processes(dev):
    with BACKEND.create_buffer(100_000) as b:
        assert b.descriptor.size >= 100_000 and b.descriptor.kind == "buffer"
        data = _random((b.descriptor.size,), "r8", seed=3)
        b.upload(data)
        reply = _random((b.descriptor.size,), "r8", seed=4)
        seen = _cross_process(b, reply)
        assert _same_bytes(seen, data)
        assert _same_bytes(b.download(), reply)


@pytest.mark.parametrize("host_import", [None, False], ids=["default", "staged"])
def test_memfd_to_vulkan_and_back(dev, host_import):
    if host_import is None and not dev.external_memory_host:
        pytest.skip(f"VK_EXT_external_memory_host not supported by {dev.name}")
    for w, h in ((64, 32), (50, 30)):  # pitch == linear pitch, and padded rows
        with memfd_backend.BACKEND.create_texture(w, h, "rgba8") as m:
            with BACKEND.import_resource(m.descriptor, m.export_fds(), host_import=host_import) as v:
                assert v.zero_copy is (host_import is None)
                data = _random((h, w, 4), "rgba8", seed=w)
                m.numpy()[...] = data  # NumPy producer
                v.sync_to_image()  # no-op when zero-copy
                assert _same_bytes(v.download(), data)  # read via Vulkan
                v.upload(255 - data)  # Vulkan producer
                assert _same_bytes(m.numpy(), 255 - data)  # NumPy consumer
                if v.image is not None:
                    v.clear((0.0, 1.0, 0.0, 1.0))
                    v.sync_to_host()
                    assert (m.numpy() == np.array([0, 255, 0, 255], np.uint8)).all()


def test_memfd_zero_copy_is_really_shared(dev):
    if not dev.external_memory_host:
        pytest.skip(f"VK_EXT_external_memory_host not supported by {dev.name}")
    with memfd_backend.BACKEND.create_buffer(8192) as m:
        with BACKEND.import_resource(m.descriptor, m.export_fds()) as v:
            assert v.zero_copy and v.buffer is not None
            v.clear(0x04030201)  # GPU fill straight into the memfd pages
            assert bytes(m.numpy()[:8]) == bytes([1, 2, 3, 4, 1, 2, 3, 4])
            m.numpy()[:4] = [9, 9, 9, 9]
            assert list(v.download()[:4]) == [9, 9, 9, 9]


def test_foreign_uuid_refused_without_leaking_the_fd(dev):
    with BACKEND.create_texture(16, 16, "rgba8") as t:
        t.clear((0.0, 0.0, 1.0, 1.0))
        base = fd_count()
        for field in ("driver_uuid", "device_uuid"):
            bad = t.descriptor.with_(**{field: bytes(range(16))})
            fd = t.export_fds()[0]
            with pytest.raises(IncompatibleDevice):
                BACKEND.import_resource(bad, [fd])
            with pytest.raises(OSError):
                os.fstat(fd)  # ownership was taken: closed
        assert fd_count() == base
        assert (t.download()[..., 2] == 255).all()  # the exporter's memory is untouched


def test_unsupported_format_or_usage_refused(dev):
    # storage on an sRGB format is not a thing on lavapipe (nor on most GPUs): check the device, then expect refusal
    fp = _vk.ffi.new("VkFormatProperties*")
    _vk.lib.vkGetPhysicalDeviceFormatProperties(dev.physical_device, FORMATS["rgba8_srgb"].vk, fp)
    base = fd_count()
    if not fp.optimalTilingFeatures & vulkan_mod.VK_FORMAT_FEATURE_STORAGE_IMAGE_BIT:
        with pytest.raises(BackendError, match="unsupported"):
            BACKEND.create_texture(16, 16, "rgba8_srgb", usage=int(Usage.DEFAULT | Usage.STORAGE))
    with BACKEND.create_texture(64, 64, "rgba8") as t:
        d = t.descriptor
        if not fp.optimalTilingFeatures & vulkan_mod.VK_FORMAT_FEATURE_STORAGE_IMAGE_BIT:
            bad = d.with_(format="rgba8_srgb", driver_private={**d.driver_private, "vk_format": FORMATS["rgba8_srgb"].vk,
                                                               "vk_usage": d.driver_private["vk_usage"] |
                                                               vulkan_mod.VK_IMAGE_USAGE_STORAGE_BIT})
            with pytest.raises(BackendError, match="unsupported"):
                BACKEND.import_resource(bad, t.export_fds())
        cases = [
            d.with_(format="nope"),  # not in the format table
            d.with_(driver_private={**d.driver_private, "vk_format": FORMATS["r8"].vk}),  # disagrees with format
            d.with_(driver_private={**d.driver_private, "tiling": "wavy"}),
            d.with_(driver_private={**d.driver_private, "vk_usage": "all"}),
            d.with_(size=1024, driver_private={**d.driver_private, "allocation_size": 1024}),  # memory too small
            d.with_(width=4096, height=4096),  # needs far more than the fd holds
            d.with_(memory="cuda_vmm"),
            d.with_(mip_levels=17),  # more mips than a 64x64 image has
            d.with_(driver_private={**d.driver_private, "vk_flags": vulkan_mod.VK_IMAGE_CREATE_SPARSE_BINDING_BIT}),
            d.with_(driver_private={**d.driver_private, "vk_usage": 1 << 30}),
            d.with_(driver_private={**d.driver_private, "memory_type_index": -1}),
            d.with_(driver_uuid=b""),  # opaque_fd without identity
        ]
        for bad in cases:
            with pytest.raises((InvalidDescriptor, BackendError)):
                BACKEND.import_resource(bad, t.export_fds())
        with memfd_backend.BACKEND.create_texture(4, 4, "rgba8") as m:
            fd = os.memfd_create("x")
            os.ftruncate(fd, 10)
            with pytest.raises(InvalidDescriptor):  # a memfd that is not size-sealed and too small
                BACKEND.import_resource(m.descriptor, [fd])
    assert fd_count() == base


def test_open_close_1000_cycles_leak_nothing(dev):
    with BACKEND.create_texture(32, 32, "rgba8") as t:
        t.clear((128 / 255,) * 4)  # exactly representable: drivers round 0.5 * 255 either way
        for _ in range(3):  # warm up lazily created things (staging, driver caches)
            with BACKEND.import_resource(t.descriptor, t.export_fds()) as r:
                r.download()
        fds, objs = fd_count(), live_objects()
        for i in range(1000):
            r = BACKEND.import_resource(t.descriptor, t.export_fds())
            if i % 100 == 0:
                assert (r.download() == 128).all()
            r.close()
        assert fd_count() == fds
        assert live_objects() == objs
    with memfd_backend.BACKEND.create_texture(16, 16, "rgba8") as m:
        fds, objs = fd_count(), live_objects()
        for _ in range(200):
            BACKEND.import_resource(m.descriptor, m.export_fds()).close()
        assert fd_count() == fds and live_objects() == objs


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_supported_format_round_trips(dev, fmt):
    try:
        t = BACKEND.create_texture(37, 21, fmt)
    except BackendError as e:
        if "unsupported" in str(e) or "not exportable" in str(e):
            pytest.skip(f"{fmt} is not exportable on {dev.name}: {e}")
        raise
    with t:
        data = _random((21, 37, FORMATS[fmt].channels), fmt, seed=len(fmt))
        t.upload(data)
        assert _same_bytes(t.download(), data)
        with BACKEND.import_resource(t.descriptor, t.export_fds()) as r:
            assert _same_bytes(r.download(), data)


def test_mips_and_layers(dev):
    with BACKEND.create_texture(64, 64, "rgba8", mip_levels=3, array_size=2) as t:
        a, b = _random((64, 64, 4), "rgba8", 5), _random((64, 64, 4), "rgba8", 6)
        t.upload(a, layer=0)
        t.upload(b, layer=1)
        with BACKEND.import_resource(t.descriptor, t.export_fds()) as r:
            assert _same_bytes(r.download(layer=0), a) and _same_bytes(r.download(layer=1), b)


def test_closed_device_and_resource(dev):
    d2 = _vk.VulkanDevice()
    t = BACKEND.create_texture(8, 8, "rgba8", device=d2)
    d2.close()  # closes what is still open on it first
    assert t.closed
    with pytest.raises(BackendError):
        BACKEND.create_texture(8, 8, "rgba8", device=d2)


def test_diagnostics_never_raises():
    info = BACKEND.diagnostics()
    assert "available" in info
    if info["available"]:
        assert info["devices"] and all(len(bytes.fromhex(d["device_uuid"])) == 16 for d in info["devices"])


def test_timeline_semaphore_across_processes(dev):
    if not dev.capabilities["external_semaphore_fd"]:
        pytest.skip(f"VK_KHR_external_semaphore_fd not supported by {dev.name}")
    if dev.gpu_sync != "timeline_semaphore":
        pytest.skip(f"exportable OPAQUE_FD timeline semaphores not supported by {dev.name}")
    sem = dev.create_timeline_semaphore()
    try:
        parent, child = socket.socketpair()
        code = r"""
            import socket, sys
            from texbridge.backends import _vk
            s = socket.socket(fileno=int(sys.argv[1]))
            _, fds, _, _ = socket.recv_fds(s, 16, 1)
            dev = _vk.default_device()
            sem = dev.import_timeline_semaphore(fds[0])
            assert sem.wait(1, timeout=10), "parent's GPU signal never arrived"
            dev.submit_signal(2, sem)  # queue signal from this process
            s.sendall(b"ok")
            sem.destroy()
        """
        proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), str(child.fileno())],
                                pass_fds=[child.fileno()], stderr=subprocess.PIPE, text=True)
        child.close()
        fd = sem.export_fd()
        socket.send_fds(parent, [b"s"], [fd])
        os.close(fd)
        dev.submit_signal(1, sem)
        assert parent.recv(2) == b"ok"
        assert sem.wait(2, timeout=10) and sem.value >= 2
        assert proc.wait(30) == 0, proc.stderr.read()
        parent.close()
    finally:
        sem.destroy()


def test_cpu_wait_path_is_recorded(dev):
    if dev.gpu_sync != "cpu_wait":
        pytest.skip(f"{dev.name} has exportable timeline semaphores: the cpu_wait path does not run")
    assert dev.sync_semaphore is None
    with pytest.raises(BackendError, match="semaphore"):
        dev.create_timeline_semaphore()
    dev.submit_signal(1)  # waits for the queue: must return
    dev.submit_wait(1)


def test_refused_semaphore_import_closes_the_fd(dev):
    """import_timeline_semaphore takes the fd whatever happens: a refusal (no external semaphores here, or an fd
    that is no semaphore) closes it, never leaks it."""
    from texbridge._sharedmem import create_sealed

    before = fd_count()
    fd = create_sealed("texbridge:not-a-semaphore", 4096)
    with pytest.raises(BackendError, match="not a semaphore export"):  # refused before the driver sees it:
        dev.import_timeline_semaphore(fd)  # NVIDIA's device answered OUT_OF_DEVICE_MEMORY ever after otherwise
    assert fd_count() == before


# -- through the Session API -------------------------------------------------------------------------------------------
def test_session_create_and_open_in_another_process(session, dev):
    tex = session.create_texture(96, 64, "rgba8", backend="vulkan", name="vk-tex")
    data = _random((64, 96, 4), "rgba8", seed=9)
    tex.upload(data)
    np.save(os.environ["TEXBRIDGE_RUNTIME_DIR"] + "/expect.npy", data)
    out = run_py("""
        import os, numpy as np, texbridge
        with texbridge.connect() as s:
            r = s.open("vk-tex", backend="vulkan")
            expect = np.load(os.environ["TEXBRIDGE_RUNTIME_DIR"] + "/expect.npy")
            assert type(r).__name__ == "VulkanResource" and r.image is not None
            assert (r.download() == expect).all()
            r.upload(255 - expect)
            r.close()
        print("ok")
    """)
    assert out.stdout.strip() == "ok"
    assert _same_bytes(tex.download(), 255 - data)
    h = session.open(tex.handle, backend="vulkan")  # and in this process, by handle
    assert _same_bytes(h.download(), 255 - data)
    h.close()
    tex.close()


FRAMES = 1000


def test_keyed_mutex_ping_pong_1000_frames(session, dev):
    """Two processes take turns writing frame numbers into one Vulkan texture, guarded by the keyed mutex."""
    tex = session.create_texture(16, 16, "r32ui", backend="vulkan", keyed_mutex=True, name="vk-pingpong")
    assert tex.mutex is not None
    child = spawn_py(f"""
        import numpy as np, texbridge
        with texbridge.connect() as s:
            r = s.open("vk-pingpong", backend="vulkan")
            for i in range({FRAMES}):
                with r.mutex.hold(acquire=1, release=0, timeout=30):   # GPU waits/signals folded in
                    got = r.download()
                    assert (got == 2 * i).all(), (i, got[0, 0])
                    r.upload(np.full(got.shape, 2 * i + 1, np.uint32))
            r.close()
        print("ok")
    """)
    try:
        shape = tex.shape
        expected_sync = "timeline_opaque_fd" if dev.gpu_sync == "timeline_semaphore" else ""
        assert tex.descriptor.gpu_sync == expected_sync
        for i in range(FRAMES):
            with tex.mutex.hold(acquire=0, release=1, timeout=30):
                if i:
                    got = tex.download()
                    assert (got == 2 * i - 1).all(), (i, got[0, 0])
                tex.upload(np.full(shape, 2 * i, np.uint32))
        tex.mutex.acquire(0, timeout=30)
        assert (tex.download() == 2 * FRAMES - 1).all()
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0 and out.strip() == "ok", err
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        tex.close()


LINEAR_READER = r"""
import sys, numpy as np, texbridge
from texbridge import Descriptor
from texbridge._client import _unpack_descriptor
from texbridge._protocol import Op
from texbridge.backends.vulkan import BACKEND
handle, out = sys.argv[1], sys.argv[2]
with texbridge.connect() as s:
    img = s.open(handle, backend="vulkan")  # the image, recreated from the descriptor
    np.save(out + "-img.npy", img.download())
    # The independent path: the same memory as a plain VkBuffer, seen only through the descriptor's size.
    fields, fds = s._channel.request(Op.OPEN, {"handle": img.handle.value})
    d = Descriptor.from_wire(_unpack_descriptor(fields["descriptor"]), validated=True)
    raw = Descriptor(kind="buffer", size=d.size, memory=d.memory, backend="test", driver_uuid=d.driver_uuid,
                     device_uuid=d.device_uuid, driver_private={"buffer_size": d.size, "vk_usage": 3}).validate()
    try:
        buf = BACKEND.import_resource(raw, fds)
    except texbridge.BackendError as e:  # drivers may insist a dedicated image allocation is imported as one
        print("no raw path:", e)
    else:
        np.save(out + "-raw.npy", buf.download())
        buf.close()
    img.close()
"""


def test_linear_texture_records_its_layout_for_any_importer(session, dev, tmp_path):
    """A LINEAR image's descriptor carries offset and row pitch; a reader that knows only the descriptor and the
    fd (here: a VkBuffer import of the raw memory in another process) finds every row where the planes say."""
    w, h = 33, 7
    try:
        tex = session.create_texture(w, h, "rgba8", backend="vulkan", tiling="linear", memory="opaque_fd")
    except BackendError as e:
        pytest.skip(f"{dev.name} cannot export a linear rgba8 image: {e}")
    d = tex.descriptor
    assert len(d.planes) == 1, "a linear image must record its plane layout"
    (offset, pitch), = d.planes
    assert pitch >= w * 4 and offset + pitch * (h - 1) + w * 4 <= d.size
    assert d.driver_private["plane_layouts"][0]["row_pitch"] == pitch
    data = _random((h, w, 4), "rgba8", seed=9)
    tex.upload(data)
    out = run_py(LINEAR_READER, str(tex.handle), str(tmp_path / "r")).stdout
    assert _same_bytes(np.load(tmp_path / "r-img.npy"), data)
    if "no raw path" in out:
        tex.close()
        pytest.skip(f"{dev.name} refuses to import the image's memory as a buffer: {out.strip()}")
    raw = np.load(tmp_path / "r-raw.npy")
    rows = np.stack([raw[offset + y * pitch: offset + y * pitch + w * 4] for y in range(h)]).reshape(h, w, 4)
    assert _same_bytes(rows, data)
    tex.close()


def test_linear_import_refuses_a_layout_this_driver_would_not_use(session, dev):
    try:
        tex = session.create_texture(16, 4, "rgba8", backend="vulkan", tiling="linear", memory="opaque_fd")
    except BackendError as e:
        pytest.skip(f"{dev.name} cannot export a linear rgba8 image: {e}")
    fds = tex.export_fds()
    (offset, pitch), = tex.descriptor.planes
    bad = tex.descriptor.with_(planes=((offset, pitch + 256),))
    with pytest.raises(IncompatibleDevice, match="linear layout"):
        BACKEND.import_resource(bad, fds)
    tex.close()
