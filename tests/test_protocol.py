"""The wire protocol as a pure state machine: no sockets here, real fds where fds matter."""

import os

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from texbridge import LocalProtocolError, ProtocolError, RemoteProtocolError
from texbridge._protocol import (MAX_FRAME, VERSION, Connection, Message, Op, State, decode, encode,
                                 peek_request_id)


def frame(*items):
    return msgpack.packb(list(items), use_bin_type=True)


class ProtocolPair:
    """A client and a broker Connection wired back to back (h11's ConnectionPair), with real memfds as fds."""

    def __init__(self):
        self.client = Connection(broker_side=False)
        self.broker = Connection(broker_side=True)

    def request(self, op, fields=None, fds=()):
        msg = Message(op, self.client.next_request_id(), fields or {}, len(fds))
        got = self.broker.receive(self.client.send(msg), len(fds))
        assert got == msg
        return got

    def respond(self, msg):
        got = self.client.receive(self.broker.send(msg), msg.nfds)
        assert got == msg
        return got


def test_pair_round_trips_a_session():
    pair = ProtocolPair()
    pair.request(Op.HELLO, {"version": VERSION, "name": "t", "pid": os.getpid()})
    assert pair.broker.state is State.READY
    fd = os.memfd_create("x")
    try:
        req = pair.request(Op.REGISTER, {"descriptor": {"kind": "buffer", "size": 1}}, fds=[fd])
        pair.respond(Message(Op.REPLY, req.request_id, {"handle": 5}))
        req = pair.request(Op.OPEN, {"handle": 5})
        pair.respond(Message(Op.REPLY, req.request_id, {"handle": 5}, 1))
    finally:
        os.close(fd)
    pair.request(Op.BYE)
    assert pair.broker.state is State.CLOSED


def test_requests_before_hello_are_refused():
    broker = Connection(broker_side=True)
    with pytest.raises(RemoteProtocolError, match="not allowed"):
        broker.receive(encode(Message(Op.LIST, 1)), 0)


def test_client_cannot_send_before_hello():
    with pytest.raises(LocalProtocolError):
        Connection(broker_side=False).send(Message(Op.LIST, 1))


def test_protocol_error_is_abstract():
    with pytest.raises(TypeError):
        ProtocolError("x")


@pytest.mark.parametrize("data, nfds, match", [
    (b"", 0, "empty"),
    (b"\xc1garbage", 0, "undecodable"),
    (frame(VERSION, 1, "hello"), 0, "a frame is"),
    (frame(99, 1, "hello", {}, 0), 0, "version"),
    (frame(VERSION, -1, "list", {}, 0), 0, "request id"),
    (frame(VERSION, 1, "launch_missiles", {}, 0), 0, "unknown op"),
    (frame(VERSION, 1, "list", {1: 2}, 0), 0, "undecodable|string keys"),
    (frame(VERSION, 1, "list", {b"offset": 0}, 0), 0, "string keys"),  # msgpack lets bytes keys through
    (frame(True, 1, "list", {}, 0), 0, "version"),  # exact types: True == 1 in Python, not on the wire
    (frame(VERSION, True, "list", {}, 0), 0, "request id"),
    (frame(VERSION, 1.0, "list", {}, 0), 0, "request id"),
    (frame(VERSION, 1, "list", {}, False), 0, "declares"),
    (frame(VERSION, 1, "list", {}, 1), 0, "declares"),
    (frame(VERSION, 1, "list", {}, 0), 2, "declares"),
    (frame(VERSION, 1, "open", {}, 0), 0, "exactly one"),
    (frame(VERSION, 1, "open", {"handle": 1, "name": "x"}, 0), 0, "exactly one"),
    (frame(VERSION, 1, "close", {"handle": "x"}, 0), 0, "must be int"),
    (frame(VERSION, 1, "close", {"handle": True}, 0), 0, "must be int"),
    (frame(VERSION, 1, "close", {}, 0), 0, "missing"),
    (frame(VERSION, 1, "close", {"handle": 1, "extra": 2}, 0), 0, "unknown field"),
    (frame(VERSION, 1, "register", {"descriptor": {}}, 0), 0, "carries"),
    (frame(VERSION, 1, "register", {"descriptor": {}}, 9), 9, "carries"),
    (b"\x00" * (MAX_FRAME + 1), 0, "frame over"),
])
def test_malformed_frames_are_remote_errors(data, nfds, match):
    with pytest.raises(RemoteProtocolError, match=match):
        decode(data, nfds)


def test_truncated_by_kernel_is_an_error():
    with pytest.raises(RemoteProtocolError):
        decode(frame(VERSION, 1, "list", {}, 0), 0, truncated=True)


def test_oversized_outgoing_message_is_local_error():
    with pytest.raises(LocalProtocolError, match="frames are at most"):
        encode(Message(Op.REPLY, 1, {"blob": b"x" * MAX_FRAME}))


