"""Keyed mutex: semantics across real processes sharing a real memfd (docs/keyed-mutex.md).

Children are fresh interpreters (subprocess with pass_fds) so nothing is inherited by fork; they talk back on
stdout, one line per event. Time bounds here are loose on purpose: precision is measured in benchmarks/.
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from texbridge._descriptor import KEYED_MUTEX_STATE_SIZE
from texbridge._errors import (ClosedError, KeyedMutexAbandoned, KeyedMutexError, KeyedMutexTimeout,
                               TexbridgeError, WouldBlock)
from texbridge._sharedmem import create_sealed, map_fd
from texbridge.keyed_mutex import PRIVATE_DATA_CAPACITY, KeyedMutex, abandon_session, create_state

PRELUDE = """
import os, sys, time, signal, random, struct, mmap
from texbridge.keyed_mutex import KeyedMutex
from texbridge._errors import *
from texbridge._sharedmem import map_fd
ARGS = [int(a) for a in sys.argv[1:]]
def say(*a):
    print(*a, flush=True)
"""


class Child:
    """A python child running `code` with `fds` passed (and given as integer argv); reads its stdout lines."""

    def __init__(self, code: str, *fds: int, args: tuple[int, ...] = ()) -> None:
        src = PRELUDE + textwrap.dedent(code)
        self.proc = subprocess.Popen([sys.executable, "-c", src, *map(str, fds + args)], pass_fds=fds,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._buf = b""

    def line(self, timeout: float = 10.0) -> str:
        end = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = end - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise AssertionError(f"child said nothing within {timeout} s; stderr: {self.stderr()}")
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise AssertionError(f"child exited ({self.proc.wait()}); stderr: {self.stderr()}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def silent_for(self, seconds: float) -> bool:
        return not self._buf and not select.select([self.proc.stdout], [], [], seconds)[0]

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return "(running)"
        return self.proc.stderr.read().decode(errors="replace")[-3000:]

    def finish(self, timeout: float = 30.0) -> int:
        try:
            rc = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        assert rc == 0, f"child failed ({rc}): {self.stderr()}"
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def fd():
    fd = create_state(0)
    yield fd
    os.close(fd)


@pytest.fixture
def mutex(fd):
    with KeyedMutex(fd) as m:
        yield m


@pytest.fixture
def children():
    made: list[Child] = []

    def make(code: str, *fds: int, args: tuple[int, ...] = ()) -> Child:
        c = Child(code, *fds, args=args)
        made.append(c)
        return c

    yield make
    for c in made:
        c.kill()


def wait_until(cond, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.002)


# -- basics ------------------------------------------------------------------------------------------------------------


def test_new_mutex_is_free_with_its_initial_key():
    fd = create_state(7)
    try:
        with KeyedMutex(fd) as m:
            s = m.statistics()
            assert (s.key, s.locked, s.waiters, s.acquisitions) == (7, False, 0, 0)
            with pytest.raises(KeyedMutexTimeout):
                m.acquire(0, 0)
            assert m.acquire(7, 0) == 0
            assert m.owned and m.statistics().owner_pid == os.getpid()
            m.release(8)
            assert m.statistics().key == 8 and not m.owned
    finally:
        os.close(fd)


def test_sync_value_rises_by_default_and_can_be_set(mutex):
    assert mutex.acquire(0) == 0
    mutex.release(1)
    assert mutex.acquire(1) == 1
    mutex.release(2, sync_value=1000)
    assert mutex.acquire(2) == 1000


def test_acquire_nowait_and_hold(mutex):
    with pytest.raises(WouldBlock):
        mutex.acquire_nowait(3)
    with mutex.hold(0, 5) as sync:
        assert sync == 0 and mutex.owned
    assert mutex.statistics().key == 5 and not mutex.owned
    with pytest.raises(ZeroDivisionError):
        with mutex.hold(5, 6):
            1 / 0
    assert mutex.statistics().key == 6 and not mutex.owned  # released even when the body raised


def test_waiting_keys_lists_queued_waiters_oldest_first_once_each(fd, mutex):
    """The bridge ships a remote copy only for keys someone waits for: waiting_keys() must name exactly those."""
    assert mutex.waiting_keys() == ()
    mutex.acquire(0)
    others = [KeyedMutex(fd) for _ in range(3)]
    threads = []
    try:
        for other, key in zip(others, (5, 3, 5)):
            threads.append(threading.Thread(target=_try_acquire, args=(other, key, 3)))
            threads[-1].start()
            wait_until(lambda n=len(threads): mutex.statistics().waiters == n)
        assert mutex.waiting_keys() == (5, 3)
        mutex.release(5)  # one waiter for 5 takes it; another 5 and the 3 still queue
        wait_until(lambda: mutex.statistics().waiters == 2)
        assert sorted(mutex.waiting_keys()) == [3, 5]
    finally:
        for th in threads:
            th.join(10)  # the remaining two time out
        for o in others:
            o.close()


def _try_acquire(m: KeyedMutex, key: int, timeout: float) -> None:
    with contextlib.suppress(KeyedMutexTimeout):
        m.acquire(key, timeout)


def test_misuse_is_an_error(fd, mutex):
    with pytest.raises(KeyedMutexError, match="non-owner"):
        mutex.release(1)  # free: nobody owns it
    mutex.acquire(0)
    with pytest.raises(KeyedMutexError, match="recursive"):
        mutex.acquire(0)
    with KeyedMutex(fd) as other:  # another handle in the same process is another owner
        with pytest.raises(KeyedMutexError, match="non-owner"):
            other.release(1)
        with pytest.raises(KeyedMutexError, match="private data"):
            other.private_data
        with pytest.raises(KeyedMutexTimeout):
            other.acquire(0, 0.01)
    for bad in (-1, 1 << 64, 1.5, "0"):
        with pytest.raises(KeyedMutexError):
            mutex.release(bad)  # type: ignore[arg-type]
    for bad in (-1, float("nan"), "soon"):
        with pytest.raises(KeyedMutexError):
            mutex.acquire(1, bad)  # type: ignore[arg-type]
    with pytest.raises(KeyedMutexError, match="capacity"):
        mutex.release(1, private_data=b"x" * (PRIVATE_DATA_CAPACITY + 1))
    assert mutex.owned  # failed releases left it owned
    mutex.release(1)


def test_close_is_idempotent_and_closing_an_owner_abandons(fd):
    m = KeyedMutex(fd)
    m.acquire(0)
    m.close()
    m.close()
    with pytest.raises(ClosedError):
        m.acquire(0, 0)
    with KeyedMutex(fd) as other:
        with pytest.raises(KeyedMutexAbandoned) as exc:
            other.acquire(42, 0)  # abandoned-free: any key gets it
        assert exc.value.key == 0
        assert other.owned and other.statistics().abandoned_count == 1
        other.release(3)
        assert other.acquire(3, 0) == exc.value.sync_value + 1


def test_state_fd_is_checked():
    with pytest.raises(KeyedMutexError):
        KeyedMutex(create_sealed("small", 100))
    unsealed = os.memfd_create("unsealed")
    os.ftruncate(unsealed, KEYED_MUTEX_STATE_SIZE)
    a, b = socket.socketpair()
    try:
        with pytest.raises(KeyedMutexError):
            KeyedMutex(unsealed)  # a peer could shrink it under our mapping: SIGBUS
        with pytest.raises(KeyedMutexError):
            KeyedMutex(a.fileno())
        zeros = create_sealed("zeros", KEYED_MUTEX_STATE_SIZE)
        with pytest.raises(KeyedMutexError, match="magic"):
            KeyedMutex(zeros)
        os.close(zeros)
    finally:
        os.close(unsealed)
        a.close()
        b.close()


def test_private_data_round_trips_across_processes(fd, mutex, children):
    blob = bytes(random.Random(1).randrange(256) for _ in range(PRIVATE_DATA_CAPACITY))
    mutex.acquire(0)
    mutex.release(1, private_data=blob)
    c = children("""
        m = KeyedMutex(ARGS[0])
        m.acquire(1, 10)
        data = m.private_data
        m.release(2, private_data=data[::-1][:100])
        say(data.hex())
    """, fd)
    assert bytes.fromhex(c.line()) == blob
    c.finish()
    mutex.acquire(2, 5)
    assert mutex.private_data == blob[::-1][:100]
    mutex.release(3)  # no private_data: the blob stays
    mutex.acquire(3)
    assert mutex.private_data == blob[::-1][:100]
    mutex.release(4, private_data=b"")
    mutex.acquire(4)
    assert mutex.private_data == b""


# -- blocking and timeouts ---------------------------------------------------------------------------------------------


def test_key_mismatch_blocks_until_released_with_that_key(fd, mutex, children):
    c = children("""
        m = KeyedMutex(ARGS[0])
        say("waiting")
        sync = m.acquire(1)
        say("got", sync)
        m.release(0)
    """, fd)
    assert c.line() == "waiting"
    wait_until(lambda: mutex.statistics().waiters == 1)
    assert c.silent_for(0.3)  # free, but key 0: the child must not get it
    mutex.acquire(0)
    mutex.release(2)  # still not its key
    assert c.silent_for(0.2)
    mutex.acquire(2)
    mutex.release(1, sync_value=77)
    assert c.line() == "got 77"
    c.finish()
    assert mutex.acquire(0, 5) == 78


def test_timeouts_are_respected(fd, mutex, children):
    t = time.monotonic()
    with pytest.raises(KeyedMutexTimeout):
        mutex.acquire(1, 0)
    assert time.monotonic() - t < 0.1
    for timeout in (0.001, 0.05, 0.2):
        t = time.monotonic()
        with pytest.raises(KeyedMutexTimeout):
            mutex.acquire(1, timeout)
        took = time.monotonic() - t
        assert timeout <= took < timeout + 0.5
    # held by a live process with the right key: still a timeout, and no waiter left behind
    c = children("""
        m = KeyedMutex(ARGS[0]); m.acquire(0); say("held"); time.sleep(60)
    """, fd)
    assert c.line() == "held"
    t = time.monotonic()
    with pytest.raises(KeyedMutexTimeout):
        mutex.acquire(0, 0.1)
    assert 0.1 <= time.monotonic() - t < 0.6
    assert mutex.statistics().waiters == 0


def test_fifo_order_for_one_key(fd, mutex, children):
    """Waiters queued in a known order get the key in that order: each appends its index to the private data."""
    mutex.acquire(0)
    mutex.release(1, private_data=b"")
    mutex.acquire(1)  # hold it while the queue forms
    n = 6
    kids = []
    for i in range(n):
        kids.append(children("""
            m = KeyedMutex(ARGS[0])
            m.acquire(0, 30)
            m.release(0, private_data=m.private_data + bytes([ARGS[1]]))
        """, fd, args=(i,)))
        wait_until(lambda: mutex.statistics().waiters == i + 1)
    mutex.release(0)
    for k in kids:
        k.finish()
    mutex.acquire(0, 5)
    assert list(mutex.private_data) == list(range(n))
    assert mutex.statistics().contended >= n


def test_threads_share_ownership_and_the_gil_is_released(fd, mutex):
    """The owner is the handle, not the thread; a waiting thread does not stop the others."""
    mutex.acquire(0)
    got = []
    t = threading.Thread(target=lambda: (mutex.release(1), got.append("released")))
    t.start()
    t.join(5)
    assert got == ["released"] and not mutex.owned

    with KeyedMutex(fd) as other:
        waiter = threading.Thread(target=lambda: got.append(other.acquire(5)))
        waiter.start()
        spins = 0
        end = time.monotonic() + 0.3
        while time.monotonic() < end:
            spins += 1  # the main thread keeps running Python while the waiter blocks
        assert spins > 10000 and waiter.is_alive()
        mutex.acquire(1)
        mutex.release(5)
        waiter.join(5)
        assert got[-1] == 2 and other.owned
        other.release(0)


def test_ctrl_c_interrupts_a_wait_and_leaves_no_waiter(fd, mutex, children):
    c = children("""
        m = KeyedMutex(ARGS[0])
        say("waiting")
        try:
            m.acquire(9)
        except KeyboardInterrupt:
            say("interrupted", m.statistics().waiters)
    """, fd)
    assert c.line() == "waiting"
    wait_until(lambda: mutex.statistics().waiters == 1)
    t = time.monotonic()
    c.proc.send_signal(signal.SIGINT)
    assert c.line(5) == "interrupted 0"
    assert time.monotonic() - t < 1.0
    c.finish()
    assert mutex.statistics().waiters == 0
    mutex.acquire(0, 0)
    mutex.release(9)
    assert mutex.acquire(9, 0) == 1  # nobody took the key-9 grant


def test_interrupt_racing_a_grant_passes_it_on(fd, mutex, children):
    """SIGINT arriving just as the grant does: the interrupted waiter must pass the mutex on, never keep it."""
    for attempt in range(5):
        c = children("""
            m = KeyedMutex(ARGS[0])
            say("waiting")
            try:
                m.acquire(1)
                m.release(2)
                say("acquired")
            except KeyboardInterrupt:
                say("interrupted")
        """, fd)
        assert c.line() == "waiting"
        wait_until(lambda: mutex.statistics().waiters == 1)
        mutex.acquire(0, 5)
        c.proc.send_signal(signal.SIGINT)
        mutex.release(1)
        outcome = c.line(5)
        c.finish()
        try:
            # acquired: released with 2. Interrupted inside the wait: the grant was passed on, key still 1.
            mutex.acquire(2 if outcome == "acquired" else 1, 5)
        except KeyedMutexAbandoned:
            assert outcome == "interrupted"  # interrupted just after acquire returned: it died owning it
        assert mutex.owned
        mutex.release(0)


# -- abandonment -------------------------------------------------------------------------------------------------------


HOLD_FOREVER = """
m = KeyedMutex(ARGS[0], session_id=ARGS[1] if len(ARGS) > 1 else 0)
m.acquire(0)
m.release(0, private_data=b"half-written frame")
m.acquire(0)
say("held")
time.sleep(120)
"""


def test_sigkill_of_the_holder_gives_waiters_abandoned_promptly(fd, mutex, children):
    c = children(HOLD_FOREVER, fd)
    assert c.line() == "held"
    result = []

    def wait():
        try:
            mutex.acquire(0, 10)
            result.append("acquired")
        except KeyedMutexAbandoned as e:
            result.append((time.monotonic(), e))

    w = threading.Thread(target=wait)
    w.start()
    wait_until(lambda: mutex.statistics().waiters == 1)
    killed = time.monotonic()
    c.proc.kill()  # not reaped yet: the child is a zombie, which must count as dead
    w.join(5)
    assert result and result[0] != "acquired"
    at, exc = result[0]
    assert at - killed < 1.0
    assert exc.key == 0
    # recoverable: we own it, may look at the data and release with any key
    assert mutex.owned and mutex.private_data == b"half-written frame"
    s = mutex.statistics()
    assert s.owner_pid == os.getpid() and s.abandoned_count == 1
    mutex.release(1)
    assert mutex.acquire(1, 0) == exc.sync_value + 1
    mutex.release(0)


def test_sigkill_with_no_waiter_abandons_for_the_next_acquirer(fd, mutex, children):
    c = children(HOLD_FOREVER, fd)
    assert c.line() == "held"
    c.kill()  # reaped: the pid is simply gone
    with pytest.raises(KeyedMutexAbandoned):
        mutex.acquire(5, 0)  # a poll notices the dead owner too, and any key gets an abandoned mutex
    mutex.release(5)
    assert mutex.acquire(5, 0) >= 1


DIE_IN_META_LOCK = """
m = KeyedMutex(ARGS[0])
if ARGS[1]:
    m.acquire(0)
