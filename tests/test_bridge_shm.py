"""The shared-file bridge transport (texbridge.bridge._shmfile) over plain files and buffers, no broker.

The peer is a real second process where timing or death matters (heartbeat, kill -9, rejoin); in-process ends over
one buffer where the test drives both sides step by step (torn reads, progress, hostile bytes).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
import pytest

from texbridge.bridge import _ivshmem as iv
from texbridge.bridge import _shmlayout as L
from texbridge.bridge._link import (MAX_MESSAGE, BridgeError, BridgePeerError, Endpoint, FrameMeta, Link,
                                    StreamFormat, StreamReader, StreamWriter)
from texbridge.bridge._shmfile import ShmEndpoint, ShmLink

SIZE = 8 << 20
FMT = StreamFormat(64, 32, "rgba8")


def pair(buf: object = None, **kw: object) -> tuple[ShmLink, ShmLink, ShmEndpoint, ShmEndpoint]:
    """Both ends in this process over one buffer (the heartbeat threads run; establishing needs a beat)."""
    buf = buf if buf is not None else bytearray(SIZE)
    srv = ShmEndpoint(buf, "serve", label="host", **kw)  # type: ignore[arg-type]
    jn = ShmEndpoint(buf, "join", label="guest", **kw)  # type: ignore[arg-type]
    assert srv.establish(0) is None
    j = None
    deadline = time.monotonic() + 5
    while j is None and time.monotonic() < deadline:
        j = jn.establish(0.05)
    s = srv.establish(1)
    assert j is not None and s is not None
    return s, j, srv, jn


@pytest.fixture
def ends():
    s, j, srv, jn = pair()
    yield s, j
    jn.close()
    srv.close()


def frame_of(fmt: StreamFormat, n: int) -> np.ndarray:
    """A frame whose every byte depends on its number and position (pixel-exact checks)."""
    h, rb = fmt.height, fmt.row_bytes
    return ((np.arange(h * rb, dtype=np.uint32).reshape(h, rb) * 7 + n * 13) % 251).astype(np.uint8)


def send(w: StreamWriter, fmt: StreamFormat, n: int, **meta: object) -> None:
    view = w.begin()
    view[...] = frame_of(fmt, n)
    w.commit(FrameMeta(n, **meta))  # type: ignore[arg-type]


def take(r: StreamReader, after: int = 0):  # type: ignore[no-untyped-def]
    return r.read(lambda v, m: (v.copy(), m), after)


# -- the seam ---------------------------------------------------------------------------------------------------------
def test_implements_the_seam(ends):
    s, j = ends
    assert isinstance(s, Link) and isinstance(j, Link)
    assert isinstance(ShmEndpoint(bytearray(SIZE), "join"), Endpoint)
    w = s.open_writer(1, FMT)
    r = j.open_reader(1, FMT)
    assert isinstance(w, StreamWriter) and isinstance(r, StreamReader)
    assert (s.peer_label, j.peer_label) == ("guest", "host")


def test_messages_both_ways_in_order(ends):
    s, j = ends
    for i in range(300):  # more than the ring holds at once in bytes: wraps around
        s.send({"op": "announce", "i": i, "pad": b"x" * 900})
        if i % 50 == 49:
            got = j.receive()
            assert [m["i"] for m in got] == list(range(i - 49, i + 1))
    j.send({"op": "back", "data": [1, 2, 3]})
    assert s.receive() == [{"op": "back", "data": [1, 2, 3]}]
    assert s.receive() == []


def test_message_limits_are_local_errors(ends):
    from texbridge._errors import InvalidArgument

    s, _ = ends
    with pytest.raises(InvalidArgument, match="at most"):
        s.send({"big": b"x" * MAX_MESSAGE})
    with pytest.raises(InvalidArgument, match="msgpack"):
        s.send({"x": object()})
    assert s.alive


def test_frames_pixel_exact_with_meta(ends):
    s, j = ends
    w = s.open_writer(5, FMT)
    r = j.open_reader(5, FMT)
    assert take(r) is None  # nothing yet
    send(w, FMT, 1, timestamp_ns=42, damage=((1, 2, 3, 4),), user_data=b"hello")
    view, meta = take(r)
    assert np.array_equal(view, frame_of(FMT, 1))
    assert meta == FrameMeta(1, 42, ((1, 2, 3, 4),), b"hello")
    assert take(r, after=1) is None  # nothing newer
    # the other direction, at once
    w2 = j.open_writer(5, FMT)
    r2 = s.open_reader(5, FMT)
    send(w2, FMT, 9)
    assert np.array_equal(take(r2)[0], frame_of(FMT, 9))


def test_newest_frame_wins(ends):
    s, j = ends
    w = s.open_writer(0, FMT)
    r = j.open_reader(0, FMT)
    for n in range(1, 8):
        send(w, FMT, n)
    view, meta = take(r)
    assert meta.frame == 7 and np.array_equal(view, frame_of(FMT, 7))
    assert j.stats().frames_in == 1


def test_a_file_size_qemu_cannot_map_is_refused(tmp_path):
    """QEMU asserts (aborts the VM) on an ivshmem memdev whose size is not a power of two (hw/pci/pci.c
    pci_register_bar): refuse to make such a file."""
    with pytest.raises(BridgeError, match=r"not a power of two.*use 32 or 64 MiB"):
        ShmEndpoint(tmp_path / "f", "serve", size=48 << 20).establish(0)
    assert not (tmp_path / "f").exists()


def test_file_too_small_names_the_size(tmp_path):
    with pytest.raises(BridgeError, match=r"too small for 3840x2160 frames .* a file of 268435456 bytes \(256 MiB\)"):
        ShmEndpoint(tmp_path / "f", "serve", size=64 << 20, max_frame=(3840, 2160)).establish(0)
    s, j, srv, jn = pair(bytearray(SIZE))
    try:
        with pytest.raises(BridgeError, match=r"too small: stream 3 \(1920x1080 rgba8, 3 slots\).*\(64 MiB\)"):
            s.open_writer(3, StreamFormat(1920, 1080, "rgba8"))
    finally:
        jn.close()
        srv.close()


# -- sizing, VM arguments, discovery ----------------------------------------------------------------------------------
def test_size_for_keeps_looking_glass_floor_and_powers_of_two():
    assert iv.looking_glass_size(1920, 1080) == 7680 * 1080 * 3 + (4 << 20)  # LG: 32 MiB at 1080p
    s1080, s4k = iv.size_for(1920, 1080), iv.size_for(3840, 2160)
    for s, w, h in ((s1080, 1920, 1080), (s4k, 3840, 2160)):
        assert s & (s - 1) == 0
        lay = L.Layout.for_size(s)
        assert lay.area_size >= max(iv.looking_glass_size(w, h), L.stream_bytes(StreamFormat(w, h, "rgba8")))
    assert (s1080, s4k) == (64 << 20, 256 << 20)
    # tiny frames: Looking Glass's 4 MiB extra per direction + our tables (~1 MiB) -> the next power of two
    assert iv.size_for(64, 64) == 16 << 20


def test_vm_args_and_default_path():
    from texbridge._errors import InvalidArgument

    text = iv.vm_args("/dev/shm/texbridge-x", 64)
    assert ("-object memory-backend-file,id=texbridge,mem-path=/dev/shm/texbridge-x,size=64M,share=on "
            "-device ivshmem-plain,memdev=texbridge") in text
    assert "<shmem name='texbridge-x'>" in text and "<size unit='M'>64</size>" in text
    assert "qemu:commandline" in iv.vm_args("/srv/f", 32)
    assert iv.default_path("studio") == "/dev/shm/texbridge-studio"
    assert "mem-path=/srv/a,,b,size=32M" in iv.vm_args("/srv/a,b", 32)  # QEMU doubles a comma inside a value
    with pytest.raises(InvalidArgument):
        iv.vm_args("/dev/shm/x", 48)  # an ivshmem BAR is a power of two


def test_find_ivshmem_in_sysfs(tmp_path):
    with pytest.raises(BridgeError, match="no ivshmem device"):
        iv.find_ivshmem(str(tmp_path))
    for addr, vendor, device in (("0000:00:02.0", "0x1af4", "0x1000"), ("0000:00:04.0", "0x1af4", "0x1110")):
        d = tmp_path / addr
        d.mkdir()
        (d / "vendor").write_text(vendor + "\n")
        (d / "device").write_text(device + "\n")
        (d / "resource2").write_bytes(b"")
    assert iv.find_ivshmem(str(tmp_path)) == str(tmp_path / "0000:00:04.0" / "resource2")


def test_remove(tmp_path):
    f = tmp_path / "f"
    assert iv.remove(str(f)) is False
    ep = ShmEndpoint(f, "serve", size=SIZE)
    ep.establish(0)
    with pytest.raises(BridgeError, match="is serving"):
        iv.remove(str(f))
    ep.close()
    assert iv.remove(str(f)) is True and not f.exists()


# -- two processes ----------------------------------------------------------------------------------------------------
PEER = textwrap.dedent("""
    import sys, time, numpy as np
    from texbridge.bridge._shmfile import ShmEndpoint
    from texbridge.bridge._link import StreamFormat, FrameMeta
    path, role, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    ep = ShmEndpoint(path, role, size=%(size)d, label="peer-" + role)
    link = None
    while link is None:
        link = ep.establish(1.0)
    print("linked", flush=True)
    fmt = StreamFormat(%(w)d, %(h)d, "rgba8")
    if mode == "echo":  # read stream 1, send back frame + 1 on stream 2, until told to stop
        r = link.open_reader(1, fmt); w = link.open_writer(2, fmt); last = 0
        while True:
            link.wait(0.5)
            if any(m.get("op") == "stop" for m in link.receive()):
                break
            got = r.read(lambda v, m: (v.copy(), m), last)
            if got is not None:
                last = got[1].frame
                out = w.begin(); out[...] = got[0] + 1; w.commit(FrameMeta(last, user_data=got[1].user_data))
        link.send({"op": "bye"})
    elif mode == "idle":
        while True:
            time.sleep(1)
    link.close(); ep.close()
