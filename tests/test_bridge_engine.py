"""The bridge engine over an in-process link (tests/_memlink.py): two namespaces, each with its real broker, bridged.

What the engine promises whatever the transport: senders mirrored both ways pixel-exact as NAME@LABEL, resize and
restart followed, mirrors never re-exported, keyed-mutex resources crossing with DXGI's contract, a dead link
retiring mirrors and reconnecting, per-peer limits, and a malformed peer costing only its session.
Real processes and transports: tests/test_bridge_e2e.py.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

import numpy as np
import pytest

import texbridge as tb
from texbridge.bridge import _wire
from texbridge.bridge._engine import Bridge, BridgeLimits
from texbridge.senders import Receiver, Sender, list_senders

sys.path.insert(0, os.path.dirname(__file__))
from _memlink import MemLink, Rendezvous  # noqa: E402


def until(cond, timeout=10.0, what="condition"):
    end = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        assert time.monotonic() < end, f"{what} not reached within {timeout} s"
        time.sleep(0.01)


class Pair:
    """Namespaces A and B, each with a session and a Bridge on its own thread, linked through a Rendezvous."""

    def __init__(self, limits_b: BridgeLimits | None = None) -> None:
        ns = os.environ["TEXBRIDGE_NAMESPACE"]
        self.rv = Rendezvous(("hostA", "hostB"))
        ea, eb = self.rv.endpoints()
        self.sa, self.sb = tb.connect(ns + "a"), tb.connect(ns + "b")
        self.A = Bridge(ea, label="hostA", session=self.sa, status_file=False)
        self.B = Bridge(eb, label="hostB", session=self.sb, status_file=False, limits=limits_b)
        self.threads = [threading.Thread(target=b.run, daemon=True) for b in (self.A, self.B)]
        for t in self.threads:
            t.start()
        until(lambda: self.A.connected and self.B.connected, what="link up")

    def close(self) -> None:
        self.A.stop()
        self.B.stop()
        for t in self.threads:
            t.join(10)
            assert not t.is_alive()
        self.sa.close()
        self.sb.close()


@pytest.fixture
def pair(runtime):
    made = []

    def make(**kw):
        made.append(Pair(**kw))
        return made[-1]

    yield make
    for p in made:
        p.close()


def frames(shape, n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, shape, np.uint8) for _ in range(n)]


def receive_exact(rx: Receiver, snd: Sender, frame: np.ndarray, timeout=10.0) -> np.ndarray:
    """Send `frame` until the receiver gets a frame of its shape, and return that."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        snd.send(frame)
        got = rx.wait_frame(0.05)
        if got is not None and got.shape == frame.shape and np.array_equal(got, frame):
            return got
    raise AssertionError("the frame did not arrive pixel-exact in time")


def test_senders_cross_both_ways_pixel_exact_and_mirrors_are_not_reexported(pair):
    p = pair()
    with Sender("cam", 64, 48, session=p.sa) as a, Sender("screen", 40, 30, "bgra8", session=p.sb) as b, \
            Receiver("cam@hostA", session=p.sb) as ra, Receiver("screen@hostB", session=p.sa) as rb:
        for fa, fb in zip(frames((48, 64, 4), 5), frames((30, 40, 4), 5, seed=1)):
            receive_exact(ra, a, fa)
            receive_exact(rb, b, fb)
        info = {i.name: i for i in list_senders(p.sb)}
        assert info["cam@hostA"].bridged == "hostA" and info["screen"].bridged == ""
        time.sleep(0.3)  # time enough for a loop to show
        assert sorted(i.name for i in list_senders(p.sa)) == ["cam", "screen@hostB"]
        assert sorted(i.name for i in list_senders(p.sb)) == ["cam@hostA", "screen"]
        st = p.B.status()
        assert st["peer"]["label"] == "hostA" and [s["name"] for s in st["in"]] == ["cam@hostA"]
        assert [s["name"] for s in st["out"]] == ["screen"] and st["in"][0]["frames"] >= 5