raw = map_fd(ARGS[0], 4096)
raw[8:12] = os.getpid().to_bytes(4, "little")  # as if killed inside the meta lock (this is the main thread's tid)
say("in meta lock")
time.sleep(120)
"""


def test_death_halfway_through_taking_an_abandoned_mutex_is_healed(fd, mutex, children):
    """Killed inside the meta lock between `locked = 1` and `abandoned = 0` of taking an abandoned mutex: the state
    is half-written (locked and abandoned at once); the next user finishes the step and recovers, it does not call
    the mutex corrupted."""
    c = children(DIE_IN_META_LOCK, fd, args=(1,))
    assert c.line() == "in meta lock"
    raw = map_fd(fd, KEYED_MUTEX_STATE_SIZE)
    raw[20:24] = (1).to_bytes(4, "little")  # abandoned = 1 beside locked = 1: the half-done step
    c.kill()
    with pytest.raises(KeyedMutexAbandoned):
        mutex.acquire(0, 5)
    mutex.release(1)
    assert mutex.acquire(1, 0) >= 1 and mutex.statistics().meta_steals == 1
    mutex.release(0)
    raw.close()


@pytest.mark.parametrize("owning", [False, True], ids=["free", "owning"])
@pytest.mark.parametrize("reaped", [False, True], ids=["zombie", "reaped"])
def test_death_inside_the_meta_lock_is_recovered(fd, mutex, children, owning, reaped):
    """A process killed holding the internal lock, reaped or still a zombie, costs nobody the 2 s stuck bound."""
    c = children(DIE_IN_META_LOCK, fd, args=(int(owning),))
    assert c.line() == "in meta lock"
    c.proc.kill()
    if reaped:
        c.proc.wait()
    else:
        wait_until(lambda: open(f"/proc/{c.proc.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z")
    t = time.monotonic()
    if owning:
        with pytest.raises(KeyedMutexAbandoned):
            mutex.acquire(0, 5)
    else:
        mutex.acquire(0, 5)
    assert time.monotonic() - t < 1.0
    s = mutex.statistics()
    assert s.meta_steals == 1 and s.abandoned_count == int(owning)
    mutex.release(1)
    assert mutex.acquire(1, 0) >= 1  # normal operation afterwards
    mutex.release(0)


def test_an_owner_whose_pid_now_names_another_process_is_dead(fd, mutex):
    """Pid reuse: the recorded owner's pid exists but started at another time, so it is not the owner; the waiter
    gets the mutex abandoned. Made deterministic by rewriting the owner's recorded start time (offset 48)."""
    mutex.acquire(0, 0)
    raw = map_fd(fd, KEYED_MUTEX_STATE_SIZE)
    try:
        start = int.from_bytes(raw[48:56], "little")
        assert start > 0 and int.from_bytes(raw[32:36], "little") == os.getpid()
        raw[48:56] = (start + 1).to_bytes(8, "little")  # the same pid, another process's start time
    finally:
        raw.close()
    with KeyedMutex(fd) as other:
        with pytest.raises(KeyedMutexAbandoned):
            other.acquire(0, 5)
        assert other.owned
        other.release(0)
    assert not mutex.owned


