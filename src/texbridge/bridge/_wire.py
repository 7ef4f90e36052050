"""The bridge engine's control messages: what each one holds, checked field by field (pure: no IO).

Every message is a dict of msgpack types with "t" naming its kind (the table `SCHEMAS`; docs/bridge.md lists them
with their meaning). `parse()` is the only way the engine reads a peer's message: anything not exactly as the table
says (a missing or extra field, a bool where an int belongs, a number out of bounds, a name too long, more keys
than a keyed mutex can have waiters) is a BridgePeerError, which ends that peer's session. Builders (`announce()`,
...) make the messages this side sends, so both directions go through one table.

Keyed-mutex content transfers ride on a stream: the frame is the resource's bytes and its FrameMeta.user_data
(`transfer_data` / `parse_transfer`) carries the key it was released with, the sync value and the private data.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import msgpack

from .._formats import FORMATS
from .._protocol import MAX_NAME
from ._link import MAX_DIMENSION, MAX_STREAMS, MAX_USER_DATA, BridgePeerError

VERSION = 1
MAX_LABEL = 32
LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
MAX_KEYS = 48  # a keyed mutex queues at most this many waiters (keyed_mutex.MAX_WAITERS), so as many distinct keys
MAX_PRIVATE = 2048  # keyed_mutex.PRIVATE_DATA_CAPACITY
MAX_BUFFER = MAX_DIMENSION * MAX_DIMENSION  # bytes of a keyed-mutex buffer that may cross
U64 = (1 << 64) - 1
KINDS = ("texture", "buffer", "mutex")  # what a keyed-mutex resource is: its content is pixels, bytes or nothing

Check = Callable[[Any, str], Any]


def _fail(what: str, value: Any) -> BridgePeerError:
    text = repr(value)
    return BridgePeerError(f"bad {what} from peer: {text[:80]}{'...' if len(text) > 80 else ''}")


def _int(lo: int, hi: int) -> Check:
    def check(v: Any, what: str) -> int:
        if type(v) is not int or not lo <= v <= hi:
            raise _fail(f"{what} (an integer in {lo}..{hi})", v)
        return v
    return check


def _float(lo: float, hi: float) -> Check:
    def check(v: Any, what: str) -> float:
        if type(v) not in (int, float) or not lo <= v <= hi:  # NaN fails both comparisons
            raise _fail(f"{what} (a number in {lo}..{hi})", v)
        return float(v)
    return check


def _name(v: Any, what: str) -> str:
    if type(v) is not str or not 0 < len(v) <= MAX_NAME or not v.isprintable():
        raise _fail(f"{what} (1..{MAX_NAME} printable characters)", v)
    return v


def _label(v: Any, what: str) -> str:
    if type(v) is not str or not LABEL_RE.match(v):
        raise _fail(f"{what} (1..{MAX_LABEL} of A-Z a-z 0-9 _ . -)", v)
    return v


def _fmt(v: Any, what: str) -> str:
    if type(v) is not str or v not in FORMATS:
        raise _fail(f"{what} (a pixel format)", v)
    return v


def _kind(v: Any, what: str) -> str:
    if v not in KINDS or type(v) is not str:
        raise _fail(f"{what} (one of {', '.join(KINDS)})", v)
    return v


def _keys(v: Any, what: str) -> tuple[int, ...]:
    if type(v) not in (list, tuple) or len(v) > MAX_KEYS:
        raise _fail(f"{what} (a list of at most {MAX_KEYS} keys)", v)
    key = _int(0, U64)
    return tuple(key(k, what) for k in v)


_stream = _int(0, MAX_STREAMS - 1)
_dim = _int(1, MAX_DIMENSION)
_u64 = _int(0, U64)

# kind -> {field: check}; a field whose name ends in "?" may be left out (then absent from the parsed dict).
SCHEMAS: dict[str, dict[str, Check]] = {
    # first message each way: who we are, what we accept (frames larger than max_w x max_h are not sent to us)
    "hello": {"v": _int(1, 1 << 16), "label": _label, "max_w": _dim, "max_h": _dim},
    # a sender on the sending side now streams on its stream `s`; the peer mirrors it as NAME@LABEL
    "announce": {"s": _stream, "name": _name, "w": _dim, "h": _dim, "fmt": _fmt, "fps?": _float(0, 1e6)},
    # the sender behind stream `s` changed size/format: its frames continue on stream `to`
    "format": {"s": _stream, "to": _stream, "w": _dim, "h": _dim, "fmt": _fmt},
    # the sender behind stream `s` is gone
    "retire": {"s": _stream},
    # the receiving side closed its reader of stream `s` (of the recipient's direction): the number is free again
    "closed": {"s": _stream},
    # a keyed-mutex resource, id `id`, published on the sending side; its content travels on stream `s`
    "km_announce": {"id": _stream, "s": _stream, "name": _name, "kind": _kind, "w": _dim, "h": _dim, "fmt": _fmt,
                    "size": _int(1, MAX_BUFFER)},
    # the mirror of resource `id` exists; content coming back travels on the mirror side's stream `s`
    "km_ready": {"id": _stream, "s": _stream},
    # the keys waiters on the sending side wait for on resource `id` (oldest first; [] = none); own=1: `id` is the
    # sending side's resource (it is the origin), own=0: the recipient's
    "km_want": {"id": _stream, "own": _int(0, 1), "keys": _keys},
    # resource `id` is gone (its publisher closed it)
    "km_retire": {"id": _stream},
    # the sending side stops cleanly (the peer retires its mirrors at once instead of after the heartbeat timeout)
    "bye": {},
}


def parse(message: Any) -> dict[str, Any]:
    """A peer's control message, checked against SCHEMAS; BridgePeerError on anything else."""
    if type(message) is not dict:
        raise _fail("control message (a map)", message)
    kind = message.get("t")
    schema = SCHEMAS.get(kind) if type(kind) is str else None
    if schema is None:
        raise _fail("control message kind", kind)
    out: dict[str, Any] = {"t": kind}
    allowed = {"t"}
    for field, check in schema.items():
        key = field.rstrip("?")
        allowed.add(key)
        if key in message:
            out[key] = check(message[key], f"{kind}.{key}")
        elif not field.endswith("?"):
            raise BridgePeerError(f"peer's {kind!r} message lacks {key!r}")
    extra = set(message) - allowed
    if extra:
        raise _fail(f"fields of a {kind!r} message", sorted(map(str, extra)))
    return out


