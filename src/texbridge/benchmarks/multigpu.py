"""Multi-GPU figures, peers in the same run: memory made on GPU 0 and used on GPU 1 of the same host.

- bandwidth, 256 MiB: texbridge peer-mapped read (a cuda_vmm buffer opened through the broker with device=1 and
  copied into a GPU-1 buffer) vs cuMemcpyPeer between ordinary buffers vs host-staged (GPU 0 → pinned host → GPU 1);
- a 4K rgba8 frame crossing GPUs: peer-mapped cuda_vmm, peer_copy() of Vulkan memory, host-staged.
Targets (issue 15): peer path ≥ 90 % of cuMemcpyPeer, ≥ 10× host-staged, a 4K frame in ≤ 0.2 ms.
"""

from __future__ import annotations

import sys
import time

from ._report import Row, print_rows, private_namespace

MiB = 1 << 20


def _skip_reason() -> str | None:
    try:
        from texbridge.backends.cuda import device_count, unavailable_reason
    except ImportError as e:
        return f"cuda-bindings not installed ({e})"
    reason = unavailable_reason()
    if reason:
        return reason
    return None if device_count() >= 2 else f"needs two CUDA devices (this host has {device_count()})"


def _timed(fn, repeat: int) -> float:
    """Median seconds of `fn()` (which must return only when its GPU work is done)."""
    fn()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    samples.sort()
    return samples[len(samples) // 2]


def run(quick: bool) -> list[Row]:
    reason = _skip_reason()
    if reason:
        print(f"multigpu benchmark skipped: {reason}")
        return []
    from cuda.bindings import driver as cu

    import texbridge
    from texbridge.backends.cuda import BACKEND, check, get_device

    g0, g1 = get_device(0), get_device(1)
    where = f"{g0.name} → {g1.name}, peer access {g1.can_access_peer(g0)}"
    repeat = 5 if quick else 20
    size = 256 * MiB
    rows: list[Row] = []
    with private_namespace("bench-multigpu"), texbridge.connect() as s, texbridge.connect() as consumer:
        src = s.create_buffer(size, backend="cuda", device=0, name="src")
        mapped = consumer.open("src", backend="cuda", device=1)  # the fd crosses the broker, as for process B
        with g1:
            dst1 = int(check(cu.cuMemAlloc(size), "cuMemAlloc"))
        with g0:
            plain0 = int(check(cu.cuMemAlloc(size), "cuMemAlloc"))
            host = int(check(cu.cuMemHostAlloc(size, cu.CU_MEMHOSTALLOC_PORTABLE), "cuMemHostAlloc"))

        g0.enable_peer(g1), g1.enable_peer(g0)  # as torch does for its peer copies: the fair reference

        def peer_mapped() -> None:
            with g1:
                check(cu.cuMemcpyDtoD(dst1, mapped.device_ptr, size), "cuMemcpyDtoD")
                check(cu.cuCtxSynchronize(), "cuCtxSynchronize")

        def memcpy_peer() -> None:
            with g0:
                check(cu.cuMemcpyPeer(dst1, g1.context, plain0, g0.context, size), "cuMemcpyPeer")
                check(cu.cuCtxSynchronize(), "cuCtxSynchronize")

        def host_staged() -> None:
            with g0:
                check(cu.cuMemcpyDtoH(host, plain0, size), "cuMemcpyDtoH")
            with g1:
                check(cu.cuMemcpyHtoD(dst1, host, size), "cuMemcpyHtoD")

        group = "GPU 0 → GPU 1, 256 MiB"
        for subject, fn in (("texbridge: cuda_vmm opened on GPU 1 (peer-mapped read)", peer_mapped),
                            ("cuMemcpyPeer, ordinary buffers", memcpy_peer),
                            ("host-staged: GPU 0 → pinned host → GPU 1", host_staged)):
            rows.append(Row(group, subject, size / _timed(fn, repeat) / 1e9, "GB/s", None, where, True))

        # -- one 4K frame ------------------------------------------------------------------------------------------
        w, h = 3840, 2160
        frame = s.create_texture(w, h, "rgba8", backend="cuda", device=0, name="frame4k")
        on1 = BACKEND.create_texture(w, h, "rgba8", device=1)
        remote = consumer.open("frame4k", backend="cuda", device=1)
        frame_rows = [("texbridge: cuda_vmm frame, peer-mapped → GPU-1 texture", lambda: remote.peer_copy(on1))]
        try:
            vk_frame = s.create_texture(w, h, "rgba8", backend="vulkan", name="vk4k", memory="opaque_fd")
            vk_remote = consumer.open("vk4k", backend="cuda", device=1)
            frame_rows.append(("texbridge: Vulkan frame, peer_copy() → GPU-1 texture", lambda: vk_remote.peer_copy(on1)))
        except texbridge.TexbridgeError as e:
            print(f"multigpu benchmark: no Vulkan frame on GPU 0 ({e})")
        nbytes = h * on1.row_pitch

        def frame_staged() -> None:
            with g0:
                check(cu.cuMemcpyDtoH(host, frame.device_ptr, nbytes), "cuMemcpyDtoH")
            with g1:
                check(cu.cuMemcpyHtoD(on1.device_ptr, host, nbytes), "cuMemcpyHtoD")

        frame_rows.append(("host-staged: GPU 0 → pinned host → GPU 1", frame_staged))
        for subject, fn in frame_rows:
            t = _timed(fn, repeat * 5)
            rows.append(Row("4K rgba8 frame crosses GPUs", subject, t * 1e3, "ms", None, where))
        for r in [mapped, remote, on1, frame, src] + ([vk_remote, vk_frame] if len(frame_rows) == 3 else []):
            r.close()
        with g0:
            check(cu.cuMemFree(plain0), "cuMemFree")
            check(cu.cuMemFreeHost(host), "cuMemFreeHost")
        with g1:
            check(cu.cuMemFree(dst1), "cuMemFree")
        rows += _handoff(s, repeat * 20, where)
        s.shutdown()
    return rows


_CONSUMER = """
import sys, texbridge
with texbridge.connect() as s:
    r = s.open("hand4k", backend="cuda", device=1)
    mine = r.peer_copy()
    print("ready", flush=True)
    for _ in range(int(sys.argv[1])):
        r.mutex.acquire(1, timeout=30)
        r.peer_copy(mine)  # the frame, on GPU 1, whole: ordered by the keyed mutex
        r.mutex.release(0)
"""


def _handoff(s, n: int, where: str) -> list[Row]:
    """Per frame, producer process on GPU 0 → consumer process that needs the frame on GPU 1 → back."""
    import subprocess

    from ._report import latency_row

    group = "4K frame handoff, process on GPU 0 → process needing it on GPU 1 → back"
    tex = s.create_texture(3840, 2160, "rgba8", backend="cuda", device=0, keyed_mutex=True, name="hand4k")
    child = subprocess.Popen([sys.executable, "-c", _CONSUMER, str(n + 10)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        tex.mutex.acquire(0, timeout=30)
        samples = []
        for _ in range(n + 10):
            t0 = time.perf_counter()
            tex.mutex.release(1)
            tex.mutex.acquire(0, timeout=30)
            samples.append(time.perf_counter() - t0)
        tex.mutex.release(0)
        child.wait(timeout=60)
    finally:
        child.kill()
        tex.close()
    rows = [latency_row(group, "texbridge: keyed mutex + peer_copy() over the link", samples[10:], where)]
    try:
        import torch
        import torch.multiprocessing as mp
    except ImportError:
        print("multigpu benchmark: torch not installed, no torch.multiprocessing row")
        return rows
    ctx = mp.get_context("spawn")
    q_in, q_out = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_torch_consumer, args=(q_in, q_out), daemon=True)
    proc.start()
    try:
        frame = torch.zeros((2160, 3840, 4), dtype=torch.uint8, device="cuda:0")
        samples = []
        for _ in range(n + 10):
            t0 = time.perf_counter()
            q_in.put(frame)
            q_out.get(timeout=60)
            samples.append(time.perf_counter() - t0)
        q_in.put(None)
        proc.join(timeout=60)
    finally:
        proc.kill()
    rows.append(latency_row(group, "torch.multiprocessing: queue.put(tensor) → .to('cuda:1')", samples[10:],
                            f"torch {torch.__version__}"))
    return rows


def _torch_consumer(q_in, q_out) -> None:
    import torch

    while (t := q_in.get()) is not None:
        t.to("cuda:1")
        torch.cuda.synchronize(1)
        del t
        q_out.put(1)


if __name__ == "__main__":
    print_rows(run("--quick" in sys.argv))
