"""The bridge end to end, as users run it: `texbridge bridge serve` and `bridge join` processes bridging two
namespaces (each its own broker) over a shared file and over loopback TCP; senders, receivers and keyed mutexes in
this test process, on both sides.

Liveness bounds are generous (2 shared cores); the issue's times (notice ≤ 1.5 s, back ≤ 2 s) are measured by
`texbridge bench bridge`, and the times seen here are printed for the record.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

import texbridge as tb
from texbridge.senders import Receiver, Sender, list_senders

TRANSPORTS = ["shm", "tcp"]


def until(cond, timeout=15.0, what="condition", step=0.01):
    end = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        assert time.monotonic() < end, f"{what} not reached within {timeout} s"
        time.sleep(step)


class BridgeProc:
    """One `texbridge bridge serve|join` process; its stdout/stderr go to a file we can read."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.args, self.log = args, log
        self.start()

    def start(self) -> None:
        self.out = open(self.log, "a")
        self.proc = subprocess.Popen([sys.executable, "-m", "texbridge.cli", "bridge", *self.args],
                                     stdout=self.out, stderr=subprocess.STDOUT, text=True)

    def text(self) -> str:
        return self.log.read_text()

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.out.close()


class Bridged:
    """Namespaces NS-a (label A, serving) and NS-b (label B, joining) bridged over `transport`."""

    def __init__(self, tmp: Path, transport: str, *, serve_extra=(), join_extra=()) -> None:
        ns = os.environ["TEXBRIDGE_NAMESPACE"]
        self.ns_a, self.ns_b = ns + "-a", ns + "-b"
        self.tmp, self.transport = tmp, transport
        if transport == "shm":
            self.shm = f"/dev/shm/texbridge-test-{uuid.uuid4().hex[:10]}"
            where_serve, where_join = ["--shm", self.shm, "--size", "64"], ["--shm", self.shm]
        else:
            self.shm = None
            where_serve = ["--tcp", "127.0.0.1:0"]
        self.serve_args = [*where_serve, "-n", self.ns_a, "--label", "A", *serve_extra]
        self.server = BridgeProc(["serve", *self.serve_args], tmp / "serve.log")
        if transport == "tcp":
            port = until(lambda: re.search(r"listening on 127\.0\.0\.1:(\d+)", self.server.text()),
                         what="server listening").group(1)
            where_join = ["--tcp", f"127.0.0.1:{port}"]
            self.server.args[2] = f"127.0.0.1:{port}"  # a restarted server listens on the same port
        self.join_args = [*where_join, "-n", self.ns_b, "--label", "B", *join_extra]
        self.joiner = BridgeProc(["join", *self.join_args], tmp / "join.log")
        self.sa, self.sb = tb.connect(self.ns_a), tb.connect(self.ns_b)

    def linked(self, timeout=20.0) -> None:
        until(lambda: self.server.text().count("linked with") >= 1 and "linked with" in self.joiner.text(), timeout,
              "bridge linked")

    def close(self) -> None:
        for p in (self.joiner, self.server):
            p.stop()
        self.sa.close()
        self.sb.close()
        if self.shm:
            try:
                os.unlink(self.shm)
            except FileNotFoundError:
                pass


@pytest.fixture
def bridged(runtime, tmp_path):
    made: list[Bridged] = []

    def make(transport: str, **kw) -> Bridged:
        made.append(Bridged(tmp_path, transport, **kw))
        return made[-1]

    yield make
    for b in made:
        b.close()


def pattern(shape, seed):
    return ((np.arange(int(np.prod(shape)), dtype=np.uint32) * 7 + seed * 13) % 251).astype(np.uint8).reshape(shape)