def test_an_owner_that_died_before_waking_from_its_grant_passes_it_on_unabandoned(fd, mutex, children):
    """The grant reached a waiter that never ran again (stopped, then killed): it cannot have touched the data, so
    the next waiter for the same key gets the mutex normally, not abandoned."""
    c = children("""
        m = KeyedMutex(ARGS[0])
        say("waiting")
        m.acquire(1)
        say("woke")
    """, fd)
    mutex.acquire(0, 0)
    assert c.line() == "waiting"
    wait_until(lambda: mutex.statistics().waiters == 1)
    c.proc.send_signal(signal.SIGSTOP)  # asleep in the kernel: it cannot see its grant
    mutex.release(1)  # granted to the stopped child
    assert mutex.statistics().owner_pid == c.proc.pid
    c.proc.kill()
    c.proc.wait()
    assert mutex.acquire(1, 5) >= 1  # no KeyedMutexAbandoned: the dead owner never ran
    assert mutex.statistics().abandoned_count == 0
    mutex.release(0)


def test_abandoned_goes_to_the_earliest_waiter_the_others_queue_on(fd, children):
    c = children(HOLD_FOREVER, fd)
    assert c.line() == "held"
    waiters = []
    for i, key in enumerate((3, 0, 0)):
        w = children("""
            m = KeyedMutex(ARGS[0])
            try:
                m.acquire(ARGS[1], 20); say("ok")
            except KeyedMutexAbandoned:
                say("abandoned")
            m.release(0)
        """, fd, args=(key,))
        waiters.append(w)
        with KeyedMutex(fd) as probe:
            wait_until(lambda: probe.statistics().waiters == i + 1)
    c.kill()
    assert [w.line() for w in waiters] == ["abandoned", "ok", "ok"]  # earliest gets it whatever its key
    for w in waiters:
        w.finish()


