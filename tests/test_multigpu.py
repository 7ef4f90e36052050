"""Multi-GPU hosts: memory made on one GPU, used from another GPU of the same host peer to peer (NVLink / PCIe P2P),
never through host memory when a peer path exists. Real processes, real CUDA; skips name the missing capability
(cuda-bindings, a driver, a second device, peer access)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import run_py, spawn_py
from test_cuda import CUDA_REASON, child, pattern, same

pytestmark = pytest.mark.gpu


def _two_gpu_reason() -> str | None:
    if CUDA_REASON:
        return CUDA_REASON
    from texbridge.backends.cuda import device_count, get_device

    n = device_count()
    if n < 2:
        return f"a second CUDA device (this host has {n})"
    if not get_device(1).can_access_peer(get_device(0)):
        return "peer access from CUDA device 1 to device 0 (cuDeviceCanAccessPeer = 0)"
    return None


REASON = _two_gpu_reason()
needs_two_gpus = pytest.mark.skipif(REASON is not None, reason=f"two peer-capable CUDA devices: {REASON}")


@needs_two_gpus
def test_cuda_vmm_made_on_gpu0_is_used_on_gpu1_peer_mapped(session):
    tex = session.create_texture(1920, 1080, "rgba8", backend="cuda", device=0, name="g0")
    assert tex.device.ordinal == 0 and tex.access == "local"
    tex.upload(pattern((1080, 1920, 4), np.uint8, 40))
    out = run_py(child("""
        from texbridge.backends.cuda import BACKEND
        with texbridge.connect() as s:
            r = s.open("g0", backend="cuda", device=1)
            assert (r.device.ordinal, r.memory_device.ordinal, r.access) == (1, 0, "peer"), (r.device, r.access)
            assert r.__dlpack_device__() == (2, 1)  # a consumer's tensor is on cuda:1; the bytes stay on GPU 0
            local = BACKEND.create_texture(1920, 1080, "rgba8", device=1)
            r.copy_to_device(local.device_ptr, local.row_pitch)  # GPU 1 reads GPU 0's memory over the link
            assert same(local.download(), pattern((1080, 1920, 4), np.uint8, 40)), "peer read"
            r.clear(0x11223344)  # and writes it
            r.synchronize()
            print("ok")
    """), timeout=180)
    assert out.stdout.strip() == "ok"
    assert (tex.download().view("<u4") == 0x11223344).all()


@needs_two_gpus
def test_vulkan_memory_reaches_gpu1_by_peer_copy(session):
    from texbridge._errors import BackendError
    from texbridge.backends.cuda import get_device

    try:
        from texbridge.backends import _vk

        vk = _vk.default_device()
    except (ImportError, BackendError) as e:
        pytest.skip(f"needs a Vulkan device with VK_KHR_external_memory_fd: {e}")
    if vk.device_uuid != get_device(0).uuid:
        pytest.skip(f"needs the Vulkan device to be CUDA device 0 ({vk.name} is not)")
    tex = session.create_texture(1000, 600, "rgba8", backend="vulkan", name="vk0", memory="opaque_fd")
    tex.upload(pattern((600, 1000, 4), np.uint8, 41))
    out = run_py(child("""
        with texbridge.connect() as s:
            r = s.open("vk0", backend="cuda", device=1)
            assert (r.device.ordinal, r.access, r.consumer_device.ordinal) == (0, "copy", 1), r.access
            on1 = r.peer_copy()  # device to device, onto the GPU open() asked for
            assert on1.device.ordinal == 1 and on1.__dlpack_device__() == (2, 1)
            assert same(on1.download(), pattern((600, 1000, 4), np.uint8, 41)), "peer copy"
            print("ok")
    """), timeout=180)
    assert out.stdout.strip() == "ok"


@needs_two_gpus
def test_keyed_mutex_orders_frames_across_gpus(session):
    """GPU 0 writes frame i under the keyed mutex; a process on GPU 1 peer-copies it and must see exactly frame i."""
    n = 300
    tex = session.create_texture(256, 256, "rgba8", backend="cuda", device=0, keyed_mutex=True, name="km0")
    peer = spawn_py(child(f"""
        with texbridge.connect() as s:
            r = s.open("km0", backend="cuda", device=1)
            assert r.access == "peer"
            mine = r.peer_copy()
            for i in range({n}):
                r.mutex.acquire(1, timeout=30)
                r.peer_copy(mine)
                word = (i * 2654435761) & 0xFFFFFFFF
                got = mine.download().view("<u4")
                assert (got == word).all(), f"frame {{i}}: {{got[0, 0]:#x}} != {{word:#x}}"
                r.mutex.release(0)
            print("ok")
    """))
    try:
        tex.sync_stream = tex.stream
        for i in range(n):
            tex.mutex.acquire(0, timeout=30)
            tex.clear((i * 2654435761) & 0xFFFFFFFF, stream=tex.stream)  # async: release must order it
            tex.mutex.release(1)
        out, err = peer.communicate(timeout=180)
    finally:
        peer.kill()
    assert peer.returncode == 0, err
    assert out.strip() == "ok"


@needs_two_gpus
def test_peer_copy_refuses_another_geometry(session):
    from texbridge._errors import BackendError
    from texbridge.backends.cuda import BACKEND

    with BACKEND.create_texture(64, 64, "rgba8", device=0) as a, BACKEND.create_texture(64, 32, "rgba8",
                                                                                       device=1) as b:
        with pytest.raises(BackendError, match="geometry"):
            a.peer_copy(b)


@needs_two_gpus
def test_topology_names_every_pair_and_its_paths():
    from texbridge.backends.cuda import BACKEND, device_count

    report = BACKEND.diagnostics()
    n = device_count()
    pairs = {(p["from"], p["to"]): p for p in report["peers"]}
    assert set(pairs) == {(i, j) for i in range(n) for j in range(n) if i != j}
    assert pairs[(0, 1)]["peer_access"] is True
    assert "zero-copy" in pairs[(0, 1)]["cuda_vmm"] and "peer copy" in pairs[(0, 1)]["vulkan/gl memory"]
    assert f"{n} GPUs" in report["detail"]


@needs_two_gpus
@pytest.mark.parametrize("sender", ["cuda", "vulkan"])
def test_a_cuda_receiver_on_gpu1_gets_frames_of_a_gpu0_sender_peer_to_peer(runtime, sender):
    import texbridge
    from texbridge.backends.cuda import get_device

    if sender == "vulkan":
        from texbridge._errors import BackendError

        try:
            from texbridge.backends import _vk

            if _vk.default_device().device_uuid != get_device(0).uuid:
                pytest.skip("needs the Vulkan device to be CUDA device 0")
        except (ImportError, BackendError) as e:
            pytest.skip(f"needs a Vulkan device with VK_KHR_external_memory_fd: {e}")
    with texbridge.Sender("g0", 320, 200, backend=sender) as tx, \
            texbridge.Receiver("g0", backend="cuda", device=1) as rx:
        for seed in (50, 51, 52):
            frame = pattern(tx.shape, np.uint8, seed)
            tx.send(frame)
            got = rx.wait_frame(10)
            assert got.device.ordinal == 1 and got.__dlpack_device__() == (2, 1)
            assert same(got.download(), frame), f"frame {seed}"
        assert rx.gpu_path == "gpu-copy", rx.gpu_path_reason  # never the memfd copy path through the host
        assert rx.copy_path_reason is None


def test_device_is_refused_for_a_receiver_that_is_not_cuda(runtime):
    import texbridge
    from texbridge._errors import InvalidArgument

    for backend in (None, "gl", "vulkan", "memfd"):
        with pytest.raises(InvalidArgument, match="device= picks the GPU of a CUDA receiver"):
            texbridge.Receiver("x", backend=backend, device=1)


@needs_two_gpus
def test_vulkan_frames_reach_gpu1_ordered_by_the_timeline_semaphore(session):
    """Vulkan renders on GPU 0 under the keyed mutex (its timeline semaphore crosses with the handle); a process that
    wants the frames on GPU 1 peer-copies each one after acquire(): the copy waits for Vulkan's signal on the GPU."""
    from texbridge._errors import BackendError
    from texbridge.backends.cuda import get_device

    try:
        from texbridge.backends import _vk

        vk = _vk.default_device()
    except (ImportError, BackendError) as e:
        pytest.skip(f"needs a Vulkan device with VK_KHR_external_memory_fd: {e}")
    if vk.device_uuid != get_device(0).uuid or vk.gpu_sync != "timeline_semaphore":
        pytest.skip(f"needs the Vulkan device to be CUDA device 0 with exportable timeline semaphores ({vk.name})")
    n = 300
    tex = session.create_texture(512, 256, "rgba8", backend="vulkan", keyed_mutex=True, name="tl0",
                                 memory="opaque_fd")
    peer = spawn_py(child(f"""
        with texbridge.connect() as s:
            r = s.open("tl0", backend="cuda", device=1)
            assert r.access == "copy" and r.semaphore is not None and r.semaphore.device.ordinal == 0
            mine = None
            for i in range({n}):
                r.mutex.acquire(1, timeout=30)  # GPU 0's stream waits for Vulkan's signal
                mine = r.peer_copy(mine)  # queued behind that wait, then over the link to GPU 1
                got = mine.download()
                assert mine.device.ordinal == 1 and (got == i % 251).all(), f"frame {{i}}: {{got[0, 0]}}"
                r.mutex.release(0)
            print(r.cuda_sync)
    """))
    try:
        for i in range(n):
            tex.mutex.acquire(0, timeout=30)
            tex.upload(np.full((256, 512, 4), i % 251, np.uint8))
            tex.mutex.release(1)
        out, err = peer.communicate(timeout=180)
    finally:
        peer.kill()
    assert peer.returncode == 0, err
    assert out.strip() == "timeline_semaphore"