""")


def spawn(tmp_path: Path, path: Path, role: str, mode: str, fmt: StreamFormat = FMT) -> subprocess.Popen:
    script = tmp_path / "peer.py"
    script.write_text(PEER % {"size": SIZE, "w": fmt.width, "h": fmt.height})
    return subprocess.Popen([sys.executable, str(script), str(path), role, mode], stdout=subprocess.PIPE, text=True)


def establish(ep: ShmEndpoint, within: float = 10) -> ShmLink:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        link = ep.establish(0.2)
        if link is not None:
            return link
    raise AssertionError(f"no link within {within} s: {ep.last_problem}")


def test_two_processes_echo_pixel_exact(tmp_path):
    path = tmp_path / "shm"
    peer = spawn(tmp_path, path, "join", "echo")  # join may start first: it waits for the file
    ep = ShmEndpoint(path, "serve", size=SIZE, label="host")
    try:
        link = establish(ep)
        assert link.peer_label == "peer-join"
        w, r = link.open_writer(1, FMT), link.open_reader(2, FMT)
        for n in range(1, 21):
            send(w, FMT, n, user_data=b"n%d" % n)
            got, deadline = None, time.monotonic() + 5
            while got is None and time.monotonic() < deadline:
                link.wait(0.1)
                got = r.read(lambda v, m: (v.copy(), m), n - 1)
            assert got is not None, f"frame {n} not echoed"
            assert got[1].frame == n and got[1].user_data == b"n%d" % n
            assert np.array_equal(got[0], frame_of(FMT, n) + 1)
        link.send({"op": "stop"})
        deadline = time.monotonic() + 5
        msgs: list = []
        while not msgs and time.monotonic() < deadline:
            link.wait(0.1)
            msgs = link.receive()
        assert msgs == [{"op": "bye"}]
        assert peer.wait(10) == 0
    finally:
        peer.kill()
        ep.close()


def wait_for(cond, within: float = 5.0, step: float = 0.01) -> float:  # type: ignore[no-untyped-def]
    """Seconds until cond() held (AssertionError after `within`)."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > within:
            raise AssertionError(f"not within {within} s")
        time.sleep(step)
    return time.monotonic() - start


