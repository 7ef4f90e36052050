"""The TCP transport: a bridge link between hosts (or namespaces), behind the `_link` seam.

One TCP connection per link, TCP_NODELAY, length-prefixed messages (`_codec`). Each link has two threads: a
reader that decodes everything the peer sends (control messages into a queue, frames into per-stream buffers) and
a writer that drains one ordered queue of control messages and frame tokens onto the socket. StreamWriter.commit
never touches the socket: it swaps the frame into the stream's single pending slot (newest wins; a frame replaced
before the writer thread took it is a drop), so a slow peer or network never blocks a sender. Flow control: the
peer acknowledges every frame message once it has decoded (or skipped) it, and a stream has at most WINDOW frames
unacknowledged; the next one waits in the pending slot, where a newer frame replaces it. So a slow decoder or link
costs drops, never a backlog in the socket buffers (latency stays within about WINDOW frame times). Control
messages do not wait for that window, so they may overtake a frame committed before them.

Frames go as deltas against the previous frame sent on that stream (`_codec`): the writer's damage rectangles, or
without them the rectangles found by comparing with the previous frame, or XOR + lz4/zstd when nearly everything
changed, or a SAME marker; a keyframe first and whenever the peer's reader (re)joins (it sends RESYNC).

Handshake: both ends send HELLO (magic, version, label, decodable codecs, a random nonce, whether they hold a
secret). With a shared secret, challenge-response both ways: the joining end proves first with
HMAC-SHA256(secret, "J" + its nonce + the server's nonce), the serving end checks it in constant time and only then
proves itself with HMAC(secret, "S" + ...); the secret never crosses the wire and neither end is an oracle for the
other's proof. Serving on anything but loopback without a secret is refused. TLS (stdlib ssl, through memory BIOs
so the two threads never share an SSL object unlocked) adds confidentiality and integrity on untrusted networks.

Liveness: the writer sends at least every HEARTBEAT_S (a PING when idle); the reader's socket times out after
PEER_TIMEOUT_S of silence and the link dies. Reconnect: the engine calls establish() again (with `_link.Backoff`).
"""

from __future__ import annotations

import collections
import hmac
import ipaddress
import itertools
import logging
import os
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np

from .. import _synccore as _core
from .._errors import InvalidArgument
from . import _codec as C
from ._link import (
    HEARTBEAT_S,
    Cadence,
    MAX_STREAMS,
    PEER_TIMEOUT_S,
    BridgeAuthError,
    BridgeError,
    BridgePeerError,
    FrameMeta,
    LinkStats,
    StreamFormat,
)

log = logging.getLogger("texbridge.bridge")
T = TypeVar("T")

HANDSHAKE_S = 5.0  # a peer that has not finished the handshake by then is dropped
MAX_HANDSHAKES = 8  # handshakes in progress at once on a serving end; more connections are closed at once
ACCEPT_POLL_S = 0.02
SEND_STALL_S = 10 * PEER_TIMEOUT_S  # a peer that reads nothing for this long (while still alive) is dropped
MAX_QUEUED_CTRL = 4096  # control messages waiting for the socket; more = the peer is not reading: link dies
MAX_INBOX = 4096  # control messages received but not yet taken by receive(); more = a flooding peer: link dies
MAX_INBOX_BYTES = 16 << 20
WINDOW = 2  # frames per stream sent but not yet acknowledged: one on the wire while the peer decodes another
RECV_CHUNK = 256 * 1024
SOCKET_BUFFER = 4 << 20  # the kernel doubles it (and caps it at net.core.[wr]mem_max)
SEND_CHUNK = 1 << 20
MIN_SECRET = 16
MDNS_TYPE = "_texbridge._tcp.local."
_ERRORS_KEPT = 8


def load_secret(path: str | os.PathLike[str]) -> bytes:
    """A shared secret from a token file (surrounding whitespace stripped); too short a secret is refused, since a
    captured handshake lets an attacker guess a weak one offline. Make one: `head -c 32 /dev/urandom | base64`."""
    try:
        data = Path(path).read_bytes().strip()
    except OSError as e:
        raise BridgeError(f"cannot read the token file {path}: {e.strerror}") from None
    return _check_secret(data)


def _check_secret(secret: bytes | str | None) -> bytes | None:
    if secret is None:
        return None
    data = secret.encode() if isinstance(secret, str) else bytes(secret)
    if len(data) < MIN_SECRET:
        raise BridgeError(f"a shared secret needs at least {MIN_SECRET} bytes (got {len(data)}); make one with "
                          "`head -c 32 /dev/urandom | base64`")
    return data


@dataclass(frozen=True)
class TlsOptions:
    """TLS for a link. Serving end: cert + key (PEM files). Joining end: ca = the certificate(s) to trust (the
    server's own self-signed cert works), else the system's; server_name = the name the cert must carry (default:
    the host joined). A self-signed pair: `openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes
    -days 3650 -subj /CN=myhost -addext subjectAltName=DNS:myhost,IP:192.0.2.7 -keyout key.pem -out cert.pem`."""

    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    server_name: str | None = None


def _tls_context(tls: TlsOptions, serving: bool) -> ssl.SSLContext:
    try:
        if serving:
            if not tls.cert:
                raise BridgeError("TLS on the serving end needs a certificate (and key) file")
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(tls.cert, tls.key)
        else:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            if tls.ca:
                ctx.load_verify_locations(tls.ca)
            else:
                ctx.load_default_certs()
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    except (OSError, ssl.SSLError) as e:
        raise BridgeError(f"TLS setup failed: {e}") from None
    return ctx


class _Dead(Exception):
    """Internal: the link's socket failed; carries the BridgeError to report."""