def test_abandon_session_from_the_broker_side(fd, mutex, children):
    c = children(HOLD_FOREVER, fd, args=(7,))
    assert c.line() == "held"
    assert abandon_session(fd, 8) is False  # not the owner's session
    with pytest.raises(KeyedMutexError):
        abandon_session(fd, 0)  # 0 means "no session": never a broker session
    with pytest.raises(KeyedMutexTimeout):
        mutex.acquire(0, 0.05)  # the owner is alive: nothing is abandoned by itself
    t = threading.Timer(0.1, abandon_session, (fd, 7))
    t.start()
    with pytest.raises(KeyedMutexAbandoned):
        mutex.acquire(0, 10)
    t.join()
    assert mutex.owned
    mutex.release(1)
    assert mutex.statistics().abandoned_count == 1


def test_mutex_outlives_its_creator(children):
    """The creator makes the state, sends it over a socket and exits; the others keep using it."""
    a, b = socket.socketpair()
    c = children("""
        import socket
        from texbridge.keyed_mutex import create_state
        s = socket.socket(fileno=ARGS[0])
        fd = create_state(4)
        m = KeyedMutex(fd)
        m.acquire(4)
        socket.send_fds(s, [b"x"], [fd])
        os.close(fd)
        m.release(5)
        m.close()
        say("bye")
    """, b.fileno())
    b.close()
    _, fds, _, _ = socket.recv_fds(a, 1, 1)
    a.close()
    assert c.line() == "bye"
    c.finish()
    (fd,) = fds
    try:
        with KeyedMutex(fd) as m:
            m.acquire(5, 5)
            m.release(6)
            peer = children("m = KeyedMutex(ARGS[0]); m.acquire(6, 10); m.release(7); say('done')", fd)
            assert peer.line() == "done"
            peer.finish()
            m.acquire(7, 5)
            assert m.statistics().abandoned_count == 0
    finally:
        os.close(fd)