# -- the seqlock, newest-wins, progress, resize (both ends in this process, driven step by step) ------------------------
def test_a_copy_overlapped_by_a_write_is_never_returned(ends):
    """The slot's sequence moves during the copy (a write overlapped it): that copy is dropped, the read retries."""
    from texbridge.senders import ring as rg

    s, j = ends
    w, r = s.open_writer(0, FMT), j.open_reader(0, FMT)
    send(w, FMT, 1)
    calls = []

    def copy(view, meta):  # type: ignore[no-untyped-def]
        calls.append(meta.frame)
        if len(calls) == 1:  # as if the writer rewrote the slot while we copied
            slot = int(w._u[rg._LATEST]) & rg._SLOT_MASK
            w._u[rg._SEQ + slot] += 2
            return "torn"
        return view.copy()

    got = r.read(copy, 0)
    assert calls == [1, 1] and np.array_equal(got, frame_of(FMT, 1))


def test_writer_never_overwrites_the_slot_a_reader_holds(ends):
    """3 slots: while the peer copies the newest frame (pinned), the writer keeps going in the other two."""
    s, j = ends
    w, r = s.open_writer(0, FMT), j.open_reader(0, FMT)
    send(w, FMT, 1)

    def copy(view, meta):  # type: ignore[no-untyped-def]
        for n in range(2, 12):
            send(w, FMT, n)  # never lands in the pinned slot: the copy below is untorn
        return view.copy(), meta

    view, meta = r.read(copy, 0)
    assert meta.frame == 1 and np.array_equal(view, frame_of(FMT, 1))
    assert take(r, 1)[1].frame == 11


def test_frame_numbers_only_grow_and_meta_is_checked_locally(ends):
    from texbridge._errors import InvalidArgument

    s, _ = ends
    w = s.open_writer(0, FMT)
    send(w, FMT, 5)
    w.begin()
    for bad in (FrameMeta(5), FrameMeta(6, damage=((0, 0, FMT.width + 1, 1),)), FrameMeta(6, user_data=b"x" * 5000)):
        with pytest.raises(InvalidArgument):
            w.commit(bad)
    w.commit(FrameMeta(6, damage=tuple((0, 0, 1, 1) for _ in range(100))))  # > MAX_DAMAGE: the whole frame
    with pytest.raises(InvalidArgument, match="begin"):
        w.commit(FrameMeta(7))


def test_progress_lets_the_reader_copy_rows_before_the_commit(ends):
    """read_into follows a frame being written: rows up to the writer's progress are copied while it writes. The
    writer here breaks its promise on purpose (rewrites rows it declared final) to show they were copied early."""
    import threading

    from texbridge.bridge._link import read_into

    s, j = ends
    w, r = s.open_writer(0, FMT), j.open_reader(0, FMT)
    half = FMT.height // 2
    out = np.zeros((FMT.height, FMT.row_bytes), np.uint8)
    view = w.begin()
    good = frame_of(FMT, 1)
    view[:half] = good[:half]
    result: list = []
    t = threading.Thread(target=lambda: result.append(read_into(r, out, 0)))
    t.start()
    w.progress(half)
    wait_for(lambda: np.array_equal(out[:half], good[:half]), within=5, step=0.001)  # copied before the commit
    view[:half] = 0  # (a broken promise: the reader already has these rows)
    view[half:] = good[half:]
    w.commit(FrameMeta(1, user_data=b"chunked"))
    t.join(5)
    assert result and result[0] == FrameMeta(1, 0, (), b"chunked")
    assert np.array_equal(out, good)
    # a frame aborted while followed is never returned
    view = w.begin()
    t = threading.Thread(target=lambda: result.append(r.read_into(out, 1, timeout=5)))
    t.start()
    w.progress(3)
    time.sleep(0.05)
    w.abort()
    t.join(5)
    assert result[1] is None
    assert j.stats().frames_in == 1


def test_resize_is_a_new_format_of_the_stream(ends):
    s, j = ends
    small, big = FMT, StreamFormat(100, 40, "rgba8")
    w = s.open_writer(3, small)
    r_small = j.open_reader(3, small)
    send(w, small, 1)
    assert take(r_small)[1].frame == 1
    w2 = s.open_writer(3, big)  # same stream number: a resize (new generation, frame numbers go on)
    with pytest.raises(BridgeError, match="closed"):
        w.begin()
    send(w2, big, 2)
    assert take(r_small, 1) is None  # another format than the agreed one reads as nothing
    r_big = j.open_reader(3, big)
    view, meta = take(r_big, 1)
    assert meta.frame == 2 and np.array_equal(view, frame_of(big, 2))
    # a new stream number for the new size (the engine's way) while the old one still exists
    w3 = s.open_writer(4, small)
    send(w3, small, 1)
    assert np.array_equal(take(j.open_reader(4, small))[0], frame_of(small, 1))
    w2.close()
    assert take(r_big, 0) is None  # retired


def test_closing_a_link_tells_the_peer_at_once(ends):
    s, j = ends
    j.close()
    assert wait_for(lambda: not s.alive, within=0.5) < 0.5
    with pytest.raises(BridgeError, match="closed"):
        s.send({"x": 1})
    assert "closed" in s.stats().errors[-1]


# -- two processes: concurrency, death, rejoin ------------------------------------------------------------------------
WRITER = textwrap.dedent("""
    import sys, time, numpy as np
    from texbridge.bridge._shmfile import ShmEndpoint
    from texbridge.bridge._link import StreamFormat, FrameMeta
    ep = ShmEndpoint(sys.argv[1], "join", label="writer")
    link = None
    while link is None:
        link = ep.establish(1.0)
    fmt = StreamFormat(%(w)d, %(h)d, "rgba8")
    w = link.open_writer(1, fmt)
    n = 0
    end = time.monotonic() + %(seconds)f
    while time.monotonic() < end:
        n += 1
        v = w.begin()
        half = fmt.height // 2
        v[:half] = n %% 251
        w.progress(half)
        v[half:] = n %% 251
        w.commit(FrameMeta(n, user_data=str(n).encode()))
    link.send({"op": "done", "frames": n})
    time.sleep(0.5)
    link.close(); ep.close()
""")


