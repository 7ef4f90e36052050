"""The TCP bridge transport (bridge/_tcp.py, bridge/_codec.py) with real sockets and real peer processes.

The peer program is tests/_bridge_tcp_peer.py: it echoes every frame it reads back on the same stream number, so a
round trip through another process checks encoding both ways, pixel by pixel.
"""

from __future__ import annotations

import os
import shutil
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
from hypothesis import given, settings
from hypothesis import strategies as st

from texbridge.bridge import _codec as C
from texbridge.bridge._link import (
    MAX_STREAMS,
    PEER_TIMEOUT_S,
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
        self.seen: dict[str, float] = {}  # first word of a line -> when the first such line arrived
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.out), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.err), daemon=True).start()

    def _pump(self, stream, into: list[str]) -> None:
        for line in stream:
            self.seen.setdefault(line.split(" ")[0].strip(), time.monotonic())
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


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def collect(sock: socket.socket, seconds: float) -> list[tuple[int, bytes]]:
    """Messages other than heartbeats that arrive within `seconds`, while sending heartbeats of our own."""
    got: list[tuple[int, bytes]] = []
    end = time.monotonic() + seconds
    sock.settimeout(0.1)
    while time.monotonic() < end:
        sock.sendall(C.header(C.PING, 0))
        try:
            kind, body = raw_recv(sock)
        except (TimeoutError, socket.timeout):
            continue
        if kind != C.PING:
            got.append((kind, body))
    return got


def test_flow_control_window_keeps_only_the_newest_frame_waiting():
    """A peer that does not acknowledge gets at most WINDOW frames of a stream; later commits replace each other in
    the pending slot (drops), and each acknowledgement lets exactly the newest one go. Control messages do not wait."""
    sock, link, srv = hostile_link()
    try:
        w = link.open_writer(0, SMALL)
        for i in range(1, 11):
            w.begin()[:] = i
            w.commit(FrameMeta(i))
            wait_until(lambda: not w.waiting, 0.2 if i <= 2 else 0.02)  # 1 and 2 leave; 3 then stays: window full
            sock.sendall(C.header(C.PING, 0))
        link.send({"still": "flows"})
        got = collect(sock, 0.5)
        frames = [C.FRAME_HDR.unpack_from(body)[1] for kind, body in got if kind == C.FRAME]
        assert frames == [1, 2] and any(kind == C.CTRL for kind, _ in got)
        assert link.stats().drops == 7  # 3..9 replaced while 10 waits
        sock.sendall(C.header(C.ACK, 8) + C.ACK_BODY.pack(0, 1))
        got = collect(sock, 0.5)
        assert [C.FRAME_HDR.unpack_from(body)[1] for kind, body in got if kind == C.FRAME] == [10]
        assert link.alive
    finally:
        sock.close(), link.close(), srv.close()


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


def test_a_reflecting_server_is_refused():
    """A server without the secret that copies the joiner's nonce into its own HELLO and sends the joiner's proof
    back as its own: refused (the nonce replay is caught, and the role letter in each proof differs anyway)."""
    fake = socket.create_server(("127.0.0.1", 0))
    result: list = []

    def reflect():
        c, _ = fake.accept()
        try:
            kind, body = raw_recv(c)
            hello = msgpack.unpackb(body)
            mine = msgpack.packb({**hello, "label": "mirror"})
            c.sendall(C.header(C.HELLO, len(mine)) + mine)
            kind, proof = raw_recv(c)
            c.sendall(C.header(C.AUTH, len(proof)) + proof)
            result.append(raw_recv(c)[0])
        except (AssertionError, OSError) as e:  # the joiner hung up on us
            result.append(str(e))
        finally:
            c.close()

    t = threading.Thread(target=reflect, daemon=True)
    t.start()
    with pytest.raises(BridgeAuthError, match="replayed|did not prove"):
        TcpEndpoint("join", "127.0.0.1", fake.getsockname()[1], secret=SECRET).establish(10)
    t.join(10)
    fake.close()
    assert result and result[0] != C.READY


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


def test_each_end_sends_with_its_own_preferred_codec():
    """Preferences are per sending end; each decodes whatever it has. An IPv6 loopback works like IPv4."""
    if not {"lz4", "zstd"} <= set(CODECS):
        pytest.skip("needs lz4 and zstandard")
    host = "::1" if socket.has_ipv6 else "127.0.0.1"
    try:
        srv = TcpEndpoint("serve", host, 0, codecs=("zstd",))
    except BridgeError:
        srv = TcpEndpoint("serve", host := "127.0.0.1", 0, codecs=("zstd",))
    got: dict = {}
    t = threading.Thread(target=lambda: got.setdefault("s", srv.establish(10)))
    t.start()
    b = establish(TcpEndpoint("join", host, srv.port, codecs=("lz4",)))
    t.join()
    a = got["s"]
    try:
        assert (a.codec, b.codec) == ("zstd", "lz4")
        fmt = StreamFormat(100, 50, "rgba8")
        wa, rb = a.open_writer(0, fmt), b.open_reader(0, fmt)
        wb, ra = b.open_writer(0, fmt), a.open_reader(0, fmt)
        time.sleep(0.2)
        for i, frame, damage in ui_frames(fmt, 6):
            for w, r, link in ((wa, rb, b), (wb, ra, a)):
                w.begin()[:] = frame
                w.commit(FrameMeta(i, damage=damage))
                np.testing.assert_array_equal(read_frame(link, r, i - 1)[0], frame)
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


