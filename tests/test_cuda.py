"""CUDA backend on a real NVIDIA driver: real processes, real fds, through the broker.

Without a GPU (CI) every test that needs CUDA skips, naming what is missing (cuda-bindings, libcuda, a device); the
first test still checks that the missing capability is reported, not crashed on.
"""

from __future__ import annotations

import os
import textwrap

import numpy as np
import pytest

from texbridge import FORMATS, IncompatibleDevice, InvalidDescriptor
from texbridge._errors import BackendError

from conftest import fd_count, run_py, spawn_py

pytestmark = pytest.mark.gpu


def _cuda_reason() -> str | None:
    try:
        import cuda.bindings.driver  # noqa: F401
    except ImportError:
        return "cuda-bindings not installed (texbridge[cuda])"
    from texbridge.backends.cuda import unavailable_reason

    return unavailable_reason()


CUDA_REASON = _cuda_reason()
needs_cuda = pytest.mark.skipif(CUDA_REASON is not None, reason=str(CUDA_REASON))


@pytest.fixture(scope="module")
def cuda():
    if CUDA_REASON:
        pytest.skip(CUDA_REASON)
    from texbridge.backends.cuda import BACKEND, get_device

    return BACKEND, get_device()


@pytest.fixture(scope="module")
def vk(cuda):
    """The Vulkan device, when it is the same GPU as CUDA device 0 (OPAQUE_FD cannot cross drivers)."""
    try:
        from texbridge.backends import _vk

        dev = _vk.default_device()
    except (ImportError, BackendError) as e:
        pytest.skip(f"no Vulkan device with VK_KHR_external_memory_fd: {e}")
    if dev.device_uuid != cuda[1].uuid:
        pytest.skip(f"Vulkan device {dev.name} is not CUDA device 0 (UUIDs differ): OPAQUE_FD cannot cross them")
    return dev


def _torch():
    return pytest.importorskip("torch", reason="torch is not installed")


def _cupy():
    return pytest.importorskip("cupy", reason="cupy is not installed")


PRELUDE = """
import os, sys
import numpy as np
import texbridge
from texbridge.backends.cuda import BACKEND

def pattern(shape, dtype, seed):
    dt = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=int(np.prod(shape)) * dt.itemsize, dtype=np.uint8).view(dt).reshape(shape)

def same(a, b):
    return a.shape == b.shape and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()
"""
_ns: dict = {}
exec(PRELUDE.replace("from texbridge.backends.cuda import BACKEND", ""), _ns)
pattern, same = _ns["pattern"], _ns["same"]


def child(body: str) -> str:
    return PRELUDE + textwrap.dedent(body)


def _shape(fmt: str, w: int, h: int) -> tuple[int, int, int]:
    return (h, w, FORMATS[fmt].channels)


# -- runs everywhere cuda-bindings imports -------------------------------------------------------------------------------
def test_missing_capability_is_reported_not_crashed():
    pytest.importorskip("cuda.bindings.driver", reason="cuda-bindings not installed (texbridge[cuda])")
    from texbridge.backends.cuda import BACKEND

    diag = BACKEND.diagnostics()
    if CUDA_REASON:
        assert diag == {"available": False, "detail": CUDA_REASON}
        assert "CUDA driver" in CUDA_REASON or "CUDA device" in CUDA_REASON
        with pytest.raises(BackendError, match="cuda backend is unavailable"):
            BACKEND.create_buffer(4096)
    else:
        assert diag["available"] and diag["devices"], diag
        for d in diag["devices"]:
            assert len(d["uuid"]) == 32 and d["name"]
        assert BACKEND.diagnostics()["driver_version"] == diag["driver_version"]


