"""The bridge (issue 12): the transports' own rows (`_bridge_shm`, `_bridge_tcp`) and the whole path as users run
it — `texbridge bridge serve/join` processes between two namespaces, a Sender in one, Receivers in the other.

End-to-end rows, peers measured in the same run:
- added latency: sender → bridge → mirror → receiver against a local sender → receiver handoff (same frames, same
  processes, frames one at a time every 20 ms so nothing queues); the producer stamps CLOCK_MONOTONIC into the
  pixels, the consumer process subtracts it on arrival (one host: one clock);
- the sender's frames/s with four remote receivers reading its mirror, against the same sender unbridged;
- a keyed-mutex ping-pong (producer on one side, consumer process on the other) against the same between two
  processes of one namespace;
- kill -9 of either bridge process: how long the other side takes to retire the mirrors, and how long a restarted
  bridge takes to link again (from its process start, and from the moment its CLI is up).

Only the latency and keyed-mutex rows (a minute or two): `python -m texbridge.benchmarks.bridge --latency [--quick]`
or `TEXBRIDGE_BENCH_BRIDGE_ROWS=latency texbridge bench --quick bridge`; `TEXBRIDGE_BENCH_BRIDGE=shm` (or `tcp`)
picks the transports.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from ._report import Row, latency_row, private_namespace

HD = (1920, 1080)
TRANSPORTS = [t for t in os.environ.get("TEXBRIDGE_BENCH_BRIDGE", "shm,tcp").split(",") if t]


def _stamp(buf: np.ndarray, value: int) -> None:
    buf.reshape(-1)[:8].view(np.int64)[0] = value


def _read_stamp(buf: np.ndarray) -> int:
    return int(buf.reshape(-1)[:8].view(np.int64)[0])


class _Bridges:
    """`texbridge bridge serve` in namespace a (label A) and `join` in namespace b (label B), as subprocesses."""

    def __init__(self, transport: str, ns: str, workdir: Path) -> None:
        self.ns_a, self.ns_b, self.dir = ns + "-a", ns + "-b", workdir
        if transport == "shm":
            self.path = f"/dev/shm/texbridge-bench-{uuid.uuid4().hex[:8]}"
            serve, join = ["--shm", self.path, "--size", "64"], ["--shm", self.path]
        else:
            self.path = None
            serve = ["--tcp", "127.0.0.1:0"]
        self.serve_args = ["serve", *serve, "-n", self.ns_a, "--label", "A"]
        self.server = self._start(self.serve_args, "serve")
        if transport == "tcp":
            port = self._wait_text("serve", r"listening on 127\.0\.0\.1:(\d+)").group(1)
            self.serve_args[2] = f"127.0.0.1:{port}"
            join = ["--tcp", f"127.0.0.1:{port}"]
        self.join_args = ["join", *join, "-n", self.ns_b, "--label", "B"]
        self.joiner = self._start(self.join_args, "join")
        self.wait_linked()

    def _start(self, args: list[str], log: str) -> subprocess.Popen:
        out = open(self.dir / f"{log}.log", "a")
        return subprocess.Popen([sys.executable, "-m", "texbridge.cli", "bridge", *args], stdout=out,
                                stderr=subprocess.STDOUT)

    def text(self, log: str) -> str:
        return (self.dir / f"{log}.log").read_text()

    def _wait_text(self, log: str, pattern: str, timeout: float = 30.0, count: int = 1) -> re.Match:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            found = list(re.finditer(pattern, self.text(log)))
            if len(found) >= count:
                return found[count - 1]
            time.sleep(0.005)
        raise RuntimeError(f"bridge {log}: no {pattern!r} within {timeout} s:\n{self.text(log)[-2000:]}")

    def wait_linked(self, count: int = 1) -> None:
        self._wait_text("serve", "linked with", count=count)
        self._wait_text("join", "linked with", count=count)

    def close(self) -> None:
        for p in (self.joiner, self.server):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)
        if self.path:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


@contextmanager
def _bridged(transport: str) -> Iterator[_Bridges]:
    ns = "bb" + uuid.uuid4().hex[:6]
    with private_namespace(ns), tempfile.TemporaryDirectory(prefix="texbridge-bench-bridge-") as d:
        b = _Bridges(transport, ns, Path(d))
        try:
            yield b
        finally:
            b.close()
            for n in (b.ns_a, b.ns_b):
                _stop_broker(n)


def _stop_broker(ns: str) -> None:
    import texbridge

    try:
        with texbridge.connect(ns, autostart=False, app_name="bench-stop") as s:
            s.shutdown()
    except texbridge.TexbridgeError:
        pass


# -- consumer process ----------------------------------------------------------------------------------------------------
def _consumer(ns: str, name: str, seconds: float, conn) -> None:
    """Receive `name` in namespace `ns` for up to `seconds` after the first frame; send back latencies (ns)."""
    import texbridge

    with texbridge.connect(ns, app_name="bench-consumer") as s, texbridge.Receiver(name, session=s) as rx:
        conn.send("ready")
        lat: list[int] = []
        first = None
        while first is None or time.monotonic() - first < seconds:
            f = rx.wait_frame(0.5, copy=False)
            if f is None:
                if first is not None and rx.status == "no_sender":
                    break
                continue
            now = time.monotonic_ns()
            stamp = _read_stamp(f)
            rx.release()
            if stamp < 0:
                break
            if first is None:
                first = time.monotonic()
            lat.append(now - stamp)
        conn.send((lat, rx.frames_received))


def _start_consumers(ns: str, name: str, count: int, seconds: float) -> list[tuple]:
    ctx = mp.get_context("spawn")
    out = []
    for _ in range(count):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_consumer, args=(ns, name, seconds, child), daemon=True)
        p.start()
        out.append((p, parent))
    for _, conn in out:
        if not conn.poll(60) or conn.recv() != "ready":
            raise RuntimeError("a consumer process did not start")
    return out


def _finish(consumers: list[tuple]) -> list[tuple[list[int], int]]:
    results = []
    for p, conn in consumers:
        results.append(conn.recv() if conn.poll(60) else ([], 0))
        p.join(10)
        if p.is_alive():
            p.kill()
    return results


def _latency(ns_send: str, ns_recv: str, name_recv: str, size: tuple[int, int], frames: int,
             period: float) -> list[float]:
    """Frames one at a time every `period` s; seconds from the stamp to the consumer holding the frame."""
    import texbridge

    w, h = size
    with texbridge.connect(ns_send, app_name="bench-producer") as s:
        with texbridge.Sender("bench", w, h, session=s) as snd:
            src = np.full((h, w, 4), 7, np.uint8)
            consumers = _start_consumers(ns_recv, name_recv, 1, frames * period + 5)
            # warm up: until the (mirror) receiver has frames
            for _ in range(int(20 / period)):
                _stamp(src, time.monotonic_ns())
                snd.send(src)
                time.sleep(period)
                if consumers[0][1].poll(0):
                    break
                if _mirror_ready(ns_recv, name_recv):
                    break
            for _ in range(frames):
                _stamp(src, time.monotonic_ns())
                snd.send(src)
                time.sleep(period)
            _stamp(src, -1)
            snd.send(src)
            (lat, _), = _finish(consumers)
    return [x / 1e9 for x in lat[3:]]  # the first few are the warm-up's


def _mirror_ready(ns: str, name: str) -> bool:
    """Whether the receiving side's sender (a mirror when bridged) has frames yet."""
    import texbridge

    try:
        with texbridge.connect(ns, autostart=False, app_name="bench-probe") as s:
            return any(i.name == name and i.frames > 0 for i in texbridge.list_senders(s))
    except texbridge.TexbridgeError:
        return False