# -- TLS -------------------------------------------------------------------------------------------------------------


@pytest.fixture
def cert(tmp_path):
    """A self-signed certificate for localhost/127.0.0.1, made with the openssl CLI (as docs/bridge-tcp.md says)."""
    if not shutil.which("openssl"):
        pytest.skip("needs the openssl command to make a test certificate")
    key, crt = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-days", "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(crt)], check=True, capture_output=True)
    return crt, key


def test_tls_round_trip_with_a_secret(peers, cert, tmp_path):
    crt, key = cert
    srv = peers("serve", "--secret", SECRET, "--tls-cert", str(crt), "--tls-key", str(key))
    port = srv.port()
    link = establish(TcpEndpoint("join", "127.0.0.1", port, secret=SECRET,
                                 tls=TlsOptions(ca=str(crt), server_name="localhost")))
    try:
        fmt = StreamFormat(640, 360, "rgba8")
        w, r = open_echo(link, 2, fmt)
        for i, frame, damage in ui_frames(fmt, 10):
            w.begin()[:] = frame
            w.commit(FrameMeta(i, damage=damage))
            np.testing.assert_array_equal(read_frame(link, r, i - 1)[0], frame)
        big = np.random.default_rng(3).integers(0, 256, (fmt.height, fmt.row_bytes), dtype=np.uint8)
        w.begin()[:] = big  # incompressible: many TLS records
        w.commit(FrameMeta(11))
        np.testing.assert_array_equal(read_frame(link, r, 10)[0], big)
    finally:
        link.close()
    # a client that does not trust the certificate refuses the server
    other_crt, other_key = tmp_path / "other.pem", tmp_path / "other-key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-days", "2", "-subj", "/CN=localhost", "-keyout", str(other_key), "-out", str(other_crt)],
                   check=True, capture_output=True)
    with pytest.raises(BridgeAuthError, match="TLS"):
        TcpEndpoint("join", "127.0.0.1", port, secret=SECRET, tls=TlsOptions(ca=str(other_crt))).establish(10)
    # and a plain client cannot talk to a TLS server
    assert TcpEndpoint("join", "127.0.0.1", port, secret=SECRET).establish(1.0) is None


# -- liveness, reconnect, slow receivers ----------------------------------------------------------------------------


