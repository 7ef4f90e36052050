"""Keyed-mutex benchmarks (issue 3), all peers measured in the same run:

- handoff round trip (A acquires 0 / releases 1, B acquires 1 / releases 0) against multiprocessing.Event,
  multiprocessing.Condition, a POSIX semaphore pair (multiprocessing.Semaphore is a sem_t) and a pipe ping-pong;
- 4K RGBA frame handoff rate: zero-copy memfd texture + keyed mutex against multiprocessing.Queue of NumPy arrays
  and shared_memory + memcpy + Event;
- timeout precision: the distribution of acquire(timeout=1 ms) return times;
- CPU used by a waiter blocked for 1 s.

Targets (2 cores): round trip <= 2 us median; >= 50,000 4K handoffs/s; acquire(timeout=1 ms) back within 1.0-1.2 ms
at p99; a blocked waiter < 1% of a core. Peers run in 'spawn' children; the keyed-mutex child reopens the state
memfd through /proc/<parent>/fd, which is how a memfd is shared without a broker.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import time
from multiprocessing import shared_memory

import numpy as np

from ._report import Row, latency_row, print_rows, rate_row

from texbridge.backends.memfd import MemfdBackend
from texbridge.keyed_mutex import KeyedMutex, create_state
from texbridge._errors import KeyedMutexTimeout

RT = "handoff round trip (A acq 0/rel 1, B acq 1/rel 0)"
FRAMES = "4K RGBA frame handoff (3840x2160)"
PRECISION = "acquire(timeout=1 ms) return time"
CPU = "CPU of a waiter blocked for 1 s"
W, H = 3840, 2160


def _reopen(pid: int, fd: int) -> int:
    """Our own fd to the parent's memfd: /proc/<pid>/fd/<fd> opens the same memory."""
    return os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)


# -- children (module-level so 'spawn' can import them) ---------------------------------------------------------------
def _child_km(pid: int, fd: int, n: int) -> None:
    own = _reopen(pid, fd)
    with KeyedMutex(own) as m:
        os.close(own)
        for _ in range(n):
            m.acquire(1)
            m.release(0)


def _child_event(ping, pong, n: int) -> None:
    for _ in range(n):
        ping.wait()
        ping.clear()
        pong.set()


def _child_condition(cond, turn, n: int) -> None:
    for _ in range(n):
        with cond:
            cond.wait_for(lambda: turn.value == 1)
            turn.value = 0
            cond.notify()


def _child_sem(s1, s2, n: int) -> None:
    for _ in range(n):
        s1.acquire()
        s2.release()


def _child_pipe(r, w, n: int) -> None:
    rfd, wfd = r.fileno(), w.fileno()
    for _ in range(n):
        os.read(rfd, 1)
        os.write(wfd, b"x")


def _child_frames_km(pid: int, mfd: int, tfd: int, desc, n: int) -> None:
    own_m, own_t = _reopen(pid, mfd), _reopen(pid, tfd)
    tex = MemfdBackend().import_resource(desc, [own_t])  # takes the fd
    view = tex.numpy()
    with KeyedMutex(own_m) as m:
        os.close(own_m)
        for i in range(n):
            m.acquire(1)
            if view[0, 0, 0] != (i & 0xFF) or view[H - 1, W - 1, 3] != (i & 0xFF):  # the frame is really there
                raise RuntimeError("frame mismatch")
            m.release(0)
    del view
    tex.close()


def _child_frames_queue(q, back, n: int) -> None:
    for i in range(n):
        a = q.get()
        if a[0, 0, 0] != (i & 0xFF):
            raise RuntimeError("frame mismatch")
        back.put(None)


def _child_frames_shm(name: str, ready, done, n: int) -> None:
    shm = shared_memory.SharedMemory(name)
    view = np.ndarray((H, W, 4), np.uint8, buffer=shm.buf)
    for i in range(n):
        ready.wait()
        ready.clear()
        if view[0, 0, 0] != (i & 0xFF):
            raise RuntimeError("frame mismatch")
        done.set()
    del view
    shm.close()