def test_no_torn_frame_under_a_concurrent_writer_process(tmp_path):
    """A writer process commits uniform frames (every byte = n % 251) as fast as it can; this end reads with both
    read() and read_into(): every frame is uniform, matches its number, and numbers only grow."""
    from texbridge.bridge._link import read_into

    fmt = StreamFormat(256, 128, "rgba8")
    script = tmp_path / "writer.py"
    script.write_text(WRITER % {"w": fmt.width, "h": fmt.height, "seconds": 2.0})
    path = tmp_path / "shm"
    ep = ShmEndpoint(path, "serve", size=SIZE)
    peer = subprocess.Popen([sys.executable, str(script), str(path)])
    try:
        link = establish(ep)
        r = link.open_reader(1, fmt)
        out = np.empty((fmt.height, fmt.row_bytes), np.uint8)
        last, reads, done = 0, 0, None
        while done is None:
            for m in link.receive():
                done = m["frames"]
            if reads % 2:
                got = r.read(lambda v, m: (v.min(), v.max(), m), last)
                if got is not None:
                    lo, hi, meta = got
                    assert lo == hi == meta.frame % 251, f"torn frame {meta.frame}: {lo}..{hi}"
            else:
                meta = read_into(r, out, last)
                if meta is not None:
                    assert out.min() == out.max() == meta.frame % 251, f"torn frame {meta.frame} (read_into)"
            if (got if reads % 2 else meta) is not None:
                frame = (got[2] if reads % 2 else meta).frame
                assert frame > last
                last = frame
            reads += 1
        assert last > 10 and done >= last
        assert peer.wait(10) == 0
    finally:
        peer.kill()
        ep.close()


@pytest.mark.parametrize("victim", ["join", "serve"])
def test_kill9_of_the_peer_is_noticed_within_1_5_s_and_a_restart_rejoins(tmp_path, victim):
    path = tmp_path / "shm"
    ours = "serve" if victim == "join" else "join"
    if victim == "serve":  # the peer serves: it must have formatted the file before we join
        peer = spawn(tmp_path, path, "serve", "idle")
    ep = ShmEndpoint(path, ours, size=SIZE, label="us")
    if victim == "join":
        peer = spawn(tmp_path, path, "join", "idle")
    try:
        link = establish(ep)
        assert peer.stdout.readline().strip() == "linked"
        session = link._session
        peer.send_signal(signal.SIGKILL)
        peer.wait()
        t = wait_for(lambda: not link.alive, within=3)
        assert t <= 1.5, f"death noticed after {t:.2f} s"
        assert "heartbeat" in link.stats().errors[-1]
        link.close()
        # the restarted peer and this end find each other again (a new session)
        peer = spawn(tmp_path, path, victim, "echo")
        t0 = time.monotonic()
        link = establish(ep, within=10)
        back = time.monotonic() - t0
        print(f"kill -9 of the {victim} end: noticed after {t:.2f} s; restarted peer linked after {back:.2f} s")
        assert back < 5 and link._session != session
        w, r = link.open_writer(1, FMT), link.open_reader(2, FMT)
        send(w, FMT, 1)
        got = None
        deadline = time.monotonic() + 5
        while got is None and time.monotonic() < deadline:
            link.wait(0.1)
            got = take(r)
        assert got is not None and np.array_equal(got[0], frame_of(FMT, 1) + 1)
        link.send({"op": "stop"})
        assert peer.wait(10) == 0
    finally:
        peer.kill()
        ep.close()


def test_a_joiner_waits_for_a_live_server_not_a_stale_file(tmp_path):
    """A file formatted by a server that is gone (no heartbeat) is not joined; the server coming back is."""
    path = tmp_path / "shm"
    srv = ShmEndpoint(path, "serve", size=SIZE)
    srv.establish(0)
    srv._stop.set()  # the server freezes (as if killed): its beat stops
    srv._heart.join()
    jn = ShmEndpoint(path, "join")
    try:
        assert jn.establish(0.5) is None and "heartbeat" in jn.last_problem
    finally:
        jn.close()
        srv.close()


def test_a_second_server_on_one_file_is_refused(tmp_path):
    a = ShmEndpoint(tmp_path / "f", "serve", size=SIZE)
    a.establish(0)
    try:
        with pytest.raises(BridgeError, match="already serves"):
            ShmEndpoint(tmp_path / "f", "serve", size=SIZE).establish(0)
    finally:
        a.close()


# -- hostile bytes: the peer can write anything anywhere at any time --------------------------------------------------
def _word(mem: np.ndarray, off: int, value: int) -> None:
    mem[off:off + 8].view(np.uint64)[0] = value


def _record(mem: np.ndarray, lay: L.Layout, payload: bytes, length: int | None = None) -> None:
    """Put one record into side 0's message ring as a hostile producer would (length word may lie)."""
    ring = lay.ring(0)
    _word(mem, ring, len(payload) if length is None else length)
    mem[ring + 8:ring + 8 + len(payload)] = np.frombuffer(payload, np.uint8)
    _word(mem, lay.side(0) + 8 * L.S_HEAD, 8 + L.pad8(len(payload)))


def _table(lay: L.Layout, word: int) -> int:
    return lay.table(0) + 8 * word


def _regen(mem: np.ndarray, lay: L.Layout) -> None:
    from texbridge.senders import ring as rg

    gen = int(mem[_table(lay, rg._GEN):_table(lay, rg._GEN) + 8].view(np.uint64)[0])
    _word(mem, _table(lay, rg._GEN), gen + 1)