@needs_two_gpus
def test_gpu_work_queued_before_release_is_in_the_peer_copy(session):
    """The ordering a GPU-side keyed mutex promises, across GPUs: a CUDA producer on GPU 0 queues ~ms of writes and
    releases at once (the timeline signal follows them on its stream); the consumer's peer copy to GPU 1, queued after
    acquire(), must see the last write whole — without the GPU wait it would copy mid-way."""
    from texbridge._errors import BackendError

    try:
        from texbridge.backends import _vk

        vk = _vk.default_device()
    except (ImportError, BackendError) as e:
        pytest.skip(f"needs a Vulkan device with VK_KHR_external_memory_fd: {e}")
    if vk.gpu_sync != "timeline_semaphore":
        pytest.skip(f"needs exportable timeline semaphores ({vk.name})")
    n, size = 60, 64 << 20
    buf = session.create_buffer(size, backend="vulkan", keyed_mutex=True, name="gw0")
    producer = spawn_py(child(f"""
        with texbridge.connect() as s:
            r = s.open("gw0", backend="cuda")
            r.sync_stream = r.stream
            for i in range({n}):
                r.mutex.acquire(0, timeout=30)
                for j in range(16):  # ~ms of GPU work still running when release() returns
                    r.clear(0xA0000000 + i * 100 + j, stream=r.stream)
                r.mutex.release(1)
            print(r.cuda_sync)
    """))
    consumer = spawn_py(child(f"""
        with texbridge.connect() as s:
            r = s.open("gw0", backend="cuda", device=1)
            mine = None
            for i in range({n}):
                r.mutex.acquire(1, timeout=30)
                mine = r.peer_copy(mine)
                got = np.unique(mine.download().view("<u4"))
                assert list(got) == [0xA0000000 + i * 100 + 15], f"frame {{i}}: {{[hex(v) for v in got[:4]]}}"
                r.mutex.release(0)
            print("ok")
    """))
    try:
        outs = [p.communicate(timeout=180) for p in (producer, consumer)]
    finally:
        producer.kill()
        consumer.kill()
    assert producer.returncode == 0 and consumer.returncode == 0, outs
    assert [o.strip() for o, _ in outs] == ["timeline_semaphore", "ok"]
