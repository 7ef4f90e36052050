"""The slot ring (texbridge.senders.ring) over plain buffers: no broker, no resources.

Writer and reader steps are driven by hand, so every interleaving below (a copy overlapped by a write, a pin that
lands between the writer's "slot busy" mark and its re-check) happens exactly where the test puts it.
"""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from texbridge._errors import ClosedError, InvalidArgument
from texbridge.senders import FrameSink, FrameSource
from texbridge.senders import ring as rg
from texbridge.senders.ring import (CONTROL_SIZE, MAX_READERS, SENDER_CONTROL_SIZE, ControlWords, Read, RingReader,
                                    RingWriter, Stale)

SHAPE = (4, 4)


class Ring:
    """A ring over a bytearray with NumPy slots, as a Sender lays it out (the writer fills a slot with one value)."""

    def __init__(self, nslots: int = 3, buffer: object = None, frame_sync: bool = False) -> None:
        buffer = buffer if buffer is not None else bytearray(SENDER_CONTROL_SIZE)
        self.ctl = ControlWords(buffer, user_data=len(buffer) >= SENDER_CONTROL_SIZE)  # type: ignore[arg-type]
        self.nslots = nslots
        self.w = RingWriter(self.ctl, nslots, pid=os.getpid(), frame_sync=frame_sync)
        self.slots = [np.zeros(SHAPE, np.uint8) for _ in range(nslots)]
        self.w.publish_ring(SHAPE[1], SHAPE[0], "r8", list(range(100, 100 + nslots)))

    def send(self, value: int) -> int:
        slot = self.w.begin()
        self.slots[slot][...] = value
        self.w.commit(slot)
        return slot

    def reader(self, pid: int | None = None) -> RingReader:
        r = RingReader(self.ctl)
        assert r.attach(pid or os.getpid(), lambda p: True)
        return r

    def read(self, r: RingReader, keep_pin: bool = False, copy=None):  # type: ignore[no-untyped-def]
        gen = r.layout().generation  # type: ignore[union-attr]
        return r.read(copy or (lambda s: self.slots[s].copy()), nslots=self.nslots, generation=gen,
                      keep_pin=keep_pin)


def seq(ring: Ring, slot: int) -> int:
    return int(ring.ctl.u[rg._SEQ + slot])


def test_the_memory_ring_is_a_frame_sink_and_source() -> None:
    ring = Ring()
    assert isinstance(ring.w, FrameSink) and isinstance(ring.reader(), FrameSource)
    assert not isinstance(ring.ctl, FrameSink) and not isinstance(ring.w, FrameSource)


def test_a_reader_gets_the_newest_frame_and_nothing_before_the_first() -> None:
    ring = Ring()
    r = ring.reader()
    assert r.newest() == 0 and r.valid and not r.closed
    ring.send(7)
    ring.send(8)
    got = ring.read(r)
    assert isinstance(got, Read)
    assert got.frame == 2 and int(got.data.min()) == int(got.data.max()) == 8
    assert int(ring.ctl.readers[r.row, rg._R_CONSUMED]) == 2
    assert int(ring.ctl.readers[r.row, rg._R_PIN]) == 0, "a copying read leaves no pin behind"


def test_the_writer_skips_the_latest_and_pinned_slots_and_overwrites_only_when_all_are_pinned() -> None:
    ring = Ring(nslots=3)
    a, b = ring.reader(), ring.reader()
    s1 = ring.send(1)
    got_a = ring.read(a, keep_pin=True)  # a pins s1
    assert isinstance(got_a, Read) and got_a.slot == s1
    s2 = ring.send(2)
    assert s2 != s1
    got_b = ring.read(b, keep_pin=True)  # b pins s2
    assert isinstance(got_b, Read)
    s3 = ring.send(3)
    assert s3 not in (s1, s2) and ring.w.overwrites == 0
    c = ring.reader()
    assert isinstance(ring.read(c, keep_pin=True), Read)  # c pins s3: every slot is pinned now
    s4 = ring.send(4)
    assert s4 == (s3 + 1) % 3 == s1 and ring.w.overwrites == 1
    gen = a.generation
    assert not a.still_valid(got_a, gen) and b.still_valid(got_b, gen), "only the overwritten view is invalid"
    a.release()
    b.release()
    s5 = ring.send(5)
    assert s5 == s2 and ring.w.overwrites == 1, "a released slot is reused before any pinned one"