class _Channel:
    """A connected socket: send(buffers) from the writer thread, recv_into from the reader thread."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.stalled_for = 0.0

    def send(self, bufs: list[Any], alive: Callable[[], bool]) -> int:
        views = [memoryview(b).cast("B") for b in bufs if len(memoryview(b).cast("B"))]
        total = sum(len(v) for v in views)
        while views:
            try:
                n = self.sock.sendmsg(views[:64])
            except (TimeoutError, BlockingIOError):  # handshake: socket timeout; link: SO_SNDTIMEO
                self._stalled(alive)
                continue
            except OSError as e:
                raise _Dead(BridgeError(f"send failed: {e.strerror or e}")) from None
            self.stalled_for = 0.0
            while n:
                if n >= len(views[0]):
                    n -= len(views.pop(0))
                else:
                    views[0] = views[0][n:]
                    n = 0
        return total

    def _stalled(self, alive: Callable[[], bool]) -> None:
        self.stalled_for += PEER_TIMEOUT_S
        if not alive():
            raise _Dead(BridgeError("link closed"))
        if self.stalled_for >= SEND_STALL_S:
            raise _Dead(BridgeError(f"the peer read nothing for {SEND_STALL_S:.0f} s"))

    def recv_into(self, mv: memoryview) -> int:
        try:  # a large read waits for all of it: one syscall (one GIL round trip) per frame, not hundreds
            return self.sock.recv_into(mv, 0, socket.MSG_WAITALL if len(mv) > RECV_CHUNK else 0)
        except (TimeoutError, BlockingIOError):  # handshake: socket timeout; link: SO_RCVTIMEO
            raise _Dead(BridgeError(f"the peer was silent for {PEER_TIMEOUT_S:.1f} s")) from None
        except OSError as e:
            raise _Dead(BridgeError(f"receive failed: {e.strerror or e}")) from None

    def flush(self, alive: Callable[[], bool]) -> int:
        return 0

    def peer_cert(self) -> Any:
        return None


class _TlsChannel(_Channel):
    """TLS over memory BIOs: the SSL object is only touched under a lock and never while blocked on the socket;
    only the writer thread sends (records leave in the order the SSL object made them)."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, serving: bool, server_name: str | None) -> None:
        super().__init__(sock)
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_side=serving,
                                server_hostname=None if serving else server_name)
        self.lock = threading.Lock()

    def handshake(self) -> None:
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._raw_send(self.outgoing.read())
                data = self._raw_recv()
                if not data:
                    raise BridgeError("the peer closed the connection during the TLS handshake")
                self.incoming.write(data)
            except ssl.SSLError as e:
                self._raw_send_quiet(self.outgoing.read())
                raise BridgeAuthError(f"TLS handshake failed: {e.reason or e}") from None
        self._raw_send(self.outgoing.read())

    def _raw_send_quiet(self, data: bytes) -> None:
        try:
            self._raw_send(data)
        except (OSError, _Dead, BridgeError):
            pass

    def _raw_send(self, data: bytes) -> None:
        if data:
            try:
                self.sock.sendall(data)
            except OSError as e:
                raise BridgeError(f"send failed: {e.strerror or e}") from None

    def _raw_recv(self) -> bytes:
        try:
            return self.sock.recv(RECV_CHUNK)
        except TimeoutError:
            raise BridgeError("the peer was silent during the TLS handshake") from None
        except OSError as e:
            raise BridgeError(f"receive failed: {e.strerror or e}") from None

    def send(self, bufs: list[Any], alive: Callable[[], bool]) -> int:
        total = 0
        for b in bufs:
            mv = memoryview(b).cast("B")
            for off in range(0, len(mv), SEND_CHUNK):
                with self.lock:
                    try:
                        self.obj.write(mv[off:off + SEND_CHUNK])
                    except ssl.SSLError as e:
                        raise _Dead(BridgeError(f"TLS failed: {e.reason or e}")) from None
                total += self.flush(alive)
        return total

    def flush(self, alive: Callable[[], bool]) -> int:
        with self.lock:
            data = self.outgoing.read()
        if data:
            super().send([data], alive)
        return len(data)

    def recv_into(self, mv: memoryview) -> int:
        while True:
            with self.lock:
                try:
                    return self.obj.read(len(mv), mv)
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLZeroReturnError:
                    return 0
                except ssl.SSLError as e:
                    raise _Dead(BridgePeerError(f"TLS failed: {e.reason or e}")) from None
            n = super().recv_into(memoryview(self._scratch()))
            if n == 0:
                return 0
            with self.lock:
                self.incoming.write(memoryview(self._buf)[:n])

    def _scratch(self) -> bytearray:
        buf = getattr(self, "_buf", None)
        if buf is None:
            buf = self._buf = bytearray(RECV_CHUNK)
        return buf

    def peer_cert(self) -> Any:
        return self.obj.getpeercert()


class _Input:
    """Buffered reads from a channel: small reads come from a buffer, large ones go straight to their target."""

    def __init__(self, chan: _Channel, on_bytes: Callable[[int], None]) -> None:
        self.chan = chan
        self.buf = bytearray(RECV_CHUNK)
        self.start = self.end = 0
        self.on_bytes = on_bytes

    def _fill(self) -> None:
        if self.start == self.end:
            self.start = self.end = 0
        n = self.chan.recv_into(memoryview(self.buf)[self.end:])
        if n == 0:
            raise _Dead(BridgeError("the peer closed the connection"))
        self.end += n
        self.on_bytes(n)

    def read(self, n: int) -> memoryview:
        """Exactly n bytes (n <= RECV_CHUNK), valid until the next read."""
        if self.end - self.start < n:
            if self.start + n > len(self.buf):
                self.buf[: self.end - self.start] = self.buf[self.start:self.end]
                self.end -= self.start
                self.start = 0
            while self.end - self.start < n:
                self._fill()
        mv = memoryview(self.buf)[self.start:self.start + n]
        self.start += n
        return mv

    def read_bytes(self, n: int) -> bytes:
        return bytes(self.read(n)) if n <= RECV_CHUNK else self._read_large(n)

    def _read_large(self, n: int) -> bytes:
        out = bytearray(n)
        self.read_into(memoryview(out))
        return bytes(out)

    def read_into(self, target: memoryview) -> None:
        have = min(self.end - self.start, len(target))
        target[:have] = memoryview(self.buf)[self.start:self.start + have]
        self.start += have
        pos = have
        while pos < len(target):
            n = self.chan.recv_into(target[pos:])
            if n == 0:
                raise _Dead(BridgeError("the peer closed the connection"))
            pos += n
            self.on_bytes(n)

    def skip(self, n: int) -> None:
        while n:
            if self.start == self.end:
                self._fill()
            k = min(n, self.end - self.start)
            self.start += k
            n -= k


# ---------------------------------------------------------------------------------------------------------------
# the handshake


def _send_msg(chan: _Channel, kind: int, payload: bytes = b"") -> None:
    chan.send([C.header(kind, len(payload)), payload], lambda: True)
    chan.flush(lambda: True)


def _recv_msg(inp: _Input, expect: tuple[int, ...]) -> tuple[int, bytes]:
    kind, length = C.check_header(inp.read(C.HEADER.size))
    if kind not in expect:
        raise BridgePeerError(f"handshake: message type {kind} where {expect} was expected")
    return kind, inp.read_bytes(length)