# -- corruption --------------------------------------------------------------------------------------------------------


def test_scribbled_page_is_an_error_not_a_hang(fd, mutex):
    raw = map_fd(fd, KEYED_MUTEX_STATE_SIZE)
    try:
        raw[:] = os.urandom(KEYED_MUTEX_STATE_SIZE)
        t = time.monotonic()
        with pytest.raises(KeyedMutexError, match="corrupted"):
            mutex.acquire(0, 1)
        with pytest.raises(KeyedMutexError):
            mutex.statistics()
        with pytest.raises(KeyedMutexError, match="magic"):
            KeyedMutex(fd)
        assert time.monotonic() - t < 5
    finally:
        raw.close()


def test_a_scribbled_private_length_is_corruption_never_an_overrun(fd, mutex):
    """private_len (offset 64) is peer-writable: past the 2048-byte capacity it must read as a corrupted state,
    never as a length to copy (the copy would run past the page and the stack buffer)."""
    mutex.acquire(0, 0)
    mutex.release(0, private_data=b"ok")
    mutex.acquire(0, 0)
    raw = map_fd(fd, KEYED_MUTEX_STATE_SIZE)
    try:
        raw[64:68] = (PRIVATE_DATA_CAPACITY + 1952).to_bytes(4, "little")
    finally:
        raw.close()
    with pytest.raises(KeyedMutexError, match="corrupt"):
        mutex.private_data


