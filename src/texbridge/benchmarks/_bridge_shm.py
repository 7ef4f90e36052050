"""Rows for the shared-file bridge transport (`bridge/_shmfile.py`), called by the bridge benchmark.

Transport level, two processes on one host over a /dev/shm file (what a VM's ivshmem device maps): a writer
process fills frames in the file (copy in), this process copies them out (copy out, chunked as the writer
progresses). Peers measured in the same run: the two-memcpy bound (copy in + copy out in one process, same memory
footprint) and the local memory ring (`senders.ring` with its futex wake, the same copies) for added latency.
"""

from __future__ import annotations

import mmap
import multiprocessing as mp
import os
import tempfile
import time

import numpy as np

from ._report import Row, latency_row

HD, UHD = (1920, 1080), (3840, 2160)


def _pattern(h: int, row_bytes: int) -> np.ndarray:
    return np.full((h, row_bytes), 7, np.uint8)


# -- the shm writer process ----------------------------------------------------------------------------------------------
def _shm_writer(path: str, size: int, w: int, h: int, seconds: float, period: float, chunks: int, conn) -> None:
    from ..bridge._link import FrameMeta, StreamFormat
    from ..bridge._shmfile import ShmEndpoint

    ep = ShmEndpoint(path, "serve", size=size, label="bench-writer")
    link = None
    while link is None:
        link = ep.establish(1.0)
    fmt = StreamFormat(w, h, "rgba8")
    wr = link.open_writer(1, fmt)
    src = _pattern(h, fmt.row_bytes)
    link.send({"op": "ready"})
    while not any(m.get("op") == "go" for m in link.receive()):
        link.wait(0.1)
    step = -(-h // chunks)
    n = 0
    t0 = time.perf_counter()
    next_t = t0
    while time.perf_counter() - t0 < seconds:
        view = wr.begin()
        for r0 in range(0, h, step):
            np.copyto(view[r0:r0 + step], src[r0:r0 + step])
            if chunks > 1:
                wr.progress(min(h, r0 + step))
        n += 1
        wr.commit(FrameMeta(n, timestamp_ns=time.monotonic_ns()))
        if period:
            next_t += period
            delay = next_t - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
    elapsed = time.perf_counter() - t0
    conn.send((n, elapsed))
    while not any(m.get("op") == "bye" for m in link.receive()):
        link.wait(0.1)
    link.close()
    ep.close()


def _shm_run(size: tuple[int, int], *, seconds: float, period: float = 0.0, readers: int = 1, chunks: int = 8
             ) -> tuple[float, float, list[float]]:
    """(writer frames/s, frames/s delivered to the first reader, latencies commit -> copied out, seconds)."""
    from ..bridge._ivshmem import size_for
    from ..bridge._link import StreamFormat
    from ..bridge._shmfile import ShmEndpoint

    w, h = size
    fsize = size_for(w, h)
    fd, path = tempfile.mkstemp(prefix="texbridge-bench-", dir="/dev/shm")
    os.close(fd)
    ctx = mp.get_context("spawn")  # no inherited threads or mappings
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_shm_writer, args=(path, fsize, w, h, seconds, period, chunks, child), daemon=True)
    proc.start()
    ep = ShmEndpoint(path, "join", label="bench-reader")
    try:
        link = None
        deadline = time.monotonic() + 30
        while link is None and time.monotonic() < deadline:
            link = ep.establish(0.5)
        if link is None:
            raise RuntimeError(f"benchmark writer never served: {ep.last_problem}")
        while not any(m.get("op") == "ready" for m in link.receive()):
            link.wait(0.1)
        fmt = StreamFormat(w, h, "rgba8")
        rs = [link.open_reader(1, fmt) for _ in range(readers)]
        outs = [np.empty((h, fmt.row_bytes), np.uint8) for _ in range(readers)]
        last = [0] * readers
        got = 0
        lat: list[float] = []
        link.send({"op": "go"})
        t0 = time.perf_counter()
        while not parent.poll():
            link.wait(0.01)
            for k, r in enumerate(rs):
                meta = r.read_into(outs[k], last[k])  # type: ignore[attr-defined]
                if meta is not None:
                    if k == 0:
                        lat.append((time.monotonic_ns() - meta.timestamp_ns) / 1e9)
                        got += 1
                    last[k] = meta.frame
        elapsed = time.perf_counter() - t0
        n, w_elapsed = parent.recv()
        link.send({"op": "bye"})
        proc.join(10)
        return n / w_elapsed, got / elapsed, lat
    finally:
        if proc.is_alive():
            proc.kill()
        ep.close()
        os.unlink(path)


# -- the local memory ring (the reference for added latency) ------------------------------------------------------------
def _ring_writer(ctl_buf, slots_buf, w: int, h: int, frames: int, period: float, conn) -> None:
    from ..senders.ring import ControlWords, RingWriter

    ctl = ControlWords(np.frombuffer(ctl_buf, np.uint8))
    slots = np.frombuffer(slots_buf, np.uint8).reshape(3, h, w * 4)
    wr = RingWriter(ctl, 3, pid=os.getpid())
    wr.publish_ring(w, h, "rgba8", [0, 1, 2])
    src = _pattern(h, w * 4)
    conn.recv()
    for _ in range(frames):
        slot = wr.begin()
        np.copyto(slots[slot], src)
        slots[slot, 0, :8].view(np.int64)[0] = time.monotonic_ns()
        wr.commit(slot)
        time.sleep(period)
    wr.close()
    conn.send("done")


