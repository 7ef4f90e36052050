"""The wire protocol, as a pure state machine: bytes and fd counts in, typed messages out. No IO here.

Transport: one SOCK_SEQPACKET unix socket per client, so the kernel keeps message boundaries and every message's fds
arrive with it (SCM_RIGHTS). A message is one msgpack array:

    [version, request_id, op, fields, nfds]

`request_id` pairs a reply with its request (events use 0); `nfds` is how many fds the sender attached, checked
against what actually arrived so a lost or extra fd is a protocol error, not a silent mix-up. Frames are capped at
MAX_FRAME bytes and MAX_FDS fds. Which ops a side may send in which state lives in one table, `ALLOWED`.

Errors say whose fault it was (h11's rule): encode() raises LocalProtocolError, decode() RemoteProtocolError.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable

import msgpack

from ._descriptor import MAX_FDS, is_int
from ._errors import LocalProtocolError, RemoteProtocolError, echo

VERSION = 1
MAX_FRAME = 64 * 1024
MAX_REQUEST_ID = (1 << 63) - 1
MAX_NAME = 128
MAX_DEPTH = 16  # nesting of maps/lists inside a request's map fields (descriptor, meta): deeper is refused


class Op(str, enum.Enum):
    HELLO = "hello"  # version, name, pid -> session_id, broker_pid, namespace
    REGISTER = "register"  # descriptor [+ name] + fds -> handle
    OPEN = "open"  # handle | name -> handle, descriptor, creator_pid + fds
    CLOSE = "close"  # handle
    PUBLISH = "publish"  # handle, name
    UNPUBLISH = "unpublish"  # name
    UPDATE = "update"  # handle, meta: small map shown in LIST/INFO and pushed to watchers (senders' fps, frame...)
    LIST = "list"  # [offset, limit, kind] -> resources, total
    INFO = "info"  # handle | name -> summary with descriptor
    WATCH = "watch"  # -> ok; then EVENT messages are pushed on this connection
    STATS = "stats"  # -> counters
    SHUTDOWN = "shutdown"  # ask the broker to exit (broker's own uid or root only)
    BYE = "bye"  # polite disconnect: drops all references, like a hang-up
    REPLY = "reply"  # broker -> client: request_id echoes the request
    ERROR = "error"  # broker -> client: code, message
    EVENT = "event"  # broker -> client (watchers): event, ...


_OPS = {op.value: op for op in Op}
_STATE_CHANGES = frozenset({Op.HELLO, Op.BYE})  # the ops that move a Connection to another State  # a dict lookup: Op(name) is slow on a path taken by every frame
REQUESTS = frozenset(Op) - {Op.REPLY, Op.ERROR, Op.EVENT}
RESPONSES = frozenset({Op.REPLY, Op.ERROR, Op.EVENT})


class State(enum.Enum):
    AWAITING_HELLO = "awaiting_hello"
    READY = "ready"
    CLOSED = "closed"


ALLOWED: dict[State, frozenset[Op]] = {
    State.AWAITING_HELLO: frozenset({Op.HELLO}),
    State.READY: REQUESTS - {Op.HELLO},
    State.CLOSED: frozenset(),
}

# Per-op field schema: name -> (type, required). Fields not listed are rejected: the schema is the contract.
_INT, _STR, _MAP, _BOOL = int, str, dict, bool
SCHEMA: dict[Op, dict[str, tuple[type, bool]]] = {
    Op.HELLO: {"version": (_INT, True), "name": (_STR, True), "pid": (_INT, True), "session_id": (_INT, False)},
    Op.REGISTER: {"descriptor": (_MAP, True), "name": (_STR, False), "meta": (_MAP, False), "handle": (_INT, False)},
    Op.OPEN: {"handle": (_INT, False), "name": (_STR, False)},
    Op.CLOSE: {"handle": (_INT, True), "quiet": (_BOOL, False)},  # quiet: no reply, not even an error
    Op.PUBLISH: {"handle": (_INT, True), "name": (_STR, True)},
    Op.UNPUBLISH: {"name": (_STR, True)},
    Op.UPDATE: {"handle": (_INT, True), "meta": (_MAP, True)},
    Op.LIST: {"offset": (_INT, False), "limit": (_INT, False), "kind": (_STR, False)},
    Op.INFO: {"handle": (_INT, False), "name": (_STR, False)},
    Op.WATCH: {},
    Op.STATS: {},
    Op.SHUTDOWN: {"force": (_BOOL, False)},  # force=false: refuse while other clients are connected
    Op.BYE: {},
}
FD_LIMITS: dict[Op, tuple[int, int]] = {Op.REGISTER: (1, MAX_FDS), Op.REPLY: (0, MAX_FDS)}
_FD_RANGE = {op: FD_LIMITS.get(op, (0, 0)) for op in Op}
_WIRE_NAME = {op: op.value for op in Op}  # Op.value is a descriptor lookup (~0.3 us); every frame needs it
_REQUIRED = {op: frozenset(k for k, (_, required) in schema.items() if required) for op, schema in SCHEMA.items()}
_TYPES = {op: {k: typ for k, (typ, _) in schema.items()} for op, schema in SCHEMA.items()}  # field -> exact type
_unpackb = msgpack.unpackb
_packb = msgpack.packb
_UNPACK_LIMITS = dict(raw=False, strict_map_key=True, max_bin_len=MAX_FRAME, max_str_len=MAX_FRAME,
                      max_array_len=4096, max_map_len=1024, max_ext_len=0)


@dataclass(slots=True)
class Message:
    """One frame's content. Treated as immutable; not frozen only because a frozen dataclass's __init__ costs ~1 us
    more, and every open + close builds six of them (request, reply, close, on both sides)."""

    op: Op
    request_id: int = 0
    fields: dict[str, Any] = field(default_factory=dict)
    nfds: int = 0


def encode(msg: Message, pack: Callable[[Any], bytes] | None = None) -> bytes:
    """Serialize a message we are about to send. Anything illegal is a LocalProtocolError (our bug).

    `pack`: a connection's own msgpack Packer.pack (msgpack.packb builds a Packer per call: ~0.6 us)."""
    op = msg.op
    lo, hi = _FD_RANGE[op]
    if not lo <= msg.nfds <= hi:
        raise LocalProtocolError(f"{op.value} carries {lo}..{hi} fds, not {msg.nfds}")
    try:
        frame = [VERSION, msg.request_id, _WIRE_NAME[op], msg.fields, msg.nfds]
        data = pack(frame) if pack is not None else _packb(frame, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:  # the Packer resets its buffer on failure
        raise LocalProtocolError(f"cannot encode {op.value}: {e}") from None
    if len(data) > MAX_FRAME:
        raise LocalProtocolError(f"{op.value} is {len(data)} bytes; frames are at most {MAX_FRAME}")
    return data


class FrameUnpacker:
    """msgpack.unpackb with the protocol's limits, minus parsing seven keyword arguments per frame (~0.5 us): one
    msgpack Unpacker per connection, fed one whole frame at a time, and replaced after any frame it did not decode
    exactly (garbage, a truncated object, bytes left over), so nothing of one frame can leak into the next."""

    __slots__ = ("_unpacker", "_consumed")

    def __init__(self) -> None:
        self._fresh()

    def _fresh(self) -> None:
        self._unpacker = msgpack.Unpacker(**_UNPACK_LIMITS, max_buffer_size=MAX_FRAME)
        self._consumed = 0

    def __call__(self, data: bytes) -> Any:
        unpacker = self._unpacker
        try:
            unpacker.feed(data)
            obj = unpacker.unpack()
        except BaseException:
            self._fresh()
            raise
        self._consumed += len(data)
        if unpacker.tell() != self._consumed:
            self._fresh()
            raise msgpack.ExtraData(obj, b"")
        return obj


def _unpack_once(data: bytes) -> Any:
    return _unpackb(data, **_UNPACK_LIMITS)


def decode(data: bytes, nfds: int, *, truncated: bool = False,
           unpack: Callable[[bytes], Any] = _unpack_once) -> Message:
    """Parse one received frame that arrived with `nfds` fds. Anything illegal is a RemoteProtocolError.

    Every frame of every client passes here, so the checks are written for speed (`type(x) is int`: msgpack yields
    exact ints, never a subclass, and a bool is not one) but none is skipped."""
    if truncated or len(data) > MAX_FRAME:
        raise RemoteProtocolError(f"frame over {MAX_FRAME} bytes or {MAX_FDS} fds (truncated by the kernel)")
    if not data:
        raise RemoteProtocolError("empty frame")
    try:
        obj = unpack(data)
    except Exception as e:  # msgpack raises a zoo of types on garbage; all mean the same thing here
        raise RemoteProtocolError(f"undecodable frame: {type(e).__name__}") from None
    if type(obj) is not list or len(obj) != 5:
        raise RemoteProtocolError("a frame is [version, request_id, op, fields, nfds]")
    version, request_id, op_name, fields, declared = obj
    if type(version) is not int or version != VERSION:  # exact types: True == 1 == 1.0 in Python, not on the wire
        raise RemoteProtocolError(f"protocol version {echo(version)} is not supported (this side speaks {VERSION})")
    if type(request_id) is not int or not 0 <= request_id <= MAX_REQUEST_ID:
        raise RemoteProtocolError(f"bad request id {echo(request_id)}")
    op = _OPS.get(op_name) if type(op_name) is str else None
    if op is None:
        raise RemoteProtocolError(f"unknown op {echo(op_name)}")
    # strict_map_key leaves str or bytes keys: only a bytes key can be wrong (checked in C, no generator)
    if type(fields) is not dict or bytes in map(type, fields):
        raise RemoteProtocolError("fields must be a map with string keys")
    if type(declared) is not int or declared != nfds:
        raise RemoteProtocolError(f"{op.value} declares {echo(declared)} fds but {nfds} arrived")
    lo, hi = _FD_RANGE[op]
    if not lo <= nfds <= hi:
        raise RemoteProtocolError(f"{op.value} carries {lo}..{hi} fds, not {nfds}")
    types = _TYPES.get(op)
    if types is not None:
        _check_schema(op, types, fields)
    return Message(op, request_id, fields, nfds)


def peek_request_id(data: bytes) -> int:
    """Best-effort request id of a frame that failed to decode, so the error reply can still be matched."""
    try:
        obj = msgpack.unpackb(data, raw=False, max_array_len=8, max_map_len=1024)
        rid = obj[1]
        return rid if is_int(rid) and 0 <= rid <= MAX_REQUEST_ID else 0
    except Exception:
        return 0


def _check_schema(op: Op, types: dict[str, type], fields: dict[str, Any]) -> None:
    """A request's fields against its schema (replies and events have none: whoever asked checks them)."""
    for key, value in fields.items():
        typ = types.get(key)
        if typ is None:
            raise RemoteProtocolError(f"{op.value}: unknown field {echo(key)}")
        if type(value) is not typ:  # msgpack yields exact types; a bool is not an int here
            raise RemoteProtocolError(f"{op.value}: field {key!r} must be {typ.__name__}")
        if typ is str:
            if len(value) > MAX_NAME * 8:
                raise RemoteProtocolError(f"{op.value}: field {key!r} is too long")
        elif typ is dict and not _shallow(value, MAX_DEPTH):
            raise RemoteProtocolError(f"{op.value}: field {key!r} nests deeper than {MAX_DEPTH} levels")
    required = _REQUIRED[op]
    if required and not fields.keys() >= required:
        missing = sorted(required - fields.keys())
        raise RemoteProtocolError(f"{op.value}: missing field(s) {', '.join(missing)}")
    if op in _ONE_TARGET and ("handle" in fields) == ("name" in fields):
        raise RemoteProtocolError(f"{op.value}: give exactly one of handle or name")


_ONE_TARGET = frozenset({Op.OPEN, Op.INFO})


def _shallow(obj: object, limit: int) -> bool:
    """True when maps and lists nest at most `limit` deep (iterative: a deep value must not blow the C stack)."""
    stack = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        if depth > limit:
            return False
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list, tuple)))
    return True


