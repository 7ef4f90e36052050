"""The broker's IO layer: accept, recvmsg, protocol, registry, sendmsg. Thin on purpose; the rules live in registry.

Fd ownership, the part that matters: fds arrive via SCM_RIGHTS into this process. Each is either handed to the
registry (which keeps it or returns it to close) or closed here when its frame is rejected; a frame cut short by the
kernel (MSG_CTRUNC) still closes whatever did arrive. An OPEN reply sends the registry's own fds: the kernel installs
fresh copies in the receiver, so the broker never dups for a reply sent at once. A reply that cannot be sent at once
(the client's queue is full) keeps dups, because the originals may be closed before the queue drains.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import resource
import selectors
import signal
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import NamedTuple

from .._errors import (AccessDenied, BrokerBusy, LocalProtocolError, NotFound, QuotaExceeded, RemoteProtocolError,
                       TexbridgeError)
from .._fdinfo import inspect_fd, same_file
from .._protocol import MAX_FRAME, Connection, Message, Op, State, peek_request_id
from .._seqpacket import close_fds as _close_all
from .._seqpacket import PREEMPTED_GAP, SPIN_SECONDS, SpinPolicy, recv_frame, send_frame
from .fdstore import FdStore, KeeperError, local_capacity
from .registry import Effects, Registry, error_message

log = logging.getLogger("texbridge.broker")
_MAX_QUEUE = 1024  # frames queued to a client that does not read; past this it is disconnected
_UCRED = struct.Struct("3i")
_KEEPER_CHECK = 0.5  # seconds between checks that the fd keepers are alive
_REFUSED_EXTRA = 16  # connections over a uid's limit still answered (with the refusal) before they are just closed
_BYE = Op.BYE  # a module constant: Op.BYE is an enum lookup on every frame
_FD_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class Credentials(NamedTuple):
    """A connection's SO_PEERCRED: struct ucred is {pid, uid, gid}, in that order. Admission goes by uid only."""

    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> Credentials:
    """Who is at the other end of `sock` (as the kernel saw it at connect time, in this process's namespaces)."""
    return Credentials(*_UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)))


def connection_limit() -> int:
    """Connections one uid may hold: well inside the fds the broker keeps for clients (TEXBRIDGE_BROKER_MAX_CONNECTIONS
    overrides), so that no uid can exhaust them and starve the others or the broker itself."""
    override = os.environ.get("TEXBRIDGE_BROKER_MAX_CONNECTIONS")
    if override:
        return max(1, int(override))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, min(4096, soft - local_capacity() - 256))


class _Throttle:
    """Rate-limited logging: a client able to trigger a log line must not be able to fill the disk with them."""

    def __init__(self, per_window: int = 5, window: float = 10.0) -> None:
        self.per_window, self.window = per_window, window
        self._seen: dict[str, list] = {}  # key -> [window start, lines logged, lines suppressed]

    def __call__(self, key: str, level: int, fmt: str, *args: object, exc_info: bool = False) -> None:
        now = time.monotonic()
        entry = self._seen.setdefault(key, [now, 0, 0])
        if now - entry[0] >= self.window:
            if entry[2]:
                log.warning("%d more %r messages were suppressed", entry[2], key)
            entry[:] = [now, 0, 0]
        if entry[1] < self.per_window:
            entry[1] += 1
            log.log(level, fmt, *args, exc_info=exc_info)
        else:
            entry[2] += 1


@dataclass
class _Peer:
    id: int
    sock: socket.socket
    pid: int
    uid: int
    conn: Connection = field(default_factory=lambda: Connection(broker_side=True))
    queue: collections.deque = field(default_factory=collections.deque)  # (bytes, dup'd fds)
    hangup: bool = False
    refusal: TexbridgeError | None = None  # set for a uid the policy does not admit, over its limit, or busy
    reserve: bool = False  # accepted on the reserve fd while out of fds: reopen the reserve when it goes