def test_scribble_under_a_sleeping_waiter_wakes_it_with_an_error(fd, mutex):
    """A waiter blocked forever notices a scribbled page at its next 20 ms check instead of sleeping on."""
    with KeyedMutex(fd) as other:
        out = []

        def wait():
            try:
                other.acquire(5)
            except TexbridgeError as e:
                out.append(e)

        t = threading.Thread(target=wait)
        t.start()
        wait_until(lambda: mutex.statistics().waiters == 1)
        raw = map_fd(fd, KEYED_MUTEX_STATE_SIZE)
        try:
            raw[0:4] = b"XXXX"
            t.join(5)
            assert not t.is_alive() and isinstance(out[0], KeyedMutexError)
        finally:
            raw.close()


@settings(max_examples=150)
@given(st.lists(st.tuples(st.integers(0, KEYED_MUTEX_STATE_SIZE - 1), st.binary(min_size=1, max_size=16)),
                min_size=1, max_size=6), st.integers(0, 3))
def test_arbitrary_scribbles_never_crash_or_hang(scribbles, key):
    """A peer writing anything anywhere: every call returns or raises a TexbridgeError within a bounded time."""
    with _owned_mutex_and_its_page() as (m, raw):
        for off, data in scribbles:
            raw[off:off + len(data)] = data[: KEYED_MUTEX_STATE_SIZE - off]
        t = time.monotonic()
        for op in (lambda: m.release(key, private_data=b"p"), lambda: m.acquire(key, 0.02), lambda: m.private_data,
                   m.statistics, m.waiting_keys, lambda: abandon_session(raw, 1), lambda: m.release(key),
                   lambda: m.acquire(key, 0)):
            try:
                op()
            except TexbridgeError:
                pass
        assert time.monotonic() - t < 10  # the meta-lock stuck detector is the longest bound (2 s)