def test_a_copy_overlapped_by_a_write_is_detected_and_retried_on_the_newer_frame() -> None:
    """The torn read: reader B copies slot X while the writer, finding every slot pinned, rewrites X."""
    ring = Ring(nslots=2)
    a, b = ring.reader(), ring.reader()
    ring.send(1)  # slot 0
    assert isinstance(ring.read(a, keep_pin=True), Read)  # a pins slot 0
    torn_slot = ring.send(2)  # slot 1: the one b is about to copy
    calls: list[int] = []

    def copy_interrupted(slot: int) -> np.ndarray:
        calls.append(slot)
        half = ring.slots[slot][:2].copy()  # first half of frame 2
        if len(calls) == 1:
            # The writer runs in the middle of b's copy: both slots are pinned (a: 0, b: 1), so it overwrites the
            # oldest (slot 0) with frame 3, then, with every slot still pinned, starts rewriting slot 1.
            assert ring.send(3) == 0
            victim = ring.w.begin()
            assert victim == torn_slot
            ring.slots[victim][...] = 99  # frame 4 half written: the rest of b's copy sees it
            return np.concatenate([half, ring.slots[slot][2:]])
        return ring.slots[slot].copy()

    got = ring.read(b, copy=copy_interrupted)
    assert isinstance(got, Read)
    assert calls[0] == torn_slot and len(calls) == 2, "the torn copy was not retried"
    assert got.frame == 3 and got.slot == 0 and int(got.data.min()) == int(got.data.max()) == 3
    assert ring.w.overwrites == 2


def test_a_write_that_does_not_move_the_sequence_goes_unnoticed() -> None:
    """Control for the test above: the same overlap without the writer's sequence bump hands the reader a torn
    frame, so the detection above is the sequence check's doing (and the test can see a torn frame)."""
    ring = Ring(nslots=2)
    a, b = ring.reader(), ring.reader()
    ring.send(1)
    assert isinstance(ring.read(a, keep_pin=True), Read)
    ring.send(2)

    def copy_interrupted(slot: int) -> np.ndarray:
        half = ring.slots[slot][:2].copy()
        ring.slots[slot][2:] = 99
        return np.concatenate([half, ring.slots[slot][2:]])  # the writer "forgot" to bump the sequence

    got = ring.read(b, copy=copy_interrupted)
    assert isinstance(got, Read) and int(got.data.min()) != int(got.data.max())