def _sender_rate(ns_send: str, ns_recv: str | None, name_recv: str, receivers: int, seconds: float) -> float:
    """A 1080p sender's frames/s flat out, with `receivers` consumer processes on the receiving side."""
    import texbridge

    w, h = HD
    with texbridge.connect(ns_send, app_name="bench-producer") as s:
        with texbridge.Sender("bench", w, h, session=s) as snd:
            src = np.full((h, w, 4), 7, np.uint8)
            consumers = _start_consumers(ns_recv, name_recv, receivers, seconds + 5) if receivers else []
            end = time.monotonic() + 20
            while consumers and time.monotonic() < end and not _mirror_ready(ns_recv, name_recv):
                snd.send(src)
                time.sleep(0.01)
            count, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                _stamp(src, time.monotonic_ns())
                snd.send(src)
                count += 1
            rate = count / (time.perf_counter() - t0)
            _stamp(src, -1)
            snd.send(src)
            _finish(consumers)
    return rate


def _km_consumer(ns: str, name: str, rounds: int, conn) -> None:
    """Side B: acquire 1, check, release 0, `rounds` times; sends back the seconds each acquire waited."""
    import texbridge

    with texbridge.connect(ns, app_name="bench-km") as s:
        end = time.monotonic() + 30
        res = None
        while res is None and time.monotonic() < end:
            try:
                res = s.open(name)
            except texbridge.NotFound:
                time.sleep(0.02)
        conn.send("ready" if res is not None else "missing")
        waits = []
        for i in range(rounds):
            t = time.perf_counter()
            res.mutex.acquire(1, 10)
            waits.append(time.perf_counter() - t)
            if int(res.numpy()[0, 0, 0]) != i % 256:
                conn.send(f"round {i}: stale content")
                return
            res.mutex.release(0)
        conn.send(waits)