def _proof(secret: bytes, role: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.new(secret, b"texbridge-tcp-auth\0" + role + first + second, sha256).digest()


def _refused(payload: bytes) -> BridgeAuthError:
    try:
        reason = str(C.unpack_map(payload, "refusal").get("reason", ""))[:200]
    except BridgePeerError:
        reason = "(unreadable reason)"
    return BridgeAuthError(f"the peer refused the link: {reason}")


def _refuse(chan: _Channel, reason: str) -> None:
    try:
        _send_msg(chan, C.REFUSE, C.pack_ctrl({"reason": reason}))
    except (_Dead, BridgeError, OSError):
        pass


@dataclass
class _PeerHello:
    label: str
    codecs: list[str]
    nonce: bytes
    auth: bool


def _check_hello(payload: bytes) -> _PeerHello:
    m = C.unpack_map(payload, "hello")
    if m.get("magic") != C.MAGIC:
        raise BridgePeerError("not a texbridge TCP bridge peer (bad magic)")
    if m.get("version") != C.PROTOCOL_VERSION:
        raise BridgeError(f"the peer speaks bridge protocol version {str(m.get('version'))[:20]}, "
                          f"this end {C.PROTOCOL_VERSION}: update one side")
    label, codecs, nonce, auth = m.get("label"), m.get("codecs"), m.get("nonce"), m.get("auth")
    if not isinstance(label, str) or not 0 < len(label) <= C.MAX_LABEL:
        raise BridgePeerError("hello: bad label")
    if not isinstance(codecs, list) or len(codecs) > 8 or not all(isinstance(c, str) for c in codecs):
        raise BridgePeerError("hello: bad codec list")
    if not isinstance(nonce, bytes) or len(nonce) != C.NONCE_SIZE or not isinstance(auth, bool):
        raise BridgePeerError("hello: bad nonce or auth flag")
    return _PeerHello(label, [c for c in codecs if c in C.CODEC_NAMES], nonce, auth)


def _handshake(chan: _Channel, inp: _Input, serving: bool, label: str, secret: bytes | None) -> _PeerHello:
    nonce = os.urandom(C.NONCE_SIZE)
    _send_msg(chan, C.HELLO, C.pack_ctrl({"magic": C.MAGIC, "version": C.PROTOCOL_VERSION, "label": label,
                                          "codecs": C.available_codecs(), "nonce": nonce,
                                          "auth": secret is not None}))
    kind, payload = _recv_msg(inp, (C.HELLO, C.REFUSE))
    if kind == C.REFUSE:
        raise _refused(payload)
    peer = _check_hello(payload)
    if peer.nonce == nonce:  # a peer replaying our own challenge (a reflection attempt)
        _refuse(chan, "nonce replayed")
        raise BridgeAuthError("the peer replayed this end's challenge")
    if peer.auth != (secret is not None):
        reason = ("this end requires a shared secret and the peer has none" if secret is not None
                  else "the peer requires a shared secret and this end has none")
        _refuse(chan, "shared secret mismatch: one end has a secret, the other none")
        raise BridgeAuthError(reason + " (--token-file on both ends)")
    if secret is None:
        return peer
    mine, theirs = (b"S", b"J") if serving else (b"J", b"S")
    my_proof = _proof(secret, mine, nonce, peer.nonce)
    expected = _proof(secret, theirs, peer.nonce, nonce)

    def check(payload: bytes) -> None:
        if not hmac.compare_digest(payload, expected):
            _refuse(chan, "wrong shared secret")
            raise BridgeAuthError(f"the peer {peer.label!r} did not prove it knows the shared secret")

    if serving:  # the joining end proves first: a stranger who connects learns nothing to guess offline from
        kind, payload = _recv_msg(inp, (C.AUTH, C.REFUSE))
        if kind == C.REFUSE:
            raise _refused(payload)
        check(payload)
        _send_msg(chan, C.AUTH, my_proof)
        kind, payload = _recv_msg(inp, (C.READY, C.REFUSE))
        if kind == C.REFUSE:
            raise _refused(payload)
    else:
        _send_msg(chan, C.AUTH, my_proof)
        kind, payload = _recv_msg(inp, (C.AUTH, C.REFUSE))
        if kind == C.REFUSE:
            raise _refused(payload)
        check(payload)
        _send_msg(chan, C.READY)
    return peer


# ---------------------------------------------------------------------------------------------------------------
# streams


class _OutStream:
    """An outgoing stream's buffers: at most one being filled, one pending (newest wins), one being sent and the
    reference (the last frame sent, the base of the next delta). All fields under the link's lock."""

    def __init__(self, link: TcpLink, stream: int, fmt: StreamFormat) -> None:
        self.link, self.stream, self.fmt = link, stream, fmt
        self.tag = C.fmt_tag(fmt)
        self.free: list[np.ndarray] = []
        self.filling: np.ndarray | None = None
        self.pending: tuple[np.ndarray, FrameMeta] | None = None
        self.damage: tuple | None = None  # since the last frame sent; None = whole frame
        self.queued = False
        self.need_key = True
        self.rekey = False  # the peer asked for a keyframe while nothing was pending
        self.reference: np.ndarray | None = None  # writer thread only
        self.ref_meta: FrameMeta | None = None
        self.scratch: np.ndarray | None = None
        self.in_flight = 0  # frames sent that the peer has not acknowledged yet (at most WINDOW)
        self.blocked = False  # a frame waits for an acknowledgement to free the window
        self.closed = False

    def begin(self) -> np.ndarray:
        with self.link._lock:
            self._check()
            if self.filling is None:
                self.filling = self.free.pop() if self.free else np.empty((self.fmt.height, self.fmt.row_bytes),
                                                                         np.uint8)
            return self.filling

    def progress(self, rows: int) -> None:
        """Nothing to do on TCP: a frame leaves as a whole once committed."""

    @property
    def waiting(self) -> bool:
        """A committed frame has not left for the socket yet (TCP only): a producer that would rather not copy a
        frame only to have it replaced can wait for this to clear."""
        return self.pending is not None

    def commit(self, meta: FrameMeta) -> None:
        C.check_damage(self.fmt, meta.damage)
        if len(meta.user_data) > C.MAX_USER_DATA:
            raise InvalidArgument(f"user_data of {len(meta.user_data)} bytes (at most {C.MAX_USER_DATA})")
        link = self.link
        with link._lock:
            self._check()
            if self.filling is None:
                raise InvalidArgument("commit() without begin()")
            if self.pending is not None:
                self.free.append(self.pending[0])
                link._stats.drops += 1
                self.damage = C.union_damage(self.damage, tuple(meta.damage))
            else:
                self.damage = tuple(meta.damage) or None
            self.pending = (self.filling, meta)
            self.filling = None
            now = time.monotonic()
            link._out_cadence.tick(now, now)
            if not self.queued and not self.blocked:
                self.queued = True
                link._queue.append(self)
                link._notify_writer()

    def abort(self) -> None:
        with self.link._lock:
            if self.filling is not None:
                self.free.append(self.filling)
                self.filling = None

    def close(self) -> None:
        with self.link._lock:
            self.closed = True
            self.pending = self.filling = None
            self.free.clear()
            if self.link._out.get(self.stream) is self:
                del self.link._out[self.stream]

    def _check(self) -> None:
        if self.closed:
            raise BridgeError(f"stream {self.stream} is closed")
        self.link._check_alive()

    # writer thread
    def take(self) -> tuple[np.ndarray, FrameMeta, tuple | None, bool] | None:
        """(frame, meta, damage, key) to send now, or None; the caller holds the link lock."""
        self.queued = False
        if self.closed:
            return None
        if self.in_flight >= WINDOW:  # the peer has not decoded enough yet: the frame stays pending (newest wins)
            self.blocked = True
            return None
        if self.pending is not None:
            buf, meta = self.pending
            damage, self.pending, self.damage = self.damage, None, None
            key, self.need_key, self.rekey = self.need_key, False, False
            self.in_flight += 1
            return buf, meta, damage, key
        if self.rekey and self.reference is not None and self.ref_meta is not None:
            self.rekey = self.need_key = False
            self.in_flight += 1
            return self.reference, self.ref_meta, None, True
        return None

    def acked(self, count: int) -> None:
        """The peer processed `count` more frames (caller holds the lock): a blocked frame may go now."""
        self.in_flight = max(0, self.in_flight - count)
        if self.blocked and self.in_flight < WINDOW:
            self.blocked = False
            if (self.pending is not None or self.rekey) and not self.queued:
                self.queued = True
                self.link._queue.append(self)
                self.link._notify_writer()

    def encode(self, buf: np.ndarray, meta: FrameMeta, damage: tuple | None, key: bool,
               codec: int) -> list[Any]:
        """The frame message's parts (header, sub-header, payload), delta-coded against the reference."""
        ref = self.reference
        if key or ref is None or ref is buf:
            kind, rects, payload = C.KEY, (), C.compress(codec, buf)
        elif damage is not None:
            kind, rects = C.RECTS, damage
            payload = C.compress(codec, C.gather_rects(buf, self.fmt, damage))
        else:  # no damage given: find it (bands of changed rows, narrowed to their columns)
            found = C.dirty_rects(buf, ref, self.fmt)
            if found == ():
                kind, rects, payload = C.SAME, (), b""
            elif found is not None and C.rects_nbytes(self.fmt, found) <= self.fmt.nbytes // 2:
                kind, rects = C.RECTS, found
                payload = C.compress(codec, C.gather_rects(buf, self.fmt, found))
            elif codec == C.RAW:
                kind, rects, payload = C.KEY, (), C.compress(codec, buf)
            else:  # changed nearly everywhere: XOR against the previous frame still compresses small changes
                if self.scratch is None:
                    self.scratch = np.empty_like(buf)
                np.bitwise_xor(buf, ref, out=self.scratch)
                kind, rects, payload = C.XOR, (), C.compress(codec, self.scratch)
        sub = C.pack_frame_header(self.stream, meta, self.tag, codec if kind != C.SAME else C.RAW, kind, rects)
        return [C.header(C.FRAME, len(sub) + len(payload)), sub, payload]

    def sent(self, buf: np.ndarray, meta: FrameMeta) -> None:
        """buf went out: it becomes the reference, the old reference a free buffer (caller holds the lock)."""
        if buf is not self.reference:
            if self.reference is not None and not self.closed:
                self.free.append(self.reference)
            self.reference, self.ref_meta = buf, meta


class _InStream:
    """An incoming stream: `published` is the newest decoded frame (readers copy it under `lock`), `work` the
    buffer the reader thread decodes the next one into (then the two swap)."""

    def __init__(self, link: TcpLink, stream: int, fmt: StreamFormat) -> None:
        self.link, self.stream, self.fmt = link, stream, fmt
        self.tag = C.fmt_tag(fmt)
        self.lock = threading.Lock()
        self.published: np.ndarray | None = None
        self.meta: FrameMeta | None = None
        self.work = np.empty((fmt.height, fmt.row_bytes), np.uint8)
        self.stale: tuple | None = None  # what `work` lacks of `published`: None = everything, () = nothing
        self.unread = False
        self.damage: tuple | None = None  # since the last read: None = whole frame, () = nothing
        self.scratch = bytearray()
        self.closed = False

    def read(self, copy: Callable[[np.ndarray, FrameMeta], T], after: int) -> T | None:
        with self.lock:
            if self.closed:
                raise BridgeError(f"stream {self.stream} reader is closed")
            if self.meta is None or self.published is None or self.meta.frame <= after:
                self.link._check_alive()
                return None
            view = self.published.view()
            view.flags.writeable = False
            meta = FrameMeta(self.meta.frame, self.meta.timestamp_ns, self.damage or (), self.meta.user_data)
            result = copy(view, meta)
            self.unread = False
            self.damage = None
            return result

    def close(self) -> None:
        with self.link._lock:
            if self.link._in.get(self.stream) is self:
                del self.link._in[self.stream]
        with self.lock:
            self.closed = True

    # reader thread
    def sync_work(self) -> None:
        """Make `work` equal to `published` again before a delta is applied to it."""
        if self.published is None or self.stale == ():
            return
        if self.stale is None:
            np.copyto(self.work, self.published)
        else:
            bpp = self.fmt.row_bytes // self.fmt.width
            for x, y, w, h in self.stale:
                self.work[y:y + h, x * bpp:(x + w) * bpp] = self.published[y:y + h, x * bpp:(x + w) * bpp]
        self.stale = ()

    def publish(self, meta: FrameMeta, damage: tuple | None, swap: bool) -> None:
        with self.lock:
            if swap:
                old = self.published
                self.published = self.work
                self.work = old if old is not None else np.empty_like(self.published)
                self.stale = None if old is None else damage
            if not self.unread:
                self.damage = damage
            elif damage is None or self.damage is None:
                self.damage = None
            elif damage:
                self.damage = C.union_damage(self.damage, damage)
            if self.unread:
                self.link._stats.drops += 1
            self.meta = meta
            self.unread = True


# ---------------------------------------------------------------------------------------------------------------
# the link


class TcpLink:
    """One established TCP bridge link (see the module docstring). Made by TcpEndpoint.establish()."""

    def __init__(self, sock: socket.socket, chan: _Channel, inp: _Input, peer: _PeerHello, codecs: list[str],
                 describe: str) -> None:
        self._sock, self._chan, self._inp = sock, chan, inp
        self._peer_label = peer.label
        self._describe = describe
        self._lock = threading.Lock()
        # work for the writer thread (a frame, a control message, an ack, death): a word it sleeps on GIL-free,
        # bumped and futex-woken under the lock by whoever queues; it spins on it across the next frame of a
        # periodic sender (`_out_cadence`, ticked at each commit) instead of paying a wake-up per frame
        self._wbell = np.zeros(8, np.uint8)
        self._wbellw = self._wbell.view(np.uint64)
        self._wbell_n = itertools.count(1)
        self._out_cadence = Cadence()
        self._queue: collections.deque[Any] = collections.deque()  # _OutStream tokens and bytes (control)
        self._ctrl_queued = 0
        self._inbox: collections.deque[dict[str, Any]] = collections.deque()
        self._inbox_bytes = 0
        self._acks: dict[int, int] = {}  # frames processed per peer stream, not yet acknowledged
        # news for the engine (a control message, a frame, death): a word the engine's wait() sleeps on GIL-free (and
        # may spin on when a frame is due), bumped and futex-woken by whoever has news
        self._bell = np.zeros(8, np.uint8)
        self._bellw = self._bell.view(np.uint64)
        self._bell_n = itertools.count(1)
        self._bell_seen = 0
        self._out: dict[int, _OutStream] = {}
        self._in: dict[int, _InStream] = {}
        self._error: BridgeError | None = None
        self._closed = False
        self._stats = LinkStats(peer_label=peer.label, alive=True)
        mine = [c for c in codecs if c in peer.codecs]
        self.codec = mine[0] if mine else "raw"  # what this end sends with: its first choice the peer decodes
        self._codec = C.CODEC_NAMES[self.codec]
        self._decodable = {C.CODEC_NAMES[c] for c in C.available_codecs()}  # what our HELLO offered
        self._inp.on_bytes = self._count_in
        self._last_send = time.monotonic()
        self._reader = threading.Thread(target=self._read_loop, name=f"texbridge-tcp-read-{peer.label}",
                                        daemon=True)
        self._writer = threading.Thread(target=self._write_loop, name=f"texbridge-tcp-write-{peer.label}",
                                        daemon=True)
        self._reader.start()
        self._writer.start()

    def __repr__(self) -> str:
        state = "alive" if self.alive else f"dead: {self._error}"
        return f"<TcpLink {self._describe} peer={self._peer_label!r} codec={self.codec} {state}>"

    # ----- the Link protocol

    @property
    def peer_label(self) -> str:
        return self._peer_label

    @property
    def alive(self) -> bool:
        return self._error is None and not self._closed

    def send(self, message: dict[str, Any]) -> None:
        data = C.pack_ctrl(message)
        with self._lock:
            self._check_alive()
            if self._ctrl_queued >= MAX_QUEUED_CTRL:
                err = BridgeError(f"{MAX_QUEUED_CTRL} control messages wait for a peer that does not read")
                self._fail_locked(err)
                raise err
            self._ctrl_queued += 1
            self._queue.append(data)
            self._notify_writer()

    def receive(self) -> list[dict[str, Any]]:
        with self._lock:
            self._check_alive()
            out = list(self._inbox)
            self._inbox.clear()
            self._inbox_bytes = 0
        return out

    def open_writer(self, stream: int, fmt: StreamFormat) -> _OutStream:
        self._check_stream(stream)
        with self._lock:
            self._check_alive()
            old = self._out.get(stream)
            if old is not None:
                old.closed = True
            w = self._out[stream] = _OutStream(self, stream, fmt)
        return w

    def open_reader(self, stream: int, fmt: StreamFormat) -> _InStream:
        self._check_stream(stream)
        r = _InStream(self, stream, fmt)
        with self._lock:
            self._check_alive()
            old = self._in.get(stream)
            if old is not None:
                old.closed = True
            self._in[stream] = r
            self._queue.append(("ask-key", stream))  # ask for a keyframe: we have no base for deltas
            self._notify_writer()
        return r

    def wait(self, timeout: float, spin: float = 0.0) -> None:
        """Sleep until there is news since the last wait() returned (the reader thread rings: a control message, a
        frame, death), spinning up to `spin` seconds first; GIL released throughout."""
        _core.wait_word(self._bell, 0, self._bell_seen & 0xFFFFFFFF, timeout, spin)
        self._bell_seen = int(self._bellw[0])

    def _ring(self) -> None:
        self._bellw[0] = next(self._bell_n)
        _core.wake_word(self._bell, 0)

    def _notify_writer(self) -> None:
        """Work for the writer thread (the caller holds the lock, as it queued the work under it)."""
        self._wbellw[0] = next(self._wbell_n)
        _core.wake_word(self._wbell, 0)

    def stats(self) -> LinkStats:
        with self._lock:
            s = self._stats
            return LinkStats(s.peer_label, self.alive, s.frames_out, s.frames_in, s.bytes_out, s.bytes_in, s.drops,
                             list(s.errors))

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stats.alive = False
            self._notify_writer()
        self._shutdown()
        for t in (self._reader, self._writer):
            if t is not threading.current_thread():
                t.join(timeout=2.0)
        try:
            self._sock.close()
        except OSError:
            pass
        self._ring()

    # ----- internals

    @staticmethod
    def _check_stream(stream: int) -> None:
        if not isinstance(stream, int) or not 0 <= stream < MAX_STREAMS:
            raise InvalidArgument(f"stream number {stream!r} outside 0..{MAX_STREAMS - 1}")

    def _check_alive(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closed:
            raise BridgeError("link closed")

    def _fail(self, err: BridgeError) -> None:
        with self._lock:
            self._fail_locked(err)

    def _fail_locked(self, err: BridgeError) -> None:
        if self._error is None and not self._closed:
            self._error = err
            self._stats.alive = False
            self._stats.errors = (self._stats.errors + [str(err)])[-_ERRORS_KEPT:]
            log.warning("bridge link to %r died: %s", self._peer_label, err)
            self._notify_writer()
            self._shutdown()
        self._ring()

    def _shutdown(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _count_in(self, n: int) -> None:
        self._stats.bytes_in += n

    # ----- writer thread

    def _write_loop(self) -> None:
        alive = lambda: self.alive  # noqa: E731
        try:
            while True:
                with self._lock:
                    idle = not self._queue and self.alive
                    if idle:
                        seen = int(self._wbellw[0])  # read under the lock: work queued after this bumps it
                        now = time.monotonic()
                        timeout, spin = HEARTBEAT_S / 4, 0.0
                        win = self._out_cadence.window(now)
                        if win is not None:
                            if now < win[0]:
                                timeout = min(timeout, win[0] - now)
                            else:
                                spin = timeout = win[1] - now
                if idle:
                    _core.wait_word(self._wbell, 0, seen & 0xFFFFFFFF, timeout, spin)
                with self._lock:
                    if not self.alive:
                        return
                    item = self._queue.popleft() if self._queue else None
                    frame = None
                    if isinstance(item, bytes):
                        self._ctrl_queued -= 1
                        item = C.header(C.CTRL, len(item)) + item
                    elif isinstance(item, _OutStream):
                        frame = item.take()
                    elif isinstance(item, tuple) and item[0] == "ack":  # frames of the peer's stream processed
                        count = self._acks.pop(item[1], 0)
                        item = C.header(C.ACK, 8) + C.ACK_BODY.pack(item[1], count)
                    elif isinstance(item, tuple):  # our reader asks the peer for a keyframe
                        item = C.header(C.RESYNC, 4) + item[1].to_bytes(4, "little")
                if isinstance(item, bytes):
                    self._send([item], alive)
                elif frame is not None:
                    w = item
                    buf, meta, damage, key = frame
                    parts = w.encode(buf, meta, damage, key, self._codec)
                    self._stats.frames_out += 1
                    self._send(parts, alive)
                    with self._lock:
                        w.sent(buf, meta)
                elif time.monotonic() - self._last_send >= HEARTBEAT_S * 0.8:
                    self._send([C.header(C.PING, 0)], alive)
                self._chan.flush(alive)
        except _Dead as e:
            self._fail(e.args[0])
        except BridgeError as e:
            self._fail(e)
        except Exception as e:  # a bug must still end the link cleanly, not leave a half-dead one
            log.exception("bridge writer failed")
            self._fail(BridgeError(f"writer failed: {type(e).__name__}: {e}"))

    def _send(self, parts: list[Any], alive: Callable[[], bool]) -> None:
        self._stats.bytes_out += sum(memoryview(p).nbytes for p in parts)  # counted first: the peer may be quicker
        self._chan.send(parts, alive)
        self._last_send = time.monotonic()

    # ----- reader thread

    def _read_loop(self) -> None:
        try:
            while self.alive:
                kind, length = C.check_header(self._inp.read(C.HEADER.size))
                if kind == C.CTRL:
                    msg = C.unpack_map(self._inp.read(length), "control message")
                    with self._lock:
                        if len(self._inbox) >= MAX_INBOX or self._inbox_bytes + length > MAX_INBOX_BYTES:
                            raise BridgePeerError(f"the peer sent more than {MAX_INBOX} control messages or "
                                                  f"{MAX_INBOX_BYTES >> 20} MiB not yet received")
                        self._inbox.append(msg)
                        self._inbox_bytes += length
                    self._ring()
                elif kind == C.PING:
                    pass
                elif kind == C.RESYNC:
                    stream = int.from_bytes(self._inp.read(4), "little")
                    if stream >= MAX_STREAMS:
                        raise BridgePeerError(f"resync of stream {stream}")
                    with self._lock:  # coalesced: a stream is queued at most once, however often asked
                        w = self._out.get(stream)
                        if w is not None:
                            w.need_key = True
                            if w.pending is None and not w.queued:
                                w.rekey = True
                                if not w.blocked:
                                    w.queued = True
                                    self._queue.append(w)
                                    self._notify_writer()
                elif kind == C.FRAME:
                    stream = self._read_frame(length)
                    with self._lock:  # acknowledged (coalesced per stream, ahead of queued frames)
                        if stream not in self._acks:
                            self._acks[stream] = 0
                            self._queue.appendleft(("ack", stream))
                            self._notify_writer()
                        self._acks[stream] += 1
                elif kind == C.ACK:
                    stream, count = C.ACK_BODY.unpack(self._inp.read(8))
                    with self._lock:
                        w = self._out.get(stream)
                        if w is not None:
                            w.acked(count)
                else:
                    raise BridgePeerError(f"message type {kind} after the handshake")
        except _Dead as e:
            self._fail(e.args[0])
        except BridgeError as e:
            self._fail(e)
        except Exception as e:
            log.exception("bridge reader failed")
            self._fail(BridgeError(f"reader failed: {type(e).__name__}: {e}"))

    def _read_frame(self, length: int) -> int:
        """Read (and decode, if a reader wants it) one frame message; returns its stream number."""
        inp = self._inp
        stream, frame, ts, tag, codec, kind, n_damage, user_len = C.parse_frame_header(inp.read(C.FRAME_HDR.size))
        extra = n_damage * C.RECT.size + user_len
        if length < C.FRAME_HDR.size + extra:
            raise BridgePeerError(f"frame message of {length} bytes cannot hold its damage and user data")
        if codec not in self._decodable:
            raise BridgePeerError(f"frame compressed with codec {codec}, which this end did not offer")
        rects_raw = bytes(inp.read(n_damage * C.RECT.size))
        user = bytes(inp.read(user_len))
        size = length - C.FRAME_HDR.size - extra
        with self._lock:
            r = self._in.get(stream)
        if kind == C.SAME and size:
            raise BridgePeerError("an unchanged-frame marker with a payload")
        if r is None or r.closed or r.tag != tag:  # no reader (yet), or another geometry: not an error
            inp.skip(size)
            return stream
        if size > C.payload_bound(r.fmt.nbytes):
            raise BridgePeerError(f"frame payload of {size} bytes for a {r.fmt.nbytes}-byte frame")
        rects = C.parse_damage(r.fmt, memoryview(rects_raw), n_damage)
        if kind == C.RECTS and not rects:
            raise BridgePeerError("a damage frame without rectangles")
        meta = FrameMeta(frame, ts, (), user)
        if kind != C.KEY and r.published is None:  # a delta without its base: wait for the keyframe we asked for
            inp.skip(size)
            return stream
        if kind == C.SAME:
            r.publish(meta, (), swap=False)
        elif kind == C.KEY and codec == C.RAW:
            if size != r.fmt.nbytes:
                raise BridgePeerError(f"raw frame of {size} bytes, {r.fmt.nbytes} expected")
            inp.read_into(memoryview(r.work).cast("B"))
            r.publish(meta, None, swap=True)
        else:
            if len(r.scratch) < size:
                r.scratch = bytearray(size)
            payload = memoryview(r.scratch)[:size]
            inp.read_into(payload)
            if kind == C.KEY:
                data = C.decompress(codec, payload, r.fmt.nbytes)
                np.copyto(r.work, np.frombuffer(data, np.uint8).reshape(r.work.shape))
                r.publish(meta, None, swap=True)
            elif kind == C.XOR:
                data = C.decompress(codec, payload, r.fmt.nbytes)
                r.sync_work()
                np.bitwise_xor(r.work, np.frombuffer(data, np.uint8).reshape(r.work.shape), out=r.work)
                r.publish(meta, None, swap=True)
            else:
                data = C.decompress(codec, payload, C.rects_nbytes(r.fmt, rects))
                r.sync_work()
                C.scatter_rects(r.work, r.fmt, rects, data)
                r.publish(FrameMeta(frame, ts, rects, user), rects, swap=True)
        with self._lock:
            self._stats.frames_in += 1
        self._ring()
        return stream


# ---------------------------------------------------------------------------------------------------------------
# the endpoint


def _os_timeouts(sock: socket.socket, seconds: float) -> None:
    """A blocking socket whose recv/send give up after `seconds` without progress (SO_RCVTIMEO/SO_SNDTIMEO): unlike
    Python's own timeout mode (non-blocking + poll), one large send or MSG_WAITALL receive is one syscall."""
    sock.settimeout(None)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):  # room for a frame in flight while the next is encoded
        sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
    tv = struct.pack("ll", int(seconds), int(seconds % 1 * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def _is_loopback(host: str, port: int) -> bool:
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise BridgeError(f"cannot resolve {host!r}: {e.strerror}") from None
    return all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


class TcpEndpoint:
    """One end of a TCP bridge. role="serve" listens on host:port (port 0: any; see `.address`), role="join"
    connects to it (or, with find=LABEL, to the server of that label found over mDNS). secret: the shared secret
    (bytes/str, at least 16 bytes; see load_secret) — required to serve on anything but loopback. tls: TlsOptions.
    codecs: this end's preference for what it sends, the first the peer decodes wins (each end decodes every
    codec it has; raw always works). advertise:
    serve only, announce the service over mDNS (needs the `net` extra: zeroconf)."""

    def __init__(self, role: str, host: str = "127.0.0.1", port: int = 0, *, secret: bytes | str | None = None,
                 tls: TlsOptions | None = None, label: str | None = None,
                 codecs: tuple[str, ...] = ("lz4", "zstd", "raw"), advertise: bool = False,
                 find: str | None = None, mdns_interfaces: Any = None) -> None:
        if role not in ("serve", "join"):
            raise InvalidArgument(f"role must be 'serve' or 'join', not {role!r}")
        self.role = role
        self.label = label or socket.gethostname()
        if not 0 < len(self.label) <= C.MAX_LABEL:
            raise InvalidArgument(f"label must have 1..{C.MAX_LABEL} characters")
        self._secret = _check_secret(secret)
        self._tls = tls
        have = C.available_codecs()
        unknown = [c for c in codecs if c not in C.CODEC_NAMES]
        if unknown:
            raise InvalidArgument(f"unknown codec(s) {unknown}: choose from {sorted(C.CODEC_NAMES)}")
        self.codecs = [c for c in codecs if c in have] + ([] if "raw" in codecs else ["raw"])
        self.host, self.port = host, port
        self._find = find
        self._mdns_interfaces = mdns_interfaces
        self._ctx = _tls_context(tls, role == "serve") if tls is not None else None
        self._listener: socket.socket | None = None
        self._mdns: Any = None
        self.errors: list[str] = []  # handshakes that failed (serving end), newest last
        self._made: list[TcpLink] = []  # links whose handshake finished while nobody was in establish()
        self._made_lock = threading.Lock()
        self._shaking = 0
        if role == "serve":
            if self._secret is None and not _is_loopback(host, port):
                raise BridgeError(f"refusing to serve on {host or '*'}:{port} without a shared secret: anyone who "
                                  "reaches that address could read and inject frames; give a secret "
                                  "(--token-file) or serve on 127.0.0.1")
            self._listen()
            if advertise:
                self._advertise()

    def _listen(self) -> None:
        info = socket.getaddrinfo(self.host or None, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        s = socket.socket(info[0], socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(info[4])
            s.listen(4)
        except OSError as e:
            s.close()
            raise BridgeError(f"cannot listen on {self.host}:{self.port}: {e.strerror}") from None
        self._listener = s
        self.address = s.getsockname()[:2]
        self.port = self.address[1]

    def describe(self) -> str:
        sec = ("tls+" if self._tls else "") + ("secret" if self._secret else "no secret")
        where = f"find {self._find!r}" if self._find and not self.host else f"{self.host}:{self.port}"
        return f"tcp {self.role} {where} ({sec}) as {self.label!r}"

    def __repr__(self) -> str:
        return f"<TcpEndpoint {self.describe()}>"

    def establish(self, timeout: float) -> TcpLink | None:
        deadline = time.monotonic() + max(0.0, timeout)
        if self.role == "serve":
            return self._accept(deadline)
        return self._connect(deadline)

    def _accept(self, deadline: float) -> TcpLink | None:
        """Accept connections and shake hands with each in its own thread (at most MAX_HANDSHAKES at once), so a
        stranger who connects and says nothing cannot hold the door shut for the real peer; the first link
        made wins. A link made after the deadline waits in `_made` for the next call."""
        while True:
            with self._made_lock:
                if self._made:  # even one that died meanwhile: its first call says why, as any link's would
                    return self._made.pop(0)
            if self._listener is None:
                raise BridgeError("endpoint closed")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self._listener.settimeout(min(remaining, ACCEPT_POLL_S))
            try:
                sock, addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as e:
                raise BridgeError(f"accept failed: {e.strerror}") from None
            with self._made_lock:
                busy = self._shaking >= MAX_HANDSHAKES
                if not busy:
                    self._shaking += 1
            if busy:
                sock.close()
                self._refused(addr, BridgeError(f"{MAX_HANDSHAKES} handshakes already in progress"))
                continue
            threading.Thread(target=self._shake, args=(sock, addr), name="texbridge-tcp-handshake",
                             daemon=True).start()

    def _shake(self, sock: socket.socket, addr: Any) -> None:
        try:
            link = self._setup(sock, f"from {addr[0]}:{addr[1]}", HANDSHAKE_S)
        except BridgeError as e:
            self._refused(addr, e)
            return
        except Exception as e:  # never let a handshake bug kill the thread silently
            log.exception("bridge handshake failed")
            self._refused(addr, BridgeError(f"handshake failed: {type(e).__name__}"))
            return
        finally:
            with self._made_lock:
                self._shaking -= 1
        with self._made_lock:
            if self._listener is None:  # the endpoint closed meanwhile
                link.close()
            else:
                self._made.append(link)

    def _refused(self, addr: Any, e: BridgeError) -> None:
        with self._made_lock:
            self.errors = (self.errors + [f"{addr[0]}:{addr[1]}: {e}"])[-_ERRORS_KEPT:]
        log.warning("bridge: refused a peer from %s:%s: %s", addr[0], addr[1], e)

    def _connect(self, deadline: float) -> TcpLink | None:
        while True:
            host, port = self.host, self.port
            if not host and self._find:
                found = find_peer(self._find, timeout=max(0.1, min(2.0, deadline - time.monotonic())),
                                  interfaces=self._mdns_interfaces)
                host, port = found if found else ("", 0)
            if host:
                try:
                    sock = socket.create_connection((host, port),
                                                    timeout=max(0.1, min(HANDSHAKE_S, deadline - time.monotonic())))
                except OSError:
                    sock = None
                if sock is not None:
                    try:
                        return self._setup(sock, f"to {host}:{port}", HANDSHAKE_S)
                    except (BridgeAuthError, BridgePeerError):
                        raise
                    except BridgeError as e:
                        if "protocol version" in str(e):
                            raise
                        log.info("bridge: handshake with %s:%s failed: %s", host, port, e)
            if time.monotonic() + 0.1 >= deadline:
                return None
            time.sleep(0.1)

    def _setup(self, sock: socket.socket, where: str, handshake_s: float) -> TcpLink:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(handshake_s)
            chan: _Channel
            if self._ctx is not None:
                server_name = (self._tls.server_name if self._tls else None) or self.host
                chan = _TlsChannel(sock, self._ctx, self.role == "serve", server_name)
                chan.handshake()
            else:
                chan = _Channel(sock)
            inp = _Input(chan, lambda n: None)
            try:
                peer = _handshake(chan, inp, self.role == "serve", self.label, self._secret)
            except _Dead as e:
                raise e.args[0] from None
            _os_timeouts(sock, PEER_TIMEOUT_S)
            return TcpLink(sock, chan, inp, peer, self.codecs, f"{self.role} {where}")
        except BaseException:
            sock.close()
            raise

    def close(self) -> None:
        if self._mdns is not None:
            zc, info = self._mdns
            self._mdns = None
            try:
                zc.unregister_service(info)
            finally:
                zc.close()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._made_lock:
            made, self._made = self._made, []
        for link in made:
            link.close()

    # ----- mDNS

    def _advertise(self) -> None:
        zeroconf = _zeroconf()
        hosts = [self.address[0]]
        if ipaddress.ip_address(hosts[0]).is_unspecified:  # every address of this machine's interfaces
            import ifaddr  # a dependency of zeroconf

            hosts = [ip.ip for adapter in ifaddr.get_adapters() for ip in adapter.ips
                     if isinstance(ip.ip, str) and not ipaddress.ip_address(ip.ip).is_loopback] or ["127.0.0.1"]
        hostname = "".join(c if c.isalnum() or c == "-" else "-" for c in self.label)[:60]
        info = zeroconf.ServiceInfo(MDNS_TYPE, f"{self.label}.{MDNS_TYPE}", port=self.port,
                                    parsed_addresses=hosts, server=f"texbridge-{hostname}.local.",
                                    properties={"label": self.label, "version": str(C.PROTOCOL_VERSION),
                                                "tls": "1" if self._tls else "0",
                                                "auth": "1" if self._secret else "0"})
        zc = zeroconf.Zeroconf(**_zc_args(zeroconf, self._mdns_interfaces))
        try:
            zc.register_service(info)
        except Exception:
            zc.close()
            raise
        self._mdns = (zc, info)


def _zeroconf() -> Any:
    try:
        import zeroconf
    except ImportError:
        raise BridgeError("mDNS discovery needs zeroconf: pip install 'texbridge[net]'") from None
    return zeroconf


def _zc_args(zeroconf: Any, interfaces: Any) -> dict[str, Any]:
    return {} if interfaces is None else {"interfaces": interfaces}


def discover(timeout: float = 2.0, interfaces: Any = None) -> dict[str, tuple[str, int]]:
    """Bridge servers announced over mDNS within `timeout`: {label: (host, port)}."""
    zeroconf = _zeroconf()
    found: dict[str, tuple[str, int]] = {}
    names: list[str] = []
    zc = zeroconf.Zeroconf(**_zc_args(zeroconf, interfaces))
    try:
        def on_change(zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
            names.append(name)

        browser = zeroconf.ServiceBrowser(zc, MDNS_TYPE, handlers=[on_change])
        end = time.monotonic() + timeout
        seen: set[str] = set()
        while time.monotonic() < end:
            for name in list(names):
                if name in seen:
                    continue
                info = zc.get_service_info(MDNS_TYPE, name, timeout=500)
                if info is None or not info.parsed_addresses():
                    continue
                seen.add(name)
                props = {k.decode(errors="replace"): (v or b"").decode(errors="replace")
                         for k, v in (info.properties or {}).items()}
                label = props.get("label") or name.removesuffix("." + MDNS_TYPE)
                found[label[: C.MAX_LABEL]] = (info.parsed_addresses()[0], int(info.port or 0))
            if found and not names[len(seen):]:
                break
            time.sleep(0.05)
        browser.cancel()
    finally:
        zc.close()
    return found


def find_peer(label: str, timeout: float = 2.0, interfaces: Any = None) -> tuple[str, int] | None:
    """HOST, PORT of the bridge server announcing `label` over mDNS, or None if it did not answer in time."""
    zeroconf = _zeroconf()
    zc = zeroconf.Zeroconf(**_zc_args(zeroconf, interfaces))
    try:
        info = zc.get_service_info(MDNS_TYPE, f"{label}.{MDNS_TYPE}", timeout=int(timeout * 1000))
        if info is None or not info.parsed_addresses() or not info.port:
            return None
        return info.parsed_addresses()[0], int(info.port)
    finally:
        zc.close()
