"""The client: a Session is one connection to the namespace's broker, over the same pure protocol the broker speaks.

Requests are synchronous and serialized by a lock, so a Session may be shared between threads. Events (WATCH) use
their own connection: a watcher never has to untangle pushed events from replies on a busy session.

Fd ownership: fds arriving with a reply belong to the caller of _request(); an error or a protocol failure closes
them here before raising, so no path leaks one.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from dataclasses import dataclass
from typing import Any, Iterator

import msgpack

from ._broker.launch import connect_socket
from ._descriptor import Descriptor, Handle, Usage
from ._errors import BrokenError, ClosedError, InvalidDescriptor, RemoteProtocolError, TexbridgeError, error_from_code
from ._paths import namespace_name
from ._protocol import VERSION, Connection, Message, Op
from ._resources import Resource
from ._unix import close_fds as _close
from ._unix import recv_frame_spinning, send_frame
from .backends import DEFAULT_IMPORTER, get_backend



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


class _Channel:
    """One SOCK_SEQPACKET connection: send a request, wait for its reply (fds included)."""

    def __init__(self, namespace: str, *, app_name: str, autostart: bool, timeout: float) -> None:
        self.sock = connect_socket(namespace, autostart=autostart, timeout=timeout)
        self.conn = Connection(broker_side=False)
        self.lock = threading.Lock()
        self.hello = self.request(Op.HELLO, {"version": VERSION, "name": app_name, "pid": os.getpid()})[0]

    def request(self, op: Op, fields: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> tuple[dict, list[int]]:
        with self.lock:
            msg = self._send(op, fields, fds)
            while True:
                reply, rfds = self._receive()
                if reply.op is Op.EVENT:
                    _close(rfds)
                    continue
                if reply.request_id != msg.request_id and reply.request_id != 0:
                    _close(rfds)
                    continue
                if reply.op is Op.ERROR:
                    _close(rfds)
                    raise error_from_code(str(reply.fields.get("code")), str(reply.fields.get("message")))
                return reply.fields, rfds

    def notify(self, op: Op, fields: dict[str, Any]) -> None:
        """Send a request that expects no reply (a quiet CLOSE): one send, no round trip."""
        with self.lock:
            self._send(op, fields, ())

    def _send(self, op: Op, fields: dict[str, Any], fds: list[int] | tuple[int, ...]) -> Message:
        if self.sock is None:
            raise ClosedError("the session is closed")
        msg = Message(op, self.conn.next_request_id(), fields, len(fds))
        data = self.conn.send(msg)
        try:
            send_frame(self.sock, data, fds)
        except OSError as e:
            self._raise_parting_error()  # the broker may have said why it hung up (e.g. uid not allowed)
            raise BrokenError(f"lost the broker while sending {op.value}: {e.strerror}") from None
        return msg

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


class Session:
    """A connection to one namespace's broker. Create with texbridge.connect(); close it (or use `with`).

    Closing the session drops every reference it holds, exactly as if the process had died: resources others still
    hold live on, the rest are freed by the broker.
    """

    def __init__(self, namespace: str | None = None, *, app_name: str | None = None, autostart: bool = True,
                 timeout: float = 10.0) -> None:
        self.namespace = namespace_name(namespace)
        self.app_name = app_name or os.path.basename(sys.argv[0] or "python")
        self._autostart, self._timeout = autostart, timeout
        self._channel = _Channel(self.namespace, app_name=self.app_name, autostart=autostart, timeout=timeout)
        self.session_id: int = self._channel.hello["session_id"]
        self.broker_pid: int = self._channel.hello["broker_pid"]
        self._resources: dict[int, Resource] = {}

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
            fields, _ = self._channel.request(Op.REGISTER, _register_fields(desc, name), [fd])
            mutex = KeyedMutex(fd, session_id=self.session_id)
        finally:
            os.close(fd)
        return self._track(_MutexResource(desc, mutex), Handle(fields["handle"]))

    def _register(self, res: Resource, name: str | None) -> Resource:
        fds: list[int] = []
        mutex = None
        try:
            fds = res.export_fds()
            if res.descriptor.keyed_mutex:
                from .keyed_mutex import KeyedMutex, create_state

                fds.append(create_state(0))
                mutex = KeyedMutex(fds[-1], session_id=self.session_id)
            fields, _ = self._channel.request(Op.REGISTER, _register_fields(res.descriptor, name), fds)
        except BaseException:
            if mutex is not None:
                mutex.close()
            res.close()
            raise
        finally:
            _close(fds)
        return self._track(res, Handle(fields["handle"]), mutex)

    def _track(self, res: Resource, handle: Handle, mutex=None) -> Resource:
        res._attach(self, handle, mutex if mutex is not None else res._mutex)
        self._resources[id(res)] = res
        return res

    # -- opening ----------------------------------------------------------------------------------------------------
    def open(self, handle_or_name: "Handle | str | int", *, backend: str | None = None, **options: Any) -> Resource:
        """Open a shared resource by handle (`tb:...`) or published name, imported into `backend`'s API.

        The default backend is the one that gives NumPy-visible memory where possible (memfd → NumPy views).
        """
        fields, fds = self._channel.request(Op.OPEN, _target(handle_or_name))
        try:
            desc = Descriptor.from_wire(_unpack_descriptor(fields["descriptor"]), validated=True)
            if len(fds) != desc.nfds:
                raise InvalidDescriptor(f"the broker sent {len(fds)} fds for a descriptor needing {desc.nfds}")
        except BaseException:
            _close(fds)
            self._close_handle(fields.get("handle"))
            raise
        handle = Handle(fields["handle"])
        mutex = None
        try:
            if desc.kind == "keyed_mutex" or desc.keyed_mutex:
                from .keyed_mutex import KeyedMutex

                mutex = KeyedMutex(fds[-1], session_id=self.session_id)
            if desc.kind == "keyed_mutex":
                res: Resource = _MutexResource(desc, mutex)
            else:
                memory_fds, fds = fds[: desc.backend_nfds], fds[desc.backend_nfds:]
                chosen = get_backend(backend or DEFAULT_IMPORTER.get(desc.memory, "memfd"))
                res = chosen.import_resource(desc, memory_fds, **options)  # owns memory_fds from here on
        except BaseException:
            if mutex is not None:
                mutex.close()
            _close(fds)
            self._close_handle(handle.value)
            raise
        _close(fds)  # the mutex fd: the mapping keeps the state alive
        return self._track(res, handle, mutex)

    def info(self, handle_or_name: "Handle | str | int") -> dict[str, Any]:
        fields, _ = self._channel.request(Op.INFO, _target(handle_or_name))
        return fields

    # -- names, listing, events -------------------------------------------------------------------------------------
    def publish(self, handle: "Handle | str | int", name: str) -> None:
        self._channel.request(Op.PUBLISH, {"handle": Handle.parse(handle).value, "name": name})

    def unpublish(self, name: str) -> None:
        self._channel.request(Op.UNPUBLISH, {"name": name})

    def update(self, handle: "Handle | str | int", meta: dict[str, Any]) -> None:
        """Attach small metadata (shown by `ls`, pushed to watchers as an `updated` event)."""
        self._channel.request(Op.UPDATE, {"handle": Handle.parse(handle).value, "meta": meta})

    def list(self, kind: str | None = None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            fields = {"offset": len(out)} | ({"kind": kind} if kind else {})
            reply, _ = self._channel.request(Op.LIST, fields)
            out.extend(reply["resources"])
            if not reply["resources"] or len(out) >= reply["total"]:
                return out

    def stats(self) -> dict[str, int]:
        return self._channel.request(Op.STATS, {})[0]

    def shutdown(self) -> None:
        """Ask the broker to exit (its own uid or root only): every client is cut off, every resource freed."""
        self._channel.request(Op.SHUTDOWN, {})

    def watch(self) -> Iterator[Event]:
        """Events pushed by the broker (published, unpublished, updated, released, retired), on a new connection."""
        channel = _Channel(self.namespace, app_name=self.app_name + ":watch", autostart=self._autostart,
                           timeout=self._timeout)
        channel.request(Op.WATCH, {})
        return _EventStream(channel)

    # -- closing ------------------------------------------------------------------------------------------------------
    def _drop(self, res: Resource, handle: Handle) -> None:
        """Called by Resource.close(): forget it (O(1): close is on the per-frame path of some users) and drop
        this session's reference at the broker."""
        self._resources.pop(id(res), None)
        self._close_handle(handle.value)

    def _close_handle(self, handle: int | None) -> None:
        if handle is None or self._channel.sock is None:
            return
        try:
            self._channel.notify(Op.CLOSE, {"handle": handle, "quiet": True})
        except (BrokenError, ClosedError):
            pass  # the broker dropped every reference of this connection already

    @property
    def closed(self) -> bool:
        return self._channel.sock is None

    def close(self) -> None:
        for res in list(self._resources.values()):
            try:
                res.close()
            except TexbridgeError:
                pass
        self._resources.clear()
        if self._channel.sock is not None:
            try:
                self._channel.request(Op.BYE, {})
            except TexbridgeError:
                pass
            self._channel.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Session namespace={self.namespace!r} id={self.session_id} broker_pid={self.broker_pid}>"