def _hostile_cases():  # type: ignore[no-untyped-def]
    import msgpack

    from texbridge.senders import ring as rg

    def slot0(lay: L.Layout, w: int) -> int:
        return lay.area(0) + 8 * w

    def latest_meta(lay: L.Layout, mem: np.ndarray, w: int) -> int:
        slot = int(mem[_table(lay, rg._LATEST):_table(lay, rg._LATEST) + 8].view(np.uint64)[0]) & rg._SLOT_MASK
        return lay.area(0) + slot * L.slot_stride(FMT) + 8 * w

    return {
        "slot offset past the area": (lambda mem, lay: (_word(mem, _table(lay, rg._HANDLES), lay.area_size), _regen(mem, lay)),
                                      "read", "outside the frame area"),
        "slot offset not page-aligned": (lambda mem, lay: (_word(mem, _table(lay, rg._HANDLES + 1), 4095), _regen(mem, lay)),
                                         "read", "outside the frame area"),
        "too many slots": (lambda mem, lay: (_word(mem, _table(lay, rg._NSLOTS), 16), _regen(mem, lay)), "read", "slots"),
        "too few slots": (lambda mem, lay: (_word(mem, _table(lay, rg._NSLOTS), 2), _regen(mem, lay)), "read", "slots"),
        "damage count": (lambda mem, lay: _word(mem, latest_meta(lay, mem, L.M_NDAMAGE), 65), "read", "frame meta"),
        "huge damage count": (lambda mem, lay: _word(mem, latest_meta(lay, mem, L.M_NDAMAGE), 2**64 - 1), "read", "frame meta"),
        "user data length": (lambda mem, lay: _word(mem, latest_meta(lay, mem, L.M_ULEN), 4097), "read", "frame meta"),
        "damage outside the frame": (lambda mem, lay: (_word(mem, latest_meta(lay, mem, L.M_NDAMAGE), 1),
                                     mem.__setitem__(slice(latest_meta(lay, mem, 0) + L.M_DAMAGE,
                                                           latest_meta(lay, mem, 0) + L.M_DAMAGE + 16),
                                                     np.array([60, 0, 10, 1], np.uint32).view(np.uint8))),
                                     "read", "frame meta"),
        "empty record": (lambda mem, lay: _record(mem, lay, b"", 0), "receive", "record of 0 bytes"),
        "record longer than allowed": (lambda mem, lay: _record(mem, lay, b"\x80", MAX_MESSAGE + 1), "receive", "record"),
        "record longer than written": (lambda mem, lay: _record(mem, lay, b"\x80", 100), "receive", "record"),
        "head a ring ahead": (lambda mem, lay: _word(mem, lay.side(0) + 8 * L.S_HEAD, L.RING_SIZE + 8), "receive", "head"),
        "not msgpack": (lambda mem, lay: _record(mem, lay, b"\xc1"), "receive", "not msgpack"),
        "not a map": (lambda mem, lay: _record(mem, lay, msgpack.packb([1, 2])), "receive", "expected a map"),
        "tail past head": (lambda mem, lay: _word(mem, lay.side(0) + 8 * L.S_TAIL, 4096), "send", "tail"),
        "tail going back": (lambda mem, lay: _word(mem, lay.side(0) + 8 * L.S_TAIL, 2**63), "send", "tail"),
        "progress past the frame": (lambda mem, lay: None, "progress", "progress"),
        "header overwritten": (lambda mem, lay: _word(mem, 8 * L.H_SESSION, 5), "alive", "header"),
    }, slot0


HOSTILE = _hostile_cases()[0]


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_value_ends_the_session_with_a_peer_error(case):
    """One bad word from the peer: the operation that meets it raises BridgePeerError naming it; the link is then
    dead (every later call says so), and nothing else broke."""
    from texbridge.bridge._link import read_into

    scribble, op, match = HOSTILE[case]
    s, j, srv, jn = pair()
    try:
        w, r = s.open_writer(0, FMT), j.open_reader(0, FMT)
        send(w, FMT, 1)
        assert take(r)[1].frame == 1
        send(w, FMT, 2)
        j.send({"op": "x"})
        assert s.receive() == [{"op": "x"}]
        mem, lay = s._m.mem, s._lay
        scribble(mem, lay)
        with pytest.raises(BridgePeerError, match=match):
            if op == "read":
                take(r, 1 if "slot" not in case else 0)
            elif op == "receive":
                j.receive()
            elif op == "send":
                j.send({"op": "y"})
            elif op == "progress":
                view = w.begin()
                w.progress(3)
                mu = w._metau[w._slot]
                mu[L.M_PROGRESS] = FMT.height + 1
                read_into(r, np.empty_like(view), 2)
            elif op == "alive":
                wait_for(lambda: not s.alive, within=2)
                s.receive()
        assert not (j if op != "alive" else s).alive
        assert "peer protocol error" in (j if op != "alive" else s).stats().errors[-1] or op == "alive"
    finally:
        jn.close()
        srv.close()


def test_a_second_joiner_cannot_take_a_joined_session(ends):
    """A joiner arriving while a session is joined (a restarted guest before the server noticed the old one died)
    waits for the server to reformat; it never shares the old session's rings."""
    s, _ = ends
    other = ShmEndpoint(s._m.mem, "join", label="late")
    assert other.establish(0.4) is None and "already joined" in other.last_problem
    other.close()


def test_a_followed_slot_rewritten_meanwhile_is_dropped(ends):
    """read_into follows a frame being written; if the slot's sequence then moves by more than that frame's commit
    (committed and rewritten), the rows copied are not returned as that frame."""
    import threading

    from texbridge.senders import ring as rg

    s, j = ends
    w, r = s.open_writer(0, FMT), j.open_reader(0, FMT)
    out = np.zeros((FMT.height, FMT.row_bytes), np.uint8)
    w.begin()
    slot = w._slot
    w.progress(4)
    result: list = []
    t = threading.Thread(target=lambda: result.append(r.read_into(out, 0, timeout=5)))
    t.start()
    rr = r._rr
    wait_for(lambda: int(rr.rows[rr.row, rg._R_PIN]) == 1 << slot, within=5, step=0.001)  # following the slot
    u = w._u
    u[rg._SLOT_FRAME + slot] = 7
    u[rg._SEQ + slot] += 3  # committed, begun again, committed: not the frame we followed
    t.join(5)
    assert result == [None]
def regions(size: int = SIZE) -> dict[str, tuple[int, int]]:
    """(start, length) of everything but pixel rows: header, side pages, rings, stream tables, slot meta blocks."""
    lay = L.Layout.for_size(size)
    out = {"header": (0, L.PAGE)}
    for side in (0, 1):
        out[f"page{side}"] = (lay.side(side), L.PAGE)
        out[f"ring{side}"] = (lay.ring(side), L.RING_SIZE)
        out[f"table{side}"] = (lay.table(side), 2 * 4096)  # the entries in use (streams open first take 0, 1)
        out[f"meta{side}"] = (lay.area(side), L.META_USED)  # the first slot's meta block
        out[f"meta{side}b"] = (lay.area(side) + L.slot_stride(FMT), L.META_USED)
    return out


REGIONS = regions()