def wait_dead(link: TcpLink, timeout: float) -> float:
    """Seconds until the link reports itself dead (receive() raises), polling as the engine does."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            link.receive()
        except BridgeError:
            return time.monotonic() - t0
        link.wait(0.02)
    raise AssertionError(f"link still alive after {timeout} s")


@pytest.mark.parametrize("role", ["serve", "join"])
def test_kill_9_of_the_peer_is_noticed_and_a_restarted_peer_reconnects(peers, role):
    """kill -9 of either end: this end notices within 1.5 s; a restarted peer is linked again within 2 s."""
    if role == "serve":  # this end serves, the peer joins
        ep = TcpEndpoint("serve", "127.0.0.1", 0, label="test")
        args = ("join", "--port", str(ep.port))
    else:  # the peer serves on a fixed port, this end joins
        probe = socket.create_server(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        args = ("serve", "--port", str(port))
        ep = TcpEndpoint("join", "127.0.0.1", port, label="test")
    peer = peers(*args)
    link = establish(ep)
    try:
        peer.wait_line("LINKED")
        os.kill(peer.proc.pid, signal.SIGKILL)
        assert wait_dead(link, 5.0) < 1.5
    finally:
        link.close()
    peer.proc.wait(10)
    peer = peers(*args)
    if role == "join":
        peer.port()  # listening again
    t0 = time.monotonic()
    backoff = Backoff()
    while (link := ep.establish(0.25)) is None:
        assert time.monotonic() - t0 < 20, ep.errors
        time.sleep(backoff.next())
    took = time.monotonic() - peer.seen["STARTED"]  # from the restarted peer being up (Python start-up aside)
    try:
        fmt = StreamFormat(32, 32, "rgba8")
        w, r = open_echo(link, 0, fmt)
        w.begin()[:] = 9
        w.commit(FrameMeta(1))
        assert (read_frame(link, r, 0)[0] == 9).all()
    finally:
        link.close(), ep.close()
    assert took < 2.0, f"reconnected after {took:.2f} s"


def test_a_stopped_peer_is_declared_dead_by_silence(peers):
    """No FIN, no RST (a frozen peer or a cut cable): heartbeats stop, the link dies after PEER_TIMEOUT_S."""
    ep = TcpEndpoint("serve", "127.0.0.1", 0)
    peer = peers("join", "--port", str(ep.port))
    link = establish(ep)
    try:
        peer.wait_line("LINKED")
        time.sleep(2 * PEER_TIMEOUT_S)
        assert link.alive  # heartbeats keep an idle link alive
        os.kill(peer.proc.pid, signal.SIGSTOP)
        took = wait_dead(link, 5.0)
        assert 0.7 < took < 3.0  # silence began at the last heartbeat, up to HEARTBEAT_S before the stop
        assert "silent" in link.stats().errors[-1]
    finally:
        os.kill(peer.proc.pid, signal.SIGCONT)
        link.close(), ep.close()


def test_slow_receiver_never_blocks_the_sender_newest_frame_wins(peers):
    """A peer that reads slowly (and one that reads nothing at all): commit() never waits for the socket; frames in
    between are dropped and counted; the newest frame still arrives pixel-exact."""
    ep = TcpEndpoint("serve", "127.0.0.1", 0, codecs=("raw",))
    peer = peers("join", "--port", str(ep.port), "--slow", "0.2", "--codec", "raw")
    link = establish(ep)
    try:
        fmt = StreamFormat(1920, 1080, "rgba8")
        w, r = open_echo(link, 0, fmt)
        rng = np.random.default_rng(5)
        frame = rng.integers(0, 256, (fmt.height, fmt.row_bytes), dtype=np.uint8)
        worst = 0.0
        t0 = time.monotonic()
        n = 0
        while time.monotonic() - t0 < 1.5:
            n += 1
            buf = w.begin()
            buf[:] = frame
            buf[0, :8] = np.frombuffer(n.to_bytes(8, "little"), np.uint8)
            c0 = time.monotonic()
            w.commit(FrameMeta(n))
            worst = max(worst, time.monotonic() - c0)
        assert n > 30  # hundreds of MB offered to a peer that takes ~5 frames a second
        assert link.stats().drops > 0
        last = buf.copy()
        deadline = time.monotonic() + 10
        while (got := r.read(lambda v, m: (v.copy(), m), 0)) is None or got[1].frame != n:
            assert time.monotonic() < deadline, "the newest frame never came back"
            link.wait(0.05)
        np.testing.assert_array_equal(got[0], last)
        # a peer that reads nothing (stopped): commits still return at once
        os.kill(peer.proc.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            for i in range(n + 1, n + 40):
                w.begin()[:] = frame
                w.commit(FrameMeta(i))
            assert time.monotonic() - t0 < 2.0
        finally:
            os.kill(peer.proc.pid, signal.SIGCONT)
        assert worst < 0.5, f"a commit took {worst:.3f} s"
    finally:
        link.close(), ep.close()


# -- hostile peers ---------------------------------------------------------------------------------------------------


def hostile_link(**kw) -> tuple[socket.socket, TcpLink, TcpEndpoint]:
    """A raw socket that finished the handshake (no secret) and the real link on the other side, with readers on
    stream 0 (64x48) and 1 (1920x1080)."""
    srv = TcpEndpoint("serve", "127.0.0.1", 0, codecs=("lz4", "zstd", "raw"), **kw)
    got: dict = {}
    t = threading.Thread(target=lambda: got.setdefault("s", srv.establish(10)))
    t.start()
    sock = socket.create_connection(("127.0.0.1", srv.port))
    raw_hello(sock)
    t.join()
    link = got["s"]
    assert link is not None
    link.open_reader(0, StreamFormat(64, 48, "rgba8"))
    link.open_reader(1, StreamFormat(1920, 1080, "rgba8"))
    return sock, link, srv


def frame_msg(stream=0, frame=1, tag=None, codec=C.RAW, kind=C.KEY, rects=(), user=b"", payload=b"",
              length=None, n_damage=None, fmt=StreamFormat(64, 48, "rgba8")) -> bytes:
    sub = C.FRAME_HDR.pack(stream, frame, 0, C.fmt_tag(fmt) if tag is None else tag, codec, kind,
                           len(rects) if n_damage is None else n_damage, len(user))
    body = sub + b"".join(C.RECT.pack(*r) for r in rects) + user + payload
    return C.header(C.FRAME, len(body) if length is None else length) + body


SMALL = StreamFormat(64, 48, "rgba8")
BIG = StreamFormat(1920, 1080, "rgba8")


def _bombs() -> dict[str, bytes]:
    import lz4.block
    import zstandard

    zeros = bytes(64 << 20)
    # a zstd frame that claims 1 TiB of content (single segment, 8-byte size) around a 5-byte raw block
    forged = b"\x28\xb5\x2f\xfd\xe0" + (1 << 40).to_bytes(8, "little") + (1 | 5 << 3).to_bytes(3, "little") + b"hello"
    return {
        "lz4 of 64 MiB for a 12 KiB frame": lz4.block.compress(zeros, store_size=False),
        "zstd of 64 MiB for a 12 KiB frame": zstandard.ZstdCompressor(level=1).compress(zeros),
        "zstd without a content size": zstandard.ZstdCompressor(level=1, write_content_size=False).compress(zeros),
        "zstd claiming 1 TiB": forged,
        "lz4 one byte short": lz4.block.compress(bytes(SMALL.nbytes - 1), store_size=False),
        "zstd one byte short": zstandard.ZstdCompressor(level=1).compress(bytes(SMALL.nbytes - 1)),
    }

HOSTILE = {
    "unknown message type": C.header(99, 0),
    "control message over its bound": C.header(C.CTRL, C.MAX_MESSAGE + 1) + b"\x80" * 64,
    "control message not a map": C.header(C.CTRL, 3) + msgpack.packb([1, 2]),
    "control message garbage": C.header(C.CTRL, 4) + b"\xc1\xc1\xc1\xc1",
    "deeply nested control message": C.header(C.CTRL, 20001) + b"\x91" * 20000 + b"\xc0",
    "hello after the handshake": C.header(C.HELLO, 1) + b"\x80",
    "ping with a body": C.header(C.PING, 4) + b"abcd",
    "resync of stream 10**9": C.header(C.RESYNC, 4) + (10**9).to_bytes(4, "little"),
    "frame shorter than its header": C.header(C.FRAME, 3) + b"abc",
    "stream out of range": frame_msg(stream=MAX_STREAMS, payload=bytes(SMALL.nbytes)),
    "unknown codec": frame_msg(codec=9),
    "unknown kind": frame_msg(kind=9),
    "too many damage rectangles": frame_msg(n_damage=65535),
    "damage counts beyond the message": frame_msg(n_damage=3, length=C.FRAME_HDR.size + 8),
    "rectangle outside the frame": frame_msg(kind=C.RECTS, rects=((60, 40, 10, 10),), payload=b"x"),
    "empty rectangle": frame_msg(kind=C.RECTS, rects=((0, 0, 0, 5),), payload=b"x"),
    "raw frame one byte short": frame_msg(payload=bytes(SMALL.nbytes - 1)),
    "payload beyond any compressed bound": frame_msg(codec=C.LZ4, length=(1 << 32) - 1),
    "lz4 garbage": frame_msg(codec=C.LZ4, payload=b"\xff" * 100),
    "zstd garbage": frame_msg(codec=C.ZSTD, payload=b"\x28\xb5\x2f\xfd" + b"\xff" * 100),
    "same-frame marker with a payload": frame_msg(kind=C.SAME, payload=b"x"),
    "damage frame without rectangles": frame_msg(kind=C.RECTS, payload=b"x"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE) + ["bomb: " + k for k in
                                                    ("lz4 of 64 MiB for a 12 KiB frame",
                                                     "zstd of 64 MiB for a 12 KiB frame",
                                                     "zstd without a content size", "zstd claiming 1 TiB",
                                                     "lz4 one byte short", "zstd one byte short")])
def test_a_hostile_message_costs_the_peer_its_link(name):
    if name.startswith("bomb: "):
        if not {"lz4", "zstd"} <= set(CODECS):
            pytest.skip("needs lz4 and zstandard")
        data = frame_msg(codec=C.ZSTD if "zstd" in name else C.LZ4, payload=_bombs()[name[6:]])
    else:
        data = HOSTILE[name]
    sock, link, srv = hostile_link()
    try:
        sock.sendall(data)
        with pytest.raises(BridgePeerError):
            wait_dead(link, 5.0)
            link.receive()
        assert link.stats().errors
        sock.settimeout(5)
        while sock.recv(65536):  # and the connection is closed on it
            pass
    finally:
        sock.close(), link.close(), srv.close()


def test_a_zstd_bomb_costs_no_memory():
    """1 GiB of zeros in ~40 KB of zstd, announced as such, for an 8 MB frame: refused before decompressing (the
    peak memory of this process does not move by anything near it)."""
    if "zstd" not in CODECS:
        pytest.skip("needs zstandard")
    import resource

    import zstandard

    c = zstandard.ZstdCompressor(level=1).compressobj(size=1 << 30)
    chunk = bytes(1 << 20)
    bomb = b"".join(c.compress(chunk) for _ in range(1024)) + c.flush()
    assert zstandard.frame_content_size(bomb) == 1 << 30 and len(bomb) < 1 << 20
    sock, link, srv = hostile_link()
    try:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        sock.sendall(frame_msg(stream=1, fmt=BIG, codec=C.ZSTD, payload=bomb))  # fits the 1080p bound
        with pytest.raises(BridgePeerError, match="announces"):
            wait_dead(link, 10.0)
            link.receive()
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 256 * 1024  # KiB
    finally:
        sock.close(), link.close(), srv.close()


def test_damage_of_replaced_frames_is_united():
    """Frames replaced while pending never reach the peer, so the one sent carries the union of their damage."""
    sock, link, srv = hostile_link()
    try:
        w = link.open_writer(0, SMALL)
        for i in (1, 2):  # fill the window (never acknowledged)
            w.begin()[:] = i
            w.commit(FrameMeta(i))
            wait_until(lambda: not w.waiting, 1.0)
        w.begin()[:] = 2
        w.commit(FrameMeta(3, damage=((1, 1, 2, 2),)))
        w.begin()[:] = 2
        w.commit(FrameMeta(4, damage=((10, 20, 3, 4),)))
        sock.sendall(C.header(C.ACK, 8) + C.ACK_BODY.pack(0, 1))
        frames = [body for kind, body in collect(sock, 0.5) if kind == C.FRAME]
        *_, n_damage, _ = C.FRAME_HDR.unpack_from(frames[-1])
        rects = [C.RECT.unpack_from(frames[-1], C.FRAME_HDR.size + 16 * k) for k in range(n_damage)]
        assert C.FRAME_HDR.unpack_from(frames[-1])[1] == 4 and sorted(rects) == [(1, 1, 2, 2), (10, 20, 3, 4)]
    finally:
        sock.close(), link.close(), srv.close()


def test_valid_hand_made_frames_are_decoded():
    """The hostile tests' frame builder makes frames the decoder accepts when they are right (a control run)."""
    sock, link, srv = hostile_link()
    try:
        r = link.open_reader(0, SMALL)
        time.sleep(0.1)
        sock.sendall(frame_msg(payload=bytes(range(256)) * (SMALL.nbytes // 256)))
        read_frame(link, r, 0)
        sock.sendall(frame_msg(frame=2, kind=C.RECTS, rects=((1, 2, 3, 4),), payload=b"\x07" * 48))
        pixels, meta = read_frame(link, r, 1)
        assert meta.frame == 2 and meta.damage == ((1, 2, 3, 4),)
        assert (pixels[2:6, 4:16] == 7).all() and pixels[0, 5] == 5
        sock.sendall(frame_msg(frame=3, kind=C.SAME) + frame_msg(frame=4, kind=C.RECTS, rects=((0, 0, 1, 1),),
                                                                  payload=b"\x09" * 4))
        pixels, meta = read_frame(link, r, 3)  # damage of unread frames adds up: 3 changed nothing, 4 one pixel
        assert meta.frame == 4 and meta.damage == ((0, 0, 1, 1),) and (pixels[0, :4] == 9).all()
        assert link.alive
    finally:
        sock.close(), link.close(), srv.close()


def _vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


class Msg(bytes):
    """Bytes with a short repr: hypothesis prints failing examples, some are megabytes."""

    def __repr__(self) -> str:
        return f"Msg({bytes(self[:24])!r}... {len(self)} bytes)"


_COMPRESSED: dict[tuple[int, int], bytes] = {}


def _compressed_zeros(codec: int, size: int) -> bytes:
    if (codec, size) not in _COMPRESSED:
        import lz4.block
        import zstandard

        fill = bytes(size)
        _COMPRESSED[codec, size] = (lz4.block.compress(fill, store_size=False) if codec == C.LZ4
                                    else zstandard.ZstdCompressor(level=1).compress(fill))
    return _COMPRESSED[codec, size]


@st.composite
def hostile_messages(draw) -> bytes:
    return Msg(draw(_hostile_message()))


@st.composite
def _hostile_message(draw) -> bytes:
    """One message from a peer that may lie about anything: types, lengths, counts, codecs, rectangles, sizes."""
    choice = draw(st.integers(0, 5))
    if choice == 0:  # noise
        return draw(st.binary(max_size=64))
    if choice == 1:  # any type, any length, a short body
        return C.header(draw(st.integers(0, 255)), draw(st.integers(0, 2**32 - 1))) + draw(st.binary(max_size=64))
    if choice == 2:  # a control message of any bytes
        body = draw(st.one_of(st.binary(max_size=200), st.builds(msgpack.packb, st.recursive(
            st.none() | st.integers(-2**63, 2**64 - 1) | st.text(max_size=8) | st.binary(max_size=8),
            lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=4), c, max_size=4), max_leaves=20))))
        return C.header(C.CTRL, draw(st.sampled_from([len(body), len(body) + 1, max(0, len(body) - 1)]))) + body
    if choice == 3:
        if draw(st.booleans()):
            return C.header(C.ACK, 8) + C.ACK_BODY.pack(draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**32 - 1)))
        return C.header(C.RESYNC, 4) + draw(st.integers(0, 2**32 - 1)).to_bytes(4, "little")
    fmt = draw(st.sampled_from([SMALL, BIG]))
    stream = draw(st.sampled_from([0, 1, 2, MAX_STREAMS, 2**32 - 1]))
    codec = draw(st.sampled_from([C.RAW, C.LZ4, C.ZSTD, 3, 255]))
    kind = draw(st.sampled_from([C.KEY, C.XOR, C.RECTS, C.SAME, 4, 255]))
    rects = draw(st.lists(st.tuples(*[st.sampled_from([0, 1, 8, 47, 63, 64, 1919, 2**32 - 1])] * 4), max_size=3))
    user = draw(st.binary(max_size=16))
    if choice == 4 and {"lz4", "zstd"} <= set(CODECS):
        size = draw(st.sampled_from([0, 1, fmt.nbytes - 1, fmt.nbytes, fmt.nbytes + 1, 64 << 20]))
        payload = (_compressed_zeros(codec, size) if codec in (C.LZ4, C.ZSTD) else draw(st.binary(max_size=256)))
    else:
        payload = draw(st.one_of(st.binary(max_size=256), st.just(bytes(fmt.nbytes))))
    body = (C.FRAME_HDR.pack(stream, draw(st.integers(0, 2**64 - 1)), 0, draw(st.sampled_from([C.fmt_tag(fmt), 0])),
                             codec, kind, draw(st.sampled_from([len(rects), 0, 64, 65535])), len(user))
            + b"".join(C.RECT.pack(*r) for r in rects) + user + payload)
    length = draw(st.sampled_from([len(body), len(body) + 7, max(0, len(body) - 5), 2**32 - 1]))
    return C.header(C.FRAME, length) + body


