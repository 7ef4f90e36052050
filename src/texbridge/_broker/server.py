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

from .._errors import AccessDenied, NotFound, QuotaExceeded, RemoteProtocolError, TexbridgeError
from .._memfd import inspect_fd, same_file
from .._protocol import Connection, Message, Op, State, peek_request_id
from .._unix import close_fds as _close_all
from .._unix import SPIN_SECONDS, recv_frame, send_frame
from ._keeper import raise_fd_limit  # noqa: F401  (re-exported: the daemon and benchmarks use it from here)
from .fdstore import FdStore, KeeperError
from .registry import Effects, Registry

log = logging.getLogger("texbridge.broker")
_MAX_QUEUE = 1024  # frames queued to a client that does not read; past this it is disconnected
_UCRED = struct.Struct("3i")
_KEEPER_CHECK = 0.5  # seconds between checks that the fd keepers are alive


@dataclass
class _Peer:
    id: int
    sock: socket.socket
    pid: int
    uid: int
    conn: Connection = field(default_factory=lambda: Connection(broker_side=True))
    queue: collections.deque = field(default_factory=collections.deque)  # (bytes, dup'd fds)
    hangup: bool = False
    refusal: AccessDenied | None = None  # set for a uid the policy does not admit


def _out_of_fds() -> bool:
    """True when this process is at its RLIMIT_NOFILE, which makes the kernel drop received fds (MSG_CTRUNC)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return len(os.listdir("/proc/self/fd")) >= soft - 16


class BrokerServer:
    def __init__(self, listener: socket.socket, registry: Registry, *, idle_timeout: float | None,
                 abandon=None) -> None:
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
        listener.setblocking(False)
        self.sel.register(listener, selectors.EVENT_READ, None)

    def stop(self, *_: object) -> None:
        self._running = False

    def serve(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        busy_until = 0.0
        while self._running:
            # After serving, poll without sleeping for a moment: the next request of a busy client usually follows
            # within microseconds, and catching it awake saves an idle-CPU wake-up on each side (see _unix).
            spinning = time.perf_counter() < busy_until
            events = self.sel.select(timeout=0 if spinning else 0.5)
            if events:
                busy_until = time.perf_counter() + SPIN_SECONDS
            for key, mask in events:
                if key.data is None:
                    self._accept()
                    continue
                peer = key.data
                if mask & selectors.EVENT_WRITE:
                    self._flush(peer)
                if mask & selectors.EVENT_READ and peer.id in self.peers:
                    self._read(peer)
            now = time.monotonic()
            if now >= self._next_keeper_check:
                self._next_keeper_check = now + _KEEPER_CHECK
                self.store.check()
                self._retire_lost()
            if spinning:
                continue
            if self.registry.idle and self.peers == {}:
                if self.idle_timeout is not None and time.monotonic() - self._idle_since >= self.idle_timeout:
                    log.info("idle for %.1fs: exiting", self.idle_timeout)
                    break
            else:
                self._idle_since = time.monotonic()
        self.sel.unregister(self.listener)
        self.listener.close()  # refuse newcomers at once: a broker starting meanwhile waits for this one to go
        for peer in list(self.peers.values()):
            self._drop(peer)
        self.store.close()

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
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and friends: keep serving the clients we have
                log.warning("accept failed: %s", e)
                return
            sock.setblocking(False)
            pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
            peer = _Peer(self._next_id, sock, pid, uid)
            self._next_id += 1
            try:
                self.registry.connect(peer.id, pid, uid)
            except AccessDenied as e:
                # Answer its first frame with the refusal, then hang up: closing at once, with its HELLO unread,
                # would reset the connection and the client would never learn why.
                peer.refusal = e
            self.peers[peer.id] = peer
            self.sel.register(sock, selectors.EVENT_READ, peer)

    def _drop(self, peer: _Peer) -> None:
        if self.peers.pop(peer.id, None) is None:
            return
        self.sel.unregister(peer.sock)
        peer.sock.close()
        for _, fds in peer.queue:
            _close_all(fds)
        peer.queue.clear()
        self._apply(self.registry.disconnect(peer.id))

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
            if peer.refusal is not None:
                _close_all(fds)
                err = peer.refusal
                self._send(peer, Message(Op.ERROR, peek_request_id(data), {"code": err.code, "message": str(err)}), ())
                peer.hangup = True
                self._maybe_hangup(peer)
                return
            try:
                msg = peer.conn.receive(data, len(fds), truncated=truncated)
            except RemoteProtocolError as e:
                _close_all(fds)
                if truncated and _out_of_fds():
                    e = QuotaExceeded("the broker is out of file descriptors (RLIMIT_NOFILE): the fds of this "
                                      "message were dropped; close resources or raise the broker's limit")
                self.registry.counters["errors"] += 1
                self._send(peer, Message(Op.ERROR, peek_request_id(data), {"code": e.code, "message": str(e)}), ())
                if peer.conn.state is State.AWAITING_HELLO:
                    peer.hangup = True
                    self._maybe_hangup(peer)
                    return
                continue
            facts = [inspect_fd(fd) for fd in fds]
            try:
                tokens = self.store.keep(fds)  # from here on the store owns the fds; the registry sees tokens
            except OSError as e:
                self._send(peer, Message(Op.ERROR, msg.request_id, {
                    "code": QuotaExceeded.code, "message": f"the broker cannot keep more fds: {e}"}), ())
                self._retire_lost()
                continue
            try:
                fx = self.registry.handle(peer.id, msg, list(zip(tokens, facts)))
            except Exception:  # a broker bug must cost one request, never the broker
                log.exception("internal error on %s from client %d", msg.op.value, peer.id)
                self.store.drop(tokens)
                fx = Effects()
                fx.error(peer.id, msg.request_id, TexbridgeError("internal broker error (see the broker log)"))
            self._apply(fx)
            if msg.op is Op.BYE:
                peer.hangup = True
            if self._maybe_hangup(peer):
                return

    def _maybe_hangup(self, peer: _Peer) -> bool:
        if peer.hangup and not peer.queue and peer.id in self.peers:
            self._drop(peer)
            return True
        return False

    # -- effects and sending --------------------------------------------------------------------------------------------
    def _apply(self, fx: Effects) -> None:
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
                log.error("could not send the fds of a resource: %r", e)
                self._send(peer, Message(Op.ERROR, out.message.request_id, {"code": err.code, "message": str(err)}),
                           ())
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
                except (TexbridgeError, OSError, ValueError, KeyError) as e:
                    log.warning("could not abandon keyed mutex of session %d: %s", session, e)
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
        data = peer.conn.send(msg)
        if not peer.queue and self._send_now(peer, data, fds):
            return
        if len(peer.queue) >= _MAX_QUEUE:
            log.warning("client %d (pid %d) does not read its replies: disconnecting", peer.id, peer.pid)
            self._drop(peer)
            return
        peer.queue.append((data, tuple(os.dup(fd) for fd in fds)))
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