def _out_of_fds() -> bool:
    """True when this process is at its RLIMIT_NOFILE, which makes the kernel drop received fds (MSG_CTRUNC).
    Listing /proc/self/fd itself takes an fd: failing for want of one is the answer (it once raised here)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        return len(os.listdir("/proc/self/fd")) >= soft - 16
    except OSError as e:
        return e.errno in _FD_ERRORS


class BrokerServer:
    def __init__(self, listener: socket.socket, registry: Registry, *, idle_timeout: float | None,
                 abandon=None, max_connections: int | None = None) -> None:
        self.listener = listener
        self.registry = registry
        self.idle_timeout = idle_timeout
        self._abandon = abandon  # callable(fd, session_id) from the keyed mutex module, if built
        self.sel = selectors.DefaultSelector()
        self.peers: dict[int, _Peer] = {}
        self._next_id = 1
        self.store = FdStore()
        registry.same_file = self._same_file
        self._running = True
        self._idle_since = time.monotonic()
        self._next_keeper_check = 0.0
        self.max_connections = max_connections or connection_limit()
        self._per_uid: collections.Counter[int] = collections.Counter()
        self._throttle = _Throttle()
        self._reserve: int | None = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)  # freed to answer "busy"
        self._accept_backoff = 0.0
        self._accept_paused_until = 0.0
        listener.setblocking(False)
        self.sel.register(listener, selectors.EVENT_READ, None)

    def stop(self, *_: object) -> None:
        self._running = False

    def serve(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        busy_until = idle_poll = 0.0  # idle_poll: when the last empty spin poll returned (0: the last round served)
        spin = SpinPolicy(SPIN_SECONDS)
        while self._running:
            # After serving, poll without sleeping for a moment: the next request of a busy client usually follows
            # within microseconds, and catching it awake saves an idle-CPU wake-up on each side (see _seqpacket).
            # Not on an oversubscribed machine: an empty round that took long was descheduled (SpinPolicy).
            now = time.perf_counter()
            spinning = now < busy_until
            if spinning and idle_poll and now - idle_poll > PREEMPTED_GAP:
                spin.preempted(now)
                spinning, busy_until = False, 0.0
            if self._accept_paused_until and time.monotonic() >= self._accept_paused_until:
                self._accept_paused_until = 0.0
                self.sel.register(self.listener, selectors.EVENT_READ, None)
            events = self.sel.select(timeout=0 if spinning else 0.1 if self._accept_paused_until else 0.5)
            polled = time.perf_counter()
            if events:
                window = spin.window(polled)
                busy_until, idle_poll = (polled + window if window else 0.0), 0.0
            elif spinning:
                idle_poll = polled
                if polled >= busy_until:
                    spin.clean()
            else:
                idle_poll = 0.0
            for key, mask in events:
                if key.data is None:
                    try:
                        self._accept()
                    except Exception:  # never the broker: the listener is polled again on the next round
                        self._throttle("internal", logging.ERROR, "internal error accepting", exc_info=True)
                    continue
                peer = key.data
                try:
                    if mask & selectors.EVENT_WRITE:
                        self._flush(peer)
                    if mask & selectors.EVENT_READ and peer.id in self.peers:
                        self._read(peer)
                except Exception:  # a broker bug costs this client its session, never the broker
                    self._throttle("internal", logging.ERROR, "internal error serving client %d (pid %d): "
                                   "disconnecting it", peer.id, peer.pid, exc_info=True)
                    self._drop(peer, force=True)
            now = time.monotonic()
            if now >= self._next_keeper_check:
                self._next_keeper_check = now + _KEEPER_CHECK
                self.store.check()
                self._retire_lost()
            if spinning and events:  # an empty spin round still checks idleness: else a client that hangs up
                continue                 # right after a request keeps an idle broker up until the next client
            if self.registry.idle and self.peers == {}:
                if self.idle_timeout is not None and time.monotonic() - self._idle_since >= self.idle_timeout:
                    log.info("idle for %.1fs: exiting", self.idle_timeout)
                    break
            else:
                self._idle_since = time.monotonic()
        self.sel.unregister(self.listener)
        self.listener.close()  # refuse newcomers at once: a broker starting meanwhile waits for this one to go
        for peer in list(self.peers.values()):
            self._drop(peer, force=True)
        self.store.close()
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None

    def _same_file(self, token_a: int, token_b: int) -> bool:
        """For re-attach (REGISTER under a live handle): do two kept fds refer to the same open file?"""
        try:
            fds, temps = self.store.resolve([token_a, token_b])
        except (KeyError, OSError):
            return False
        try:
            return same_file(fds[0], fds[1])
        finally:
            _close_all(temps)

    # -- connections --------------------------------------------------------------------------------------------------
    def _accept(self) -> None:
        for _ in range(256):  # bounded: a flood of connections must not starve the clients already served
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and friends: keep serving the clients we have, answer "busy", back off
                self._out_of_fds_on_accept(e)
                return
            self._accept_backoff = 0.0
            try:
                self._admit(sock)
            except OSError:  # the peer went away before we could ask its credentials
                sock.close()

    def _admit(self, sock: socket.socket, refusal: TexbridgeError | None = None) -> _Peer | None:
        sock.setblocking(False)
        creds = peer_credentials(sock)
        pid, uid = creds.pid, creds.uid
        held = self._per_uid[uid]
        if refusal is None and held >= self.max_connections:
            if held >= self.max_connections + _REFUSED_EXTRA:
                sock.close()  # past the answered few: a flood is cut without holding an fd per connection
                self._throttle("conn-limit", logging.WARNING, "uid %d is over %d connections: closing new ones",
                               uid, self.max_connections)
                return None
            refusal = QuotaExceeded(f"uid {uid} already has {held} connections to this broker (at most "
                                    f"{self.max_connections}); close some sessions")
        peer = _Peer(self._next_id, sock, pid, uid)
        self._next_id += 1
        if refusal is None:
            try:
                self.registry.connect(peer.id, pid, uid)
            except AccessDenied as e:
                refusal = e
        # A refused peer gets its refusal in answer to its first frame, then is hung up on: closing at once, with
        # its HELLO unread, would reset the connection and the client would never learn why.
        peer.refusal = refusal
        self._per_uid[uid] += 1
        self.peers[peer.id] = peer
        self.sel.register(sock, selectors.EVENT_READ, peer)
        return peer

    def _out_of_fds_on_accept(self, e: OSError) -> None:
        """Accept failed (EMFILE...): spend the reserve fd on one connection to tell it "busy", stop polling the
        listener for a while (exponential back-off, so a full fd table costs no CPU), log at a bounded rate."""
        self._throttle("accept", logging.WARNING, "accept failed: %s (%d clients): backing off", e,
                       len(self.peers))
        for _ in range(64):  # answer the waiting clients whose HELLO is already there, one reserve fd at a time
            if e.errno not in _FD_ERRORS or self._reserve is None:
                break
            os.close(self._reserve)
            self._reserve = None
            peer = None
            try:
                sock, _ = self.listener.accept()
            except OSError:
                sock = None
            if sock is not None:
                try:
                    peer = self._admit(sock, BrokerBusy(
                        "the broker is out of file descriptors; retry later, or close resources or sessions"))
                except OSError:
                    sock.close()
            if peer is None:
                self._reopen_reserve()
                break
            peer.reserve = True  # its fd is the reserve's: reopened when it goes
            self._read(peer)  # answered and dropped at once if its HELLO arrived, which reopens the reserve
        self._accept_backoff = min(1.0, max(0.01, self._accept_backoff * 2))
        self._accept_paused_until = time.monotonic() + self._accept_backoff
        self.sel.unregister(self.listener)

    def _reopen_reserve(self) -> None:
        try:
            self._reserve = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._reserve = None  # tried again when the next reserve-peer goes

    def _drop(self, peer: _Peer, force: bool = False) -> None:
        if self.peers.pop(peer.id, None) is None:
            return
        self._per_uid[peer.uid] -= 1
        if self._per_uid[peer.uid] <= 0:
            del self._per_uid[peer.uid]
        try:
            self.sel.unregister(peer.sock)
        except (KeyError, ValueError):
            pass
        peer.sock.close()
        for _, fds in peer.queue:
            _close_all(fds)
        peer.queue.clear()
        if self._reserve is None:
            self._reopen_reserve()
        try:
            self._apply(self.registry.disconnect(peer.id))
        except Exception:
            if not force:
                raise
            self._throttle("internal", logging.ERROR, "internal error dropping client %d", peer.id, exc_info=True)

    # -- receiving ------------------------------------------------------------------------------------------------------
    def _read(self, peer: _Peer) -> None:
        for _ in range(64):  # bounded, so one chatty client cannot starve the rest
            try:
                data, fds, truncated = recv_frame(peer.sock)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._drop(peer)
                return
            if not data and not fds:
                self._drop(peer)
                return
            try:
                if self._frame(peer, data, fds, truncated):
                    return
            except Exception:
                _close_all(fds)  # still ours: _frame empties the list once it has closed or kept them
                raise

    def _frame(self, peer: _Peer, data: bytes, fds: list[int], truncated: bool) -> bool:
        """Serve one received frame; True when the peer is gone or must not be read further now."""
        if peer.refusal is not None:
            _close_all(fds)
            fds.clear()
            self._send(peer, error_message(peek_request_id(data), peer.refusal), ())
            peer.hangup = True
            self._maybe_hangup(peer)
            return True
        try:
            msg = peer.conn.receive(data, len(fds), truncated=truncated)
        except Exception as e:
            _close_all(fds)
            fds.clear()
            if not isinstance(e, RemoteProtocolError):
                self._throttle("decode", logging.ERROR, "internal error decoding a frame", exc_info=True)
                e = RemoteProtocolError(f"undecodable frame ({type(e).__name__})")
            if truncated and len(data) <= MAX_FRAME and _out_of_fds():  # fds cut, not data: count ours (O(fds))
                e = BrokerBusy("the broker is out of file descriptors (RLIMIT_NOFILE): the fds of this "
                               "message were dropped; close resources or raise the broker's limit")
            self.registry.count_error(e, "?", peer.id)
            self._send(peer, error_message(peek_request_id(data), e), ())
            if peer.conn.state is State.AWAITING_HELLO:
                peer.hangup = True
                self._maybe_hangup(peer)
                return True
            return False
        tokens: list[int] = []
        kept: list = []
        if fds:  # most requests (OPEN, CLOSE) carry none
            facts = [inspect_fd(fd) for fd in fds]
            try:
                tokens = self.store.keep(fds)  # from here on the store owns the fds; the registry sees tokens
                fds.clear()
            except OSError as e:  # keep() closed them
                fds.clear()
                busy = BrokerBusy(f"the broker cannot keep more fds: {e}")
                self.registry.count_error(busy, msg.op.value, peer.id)
                self._send(peer, error_message(msg.request_id, busy), ())
                self._retire_lost()
                return False
            kept = list(zip(tokens, facts))
        try:
            fx = self.registry.handle(peer.id, msg, kept)
        except Exception:  # a broker bug must cost one request, never the broker
            self._throttle("internal", logging.ERROR, "internal error on %s from client %d", msg.op.value,
                           peer.id, exc_info=True)
            self.store.drop(tokens)
            fx = Effects()
            fx.error(peer.id, msg.request_id, TexbridgeError("internal broker error (see the broker log)"))
        self._apply(fx)
        if msg.op is _BYE:
            peer.hangup = True
        return self._maybe_hangup(peer) or peer.id not in self.peers

    def _maybe_hangup(self, peer: _Peer) -> bool:
        if peer.hangup and not peer.queue and peer.id in self.peers:
            self._drop(peer)
            return True
        return False

    # -- effects and sending --------------------------------------------------------------------------------------------
    def _apply(self, fx: Effects) -> None:
        if not (fx.out or fx.close or fx.abandon or fx.shutdown):  # a quiet CLOSE that retired nothing
            if self.store.lost:
                self._retire_lost()
            return
        for out in fx.out:
            peer = self.peers.get(out.client)
            if peer is None:
                continue
            try:
                fds, temps = self.store.resolve(out.fds)
            except (KeyError, OSError) as e:
                # KeyError: a token its dead keeper took along. The resource is retired just below (_retire_lost).
                lost = isinstance(e, KeyError) or (isinstance(e, KeeperError) and e.dead)
                err = NotFound("the resource was lost: the broker's fd keeper holding it died") if lost else \
                    TexbridgeError(f"internal broker error: cannot fetch the resource's fds ({e})")
                self._throttle("lost", logging.ERROR, "could not send the fds of a resource: %r", e)
                self._send(peer, error_message(out.message.request_id, err), ())
                continue
            try:
                self._send(peer, out.message, tuple(fds))
            finally:
                _close_all(temps)
        for token, session in fx.abandon:
            if self._abandon is not None:
                try:
                    fds, temps = self.store.resolve([token])
                    try:
                        self._abandon(fds[0], session)
                    finally:
                        _close_all(temps)
                except Exception as e:  # the state is client-writable memory: anything may be wrong with it
                    self._throttle("abandon", logging.WARNING, "could not abandon keyed mutex of session %d: %s",
                                   session, e)
        self.store.drop(fx.close)
        if fx.shutdown:
            self._running = False
        self._retire_lost()

    def _retire_lost(self) -> None:
        """Resources whose fds died with an fd keeper are retired: NotFound from now on, watchers told."""
        lost = self.store.take_lost()
        if lost:
            self._apply(self.registry.lose(lost))

    def _send(self, peer: _Peer, msg: Message, fds: tuple[int, ...]) -> None:
        try:
            data = peer.conn.send(msg)
        except LocalProtocolError as e:  # a reply we cannot encode (too large...): costs this request only
            self._throttle("encode", logging.ERROR, "cannot send %s to client %d: %s", msg.op.value, peer.id, e)
            if msg.op is Op.EVENT:
                return  # an event nobody asked for: dropping it is the only thing to do
            err = TexbridgeError(f"internal broker error: the {msg.op.value} could not be encoded (see the log)")
            self.registry.count_error(err, msg.op.value, peer.id)
            data, fds = peer.conn.send(error_message(msg.request_id, err)), ()
        if not peer.queue and self._send_now(peer, data, fds):
            return
        if len(peer.queue) >= _MAX_QUEUE:
            self._throttle("slow", logging.WARNING, "client %d (pid %d) does not read its replies: disconnecting",
                           peer.id, peer.pid)
            self._drop(peer)
            return
        dups: list[int] = []
        try:
            for fd in fds:
                dups.append(os.dup(fd))
        except OSError as e:  # out of fds: the reply cannot keep its fds, so it becomes "busy"
            _close_all(dups)
            busy = BrokerBusy(f"the broker is out of file descriptors: {e}")
            data, dups = peer.conn.send(error_message(msg.request_id, busy)), []
        peer.queue.append((data, tuple(dups)))
        self.sel.modify(peer.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, peer)

    def _send_now(self, peer: _Peer, data: bytes | Message, fds: tuple[int, ...]) -> bool:
        if isinstance(data, Message):
            data = peer.conn.send(data)
        try:
            send_frame(peer.sock, data, fds)
            return True
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as e:
            if e.errno not in (errno.EPIPE, errno.ECONNRESET):
                log.warning("send to client %d failed: %s", peer.id, e)
            peer.hangup = True
            return True  # nothing more will reach this peer; its read side will notice the hang-up

    def _flush(self, peer: _Peer) -> None:
        while peer.queue:
            data, fds = peer.queue[0]
            if not self._send_now(peer, data, fds):
                return
            peer.queue.popleft()
            _close_all(fds)
        if peer.id in self.peers:
            self.sel.modify(peer.sock, selectors.EVENT_READ, peer)
            self._maybe_hangup(peer)