def test_hostile_peer_fuzzer_never_crashes_hangs_or_grows_memory(peers):
    """Sequences of hostile messages against a peer process with decoders open (a 1080p one among them): every
    session ends in a BridgePeerError or a clean close, the process lives on, answers the next peer, and its peak
    memory stays within a few frames."""
    target = peers("serve", "--fuzz-target", prefix=["prlimit", f"--as={3 << 30}", "--"]
                   if shutil.which("prlimit") else None)
    port = target.port()
    sessions = 0

    @settings(max_examples=120, deadline=None)
    @given(st.lists(hostile_messages(), min_size=1, max_size=6))
    def fuzz(messages):
        nonlocal sessions
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            raw_hello(sock)
            try:
                sock.sendall(b"".join(messages))
                sock.shutdown(socket.SHUT_WR)
                while sock.recv(1 << 16):  # the peer must close its end: no hang on any input
                    pass
            except (ConnectionResetError, BrokenPipeError):
                pass  # the peer hung up on us mid-send: what it should do
        finally:
            sock.close()
        sessions += 1
        deadline = time.monotonic() + 10
        while sum(line.startswith("DEAD") for line in target.out) < sessions:
            assert time.monotonic() < deadline, target.out[-5:]
            time.sleep(0.01)
        assert target.proc.poll() is None

    fuzz()
    deaths = [line for line in target.out if line.startswith("DEAD")]
    assert len(deaths) == sessions >= 100
    for line in deaths:  # a peer error, or the hostile peer hanging up; never a failure of our own code
        assert line.startswith("DEAD BridgePeerError") or "closed the connection" in line, line
    assert any(line.startswith("DEAD BridgePeerError") for line in deaths)
    assert _vm_hwm_kib(target.proc.pid) < 400 * 1024, "peak memory beyond a few 1080p frames"
    # and it still serves an honest peer
    link = establish(TcpEndpoint("join", "127.0.0.1", port))
    link.close()