def _km_rows(b: "_Bridges", transport: str, rounds: int) -> list[Row]:
    """Producer on A (acquire 0, write, release 1), consumer process on B (acquire 1, read, release 0) through the
    bridges, against the same ping-pong between two processes of one namespace."""
    import texbridge

    out = []
    for label, ns_b, name in (("through the bridge", b.ns_b, "km@A"), ("local (one namespace)", b.ns_a, "km")):
        with texbridge.connect(b.ns_a, app_name="bench-km") as s:
            tex = s.create_texture(256, 256, "rgba8", keyed_mutex=True, name="km")
            ctx = mp.get_context("spawn")
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_km_consumer, args=(ns_b, name, rounds, child), daemon=True)
            p.start()
            try:
                if parent.recv() != "ready":
                    raise RuntimeError(f"{name} never appeared")
                t0 = time.perf_counter()
                for i in range(rounds):
                    tex.mutex.acquire(0, 10)
                    tex.numpy()[0, 0, 0] = i % 256
                    tex.mutex.release(1)
                got = parent.recv()
                elapsed = time.perf_counter() - t0
            finally:
                p.join(10)
                if p.is_alive():
                    p.kill()
                tex.close()
        if isinstance(got, str):
            raise RuntimeError(got)
        out.append(Row(f"bridge {transport}: keyed-mutex ping-pong, 256x256 rgba8 (A: 0 -> 1, B: 1 -> 0)", label,
                       rounds / elapsed, "round trips/s", None, "", True))
    return out


def _kill_rows(transport: str) -> list[Row]:
    """kill -9 each end once: time until the survivor retires the dead side's mirror, then time to link again."""
    import texbridge

    out = []
    with _bridged(transport) as b:
        sa, sb = texbridge.connect(b.ns_a), texbridge.connect(b.ns_b)
        try:
            with texbridge.Sender("from-a", 64, 64, session=sa) as a, texbridge.Sender("from-b", 64, 64,
                                                                                        session=sb) as s:
                for victim in ("join", "serve"):
                    survivor_session, mirror = (sa, "from-b@B") if victim == "join" else (sb, "from-a@A")
                    end = time.monotonic() + 20
                    while time.monotonic() < end and not any(i.name == mirror for i in
                                                             texbridge.list_senders(survivor_session)):
                        a.send(np.zeros(a.shape, np.uint8))
                        s.send(np.zeros(s.shape, np.uint8))
                        time.sleep(0.01)
                    proc = b.joiner if victim == "join" else b.server
                    t0 = time.monotonic()
                    proc.send_signal(signal.SIGKILL)
                    proc.wait(10)
                    while any(i.name == mirror for i in texbridge.list_senders(survivor_session)):
                        time.sleep(0.002)
                    notice = time.monotonic() - t0
                    other = "serve" if victim == "join" else "join"
                    linked_before = b.text(other).count("linked with")
                    banners_before = b.text(victim).count(f"bridge {victim}:")
                    t1 = time.monotonic()
                    new = b._start(b.join_args if victim == "join" else b.serve_args, victim)
                    if victim == "join":
                        b.joiner = new
                    else:
                        b.server = new
                    b._wait_text(victim, f"bridge {victim}:", count=banners_before + 1)
                    t_up = time.monotonic()
                    b._wait_text(other, "linked with", count=linked_before + 1)
                    t_linked = time.monotonic()
                    out.append(Row(f"bridge {transport}: kill -9 of the {victim} end, the survivor retires its "
                                   "mirrors", "time from the kill", notice * 1e3, "ms", None, "target ≤ 1500 ms"))
                    out.append(Row(f"bridge {transport}: kill -9 of the {victim} end, restarted, linked again",
                                   "time from its CLI being up", (t_linked - t_up) * 1e3, "ms", None,
                                   f"target ≤ 2000 ms; {(t_linked - t1) * 1e3:.0f} ms from exec (Python start-up "
                                   "included)"))
        finally:
            sa.close()
            sb.close()
    return out


