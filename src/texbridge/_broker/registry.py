"""The broker's state and rules, pure: no sockets, no syscalls, no clock of its own.

Inputs are (client id, decoded Message, received fds with the facts the server observed about them); outputs are
Effects: messages to send (with fds), fds to close, keyed mutexes to abandon. The registry OWNS every fd handed to
`handle()`: it keeps it (a registered resource) or returns it in `Effects.close`. That single rule is what keeps the
broker from leaking fds whatever a client sends.

A resource lives while any client holds a reference; each OPEN or REGISTER takes one, CLOSE or a disconnect drops
it. Names are published by a holder and vanish when the resource dies or the publisher disconnects (a dead sender is
retired at once).

Re-attach after a broker restart (docs/architecture.md, "Handle lifecycle"): REGISTER may name the handle it wants.
A free handle is created as asked; a taken one is joined as one more reference, but only by a client whose
descriptor is the same and whose fds are the very files the entry keeps (`same_file`, which the server answers with
kcmp): holding the fds is the proof, so nobody can point a live handle at other memory. HELLO may ask for its old
session id back, so keyed mutexes that record their owner by session id keep meaning the same session.
"""

from __future__ import annotations

import collections
import secrets
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import msgpack

from .._descriptor import Descriptor

from .._handle import Handle
from .._errors import (MAX_MESSAGE, AccessDenied, InvalidDescriptor, NameInUse, NotFound, QuotaExceeded,
                       RemoteProtocolError, TexbridgeError, echo)
from .._fdinfo import FdFacts, never_gpu
from .._memory_types import get_memory_type
from .._protocol import MAX_FRAME, MAX_NAME, Message, Op

# Limits on what is stored, so that every reply and event built from it fits a frame (see docs/protocol.md):
# an OPEN reply is descriptor + names + meta, an INFO reply summary + descriptor, a LIST page a byte budget.
LIST_PAGE = 200  # summaries per LIST page at most...
LIST_BUDGET = MAX_FRAME // 2  # ...and at most this many bytes of them (one summary always fits: it is < 12 KiB)
MAX_META = 2048  # bytes of a resource's packed metadata (REGISTER, UPDATE)
MAX_SESSION = (1 << 32) - 1  # keyed mutexes record their owner's session id in 32 bits
MAX_DESCRIPTOR = 16 * 1024  # bytes of a packed descriptor (driver_private is a free-form map)
MAX_NAMES = 16  # names one resource may be published under
LAST_ERRORS = 8  # error replies remembered for STATS (`broker status`)
_HANDLERS = {op: f"_op_{op.value}" for op in Op}  # method names, built once: every request is dispatched by them



@dataclass(frozen=True)
class Quotas:
    resources: int = 65536  # distinct resources a client may reference at once: far below any fd budget
    bytes: int = 1 << 40  # bytes of resources a client may register
    names: int = 4096  # names a client may publish


@dataclass(frozen=True)
class Policy:
    """Who may connect: the broker's own uid, root, and an explicit allow-list."""

    broker_uid: int
    allowed_uids: frozenset[int] = frozenset()

    def admits(self, uid: int) -> bool:
        return uid in (self.broker_uid, 0) or uid in self.allowed_uids


@dataclass(slots=True)
class Record:
    """One registered resource. Kept small (100,000 of them in < 1 KiB each): the descriptor is kept packed, as
    the msgpack bytes OPEN replies carry verbatim, and decoded only for the rare LIST/INFO."""

    handle: int
    packed: bytes  # msgpack of the validated descriptor's wire form
    fds: tuple[int, ...]
    creator_pid: int
    creator: int  # client id
    size: int
    has_mutex: bool
    kind: str
    refs: int = 1
    names: tuple[str, ...] = ()
    meta: dict[str, Any] | None = None

    @property
    def descriptor(self) -> Descriptor:
        return Descriptor.from_wire(msgpack.unpackb(self.packed))


@dataclass(slots=True)
class Client:
    id: int
    pid: int
    uid: int
    session: int = 0  # what keyed mutexes record as the owner; kept across broker restarts (HELLO session_id)
    name: str = ""
    refs: dict[int, int] = field(default_factory=dict)  # handle -> references held
    names: set[str] = field(default_factory=set)
    bytes: int = 0


@dataclass(slots=True)
class Outgoing:  # not frozen: a frozen dataclass's __init__ costs twice as much, and every reply builds one
    client: int
    message: Message
    fds: tuple[int, ...] = ()