def test_resize_and_restart_are_followed(pair):
    p = pair()
    rx = Receiver("cam@hostA", session=p.sb)
    try:
        with Sender("cam", 32, 16, session=p.sa) as a:
            receive_exact(rx, a, frames((16, 32, 4), 1)[0])
            a.resize(80, 60, "rgba16")
            receive_exact(rx, a, frames((60, 80, 4), 1)[0].astype(np.uint16) * 257)
            assert rx.format == "rgba16"
        until(lambda: "cam@hostA" not in {i.name for i in list_senders(p.sb)}, what="mirror retired")
        with Sender("cam", 20, 10, session=p.sa) as a2:  # the same name again: a new instance, followed
            receive_exact(rx, a2, frames((10, 20, 4), 1, seed=3)[0])
    finally:
        rx.close()


def test_keyed_mutex_crosses_with_content_key_sync_value_and_private_data(pair):
    p = pair()
    tex = p.sa.create_texture(48, 16, "rgba8", keyed_mutex=True, name="shared")
    mirror = until(lambda: _try_open(p.sb, "shared@hostA"), what="mirror published")
    assert mirror.descriptor.keyed_mutex and mirror.shape == tex.shape
    rounds = 40

    def producer():
        for i in range(rounds):
            tex.mutex.acquire(0, 10)
            tex.numpy()[:] = i
            tex.mutex.release(1, private_data=b"round %d" % i, sync_value=1000 + i)

    th = threading.Thread(target=producer)
    th.start()
    try:
        for i in range(rounds):
            sync = mirror.mutex.acquire(1, 10)
            assert (mirror.numpy() == i).all(), f"round {i}: content not there when the key was"
            assert sync == 1000 + i and mirror.mutex.private_data == b"round %d" % i
            mirror.mutex.release(0, private_data=b"ack %d" % i)
    finally:
        th.join(20)
    tex.mutex.acquire(0, 10)  # the last release (key 0) came back with its private data
    assert tex.mutex.private_data == b"ack %d" % (rounds - 1)
    # DXGI timeouts hold across: nobody releases key 7, so waiting for it times out on time
    t = time.monotonic()
    with pytest.raises(tb.KeyedMutexTimeout):
        mirror.mutex.acquire(7, 0.3)
    assert 0.3 <= time.monotonic() - t < 2.0
    tex.mutex.release(1)
    tex.close()
    mirror.close()


def _try_open(session, name):
    try:
        return session.open(name)
    except tb.NotFound:
        return None


def test_a_dead_link_retires_mirrors_abandons_held_copies_and_reconnects(pair):
    p = pair()
    tex = p.sa.create_texture(8, 8, "rgba8", keyed_mutex=True, name="km")
    mirror = until(lambda: _try_open(p.sb, "km@hostA"), what="mirror published")
    with Sender("cam", 16, 16, session=p.sa) as a, Receiver("cam@hostA", session=p.sb) as rx:
        receive_exact(rx, a, frames((16, 16, 4), 1)[0])
        p.rv.cut()
        until(lambda: "cam@hostA" not in {i.name for i in list_senders(p.sb)}, what="mirror retired")
        # the content lived on A: B's copy was held by its bridge, so a waiter on B learns it is lost
        with pytest.raises(tb.KeyedMutexAbandoned):
            mirror.mutex.acquire(0, 5)
        mirror.mutex.release(0)
        receive_exact(rx, a, frames((16, 16, 4), 1, seed=5)[0])  # relinked: mirrored again
        assert p.A.disconnects >= 1 and any("lost" in e for e in p.B.errors)
        # the old mirror (still held here) gave its name up: the new link publishes a fresh one under it
        again = until(lambda: _try_open(p.sb, "km@hostA"), what="keyed-mutex mirror published again")
        assert again.handle != mirror.handle
        again.close()
    mirror.close()
    tex.close()


