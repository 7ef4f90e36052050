"""The TCP bridge transport (bridge/_tcp.py, bridge/_codec.py) with real sockets and real peer processes.

The peer program is tests/_bridge_tcp_peer.py: it echoes every frame it reads back on the same stream number, so a
round trip through another process checks encoding both ways, pixel by pixel.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest

from texbridge.bridge import _codec as C
from texbridge.bridge._link import (
    MAX_STREAMS,
    Backoff,
    BridgeAuthError,
    BridgeError,
    BridgePeerError,
    FrameMeta,
    Link,
    StreamFormat,
    StreamReader,
    StreamWriter,
)
from texbridge.bridge._tcp import TcpEndpoint, TcpLink, TlsOptions

PEER = str(Path(__file__).with_name("_bridge_tcp_peer.py"))
SECRET = "correct horse battery staple"
CODECS = C.available_codecs()


class Peer:
    """A peer process; lines() collects its stdout lines (read by a thread, so it never blocks on a full pipe)."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, prefix: list[str] | None = None) -> None:
        self.proc = subprocess.Popen([*(prefix or []), sys.executable, PEER, *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.out: list[str] = []
        self.err: list[str] = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.out), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.err), daemon=True).start()

    @staticmethod
    def _pump(stream, into: list[str]) -> None:
        for line in stream:
            into.append(line.rstrip("\n"))

    def wait_line(self, prefix: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.out:
                if line.startswith(prefix):
                    return line
            if self.proc.poll() is not None and not any(line.startswith(prefix) for line in self.out):
                time.sleep(0.1)  # let the pump threads finish
                for line in self.out:
                    if line.startswith(prefix):
                        return line
                break
            time.sleep(0.02)
        raise AssertionError(f"no {prefix!r} line from the peer; stdout {self.out}, stderr {self.err[-20:]}")

    def port(self) -> int:
        return int(self.wait_line("PORT").split()[1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def peers():
    started: list[Peer] = []

    def start(*args: str, **kw) -> Peer:
        p = Peer(*args, **kw)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()
        assert not any("Traceback" in line for line in p.err), "\n".join(p.err)


def raw_recv(sock: socket.socket) -> tuple[int, bytes]:
    """One message read without the library (for hostile-peer tests)."""
    head = b""
    while len(head) < C.HEADER.size:
        chunk = sock.recv(C.HEADER.size - len(head))
        assert chunk, "connection closed"
        head += chunk
    kind, length = C.HEADER.unpack(head)
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        assert chunk, "connection closed"
        body += chunk
    return kind, body


def raw_hello(sock: socket.socket, auth: bool = False, **over) -> dict:
    """Our half of a HELLO exchange, by hand; returns the peer's hello."""
    hello = {"magic": C.MAGIC, "version": C.PROTOCOL_VERSION, "label": "raw", "codecs": ["raw", "lz4", "zstd"],
             "nonce": os.urandom(32), "auth": auth, **over}
    data = msgpack.packb(hello)
    sock.sendall(C.header(C.HELLO, len(data)) + data)
    kind, body = raw_recv(sock)
    assert kind == C.HELLO, kind
    return msgpack.unpackb(body)


def establish(ep: TcpEndpoint, timeout: float = 10.0) -> TcpLink:
    link = ep.establish(timeout)
    assert link is not None, f"no link within {timeout} s ({ep.describe()}; errors {getattr(ep, 'errors', [])})"
    return link


def local_pair(codecs=("lz4",), **kw) -> tuple[TcpLink, TcpLink, TcpEndpoint]:
    """Two ends in this process (threads), for codec properties that need many frames cheaply."""
    srv = TcpEndpoint("serve", "127.0.0.1", 0, label="srv", codecs=codecs, **kw)
    got: dict[str, TcpLink | None] = {}
    t = threading.Thread(target=lambda: got.setdefault("s", srv.establish(10)))
    t.start()
    cli = establish(TcpEndpoint("join", "127.0.0.1", srv.port, label="cli", codecs=codecs, **kw))
    t.join()
    assert got["s"] is not None
    return got["s"], cli, srv


def read_frame(link: Link, reader: StreamReader, after: int, timeout: float = 10.0):
    """(pixels copy, meta) of the first frame numbered above `after`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = reader.read(lambda v, m: (v.copy(), m), after)
        if got is not None:
            return got
        link.wait(0.05)
    raise AssertionError(f"no frame after {after} within {timeout} s; link {link!r}")


def open_echo(link: Link, stream: int, fmt: StreamFormat) -> tuple[StreamWriter, StreamReader]:
    w = link.open_writer(stream, fmt)
    r = link.open_reader(stream, fmt)
    link.send({"op": "open", "stream": stream, "width": fmt.width, "height": fmt.height, "format": fmt.format})
    deadline = time.monotonic() + 10
    while not any(m.get("op") == "opened" for m in link.receive()):
        assert time.monotonic() < deadline, "the peer did not open the stream"
        link.wait(0.05)
    return w, r


def ui_frames(fmt: StreamFormat, n: int, seed: int = 1):
    """UI-like frames: a flat background with a few boxes, then one small rectangle changed per frame (with its
    damage rectangle on odd frames, none = whole frame on even ones)."""
    rng = np.random.default_rng(seed)
    cur = np.full((fmt.height, fmt.row_bytes), 40, np.uint8)
    cur[10:60, 40:400] = 200
    for i in range(1, n + 1):
        w, h = int(rng.integers(1, 24)), int(rng.integers(1, 24))
        x, y = int(rng.integers(0, fmt.width - w + 1)), int(rng.integers(0, fmt.height - h + 1))
        cur[y:y + h, x * 4:(x + w) * 4] = rng.integers(0, 256, (h, w * 4), dtype=np.uint8)
        yield i, cur.copy(), (((x, y, w, h),) if i % 2 else ())


# -- the seam -------------------------------------------------------------------------------------------------------


def test_tcp_link_implements_the_seam():
    a, b, srv = local_pair()
    try:
        fmt = StreamFormat(16, 8, "rgba8")
        assert isinstance(a, Link) and isinstance(b, Link)
        assert isinstance(a.open_writer(0, fmt), StreamWriter)
        assert isinstance(b.open_reader(0, fmt), StreamReader)
        assert a.peer_label == "cli" and b.peer_label == "srv" and a.alive and b.alive
    finally:
        a.close(), b.close(), srv.close()


def test_control_messages_in_order_and_bounded():
    a, b, srv = local_pair()
    try:
        for i in range(200):
            a.send({"op": "n", "i": i, "blob": b"x" * (i * 50)})
        got: list[dict] = []
        deadline = time.monotonic() + 10
        while len(got) < 200 and time.monotonic() < deadline:
            b.wait(0.1)
            got += b.receive()
        assert [m["i"] for m in got] == list(range(200))
        with pytest.raises(ValueError, match="at most"):
            a.send({"blob": b"x" * (C.MAX_MESSAGE + 1)})
        with pytest.raises(ValueError):
            a.send(["not", "a", "dict"])  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            a.open_writer(MAX_STREAMS, StreamFormat(4, 4, "rgba8"))
    finally:
        a.close(), b.close(), srv.close()


def test_control_after_commit_arrives_after_that_frame():
    """The ordering rule keyed-mutex transfers rely on: a control message sent after commit() of frame N arrives
    after a frame >= N of that stream."""
    a, b, srv = local_pair()
    try:
        fmt = StreamFormat(256, 128, "rgba8")
        w = a.open_writer(3, fmt)
        r = b.open_reader(3, fmt)
        time.sleep(0.2)  # the reader's keyframe request reaches the writer first
        for i in range(1, 60):
            w.begin()[:] = i
            w.commit(FrameMeta(i))
            a.send({"after": i})
        seen = 0
        deadline = time.monotonic() + 10
        while seen < 59 and time.monotonic() < deadline:
            b.wait(0.05)
            for m in b.receive():
                got = r.read(lambda v, meta: meta.frame, 0)
                assert got is not None and got >= m["after"], (got, m)
                seen = m["after"]
        assert seen == 59
    finally:
        a.close(), b.close(), srv.close()


# -- frames through another process -------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["raw", "lz4", "zstd"])
def test_frames_pixel_exact_through_a_peer_process(peers, codec):
    if codec not in CODECS:
        pytest.skip(f"codec {codec} needs its Python package (lz4 / zstandard)")
    ep = TcpEndpoint("serve", "127.0.0.1", 0, label="test", codecs=(codec,))
    peer = peers("join", "--port", str(ep.port), "--codec", codec)
    link = establish(ep)
    try:
        assert link.codec == codec and link.peer_label == "peer"
        fmt = StreamFormat(320, 200, "rgba8")
        w, r = open_echo(link, 0, fmt)
        for i, frame, damage in ui_frames(fmt, 40):
            w.begin()[:] = frame
            w.commit(FrameMeta(i, 1000 + i, damage, b"u%d" % i))
            pixels, meta = read_frame(link, r, i - 1)
            assert meta.frame == i and meta.timestamp_ns == 1000 + i and meta.user_data == b"u%d" % i
            np.testing.assert_array_equal(pixels, frame)
        # a static frame costs a marker, not a frame
        before = link.stats().bytes_out
        for i in range(41, 61):
            w.begin()[:] = frame
            w.commit(FrameMeta(i))
            pixels, meta = read_frame(link, r, i - 1)
            np.testing.assert_array_equal(pixels, frame)
        assert link.stats().bytes_out - before < 20 * 200
        link.send({"op": "echo", "x": [1, 2, 3]})
        deadline = time.monotonic() + 10
        while not (ms := [m for m in link.receive() if m.get("op") == "echoed"]):
            assert time.monotonic() < deadline
            link.wait(0.05)
        assert ms[0]["x"] == [1, 2, 3]
    finally:
        link.close(), ep.close()
    assert peer.wait_line("DEAD")


def test_drive_from_a_peer_process(peers):
    """The other direction: the peer process sends and checks; this end echoes through the engine-like loop."""
    a = peers("serve", "--label", "echoer")
    b = peers("join", "--port", str(a.port()), "--drive", "30", "--label", "driver")
    assert b.wait_line("VERIFIED", timeout=60) == "VERIFIED 30"


# -- authentication -------------------------------------------------------------------------------------------------


def test_shared_secret_round_trip_and_wrong_secret_refused_both_ways(peers):
    # the joining end has the wrong secret: the server refuses it
    srv = peers("serve", "--secret", SECRET)
    with pytest.raises(BridgeAuthError, match="refused"):
        TcpEndpoint("join", "127.0.0.1", srv.port(), secret="not the right secret!").establish(10)
    assert "did not prove" in srv.wait_line("ERRORS")
    # the serving end has the wrong secret (an impostor): the joining end refuses it
    ep = TcpEndpoint("serve", "127.0.0.1", 0, secret="an impostor's secret")
    joiner = peers("join", "--port", str(ep.port), "--secret", SECRET)
    assert ep.establish(5) is None
    assert "did not prove" in ep.errors[-1]  # it proves first, the impostor refuses it...
    assert "refused" in joiner.wait_line("AUTH")  # ...and learns nothing it could check a guess against
    ep.close()
    # a hostile server that skips checking and answers with a made-up proof: the joining end refuses it
    fake = socket.create_server(("127.0.0.1", 0))

    def fake_server():
        c, _ = fake.accept()
        hello = raw_hello(c, auth=True)
        assert hello["auth"] is True
        raw_recv(c)  # the joining end's proof
        c.sendall(C.header(C.AUTH, 32) + os.urandom(32))
        try:
            kind, payload = raw_recv(c)
            fake_result.append(kind)
        finally:
            c.close()

    fake_result: list[int] = []
    t = threading.Thread(target=fake_server, daemon=True)
    t.start()
    with pytest.raises(BridgeAuthError, match="did not prove"):
        TcpEndpoint("join", "127.0.0.1", fake.getsockname()[1], secret=SECRET).establish(10)
    t.join(10)
    fake.close()
    assert fake_result == [C.REFUSE]
    # one end without a secret at all
    ep = TcpEndpoint("join", "127.0.0.1", srv.port())
    with pytest.raises(BridgeAuthError, match="secret"):
        ep.establish(10)
    # the right secret
    link = establish(TcpEndpoint("join", "127.0.0.1", srv.port(), secret=SECRET))
    try:
        fmt = StreamFormat(64, 32, "rgba8")
        w, r = open_echo(link, 1, fmt)
        w.begin()[:] = 7
        w.commit(FrameMeta(1))
        assert (read_frame(link, r, 0)[0] == 7).all()
    finally:
        link.close()


def test_the_secret_never_crosses_the_wire():
    captured = bytearray()
    a, b, srv = local_pair(secret=SECRET)
    a.close(), b.close(), srv.close()
    # a handshake captured by a relay: neither the secret nor anything long of it appears
    srv = TcpEndpoint("serve", "127.0.0.1", 0, secret=SECRET)
    relay = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def pump(src, dst):
        while not stop.is_set():
            try:
                data = src.recv(65536)
            except OSError:
                return
            if not data:
                return
            captured.extend(data)
            dst.sendall(data)

    def serve_relay():
        c, _ = relay.accept()
        s = socket.create_connection(("127.0.0.1", srv.port))
        threading.Thread(target=pump, args=(c, s), daemon=True).start()
        threading.Thread(target=pump, args=(s, c), daemon=True).start()

    threading.Thread(target=serve_relay, daemon=True).start()
    got: dict = {}
    t = threading.Thread(target=lambda: got.setdefault("s", srv.establish(10)))
    t.start()
    link = establish(TcpEndpoint("join", "127.0.0.1", relay.getsockname()[1], secret=SECRET))
    t.join()
    link.close(), got["s"].close(), srv.close(), relay.close()
    stop.set()
    assert len(captured) > 100
    assert SECRET.encode()[:8] not in captured and SECRET.encode()[-8:] not in captured


@pytest.mark.parametrize("host", ["0.0.0.0", "", "::"])
def test_serving_beyond_loopback_needs_a_secret(host):
    with pytest.raises(BridgeError, match="without a shared secret"):
        TcpEndpoint("serve", host, 0)
    with pytest.raises(BridgeError, match="at least"):
        TcpEndpoint("serve", "127.0.0.1", 0, secret="short")


# -- codecs, deltas --------------------------------------------------------------------------------------------------


def test_codec_costs_ui_frame_and_static_frame():
    """Damage + lz4 on a UI-like 1080p frame with one small rectangle changed costs < 1 % of its raw bytes; an
    unchanged frame costs a marker."""
    if "lz4" not in CODECS:
        pytest.skip("needs lz4")
    a, b, srv = local_pair(("lz4",))
    try:
        fmt = StreamFormat(1920, 1080, "rgba8")
        w = a.open_writer(0, fmt)
        r = b.open_reader(0, fmt)
        time.sleep(0.2)
        frames = ui_frames(fmt, 8)
        _, frame, _ = next(frames)
        w.begin()[:] = frame
        w.commit(FrameMeta(1))
        read_frame(b, r, 0)
        for i, frame, damage in frames:
            before = a.stats().bytes_out
            w.begin()[:] = frame
            w.commit(FrameMeta(i, damage=damage))
            pixels, _ = read_frame(b, r, i - 1)
            np.testing.assert_array_equal(pixels, frame)
            assert a.stats().bytes_out - before < fmt.nbytes / 100
        before = a.stats().bytes_out
        w.begin()[:] = frame
        w.commit(FrameMeta(100))
        read_frame(b, r, 99)
        assert a.stats().bytes_out - before < 100
    finally:
        a.close(), b.close(), srv.close()


def test_reader_joining_late_gets_a_keyframe():
    a, b, srv = local_pair(("lz4",))
    try:
        fmt = StreamFormat(64, 64, "rgba8")
        w = a.open_writer(5, fmt)
        for i, frame, damage in ui_frames(fmt, 10):
            w.begin()[:] = frame
            w.commit(FrameMeta(i, damage=damage))
        time.sleep(0.3)  # all sent as deltas, before any reader exists: skipped on the far side
        r = b.open_reader(5, fmt)
        pixels, meta = read_frame(b, r, 0)
        assert meta.frame == 10
        np.testing.assert_array_equal(pixels, frame)
        r.close()
        r = b.open_reader(5, fmt)  # and again after a reopen: a fresh reader has no base for deltas
        pixels, meta = read_frame(b, r, 0)
        np.testing.assert_array_equal(pixels, frame)
    finally:
        a.close(), b.close(), srv.close()


def test_other_geometry_is_skipped_not_fatal():
    """Frames encoded for another format (a resize in flight) are skipped, the link lives on."""
    a, b, srv = local_pair(("lz4",))
    try:
        w = a.open_writer(0, StreamFormat(32, 32, "rgba8"))
        r = b.open_reader(0, StreamFormat(64, 64, "rgba8"))
        w.begin()[:] = 1
        w.commit(FrameMeta(1))
        time.sleep(0.3)
        assert r.read(lambda v, m: m, 0) is None and b.alive
        w = a.open_writer(0, StreamFormat(64, 64, "rgba8"))
        w.begin()[:] = 2
        w.commit(FrameMeta(2))
        assert (read_frame(b, r, 0)[0] == 2).all()
    finally:
        a.close(), b.close(), srv.close()


def test_writer_misuse_is_a_clear_error():
    a, b, srv = local_pair()
    try:
        fmt = StreamFormat(16, 16, "rgba8")
        w = a.open_writer(0, fmt)
        with pytest.raises(ValueError, match="without begin"):
            w.commit(FrameMeta(1))
        w.begin()
        with pytest.raises(ValueError, match="outside"):
            w.commit(FrameMeta(1, damage=((10, 10, 10, 10),)))
        w.abort()
        w.close()
        with pytest.raises(BridgeError, match="closed"):
            w.begin()
    finally:
        a.close(), b.close(), srv.close()
    with pytest.raises(BridgeError):
        a.send({"x": 1})
    with pytest.raises(BridgeError):
        b.receive()


def test_backoff_doubles_to_its_cap_and_resets():
    b = Backoff(0.05, 0.4)
    delays = [b.next() for _ in range(6)]
    assert 0.04 <= delays[0] <= 0.06 and all(d <= 0.4 * 1.2 for d in delays) and delays[-1] >= 0.4 * 0.8
    b.reset()
    assert b.next() <= 0.06