# -- stress ------------------------------------------------------------------------------------------------------------


STRESS_WORKER = """
# shared memory: [owner id, counter, per-worker ops done x N, per-key unfinished workers x K]
N, K, OPS, me = ARGS[2], ARGS[3], ARGS[4], ARGS[5]
m = KeyedMutex(ARGS[0])
shm = map_fd(ARGS[1], 4096)
words = memoryview(shm).cast("Q")
mykey = me % K
rng = random.Random(me)
for i in range(OPS):
    if i < OPS - 1 and rng.random() < 0.1:
        try:
            m.acquire(rng.randrange(K), 0)    # polls of any key mixed in
        except KeyedMutexTimeout:
            continue
    else:
        m.acquire(mykey, 20)                  # a lost wake-up would show as a timeout here
    if words[0] != 0:
        say("TWO OWNERS", words[0], me); sys.exit(3)
    words[0] = me + 1
    words[1] += 1                             # non-atomic on purpose: a lost update means two owners
    words[2 + me] += 1
    if i == OPS - 1:
        words[2 + N + mykey] -= 1
    if words[0] != me + 1:
        say("TWO OWNERS", words[0], me); sys.exit(3)
    words[0] = 0
    live = [k for k in range(K) if words[2 + N + k] > 0]
    m.release(rng.choice(live) if live else 0)  # only keys someone still waits for: progress guaranteed
say("done")
"""