def test_per_peer_stream_limit_refuses_extra_streams_not_the_session(pair):
    p = pair(limits_b=BridgeLimits(max_streams=1))
    with Sender("one", 8, 8, session=p.sa) as s1, Sender("two", 8, 8, session=p.sa) as s2:
        s1.send(np.zeros((8, 8, 4), np.uint8))
        s2.send(np.zeros((8, 8, 4), np.uint8))
        until(lambda: any("refused" in e for e in p.B.errors), what="a refusal")
        names = {i.name for i in list_senders(p.sb)}
        assert len(names & {"one@hostA", "two@hostA"}) == 1
        assert p.B.connected and p.B.disconnects == 0


@contextlib.contextmanager
def against_raw_peer(peer: str, limits: BridgeLimits | None = None):
    """A Bridge labelled "good" in its own thread, and the far end of its in-memory link for the test to speak the
    wire protocol by hand: yields (rendezvous, the peer's endpoint, bridge, bridge thread, session)."""
    rv = Rendezvous((peer, "good"))
    peer_end, good_end = rv.endpoints()
    s = tb.connect()
    bridge = Bridge(good_end, label="good", session=s, status_file=False,
                    **({"limits": limits} if limits is not None else {}))
    th = threading.Thread(target=bridge.run, daemon=True)
    th.start()
    try:
        yield rv, peer_end, bridge, th, s
    finally:
        bridge.stop()
        th.join(10)
        s.close()


def test_a_peer_of_another_protocol_version_is_refused(runtime):
    with against_raw_peer("future") as (_, evil_end, bridge, _, _):
        link: MemLink = until(lambda: evil_end.establish(0.2), what="link")
        link.send({"t": "hello", "v": _wire.VERSION + 1, "label": "future", "max_w": 64, "max_h": 64})
        until(lambda: any("version" in e for e in bridge.errors), what="version refused")
        assert not bridge.connected or not link.alive


@pytest.mark.parametrize("garbage", [{"t": "announce", "s": 99}, {"t": "format", "s": 0, "to": 1, "w": 0, "h": 1,
                                                                   "fmt": "rgba8"}, ["not", "a", "map"]])
def test_a_malformed_peer_costs_its_session_not_the_bridge(runtime, garbage):
    with against_raw_peer("evil") as (_, evil_end, bridge, th, _):
        link: MemLink = until(lambda: evil_end.establish(0.2), what="link")
        link.send(_wire.hello("evil", 64, 64))
        link.send(garbage)
        until(lambda: any("broke the protocol" in e for e in bridge.errors), what="peer error noted")
        until(lambda: not link.alive, what="session dropped")
        assert th.is_alive()
        link2 = until(lambda: evil_end.establish(0.2), what="a new session")  # the bridge serves on
        link2.send(_wire.hello("evil", 64, 64))
        until(lambda: bridge.connected, what="connected again")


def test_timestamps_and_user_data_travel_with_their_frames(pair):
    p = pair()
    with Sender("cam", 16, 8, session=p.sa) as a, Receiver("cam@hostA", session=p.sb) as rx:
        px = frames((8, 16, 4), 1)[0]
        end = time.monotonic() + 10
        while time.monotonic() < end:
            stamp = time.monotonic_ns() - 5_000_000
            a.send(px, timestamp_ns=stamp, user_data=b"meta %d" % stamp)
            f = rx.next_frame(0.05)
            if f is not None:
                break
        assert f is not None and np.array_equal(f.pixels, px)
        sent = int(f.user_data.split()[1])  # the user data of the very frame these pixels came with
        # one host, one monotonic clock: the mirror's timestamp is the original's (to the µs of clock reads)
        assert abs(f.timestamp_ns - sent) < 2_000_000, (f.timestamp_ns, sent)


