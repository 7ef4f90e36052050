"""The bridge engine's control messages (bridge/_wire.py): every builder round-trips, anything else is refused.

Pure: no broker, no link. The hostile-peer guarantee: whatever a peer sends, parse() returns a checked message or
raises BridgePeerError, never another exception.
"""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from texbridge._protocol import MAX_NAME
from texbridge.bridge import _wire
from texbridge.bridge._link import MAX_DIMENSION, MAX_STREAMS, MAX_USER_DATA, BridgePeerError

BUILT = [
    _wire.hello("host-a", 1920, 1080),
    _wire.announce(0, "cam", 640, 480, "rgba8", 59.94),
    _wire.announce(MAX_STREAMS - 1, "x" * MAX_NAME, MAX_DIMENSION, 1, "r32f"),
    _wire.format_change(1, 2, 1280, 720, "bgra8"),
    _wire.retire(3),
    _wire.closed(4),
    _wire.km_announce(5, 5, "tex", "texture", 64, 32, "rgba8", 64 * 32 * 4),
    _wire.km_announce(6, 8, "gate", "mutex", 1, 1, "r8", 1),
    _wire.km_ready(5, 7),
    _wire.km_want(5, True, [1, 2**64 - 1]),
    _wire.km_want(5, False, []),
    _wire.km_retire(5),
    _wire.bye(),
]


@pytest.mark.parametrize("msg", BUILT, ids=lambda m: m["t"])
def test_built_messages_survive_msgpack_and_parse_to_themselves(msg):
    wire = msgpack.unpackb(msgpack.packb(msg, use_bin_type=True), raw=False)
    assert _wire.parse(wire) == msg


def test_every_kind_has_a_builder():
    assert {m["t"] for m in BUILT} == set(_wire.SCHEMAS)


@pytest.mark.parametrize("bad", [
    None, [], "hello", {}, {"t": 1}, {"t": "nope"},
    {"t": "retire"},  # missing field
    {"t": "retire", "s": 0, "x": 1},  # extra field
    {"t": "retire", "s": MAX_STREAMS}, {"t": "retire", "s": -1}, {"t": "retire", "s": True}, {"t": "retire", "s": 1.0},
    {"t": "announce", "s": 0, "name": "", "w": 1, "h": 1, "fmt": "rgba8"},
    {"t": "announce", "s": 0, "name": "x" * (MAX_NAME + 1), "w": 1, "h": 1, "fmt": "rgba8"},
    {"t": "announce", "s": 0, "name": "a\nb", "w": 1, "h": 1, "fmt": "rgba8"},
    {"t": "announce", "s": 0, "name": "a", "w": 0, "h": 1, "fmt": "rgba8"},
    {"t": "announce", "s": 0, "name": "a", "w": 1, "h": MAX_DIMENSION + 1, "fmt": "rgba8"},
    {"t": "announce", "s": 0, "name": "a", "w": 1, "h": 1, "fmt": "rgb9"},
    {"t": "announce", "s": 0, "name": "a", "w": 1, "h": 1, "fmt": "rgba8", "fps": float("nan")},
    {"t": "hello", "v": 1, "label": "a@b", "max_w": 1, "max_h": 1},
    {"t": "hello", "v": 1, "label": "x" * 33, "max_w": 1, "max_h": 1},
    {"t": "km_want", "id": 0, "own": 2, "keys": []},
    {"t": "km_want", "id": 0, "own": 1, "keys": [0] * 49},
    {"t": "km_want", "id": 0, "own": 1, "keys": [2**64]},
    {"t": "km_want", "id": 0, "own": 1, "keys": {"a": 1}},
    {"t": "km_announce", "id": 0, "s": 0, "name": "t", "kind": "sphere", "w": 1, "h": 1, "fmt": "r8", "size": 1},
], ids=repr)
def test_malformed_messages_are_peer_errors(bad):
    with pytest.raises(BridgePeerError):
        _wire.parse(bad)


_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=200)
                       | st.binary(max_size=64), lambda inner: st.lists(inner, max_size=60)
                       | st.dictionaries(st.text(max_size=8), inner, max_size=8), max_leaves=80)


@settings(max_examples=200)
@given(st.sampled_from(sorted(_wire.SCHEMAS)), st.dictionaries(st.sampled_from(
    ["s", "to", "name", "w", "h", "fmt", "fps", "id", "own", "keys", "kind", "size", "v", "label", "max_w", "max_h",
     "junk"]), _values, max_size=10))
def test_hostile_messages_give_a_checked_message_or_a_peer_error(kind, fields):
    try:
        out = _wire.parse({"t": kind, **fields})
    except BridgePeerError:
        return
    assert _wire.parse(out) == out  # what passes is exactly a message of the table


@settings(max_examples=150)
@given(st.binary(max_size=MAX_USER_DATA + 10) | _values)
def test_hostile_transfer_data_gives_a_peer_error(data):
    try:
        key, sync, private = _wire.parse_transfer(data)
    except BridgePeerError:
        return
    assert 0 <= key < 2**64 and 0 <= sync < 2**64 and len(private) <= _wire.MAX_PRIVATE


def test_transfer_data_round_trips_at_capacity():
    data = _wire.transfer_data(2**64 - 1, 12345, b"\xff" * _wire.MAX_PRIVATE)
    assert len(data) <= MAX_USER_DATA
    assert _wire.parse_transfer(data) == (2**64 - 1, 12345, b"\xff" * _wire.MAX_PRIVATE)
    with pytest.raises(BridgePeerError):
        _wire.parse_transfer(msgpack.packb([1, 2, b"x" * (_wire.MAX_PRIVATE + 1)]))


def test_a_builder_given_bad_values_is_this_sides_bug_not_a_peer_error():
    with pytest.raises(ValueError):
        _wire.announce(MAX_STREAMS, "x", 1, 1, "rgba8")


def test_mirror_names_are_bounded():
    assert _wire.mirror_name("cam", "host") == "cam@host"
    assert _wire.mirror_name("x" * (MAX_NAME - 5), "host") is not None
    assert _wire.mirror_name("x" * (MAX_NAME - 4), "host") is None
