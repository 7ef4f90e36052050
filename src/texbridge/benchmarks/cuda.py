"""CUDA backend figures, peers in the same run: open by handle → torch tensor, and a frame handed back and forth
between two processes with the keyed mutex against torch.multiprocessing sharing the same CUDA tensor through a
queue (the usual way ML pipelines pass GPU frames today). Targets: open ≤ 1 ms, handoff ≤ 0.1 ms (≥ 4×)."""

from __future__ import annotations

import subprocess
import sys
import time

from ._report import Row, latency_row, print_rows, private_namespace


def _skip_reason() -> str | None:
    try:
        from texbridge.backends.cuda import unavailable_reason
    except ImportError as e:
        return f"cuda-bindings not installed ({e})"
    reason = unavailable_reason()
    if reason:
        return reason
    try:
        import torch
    except ImportError:
        return "torch not installed (the peer and the views need it)"
    return None if torch.cuda.is_available() else "torch sees no CUDA device"


def run(quick: bool) -> list[Row]:
    reason = _skip_reason()
    if reason:
        print(f"cuda benchmark skipped: {reason}")
        return []
    import torch

    from texbridge.backends.cuda import get_device

    dev = get_device()
    where = f"{dev.name}, torch {torch.__version__}"
    rows = _open(quick, where)
    rows += _handoff(quick, where)
    return rows


def _open(quick: bool, where: str) -> list[Row]:
    import torch

    import texbridge

    n = 200 if quick else 2000
    rows = []
    with private_namespace("bench-cuda-open"), texbridge.connect() as s:
        sources = [("cuda_vmm 1080p rgba8 texture", s.create_texture(1920, 1080, "rgba8", backend="cuda"))]
        try:
            sources.append(("Vulkan opaque_fd 8 MB buffer", s.create_buffer(1920 * 1080 * 4, backend="vulkan")))
        except texbridge.TexbridgeError as e:
            print(f"cuda benchmark: no Vulkan source ({e})")
        for what, src in sources:
            samples = []
            for _ in range(n + 10):
                t0 = time.perf_counter()
                r = s.open(src.handle, backend="cuda")
                t = torch.from_dlpack(r)
                samples.append(time.perf_counter() - t0)
                assert t.data_ptr() == r.device_ptr
                del t
                r.close()
            rows.append(latency_row("open by handle → torch tensor", f"texbridge: {what}", samples[10:],
                                    f"{where}; broker round trip + CUDA import + map + from_dlpack, {n} runs"))
            src.close()
        s.shutdown()
    return rows


_KM_PEER = """
import sys, torch, texbridge
n, kernel = int(sys.argv[1]), sys.argv[2] == "1"
with texbridge.connect() as s:
    r = s.open("bench-handoff", backend="cuda")
    t = torch.from_dlpack(r)
    r.sync_stream = torch.cuda.current_stream()
    print("ready", flush=True)
    for _ in range(n):
        r.mutex.acquire(1, timeout=30)
        if kernel:
            t[0, 0, 0] += 1
        r.mutex.release(0)
    del t
    r.close()
"""


def _handoff(quick: bool, where: str) -> list[Row]:
    """Round trips of one frame between two processes: each side (optionally) runs one tiny kernel on the frame,
    synchronizes its stream, and hands the frame over; texbridge's keyed mutex against torch.multiprocessing."""
    n = 300 if quick else 3000
    rows = []
    for kernel in (True, False):
        group = ("frame handoff round trip, one kernel per side (2 processes, 1080p rgba8)" if kernel else
                 "frame handoff round trip, no GPU work (the handoff's own cost)")
        rows.append(latency_row(group, "texbridge keyed mutex (cuda_vmm, stream sync)", _keyed_mutex(n, kernel),
                                f"{where}; acquire → {'kernel → ' if kernel else ''}stream sync → release; "
                                f"{n} frames"))
        rows.append(latency_row(group, "torch.multiprocessing queue (same CUDA tensor)", _torch_mp(n, kernel),
                                f"put the tensor, peer {'runs the kernel, syncs, ' if kernel else ''}acks; same run"))
    return rows


def _keyed_mutex(n: int, kernel: bool) -> list[float]:
    import torch

    import texbridge

    with private_namespace("bench-cuda-handoff") as env, texbridge.connect() as s:
        tex = s.create_texture(1920, 1080, "rgba8", backend="cuda", keyed_mutex=True, name="bench-handoff")
        t = torch.from_dlpack(tex)
        tex.sync_stream = torch.cuda.current_stream()
        peer = subprocess.Popen([sys.executable, "-c", _KM_PEER, str(n), str(int(kernel))], env=env,
                                stdout=subprocess.PIPE, text=True)
        try:
            assert peer.stdout.readline().strip() == "ready"
            samples = []
            for _ in range(n):  # each turn waits for the peer's: one iteration is one round trip
                t0 = time.perf_counter()
                tex.mutex.acquire(0, timeout=30)
                if kernel:
                    t[0, 0, 0] += 1
                tex.mutex.release(1)
                samples.append(time.perf_counter() - t0)
            tex.mutex.acquire(0, timeout=30)
            assert int(t[0, 0, 0]) == (2 * n * kernel) % 256, "frames were lost"
            assert tex.cuda_sync == "stream_sync"
            tex.mutex.release(0)
            peer.wait(60)
        finally:
            peer.kill()
        del t
        tex.close()
        s.shutdown()
    return samples[10:]


def _torch_mp(n: int, kernel: bool) -> list[float]:
    import torch
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    frame = torch.zeros((1080, 1920, 4), dtype=torch.uint8, device="cuda")
    proc = ctx.Process(target=_mp_peer, args=(inbox, outbox, n, kernel))
    proc.start()
    try:
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            if kernel:
                frame[0, 0, 0] += 1
            torch.cuda.current_stream().synchronize()
            inbox.put(frame)
            outbox.get(timeout=60)
            samples.append(time.perf_counter() - t0)
        assert int(frame[0, 0, 0]) == (2 * n * kernel) % 256, "frames were lost"
        proc.join(60)
    finally:
        if proc.is_alive():
            proc.kill()
    return samples[10:]


def _mp_peer(inbox, outbox, n, kernel):  # module level: torch.multiprocessing's spawn pickles it by name
    import torch

    for _ in range(n):
        t = inbox.get()
        if kernel:
            t[0, 0, 0] += 1
        torch.cuda.current_stream().synchronize()
        outbox.put(1)
        del t


if __name__ == "__main__":
    print_rows(run(quick="--quick" in sys.argv))
