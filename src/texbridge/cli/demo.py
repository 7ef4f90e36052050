"""`texbridge demo`: a producer and a consumer PROCESS share one texture through the broker and take turns on it
with its keyed mutex, the way two D3D11 devices share a DXGI surface.

Every frame is verified pixel-exact, not sampled: frame i holds `base ^ key(i)` as 32-bit words, where base is a
fixed hash of (x, y) and key(i) an odd-multiplier hash of i. XOR keeps producing and checking a frame to a couple of
memory passes, and every pixel differs between any two frames, so a stale frame, a torn write or a lost handoff
fails the check everywhere rather than in a corner a sample might miss.

Both children are started with multiprocessing's "spawn" so they are fresh interpreters that share nothing with the
parent but the broker's namespace: what they exchange goes through the broker and the shared memory alone (plus a
few progress counters and a stop flag for the parent). Ctrl-C is the parent's business: the children ignore SIGINT,
the parent raises the stop flag, and both sides end within a fraction of a second with the frames checked so far.
"""

from __future__ import annotations

import multiprocessing
import os
import queue as queue_mod
import secrets
import signal
import statistics
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import click
import numpy as np
from rich.markup import escape
from rich.table import Table

from .._errors import BackendError
from ..backends import get_backend
from ._common import (BACKEND_HELP, BACKEND_NAMES, console, err_console, error_line, fail, friendly, namespace_option,
                      parse_size)

FORMAT = "rgba8"  # four bytes a pixel: one 32-bit pattern word per pixel
HANDOFF_TIMEOUT = 10.0  # seconds one side waits for the other before calling the demo failed
PINGPONG_ROUNDS = 2000  # content-free round trips, to measure the keyed mutex handoff itself
WAIT_SLICE = 0.05  # children wait for each other in slices this long, to notice the stop flag
STOP_GRACE = 0.5  # after Ctrl-C, how long the children get to report before they are killed
PROGRESS_EVERY = 2.0  # seconds between progress lines of a long demo

# The shared progress counters (int64): frames verified and failed so far (the consumer writes), stop (the parent).
VERIFIED, FAILED, STOP = range(3)


@dataclass(frozen=True)
class DemoConfig:
    frames: int = 600
    width: int = 1280
    height: int = 720
    backend: str = "memfd"
    namespace: str | None = None
    pingpong: int = PINGPONG_ROUNDS
    corrupt_frame: int = -1  # self-test of the verifier: the producer damages one pixel of this frame


@dataclass
class DemoResult:
    config: DemoConfig
    name: str = ""
    handle: str = ""
    broker_pid: int = 0
    verified: int = 0
    failed: int = 0
    first_failure: str = ""
    frames_per_s: float = 0.0
    handoffs_per_s: float = 0.0
    round_trip_us: float = 0.0
    write_ms: float = 0.0
    verify_ms: float = 0.0
    zero_copy: bool = False
    errors: list[str] = field(default_factory=list)
    interrupted: bool = False  # Ctrl-C: the figures cover the frames done until then

    @property
    def ok(self) -> bool:
        return not self.errors and not self.interrupted and self.failed == 0 and self.verified == self.config.frames


# -- the pattern ------------------------------------------------------------------------------------------------------
def base_pattern(width: int, height: int) -> np.ndarray:
    """(H, W) uint32: a fixed hash of (x, y), so neighbouring pixels and rows all differ."""
    x = np.arange(width, dtype=np.uint32)[None, :]
    y = np.arange(height, dtype=np.uint32)[:, None]
    with np.errstate(over="ignore"):
        return (x * np.uint32(0x9E3779B1)) ^ (y * np.uint32(0x85EBCA77)) ^ np.uint32(0x27D4EB2F)


def frame_key(i: int) -> np.uint32:
    """Distinct for every frame index below 2**32 (an odd multiplier is a bijection mod 2**32); never 0."""
    return np.uint32(((i + 1) * 0x2545F491) & 0xFFFFFFFF)


def expected_frame(base: np.ndarray, i: int) -> np.ndarray:
    """Frame i as the (H, W, 4) uint8 image the texture must hold."""
    h, w = base.shape
    return np.bitwise_xor(base, frame_key(i)).view(np.uint8).reshape(h, w, 4)


def _words(view: np.ndarray) -> np.ndarray:
    """An (H, W, 4) uint8 view (any row pitch) seen as (H, W) uint32 words, zero-copy."""
    return view.view(np.uint32)[..., 0]


# -- the two processes ------------------------------------------------------------------------------------------------
def _report(q: Any, role: str, **fields: Any) -> None:
    q.put({"role": role, **fields})


class _Stopped(Exception):
    """The parent asked the demo to stop (Ctrl-C)."""