def hot_words(size: int = SIZE) -> list[int]:
    """Byte offsets of the words the ends actually use (a blind scribble mostly hits unused bytes)."""
    from texbridge.senders import ring as rg

    lay = L.Layout.for_size(size)
    out = [8 * i for i in range(4)]
    for side in (0, 1):
        page = lay.side(side)
        out += [page + 8 * w for w in (L.S_BEAT, L.S_SESSION, L.S_CLOSING, L.S_HEAD, L.S_TAIL)] + [page + L.S_LABEL]
        out += [lay.ring(side) + 8 * i for i in range(8)]  # record lengths at the start
        for entry in (0, 1):
            base = lay.table(side) + entry * 4096
            out += [base + 8 * w for w in (rg._MAGIC, rg._HSEQ, rg._GEN, rg._WIDTH, rg._HEIGHT, rg._NSLOTS, rg._LATEST,
                                           rg._CLOSED, rg._SYNC, rg._FMT, L.C_STREAM, L.C_WRITING)]
            out += [base + 8 * (rg._HANDLES + i) for i in range(3)] + [base + 8 * (rg._SEQ + i) for i in range(3)]
            out += [base + 8 * (rg._SLOT_FRAME + i) for i in range(3)]
            out += [base + 8 * (rg._READERS + i) for i in range(8)]  # the first reader rows (pid, pin, ...)
        for slot in range(3):
            meta = lay.area(side) + slot * L.slot_stride(FMT)
            out += [meta + 8 * w for w in (L.M_PROGRESS, L.M_TIMESTAMP, L.M_NDAMAGE, L.M_ULEN)]
            out += [meta + L.M_DAMAGE + 8 * i for i in range(4)]
    return out


HOT = hot_words()
U64 = st.one_of(st.sampled_from([0, 1, 2, 3, 7, 15, 16, 64, 65, 4096, 2**31, 2**32 - 1, 2**32, 2**63, 2**64 - 1]),
                st.integers(0, 2**64 - 1))
SCRIBBLE = st.one_of(
    st.tuples(st.just("word"), st.sampled_from(HOT), U64),
    st.tuples(st.sampled_from(sorted(REGIONS)), st.integers(0, 2**22), st.binary(min_size=1, max_size=24)))


def moves_slots(scribble: tuple) -> bool:  # type: ignore[type-arg]
    """Whether a scribble may have changed a stream's slot offsets (handles: words 16..31 of a table entry)."""
    from texbridge.senders import ring as rg

    where, off, value = scribble
    if where == "word":
        for side in (0, 1):
            rel = off - L.Layout.for_size(SIZE).table(side)
            if 0 <= rel < L.TABLE_SIZE and rg._HANDLES <= (rel % 4096) // 8 < rg._HANDLES + 16:
                return True
        return False
    return where.startswith("table")


def apply(mem: np.ndarray, scribble: tuple) -> None:  # type: ignore[type-arg]
    where, off, value = scribble
    if where == "word":
        mem[off:off + 8].view(np.uint64)[0] = value
    else:
        start, length = REGIONS[where]
        pos = start + off % max(1, length - len(value))
        mem[pos:pos + len(value)] = np.frombuffer(value, np.uint8)


class Exercise:
    """Both ends of a running link doing everything they do (messages, frames both ways, reads both ways, waits)
    and checking the one promise that survives hostile bytes: a read result is an untorn frame that was sent."""

    def __init__(self, s: ShmLink, j: ShmLink, strict: bool = True) -> None:
        # strict: returned frames must be ones we sent. Not when slot offsets were scribbled: the peer owns its frame
        # area and may point its slots anywhere inside it (garbage pixels, never out of bounds).
        self.strict = strict
        self.ends = [(s, s.open_writer(0, FMT), s.open_reader(1, FMT)), (j, j.open_writer(1, FMT), j.open_reader(0, FMT))]
        self.n = 0
        self.last = [0, 0]
        self.out = np.empty((FMT.height, FMT.row_bytes), np.uint8)

    def step(self) -> None:
        self.n += 1
        for k, (link, w, r) in enumerate(self.ends):
            for op in (lambda: link.send({"op": "tick", "n": self.n}), link.receive, lambda: link.wait(0),
                       lambda: self._read(k, r), lambda: self._write(w), lambda: link.alive, link.stats):
                t = time.monotonic()
                try:
                    op()
                except BridgeError:
                    pass  # the only error a hostile peer may cause (BridgePeerError is one)
                assert time.monotonic() - t < 3, "an operation took too long (a hang in the making)"

    def _write(self, w: StreamWriter) -> None:
        view = w.begin()
        view[...] = self.n % 251
        w.commit(FrameMeta(self.n, user_data=b"%d" % self.n))

    def _read(self, k: int, r: StreamReader) -> None:
        if self.n % 2:
            got = r.read(lambda v, m: (int(v.min()), int(v.max()), m), 0)
        else:
            m = r.read_into(self.out, 0, timeout=0.01)  # type: ignore[attr-defined]
            got = None if m is None else (int(self.out.min()), int(self.out.max()), m)
        if got is not None:
            lo, hi, meta = got
            if self.strict:
                assert lo == hi, f"torn frame: bytes {lo}..{hi}"
                assert lo in {n % 251 for n in range(1, self.n + 1)}, f"a frame never sent: {lo}"
            assert len(meta.damage) <= 64 and len(meta.user_data) <= 4096
            assert all(x + w <= FMT.width and y + h <= FMT.height for x, y, w, h in meta.damage)


@given(st.lists(SCRIBBLE, min_size=1, max_size=8), st.integers(0, 3))
@settings(max_examples=80)
@pytest.mark.filterwarnings("error")
def test_fuzz_scribbled_file_gives_only_bridge_errors_or_clean_frames(scribbles, when):
    import tempfile

    with tempfile.NamedTemporaryFile(dir="/dev/shm", prefix="texbridge-fuzz-") as f:
        f.truncate(SIZE)
        s, j, srv, jn = pair(f.name)
        try:
            ex = Exercise(s, j, strict=not any(moves_slots(sc) for sc in scribbles))
            for i in range(4):
                if i == when:
                    for scribble in scribbles:
                        apply(s._m.mem, scribble)
                ex.step()
        finally:
            jn.close()
            srv.close()


