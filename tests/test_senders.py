"""Senders and receivers across real processes: retire, restart, resize, latest-frame semantics, frame_sync, no tears.

Every frame the test senders publish is filled with one value derived from its frame number, so a receiver can check
each frame it gets for uniformity (a torn frame mixes two values) and for the right value.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

import texbridge
from texbridge import senders as sd
from texbridge._errors import ClosedError, InvalidArgument, InvalidDescriptor, NameInUse
from texbridge._liveness import start_time

from conftest import spawn_py, wait_until

# argv: name width height frames delay_s [resize_at new_w new_h] ; fills frame n with n % 256, then waits on stdin.
SENDER = """
import sys, time, numpy as np, texbridge
name, w, h, frames, delay = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
resize_at = int(sys.argv[6]) if len(sys.argv) > 6 else 0
frame_sync = len(sys.argv) > 9 and sys.argv[9] == "sync"
s = texbridge.Sender(name, w, h, frame_sync=frame_sync, sync_timeout=30.0)
print("ready", flush=True)
if frame_sync:
    assert s.wait_for_receivers(1, 20)
worst = 0.0
for i in range(frames):
    if resize_at and i == resize_at:
        s.resize(int(sys.argv[7]), int(sys.argv[8]))
    t = time.perf_counter()
    s.send(np.full(s.shape, (s.frame_number + 1) % 256, np.uint8))
    worst = max(worst, time.perf_counter() - t)
    if delay:
        time.sleep(delay)
if frame_sync:
    assert s.wait_frame_sync(20)
print("sent", s.frame_number, s.overwrites, s.sync_timeouts, round(worst, 4), flush=True)
sys.stdin.readline()
s.close()
"""

# argv: name delay_s mode(copy|out|view) max_seconds ; records every frame it gets and checks it.
RECEIVER = """
import sys, json, time, numpy as np, texbridge
name, delay, mode, limit = sys.argv[1], float(sys.argv[2]), sys.argv[3], float(sys.argv[4])
r = texbridge.Receiver(name)
print("ready", flush=True)
frames, torn, wrong, shapes, unverified = [], 0, 0, [], 0
out = None
deadline = time.monotonic() + limit
while time.monotonic() < deadline:
    if mode == "out" and r.connected and r.height:
        shape = (r.height, r.width, 4)
        out = out if out is not None and out.shape == shape else np.empty(shape, np.uint8)
    f = r.wait_frame(0.5, copy=(mode != "view"), out=out if mode == "out" and out is not None and
                     out.shape == (r.height, r.width, 4) else None)
    if f is None:
        if any(e.kind == "retired" for e in r.events) and not r.connected:
            break
        continue
    lo, hi = int(f.min()), int(f.max())
    if mode == "view" and not r.still_valid():
        unverified += 1
    elif lo != hi:
        torn += 1
    elif lo != r.frame_number % 256:
        wrong += 1
    frames.append(r.frame_number)
    if not shapes or shapes[-1] != list(f.shape):
        shapes.append(list(f.shape))
    if mode == "view":
        r.release()
    if delay:
        time.sleep(delay)
print(json.dumps({"frames": frames, "torn": torn, "wrong": wrong, "shapes": shapes, "unverified": unverified,
                  "dropped": r.frames_dropped, "events": [e.kind for e in r.events]}), flush=True)