def test_a_pin_landing_between_the_busy_mark_and_the_recheck_makes_the_writer_back_off(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The Dekker pair: the writer marks a slot odd, fences, re-reads the pins. A reader that pinned that slot in
    between keeps it: the writer restores the exact sequence it replaced and takes another slot."""
    ring = Ring(nslots=3)
    r = ring.reader()
    ring.send(1)  # slot 0; the writer will try slot 1 next
    before = seq(ring, 1)
    fences = []

    def fence_with_a_reader_in_between() -> None:
        if not fences:
            ring.ctl.readers[r.row, rg._R_PIN] = 1 << 1  # the reader pins slot 1 right now
        fences.append(1)

    monkeypatch.setattr(rg, "_fence", fence_with_a_reader_in_between)
    slot = ring.w.begin()
    assert slot == 2 and len(fences) == 2
    assert seq(ring, 1) == before, "the backed-off slot's sequence must be restored exactly (even)"
    assert seq(ring, 2) & 1 and ring.w.overwrites == 0


def test_a_reader_skips_a_slot_being_written_and_one_holding_another_frame() -> None:
    ring = Ring(nslots=3)
    r = ring.reader()
    assert ring.read(r) is None, "nothing sent yet"
    slot = ring.send(1)
    ring.ctl.u[rg._SEQ + slot] += 1  # the slot named by `latest` is being rewritten (all pinned case)
    seen = []
    assert ring.read(r, copy=lambda s: seen.append(s)) is None and not seen, "an odd slot is never copied"
    ring.ctl.u[rg._SEQ + slot] += 1
    ring.ctl.u[rg._SLOT_FRAME + slot] = 0  # even again but no longer frame 1 (an aborted write)
    assert ring.read(r, copy=lambda s: seen.append(s)) is None and not seen


def test_abort_leaves_no_frame_and_moves_the_sequence() -> None:
    """Also when the slot held an older frame: a reader that read `latest` long ago and names that frame must not
    find it in a half-written slot whose sequence is even again."""
    ring = Ring()
    for value in (1, 2, 3):
        ring.send(value)
    slot = ring.w.begin()
    assert int(ring.ctl.u[rg._SLOT_FRAME + slot]) == 1, "begin() should reuse the oldest slot"
    s = seq(ring, slot)
    ring.w.abort(slot)
    assert seq(ring, slot) == s + 1 and not seq(ring, slot) & 1
    assert int(ring.ctl.u[rg._SLOT_FRAME + slot]) == 0 and ring.w.frame == 3


def test_a_new_ring_generation_makes_reads_stale_and_the_layout_is_a_consistent_snapshot() -> None:
    ring = Ring(nslots=3)
    r = ring.reader()
    ring.send(1)
    old = r.layout()
    assert old is not None and old.handles == [100, 101, 102] and old.mirror == []
    ring.w.publish_ring(8, 8, "r8", [200, 201, 202])
    assert r.read(lambda s: s, nslots=3, generation=old.generation) is Stale
    new = r.layout()
    assert new is not None and new.generation == old.generation + 1 and new.handles == [200, 201, 202]
    ring.w.publish_mirror([300, 301, 302])
    assert r.layout().mirror == [300, 301, 302]  # type: ignore[union-attr]
    ring.ctl.u[rg._HSEQ] += 1  # the writer is mid-rebuild
    assert r.layout() is None
    ring.ctl.u[rg._HSEQ] += 1
    assert r.newest() == 1 and ring.read(r) is None, "the new generation holds no frame yet"


def test_close_parks_latest_so_readers_stop_and_waiters_wake() -> None:
    ring = Ring()
    r = ring.reader()
    ring.send(1)
    token = r.latest()
    woke = threading.Event()
    t = threading.Thread(target=lambda: (r.wait(token, 10), woke.set()))
    t.start()
    time.sleep(0.05)
    ring.w.close()
    assert woke.wait(5), "a waiter must wake when the writer closes"
    t.join(5)
    assert r.closed and r.newest() == 1 and r.latest() != token
    assert ring.read(r) is None


def test_wait_sleeps_until_a_frame_arrives() -> None:
    ring = Ring()
    r = ring.reader()
    token = r.latest()
    t0 = time.monotonic()
    r.wait(token, 0.05)
    assert time.monotonic() - t0 >= 0.04, "nothing changed: the wait runs to its timeout"
    done = threading.Event()
    t = threading.Thread(target=lambda: (r.wait(token, 10), done.set()))
    t.start()
    time.sleep(0.05)
    ring.send(1)
    assert done.wait(5)
    t.join(5)


def test_attach_reuses_dead_rows_and_refuses_when_full() -> None:
    ring = Ring()
    readers = [RingReader(ring.ctl) for _ in range(MAX_READERS)]
    for i, r in enumerate(readers):
        assert r.attach(1000 + i, lambda p: True) and r.row == i
    assert ring.w.readers == MAX_READERS
    assert not RingReader(ring.ctl).attach(5, lambda p: True)
    late = RingReader(ring.ctl)
    assert late.attach(5, lambda p: p != 1003) and late.row == 3
    readers[0].detach()
    assert ring.w.readers == MAX_READERS - 1 and readers[0].row == -1


def test_frame_sync_counts_consumption_and_drops_dead_readers() -> None:
    ring = Ring(frame_sync=True)
    r, dead = ring.reader(pid=111), ring.reader(pid=222)
    assert ring.w.all_consumed()
    ring.send(1)
    ack = ring.w.ack()
    assert not ring.w.all_consumed()
    assert isinstance(ring.read(r), Read)
    assert ring.w.ack() == ack + 1, "a frame_sync reader bumps the ack word"
    assert not ring.w.all_consumed()
    ring.w.drop_dead_readers(lambda pid: pid != 222)
    assert ring.w.all_consumed() and ring.w.readers == 1
    assert int(ring.ctl.readers[dead.row, rg._R_PID]) == 0 and int(ring.ctl.readers[r.row, rg._R_PID]) == 111
    ring.send(2)  # r is behind now, but alive: a slow reader is waited for, never dropped
    ring.w.drop_dead_readers(lambda pid: pid != 222)
    assert ring.w.readers == 1 and not ring.w.all_consumed()


def test_control_words_refuse_a_short_buffer_and_waits_after_close() -> None:
    with pytest.raises(InvalidArgument):
        ControlWords(bytearray(100))
    ctl = ControlWords(bytearray(CONTROL_SIZE))
    ctl.close()
    with pytest.raises(ClosedError):
        ctl.wait(rg._LATEST, 0, 0.01)
    with pytest.raises(InvalidArgument):
        RingWriter(ControlWords(bytearray(CONTROL_SIZE)), 1, pid=1)


WRITER = """
import mmap, os, sys
import numpy as np
from texbridge.senders.ring import SENDER_CONTROL_SIZE as C, ControlWords, RingWriter
fd, frames = int(sys.argv[1]), int(sys.argv[2])
m = mmap.mmap(fd, 0)
buf = np.frombuffer(m, np.uint8)
ctl = ControlWords(buf[:C], user_data=True)
w = RingWriter(ctl, 3, pid=os.getpid())
slots = [buf[C + i * 65536:C + (i + 1) * 65536] for i in range(3)]
w.publish_ring(256, 256, "r8", [1, 2, 3])
print("ready", flush=True)
sys.stdin.readline()
for _ in range(frames):
    slot = w.begin()
    n = w.frame + 1
    slots[slot][...] = n & 0xFF
    w.commit(slot, timestamp_ns=n, realtime_offset_ns=-n, user_data=bytes([n & 0xFF]) * (n % 97))
w.close()
"""


def test_a_writer_process_and_a_reader_over_a_shared_memfd_never_hand_over_a_torn_frame() -> None:
    """The algorithm across processes, over a plain mapped memfd: every frame the reader keeps is uniform (one
    frame's value), its metadata is that frame's (timestamp, offset and user data derive from the frame number),
    and frame numbers only grow."""
    size = SENDER_CONTROL_SIZE + 3 * 65536
    fd = os.memfd_create("ring-test")
    try:
        os.ftruncate(fd, size)
        m = mmap.mmap(fd, size)
        buf = np.frombuffer(m, np.uint8)
        proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(WRITER), str(fd), "20000"],
                                pass_fds=(fd,), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready"  # type: ignore[union-attr]
            ctl = ControlWords(buf[:SENDER_CONTROL_SIZE], user_data=True)
            r = RingReader(ctl)
            assert r.valid and r.attach(os.getpid(), lambda p: True)
            slots = [buf[SENDER_CONTROL_SIZE + i * 65536:SENDER_CONTROL_SIZE + (i + 1) * 65536] for i in range(3)]
            gen = r.layout().generation  # type: ignore[union-attr]
            proc.stdin.write("go\n")  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
            last, kept = 0, 0
            deadline = time.monotonic() + 60
            while not r.closed and time.monotonic() < deadline:
                got = r.read(lambda s: slots[s].copy(), nslots=3, generation=gen)
                if isinstance(got, Read):
                    assert got.frame >= last
                    assert int(got.data.min()) == int(got.data.max()) == got.frame & 0xFF, \
                        f"torn frame {got.frame}: values {np.unique(got.data)[:8]}"
                    n = got.frame
                    assert (got.timestamp_ns, got.realtime_offset_ns) == (n, -n), f"frame {n}: torn metadata"
                    assert got.user_data == bytes([n & 0xFF]) * (n % 97), f"frame {n}: another frame's user data"
                    last, kept = got.frame, kept + 1
            assert proc.wait(60) == 0
            assert r.closed and kept > 0 and last <= 20000
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        os.close(fd)


# -- any interleaving: a writer's steps run at arbitrary points of readers' copies -----------------------------------
WRITER_STEP = st.sampled_from(["send", "start", "finish", "abort"])


class _Driver:
    """One writer that can leave a write half done; its steps run between and inside readers' copies."""

    def __init__(self, ring: Ring) -> None:
        self.ring, self.open_slot = ring, -1

    def step(self, what: str) -> None:
        w = self.ring.w
        if what == "send" and self.open_slot < 0:
            self.ring.send((w.frame + 1) & 0xFF)
        elif what == "start" and self.open_slot < 0:
            self.open_slot = w.begin()
            self.ring.slots[self.open_slot][:2] = (w.frame + 1) & 0xFF  # half the pixels of the next frame
        elif what in ("finish", "abort") and self.open_slot >= 0:
            slot, self.open_slot = self.open_slot, -1
            if what == "finish":
                self.ring.slots[slot][2:] = (w.frame + 1) & 0xFF
                w.commit(slot)
            else:
                w.abort(slot)


@settings(max_examples=300, deadline=None)
@given(nslots=st.integers(2, 4), nreaders=st.integers(1, 3),
       ops=st.lists(st.tuples(st.integers(0, 2), st.booleans(), st.booleans(), st.lists(WRITER_STEP, max_size=4),
                              st.lists(WRITER_STEP, max_size=3)), max_size=30))
def test_no_interleaving_hands_a_reader_a_torn_or_older_frame(nslots, nreaders, ops):  # type: ignore[no-untyped-def]
    """Readers copy in two halves with writer steps (whole frames, half-done writes, their completion or abort)
    before and between the halves. Every frame a reader keeps is whole (one frame's value), is the frame it claims,
    and is never older than the one it kept before; a zero-copy view still_valid() says so holds its frame."""
    ring = Ring(nslots)
    drv = _Driver(ring)
    readers = [ring.reader(pid=100 + i) for i in range(nreaders)]
    kept: dict[int, tuple[int, Read | None]] = {i: (0, None) for i in range(nreaders)}
    gen = readers[0].layout().generation  # type: ignore[union-attr]
    for who, keep_pin, release, before, during in ops:
        if who >= nreaders:
            continue
        r = readers[who]
        for what in before:
            drv.step(what)
        pending = list(during)

        def two_halves(slot: int) -> np.ndarray:
            first = ring.slots[slot][:2].copy()
            while pending:
                drv.step(pending.pop(0))
            return np.concatenate([first, ring.slots[slot][2:]])

        got = r.read(two_halves, nslots=nslots, generation=gen, keep_pin=keep_pin)
        if isinstance(got, Read):
            values = np.unique(got.data)
            assert len(values) == 1 and int(values[0]) == got.frame & 0xFF, f"torn or wrong frame {got}"
            assert got.frame >= kept[who][0], "a reader went back in time"
            kept[who] = (got.frame, got if keep_pin else None)
        prev = kept[who][1]
        if prev is not None and r.still_valid(prev, gen):
            assert (ring.slots[prev.slot] == prev.frame & 0xFF).all(), "still_valid() on an overwritten slot"
        if release:
            r.release()
            kept[who] = (kept[who][0], None)


# -- per-frame metadata ---------------------------------------------------------------------------------------------------
def test_each_slot_carries_its_own_frames_metadata() -> None:
    """Metadata lives per slot: a reader of an older pinned slot keeps that frame's timestamp and user data while
    newer frames go to other slots, and a frame without user data has none (no leftover from the slot's past)."""
    ring = Ring(nslots=3)
    a, b = ring.reader(), ring.reader()
    slot = ring.w.begin()
    ring.slots[slot][...] = 1
    ring.w.commit(slot, timestamp_ns=111, realtime_offset_ns=5, user_data=b"first")
    held = ring.read(a, keep_pin=True)
    assert isinstance(held, Read)
    assert (held.timestamp_ns, held.realtime_offset_ns, held.user_data) == (111, 5, b"first")
    for n in (2, 3, 4):  # slot of frame 1 is pinned by a: these go elsewhere
        s2 = ring.w.begin()
        assert s2 != held.slot
        ring.slots[s2][...] = n
        ring.w.commit(s2, timestamp_ns=n * 100, user_data=b"x" * n if n != 4 else b"")
    got = ring.read(b)
    assert isinstance(got, Read) and got.frame == 4 and got.timestamp_ns == 400 and got.user_data == b""
    assert a.still_valid(held, ring.ctl.u[rg._GEN])
    assert ring.read(a, copy=lambda s: s).frame == 4


def test_metadata_is_read_under_the_slots_seqlock() -> None:
    """The torn read again, now with metadata: the writer rewrites the slot (pixels and metadata) in the middle of
    the reader's copy; the read that is kept pairs pixels and metadata of one frame."""
    ring = Ring(nslots=2)
    a, b = ring.reader(), ring.reader()

    def send(value: int) -> int:
        slot = ring.w.begin()
        ring.slots[slot][...] = value
        ring.w.commit(slot, timestamp_ns=value, user_data=bytes([value]))
        return slot

    send(1)
    assert isinstance(ring.read(a, keep_pin=True), Read)  # a pins slot 0
    torn_slot = send(2)
    calls: list[int] = []

    def copy_interrupted(slot: int) -> np.ndarray:
        calls.append(slot)
        data = ring.slots[slot].copy()
        if len(calls) == 1:  # every slot pinned: the writer overwrites frame 2's slot with frame 3 as we copy
            assert send(3) == 0
            victim = ring.w.begin()
            assert victim == torn_slot
            ring.slots[victim][...] = 4
            ring.w.commit(victim, timestamp_ns=4, user_data=bytes([4]))
        return data

    got = ring.read(b, copy=copy_interrupted)
    assert isinstance(got, Read) and len(calls) == 2
    value = int(got.data[0, 0])
    assert (got.timestamp_ns, got.user_data) == (value, bytes([value])), "pixels of one frame, metadata of another"


def test_a_hostile_user_data_length_is_clamped_to_the_slots_block() -> None:
    """The length word is in memory the sender (any process) writes: a reader never reads past the slot's block."""
    ring = Ring()
    r = ring.reader()
    slot = ring.w.begin()
    ring.w.commit(slot, user_data=b"ok")
    ring.ctl.u[rg._SLOT_UDLEN + slot] = 2**64 - 1
    got = ring.read(r)
    assert isinstance(got, Read) and len(got.user_data) == rg.MAX_USER_DATA
    assert got.user_data.startswith(b"ok")


def test_a_ring_without_user_data_blocks_refuses_user_data_and_reads_none() -> None:
    """A bare control page (a bridge stream's) has the metadata words but no user-data blocks: the bytes after the
    page belong to someone else, so nothing is written there."""
    buf = bytearray(CONTROL_SIZE + 64)
    ring = Ring(buffer=memoryview(buf)[:CONTROL_SIZE])
    assert not ring.ctl.user_data
    r = ring.reader()
    slot = ring.w.begin()
    with pytest.raises(InvalidArgument, match="no user-data blocks"):
        ring.w.commit(slot, user_data=b"x")
    ring.w.commit(slot, timestamp_ns=5)
    got = ring.read(r)
    assert isinstance(got, Read) and got.timestamp_ns == 5 and got.user_data == b""
    assert buf[CONTROL_SIZE:] == bytearray(64)
    with pytest.raises(InvalidArgument):
        ControlWords(bytearray(CONTROL_SIZE), user_data=True)