@pytest.mark.filterwarnings("error")
def test_fuzz_concurrent_scribbler_then_the_ends_recover(tmp_path):
    """A thread scribbles random bytes into the header, pages, rings, tables and meta while both ends run; then the
    server reformats and a fresh session carries a clean frame (the file itself is never the problem)."""
    import random
    import threading

    path = tmp_path / "shm"
    path.write_bytes(b"")
    os.truncate(path, SIZE)
    s, j, srv, jn = pair(str(path))
    rng = random.Random(12)
    stop = threading.Event()
    mem = s._m.mem
    names = sorted(REGIONS)

    def scribble() -> None:
        while not stop.is_set():
            if rng.random() < 0.5:
                apply(mem, ("word", rng.choice(HOT), rng.choice([0, 1, 2**64 - 1, rng.getrandbits(64)])))
            else:
                apply(mem, (rng.choice(names), rng.randrange(2**22), rng.randbytes(8)))
            time.sleep(0.002)

    t = threading.Thread(target=scribble)
    t.start()
    try:
        ex = Exercise(s, j, strict=False)  # the scribbler also moves slot offsets (see Exercise)
        end = time.monotonic() + 3
        while time.monotonic() < end:
            ex.step()
    finally:
        stop.set()
        t.join()
    assert s.stats().errors or j.stats().errors, "the scribbles never broke the session: the fuzzer hit nothing"
    try:
        s.close()
        j.close()
        j2 = s2 = None
        deadline = time.monotonic() + 10
        while (j2 is None or s2 is None) and time.monotonic() < deadline:
            s2 = s2 or srv.establish(0.05)
            j2 = j2 or jn.establish(0.05)
        assert s2 is not None and j2 is not None
        w, r = s2.open_writer(9, FMT), j2.open_reader(9, FMT)
        send(w, FMT, 1)
        assert np.array_equal(take(r)[0], frame_of(FMT, 1))
    finally:
        jn.close()
        srv.close()


def test_a_joiner_follows_the_file_being_removed_and_made_anew(tmp_path):
    """`bridge remove` + a new server: the joiner maps the new file (not the unlinked one it had mapped)."""
    path = tmp_path / "shm"
    srv = ShmEndpoint(path, "serve", size=SIZE)
    jn = ShmEndpoint(path, "join")
    try:
        srv.establish(0)
        j = establish(jn, within=5)
        assert srv.establish(1) is not None
        j.close()
        srv.close()
        assert iv.remove(str(path))
        srv = ShmEndpoint(path, "serve", size=2 * SIZE)
        srv.establish(0)
        j = establish(jn, within=5)
        assert j._lay.size == 2 * SIZE
    finally:
        jn.close()
        srv.close()


def test_wait_returns_on_a_message_a_commit_a_begun_frame_and_death(ends):
    """wait() is the engine's only sleep: it must wake for each thing that needs the engine (generous bounds)."""
    import threading

    s, j = ends
    w = s.open_writer(0, FMT)
    j.open_reader(0, FMT)
    j.wait(0)  # take the current state as seen
    for poke in (lambda: s.send({"op": "x"}), lambda: w.begin(), lambda: w.commit(FrameMeta(1)), s.close):
        timer = threading.Timer(0.2, poke)
        timer.start()
        t0 = time.monotonic()
        j.wait(5)
        took = time.monotonic() - t0
        timer.join()
        assert took < 2.5, f"wait() slept {took:.2f} s through {poke}"
        j.receive() if j.alive else None
    assert not j.alive