def _child_cpu_km(pid: int, fd: int, out) -> None:
    own = _reopen(pid, fd)
    with KeyedMutex(own) as m:
        os.close(own)
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        try:
            m.acquire(12345, 1.0)  # nobody will ever release key 12345
        except KeyedMutexTimeout:
            pass
        r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    out.put((r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / (t1 - t0))


def _child_cpu_event(ev, out) -> None:
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    ev.wait(1.0)
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    out.put((r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / (t1 - t0))


# -- parents ----------------------------------------------------------------------------------------------------------
def _cycles(step, n: int, warmup: int) -> list[float]:
    """Time n calls of step() (one full round trip each), dropping the first `warmup`."""
    pc = time.perf_counter
    out = []
    t_prev = pc()
    for i in range(n):
        step()
        t = pc()
        if i >= warmup:
            out.append(t - t_prev)
        t_prev = t
    return out


def _run(ctx, target, args) -> mp.Process:
    p = ctx.Process(target=target, args=args, daemon=True)
    p.start()
    return p


def _join(p: mp.Process) -> None:
    p.join(120)
    if p.exitcode != 0:
        p.kill()
        raise RuntimeError(f"benchmark child {p.name} failed ({p.exitcode})")


def round_trips(quick: bool) -> list[Row]:
    ctx = mp.get_context("spawn")
    n = 3_000 if quick else 100_000
    warm = n // 10
    rows = []

    fd = create_state(0)
    m = KeyedMutex(fd)
    p = _run(ctx, _child_km, (os.getpid(), fd, n + 1))
    m.acquire(0)

    def km_step():
        m.release(1)
        m.acquire(0)

    samples = _cycles(km_step, n, warm)
    m.release(1)
    _join(p)
    m.close()
    os.close(fd)
    rows.append(latency_row(RT, "texbridge keyed mutex", samples, "spin then FUTEX_WAIT; direct handoff"))

    ping, pong = ctx.Event(), ctx.Event()
    p = _run(ctx, _child_event, (ping, pong, n))

    def ev_step():
        ping.set()
        pong.wait()
        pong.clear()

    rows.append(latency_row(RT, "multiprocessing.Event pair", _cycles(ev_step, n, warm)))
    _join(p)

    cond, turn = ctx.Condition(), ctx.Value("i", 0, lock=False)
    p = _run(ctx, _child_condition, (cond, turn, n))

    def cond_step():
        with cond:
            turn.value = 1
            cond.notify()
            cond.wait_for(lambda: turn.value == 0)

    rows.append(latency_row(RT, "multiprocessing.Condition", _cycles(cond_step, n, warm)))
    _join(p)

    s1, s2 = ctx.Semaphore(0), ctx.Semaphore(0)
    p = _run(ctx, _child_sem, (s1, s2, n))

    def sem_step():
        s1.release()
        s2.acquire()

    rows.append(latency_row(RT, "POSIX semaphore pair (sem_t)", _cycles(sem_step, n, warm)))
    _join(p)

    (r1, w1), (r2, w2) = ctx.Pipe(duplex=False), ctx.Pipe(duplex=False)
    p = _run(ctx, _child_pipe, (r1, w2, n))
    wfd, rfd = w1.fileno(), r2.fileno()

    def pipe_step():
        os.write(wfd, b"x")
        os.read(rfd, 1)

    rows.append(latency_row(RT, "pipe ping-pong (1 byte)", _cycles(pipe_step, n, warm)))
    _join(p)
    for c in (r1, w1, r2, w2):
        c.close()
    return rows


def frames(quick: bool) -> list[Row]:
    ctx = mp.get_context("spawn")
    rows = []

    n = 5_000 if quick else 200_000
    tex = MemfdBackend().create_texture(W, H, "rgba8")
    view = tex.numpy()
    (tfd,) = tex.export_fds()
    fd = create_state(0)
    m = KeyedMutex(fd)
    p = _run(ctx, _child_frames_km, (os.getpid(), fd, tfd, tex.descriptor, n))
    t0 = 0.0
    for i in range(n):
        m.acquire(0)
        if i == 1:
            t0 = time.perf_counter()  # the child has started and consumed frame 0: start the clock
        view[0, 0, 0] = view[H - 1, W - 1, 3] = i & 0xFF  # the producer touches a few bytes per frame
        m.release(1)
    m.acquire(0)
    dt = time.perf_counter() - t0
    _join(p)
    rows.append(rate_row(FRAMES, "texbridge memfd texture + keyed mutex", n - 1, dt, "frames/s", "zero-copy"))
    m.close()
    os.close(fd)
    os.close(tfd)
    del view
    tex.close()

    n = 20 if quick else 200
    frame = np.zeros((H, W, 4), np.uint8)
    q, back = ctx.Queue(maxsize=2), ctx.Queue()
    p = _run(ctx, _child_frames_queue, (q, back, n))
    for i in range(n):
        if i == 1:
            t0 = time.perf_counter()
        frame[0, 0, 0] = i & 0xFF
        q.put(frame)
        back.get()
    dt = time.perf_counter() - t0
    _join(p)
    rows.append(rate_row(FRAMES, "multiprocessing.Queue of NumPy arrays", n - 1, dt, "frames/s", "pickled copy"))

    shm = shared_memory.SharedMemory(create=True, size=W * H * 4)
    try:
        sview = np.ndarray((H, W, 4), np.uint8, buffer=shm.buf)
        ready, done = ctx.Event(), ctx.Event()
        p = _run(ctx, _child_frames_shm, (shm.name, ready, done, n))
        t0 = None
        for i in range(n):
            if i == 1:
                t0 = time.perf_counter()
            frame[0, 0, 0] = i & 0xFF
            np.copyto(sview, frame)  # the memcpy a copying API needs
            ready.set()
            done.wait()
            done.clear()
        dt = time.perf_counter() - t0
        _join(p)
        rows.append(rate_row(FRAMES, "shared_memory + memcpy + Event", n - 1, dt, "frames/s", "one 33 MB copy"))
        del sview
    finally:
        shm.close()
        shm.unlink()
    return rows


def precision(quick: bool) -> list[Row]:
    n = 300 if quick else 3_000
    fd = create_state(0)
    samples = []
    with KeyedMutex(fd) as m:
        pc = time.perf_counter
        for _ in range(n):
            t = pc()
            try:
                m.acquire(1, 0.001)
            except KeyedMutexTimeout:
                pass
            samples.append(pc() - t)
    os.close(fd)
    row = latency_row(PRECISION, "texbridge keyed mutex", samples, "target 1.0-1.2 ms at p99")
    row.value, row.p99, row.unit = row.value / 1000, row.p99 / 1000, "ms"
    early = sum(1 for s in samples if s < 0.001)
    row.note += f"; min {min(samples) * 1e3:.4f} ms, {early} early"
    return [row]


def cpu(quick: bool) -> list[Row]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    fd = create_state(0)
    p = _run(ctx, _child_cpu_km, (os.getpid(), fd, out))
    frac = out.get(timeout=60)
    _join(p)
    os.close(fd)
    ev = ctx.Event()
    p = _run(ctx, _child_cpu_event, (ev, out))
    frac_ev = out.get(timeout=60)
    _join(p)
    return [Row(CPU, "texbridge keyed mutex", frac * 100, "%", None, "20 ms slices: liveness + Ctrl-C checks"),
            Row(CPU, "multiprocessing.Event.wait", frac_ev * 100, "%", None, "sem_timedwait, no checks")]


def run(quick: bool) -> list[Row]:
    return round_trips(quick) + frames(quick) + precision(quick) + cpu(quick)


if __name__ == "__main__":
    import sys

    print_rows(run("--quick" in sys.argv))