@dataclass(slots=True)
class Effects:
    out: list[Outgoing] = field(default_factory=list)
    close: list[int] = field(default_factory=list)
    abandon: list[tuple[int, int]] = field(default_factory=list)  # (keyed-mutex state fd, session id)
    shutdown: bool = False

    def reply(self, client: int, request_id: int, fds: tuple[int, ...] = (), /, **fields: Any) -> None:
        self.out.append(Outgoing(client, Message(Op.REPLY, request_id, fields, len(fds)), fds))

    def error(self, client: int, request_id: int, exc: TexbridgeError) -> None:
        self.out.append(Outgoing(client, error_message(request_id, exc)))


def error_message(request_id: int, exc: TexbridgeError) -> Message:
    """The ERROR frame for `exc`: the message is cut to MAX_MESSAGE characters, so an error reply always fits."""
    text = str(exc)
    if len(text) > MAX_MESSAGE:
        text = text[:MAX_MESSAGE - 3] + "..."
    return Message(Op.ERROR, request_id, {"code": exc.code, "message": text})


class Registry:
    def __init__(self, *, namespace: str = "default", broker_pid: int = 0, quotas: Quotas = Quotas(),
                 policy: Policy | None = None, clock: Callable[[], float] = lambda: 0.0,
                 new_handle: Callable[[], int] = lambda: secrets.randbits(64),
                 same_file: Callable[[int, int], bool] | None = None, first_session: int | None = None) -> None:
        self.namespace, self.broker_pid = namespace, broker_pid
        self.quotas, self.policy = quotas, policy or Policy(broker_uid=0)
        self.clock, self._new_handle = clock, new_handle
        self.same_file = same_file  # (token, token) -> the same open file? The server sets it (kcmp).
        # Session ids start at a random point: a restarted broker must not hand a new client the id that a live
        # client of the old broker still owns keyed mutexes under (it asks for that id back when it re-attaches).
        self._next_session = first_session if first_session is not None else secrets.randbelow(MAX_SESSION) + 1
        self.sessions: dict[int, int] = {}  # session id -> client id
        self.resources: dict[int, Record] = {}
        self.names: dict[str, int] = {}
        self.clients: dict[int, Client] = {}
        self.watchers: set[int] = set()  # client ids: events cost nothing when nobody watches
        # bound handlers by op, built once: every request is dispatched through this
        self._dispatch = {op: getattr(self, name) for op, name in _HANDLERS.items() if hasattr(self, name)}
        self.counters = {"requests": 0, "errors": 0, "registered": 0, "opened": 0, "retired": 0}
        self.error_codes: collections.Counter[str] = collections.Counter()
        self.last_errors: collections.deque[list] = collections.deque(maxlen=LAST_ERRORS)

    # -- connection lifecycle -------------------------------------------------------------------------------------
    def connect(self, client_id: int, pid: int, uid: int) -> None:
        if not self.policy.admits(uid):
            raise AccessDenied(f"uid {uid} may not use the broker of namespace {self.namespace!r} "
                               f"(allowed: broker uid {self.policy.broker_uid}, root, {sorted(self.policy.allowed_uids)})")
        client = self.clients[client_id] = Client(client_id, pid, uid)
        self._take_session(client, self._fresh_session())

    def _fresh_session(self) -> int:
        while True:
            session, self._next_session = self._next_session, self._next_session % MAX_SESSION + 1
            if session not in self.sessions:
                return session

    def _take_session(self, client: Client, session: int) -> None:
        if self.sessions.get(client.session) == client.id:
            del self.sessions[client.session]
        client.session = session
        self.sessions[session] = client.id

    def disconnect(self, client_id: int) -> Effects:
        """Drop everything the client held at once: references, names, and keyed mutexes it may own."""
        fx = Effects()
        client = self.clients.pop(client_id, None)
        if client is None:
            return fx
        self.watchers.discard(client_id)
        if self.sessions.get(client.session) == client_id:
            del self.sessions[client.session]
        for name in sorted(client.names):
            self._unpublish(name, fx)
        for handle, count in list(client.refs.items()):
            rec = self.resources.get(handle)
            if rec is None:
                continue
            if _has_mutex(rec):
                fx.abandon.append((rec.fds[-1], client.session))
            self._unref(rec, count, client, fx)
        return fx

    def lose(self, fds: Iterable[int]) -> Effects:
        """Retire every resource with an fd among `fds`: the server lost them (an fd keeper died). Its holders keep
        what they imported; the handle answers NotFound from now on; watchers see it released and retired."""
        fx = Effects()
        lost = set(fds)
        for rec in [r for r in self.resources.values() if lost.intersection(r.fds)]:
            for client in list(self.clients.values()):
                if rec.handle in client.refs and rec.handle in self.resources:
                    self._unref(rec, client.refs[rec.handle], client, fx)
            if rec.handle in self.resources:  # references nobody holds (cannot happen): retire it anyway
                rec.refs = 0
                self._unref(rec, 0, Client(0, 0, 0), fx)
        return fx

    # -- requests -------------------------------------------------------------------------------------------------
    def handle(self, client_id: int, msg: Message, fds: Iterable[tuple[int, FdFacts]] = ()) -> Effects:
        """Apply one request. Never raises for anything a client can send: errors become error replies."""
        fx = Effects()
        fd_list = list(fds)
        self.counters["requests"] += 1
        client = self.clients.get(client_id)
        try:
            if client is None:
                raise AccessDenied("not connected")
            method = self._dispatch.get(msg.op)
            if method is None:
                raise RemoteProtocolError(f"{msg.op.value} is not a request")
            kept = method(client, msg, fd_list, fx)
            if fd_list and not kept:
                fx.close.extend(fd for fd, _ in fd_list)
        except TexbridgeError as e:
            self.count_error(e, msg.op.value, client_id)
            fx.close.extend(fd for fd, _ in fd_list)
            if not msg.fields.get("quiet"):
                fx.error(client_id, msg.request_id, e)
        return fx

    def count_error(self, exc: TexbridgeError, op: str, client_id: int) -> None:
        """Remember an error reply for STATS: a count per code and the last few (`broker status` shows them)."""
        self.counters["errors"] += 1
        self.error_codes[exc.code] += 1
        client = self.clients.get(client_id)
        self.last_errors.append([self.clock(), client.pid if client else 0, op, exc.code, str(exc)[:200]])

    def _op_hello(self, client: Client, msg: Message, fds: list, fx: Effects) -> bool:
        client.name = msg.fields["name"][:MAX_NAME]
        wanted = msg.fields.get("session_id")
        if wanted is not None and 1 <= wanted <= MAX_SESSION and wanted not in self.sessions:
            self._take_session(client, wanted)  # a client re-attaching after a restart keeps its identity
        fx.reply(client.id, msg.request_id, session_id=client.session, broker_pid=self.broker_pid,
                 namespace=self.namespace, version=msg.fields["version"])
        return False

    def _op_register(self, client: Client, msg: Message, fds: list[tuple[int, FdFacts]], fx: Effects) -> bool:
        desc = Descriptor.from_wire(msg.fields["descriptor"])
        packed = msgpack.packb(desc.to_wire(), use_bin_type=True)
        if len(packed) > MAX_DESCRIPTOR:
            raise InvalidDescriptor(f"the descriptor packs to {len(packed)} bytes; at most {MAX_DESCRIPTOR}")
        meta = msg.fields.get("meta")
        _check_meta(meta)
        if len(fds) != desc.nfds:
            raise InvalidDescriptor(f"descriptor needs {desc.nfds} fd(s), {len(fds)} arrived")
        self._check_memory(desc, fds[0][1])
        if desc.keyed_mutex or desc.kind == "keyed_mutex":  # the broker maps it to abandon a dead owner's mutex
            self._check_mutex_state(fds[-1][1])
        if desc.gpu_sync:
            self._check_not_plumbing(fds[1][1], "GPU semaphore", semaphore=True)
        name = msg.fields.get("name")
        if name is not None:
            self._check_name(client, name)
        if len(client.refs) >= self.quotas.resources:
            raise QuotaExceeded(f"client holds {len(client.refs)} resources (quota {self.quotas.resources})")
        if client.bytes + desc.size > self.quotas.bytes:
            raise QuotaExceeded(f"registering {desc.size} bytes exceeds the quota of {self.quotas.bytes}")
        handle = msg.fields.get("handle")
        if handle is not None:
            if not 1 <= handle < 1 << 64:
                raise InvalidDescriptor(f"handles are 64-bit and non-zero, not {echo(handle)}")
            rec = self.resources.get(handle)
            if rec is not None:
                self._rejoin(client, rec, packed, [fd for fd, _ in fds], name, msg, fx)
                return False  # the entry keeps its own fds; these were only the proof
        else:
            handle = self._new_handle() or 1
            while handle in self.resources:
                handle = self._new_handle() or 1
        rec = Record(handle, packed, tuple(fd for fd, _ in fds),
                     client.pid, client.id, desc.size, desc.keyed_mutex or desc.kind == "keyed_mutex",
                     sys.intern(desc.kind), meta=meta)
        self.resources[handle] = rec
        client.refs[handle] = 1
        client.bytes += desc.size
        self.counters["registered"] += 1
        if name is not None:
            self._publish(client, rec, name, fx)
        fx.reply(client.id, msg.request_id, handle=handle)
        return True

    def _rejoin(self, client: Client, rec: Record, packed: bytes, fds: list[int], name: str | None, msg: Message,
                fx: Effects) -> None:
        """REGISTER under a live handle: one more reference to the entry, for a client holding the same files."""
        if packed != rec.packed:
            raise InvalidDescriptor(f"{_fmt(rec.handle)} is registered with another descriptor")
        if self.same_file is None or len(fds) != len(rec.fds) or \
                not all(self.same_file(mine, theirs) for mine, theirs in zip(rec.fds, fds)):
            raise AccessDenied(f"{_fmt(rec.handle)} is registered with other memory: only a holder of its fds may "
                               f"re-attach to it")
        if name is not None and len(rec.names) >= MAX_NAMES:
            raise QuotaExceeded(f"{_fmt(rec.handle)} is already published under {len(rec.names)} names (at most "
                                f"{MAX_NAMES})")
        client.refs[rec.handle] = client.refs.get(rec.handle, 0) + 1
        rec.refs += 1
        if msg.fields.get("meta") is not None and msg.fields["meta"] != rec.meta:
            rec.meta = msg.fields["meta"]
            self._event(fx, "updated", handle=rec.handle, names=list(rec.names), meta=rec.meta)
        if name is not None:
            self._publish(client, rec, name, fx)
        fx.reply(client.id, msg.request_id, handle=rec.handle)

    def _op_open(self, client: Client, msg: Message, fds: list, fx: Effects) -> bool:
        rec = self._lookup(msg.fields)
        if rec.handle not in client.refs and len(client.refs) >= self.quotas.resources:
            raise QuotaExceeded(f"client holds {len(client.refs)} resources (quota {self.quotas.resources})")
        client.refs[rec.handle] = client.refs.get(rec.handle, 0) + 1
        rec.refs += 1
        self.counters["opened"] += 1
        fx.reply(client.id, msg.request_id, rec.fds, handle=rec.handle, descriptor=rec.packed,
                 creator_pid=rec.creator_pid, names=list(rec.names), meta=rec.meta)
        return False

    def _op_close(self, client: Client, msg: Message, fds: list, fx: Effects) -> bool:
        rec = self._held(client, msg.fields["handle"])
        handle = rec.handle
        if client.refs.get(handle) == 1 and _has_mutex(rec):
            fx.abandon.append((rec.fds[-1], client.session))  # closing while owning: waiters must not hang
        self._unref(rec, 1, client, fx)
        if not msg.fields.get("quiet"):
            fx.reply(client.id, msg.request_id)
        return False

    def _op_publish(self, client: Client, msg: Message, fds: list, fx: Effects) -> bool:
        handle, name = msg.fields["handle"], msg.fields["name"]
        rec = self.resources.get(handle)
        if rec is None:
            raise NotFound(f"no resource {_fmt(handle)}")
        if handle not in client.refs:
            raise AccessDenied(f"only a holder of {_fmt(handle)} may publish it")
        self._check_name(client, name)
        if len(rec.names) >= MAX_NAMES:
            raise QuotaExceeded(f"{_fmt(handle)} is already published under {len(rec.names)} names (at most "
                                f"{MAX_NAMES})")
        self._publish(client, rec, name, fx)
        fx.reply(client.id, msg.request_id)
        return False

    def _op_unpublish(self, client: Client, msg: Message, fds: list, fx: Effects) -> bool:
        name = msg.fields["name"]
        if name not in self.names:
            raise NotFound(f"no resource is published as {echo(name)}")
        if name not in client.names:
            raise AccessDenied(f"{echo(name)} was published by another client")
        self._unpublish(name, fx)
        fx.reply(client.id, msg.request_id)
        return False

    def _op_update(self, client: Client, msg: Message, fds: list, fx: Effects) -> bool:
        rec = self._held(client, msg.fields["handle"])
        _check_meta(msg.fields["meta"])
        rec.meta = msg.fields["meta"]
        self._event(fx, "updated", handle=rec.handle, names=list(rec.names), meta=rec.meta)
        fx.reply(client.id, msg.request_id)
        return False

    def _op_list(self, client: Client, msg: Message, fds: list, fx: Effects) -> bool:
        offset = max(0, msg.fields.get("offset", 0))
        limit = min(LIST_PAGE, max(1, msg.fields.get("limit", LIST_PAGE)))
        kind = msg.fields.get("kind")
        recs = [r for r in self.resources.values() if kind is None or r.kind == kind]
        page, used = [], 0
        for r in recs[offset:offset + limit]:  # a page ends at LIST_PAGE entries or LIST_BUDGET bytes
            summary = self.summary(r)
            used += len(msgpack.packb(summary, use_bin_type=True))
            if page and used > LIST_BUDGET:
                break
            page.append(summary)
        fx.reply(client.id, msg.request_id, resources=page, total=len(recs))
        return False

    def _op_info(self, client: Client, msg: Message, fds: list, fx: Effects) -> bool:
        rec = self._lookup(msg.fields)
        fx.reply(client.id, msg.request_id, **self.summary(rec), descriptor=rec.descriptor.to_wire())
        return False

    def _op_watch(self, client: Client, msg: Message, fds: list, fx: Effects) -> bool:
        self.watchers.add(client.id)
        fx.reply(client.id, msg.request_id)
        return False

    def _op_stats(self, client: Client, msg: Message, fds: list, fx: Effects) -> bool:
        fx.reply(client.id, msg.request_id, **self.stats())
        return False

    def _op_shutdown(self, client: Client, msg: Message, fds: list, fx: Effects) -> bool:
        if client.uid not in (self.policy.broker_uid, 0):
            raise AccessDenied("only the broker's own uid or root may stop it")
        others = [c for c in self.clients.values() if c.id != client.id]
        if others and not msg.fields.get("force", True):
            shown = ", ".join(f"pid {c.pid} ({c.name or '?'})" for c in others[:8])
            more = f" and {len(others) - 8} more" if len(others) > 8 else ""
            raise AccessDenied(f"{len(others)} other client(s) are live: {shown}{more}; stopping anyway (force) "
                               f"makes them re-attach to a new broker")
        fx.shutdown = True
        fx.reply(client.id, msg.request_id)
        return False

    def _op_bye(self, client: Client, msg: Message, fds: list, fx: Effects) -> bool:
        fx.reply(client.id, msg.request_id)
        return False  # the server hangs up after sending the reply, which drops everything

    # -- queries ----------------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        return {"clients": len(self.clients), "resources": len(self.resources), "names": len(self.names),
                "bytes": sum(r.size for r in self.resources.values()),
                "fds": sum(len(r.fds) for r in self.resources.values()), **self.counters,
                "error_codes": dict(self.error_codes), "last_errors": list(self.last_errors), "clock": self.clock()}

    def summary(self, rec: Record) -> dict[str, Any]:
        d = rec.descriptor
        return {"handle": rec.handle, "names": list(rec.names), "kind": d.kind, "width": d.width, "height": d.height,
                "format": d.format, "size": d.size, "backend": d.backend, "memory": d.memory,
                "creator_pid": rec.creator_pid, "open_count": rec.refs, "keyed_mutex": d.keyed_mutex,
                "meta": rec.meta}

    @property
    def idle(self) -> bool:
        return not self.clients and not self.resources

    # -- internals -----------------------------------------------------------------------------------------------------
    def _held(self, client: Client, handle: int) -> Record:
        rec = self.resources.get(handle)
        if rec is None or handle not in client.refs:
            raise NotFound(f"{_fmt(handle)} is not held by this client (already closed?)")
        return rec

    def _lookup(self, fields: dict[str, Any]) -> Record:
        if "name" in fields:
            handle = self.names.get(fields["name"])
            if handle is None:
                raise NotFound(f"no resource is published as {echo(fields['name'])} in namespace {self.namespace!r}")
        else:
            handle = fields["handle"]
        rec = self.resources.get(handle)
        if rec is None:
            raise NotFound(f"no resource {_fmt(handle)} in namespace {self.namespace!r}")
        return rec

    @staticmethod
    def _check_memory(desc: Descriptor, facts: FdFacts) -> None:
        """The memory fd against its row in the memory-type table: an fd kind the type comes as and, for memory
        importers map with the CPU, a size seal and enough bytes (a shrinkable mapping could SIGBUS them)."""
        Registry._check_not_plumbing(facts, "memory")
        mt = get_memory_type(desc.memory)
        if facts.kind not in mt.fd_kinds:
            raise InvalidDescriptor(f"memory {desc.memory!r} needs a {' or '.join(mt.fd_kinds)}, got a {facts.kind}")
        if mt.host_mappable:
            if not facts.size_sealed:
                raise InvalidDescriptor("the memfd is not sealed against shrinking and growing "
                                        "(F_SEAL_SHRINK|F_SEAL_GROW): importers could take SIGBUS")
            if facts.size < desc.required_size() or facts.size < desc.size:
                raise InvalidDescriptor(f"the memfd has {facts.size} bytes; the descriptor needs {desc.size}")

    @staticmethod
    def _check_not_plumbing(facts: FdFacts, what: str, *, semaphore: bool = False) -> None:
        reason = never_gpu(facts, semaphore=semaphore)
        if reason:
            raise InvalidDescriptor(f"the {what} fd is {reason}")

    @staticmethod
    def _check_mutex_state(facts: FdFacts) -> None:
        from .._descriptor import KEYED_MUTEX_STATE_SIZE
        if not (facts.size_sealed and facts.size == KEYED_MUTEX_STATE_SIZE):
            raise InvalidDescriptor(f"the keyed mutex state must be a size-sealed memfd of {KEYED_MUTEX_STATE_SIZE} "
                                    f"bytes")

    def _check_name(self, client: Client, name: str) -> None:
        if not name or len(name) > MAX_NAME or not name.isprintable():
            raise InvalidDescriptor(f"names are 1..{MAX_NAME} printable characters")
        if Handle.claims_to_be(name):
            raise InvalidDescriptor(f"{name!r}: names cannot start with 'tb:', the prefix of handles")
        if name in self.names:
            raise NameInUse(f"{echo(name)} is already published in namespace {self.namespace!r}")
        if len(client.names) >= self.quotas.names:
            raise QuotaExceeded(f"client published {len(client.names)} names (quota {self.quotas.names})")

    def _publish(self, client: Client, rec: Record, name: str, fx: Effects) -> None:
        self.names[name] = rec.handle
        rec.names += (name,)
        client.names.add(name)
        self._event(fx, "published", name=name, handle=rec.handle, pid=client.pid, app=client.name,
                    summary=self.summary(rec))

    def _unpublish(self, name: str, fx: Effects) -> None:
        handle = self.names.pop(name)
        rec = self.resources.get(handle)
        if rec is not None and name in rec.names:
            rec.names = tuple(n for n in rec.names if n != name)
        for c in self.clients.values():
            c.names.discard(name)
        self._event(fx, "unpublished", name=name, handle=handle)

    def _unref(self, rec: Record, count: int, client: Client, fx: Effects) -> None:
        held = client.refs.get(rec.handle, 0)
        if held <= count:
            client.refs.pop(rec.handle, None)
        else:
            client.refs[rec.handle] = held - count
        if rec.creator == client.id and rec.handle not in client.refs:
            client.bytes -= rec.size
        rec.refs -= min(held, count)
        if self.watchers:  # the event's fields are not even built when nobody watches (every CLOSE comes here)
            self._event(fx, "released", handle=rec.handle, pid=client.pid, open_count=rec.refs)
        if rec.refs <= 0:
            for name in rec.names:
                self._unpublish(name, fx)
            del self.resources[rec.handle]
            fx.close.extend(rec.fds)
            self.counters["retired"] += 1
            self._event(fx, "retired", handle=rec.handle)

    def _event(self, fx: Effects, event: str, **fields: Any) -> None:
        if not self.watchers:
            return
        msg = Message(Op.EVENT, 0, {"event": event, **fields})
        fx.out.extend(Outgoing(cid, msg) for cid in sorted(self.watchers))


def _check_meta(meta: dict[str, Any] | None) -> None:
    if meta is not None and len(msgpack.packb(meta, use_bin_type=True)) > MAX_META:
        raise QuotaExceeded(f"metadata is limited to {MAX_META} bytes (packed)")


def _has_mutex(rec: Record) -> bool:
    return rec.has_mutex


def _fmt(handle: int) -> str:
    try:
        return str(Handle(handle))
    except ValueError:
        return repr(handle)