def test_peek_request_id_survives_garbage():
    assert peek_request_id(frame(VERSION, 42, "nope", {}, 0)) == 42
    assert peek_request_id(b"\xc1") == 0


@given(st.binary(max_size=256), st.integers(0, 4))
def test_decode_never_raises_anything_else(data, nfds):
    try:
        decode(data, nfds)
    except RemoteProtocolError:
        pass


@pytest.mark.parametrize("garbage", [
    frame(VERSION, 7, "list", {}, 0)[:-2],  # a frame cut inside an object: the decoder must not wait for the rest
    frame(VERSION, 7, "list", {}, 0) + b"\x01",  # bytes after the object
    b"\xc1",  # never valid msgpack
    b"\x95\x01",  # an array header promising more
    frame(VERSION, 7, "list", {}, 0) + frame(VERSION, 8, "list", {}, 0),  # two objects in one frame
])
def test_a_bad_frame_leaves_nothing_behind_for_the_next(garbage):
    """A connection decodes with one long-lived msgpack Unpacker: whatever a bad frame left in it must not be read as
    part of the next frame (a peer could otherwise splice frames or make every later frame fail)."""
    broker = Connection(broker_side=True)
    hello = frame(VERSION, 1, "hello", {"version": VERSION, "name": "t", "pid": 1}, 0)
    assert broker.receive(hello, 0).op is Op.HELLO
    for rid in (2, 3):
        with pytest.raises(RemoteProtocolError):
            broker.receive(garbage, 0)
        got = broker.receive(frame(VERSION, rid, "open", {"handle": 5}, 0), 0)
        assert (got.op, got.request_id, got.fields) == (Op.OPEN, rid, {"handle": 5})


def test_encoding_failure_leaves_the_packer_clean():
    """Each connection packs with one long-lived msgpack Packer: a message that cannot be encoded must not leave
    half a frame in front of the next one."""
    client = Connection(broker_side=False)
    with pytest.raises(LocalProtocolError):
        client.request(Op.HELLO, {"version": VERSION, "name": "t", "pid": 1, "x": [1, object()]})
    rid, data = client.request(Op.LIST, {"offset": 0})
    assert msgpack.unpackb(data) == [VERSION, rid, "list", {"offset": 0}, 0]


@pytest.mark.parametrize("data, nfds", [
    (frame(True, 1, "list", {}, 0), 0),  # True == 1 in Python, not on the wire
    (frame(1.0, 1, "list", {}, 0), 0),
    (frame(VERSION, 1, "list", {}, 0.0), 0),
    (frame(VERSION, 1, "list", {}, False), 0),
    (frame(VERSION, True, "list", {}, 0), 0),
])
def test_envelope_types_are_exact(data, nfds):
    with pytest.raises(RemoteProtocolError):
        decode(data, nfds)


def test_deep_nesting_is_refused_with_a_reason():
    deep: dict = {}
    node = deep
    for _ in range(600):
        node["d"] = {}
        node = node["d"]
    desc = {"kind": "buffer", "size": 1, "driver_private": deep}
    with pytest.raises(RemoteProtocolError, match="nests deeper"):
        decode(frame(VERSION, 1, "register", {"descriptor": desc}, 1), 1)
    with pytest.raises(RemoteProtocolError, match="nests deeper"):
        nested: list = [1]
        for _ in range(20):
            nested = [nested]
        decode(frame(VERSION, 1, "update", {"handle": 1, "meta": {"l": nested}}, 0), 0)
    ok = {"a": [{"b": [1, 2, {"c": "d"}]}]}
    assert decode(frame(VERSION, 1, "update", {"handle": 1, "meta": ok}, 0), 0).fields["meta"] == ok


@pytest.mark.parametrize("envelope", [
    ["v" * 60_000, 1, "list", {}, 0], [VERSION, "r" * 60_000, "list", {}, 0], [VERSION, 1, "o" * 60_000, {}, 0],
    [VERSION, 1, "list", {}, "n" * 60_000], [VERSION, 1, "list", {"k" * 60_000: 1}, 0],
    [VERSION, 1, "list", {}, list(range(4000))], [b"b" * 60_000, 1, "list", {}, 0],
])
def test_errors_echo_a_short_repr(envelope):
    """Every value quoted back is cut: the error reply to a ~60 KB value is small (it once exceeded a frame)."""
    data = msgpack.packb(envelope, use_bin_type=True)
    assert len(data) <= MAX_FRAME
    with pytest.raises(RemoteProtocolError) as e:
        decode(data, 0)
    assert len(str(e.value)) < 200


def test_request_strings_are_at_most_1_kib():
    fields = {"version": VERSION, "pid": 1}
    decode(frame(VERSION, 1, "hello", {**fields, "name": "n" * 1024}, 0), 0)
    with pytest.raises(RemoteProtocolError, match="too long"):
        decode(frame(VERSION, 1, "hello", {**fields, "name": "n" * 1025}, 0), 0)