class _EventStream:
    """Iterator over a watch connection's events; close() (or leaving a `with`) hangs up."""

    def __init__(self, channel: _Channel) -> None:
        self._channel = channel

    def __iter__(self) -> "_EventStream":
        return self

    def __next__(self) -> Event:
        if self._channel.sock is None:
            raise StopIteration
        try:
            return self._channel.receive_event()
        except BrokenError:
            self.close()
            raise StopIteration from None

    def next(self, timeout: float | None = None) -> Event | None:
        """The next event, or None after `timeout` seconds."""
        sock = self._channel.sock
        if sock is None:
            return None
        sock.settimeout(timeout)
        try:
            return next(self)
        except (socket.timeout, StopIteration):
            return None
        finally:
            if self._channel.sock is not None:
                sock.settimeout(None)

    def fileno(self) -> int:
        return self._channel.sock.fileno() if self._channel.sock else -1

    def close(self) -> None:
        self._channel.close()

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


def _register_fields(desc: Descriptor, name: str | None) -> dict[str, Any]:
    fields: dict[str, Any] = {"descriptor": desc.to_wire()}
    if name is not None:
        fields["name"] = name
    return fields


def _target(handle_or_name: "Handle | str | int") -> dict[str, Any]:
    """A handle (Handle, int, or text with the tb: prefix: malformed text is InvalidArgument, never a name lookup)
    or a published name."""
    if isinstance(handle_or_name, (Handle, int)) or (isinstance(handle_or_name, str) and Handle.claims_to_be(handle_or_name)):
        return {"handle": Handle.parse(handle_or_name).value}
    if isinstance(handle_or_name, str):
        return {"name": handle_or_name}
    raise TypeError(f"open() takes a handle or a name, not {type(handle_or_name).__name__}")