def _built(t_: str, /, **fields: Any) -> dict[str, Any]:
    """Build through the same table, so this side can never send what the peer would refuse (a message that fails
    here is this side's bug, not the peer's: ValueError, not BridgePeerError)."""
    try:
        return parse({"t": t_, **{k: v for k, v in fields.items() if v is not None}})
    except BridgePeerError as e:
        raise ValueError(f"built an invalid {t_!r} message: {e}") from None


def hello(label: str, max_w: int, max_h: int) -> dict[str, Any]:
    return _built("hello", v=VERSION, label=label, max_w=max_w, max_h=max_h)


def announce(s: int, name: str, w: int, h: int, fmt: str, fps: float | None = None) -> dict[str, Any]:
    return _built("announce", s=s, name=name, w=w, h=h, fmt=fmt, fps=None if fps is None else round(fps, 3))


def format_change(s: int, to: int, w: int, h: int, fmt: str) -> dict[str, Any]:
    return _built("format", s=s, to=to, w=w, h=h, fmt=fmt)


def retire(s: int) -> dict[str, Any]:
    return _built("retire", s=s)


def closed(s: int) -> dict[str, Any]:
    return _built("closed", s=s)


def km_announce(id: int, s: int, name: str, kind: str, w: int, h: int, fmt: str, size: int) -> dict[str, Any]:
    return _built("km_announce", id=id, s=s, name=name, kind=kind, w=w, h=h, fmt=fmt, size=size)


def km_ready(id: int, s: int) -> dict[str, Any]:
    return _built("km_ready", id=id, s=s)


def km_want(id: int, own: bool, keys: tuple[int, ...] | list[int]) -> dict[str, Any]:
    return _built("km_want", id=id, own=int(own), keys=list(keys)[:MAX_KEYS])


def km_retire(id: int) -> dict[str, Any]:
    return _built("km_retire", id=id)


def bye() -> dict[str, Any]:
    return _built("bye")


# -- keyed-mutex transfers: the user data of a content frame ---------------------------------------------------------
def transfer_data(key: int, sync_value: int, private_data: bytes) -> bytes:
    """What travels with a keyed-mutex content frame: the key it was released with, its sync value, private data."""
    data = msgpack.packb([key, sync_value, bytes(private_data)], use_bin_type=True)
    assert len(data) <= MAX_USER_DATA
    return data


def parse_transfer(data: Any) -> tuple[int, int, bytes]:
    """(key, sync value, private data) of a content frame from the peer; BridgePeerError if malformed."""
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) > MAX_USER_DATA:
        raise _fail("keyed-mutex transfer data", data)
    try:
        value = msgpack.unpackb(bytes(data), raw=False, max_bin_len=MAX_PRIVATE, max_array_len=3, max_map_len=0,
                                max_str_len=0, max_ext_len=0)
    except Exception:
        raise _fail("keyed-mutex transfer data (msgpack)", bytes(data[:32])) from None
    if type(value) is not list or len(value) != 3 or type(value[2]) is not bytes or len(value[2]) > MAX_PRIVATE:
        raise _fail("keyed-mutex transfer data", value)
    return _u64(value[0], "transfer key"), _u64(value[1], "transfer sync value"), value[2]


def mirror_name(name: str, label: str) -> str | None:
    """The local name of a peer's `name` (NAME@LABEL), or None when it would exceed MAX_NAME."""
    out = f"{name}@{label}"
    return out if len(out) <= MAX_NAME else None