class Connection:
    """One side of a connection's protocol state. The broker keeps one per client; the client keeps one too.

    `receive` turns a frame into a Message and checks it is legal in the current state; `send` does the same for
    outgoing messages. Which side we are decides which table applies: the broker receives requests and sends
    responses, the client the reverse.
    """

    def __init__(self, *, broker_side: bool) -> None:
        self.broker_side = broker_side
        self._next_id = 1
        self._pack = msgpack.Packer(use_bin_type=True).pack  # one per connection: used under its owner's lock
        self._unpack = FrameUnpacker()
        self._set(State.AWAITING_HELLO)

    def _set(self, state: State) -> None:
        self.state = state
        self._allowed = ALLOWED[state]  # looked up once per state change, not per frame

    def next_request_id(self) -> int:
        rid, self._next_id = self._next_id, self._next_id + 1
        return rid

    def receive(self, data: bytes, nfds: int, *, truncated: bool = False) -> Message:
        msg = decode(data, nfds, truncated=truncated, unpack=self._unpack)
        if self.broker_side:
            if msg.op not in self._allowed:
                raise RemoteProtocolError(f"{msg.op.value} is not allowed while {self.state.value}")
            if msg.op in _STATE_CHANGES:
                self._advance(msg.op)
        elif msg.op not in RESPONSES:
            raise RemoteProtocolError(f"the broker sent a request ({msg.op.value})")
        return msg

    def request(self, op: Op, fields: dict[str, Any], nfds: int = 0) -> tuple[int, bytes]:
        """Client side: (request id, frame) for a new request; the same checks as send(), without building a
        Message (every open and close passes here)."""
        if op not in self._allowed:
            raise LocalProtocolError(f"{op.value} is not allowed while {self.state.value}")
        if op in _STATE_CHANGES:
            self._advance(op)
        rid = self._next_id
        self._next_id = rid + 1
        return rid, encode(Message(op, rid, fields, nfds), self._pack)

    def send(self, msg: Message) -> bytes:
        if not self.broker_side:
            if msg.op not in self._allowed:
                raise LocalProtocolError(f"{msg.op.value} is not allowed while {self.state.value}")
            self._advance(msg.op)
        elif msg.op not in RESPONSES:
            raise LocalProtocolError(f"the broker cannot send a request ({msg.op.value})")
        return encode(msg, self._pack)

    def _advance(self, op: Op) -> None:  # only ops in _STATE_CHANGES change the state
        if op is Op.HELLO:
            self._set(State.READY)
        elif op is Op.BYE:
            self._set(State.CLOSED)