@settings(max_examples=40, deadline=None)
@given(codec=st.sampled_from(CODECS), steps=st.lists(st.tuples(
    st.sampled_from(["rect", "rect-no-damage", "same", "noise", "key-request", "skip"]),
    st.integers(0, 2**31)), min_size=1, max_size=25))
def test_deltas_reconstruct_every_frame_exactly(delta_pair, codec, steps):
    """Random sequences of changes (with and without damage), unchanged frames, dropped frames, late keyframe
    requests: the reader's frame is always the writer's, pixel for pixel."""
    a, b = delta_pair[codec]
    fmt = StreamFormat(96, 40, "rgba8")
    w = a.open_writer(7, fmt)
    r = b.open_reader(7, fmt)
    rng = np.random.default_rng(steps[0][1])
    cur = rng.integers(0, 4, (fmt.height, fmt.row_bytes), dtype=np.uint8)
    n = 0
    for op, seed in steps:
        rng = np.random.default_rng(seed)
        damage: tuple = ()
        if op in ("rect", "rect-no-damage"):
            for _ in range(int(rng.integers(1, 4))):
                x, y = int(rng.integers(0, fmt.width)), int(rng.integers(0, fmt.height))
                ww, hh = int(rng.integers(1, fmt.width - x + 1)), int(rng.integers(1, fmt.height - y + 1))
                cur[y:y + hh, x * 4:(x + ww) * 4] = rng.integers(0, 256, (hh, ww * 4), dtype=np.uint8)
                damage += ((x, y, ww, hh),)
            if op == "rect-no-damage":
                damage = ()
        elif op == "noise":
            cur[:] = rng.integers(0, 256, cur.shape, dtype=np.uint8)
        elif op == "key-request":
            r.close()
            r = b.open_reader(7, fmt)
        n += 1
        w.begin()[:] = cur
        w.commit(FrameMeta(n, damage=damage))
        if op == "skip":  # the next commit replaces this one or not: either way the result must be exact
            continue
        pixels, meta = read_frame(b, r, n - 1)
        assert meta.frame == n
        np.testing.assert_array_equal(pixels, cur)
    w.close()
    r.close()