def _ring_run(size: tuple[int, int], frames: int, period: float) -> list[float]:
    """Latency commit -> copied out over the local memory ring, the reader sleeping on its futex between frames."""
    from ..senders.ring import CONTROL_SIZE, ControlWords, RingReader

    w, h = size
    ctl_buf = mmap.mmap(-1, CONTROL_SIZE)
    slots_buf = mmap.mmap(-1, 3 * h * w * 4)
    ctx = mp.get_context("fork")  # the anonymous shared mappings travel by inheritance
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_ring_writer, args=(ctl_buf, slots_buf, w, h, frames, period, child), daemon=True)
    proc.start()
    ctl = ControlWords(np.frombuffer(ctl_buf, np.uint8))
    slots = np.frombuffer(slots_buf, np.uint8).reshape(3, h, w * 4)
    rr = RingReader(ctl)
    rr.attach(os.getpid(), lambda pid: True)
    out = np.empty((h, w * 4), np.uint8)
    lat: list[float] = []
    try:
        while not rr.valid or rr.layout() is None or rr.generation == 0:
            time.sleep(0.001)
        gen = rr.generation
        parent.send("go")
        seen = rr.latest()
        while not rr.closed:
            rr.wait(seen, 0.5)
            seen = rr.latest()

            def copy(slot: int) -> int:
                np.copyto(out, slots[slot])
                return int(out[0, :8].view(np.int64)[0])

            got = rr.read(copy, nslots=3, generation=gen)
            if got is not None and not isinstance(got, type):
                lat.append((time.monotonic_ns() - got.data) / 1e9)
        proc.join(10)
        return lat
    finally:
        if proc.is_alive():
            proc.kill()


def _two_memcpy_rate(size: tuple[int, int], seconds: float) -> float:
    """Frames/s of copy in + copy out in one process: a private frame into one of 3 shared slots, then out of it."""
    w, h = size
    src = _pattern(h, w * 4)
    mid = np.frombuffer(mmap.mmap(-1, 3 * h * w * 4), np.uint8).reshape(3, h, w * 4)
    dst = np.empty_like(src)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        np.copyto(mid[n % 3], src)
        np.copyto(dst, mid[n % 3])
        n += 1
    return n / (time.perf_counter() - t0)


def rows(quick: bool) -> list[Row]:
    """The shm transport's rows: 1080p sustained vs the two-memcpy bound, added latency over the local ring
    (a small 'handoff' frame and a full 1080p one), 4 readers vs 1, 4K at 60 frames/s."""
    out: list[Row] = []
    secs = 1.5 if quick else 4.0
    g = "bridge shm: sustained frames/s (1080p rgba8, writer copies in, reader copies out)"
    bound = _two_memcpy_rate(HD, secs)
    wrate, rrate, _ = _shm_run(HD, seconds=secs)
    out.append(Row(g, "texbridge shm link, frames delivered", rrate, "frames/s", None,
                   f"{100 * rrate / bound:.0f}% of the two-memcpy bound; writer {wrate:.0f} frames/s", True))
    out.append(Row(g, "two-memcpy bound (copy in + copy out, one process)", bound, "frames/s", None, "", True))

    n_lat = 200 if quick else 1000
    for label, size in (("handoff, 64x64", (64, 64)), ("1080p full frame", HD)):
        period = 0.004 if size == (64, 64) else 0.02
        frames = n_lat if size == (64, 64) else n_lat // 5
        g = f"bridge shm: latency commit -> copied out ({label}, {1 / period:.0f} frames/s)"
        _, _, lat = _shm_run(size, seconds=frames * period, period=period)
        local = _ring_run(size, frames, period)
        out.append(latency_row(g, "texbridge shm link (polling)", lat))
        out.append(latency_row(g, "local memory ring (futex wake)", local))
        if lat and local:
            p50 = (sorted(lat)[len(lat) // 2] - sorted(local)[len(local) // 2]) * 1e6
            p99 = (sorted(lat)[int(len(lat) * 0.99)] - sorted(local)[int(len(local) * 0.99)]) * 1e6
            out.append(Row(g, "added by the shm link (p50 / p99 difference)", p50, "us", p99, "polling vs futex"))

    g = "bridge shm: writer frames/s with 4 readers of one stream vs 1 (1080p, every reader copies)"
    w1, _, _ = _shm_run(HD, seconds=secs, readers=1)
    w4, _, _ = _shm_run(HD, seconds=secs, readers=4)
    out.append(Row(g, "4 readers", w4, "frames/s", None, f"writer slowed {100 * (1 - w4 / w1):.0f}% vs 1 reader", True))
    out.append(Row(g, "1 reader", w1, "frames/s", None, "", True))

    g = "bridge shm: 4K rgba8 at 60 frames/s"
    wrate, rrate, lat = _shm_run(UHD, seconds=secs, period=1 / 60)
    lat_frames = [x * 60 for x in lat]
    out.append(Row(g, "texbridge shm link, delivered", rrate, "frames/s", None,
                   f"writer {wrate:.1f} frames/s; latency p50 {np.median(lat_frames):.2f} / p99 "
                   f"{np.percentile(lat_frames, 99):.2f} frames", True))
    return out


def run(quick: bool) -> list[Row]:
    return rows(quick)


if __name__ == "__main__":
    import sys

    from ._report import print_rows

    print_rows(rows("--quick" in sys.argv))