def test_a_hostile_but_well_formed_peer_is_held_to_the_limits(runtime):
    """A peer that announces more and bigger streams than allowed, resizes streams it never announced, retires
    twice and wants keys of resources that do not exist costs refusals, never the bridge or unbounded state."""
    limits = BridgeLimits(max_streams=4, max_bytes=64 * 64 * 4 * 3, max_width=256, max_height=256)
    with against_raw_peer("evil", limits) as (rv, evil_end, bridge, th, s):
        link: MemLink = until(lambda: evil_end.establish(0.2), what="link")
        link.send(_wire.hello("evil", 64, 64))
        for i in range(12):  # 12 announcements: only 3 fit the byte limit, the rest are refused
            link.send(_wire.announce(i, f"s{i}", 64, 64, "rgba8"))
        link.send(_wire.announce(20, "huge", 4096, 4096, "rgba8"))  # over max size
        link.send(_wire.format_change(30, 31, 8, 8, "r8"))  # a stream never announced
        link.send(_wire.retire(40))
        link.send(_wire.retire(40))
        link.send(_wire.km_want(5, True, [1, 2, 3]))
        link.send(_wire.km_announce(9, 9, "km", "buffer", 16384, 16384, "r8", 16384 * 16384))  # too big
        until(lambda: sum("refused" in e for e in bridge.errors) >= 8, what="refusals")
        mirrors = {i.name for i in list_senders(s) if i.bridged == "evil"}
        assert len(mirrors) == 3 and bridge.connected and th.is_alive()
        replies = [m for m in link.receive() if m["t"] != "hello"]
        assert replies and {m["t"] for m in replies} == {"closed"}  # each refusal told, nothing else
        rv.cut()
        until(lambda: not {i.name for i in list_senders(s) if i.bridged == "evil"}, what="mirrors retired")


def test_keyed_mutex_buffers_and_bare_mutexes_cross_and_content_follows_whoever_waits(pair):
    p = pair()
    buf = p.sa.create_buffer(100_000, keyed_mutex=True, name="blob")  # not a whole number of rows: padded
    bare = p.sa.create_keyed_mutex(name="gate")
    mbuf = until(lambda: _try_open(p.sb, "blob@hostA"), what="buffer mirror")
    mbare = until(lambda: _try_open(p.sb, "gate@hostA"), what="mutex mirror")
    data = np.frombuffer(np.random.default_rng(1).bytes(100_000), np.uint8)
    buf.mutex.acquire(0, 5)
    buf.numpy()[:] = data
    buf.mutex.release(3, private_data=b"p3")
    mbuf.mutex.acquire(3, 10)  # B waits for 3: the content comes over with the key
    assert np.array_equal(mbuf.numpy(), data) and mbuf.mutex.private_data == b"p3"
    mbuf.numpy()[:10] = 42
    mbuf.mutex.release(4)  # nobody waits for 4 anywhere: it stays on B, free with key 4
    time.sleep(0.2)
    buf.mutex.acquire(4, 10)  # now A waits for 4: the content goes back to A
    assert (buf.numpy()[:10] == 42).all() and np.array_equal(buf.numpy()[10:], data[10:])
    buf.mutex.release(0)
    with pytest.raises(tb.KeyedMutexTimeout):  # nobody releases 5: B's wait times out on time
        mbuf.mutex.acquire(5, 0.2)
    bare.mutex.acquire(0, 5)
    bare.mutex.release(7, private_data=b"go", sync_value=77)
    assert mbare.mutex.acquire(7, 10) == 77 and mbare.mutex.private_data == b"go"
    mbare.mutex.release(8)
    assert bare.mutex.acquire(8, 10) == 78
    for r in (mbuf, mbare, buf, bare):
        r.close()


def test_many_streams_both_ways_at_once(pair):
    p = pair()
    n = 6
    senders = [Sender(f"a{i}", 16 + i, 8, session=p.sa) for i in range(n)] + \
              [Sender(f"b{i}", 8, 16 + i, session=p.sb) for i in range(n)]
    receivers = [Receiver(f"a{i}@hostA", session=p.sb) for i in range(n)] + \
                [Receiver(f"b{i}@hostB", session=p.sa) for i in range(n)]
    try:
        want = [frames(s.shape, 1, seed=k)[0] for k, s in enumerate(senders)]
        done = [False] * len(senders)
        end = time.monotonic() + 20
        while not all(done) and time.monotonic() < end:
            for k, (s, r) in enumerate(zip(senders, receivers)):
                if not done[k]:
                    s.send(want[k])
                    got = r.receive()
                    done[k] = got is not None and np.array_equal(got, want[k])
            time.sleep(0.01)
        assert all(done), f"streams not delivered: {[s.name for s, d in zip(senders, done) if not d]}"
        assert len(p.A.status()["in"]) == n and len(p.B.status()["in"]) == n
    finally:
        for x in receivers + senders:
            x.close()