@pytest.fixture(scope="module")
def delta_pair():
    pairs, made = {}, []
    for codec in CODECS:
        a, b, srv = local_pair((codec,))
        pairs[codec] = (a, b)
        made += [a, b, srv]
    yield pairs
    for x in made:
        x.close()


# -- across network namespaces (veth), mDNS ------------------------------------------------------------------------


@pytest.fixture
def netns_pair():
    """Two network namespaces joined by a veth pair, made here and removed after: addresses exist only inside them
    (10.231.N.1 and .2), never on this host's own interfaces."""
    if os.geteuid() != 0:
        pytest.skip("needs root (CAP_NET_ADMIN) to create network namespaces")
    if not shutil.which("ip"):
        pytest.skip("needs the ip command (iproute2)")
    tag = os.urandom(3).hex()
    a, b = f"tb-a-{tag}", f"tb-b-{tag}"
    net = 10 + int(tag[:2], 16) % 200
    made: list[str] = []

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)

    try:
        for ns in (a, b):
            try:
                ip("netns", "add", ns)
            except subprocess.CalledProcessError as e:
                pytest.skip(f"cannot create a network namespace here (CAP_SYS_ADMIN/CAP_NET_ADMIN): {e.stderr}")
            made.append(ns)
        ip("-n", a, "link", "add", "veth-a", "type", "veth", "peer", "name", "veth-b", "netns", b)
        ip("-n", a, "addr", "add", f"10.231.{net}.1/24", "dev", "veth-a")
        ip("-n", b, "addr", "add", f"10.231.{net}.2/24", "dev", "veth-b")
        for ns, dev in ((a, "veth-a"), (b, "veth-b")):
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield a, b, f"10.231.{net}.1"
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_link_across_a_veth_pair_between_namespaces(peers, netns_pair):
    a, b, server_ip = netns_pair
    in_a, in_b = ["ip", "netns", "exec", a], ["ip", "netns", "exec", b]
    # a real non-loopback address: serving there without a secret is refused
    refused = peers("serve", "--host", server_ip, "--port", "7411", prefix=in_a)
    assert "without a shared secret" in refused.wait_line("REFUSED")
    srv = peers("serve", "--host", server_ip, "--port", "7411", "--secret", SECRET, "--label", "host-a", prefix=in_a)
    srv.port()
    driver = peers("join", "--host", server_ip, "--port", "7411", "--secret", SECRET, "--label", "host-b",
                   "--drive", "25", "--size", "640x360", prefix=in_b)
    assert driver.wait_line("LINKED", timeout=30) == "LINKED host-a lz4"
    assert driver.wait_line("VERIFIED", timeout=60) == "VERIFIED 25"
    # a wrong secret from the other namespace is refused
    wrong = peers("join", "--host", server_ip, "--port", "7411", "--secret", "a wrong secret, long enough",
                  prefix=in_b)
    assert "refused" in wrong.wait_line("AUTH", timeout=30)


