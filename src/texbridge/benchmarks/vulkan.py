"""Vulkan backend figures: fd → usable VkImage, open by handle → VkImage, upload/download throughput against a plain
NumPy copy of the same bytes, and a keyed-mutex frame ping-pong between two processes. All peers in the same run."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import numpy as np

from ._report import Row, latency_row, median, print_rows, private_namespace, rate_row


def _throughput(group: str, subject: str, nbytes: int, seconds: list[float], note: str = "") -> Row:
    t = median(seconds)
    return Row(group, subject, nbytes / t / 1e6, "MB/s", None, note, True)


def run(quick: bool) -> list[Row]:
    from texbridge.backends import _vk
    from texbridge.backends.vulkan import BACKEND

    dev = _vk.default_device()
    where = f"{dev.name}, gpu_sync={dev.gpu_sync}"
    rows: list[Row] = []

    # -- fd → usable VkImage (import with a dedicated allocation + bind) ---------------------------------------------
    n = 200 if quick else 2000
    with BACKEND.create_texture(1920, 1080, "rgba8") as tex:
        samples, close_samples = [], []
        for _ in range(n + 10):
            fd = tex.export_fds()[0]
            t0 = time.perf_counter()
            r = BACKEND.import_resource(tex.descriptor, [fd])
            t1 = time.perf_counter()
            r.close()
            samples.append(t1 - t0)
            close_samples.append(time.perf_counter() - t1)
        samples, close_samples = samples[10:], close_samples[10:]
        rows.append(latency_row("import fd → VkImage (1080p rgba8)", "texbridge import_resource", samples,
                                f"{where}; {tex.descriptor.memory}, {n} runs"))
        rows.append(latency_row("import fd → VkImage (1080p rgba8)", "close (destroy image, free memory)",
                                close_samples, "for reference"))
        rows += _open_by_handle(tex.descriptor, quick, where)

        # -- upload / download throughput vs NumPy memcpy --------------------------------------------------------------
        reps = 10 if quick else 50
        frame = np.random.default_rng(0).integers(0, 256, (1080, 1920, 4), dtype=np.uint8)
        nbytes = frame.nbytes
        tex.upload(frame)
        assert (tex.download() == frame).all()
        up, down, cp = [], [], []
        dst = np.empty_like(frame)
        for _ in range(reps):
            t0 = time.perf_counter()
            tex.upload(frame)
            t1 = time.perf_counter()
            tex.download()
            t2 = time.perf_counter()
            np.copyto(dst, frame)
            t3 = time.perf_counter()
            up.append(t1 - t0)
            down.append(t2 - t1)
            cp.append(t3 - t2)
        group = "1080p rgba8 transfer (8.3 MB)"
        rows.append(_throughput(group, "texbridge Vulkan upload", nbytes, up, "staging copy + vkCmdCopyBufferToImage"))
        rows.append(_throughput(group, "texbridge Vulkan download", nbytes, down,
                                "vkCmdCopyImageToBuffer + copy out"))
        rows.append(_throughput(group, "NumPy memcpy (np.copyto)", nbytes, cp, "same bytes, same run"))

    rows += _ping_pong(quick, where)
    return rows


def _open_by_handle(desc, quick: bool, where: str) -> list[Row]:
    """End to end through the broker: session.open(handle, backend="vulkan") in this process."""
    import texbridge

    try:
        with private_namespace("bench-vulkan"), texbridge.connect() as s:
            tex = s.create_texture(1920, 1080, "rgba8", backend="vulkan")
            n = 200 if quick else 2000
            samples = []
            for _ in range(n + 10):
                t0 = time.perf_counter()
                r = s.open(tex.handle, backend="vulkan")
                samples.append(time.perf_counter() - t0)
                r.close()
            tex.close()
        return [latency_row("import fd → VkImage (1080p rgba8)", "session.open(handle) end to end", samples[10:],
                            f"{where}; broker round trip + import")]
    except Exception as e:  # the broker is another module's business: report, don't fail the Vulkan figures
        return [Row("import fd → VkImage (1080p rgba8)", "session.open(handle) end to end", float("nan"), "us",
                    note=f"not measured: {type(e).__name__}: {e}")]


def _ping_pong(quick: bool, where: str) -> list[Row]:
    """Frames handed back and forth between two processes through the keyed mutex, each side writing then reading
    a 256x256 rgba8 Vulkan texture (the GPU-sync path of this device)."""
    import texbridge

    frames = 200 if quick else 2000
    child_code = textwrap.dedent(f"""
        import numpy as np, texbridge
        with texbridge.connect() as s:
            r = s.open("bench-pingpong", backend="vulkan")
            a = np.zeros(r.shape, np.uint8)
            for i in range({frames}):
                with r.mutex.hold(acquire=1, release=0, timeout=30):  # GPU waits/signals folded in
                    r.download()
                    r.upload(a)
            r.close()
    """)
    try:
        with private_namespace("bench-pp") as env, texbridge.connect() as s:
            tex = s.create_texture(256, 256, "rgba8", backend="vulkan", keyed_mutex=True, name="bench-pingpong")
            child = subprocess.Popen([sys.executable, "-c", child_code], env=env)
            a = np.zeros(tex.shape, np.uint8)
            t0 = time.perf_counter()
            for _ in range(frames):
                with tex.mutex.hold(acquire=0, release=1, timeout=30):
                    tex.upload(a)
                    tex.download()
            tex.mutex.acquire(0, timeout=30)
            elapsed = time.perf_counter() - t0
            child.wait(60)
            tex.close()
        return [rate_row("keyed-mutex ping-pong (2 processes, 256x256 rgba8, upload+download per turn)",
                         "texbridge Vulkan + keyed mutex", 2 * frames, elapsed, "frames/s", where)]
    except Exception as e:
        return [Row("keyed-mutex ping-pong", "texbridge Vulkan + keyed mutex", float("nan"), "frames/s",
                    note=f"not measured: {type(e).__name__}: {e}", higher_is_better=True)]


if __name__ == "__main__":
    print_rows(run(quick="--quick" in sys.argv))