def test_every_message_commit_and_heartbeat_rings_the_doorbell(ends):
    """The doorbell word the peer sleeps on moves with every message, every frame begun (the peer may follow it, or
    at least be awake when it lands) and committed, and every heartbeat."""
    from texbridge.bridge._link import FOLLOW_MIN_BYTES

    s, j = ends
    bell = j._peer_bell.view(np.uint64)
    w = s.open_writer(0, FMT)
    big = StreamFormat(512, FOLLOW_MIN_BYTES // 2048 + 1, "rgba8")
    wb = s.open_writer(1, big)
    for what, poke in (("message", lambda: s.send({"op": "x"})), ("commit", lambda: send(w, FMT, 1)),
                       ("big begin", wb.begin), ("big commit", lambda: wb.commit(FrameMeta(1)))):
        before = int(bell[0])
        poke()
        assert int(bell[0]) != before, f"a {what} did not ring the doorbell"
    before = int(bell[0])
    w.begin()  # a small frame's begin too
    assert int(bell[0]) != before
    w.abort()
    before = int(bell[0])
    wait_for(lambda: int(bell[0]) != before, within=2)  # the heartbeat rings too
    import threading

    j.receive()
    j.wait(0)  # take the streams' state as seen
    j._ep.poller.wakes_reach = False
    for _ in range(5):  # (a ring landing just as a look-again step ends is seen, not woken: try a few)
        timer = threading.Timer(0.05, lambda: s.send({"op": "y"}))
        timer.start()
        j.wait(5)
        timer.join()
        assert j.receive() == [{"op": "y"}]
        if j._ep.poller.wakes_reach:
            break
    assert j._ep.poller.wakes_reach, "the rings did not futex-wake the sleeping peer"


def test_a_ring_wakes_a_sleeping_poller_at_once_and_it_learns_that_wakes_reach():
    """_Poller.until on a bell: one GIL-free wait; a ring (bump + futex wake) from this kernel ends it at once even
    with steps of seconds, and the poller learns the peer's wakes reach it (a VM peer's never do)."""
    import threading

    from texbridge import _synccore as core
    from texbridge.bridge._shmfile import _Poller

    poller = _Poller(spin_s=0.0, min_sleep=2.0, active_sleep=2.0, idle_sleep=2.0)
    bell = np.zeros(8, np.uint8)
    word = bell.view(np.uint64)
    word[0] = 1  # the peer has rung before: it is a ringing peer
    news = []

    def ring() -> None:
        news.append(1)
        word[0] += 1
        core.wake_word(bell, 0)

    timer = threading.Timer(0.1, ring)
    timer.start()
    t0 = time.monotonic()
    assert poller.until(lambda: bool(news), 10.0, bell)
    assert time.monotonic() - t0 < 1.5
    timer.join()
    assert poller.wakes_reach
    news.clear()
    assert not poller.until(lambda: bool(news), 0.05, bell)  # silence: the timeout


def test_a_peer_that_rings_no_bell_is_still_seen_at_the_poll_steps(ends):
    """The doorbell is a hint: a frame committed without it (an older or hostile peer, a guest whose wake cannot
    cross) is still seen by polling the stream words."""
    s, j = ends
    w = s.open_writer(0, FMT)
    j.open_reader(0, FMT)
    j.wait(0)
    s._ring_bell = lambda: None  # this end stops ringing
    send(w, FMT, 1)
    t0 = time.monotonic()
    j.wait(5)
    assert time.monotonic() - t0 < 1.0
    assert take(j.open_reader(0, FMT))[1].frame == 1


def test_wait_word_spins_then_sleeps_and_says_how_it_ended():
    """_synccore.wait_word: 0 after the timeout, 1 for a word already changed (or changed during the spin), 2 when
    a futex wake ended the sleep: the shared-file poller learns from 2 that the peer's wakes reach it."""
    import threading

    from texbridge import _synccore as core

    buf = np.zeros(64, np.uint8)
    t0 = time.monotonic()
    assert core.wait_word(buf, 8, 0, 0.05, 0.01) == 0
    assert 0.04 < time.monotonic() - t0 < 2
    assert core.wait_word(buf, 8, 1, 5.0) == 1  # not the expected value: at once

    def bump(value: int, wake: bool) -> None:
        buf[8] = value
        if wake:
            core.wake_word(buf, 8)

    timer = threading.Timer(0.005, bump, (1, False))  # changed while spinning: seen without a wake
    timer.start()
    assert core.wait_word(buf, 8, 0, 5.0, 0.5) == 1
    timer.join()
    timer = threading.Timer(0.1, bump, (2, True))
    timer.start()
    t0 = time.monotonic()
    assert core.wait_word(buf, 8, 1, 5.0) == 2
    assert time.monotonic() - t0 < 2.5
    timer.join()
    with pytest.raises(ValueError):
        core.wait_word(buf, 62, 0, 0.0)


def test_read_into_without_follow_leaves_a_frame_being_written(ends):
    """follow=False (the engine's choice for small frames): a frame begun but not committed is not waited for."""
    s, j = ends
    w, r = s.open_writer(0, FMT), j.open_reader(0, FMT)
    send(w, FMT, 1)
    out = np.empty((FMT.height, FMT.row_bytes), np.uint8)
    assert r.read_into(out, 0, follow=False).frame == 1
    view = w.begin()
    view[...] = frame_of(FMT, 2)
    w.progress(FMT.height // 2)
    t0 = time.monotonic()
    assert r.read_into(out, 1, timeout=5, follow=False) is None
    assert time.monotonic() - t0 < 1.0
    w.commit(FrameMeta(2))
    assert r.read_into(out, 1, follow=False).frame == 2
    assert np.array_equal(out, frame_of(FMT, 2))


def test_frame_meta_is_judged_only_once_the_read_is_untorn(ends, monkeypatch):
    """Meta read while the writer rewrote the slot may look invalid: that read is retried, not blamed on the peer
    (a false BridgePeerError would end a healthy session)."""
    from texbridge.bridge import _shmfile as F
    from texbridge.senders import ring as rg

    s, j = ends
    w, r = s.open_writer(0, FMT), j.open_reader(0, FMT)
    send(w, FMT, 1, user_data=b"ok")
    parse = F._ShmReader._parse_meta
    calls = []

    def torn_once(self, slot):  # type: ignore[no-untyped-def]
        calls.append(slot)
        if len(calls) == 1:  # as if the writer was rewriting the meta under us: garbage, and the sequence moves
            w._u[rg._SEQ + slot] += 2
            return None
        return parse(self, slot)

    monkeypatch.setattr(F._ShmReader, "_parse_meta", torn_once)
    view, meta = take(r)
    assert len(calls) == 2 and meta.user_data == b"ok" and j.alive


def test_several_threads_send_and_open_streams_at_once(ends):
    """The engine sends and opens writers from its export threads: messages arrive whole and streams get their own
    entries and slots."""
    import threading

    s, j = ends
    errors: list = []

    def worker(k: int) -> None:
        try:
            w = s.open_writer(100 + k, FMT)
            for i in range(200):
                s.send({"k": k, "i": i, "pad": b"x" * 200})
            send(w, FMT, k + 1)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    got: list = []
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: unlocked races show at once
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while (any(t.is_alive() for t in threads) or len(got) < 800) and time.monotonic() < deadline:
            got += j.receive()
            j.wait(0.01)
            assert len(got) <= 800
    finally:
        sys.setswitchinterval(interval)
    assert not errors
    for k in range(4):
        assert [m["i"] for m in got if m["k"] == k] == list(range(200))
        assert np.array_equal(take(j.open_reader(100 + k, FMT))[0], frame_of(FMT, k + 1))
    offsets = sorted(o for w in s._writers.values() for o in w._offsets)
    assert len(set(w._entry for w in s._writers.values())) == 4 and len(set(offsets)) == 12


@pytest.mark.parametrize("word, value, problem", [
    (L.H_MAGIC, 0x1234, "not formatted"),
    (L.H_VERSION, 2, "version 2"),
    (L.H_SIZE, 2 * SIZE, "restart the VM"),
    (L.H_SIZE, 4096, "formatted 4096 bytes"),
    (L.H_SESSION, 0, "formatting"),
])
def test_a_joiner_refuses_a_bad_header_and_says_why(tmp_path, word, value, problem):
    """What a joiner reads before any link exists is checked too: it waits (establish returns None) and says why."""
    path = tmp_path / "shm"
    srv = ShmEndpoint(path, "serve", size=SIZE)
    srv.establish(0)
    srv._map.u64(0, 4)[word] = value
    jn = ShmEndpoint(path, "join")
    try:
        assert jn.establish(0.4) is None and problem in jn.last_problem
    finally:
        jn.close()
        srv.close()


def test_a_joiner_on_random_bytes_waits(tmp_path):
    path = tmp_path / "shm"
    path.write_bytes(np.random.default_rng(3).integers(0, 256, SIZE, dtype=np.uint8).tobytes())
    jn = ShmEndpoint(path, "join")
    try:
        assert jn.establish(0.3) is None and "not formatted" in jn.last_problem
    finally:
        jn.close()