def _acquire(mutex: Any, key: int, progress: Any) -> None:
    """acquire(key) within HANDOFF_TIMEOUT, in short slices so that a stop request is seen at once."""
    from .._errors import KeyedMutexTimeout

    deadline = time.monotonic() + HANDOFF_TIMEOUT
    while True:
        if progress[STOP]:
            raise _Stopped
        try:
            mutex.acquire(key, timeout=max(0.0, min(WAIT_SLICE, deadline - time.monotonic())))
            return
        except KeyedMutexTimeout:
            if time.monotonic() >= deadline:
                raise


def _producer(cfg: DemoConfig, name: str, q: Any, progress: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it raises the stop flag
    import texbridge

    try:
        base = base_pattern(cfg.width, cfg.height)
        with texbridge.connect(cfg.namespace, app_name="texbridge-demo-producer") as s:
            tex = s.create_texture(cfg.width, cfg.height, FORMAT, name=name, backend=cfg.backend, keyed_mutex=True)
            mutex = tex.mutex
            view = _words(tex.numpy()) if tex.host_visible else None
            _report(q, "producer", event="ready", handle=str(tex.handle), broker_pid=s.broker_pid,
                    zero_copy=view is not None)
            write_s = 0.0
            written = 0
            try:
                for i in range(cfg.frames):
                    _acquire(mutex, 0, progress)
                    t = time.perf_counter()
                    if view is not None:
                        np.bitwise_xor(base, frame_key(i), out=view)
                    else:
                        tex.upload(expected_frame(base, i))
                    write_s += time.perf_counter() - t
                    written += 1
                    if i == cfg.corrupt_frame:
                        _damage(tex, view, cfg.height // 2, cfg.width // 3)
                    mutex.release(1)
                for _ in range(cfg.pingpong):
                    _acquire(mutex, 0, progress)
                    mutex.release(1)
                _acquire(mutex, 0, progress)  # the consumer is done with the last frame
                mutex.release(0)
            except _Stopped:
                pass
            tex.close()
        _report(q, "producer", event="done", write_ms=write_s * 1e3 / max(1, written))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent, which decides the exit status
        _report(q, "producer", event="error", error=_describe(e))
        raise SystemExit(1) from None


def _damage(tex: Any, view: np.ndarray | None, y: int, x: int) -> None:
    """Flip one bit of one pixel, through the same path frames are written by."""
    if view is not None:
        view[y, x] ^= np.uint32(1)
    else:
        frame = tex.download()
        frame[y, x, 0] ^= 1
        tex.upload(frame)


def _consumer(cfg: DemoConfig, name: str, q: Any, progress: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import texbridge

    try:
        base = base_pattern(cfg.width, cfg.height)
        with texbridge.connect(cfg.namespace, app_name="texbridge-demo-consumer") as s:
            tex = s.open(name, backend=None if cfg.backend == "memfd" else cfg.backend)
            mutex = tex.mutex
            if mutex is None:
                raise RuntimeError(f"{name!r} was opened without its keyed mutex")
            view = _words(tex.numpy()) if tex.host_visible else None
            scratch = np.empty_like(base)
            verified = failed = 0
            first_failure = ""
            verify_s = 0.0
            start = end = 0.0
            rounds: list[float] = []
            try:
                for i in range(cfg.frames):
                    _acquire(mutex, 1, progress)
                    t = time.perf_counter()
                    if i == 0:
                        start = t
                    key = frame_key(i)
                    if view is not None:
                        np.bitwise_xor(view, key, out=scratch)
                    else:
                        got = tex.download()
                        np.bitwise_xor(_words(np.ascontiguousarray(got)), key, out=scratch)
                    if np.array_equal(scratch, base):
                        verified += 1
                        progress[VERIFIED] = verified
                    else:
                        failed += 1
                        progress[FAILED] = failed
                        if not first_failure:
                            bad = np.argwhere(scratch != base)
                            y, x = (int(v) for v in bad[0])
                            first_failure = (f"frame {i}: {len(bad)} pixels differ, first at (x={x}, y={y}): "
                                             f"expected {int(base[y, x] ^ key):#010x}, "
                                             f"read {int(scratch[y, x] ^ key):#010x}")
                    verify_s += time.perf_counter() - t
                    mutex.release(0)
                    end = time.perf_counter()
                last = 0.0
                for j in range(cfg.pingpong):
                    _acquire(mutex, 1, progress)
                    now = time.perf_counter()
                    if j:  # the first wait also covers the producer's last frame; time whole round trips only
                        rounds.append(now - last)
                    last = now
                    mutex.release(0)
            except _Stopped:
                pass
            tex.close()
        _report(q, "consumer", event="done", verified=verified, failed=failed, first_failure=first_failure,
                elapsed=end - start, verify_ms=verify_s * 1e3 / max(1, verified + failed), rounds=rounds)
    except BaseException as e:  # noqa: BLE001
        _report(q, "consumer", event="error", error=_describe(e))
        raise SystemExit(1) from None


def _describe(e: BaseException) -> str:
    if isinstance(e, ImportError) and "keyed_mutex" in str(e):
        return f"the keyed mutex is unavailable: {e}"
    import texbridge

    if isinstance(e, texbridge.TexbridgeError):
        return f"{type(e).__name__}: {e}"
    return f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"


# -- the parent -------------------------------------------------------------------------------------------------------
def run_demo(cfg: DemoConfig, *, log=lambda text: None) -> DemoResult:
    """Start both processes, collect what they report, never hang: each side's waits are bounded. Ctrl-C
    (KeyboardInterrupt here) stops both within a second and returns what was done (`result.interrupted`)."""
    import texbridge

    result = DemoResult(cfg, name=f"texbridge-demo-{os.getpid()}-{secrets.token_hex(3)}")
    get_backend(cfg.backend)  # BackendError, with its reason, before any process starts
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    progress = ctx.RawArray("q", 3)
    procs: dict[str, Any] = {}
    pending: set[str] = set()  # roles started that have not reported yet
    # The parent's own session keeps the broker up (it may have been auto-started just now) for the whole demo.
    with texbridge.connect(cfg.namespace, app_name="texbridge-demo") as session:
        result.broker_pid = session.broker_pid
        log(f"broker pid {session.broker_pid}, namespace {session.namespace!r}")
        try:
            _run_children(cfg, result, ctx, q, progress, procs, pending, log)
            _end_children(result, procs, grace=HANDOFF_TIMEOUT + 5)
        except KeyboardInterrupt:
            result.interrupted = True
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the stop below is bounded: let it finish
            try:
                progress[STOP] = 1
                grace_end = time.monotonic() + STOP_GRACE
                _collect(result, q, procs, pending, grace_end)
                result.verified = max(result.verified, progress[VERIFIED])
                result.failed = max(result.failed, progress[FAILED])
                _end_children(result, procs, grace=max(0.05, grace_end - time.monotonic()))
            finally:
                signal.signal(signal.SIGINT, previous)
        finally:
            q.close()
    return result


def _run_children(cfg: DemoConfig, result: DemoResult, ctx: Any, q: Any, progress: Any, procs: dict[str, Any],
                  pending: set[str], log) -> None:
    producer = ctx.Process(target=_producer, args=(cfg, result.name, q, progress), name="texbridge-demo-producer")
    procs["producer"] = producer
    pending.add("producer")
    producer.start()
    ready = _next(q, procs, timeout=60.0)
    if ready is None or ready.get("event") != "ready":
        pending.clear()
        result.errors.append(_error_text(ready, "producer"))
        return
    result.handle, result.zero_copy = ready["handle"], ready["zero_copy"]
    log(f"producer pid {producer.pid} created {result.handle} published as {result.name!r}")
    consumer = ctx.Process(target=_consumer, args=(cfg, result.name, q, progress), name="texbridge-demo-consumer")
    procs["consumer"] = consumer
    consumer.start()
    pending.add("consumer")
    log(f"consumer pid {consumer.pid} opens {result.name!r}")
    started = last = moved = time.monotonic()
    seen = 0
    while pending:
        if not _collect(result, q, procs, pending, time.monotonic() + PROGRESS_EVERY):
            result.errors.append(f"{' and '.join(sorted(pending))} stopped without reporting")
            return
        now = time.monotonic()
        done = progress[VERIFIED] + progress[FAILED]
        if done != seen:
            seen, moved = done, now
        elif now - moved > HANDOFF_TIMEOUT * 3 + 5:  # each side's waits are bounded: this is a hang elsewhere
            result.errors.append(f"{' and '.join(sorted(pending))} made no progress for {now - moved:.0f} s")
            return
        if pending and now - last >= PROGRESS_EVERY:  # a long demo says how far it got
            last = now
            log(f"{done:,}/{cfg.frames:,} frames checked ({done / (now - started):,.0f}/s)"
                + (f", {progress[FAILED]} failed" if progress[FAILED] else ""))


def _collect(result: DemoResult, q: Any, procs: dict[str, Any], pending: set[str], until: float) -> bool:
    """Take reports into `result` until every pending role reported or `until`. False when the pending processes
    are all gone without a word."""
    while pending and time.monotonic() < until:
        msg = _next(q, {k: procs[k] for k in pending if k in procs}, timeout=until - time.monotonic())
        if msg is None:
            if time.monotonic() < until - 0.05:  # they died without reporting, rather than ran out of time
                return False
            break
        pending.discard(msg["role"])
        if msg["event"] == "error":
            result.errors.append(f"{msg['role']}: {msg['error']}")
        elif msg["role"] == "producer":
            result.write_ms = msg["write_ms"]
        else:
            _take_consumer(result, msg)
    return True


def _end_children(result: DemoResult, procs: dict[str, Any], *, grace: float) -> None:
    deadline = time.monotonic() + grace
    for p in procs.values():
        if p.pid is None:  # interrupted before it started
            continue
        p.join(timeout=max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()
            if not result.interrupted:
                result.errors.append(f"{p.name} (pid {p.pid}) had to be killed")
        elif p.exitcode not in (0, None) and not any(e.startswith(p.name.split("-")[-1]) for e in result.errors):
            result.errors.append(f"{p.name} exited with status {p.exitcode}")


def _take_consumer(result: DemoResult, msg: dict[str, Any]) -> None:
    result.verified, result.failed, result.first_failure = msg["verified"], msg["failed"], msg["first_failure"]
    result.verify_ms = msg["verify_ms"]
    if msg["elapsed"] > 0:
        result.frames_per_s = (result.verified + result.failed) / msg["elapsed"]
    rounds = msg["rounds"]
    if rounds:
        total = sum(rounds)
        result.handoffs_per_s = 2 * len(rounds) / total if total > 0 else 0.0
        result.round_trip_us = statistics.median(rounds) * 1e6


def _next(q: Any, procs: dict[str, Any], *, timeout: float) -> dict[str, Any] | None:
    """The next report, or None once every process we wait on has died without one (or `timeout` passed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return q.get(timeout=max(0.01, min(0.2, deadline - time.monotonic())))
        except queue_mod.Empty:
            if not any(p.is_alive() for p in procs.values()):
                try:
                    return q.get(timeout=0.5)  # a report may still be in flight from a process that just exited
                except queue_mod.Empty:
                    return None
    return None


def _error_text(msg: dict[str, Any] | None, role: str) -> str:
    if msg is None:
        return f"{role} stopped without reporting"
    return f"{msg.get('role', role)}: {msg.get('error', msg)}"


# -- the command ------------------------------------------------------------------------------------------------------
@click.command()
@click.option("--frames", default=600, show_default=True, type=click.IntRange(1, 10_000_000))
@click.option("--size", default="1280x720", show_default=True, callback=parse_size, metavar="WxH")
@click.option("--backend", default="memfd", show_default=True, type=click.Choice(BACKEND_NAMES),
              help=BACKEND_HELP)
@namespace_option
@click.option("--corrupt-frame", type=int, default=-1, hidden=True,
              help="Self-test: the producer damages one pixel of this frame, and the demo must fail.")
@friendly
def demo(frames: int, size: tuple[int, int], backend: str, corrupt_frame: int) -> None:
    """Producer and consumer processes hand frames back and forth through a shared texture and its keyed mutex;
    the consumer verifies every frame pixel-exact."""
    try:
        chosen = get_backend(backend)
    except BackendError as e:
        fail(str(e))
    if backend != "memfd":  # importable is not usable: ask the backend before starting two processes
        report = chosen.diagnostics()
        if not report.get("available"):
            fail(f"backend {backend!r} is unavailable here: {report.get('detail', 'no detail')}")
    cfg = DemoConfig(frames=frames, width=size[0], height=size[1], backend=backend, corrupt_frame=corrupt_frame)
    console.print(f"[bold]texbridge demo[/]: {frames} frames of {size[0]}x{size[1]} rgba8 in {backend} memory, "
                  "handed over with a keyed mutex")
    try:
        result = run_demo(cfg, log=lambda text: console.print(f"  {text}"))
    except BackendError as e:
        fail(str(e))
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    verdict = (f"[green]{result.verified}/{frames} frames verified pixel-exact[/]" if result.ok
               else f"[red]{result.verified}/{frames} frames verified, {result.failed} failed[/]")
    table.add_row("verification", verdict)
    if result.first_failure:
        table.add_row("first failure", escape(result.first_failure))
    if result.frames_per_s:
        table.add_row("frames/s", f"{result.frames_per_s:,.0f} (write {result.write_ms:.3f} ms + verify "
                                  f"{result.verify_ms:.3f} ms a frame, {'zero-copy' if result.zero_copy else 'copied'})")
    if result.handoffs_per_s:
        table.add_row("handoffs/s", f"{result.handoffs_per_s:,.0f} keyed-mutex handoffs (round trip median "
                                    f"{result.round_trip_us:.1f} us, {cfg.pingpong} round trips, no content)")
    table.add_row("resource", f"{result.handle} '{escape(result.name)}', broker pid {result.broker_pid}")
    console.print(table)
    for e in result.errors:
        error_line(e)
    if result.interrupted:
        err_console.print(f"interrupted after {result.verified + result.failed} of {frames} frames")
        raise SystemExit(130)
    if not result.ok:
        raise SystemExit(1)
