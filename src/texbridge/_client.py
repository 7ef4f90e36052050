"""The client: a Session is one connection to the namespace's broker, over the same pure protocol the broker speaks.

Requests are synchronous and serialized by a lock, so a Session may be shared between threads. Events (WATCH) use
their own connection: a watcher never has to untangle pushed events from replies on a busy session.

Fd ownership: fds arriving with a reply belong to the caller of _request(); an error or a protocol failure closes
them here before raising, so no path leaks one.

Surviving the broker (docs/architecture.md, "Handle lifecycle"): a Session keeps, for every handle it holds, a dup of
the fds it registered or opened it with, its descriptor, meta and the names it published. When its connection hangs
up (noticed at once by one process-wide monitor thread, or by the next request) it connects again — starting a new
broker as any client would — and registers each of them under the same handle; holders of the same resource in
other processes join that one entry. A request cut by the loss is sent again once where that is safe.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator

import msgpack

from ._descriptor import FD_MEMORY, FD_MUTEX, FD_SEMAPHORE, Descriptor, Usage
from ._errors import (BrokenError, BrokerUnavailable, ClosedError, InvalidDescriptor, NameInUse, RemoteProtocolError,
                      TexbridgeError, error_from_code)
from ._fdlimit import raise_fd_limit
from ._handle import Handle
from ._launch import connect_socket
from ._paths import namespace_name
from ._protocol import VERSION, Connection, Message, Op
from ._resources import Resource
from ._seqpacket import close_fds as _close
from ._seqpacket import recv_frame_spinning, send_frame
from .backends import DEFAULT_IMPORTER, get_backend
from .backends._fds import OwnedFds

log = logging.getLogger("texbridge")

# Requests sent again, once, after re-attaching to a new broker: the old broker's half-done effect died with it, and
# repeating them yields the state the caller asked for. UNPUBLISH, SHUTDOWN and BYE are not: the broker they were
# meant for is gone, so the caller is told (BrokenError) rather than have them applied to its successor.
_RETRIED = frozenset({Op.REGISTER, Op.OPEN, Op.INFO, Op.LIST, Op.STATS, Op.PUBLISH, Op.UPDATE})


@dataclass(frozen=True)
class Event:
    """A broker event: kind is published, unpublished, updated, released or retired."""

    kind: str
    fields: dict[str, Any]

    @property
    def handle(self) -> Handle | None:
        h = self.fields.get("handle")
        return Handle(h) if h else None

    @property
    def name(self) -> str | None:
        return self.fields.get("name")


_EVENT, _ERROR = Op.EVENT, Op.ERROR  # module constants: an Op.X lookup costs ~0.1 us on every reply

class _Channel:
    """One SOCK_SEQPACKET connection: send a request, wait for its reply (fds included)."""

    def __init__(self, namespace: str, *, app_name: str, autostart: bool, timeout: float,
                 session_id: int | None = None) -> None:
        self.lock = threading.Lock()
        hello: dict[str, Any] = {"version": VERSION, "name": app_name, "pid": os.getpid()}
        if session_id is not None:
            hello["session_id"] = session_id  # re-attaching: keyed mutexes record their owner by session id
        deadline = time.monotonic() + timeout
        while True:
            self.sock = connect_socket(namespace, autostart=autostart, timeout=max(0.1, deadline - time.monotonic()))
            self.conn = Connection(broker_side=False)
            try:
                # A broker that is stopped (SIGSTOP), wedged or never accepts still lets connect() succeed (the
                # listen backlog takes it): only a deadline on the hello turns that into an error instead of a hang.
                self.sock.settimeout(max(0.1, deadline - time.monotonic()))
                try:
                    self.hello = self.request(Op.HELLO, hello)[0]
                except TimeoutError:
                    raise BrokerUnavailable(f"the broker for namespace {namespace_name(namespace)!r} accepted the "
                                            f"connection but did not answer within {timeout:g}s (stopped or "
                                            f"wedged? `texbridge broker status`)") from None
                self.sock.settimeout(None)
                return
            except BrokenError:
                self.close()
                if time.monotonic() >= deadline:
                    raise
                # Hung up before any answer: we reached a broker that was exiting (idle) as we connected. The next
                # connect finds, or starts, its successor.
            except BaseException:
                self.close()
                raise

    def request(self, op: Op, fields: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> tuple[dict, list[int]]:
        with self.lock:
            rid = self._send(op, fields, fds)
            while True:
                reply, rfds = self._receive()
                if reply.op is _EVENT:
                    _close(rfds)
                    continue
                if reply.request_id != rid and reply.request_id != 0:
                    _close(rfds)
                    continue
                if reply.op is _ERROR:
                    _close(rfds)
                    raise error_from_code(str(reply.fields.get("code")), str(reply.fields.get("message")))
                return reply.fields, rfds

    def notify(self, op: Op, fields: dict[str, Any]) -> None:
        """Send a request that expects no reply (a quiet CLOSE): one send, no round trip."""
        with self.lock:
            self._send(op, fields, ())

    def _send(self, op: Op, fields: dict[str, Any], fds: list[int] | tuple[int, ...]) -> int:
        """Send one request; its request id."""
        if self.sock is None:
            raise ClosedError("the session is closed")
        rid, data = self.conn.request(op, fields, len(fds))
        try:
            send_frame(self.sock, data, fds)
        except OSError as e:
            self._raise_parting_error()  # the broker may have said why it hung up (e.g. uid not allowed)
            raise BrokenError(f"lost the broker while sending {op.value}: {e.strerror}") from None
        return rid

    def _raise_parting_error(self) -> None:
        assert self.sock is not None
        self.sock.setblocking(False)
        try:
            msg, fds = self._receive()
        except (BlockingIOError, BrokenError, RemoteProtocolError):
            return
        finally:
            if self.sock is not None:
                self.sock.setblocking(True)
        _close(fds)
        if msg.op is Op.ERROR:
            raise error_from_code(str(msg.fields.get("code")), str(msg.fields.get("message")))

    def _receive(self) -> tuple[Message, list[int]]:
        assert self.sock is not None
        try:
            data, fds, truncated = recv_frame_spinning(self.sock)
        except (InterruptedError, TimeoutError, BlockingIOError):
            raise
        except OSError as e:
            raise BrokenError(f"lost the broker: {e.strerror}") from None
        if not data and not fds:
            raise BrokenError("the broker closed the connection")
        try:
            return self.conn.receive(data, len(fds), truncated=truncated), fds
        except RemoteProtocolError:
            _close(fds)
            raise

    def receive_event(self) -> Event:
        with self.lock:
            while True:
                msg, fds = self._receive()
                _close(fds)
                if msg.op is Op.EVENT:
                    fields = dict(msg.fields)
                    return Event(str(fields.pop("event", "")), fields)

    def close(self) -> None:
        with self.lock:
            sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()


@dataclass(eq=False, slots=True)
class _Held:
    """What a session needs to bring one handle back on a new broker: its descriptor, a dup of the very fds it was
    registered or opened with (the same files, so the broker can match them with other holders'), the meta and names
    this session gave it, and how many references (Resources) this session holds."""

    wire: dict[str, Any] | bytes  # the descriptor's map, or the msgpack bytes an OPEN reply carried
    fds: list[int]
    count: int = 1
    meta: dict[str, Any] | None = None
    names: set[str] = field(default_factory=set)

    @property
    def descriptor(self) -> dict[str, Any]:
        """The wire map to register it with again (bytes are decoded only then: re-attaching is rare, OPEN is not)."""
        return _unpack_descriptor(self.wire)


def _keep(fds: list[int] | tuple[int, ...]) -> list[int]:
    """Dups of `fds` for re-attaching later, or [] (and a warning) when the process is out of fds."""
    kept: list[int] = []
    try:
        for fd in fds:
            try:
                kept.append(os.dup(fd))
            except OSError as e:
                if e.errno != errno.EMFILE:
                    raise
                raise_fd_limit()
                kept.append(os.dup(fd))
    except OSError as e:
        _close(kept)
        log.warning("texbridge: cannot keep fds to re-attach a resource after a broker restart (%s)", e.strerror)
        return []
    return kept


class Session:
    """A connection to one namespace's broker. Create with texbridge.connect(); close it (or use `with`).

    Closing the session drops every reference it holds, exactly as if the process had died: resources others still
    hold live on, the rest are freed by the broker. If the broker itself dies, the session re-attaches everything it
    holds to a new one, under the same handles and names (`reattached` counts how often; `broker_pid` follows).
    """

    def __init__(self, namespace: str | None = None, *, app_name: str | None = None, autostart: bool = True,
                 timeout: float = 10.0) -> None:
        self.namespace = namespace_name(namespace)
        self.app_name = app_name or os.path.basename(sys.argv[0] or "python")
        self._autostart, self._timeout = autostart, timeout
        self._lock = threading.RLock()  # the channel, _held, and re-attaching
        self._held: dict[int, _Held] = {}  # handle -> what re-attaching needs
        self._resources: dict[int, Resource] = {}
        self._closed = False
        self.reattached = 0  # times this session re-attached to a new broker
        self._channel = self._new_channel(None)

    def _new_channel(self, session_id: int | None) -> _Channel:
        channel = _Channel(self.namespace, app_name=self.app_name, autostart=self._autostart, timeout=self._timeout,
                           session_id=session_id)
        self.session_id: int = channel.hello["session_id"]
        self.broker_pid: int = channel.hello["broker_pid"]
        _MONITOR.watch(self, channel)
        return channel

    # -- requests that survive the broker ---------------------------------------------------------------------------
    def _request(self, op: Op, fields: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> tuple[dict, list[int]]:
        channel = self._channel
        try:
            return channel.request(op, fields, fds)
        except BrokenError as e:
            if not self._reattach(channel):
                raise
            if op not in _RETRIED:
                raise BrokenError(f"the broker went away during {op.value} ({e}); this session re-attached to a new "
                                  f"broker, but {op.value} is not sent again: that broker never had its effect")
        return self._channel.request(op, fields, fds)

    def _reattach(self, lost: _Channel) -> bool:
        """Connect again (starting a broker if allowed) and re-register everything held. False if no broker could be
        reached; the session stays usable and tries again at its next request (or the monitor's next round)."""
        with self._lock:
            if self._closed:
                return False
            if self._channel is not lost:
                return True  # another thread (or the monitor) did it already
            try:
                channel = self._new_channel(self.session_id)
            except TexbridgeError as e:
                log.debug("texbridge: re-attach to namespace %r failed: %s", self.namespace, e)
                return False
            self._channel = channel
            _MONITOR.forget(lost)
            lost.close()
            try:
                self._restore(channel)
            except BrokenError:
                pass  # the new broker went away too: the next request or the monitor starts over
            self.reattached += 1
            return True

    def _restore(self, channel: _Channel) -> None:
        for handle, held in list(self._held.items()):
            if not held.fds:
                log.warning("texbridge: %s cannot be re-attached (no fds were kept for it)", Handle(handle))
                continue
            fields: dict[str, Any] = {"descriptor": held.descriptor, "handle": handle}
            if held.meta is not None:
                fields["meta"] = held.meta
            try:
                channel.request(Op.REGISTER, fields, held.fds)
                for _ in range(held.count - 1):  # one broker reference per Resource, as before
                    _close(channel.request(Op.OPEN, {"handle": handle})[1])
            except BrokenError:
                raise
            except TexbridgeError as e:
                log.warning("texbridge: could not re-attach %s to the new broker: %s", Handle(handle), e)
                continue
            for name in sorted(held.names):
                try:
                    channel.request(Op.PUBLISH, {"handle": handle, "name": name})
                except BrokenError:
                    raise
                except (NameInUse, TexbridgeError) as e:
                    held.names.discard(name)
                    log.warning("texbridge: could not re-publish %r: %s", name, e)

    def _hung_up(self, channel: _Channel) -> bool | None:
        """The monitor saw `channel` hang up. Re-attach now if anything is held (None: nothing to do)."""
        if self._closed or self._channel is not channel:
            return None
        if not self._held:
            return None  # nothing to restore: reconnect lazily, at the next request
        return self._reattach(channel)

    # -- creating ---------------------------------------------------------------------------------------------------
    def create_texture(self, width: int, height: int, format: str = "rgba8", *, name: str | None = None,
                       backend: str = "memfd", keyed_mutex: bool = False, usage: int = int(Usage.DEFAULT),
                       **options: Any) -> Resource:
        """Allocate a shareable texture in `backend` memory and register it; `name` also publishes it."""
        res = get_backend(backend).create_texture(width, height, format, usage=usage, keyed_mutex=keyed_mutex,
                                                  **options)
        return self._register(res, name)

    def create_buffer(self, size: int, *, name: str | None = None, backend: str = "memfd",
                      keyed_mutex: bool = False, usage: int = int(Usage.DEFAULT), **options: Any) -> Resource:
        res = get_backend(backend).create_buffer(size, usage=usage, keyed_mutex=keyed_mutex, **options)
        return self._register(res, name)

    def create_keyed_mutex(self, *, name: str | None = None, initial_key: int = 0):
        """A standalone named cross-process keyed mutex (no memory attached)."""
        from .keyed_mutex import KeyedMutex, create_state

        from ._descriptor import KEYED_MUTEX_STATE_SIZE
        fd = create_state(initial_key)
        try:
            desc = Descriptor(kind="keyed_mutex", size=KEYED_MUTEX_STATE_SIZE, backend="memfd").validate()
            mutex = KeyedMutex(fd, session_id=self.session_id)
            try:
                handle = self._register_fds(desc, name, [fd])
            except BaseException:
                mutex.close()
                raise
            fd = -1  # kept for re-attaching
        finally:
            if fd >= 0:
                os.close(fd)
        return self._track(_MutexResource(desc, mutex), handle)

    def _register(self, res: Resource, name: str | None) -> Resource:
        fds: list[int] = []
        mutex = None
        try:
            fds = res.export_fds()
            if res.descriptor.keyed_mutex:
                from .keyed_mutex import KeyedMutex, create_state

                fds.append(create_state(0))
                mutex = KeyedMutex(fds[-1], session_id=self.session_id)
            handle = self._register_fds(res.descriptor, name, fds)
            fds = []  # kept for re-attaching
        except BaseException:
            if mutex is not None:
                mutex.close()
            res.close()
            raise
        finally:
            _close(fds)
        return self._track(res, handle, mutex)

    def _register_fds(self, desc: Descriptor, name: str | None, fds: list[int]) -> Handle:
        """REGISTER; on success the session keeps `fds` (it owns them from here on) to re-attach later."""
        wire = desc.to_wire()
        with self._lock:
            fields, _ = self._request(Op.REGISTER, _register_fields(wire, name), fds)
            self._hold(fields["handle"], wire, list(fds), {name} if name is not None else set())
        return Handle(fields["handle"])

    def _hold(self, handle: int, wire: dict[str, Any], kept: list[int], names: set[str] = set()) -> None:
        if self._add_ref(handle, names):
            _close(kept)  # the first reference's fds do
        else:
            self._held[handle] = _Held(wire, kept, names=set(names))

    def _add_ref(self, handle: int, names: set[str] = set()) -> bool:
        """Count one more reference to a handle this session already keeps; False when it keeps none yet."""
        held = self._held.get(handle)
        if held is None:
            return False
        held.count += 1
        held.names |= names
        return True

    def _track(self, res: Resource, handle: Handle, mutex=None) -> Resource:
        res._attach(self, handle, mutex if mutex is not None else res._mutex)
        self._resources[id(res)] = res
        return res

    # -- opening ----------------------------------------------------------------------------------------------------
    def open(self, handle_or_name: "Handle | str | int", *, backend: str | None = None, **options: Any) -> Resource:
        """Open a shared resource by handle (`tb:...`) or published name, imported into `backend`'s API.

        The default backend is the one that gives NumPy-visible memory where possible (memfd → NumPy views).
        """
        with self._lock:
            fields, fds = self._request(Op.OPEN, _target(handle_or_name))
            try:
                packed = fields["descriptor"]
                desc = _open_descriptor(packed)
                roles = desc.fd_roles
                if len(fds) != len(roles):
                    raise InvalidDescriptor(f"the broker sent {len(fds)} fds for a descriptor needing {len(roles)}")
            except BaseException:
                _close(fds)
                self._close_handle(fields.get("handle"))
                raise
            value = fields["handle"]
            # the reply names the handle asked for: the caller's Handle object serves (a new one costs ~1 us)
            handle = handle_or_name if type(handle_or_name) is Handle and handle_or_name.value == value \
                else Handle(value)
            if not self._add_ref(value):  # dup and keep the fds only for the first reference
                self._held[handle.value] = _Held(packed, _keep(fds))
        mutex = None
        try:
            # What nobody takes closes on leaving: the mutex's fd too (its mapping keeps the state alive, _held a dup).
            with OwnedFds(fds, roles) as owned:
                if FD_MUTEX in roles:
                    from .keyed_mutex import KeyedMutex

                    mutex = KeyedMutex(owned.get(FD_MUTEX), session_id=self.session_id)
                if desc.kind == "keyed_mutex":
                    res: Resource = _MutexResource(desc, mutex)
                else:
                    chosen = get_backend(backend or DEFAULT_IMPORTER.get(desc.memory, "memfd"))
                    # the backend owns the memory and semaphore fds from here on
                    res = chosen.import_resource(desc, owned.take(FD_MEMORY, FD_SEMAPHORE), **options)
        except BaseException:
            if mutex is not None:
                mutex.close()
            self._release_handle(handle.value)
            raise
        return self._track(res, handle, mutex)

    def info(self, handle_or_name: "Handle | str | int") -> dict[str, Any]:
        fields, _ = self._request(Op.INFO, _target(handle_or_name))
        return fields

    # -- names, listing, events -------------------------------------------------------------------------------------
    def publish(self, handle: "Handle | str | int", name: str) -> None:
        value = Handle.parse(handle).value
        with self._lock:
            self._request(Op.PUBLISH, {"handle": value, "name": name})
            if value in self._held:
                self._held[value].names.add(name)

    def unpublish(self, name: str) -> None:
        with self._lock:
            for held in self._held.values():
                held.names.discard(name)
            self._request(Op.UNPUBLISH, {"name": name})

    def update(self, handle: "Handle | str | int", meta: dict[str, Any]) -> None:
        """Attach small metadata (shown by `ls`, pushed to watchers as an `updated` event)."""
        value = Handle.parse(handle).value
        with self._lock:
            self._request(Op.UPDATE, {"handle": value, "meta": meta})
            if value in self._held:
                self._held[value].meta = meta

    def list(self, kind: str | None = None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            fields = {"offset": len(out)} | ({"kind": kind} if kind else {})
            reply, _ = self._request(Op.LIST, fields)
            out.extend(reply["resources"])
            if not reply["resources"] or len(out) >= reply["total"]:
                return out

    def stats(self) -> dict[str, int]:
        return self._request(Op.STATS, {})[0]

    def shutdown(self, *, force: bool = True) -> None:
        """Ask the broker to exit (its own uid or root only): every client is cut off; clients holding resources
        re-attach them to a new broker. force=False refuses (AccessDenied, naming them) while others are connected."""
        self._request(Op.SHUTDOWN, {} if force else {"force": False})

    def watch(self) -> Iterator[Event]:
        """Events pushed by the broker (published, unpublished, updated, released, retired), on a new connection.

        After a broker restart the stream connects again by itself and yields a `reconnected` event (events of the
        gap are lost: list again)."""
        stream = _EventStream(self)
        stream._connect()
        return stream

    # -- closing ------------------------------------------------------------------------------------------------------
    def _drop(self, res: Resource, handle: Handle) -> None:
        """Called by Resource.close(): forget it (O(1): close is on the per-frame path of some users) and drop
        this session's reference at the broker."""
        self._resources.pop(id(res), None)
        self._release_handle(handle.value)

    def _release_handle(self, handle: int) -> None:
        with self._lock:
            held = self._held.get(handle)
            if held is not None:
                held.count -= 1
                if held.count <= 0:
                    del self._held[handle]
                    _close(held.fds)
            self._close_handle(handle)

    def _close_handle(self, handle: int | None) -> None:
        if handle is None or self._closed:
            return
        try:
            self._channel.notify(Op.CLOSE, {"handle": handle, "quiet": True})
        except (BrokenError, ClosedError):
            pass  # the broker dropped every reference of this connection already

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        for res in list(self._resources.values()):
            try:
                res.close()
            except TexbridgeError:
                pass
        self._resources.clear()
        with self._lock:
            self._closed = True
            channel = self._channel
            _MONITOR.forget(channel)
            for held in self._held.values():
                _close(held.fds)
            self._held.clear()
        if channel.sock is not None:
            try:
                channel.request(Op.BYE, {})
            except TexbridgeError:
                pass
            channel.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Session namespace={self.namespace!r} id={self.session_id} broker_pid={self.broker_pid}>"


class _Monitor:
    """One daemon thread per process that notices a broker connection hanging up and re-attaches its session at once
    (not at its next request, which may never come for a producer that only holds resources).

    It waits in epoll for EPOLLRDHUP alone, so replies and events never wake it: it costs nothing until a broker
    dies. A hung-up fd is removed from the set before anything else (a level-triggered hang-up left in the set is
    a busy loop); a failed re-attach is retried with a growing delay (0.05 s .. 1 s), never in a spin.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = -1
        self._ep: select.epoll | None = None
        # fd -> (session, channel), both weak: an unclosed Session that is dropped must still hang up when collected
        self._entries: dict[int, tuple[weakref.ref, weakref.ref]] = {}

    def watch(self, session: Session, channel: _Channel) -> None:
        sock = channel.sock
        if sock is None:
            return
        with self._lock:
            if self._pid != os.getpid():  # first use, or a forked child: the parent's thread is not here
                self._pid, self._ep, self._entries = os.getpid(), select.epoll(), {}
                threading.Thread(target=self._run, args=(self._ep,), name="texbridge-monitor", daemon=True).start()
            assert self._ep is not None
            fd = sock.fileno()
            self._entries[fd] = (weakref.ref(session), weakref.ref(channel))
            try:
                self._ep.register(fd, select.EPOLLRDHUP)
            except FileExistsError:
                self._ep.modify(fd, select.EPOLLRDHUP)

    def forget(self, channel: _Channel) -> None:
        sock = channel.sock
        if sock is None or self._ep is None or self._pid != os.getpid():
            return
        with self._lock:
            fd = sock.fileno()
            entry = self._entries.get(fd)
            if entry is not None and entry[1]() is channel:
                del self._entries[fd]
                try:
                    self._ep.unregister(fd)
                except OSError:
                    pass

    def _run(self, ep: select.epoll) -> None:
        retry: dict[int, tuple[float, float, weakref.ref, weakref.ref]] = {}  # id(channel) -> due, delay, refs
        while ep is self._ep:
            now = time.monotonic()
            timeout = max(0.0, min(r[0] for r in retry.values()) - now) if retry else -1
            try:
                events = ep.poll(timeout)
            except InterruptedError:
                continue
            except OSError:
                return
            work: list[tuple[weakref.ref, weakref.ref, float]] = []
            with self._lock:
                for fd, _mask in events:
                    entry = self._entries.pop(fd, None)
                    try:
                        ep.unregister(fd)
                    except OSError:
                        pass
                    if entry is not None and _hung_up(entry[1]()):
                        work.append((entry[0], entry[1], 0.05))
                    elif entry is not None:  # a reused fd number: not ours to act on; watch it again
                        self._entries[fd] = entry
                        ep.register(fd, select.EPOLLRDHUP)
            now = time.monotonic()
            for key, (due, delay, ref, channel) in list(retry.items()):
                if due <= now:
                    del retry[key]
                    work.append((ref, channel, min(delay * 2, 1.0)))
            for ref, channel_ref, delay in work:
                session, channel = ref(), channel_ref()
                if session is None or channel is None:
                    continue
                try:
                    ok = session._hung_up(channel)
                except Exception:  # never let the monitor die: it serves every session of the process
                    log.exception("texbridge: re-attaching a session failed")
                    ok = False
                if ok is False:
                    retry[id(channel)] = (time.monotonic() + delay, delay, ref, channel_ref)


def _hung_up(channel: _Channel | None) -> bool:
    sock = channel.sock if channel is not None else None
    if sock is None or sock.fileno() < 0:
        return True
    p = select.poll()
    p.register(sock.fileno(), select.POLLRDHUP)
    return any(mask & (select.POLLHUP | select.POLLRDHUP | select.POLLERR | select.POLLNVAL) for _, mask in p.poll(0))


_MONITOR = _Monitor()


class _EventStream:
    """Iterator over a watch connection's events; close() (or leaving a `with`) hangs up.

    When the broker goes away the stream connects again (starting a broker if its session may) and yields an
    Event("reconnected"); attempts are spaced (0.05 s .. 1 s), so a consumer polling next(timeout) never spins.
    Without autostart it gives up after the session's timeout and ends."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self._channel: _Channel | None = None
        self._closed = False
        self._lost_at = 0.0
        self._next_try = 0.0
        self._delay = 0.05

    def _connect(self) -> None:
        s = self._session
        channel = _Channel(s.namespace, app_name=s.app_name + ":watch", autostart=s._autostart, timeout=s._timeout)
        try:
            channel.request(Op.WATCH, {})
        except BaseException:
            channel.close()
            raise
        self._channel = channel

    def _recover(self, timeout: float | None) -> Event | None:
        """Called with no live connection: try to connect again, waiting at most `timeout` for the next attempt."""
        now = time.monotonic()
        if now < self._next_try:
            wait = self._next_try - now if timeout is None else min(timeout, self._next_try - now)
            time.sleep(max(0.0, wait))
            if time.monotonic() < self._next_try:
                return None
        try:
            self._connect()
        except TexbridgeError:
            self._next_try = time.monotonic() + self._delay
            self._delay = min(self._delay * 2, 1.0)
            if not self._session._autostart and time.monotonic() - self._lost_at > self._session._timeout:
                self.close()
            return None
        self._delay = 0.05
        return Event("reconnected", {})

    def _lost(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()
        self._lost_at = time.monotonic()
        self._next_try = 0.0

    def __iter__(self) -> "_EventStream":
        return self

    def __next__(self) -> Event:
        while not self._closed:
            if self._channel is None:
                ev = self._recover(None)
                if ev is not None:
                    return ev
                continue
            try:
                return self._channel.receive_event()
            except (BrokenError, RemoteProtocolError):
                self._lost()
        raise StopIteration

    @property
    def closed(self) -> bool:
        return self._closed

    def next(self, timeout: float | None = None) -> Event | None:
        """The next event, or None after `timeout` seconds."""
        if self._closed:
            return None
        channel = self._channel
        if channel is None:
            return self._recover(timeout)
        sock = channel.sock
        if sock is None:
            self._lost()
            return None
        sock.settimeout(timeout)
        try:
            return channel.receive_event()
        except socket.timeout:
            return None
        except (BrokenError, RemoteProtocolError):
            self._lost()
            return self._recover(0)
        finally:
            if self._channel is channel and channel.sock is not None:
                sock.settimeout(None)

    def fileno(self) -> int:
        channel = self._channel
        return channel.sock.fileno() if channel is not None and channel.sock is not None else -1

    def close(self) -> None:
        self._closed = True
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()

    def __enter__(self) -> "_EventStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _MutexResource(Resource):
    """A standalone keyed mutex: a resource whose only content is its `.mutex`."""

    backend_name = "memfd"

    def __init__(self, descriptor: Descriptor, mutex) -> None:
        super().__init__(descriptor)
        self.mutex = mutex

    def export_fds(self) -> list[int]:
        raise TexbridgeError("a standalone keyed mutex is registered at creation")

    def acquire(self, key: int, timeout: float | None = None):
        return self.mutex.acquire(key, timeout)

    def release(self, key: int, **kwargs: Any) -> None:
        self.mutex.release(key, **kwargs)

    def hold(self, **kwargs: Any):
        return self.mutex.hold(**kwargs)


def connect(namespace: str | None = None, *, app_name: str | None = None, autostart: bool = True,
            timeout: float = 10.0) -> Session:
    """Connect to the namespace's broker (TEXBRIDGE_NAMESPACE or "default"), starting one if none runs."""
    return Session(namespace, app_name=app_name, autostart=autostart, timeout=timeout)


def _unpack_descriptor(wire: Any) -> Any:
    """OPEN replies carry the descriptor as the broker keeps it, msgpack bytes; INFO replies as a map."""
    if isinstance(wire, bytes):
        try:
            return msgpack.unpackb(wire, raw=False)
        except Exception:
            raise RemoteProtocolError("the broker sent an undecodable descriptor") from None
    return wire


_DESCRIPTORS: dict[bytes, Descriptor] = {}  # packed descriptor -> its Descriptor, for _open_descriptor
_DESCRIPTORS_KEPT = 64


def _open_descriptor(packed: Any) -> Descriptor:
    """The Descriptor of an OPEN reply. Processes open the same few resources over and over (a receiver per frame,
    a viewer per sender); equal bytes decode to an equal immutable Descriptor, so the last few are kept (bounded:
    cleared when full) instead of unpacking and rebuilding one per OPEN. Structure checks run on every new one."""
    if type(packed) is not bytes:
        return Descriptor.from_wire(_unpack_descriptor(packed), validated=True)
    desc = _DESCRIPTORS.get(packed)
    if desc is None:
        desc = Descriptor.from_wire(_unpack_descriptor(packed), validated=True)
        if len(_DESCRIPTORS) >= _DESCRIPTORS_KEPT:
            _DESCRIPTORS.clear()
        _DESCRIPTORS[packed] = desc
    return desc


def _register_fields(wire: dict[str, Any], name: str | None) -> dict[str, Any]:
    fields: dict[str, Any] = {"descriptor": wire}
    if name is not None:
        fields["name"] = name
    return fields


def _target(handle_or_name: "Handle | str | int") -> dict[str, Any]:
    """A handle (Handle, int, or text with the tb: prefix: malformed text is InvalidArgument, never a name lookup)
    or a published name."""
    if type(handle_or_name) is Handle:  # the common case first: Handle validated its value when it was made
        return {"handle": handle_or_name.value}
    if isinstance(handle_or_name, (Handle, int)) or (isinstance(handle_or_name, str) and Handle.claims_to_be(handle_or_name)):
        return {"handle": Handle.parse(handle_or_name).value}
    if isinstance(handle_or_name, str):
        return {"name": handle_or_name}
    raise TypeError(f"open() takes a handle or a name, not {type(handle_or_name).__name__}")