def test_mdns_across_namespaces_server_on_every_address(peers, netns_pair):
    """A server on 0.0.0.0 inside one namespace (secret required) announces its interfaces' addresses; a joiner in
    the other namespace finds it by label over the veth pair and links."""
    pytest.importorskip("zeroconf", reason="mDNS discovery needs zeroconf (the [net] extra)")
    a, b, server_ip = netns_pair
    srv = peers("serve", "--host", "0.0.0.0", "--port", "7412", "--secret", SECRET, "--label", "ns-a-server",
                "--advertise", prefix=["ip", "netns", "exec", a])
    srv.port()
    driver = peers("join", "--find", "ns-a-server", "--secret", SECRET, "--drive", "3", "--size", "64x64",
                   prefix=["ip", "netns", "exec", b])
    assert driver.wait_line("LINKED", timeout=40) == "LINKED ns-a-server lz4"
    assert driver.wait_line("VERIFIED", timeout=40) == "VERIFIED 3"


def test_mdns_advertise_and_find_by_label():
    zeroconf = pytest.importorskip("zeroconf", reason="mDNS discovery needs zeroconf (the [net] extra)")
    from texbridge.bridge._tcp import discover, find_peer

    label = "tb-" + os.urandom(4).hex()
    try:
        srv = TcpEndpoint("serve", "127.0.0.1", 0, label=label, advertise=True, mdns_interfaces=["127.0.0.1"])
    except (OSError, zeroconf.Error) as e:
        pytest.skip(f"no multicast on loopback here: {e}")
    try:
        found = find_peer(label, timeout=5.0, interfaces=["127.0.0.1"])
        assert found == ("127.0.0.1", srv.port)
        assert discover(timeout=3.0, interfaces=["127.0.0.1"]).get(label) == ("127.0.0.1", srv.port)
        got: dict = {}
        t = threading.Thread(target=lambda: got.setdefault("s", srv.establish(15)))
        t.start()
        link = establish(TcpEndpoint("join", "", 0, find=label, mdns_interfaces=["127.0.0.1"]), 15)
        t.join()
        assert link.peer_label == label and got["s"] is not None
        link.close(), got["s"].close()
        assert find_peer("tb-nobody-" + label, timeout=0.5, interfaces=["127.0.0.1"]) is None
    finally:
        srv.close()