# -- in one process ----------------------------------------------------------------------------------------------------
@needs_cuda
def test_vmm_buffer_layout_export_and_reimport(cuda):
    backend, dev = cuda
    with backend.create_buffer(1000) as buf:
        d = buf.descriptor
        assert d.memory == "cuda_vmm" and d.backend == "cuda" and d.device_uuid == dev.uuid
        assert d.size % dev.granularity == 0 and d.size >= 1000
        assert d.driver_private["allocation_size"] == d.size
        assert not buf.download().any()  # zeroed at creation
        data = pattern((d.size,), np.uint8, 1)
        buf.upload(data)
        fds = buf.export_fds() + buf.export_fds()
        assert fds[0] != fds[1]
        os.close(fds[1])
        with backend.import_resource(d, [fds[0]]) as again:
            assert again.device_ptr != buf.device_ptr
            assert same(again.download(), data)


@needs_cuda
@pytest.mark.parametrize("fmt", ["rgba8", "bgra8", "r16f", "rgba32f", "rg8"])
def test_vmm_texture_is_pitch_linear(cuda, fmt):
    backend, dev = cuda
    with backend.create_texture(100, 37, fmt) as tex:
        d = tex.descriptor
        bpp = FORMATS[fmt].bytes_per_pixel
        assert d.planes == ((0, -(-100 * bpp // 256) * 256),) and d.driver_private["pitch"] == d.row_pitch
        data = pattern(_shape(fmt, 100, 37), FORMATS[fmt].dtype, 3)
        tex.upload(data)
        assert same(tex.download(), data)


@needs_cuda
def test_refusals_close_the_fd(cuda):
    backend, dev = cuda
    with backend.create_buffer(4096) as buf:
        base = fd_count()
        for bad, exc in ((buf.descriptor.with_(device_uuid=b"\x01" * 16), IncompatibleDevice),
                         (buf.descriptor.with_(memory="memfd"), InvalidDescriptor),
                         (buf.descriptor.with_(device_uuid=b""), InvalidDescriptor),
                         (buf.descriptor.with_(size=buf.descriptor.size + 1), InvalidDescriptor)):
            fd = buf.export_fds()[0]
            with pytest.raises(exc):
                backend.import_resource(bad, [fd])
            assert fd_count() == base, f"fd leaked after refusing {bad}"
        with pytest.raises(TypeError):
            backend.import_resource(buf.descriptor, buf.export_fds(), tiling="linear")
        assert fd_count() == base
        with pytest.raises(IncompatibleDevice):
            backend.create_buffer(4096, device=0, device_uuid=b"\x02" * 16)


@needs_cuda
def test_torch_view_is_zero_copy(cuda):
    torch = _torch()
    backend, dev = cuda
    with backend.create_texture(100, 37, "rgba8") as tex:
        t = torch.from_dlpack(tex)
        assert t.data_ptr() == tex.device_ptr and t.is_cuda and t.device.index == dev.ordinal
        assert tuple(t.shape) == (37, 100, 4) and t.dtype == torch.uint8
        assert t.stride() == (tex.row_pitch, 4, 1)
        t.fill_(7)
        torch.cuda.synchronize()
        assert (tex.download() == 7).all()
        data = pattern((37, 100, 4), np.uint8, 4)
        tex.upload(data)
        assert same(t.cpu().numpy(), data)
        del t
    with backend.create_texture(16, 16, "rgba32f") as tex:
        t = torch.from_dlpack(tex)
        assert t.dtype == torch.float32 and tuple(t.shape) == (16, 16, 4) and t.data_ptr() == tex.device_ptr
        t.copy_(torch.arange(16 * 16 * 4, dtype=torch.float32, device=t.device).reshape(16, 16, 4))
        torch.cuda.synchronize()
        assert (tex.download().reshape(-1) == np.arange(16 * 16 * 4)).all()
        del t
    with backend.create_buffer(5000) as buf:
        t = torch.from_dlpack(buf)
        assert tuple(t.shape) == (buf.descriptor.size,) and t.data_ptr() == buf.device_ptr
        del t


@needs_cuda
def test_close_with_a_live_dlpack_view_defers_the_free(cuda):
    torch = _torch()
    backend, dev = cuda
    tex = backend.create_texture(64, 64, "rgba8")
    t = torch.from_dlpack(tex)
    tex.close()
    t.fill_(3)  # still mapped: the view keeps it
    torch.cuda.synchronize()
    assert int(t.sum()) == 3 * 64 * 64 * 4
    free_before = dev.mem_info()[0]
    del t  # the deleter runs the deferred free
    assert dev.mem_info()[0] >= free_before + tex.descriptor.size - dev.granularity


@needs_cuda
def test_cupy_view_is_zero_copy(cuda):
    cupy = _cupy()
    backend, dev = cuda
    with backend.create_texture(100, 37, "rgba8") as tex:
        a = cupy.asarray(tex)
        assert a.data.ptr == tex.device_ptr and a.shape == (37, 100, 4) and a.dtype == np.uint8
        assert a.strides == (tex.row_pitch, 4, 1)
        a[...] = 9
        cupy.cuda.Device().synchronize()
        assert (tex.download() == 9).all()
        d = cupy.from_dlpack(tex)
        assert d.data.ptr == tex.device_ptr
        del a, d
    with backend.create_texture(8, 8, "r16f") as tex:
        a = cupy.asarray(tex)
        assert a.dtype == np.float16 and a.shape == (8, 8, 1)
        del a


# -- across processes, through the broker --------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("fmt", ["rgba8", "rgba32f"])
def test_cuda_to_cuda_across_processes(session, cuda, fmt):
    tex = session.create_texture(100, 37, fmt, backend="cuda", name="cam")
    shape, dt = _shape(fmt, 100, 37), FORMATS[fmt].dtype
    tex.upload(pattern(shape, dt, 10))
    buf = session.create_buffer(3000, backend="cuda", name="buf")
    buf.upload(pattern((buf.descriptor.size,), np.uint8, 11))
    out = run_py(child(f"""
        with texbridge.connect() as s:
            tex = s.open("cam")  # cuda_vmm opens in CUDA by default
            assert type(tex).__name__ == "CUDAResource" and tex.descriptor.memory == "cuda_vmm"
            assert same(tex.download(), pattern({shape}, "{dt}", 10)), "texture content"
            tex.upload(pattern({shape}, "{dt}", 12))
            buf = s.open("buf", backend="cuda")
            assert same(buf.download(), pattern(({buf.descriptor.size},), np.uint8, 11)), "buffer content"
            buf.clear(0x01020304)
            buf.synchronize()
            print("ok")
    """), timeout=120)
    assert out.stdout.strip() == "ok"
    assert same(tex.download(), pattern(shape, dt, 12))
    assert (buf.download().view("<u4") == 0x01020304).all()


@needs_cuda
def test_memory_survives_its_creators_exit(session, cuda):
    creator = spawn_py(child("""
        s = texbridge.connect()
        buf = s.create_buffer(6 << 20, backend="cuda", name="orphan")
        buf.upload(pattern((buf.descriptor.size,), np.uint8, 20))
        print(buf.handle, buf.descriptor.size, flush=True)
        sys.stdin.readline()
        os._exit(0)  # no cleanup at all: the broker drops this client's references
    """), stdin=__import__("subprocess").PIPE)
    try:
        handle, size = creator.stdout.readline().split()
        first = session.open("orphan")
        assert same(first.download(), pattern((int(size),), np.uint8, 20))
    finally:
        creator.stdin.write("\n")
        creator.stdin.close()
        assert creator.wait(60) == 0
    # The creator is gone; the broker's fd keeps the allocation: a new import maps the same memory.
    second = session.open(handle, backend="cuda")
    assert same(second.download(), pattern((int(size),), np.uint8, 20))
    first.clear(0xdeadbeef)
    first.synchronize()
    assert (second.download().view("<u4") == 0xdeadbeef).all()
    out = run_py(child(f"""
        with texbridge.connect() as s:
            r = s.open("{handle}")
            assert (r.download().view("<u4") == 0xdeadbeef).all()
            print("ok")
    """), timeout=120)
    assert out.stdout.strip() == "ok"


@needs_cuda
def test_vulkan_to_cuda_and_back_across_processes(session, cuda, vk):
    tex = session.create_texture(100, 37, "rgba8", backend="vulkan", name="vk-tex", memory="opaque_fd")
    assert tex.descriptor.memory == "opaque_fd" and tex.descriptor.driver_private["tiling"] == "optimal"
    tex.upload(pattern((37, 100, 4), np.uint8, 30))
    vbuf = session.create_buffer(10000, backend="vulkan", name="vk-buf")
    vbuf.upload(pattern((vbuf.descriptor.size,), np.uint8, 31))
    out = run_py(child(f"""
        with texbridge.connect() as s:
            tex = s.open("vk-tex", backend="cuda")
            assert tex.array is not None  # optimal tiling: a CUDA array, not a pointer
            assert same(tex.download(), pattern((37, 100, 4), np.uint8, 30)), "texture content"
            # copy helper: array -> linear device memory (a cuda_vmm texture) and back
            lin = BACKEND.create_texture(100, 37, "rgba8")
            tex.copy_to_device(lin.device_ptr, lin.row_pitch)
            assert same(lin.download(), pattern((37, 100, 4), np.uint8, 30)), "copy_to_device"
            lin.upload(pattern((37, 100, 4), np.uint8, 32))
            tex.copy_from_device(lin.device_ptr, lin.row_pitch)
            lin.close()
            buf = s.open("vk-buf", backend="cuda")
            assert same(buf.download(), pattern(({vbuf.descriptor.size},), np.uint8, 31)), "buffer content"
            buf.upload(pattern(({vbuf.descriptor.size},), np.uint8, 33))
            print("ok")
    """), timeout=120)
    assert out.stdout.strip() == "ok"
    assert same(tex.download(), pattern((37, 100, 4), np.uint8, 32))  # CUDA's write, read by Vulkan
    assert same(vbuf.download(), pattern((vbuf.descriptor.size,), np.uint8, 33))


@needs_cuda
def test_cuda_writes_reach_a_vulkan_importer(session, cuda, vk):
    """CUDA → Vulkan: one process writes with CUDA, a third process reads with Vulkan (the creator only holds it)."""
    tex = session.create_texture(64, 48, "rgba16f", backend="vulkan", name="shared", memory="opaque_fd")
    run_py(child("""
        with texbridge.connect() as s:
            s.open("shared", backend="cuda").upload(pattern((48, 64, 4), "<f2", 40))
    """), timeout=120)
    out = run_py(child("""
        with texbridge.connect() as s:
            r = s.open("shared", backend="vulkan")
            assert same(r.download(), pattern((48, 64, 4), "<f2", 40))
            print("ok")
    """), timeout=120)
    assert out.stdout.strip() == "ok"
    assert tex.descriptor.memory == "opaque_fd"


@needs_cuda
def test_keyed_mutex_1000_frames_cuda_to_cuda(session, cuda):
    n = 1000
    tex = session.create_texture(64, 64, "rgba8", backend="cuda", keyed_mutex=True, name="frames")
    peer = spawn_py(child(f"""
        with texbridge.connect() as s:
            r = s.open("frames")
            r.sync_stream = r.stream
            for i in range({n}):
                r.mutex.acquire(1, timeout=30)
                word = (i * 2654435761) & 0xFFFFFFFF
                got = r.download().view("<u4")
                assert (got == word).all(), f"frame {{i}}: {{got[0, 0]}} != {{word}}"
                r.clear(word ^ 0xFFFFFFFF, stream=r.stream)  # GPU write on a stream: release must sync it
                r.mutex.release(0)
            print(r.cuda_sync)
    """))
    try:
        tex.sync_stream = tex.stream
        for i in range(n):
            tex.mutex.acquire(0, timeout=30)
            if i:
                prev = (((i - 1) * 2654435761) & 0xFFFFFFFF) ^ 0xFFFFFFFF
                assert (tex.download().view("<u4") == prev).all(), f"frame {i - 1} back"
            tex.clear((i * 2654435761) & 0xFFFFFFFF, stream=tex.stream)
            tex.mutex.release(1)
        tex.mutex.acquire(0, timeout=30)
        assert (tex.download().view("<u4") == (((n - 1) * 2654435761) & 0xFFFFFFFF) ^ 0xFFFFFFFF).all()
        tex.mutex.release(0)
        out, err = peer.communicate(timeout=120)
    finally:
        peer.kill()
    assert peer.returncode == 0, err
    assert out.strip() == "stream_sync" and tex.cuda_sync == "stream_sync"


@needs_cuda
def test_keyed_mutex_1000_frames_on_the_resources_timeline_semaphore(session, cuda, vk):
    """The GPU-sync path: a Vulkan texture created with keyed_mutex=True carries its own timeline semaphore through
    the broker (descriptor.gpu_sync); two CUDA processes hand frames over, each waiting on the GPU for the other's
    signal, with nothing but res.mutex.acquire/release in their code."""
    if vk.gpu_sync != "timeline_semaphore":
        pytest.skip(f"exportable timeline semaphores not supported by {vk.name}")
    n = 1000
    tex = session.create_texture(32, 32, "rgba8", backend="vulkan", keyed_mutex=True, name="tl", memory="opaque_fd")
    assert tex.descriptor.gpu_sync == "timeline_opaque_fd" and tex.semaphore is not None
    code = child(f"""
        key = int(sys.argv[1])
        with texbridge.connect() as s:
            r = s.open("tl", backend="cuda")
            assert r.semaphore is not None
            for i in range({n}):
                r.mutex.acquire(key, timeout=30)  # the legacy stream waits on the GPU for the other side's signal
                want = (2 * i - 1 + key) % 256 if i or key else 0
                got = r.download()
                assert (got == want).all(), f"key {{key}} frame {{i}}: {{got[0, 0]}} != {{want}}"
                r.upload(np.full((32, 32, 4), (2 * i + key) % 256, np.uint8))
                r.mutex.release(1 - key)  # signals the next value on the GPU
            print(r.cuda_sync)
    """)
    peers = [spawn_py(code, str(key)) for key in (0, 1)]
    results = [p.communicate(timeout=180) for p in peers]
    for p, (_, err) in zip(peers, results):
        assert p.returncode == 0, err
    assert [o.strip() for o, _ in results] == ["timeline_semaphore", "timeline_semaphore"]
    assert tex.semaphore.wait(2 * n, timeout=10) and tex.semaphore.value == 2 * n


@needs_cuda
def test_vulkan_and_cuda_take_turns_on_the_gpu(session, cuda, vk):
    """Vulkan in this process and CUDA in another, 200 handoffs, each side waiting for the other on its GPU queue."""
    if vk.gpu_sync != "timeline_semaphore":
        pytest.skip(f"exportable timeline semaphores not supported by {vk.name}")
    n = 200
    tex = session.create_texture(16, 16, "r32ui", backend="vulkan", keyed_mutex=True, name="vkcu", memory="opaque_fd")
    peer = spawn_py(child(f"""
        with texbridge.connect() as s:
            r = s.open("vkcu", backend="cuda")
            for i in range({n}):
                r.mutex.acquire(1, timeout=30)
                got = r.download().view("<u4")
                assert (got == 2 * i).all(), f"frame {{i}}: {{got[0, 0]}}"
                r.upload(np.full((16, 16, 1), 2 * i + 1, np.uint32))
                r.mutex.release(0)
            print(r.cuda_sync)
    """))
    try:
        for i in range(n):
            tex.mutex.acquire(0, timeout=30)
            if i:
                assert (tex.download() == 2 * i - 1).all(), f"frame {i}"
            tex.upload(np.full(tex.shape, 2 * i, np.uint32))
            tex.mutex.release(1)
        tex.mutex.acquire(0, timeout=30)
        assert (tex.download() == 2 * n - 1).all()
        out, err = peer.communicate(timeout=120)
        assert peer.returncode == 0, err
        assert out.strip() == "timeline_semaphore"
    finally:
        if peer.poll() is None:
            peer.kill()


@needs_cuda
def test_1000_open_close_cycles_leak_nothing(session, cuda):
    backend, dev = cuda
    buf = session.create_buffer(4 << 20, backend="cuda")
    buf.upload(pattern((buf.descriptor.size,), np.uint8, 50))

    def cycle(i: int) -> None:
        r = session.open(buf.handle, backend="cuda")
        if i % 100 == 0:
            assert same(r.download(), pattern((buf.descriptor.size,), np.uint8, 50))
        r.close()
        if i % 10 == 0:  # allocations too: a leak here shows in free device memory
            session.create_texture(512, 512, "rgba8", backend="cuda").close()

    for i in range(20):
        cycle(i)
    fds, free = fd_count(), dev.mem_info()[0]
    for i in range(1000):
        cycle(i)
    assert fd_count() == fds
    assert abs(dev.mem_info()[0] - free) <= 2 * dev.granularity, (free, dev.mem_info())


@needs_cuda
def test_1000_vulkan_imports_leak_nothing(session, cuda, vk):
    backend, dev = cuda
    vbuf = session.create_buffer(1 << 20, backend="vulkan")
    for _ in range(20):
        session.open(vbuf.handle, backend="cuda").close()
    fds, free = fd_count(), dev.mem_info()[0]
    for _ in range(1000):
        session.open(vbuf.handle, backend="cuda").close()
    assert fd_count() == fds  # CUDA owns each imported fd: a leaked external memory object would keep one
    assert abs(dev.mem_info()[0] - free) <= 2 * dev.granularity


@needs_cuda
def test_sender_takes_torch_and_cupy_cuda_frames(runtime, cuda):
    """Spout-style sending straight from GPU arrays: copied device to device into the CUDA ring."""
    import texbridge

    torch = pytest.importorskip("torch", reason="torch is not installed")
    with texbridge.Sender("cuda-send", 64, 32, backend="cuda") as s, texbridge.Receiver("cuda-send") as rx:
        s.send(torch.full((32, 64, 4), 77, dtype=torch.uint8, device="cuda"))
        frame = rx.wait_frame(5)
        assert frame is not None and (frame == 77).all()
        try:
            import cupy
        except ImportError:
            return
        s.send(cupy.full((32, 64, 4), 78, dtype=cupy.uint8))
        frame = rx.wait_frame(5)
        assert frame is not None and (frame == 78).all()


@needs_cuda
def test_close_with_a_live_cuda_array_interface_view_defers_the_free(cuda):
    """CuPy keeps the resource as its arrays' owner: close() must not free what such an array still points at."""
    cupy = _cupy()
    import gc

    backend, dev = cuda
    tex = backend.create_texture(64, 64, "rgba8")
    a = cupy.asarray(tex)
    size = tex.descriptor.size
    tex.close()
    a[...] = 5  # still mapped
    cupy.cuda.Device().synchronize()
    assert int(a.sum()) == 5 * 64 * 64 * 4
    free_before = dev.mem_info()[0]
    del a, tex
    gc.collect()  # the last owner reference goes: the deferred free runs
    assert dev.mem_info()[0] >= free_before + size - dev.granularity


@needs_cuda
def test_linear_vulkan_texture_opens_in_cuda_by_its_descriptor(session, cuda, vk):
    """tiling="linear": CUDA maps it as a pointer with the row pitch the descriptor records (another process)."""
    try:
        tex = session.create_texture(100, 37, "rgba8", backend="vulkan", name="vk-lin", memory="opaque_fd",
                                     tiling="linear")
    except BackendError as e:
        pytest.skip(f"{vk.name} cannot export a linear rgba8 image: {e}")
    assert tex.descriptor.planes, "a linear image must record its layout"
    tex.upload(pattern((37, 100, 4), np.uint8, 60))
    out = run_py(child("""
        with texbridge.connect() as s:
            t = s.open("vk-lin", backend="cuda")
            assert t.array is None and t.row_pitch == t.descriptor.row_pitch
            assert same(t.download(), pattern((37, 100, 4), np.uint8, 60)), "linear texture content"
            print("ok")
    """), timeout=120)
    assert out.stdout.strip() == "ok"
    tex.close()