def run_stress(children, n: int, keys: int, ops: int) -> None:
    fd = create_state(0)
    shm_fd = create_sealed("stress", 4096)
    try:
        shm = map_fd(shm_fd, 4096)
        words = memoryview(shm).cast("Q")
        for k in range(keys):
            words[2 + n + k] = sum(1 for w in range(n) if w % keys == k)
        kids = [children(STRESS_WORKER, fd, shm_fd, args=(n, keys, ops, w)) for w in range(n)]
        for k in kids:
            assert k.line(600) == "done"
            k.finish()
        done = list(words[2:2 + n])
        assert sum(done) == words[1] and min(done) > 0.8 * ops  # only failed polls are skipped
        with KeyedMutex(fd) as m:
            s = m.statistics()
            assert s.acquisitions == words[1] and s.waiters == 0 and s.abandoned_count == 0
        del words
        shm.close()
    finally:
        os.close(fd)
        os.close(shm_fd)


def test_stress_8_processes_random_keys(children):
    run_stress(children, n=8, keys=4, ops=4000)


@pytest.mark.slow
def test_stress_8_processes_100k_operations(children):
    run_stress(children, n=8, keys=4, ops=100_000)


# -- through the Session API (real broker) -----------------------------------------------------------------------------


def test_texture_with_keyed_mutex_hands_frames_between_sessions(runtime, children):
    import texbridge

    with texbridge.connect() as s:
        tex = s.create_texture(64, 32, "rgba8", name="km-frames", keyed_mutex=True)
        view = tex.numpy()
        c = children("""
            import texbridge
            with texbridge.connect() as s:
                tex = s.open("km-frames")
                view = tex.numpy()
                for i in range(50):
                    tex.mutex.acquire(1, 10)
                    assert view[0, 0, 0] == i, (view[0, 0, 0], i)
                    view[31, 63, 3] = i
                    tex.mutex.release(0)
                say("done", tex.mutex.statistics().acquisitions)
                del view
        """)
        for i in range(50):
            tex.mutex.acquire(0, 10)
            if i:
                assert view[31, 63, 3] == i - 1  # the consumer's write, seen zero-copy
            view[0, 0, 0] = i
            tex.mutex.release(1)
        assert c.line(30).startswith("done")
        c.finish()
        tex.mutex.acquire(0, 5)
        assert view[31, 63, 3] == 49
        del view


def test_session_disconnect_abandons_through_the_broker(runtime, children):
    """The owner's process lives on, but its session ends: the broker abandons the mutex for the waiters."""
    import texbridge

    with texbridge.connect() as s:
        res = s.create_keyed_mutex(name="km-standalone", initial_key=3)
        c = children("""
            import texbridge
            s = texbridge.connect()
            km = s.open("km-standalone")
            km.mutex.acquire(3, 10)
            say("held")
            s._channel.sock.close()  # drop the connection only: the KeyedMutex handle stays open and owning
            say("disconnected")
            time.sleep(60)
        """)
        assert c.line(30) == "held"
        with pytest.raises(KeyedMutexAbandoned):
            res.mutex.acquire(3, 20)
        assert c.proc.poll() is None  # abandoned by the broker's view, not by death
        assert res.mutex.owned
        res.mutex.release(4)


def test_a_handle_that_found_corruption_fails_fast_afterwards():
    """A meta lock scribbled to a live thread id costs its 2 s stuck detection once, not on every later call."""
    with _owned_mutex_and_its_page() as (m, raw):
        raw[8:12] = (1).to_bytes(4, "little")  # the meta-lock word now names pid 1, which is always alive
        with pytest.raises(KeyedMutexError, match="over 2 s"):
            m.release(1)
        t = time.monotonic()
        for op in (lambda: m.acquire(1, 0), lambda: m.release(1), m.statistics):
            with pytest.raises(KeyedMutexError, match="corrupted earlier"):
                op()
        assert time.monotonic() - t < 0.5


@contextlib.contextmanager
def _owned_mutex_and_its_page():
    """A fresh mutex, acquired with key 0, and a raw mapping of its state page for scribbling on."""
    fd = create_state(0)
    try:
        raw = map_fd(fd, KEYED_MUTEX_STATE_SIZE)
        m = KeyedMutex(fd)
        try:
            m.acquire(0)
            yield m, raw
        finally:
            m.close()
            raw.close()
    finally:
        os.close(fd)
