"""Frames with metadata (issue 13): timestamps and user data travel with their pixels, Frame objects, iteration
(`for frame in receiver`, `async for frame in receiver.frames()`), against real brokers and sender processes."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time

import numpy as np
import pytest

import texbridge
from texbridge._errors import InvalidArgument

from conftest import spawn_py, wait_until

# argv: name frames ; frame n: pixels n % 256, user_data b"n=<n>;" padded with n % 200 bytes of n % 256, and the
# timestamp its own default (no timestamp_ns) for odd n, n * 1000 for even n. Prints its monotonic clock around it.
SENDER = """
import sys, time, numpy as np, texbridge
name, frames = sys.argv[1], int(sys.argv[2])
s = texbridge.Sender(name, 64, 32)
print("ready", flush=True)
assert s.wait_for_receivers(1, 20)
print("start", time.monotonic_ns(), flush=True)
for n in range(1, frames + 1):
    ud = f"n={n};".encode() + bytes([n % 256]) * (n % 200)
    s.send(np.full(s.shape, n % 256, np.uint8), user_data=ud, timestamp_ns=None if n % 2 else n * 1000)
    time.sleep(0.002)
print("end", time.monotonic_ns(), flush=True)
sys.stdin.readline()
s.close()
"""


def _expected_user_data(n: int) -> bytes:
    return f"n={n};".encode() + bytes([n % 256]) * (n % 200)


def test_frames_carry_their_own_timestamp_and_user_data_across_processes(runtime):
    proc = spawn_py(SENDER, "meta", "300", stdin=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == "ready"
        rx = texbridge.Receiver("meta", require_sender=True)
        start = int(proc.stdout.readline().split()[1])
        got: list[texbridge.Frame] = []
        for frame in rx:
            got.append(frame)
            n = frame.frame_number
            assert isinstance(frame, texbridge.Frame)
            assert int(frame.pixels.min()) == int(frame.pixels.max()) == n % 256
            assert frame.user_data == _expected_user_data(n), f"frame {n} has another frame's user data"
            if n % 2 == 0:
                assert frame.timestamp_ns == n * 1000
            else:  # the default: the sender's CLOCK_MONOTONIC at send (this machine's clock too)
                assert start <= frame.timestamp_ns <= time.monotonic_ns()
                assert abs(frame.realtime_ns - time.time_ns()) < 5e9
            assert (frame.width, frame.height, frame.format, frame.pixel_format, frame.sender) == \
                (64, 32, "rgba8", "rgba8", "meta")
            if n == 300:
                break
        end = int(proc.stdout.readline().split()[1])
        numbers = [f.frame_number for f in got]
        assert numbers == sorted(set(numbers)) and numbers[-1] == 300
        assert all(f.timestamp_ns <= end for f in got if f.frame_number % 2)
        again = rx.receive_frame()
        assert again is not None and again.frame_number == 300 and not rx.is_new
        assert again.user_data == _expected_user_data(300)
        rx.close()
    finally:
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(30) == 0


def test_bad_metadata_is_refused_before_a_slot_is_touched(runtime):
    with texbridge.Sender("bad-meta", 8, 8) as s, texbridge.Receiver("bad-meta") as rx:
        px = np.zeros(s.shape, np.uint8)
        for kwargs, says in [
            (dict(user_data=b"x" * (texbridge.MAX_USER_DATA + 1)), "at most 4096"),
            (dict(user_data="text"), "not str"),
            (dict(user_data=12), "bytes-like"),
            (dict(timestamp_ns=-1), "timestamp_ns"),
            (dict(timestamp_ns=1.5), "timestamp_ns"),
            (dict(timestamp_ns=True), "timestamp_ns"),
            (dict(timestamp_ns=1 << 63), "timestamp_ns"),
        ]:
            with pytest.raises(InvalidArgument, match=says):
                s.send(px, **kwargs)
            with pytest.raises(InvalidArgument, match=says):
                with s.writing(**kwargs):
                    pass
        assert s.frame_number == 0 and rx.receive_frame() is None
        s.send(px, user_data=bytearray(b"\x00" * texbridge.MAX_USER_DATA), timestamp_ns=0)
        with s.writing(user_data=memoryview(b"via writing()"), timestamp_ns=7) as buf:
            buf[...] = 3
        frame = rx.receive_frame()
        assert frame.frame_number == 2 and frame.user_data == b"via writing()" and frame.timestamp_ns == 7
        assert int(frame.pixels.min()) == 3


def test_iteration_ends_when_the_receiver_is_closed(runtime):
    """`for frame in rx` waits for frames; close() from another thread ends the loop (within 5 s)."""
    with texbridge.Sender("iter", 8, 8) as s:
        rx = texbridge.Receiver("iter")
        seen: list[int] = []
        done = threading.Event()

        def consume() -> None:
            for frame in rx:
                seen.append(frame.frame_number)
            done.set()

        t = threading.Thread(target=consume)
        t.start()
        for _ in range(3):
            s.send(np.zeros(s.shape, np.uint8))
            wait_until(lambda: seen and seen[-1] == s.frame_number)
        rx.close()
        assert done.wait(5), "iteration did not end after close()"
        t.join(5)
        assert seen == [1, 2, 3]


def test_async_frames_do_not_block_the_event_loop(runtime):
    """While `async for` waits on the futex, other tasks on the loop keep running; frames arrive in order."""
    s = texbridge.Sender("async", 8, 8)
    rx = texbridge.Receiver("async")

    async def main() -> tuple[list[int], int]:
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        async def produce() -> None:
            await asyncio.sleep(0.3)  # the consumer is waiting meanwhile
            for n in range(1, 4):
                s.send(np.full(s.shape, n, np.uint8), user_data=bytes([n]))
                await asyncio.sleep(0.05)

        tick_task, prod_task = asyncio.create_task(ticker()), asyncio.create_task(produce())
        got: list[int] = []
        ticks_before_first = -1
        async for frame in rx.frames():
            if ticks_before_first < 0:
                ticks_before_first = ticks
            assert frame.user_data == bytes([frame.frame_number]) and int(frame.pixels[0, 0, 0]) == frame.frame_number
            got.append(frame.frame_number)
            if frame.frame_number == 3:
                break
        stop.set()
        await asyncio.gather(tick_task, prod_task)
        return got, ticks_before_first

    result: list = []
    # The loop runs in a thread of its own: a frames() that blocked the loop would hang it (no wait_for could
    # fire), and this test must fail, not hang. rx.close() below ends such a wait.
    t = threading.Thread(target=lambda: result.append(asyncio.run(asyncio.wait_for(main(), 10))), daemon=True)
    t.start()
    t.join(15)
    try:
        assert not t.is_alive(), "the event loop is blocked (frames() waits on the loop's thread)"
        got, ticks = result[0]
        assert got == [1, 2, 3]
        assert ticks >= 10, f"the event loop ran only {ticks} ticks in 0.3 s while waiting for the first frame"
    finally:
        rx.close()
        s.close()


def test_async_frames_end_when_the_receiver_closes(runtime):
    with texbridge.Sender("async-close", 8, 8):
        rx = texbridge.Receiver("async-close")

        async def main() -> list[int]:
            got: list[int] = []
            asyncio.get_running_loop().call_later(0.2, rx.close)
            async for frame in rx.frames():
                got.append(frame.frame_number)
            return got

        assert asyncio.run(asyncio.wait_for(main(), 5)) == []