def test_cadence_spins_only_around_a_periodic_streams_next_frame(monkeypatch):
    """The exporter and the importer spin only inside a window around a periodic stream's next frame (sleeping
    otherwise): centred on the frame's due time mapped to our clock by the fastest transit, no wider than
    SPIN_SHARE of the period, and none for an irregular or late stream, nor without a core to spare."""
    from texbridge.bridge import _link
    from texbridge.bridge._link import SPIN_MAX_S, SPIN_MIN_S, SPIN_SHARE
    from texbridge.bridge._link import Cadence as _Cadence

    monkeypatch.setattr(_link, "SPIN_WINDOWS", True)

    c = _Cadence()
    offset = 1000.0  # the frames' own clock (a sender's wall clock) runs 1000 s ahead of ours
    t = 5.0
    for k in range(6):
        c.tick(t + offset, t + 0.0002 + (0.0003 if k % 2 else 0.0))  # transits 200 us (fastest) and 500 us
        t += 0.005
    assert c.window(t) is None  # too few regular frames yet
    for _ in range(6):
        c.tick(t + offset, t + 0.0002)
        t += 0.005
    start, end = c.window(t - 0.001)
    due = t + 0.0002  # the last frame (t - 5 ms) + one period, seen after the fastest transit
    assert start < due < end and abs((start + end) / 2 - due) < 1e-6
    assert SPIN_MIN_S <= (end - start) / 2 <= min(SPIN_MAX_S, SPIN_SHARE * 0.005)
    assert c.window(end + 1e-4) is None  # missed (a skipped frame, a paused sender): sleep until it comes
    c.tick(t + 0.05 + offset, t + 0.05)  # a pause of ten periods: learned afresh
    assert c.window(t + 0.05) is None
    slow = _Cadence()
    for k in range(20):
        slow.tick(k * 2.0, k * 2.0)  # a frame every 2 s: sleeping costs nothing worth a spin
    assert slow.window(38.5) is None
    fast = _Cadence()
    for k in range(20):
        at = k * 0.001 + (0.0001 if k % 2 else 0.0)  # 1000 fps, ±100 us of jitter: the window would be wide,
        fast.tick(at, at)                             # but stays within SPIN_SHARE of the period
    s, e = fast.window(0.0195)
    assert (e - s) / 2 <= SPIN_SHARE * 0.0011
    monkeypatch.setattr(_link, "SPIN_WINDOWS", False)  # 1-3 CPUs (or TEXBRIDGE_BRIDGE_SPIN=0): never
    assert fast.window(0.0195) is None
    for env, want in (("1", True), ("0", False)):
        monkeypatch.setenv("TEXBRIDGE_BRIDGE_SPIN", env)
        assert _link._spin_default() is want


def test_a_receiver_spinning_for_a_due_frame_takes_it(runtime):
    """Receiver.wait_frame(spin=...) (the exporter's wait in a window): a frame sent during the spin is returned,
    and a spin longer than the timeout ends at the timeout."""
    ns = os.environ["TEXBRIDGE_NAMESPACE"]
    with tb.connect(ns + "s") as s, Sender("spun", 8, 8, session=s) as snd, Receiver("spun", session=s) as rx:
        snd.send(np.zeros(snd.shape, np.uint8))
        until(lambda: rx.wait_frame(0.1) is not None, what="first frame")
        t0 = time.monotonic()
        assert rx.wait_frame(0.05, spin=1.0) is None
        assert time.monotonic() - t0 < 0.9
        timer = threading.Timer(0.02, lambda: snd.send(np.full(snd.shape, 9, np.uint8)))
        timer.start()
        got = rx.next_frame(5.0, spin=0.005)
        timer.join()
        assert got is not None and int(got.pixels[0, 0, 0]) == 9