def _e2e_rows(quick: bool, latency_only: bool = False) -> list[Row]:
    out: list[Row] = []
    frames = 60 if quick else 250
    secs = 1.5 if quick else 4.0
    sizes = (("64x64", (64, 64), 0.005), ("1080p", HD, 0.02))
    for transport in TRANSPORTS:
        with _bridged(transport) as b:
            for label, size, period in sizes:
                g = (f"bridge {transport}: sender → receiver latency, {label} rgba8 (one frame every "
                     f"{period * 1e3:.0f} ms)")
                bridged = _latency(b.ns_a, b.ns_b, "bench@A", size, frames, period)
                local = _latency(b.ns_a, b.ns_a, "bench", size, frames, period)
                out.append(latency_row(g, "through the bridge (sender → mirror → receiver)", bridged))
                out.append(latency_row(g, "local handoff (same namespace)", local))
                if bridged and local:
                    p50 = (np.median(bridged) - np.median(local)) * 1e6
                    p99 = (np.percentile(bridged, 99) - np.percentile(local, 99)) * 1e6
                    out.append(Row(g, "added by the bridge (p50 / p99 difference)", p50, "us", p99,
                                   "two more copies of the frame" + (": targets (shm) p50 ≤ 100 us, p99 ≤ 1 ms"
                                                                     if transport == "shm" else "")))
            if latency_only:
                out += _km_rows(b, transport, 50 if quick else 300)
                continue
            g = f"bridge {transport}: 1080p sender frames/s, 4 remote receivers vs none"
            four = _sender_rate(b.ns_a, b.ns_b, "bench@A", 4, secs)
            alone = _sender_rate(b.ns_a, None, "", 0, secs)
            out.append(Row(g, "bridged, 4 receivers of its mirror", four, "frames/s", None,
                           f"sender slowed {100 * (1 - four / alone):.0f}% (target < 10%)", True))
            out.append(Row(g, "the same sender, nobody receiving", alone, "frames/s", None, "", True))
            out += _km_rows(b, transport, 50 if quick else 300)
        out += _kill_rows(transport)
    return out


def _transport_rows(quick: bool) -> list[Row]:
    """The transports' own rows, where their modules exist."""
    out: list[Row] = []
    try:
        from . import _bridge_shm
    except ImportError:
        pass
    else:
        out += _bridge_shm.rows(quick)
    try:
        from . import _bridge_tcp
    except ImportError:
        pass
    else:
        out += _bridge_tcp.rows(quick)
    return out


def run(quick: bool) -> list[Row]:
    if os.environ.get("TEXBRIDGE_BENCH_BRIDGE_ROWS") == "latency":  # `texbridge bench bridge` with only those rows
        return latency(quick)
    return _transport_rows(quick) + _e2e_rows(quick)


def e2e(quick: bool) -> list[Row]:
    """Only the end-to-end rows (`python -m texbridge.benchmarks.bridge --e2e`)."""
    return _e2e_rows(quick)


def latency(quick: bool) -> list[Row]:
    """Only the added-latency and keyed-mutex rows (`python -m texbridge.benchmarks.bridge --latency`): a minute
    or two, no 1080p throughput, no kill -9 rounds."""
    return _e2e_rows(quick, latency_only=True)


if __name__ == "__main__":
    from ._report import print_rows

    q = "--quick" in sys.argv
    print_rows(latency(q) if "--latency" in sys.argv else e2e(q) if "--e2e" in sys.argv else run(q))