def test_floods_are_bounded():
    """A peer flooding control messages the engine has not taken yet loses its link; a flood of keyframe requests
    costs at most one keyframe per stream in the queue."""
    sock, link, srv = hostile_link()
    try:
        w = link.open_writer(0, SMALL)
        w.begin()[:] = 3
        w.commit(FrameMeta(1))
        time.sleep(0.2)
        sock.sendall((C.header(C.RESYNC, 4) + (0).to_bytes(4, "little")) * 20000)
        time.sleep(0.5)
        assert link.alive and len(link._queue) <= 2
        msg = msgpack.packb({"x": b"y" * 60000})
        try:
            sock.sendall((C.header(C.CTRL, len(msg)) + msg) * 300)
        except (BrokenPipeError, ConnectionResetError):
            pass
        deadline = time.monotonic() + 5  # (not wait_dead: its receive() would take the messages)
        while link.alive and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(BridgePeerError, match="not yet received"):
            link.receive()
    finally:
        sock.close(), link.close(), srv.close()


HOSTILE_HANDSHAKES = {
    "noise": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "hello over its bound": C.header(C.HELLO, C.MAX_HELLO + 1) + b"\x80" * 100,
    "hello not msgpack": C.header(C.HELLO, 3) + b"\xc1\xc1\xc1",
    "hello with a bad magic": None,
    "hello with another version": None,
    "hello with a 10 KB label": None,
    "hello with a short nonce": None,
    "frame before the handshake": frame_msg(payload=b"x"),
    "auth when no secret is used": C.header(C.AUTH, 32) + bytes(32),
    "half a header then silence": C.header(C.HELLO, 10)[:5],
}


@pytest.mark.parametrize("name", sorted(HOSTILE_HANDSHAKES))
def test_a_hostile_handshake_is_refused_and_the_server_serves_on(name):
    srv = TcpEndpoint("serve", "127.0.0.1", 0)
    results: list = []
    t = threading.Thread(target=lambda: results.append(srv.establish(15)))
    t.start()
    sock = socket.create_connection(("127.0.0.1", srv.port))
    try:
        data = HOSTILE_HANDSHAKES[name]
        if data is None:
            over = {"hello with a bad magic": {"magic": "nope"}, "hello with another version": {"version": 99},
                    "hello with a 10 KB label": {"label": "x" * 10000},
                    "hello with a short nonce": {"nonce": b"abc"}}[name]
            hello = {"magic": C.MAGIC, "version": C.PROTOCOL_VERSION, "label": "raw", "codecs": ["raw"],
                     "nonce": os.urandom(32), "auth": False, **over}
            body = msgpack.packb(hello)
            data = C.header(C.HELLO, len(body)) + body
        sock.sendall(data)
        sock.settimeout(10)  # the server hangs up (at the latest when its handshake time runs out)
        try:
            while sock.recv(65536):
                pass
        except ConnectionResetError:
            pass
    finally:
        sock.close()
    assert wait_until(lambda: srv.errors, 10), "the refusal was not recorded"
    honest = establish(TcpEndpoint("join", "127.0.0.1", srv.port))  # and it still serves
    t.join(15)
    assert results and results[0] is not None, "the server did not link with the honest peer after the hostile one"
    honest.close()
    for link in results:
        if link is not None:
            link.close()
    srv.close()


def test_a_silent_stranger_does_not_hold_the_door():
    """Connections that never speak take their handshake slots, not the server: the real peer links meanwhile,
    and a handshake that completes after establish() returned waits for the next call."""
    srv = TcpEndpoint("serve", "127.0.0.1", 0, secret=SECRET)
    strangers = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(3)]
    try:
        got: dict = {}
        t = threading.Thread(target=lambda: got.setdefault("s", srv.establish(10)))
        t.start()
        t0 = time.monotonic()
        honest = establish(TcpEndpoint("join", "127.0.0.1", srv.port, secret=SECRET))
        t.join()
        assert got["s"] is not None and time.monotonic() - t0 < 4.0  # well before the strangers' 5 s time-out
        honest.close(), got["s"].close()
        # a handshake that ends after establish() returned is kept for a later call
        joined: dict = {}
        t = threading.Thread(target=lambda: joined.setdefault(
            "j", TcpEndpoint("join", "127.0.0.1", srv.port, secret=SECRET).establish(10)))
        t.start()
        deadline = time.monotonic() + 10
        while (kept := srv.establish(0.001)) is None:
            assert time.monotonic() < deadline
        t.join()
        assert kept.alive and joined["j"] is not None
        kept.close(), joined["j"].close()
    finally:
        for s in strangers:
            s.close()
        srv.close()