def deliver(snd: Sender, rx: Receiver, frame: np.ndarray, timeout=20.0) -> None:
    """Send `frame` until `rx` holds exactly it (the first frames may precede the mirror)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        snd.send(frame)
        got = rx.wait_frame(0.05)
        if got is not None and got.shape == frame.shape and np.array_equal(got, frame):
            return
    raise AssertionError(f"frame of {frame.shape} did not arrive pixel-exact within {timeout} s")


def names(session) -> set[str]:
    return {i.name for i in list_senders(session)}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_frames_cross_both_ways_pixel_exact_with_resize_and_restart(bridged, transport):
    b = bridged(transport)
    b.linked()
    with Sender("cam", 64, 48, session=b.sa) as a, Sender("screen", 50, 20, "bgra8", session=b.sb) as s, \
            Receiver("cam@A", session=b.sb) as ra, Receiver("screen@B", session=b.sa) as rs:
        for i in range(4):
            deliver(a, ra, pattern(a.shape, i))
            deliver(s, rs, pattern(s.shape, 10 + i))
        a.resize(96, 40, "rgba16")
        deliver(a, ra, pattern((40, 96, 4), 5).astype(np.uint16) * 257)
        assert (ra.width, ra.height, ra.format) == (96, 40, "rgba16")
        assert names(b.sb) == {"cam@A", "screen"} and names(b.sa) == {"screen@B", "cam"}  # no loop
    until(lambda: "cam@A" not in names(b.sb), what="mirror retired with its sender")
    with Sender("cam", 30, 30, session=b.sa) as a2, Receiver("cam@A", session=b.sb) as ra:
        deliver(a2, ra, pattern(a2.shape, 7))  # a restarted sender is mirrored again


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_timestamp_and_user_data_cross_with_their_frame(bridged, transport):
    b = bridged(transport)
    b.linked()
    with Sender("cam", 24, 16, session=b.sa) as a, Receiver("cam@A", session=b.sb) as rx:
        deliver(a, rx, pattern(a.shape, 0))
        for i in range(1, 4):
            stamp = time.monotonic_ns() - 1_000_000
            a.send(pattern(a.shape, i), timestamp_ns=stamp, user_data=b"frame %d" % i)
            f = rx.next_frame(10)
            while f is not None and f.user_data != b"frame %d" % i:
                f = rx.next_frame(10)
            assert f is not None and np.array_equal(f.pixels, pattern(a.shape, i))
            assert abs(f.timestamp_ns - stamp) < 2_000_000  # one host: the same monotonic time on both sides


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_slow_receiver_blocks_neither_the_sender_nor_a_fast_receiver(bridged, transport):
    b = bridged(transport)
    b.linked()
    with Sender("cam", 320, 240, session=b.sa) as a, Receiver("cam@A", session=b.sb) as fast, \
            Receiver("cam@A", session=b.sb) as slow:
        deliver(a, fast, pattern(a.shape, 0))
        assert slow.wait_frame(10) is not None
        got, sends, end = 0, 0, time.monotonic() + 3
        worst = 0.0
        while time.monotonic() < end:
            t = time.monotonic()
            a.send(pattern(a.shape, sends % 50))
            worst = max(worst, time.monotonic() - t)
            sends += 1
            if fast.wait_frame(0.001) is not None:
                got += 1
            # the slow receiver holds a zero-copy view (its slot pinned) and never reads again meanwhile
            if sends == 1:
                view = slow.receive(copy=False)
                assert view is not None
        assert got >= 10, f"the fast receiver got only {got} frames while a slow one stalled"
        assert worst < 1.0, f"send() took {worst:.3f} s: the sender waited for a receiver"
        slow.release()
        print(f"{transport}: {sends} sends, fast receiver {got} frames, worst send {worst * 1e3:.1f} ms")


def test_wrong_secret_is_refused(bridged, tmp_path):
    good, bad = tmp_path / "good.token", tmp_path / "bad.token"
    good.write_text("correct horse battery staple 1234")
    bad.write_text("wrong horse battery staple 12345")
    b = bridged("tcp", serve_extra=["--token-file", str(good)], join_extra=["--token-file", str(bad)])
    until(lambda: b.joiner.proc.poll() is not None, 30, "the joiner gives up")
    assert b.joiner.proc.returncode == 1
    assert "secret" in b.joiner.text().lower(), b.joiner.text()
    assert "linked with" not in b.server.text()
    with Sender("cam", 8, 8, session=b.sa) as a:
        a.send(np.zeros(a.shape, np.uint8))
        time.sleep(1.0)
        assert "cam@A" not in names(b.sb)
    # the right secret is let in by the same server
    b.joiner.args[-1] = str(good)
    b.joiner.start()
    b.linked()


def test_tls_with_a_secret_through_the_cli(bridged, tmp_path):
    if not shutil.which("openssl"):
        pytest.skip("needs the openssl command to make a test certificate")
    key, crt, token = tmp_path / "key.pem", tmp_path / "cert.pem", tmp_path / "token"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-days", "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(crt)], check=True, capture_output=True)
    token.write_text("a shared secret of some length")
    b = bridged("tcp", serve_extra=["--token-file", str(token), "--tls-cert", str(crt), "--tls-key", str(key)],
                join_extra=["--token-file", str(token), "--tls-ca", str(crt), "--tls-server-name", "localhost"])
    b.linked()
    assert "tls+secret" in b.server.text()
    with Sender("cam", 32, 16, session=b.sa) as a, Receiver("cam@A", session=b.sb) as rx:
        deliver(a, rx, pattern(a.shape, 9))


@pytest.mark.parametrize("victim", ["serve", "join"])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_kill9_of_either_end_retires_mirrors_and_recovers(bridged, transport, victim):
    b = bridged(transport)
    b.linked()
    with Sender("from-a", 32, 32, session=b.sa) as a, Sender("from-b", 32, 32, session=b.sb) as s, \
            Receiver("from-a@A", session=b.sb) as ra, Receiver("from-b@B", session=b.sa) as rs:
        deliver(a, ra, pattern(a.shape, 1))
        deliver(s, rs, pattern(s.shape, 2))
        dead, alive = (b.server, b.joiner) if victim == "serve" else (b.joiner, b.server)
        # the survivor retires the mirrors it made of the dead side's senders (those made by the dead side
        # in its own namespace go with its broker session at once)
        survivor_session, mirror = (b.sb, "from-a@A") if victim == "serve" else (b.sa, "from-b@B")
        dead.kill9()
        t = time.monotonic()
        until(lambda: mirror not in names(survivor_session), 10, "survivor retires the dead side's mirrors")
        noticed = time.monotonic() - t
        dead.start()
        t = time.monotonic()
        deliver(a, ra, pattern(a.shape, 3), timeout=30)
        deliver(s, rs, pattern(s.shape, 4), timeout=30)
        back = time.monotonic() - t
        print(f"{transport} kill -9 {victim}: mirrors retired after {noticed:.2f} s, frames both ways again after "
              f"{back:.2f} s (includes starting the CLI)")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_keyed_mutex_crosses_with_dxgi_semantics(bridged, transport):
    b = bridged(transport)
    b.linked()
    tex = b.sa.create_texture(40, 20, "rgba8", keyed_mutex=True, name="frame")
    mirror = until(lambda: _open(b.sb, "frame@A"), 20, "keyed-mutex mirror published")
    assert mirror.descriptor.keyed_mutex and mirror.shape == tex.shape
    rounds, errors = 30, []

    def producer():  # side A: acquire 0, write, release 1
        try:
            for i in range(rounds):
                tex.mutex.acquire(0, 20)
                tex.numpy()[:] = pattern(tex.shape, i)
                tex.mutex.release(1, private_data=f"frame {i}".encode())
        except Exception as e:  # reported by the main thread
            errors.append(e)

    th = threading.Thread(target=producer)
    th.start()
    try:
        for i in range(rounds):  # side B: acquire 1, check, release 0
            sync = mirror.mutex.acquire(1, 20)
            assert np.array_equal(mirror.numpy(), pattern(tex.shape, i)), f"round {i}: stale content"
            assert mirror.mutex.private_data == f"frame {i}".encode()
            assert sync >= i
            mirror.mutex.release(0)
    finally:
        th.join(30)
    assert not errors, errors
    t = time.monotonic()
    with pytest.raises(tb.KeyedMutexTimeout):  # nobody releases key 9: the timeout holds across the bridge
        mirror.mutex.acquire(9, 0.5)
    assert 0.5 <= time.monotonic() - t < 3
    st = _status(b.ns_b)
    assert st["keyed_mutex"] and st["keyed_mutex"][0]["from_peer"] >= rounds
    tex.close()
    mirror.close()


def test_status_shows_peers_streams_and_rates(bridged):
    b = bridged("shm")
    b.linked()
    with Sender("cam", 64, 64, session=b.sa) as a, Receiver("cam@A", session=b.sb) as ra:
        deliver(a, ra, pattern(a.shape, 0))
        for i in range(30):
            a.send(pattern(a.shape, i))
            time.sleep(0.01)
        st = until(lambda: (s := _status(b.ns_b)) and s["in"] and s["in"][0]["frames"] > 5 and s, 10, "status")
        assert st["peer"]["label"] == "A" and st["in"][0]["name"] == "cam@A" and st["in"][0]["size"] == "64x64 rgba8"
        out = subprocess.run([sys.executable, "-m", "texbridge.cli", "bridge", "status"], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0 and "cam@A" in out.stdout and "with A" in out.stdout, out.stdout + out.stderr
        js = json.loads(subprocess.run([sys.executable, "-m", "texbridge.cli", "bridge", "status", "--json"],
                                       capture_output=True, text=True, timeout=60).stdout)
        assert {s["label"] for s in js} == {"A", "B"}


@pytest.mark.parametrize("backend", ["vulkan", "gl"])
def test_a_mirror_imports_into_vulkan_and_gl(bridged, backend):
    try:
        diag = tb.backends.get_backend(backend).diagnostics()
    except tb.BackendError as e:
        pytest.skip(f"the {backend} backend is unavailable: {e}")
    if not diag.get("available"):
        pytest.skip(f"no {backend} device with external memory: {diag.get('detail')}")
    b = bridged("shm")
    b.linked()
    with Sender("cam", 40, 24, session=b.sa) as a, Receiver("cam@A", session=b.sb, backend=backend) as rx:
        frame = pattern(a.shape, 3)
        end = time.monotonic() + 20
        while time.monotonic() < end:
            a.send(frame)
            got = rx.wait_frame(0.05)
            if got is not None and np.array_equal(got.download(), frame):
                break
        else:
            raise AssertionError("the mirror's frame did not arrive in the receiver's API")
        assert isinstance(got, tb.Resource) and got.backend_name == backend


def _open(session, name):
    try:
        return session.open(name)
    except tb.NotFound:
        return None


def _status(ns: str) -> dict | None:
    from texbridge.bridge._engine import read_statuses

    for st in read_statuses():
        if st["namespace"] == ns:
            return st
    return None


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "texbridge.cli", "bridge", *args], capture_output=True, text=True,
                          timeout=60)


def test_vm_args_remove_and_option_errors(bridged, tmp_path):
    out = _cli("vm-args", "--shm", "/dev/shm/texbridge-x", "--max-size", "3840x2160")
    assert out.returncode == 0 and "ivshmem-plain,memdev=texbridge" in out.stdout
    assert "size=256M" in out.stdout and "<shmem name='texbridge-x'>" in out.stdout, out.stdout
    assert _cli("vm-args", "--size", "48").returncode == 1  # not a power of two
    b = bridged("shm")
    b.linked()
    refused = _cli("remove", "--shm", b.shm)
    assert refused.returncode == 1 and "serving" in refused.stderr and os.path.exists(b.shm)
    b.server.stop()
    b.joiner.stop()
    assert _cli("remove", "--shm", b.shm).returncode == 0 and not os.path.exists(b.shm)
    assert "no file" in _cli("remove", "--shm", b.shm).stdout
    (tmp_path / "t").write_text("x" * 32)
    bad = _cli("serve", "--shm", str(tmp_path / "f"), "--token-file", str(tmp_path / "t"))
    assert bad.returncode == 1 and "--tcp" in bad.stderr
    small = _cli("serve", "--shm", str(tmp_path / "f"), "--size", "8", "--max-size", "3840x2160")
    assert small.returncode == 1 and "too small" in small.stderr, small.stderr
    assert _cli("join", "--tcp", "nohostport").returncode == 2  # a usage error
    open_net = _cli("serve", "--tcp", "0.0.0.0:0")
    assert open_net.returncode == 1 and "secret" in open_net.stderr