r.close()
"""


def _start(code: str, *args: object):
    p = spawn_py(code, *map(str, args), stdin=__import__("subprocess").PIPE)
    line = p.stdout.readline()
    assert line.startswith("ready"), line + p.stderr.read()
    return p


def _finish(p, stdin: str = "") -> str:
    out, err = p.communicate(stdin, timeout=60)
    assert p.returncode == 0, err
    return out


def _sent(p) -> list[str]:
    line = p.stdout.readline()
    assert line.startswith("sent"), line + p.stderr.read()
    return line.split()


def _uniform(frame: np.ndarray, frame_number: int) -> bool:
    return int(frame.min()) == int(frame.max()) == frame_number % 256


# -- directory and lifetime -------------------------------------------------------------------------------------------
def test_directory_lists_sender_metadata(runtime):
    p = _start(SENDER, "dir-cam", 64, 32, 40, 0.01)
    try:
        _sent(p)
        info = wait_until(lambda: next((i for i in texbridge.list_senders() if i.frames == 40), None), 3.0)
        assert info is not None, texbridge.list_senders()
        assert (info.name, info.pid, info.width, info.height, info.format, info.backend, info.buffers) == \
            ("dir-cam", p.pid, 64, 32, "rgba8", "memfd", 3)
        assert info.app == "-c" and info.fps > 0
    finally:
        _finish(p, "\n")
    assert wait_until(lambda: not texbridge.list_senders(), 3.0)


@pytest.mark.parametrize("how", ["close", "kill"])
def test_sender_exit_is_a_retire_event(runtime, how):
    with texbridge.watch_senders() as watch:
        p = _start(SENDER, "cam", 32, 16, 5, 0)
        ev = watch.next(5)
        assert ev is not None and (ev.kind, ev.name) == ("announced", "cam")
        rx = texbridge.Receiver("cam")
        try:
            _sent(p)
            assert rx.wait_frame(5) is not None and rx.connected
            if how == "kill":
                p.send_signal(signal.SIGKILL)
                p.wait(10)
            else:
                _finish(p, "\n")
            kinds = []
            while "retired" not in kinds:
                ev = watch.next(5)
                assert ev is not None, f"no retire event after the sender's {how} (saw {kinds})"
                kinds.append(ev.kind)
            assert ev.name == "cam"
            assert rx.wait_frame(0.5) is None
            assert wait_until(lambda: any(e.kind == "retired" for e in rx.events), 3.0)
            assert not rx.connected
        finally:
            rx.close()
            if p.poll() is None:
                p.kill()
                p.wait()


def test_new_sender_under_same_name_is_followed(runtime):
    rx = texbridge.Receiver("stage")
    try:
        first = _start(SENDER, "stage", 32, 16, 3, 0)
        _sent(first)
        f = rx.wait_frame(5)
        assert f is not None and f.shape == (16, 32, 4) and _uniform(f, rx.frame_number)
        _finish(first, "\n")
        second = _start(SENDER, "stage", 48, 24, 7, 0)
        try:
            _sent(second)
            f = rx.wait_frame(5)
            assert f is not None and f.shape == (24, 48, 4), "the receiver did not follow the restarted sender"
            assert rx.frame_number == 7 and _uniform(f, 7)
            kinds = [e.kind for e in rx.events]
            assert "retired" in kinds and kinds.index("retired") < len(kinds) - 1
        finally:
            _finish(second, "\n")
    finally:
        rx.close()


def test_receiver_waits_for_a_sender_that_does_not_exist_yet(runtime):
    with texbridge.Receiver("later") as rx:
        assert rx.receive() is None and not rx.connected
        p = _start(SENDER, "later", 16, 16, 2, 0)
        try:
            f = rx.wait_frame(5)
            assert f is not None and rx.connected and _uniform(f, rx.frame_number)
        finally:
            _sent(p)
            _finish(p, "\n")


def test_resize_is_followed(runtime):
    rx = _start(RECEIVER, "resizer", 0, "out", 20)
    p = _start(SENDER, "resizer", 64, 32, 200, 0.002, 100, 16, 40)
    _sent(p)
    time.sleep(0.3)
    _finish(p, "\n")
    res = json.loads(_finish(rx))
    assert res["shapes"] == [[32, 64, 4], [40, 16, 4]]
    assert res["torn"] == 0 and res["wrong"] == 0
    assert res["frames"] == sorted(set(res["frames"])) and res["frames"][-1] == 200


# -- frames -----------------------------------------------------------------------------------------------------------
def test_three_receivers_at_different_rates_never_block_the_sender(runtime):
    """A busy copier, a buffer-reusing one and a slow zero-copy one that pins its slot while it sleeps."""
    rxs = [_start(RECEIVER, "fast", d, mode, 60) for d, mode in ((0, "copy"), (0.002, "out"), (0.05, "view"))]
    p = _start(SENDER, "fast", 256, 256, 3000, 0)
    _, sent, overwrites, _, worst = _sent(p)
    time.sleep(0.2)
    _finish(p, "\n")
    results = [json.loads(_finish(r)) for r in rxs]
    assert int(sent) == 3000
    for res in results:
        frames = res["frames"]
        assert frames, res
        assert all(a < b for a, b in zip(frames, frames[1:])), "frame numbers must rise strictly"
        assert res["torn"] == 0 and res["wrong"] == 0, res
        assert "retired" in res["events"]
    slow = results[2]
    # latest-frame semantics: the slow receiver skipped most frames instead of holding the sender back
    assert len(slow["frames"]) < 3000 / 2 and slow["dropped"] > 0
    # the sender writes a pinned slot only when every slot was pinned at once (it counts those)
    assert slow["unverified"] <= int(overwrites), "the sender wrote into a slot a receiver had pinned"
    print(f"sender: 3000 frames, worst send {float(worst) * 1e3:.1f} ms, {overwrites} pinned-slot overwrites; "
          f"received {[len(r['frames']) for r in results]}")


def test_frame_sync_makes_the_sender_wait(runtime):
    rx = _start(RECEIVER, "synced", 0.01, "copy", 30)
    p = _start(SENDER, "synced", 32, 32, 60, 0, 0, 0, 0, "sync")
    _, sent, _, timeouts, _ = _sent(p)
    _finish(p, "\n")
    res = json.loads(_finish(rx))
    assert int(sent) == 60 and int(timeouts) == 0
    assert res["frames"] == list(range(1, 61)), "with frame_sync every frame reaches the receiver, in order"
    assert res["dropped"] == 0 and res["torn"] == 0 and res["wrong"] == 0


def test_frame_sync_in_process_blocks_until_consumed(runtime):
    with texbridge.Sender("sync1", 8, 8, frame_sync=True, sync_timeout=0.3) as s, texbridge.Receiver("sync1") as rx:
        s.send(np.full(s.shape, 1, np.uint8))
        t = time.monotonic()
        s.send(np.full(s.shape, 2, np.uint8))  # nobody consumed frame 1: waits out sync_timeout
        assert time.monotonic() - t >= 0.25 and s.sync_timeouts == 1
        assert rx.receive() is not None and rx.frame_number == 2
        s.send(np.full(s.shape, 3, np.uint8))  # frame 2 consumed: no wait
        assert s.sync_timeouts == 1


def test_no_torn_frames_large_frames(runtime):
    """1080p frames copied while the sender keeps overwriting the ring: every frame is whole."""
    rx = _start(RECEIVER, "big", 0, "copy", 60)
    p = _start(SENDER, "big", 1920, 1080, 300, 0)
    _sent(p)
    _finish(p, "\n")
    res = json.loads(_finish(rx))
    assert res["frames"] and res["torn"] == 0 and res["wrong"] == 0
    assert all(a < b for a, b in zip(res["frames"], res["frames"][1:]))


class _SendsMidCopy(np.ndarray):
    """An `out` array whose first np.copyto into it (the receiver's copy of a slot) stops half-way, lets the sender
    send `sends` frames, then copies the rest: a copy overlapped by writes, at a point the test chooses."""

    def __array_function__(self, func, types, args, kwargs):  # type: ignore[no-untyped-def]
        if func is np.copyto and self.__dict__.get("sends"):
            sends, self.sends = self.sends, []
            dst, src = np.asarray(args[0]), args[1]
            half = dst.shape[0] // 2
            dst[:half] = src[:half]
            for send in sends:
                send()
            dst[half:] = src[half:]
            self.first_copy = dst.copy()
            return None
        return super().__array_function__(func, types, args, kwargs)


def test_a_copy_overlapped_by_sends_into_every_pinned_slot_is_refused(runtime):
    """Deterministic torn read through real Senders and Receivers: every slot is pinned (a zero-copy view holds one,
    the copying receiver the other), so the sender must overwrite pinned slots, and it does so in the middle of the
    receiver's copy. The torn copy must be dropped and the newer frame read whole."""
    with texbridge.Sender("torn", 16, 8, buffers=2) as s, texbridge.Receiver("torn") as a, \
            texbridge.Receiver("torn") as b:
        s.send(np.full(s.shape, 1, np.uint8))
        assert _uniform(a.receive(copy=False), 1)  # a pins frame 1's slot
        s.send(np.full(s.shape, 2, np.uint8))  # the other slot: b will copy it
        out = np.zeros(s.shape, np.uint8).view(_SendsMidCopy)
        out.sends = [lambda: s.send(np.full(s.shape, 3, np.uint8)), lambda: s.send(np.full(s.shape, 4, np.uint8))]
        got = b.receive(out=out)
        assert s.overwrites == 2, "the risky path (every slot pinned) was not taken"
        half = s.shape[0] // 2
        assert _uniform(out.first_copy[:half], 2) and _uniform(out.first_copy[half:], 4), \
            "the first copy was not torn: the test did not overlap a write"
        assert got is out and b.frame_number == 4 and _uniform(np.asarray(got), 4), \
            f"a torn frame was handed over (frame {b.frame_number}, rows {np.asarray(got)[:, 0, 0]})"
        assert not a.still_valid(), "a's pinned slot was overwritten: its view must say so"


def test_receive_semantics_in_process(runtime):
    with texbridge.Sender("sem", 16, 8) as s, texbridge.Receiver("sem") as rx:
        assert rx.receive() is None and not rx.is_new
        for _ in range(4):
            s.send(np.full(s.shape, s.frame_number + 1, np.uint8))
        f = rx.receive()
        assert rx.is_new and rx.frame_number == 4 and _uniform(f, 4)
        assert rx.receive() is f and not rx.is_new
        view = rx.receive(copy=False)
        assert view is f and not rx.is_new  # nothing new: the same frame comes back
        s.send(np.full(s.shape, 5, np.uint8))
        view = rx.receive(copy=False)
        assert rx.is_new and not view.flags.writeable and _uniform(view, 5) and rx.still_valid()
        with s.writing() as buf:
            buf[...] = 6
        with s.writing() as buf:
            buf[...] = 7
        assert rx.still_valid(), "the sender must avoid the slot a zero-copy view pins"
        rx.release()
        assert rx.wait_frame(1) is not None and rx.frame_number == 7 and rx.frames_dropped == 1
        assert rx.sender_frame == 7 and rx.format == "rgba8" and (rx.width, rx.height) == (16, 8)


def test_active_sender(runtime):
    with texbridge.connect() as session:
        a = texbridge.Sender("alpha", 8, 8, session=session)
        time.sleep(0.01)
        b = texbridge.Sender("beta", 8, 8, session=session)
        try:
            assert sd.active_sender() == "beta"  # the last announced
            with texbridge.Receiver() as rx:
                b.send(np.zeros(b.shape, np.uint8))
                assert rx.wait_frame(2) is not None and rx.name == "beta"
            sd.set_active_sender("alpha", session)
            assert sd.active_sender() == "alpha"
            with texbridge.Receiver() as rx:
                a.send(np.zeros(a.shape, np.uint8))
                assert rx.wait_frame(2) is not None and rx.name == "alpha"
                a.close()  # the chosen one retires: the receiver moves to the one left
                b.send(np.ones(b.shape, np.uint8))
                f = rx.wait_frame(3)
                assert f is not None and rx.name == "beta"
        finally:
            a.close()
            b.close()


def test_copy_path_when_the_receiver_cannot_import(runtime):
    diag = texbridge.backends.get_backend("vulkan").diagnostics() if _has_vulkan() else {"available": False}
    if not diag.get("available"):
        pytest.skip(f"Vulkan backend unavailable: {diag.get('detail', 'vulkan package missing')}")
    with texbridge.Sender("vk", 32, 16, backend="vulkan") as s:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rx = texbridge.Receiver("vk", backend="memfd")  # memfd cannot map Vulkan opaque-fd memory
            try:
                for n in range(1, 6):
                    s.send(np.full(s.shape, n, np.uint8))
                    f = rx.wait_frame(2)
                    if f is not None:
                        assert _uniform(f, rx.frame_number)
                f = rx.wait_frame(2) if f is None else f
                assert f is not None and rx.frame_number >= 2
                assert rx.copy_path_reason
            finally:
                rx.close()
        msgs = [str(w.message) for w in caught if "copy path" in str(w.message)]
        assert len(msgs) == 1 and "\n" not in msgs[0]


def _has_vulkan() -> bool:
    try:
        texbridge.backends.get_backend("vulkan")
        return True
    except texbridge.BackendError:
        return False


def test_bad_input(runtime):
    with pytest.raises(InvalidDescriptor):
        texbridge.Sender("x", 8, 8, buffers=1)
    with pytest.raises(InvalidDescriptor):
        texbridge.Sender("x", 8, 8, "nope")
    with pytest.raises(InvalidDescriptor):
        texbridge.Sender("x", 0, 8)
    with texbridge.Sender("x", 8, 8) as s:
        with pytest.raises(NameInUse):
            texbridge.Sender("x", 8, 8)
        with pytest.raises(InvalidArgument):
            s.send(np.zeros((4, 4, 4), np.uint8))
        with pytest.raises(InvalidArgument):
            s.send(np.zeros(s.shape, np.float32))
        s.send(np.zeros(s.shape, np.uint8).reshape(-1))  # same size: reshaped
    with pytest.raises(ClosedError):
        s.send(np.zeros(s.shape, np.uint8))
    assert texbridge.list_senders() == []


def test_receive_into_a_gpu_api_resource(runtime):
    """Output in the receiver's API of choice: frames land in a Vulkan (lavapipe) image the receiver owns."""
    pytest.importorskip("vulkan", reason="the vulkan package (texbridge[vulkan]) is not installed")
    try:
        from texbridge.backends.vulkan import BACKEND as VK
        target = VK.create_texture(16, 8, "rgba8")
    except texbridge.BackendError as e:
        pytest.skip(f"no Vulkan device with external memory: {e}")
    try:
        with texbridge.Sender("to-vk", 16, 8) as s, texbridge.Receiver("to-vk") as rx:
            s.send(np.full(s.shape, 9, np.uint8))
            assert rx.wait_frame(5, out=target) is target and rx.is_new
            assert _uniform(target.download(), 9)
            s.send(np.full(s.shape, 10, np.uint8))
            assert rx.receive(out=target) is target and _uniform(target.download(), 10)
    finally:
        target.close()


def test_watch_resync_retires_only_senders_whose_process_is_gone(runtime):
    """After a broker restart the watch re-lists; a known sender missing from the new list is retired only when its
    process is gone, including a pid that a new process took over since (the start-time guard of _liveness)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid, me = int(done.stdout), os.getpid()
    with texbridge.connect() as s, sd.watch_senders(s) as w:
        for name, handle, pid, start in (("gone", 9001, dead_pid, 0), ("reused", 9002, me, start_time(me) + 1),
                                         ("alive", 9003, me, start_time(me))):
            w._known[name] = handle
            w._pids[handle] = (pid, start)
        retired = {e.name for e in w._resync() if e.kind == "retired"}
        assert retired == {"gone", "reused"} and "alive" in w._known


def test_frame_sync_stops_waiting_for_a_receiver_whose_process_died(runtime):
    """A receiver killed without detaching leaves its row behind; a frame_sync sender drops it while waiting rather
    than sitting out sync_timeout for it."""
    with texbridge.Sender("dies", 8, 8, frame_sync=True, sync_timeout=30.0) as s:
        p = spawn_py("""
import texbridge
rx = texbridge.Receiver("dies")
print("attached", flush=True)
input()
""")
        try:
            assert p.stdout.readline().strip() == "attached"
            assert s.wait_for_receivers(1, 10) and s.receivers == 1
        finally:
            p.kill()
            p.wait(10)
        s.send(np.full(s.shape, 1, np.uint8))  # the first frame never waits
        t = time.monotonic()
        s.send(np.full(s.shape, 2, np.uint8))  # frame 1 was never consumed, by a receiver that is gone
        assert time.monotonic() - t < 5 and s.sync_timeouts == 0 and s.receivers == 0
