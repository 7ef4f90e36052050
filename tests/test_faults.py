"""The fault suite: kill -9 at random points, many rounds, and check that everything else carries on.

Victims are mutex holders (reaped at once, or left as zombies until the damage is repaired), producers and
consumers of a broker, and the broker's fd keepers. After every kill: the keyed mutex recovers (the next acquirer
gets KeyedMutexAbandoned once, then normal operation), no waiter waits past its timeout, the broker answers, its fd
count does not grow, and nothing a live process holds is lost. The default rounds keep the suite well under a minute
on 2 cores; the `slow` variants run hundreds more. Workers are forked (cheap, and a fork's parent decides when a
killed child is reaped, which is how zombies are made); a forked child never returns into pytest.

Figures (kills, rounds, recovery latencies) are printed; run with `-s` to see them.
"""

from __future__ import annotations

import mmap
import os
import random
import signal
import statistics
import sys
import time
import traceback

import pytest

from texbridge._errors import KeyedMutexAbandoned, KeyedMutexError, KeyedMutexTimeout
from texbridge.keyed_mutex import KeyedMutex, create_state
from texbridge._descriptor import KEYED_MUTEX_STATE_SIZE
from texbridge._memfd import map_fd

EXIT_BROKEN = 3  # a worker saw something that must not happen; it says what on stderr


def forked(fn, *args) -> int:
    """Run fn(*args) in a forked child that never returns here; its exit status tells how it went."""
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        fn(*args)
    except BaseException:
        traceback.print_exc()
        code = EXIT_BROKEN
    finally:
        os._exit(code)


def reap(pid: int, timeout: float = 10.0) -> int:
    """Wait for a child; returns its wait status (fails the test if it does not end within timeout)."""
    end = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > end:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"child {pid} did not end within {timeout} s")
        time.sleep(0.002)


def proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def report(title: str, figures: dict) -> None:
    print(f"\n[faults] {title}: " + ", ".join(f"{k} {v}" for k, v in figures.items()), file=sys.stderr)


def latency_figures(lat: list[float]) -> dict:
    if not lat:
        return {}
    lat = sorted(lat)
    return {"recovery median ms": round(statistics.median(lat) * 1e3, 2),
            "p95 ms": round(lat[int(0.95 * (len(lat) - 1))] * 1e3, 2), "max ms": round(lat[-1] * 1e3, 2)}


# -- keyed mutex holders ---------------------------------------------------------------------------------------------

# Shared words (int64) of the mutex workers' scoreboard, all written under the keyed mutex except STOP.
STOP, OWNER, COUNTER, LAST_NS, ABANDONED_SEEN = range(5)
WAIT_SLICE = 0.5  # workers wait in slices so they notice STOP; one slice must never overrun its timeout


def mutex_worker(fd: int, board: mmap.mmap, group: int) -> None:
    """Ping-pong with the other group: acquire key `group`, work, release key 1 - group. Dies when told (SIGKILL)."""
    words = memoryview(board).cast("q")
    m = KeyedMutex(fd)
    rng = random.Random()
    key = group
    while not words[STOP]:
        t0 = time.monotonic()
        try:
            m.acquire(key, WAIT_SLICE)
            abandoned = False
        except KeyedMutexTimeout:
            waited = time.monotonic() - t0
            assert WAIT_SLICE <= waited < WAIT_SLICE + 2.0, f"a {WAIT_SLICE} s wait took {waited:.3f} s"
            continue
        except KeyedMutexAbandoned:
            abandoned = True
        # The critical section. A non-abandoned acquire must find it clean: else two processes owned it at once.
        if words[OWNER] and not abandoned:
            raise AssertionError(f"mutex granted while pid {words[OWNER]} was inside")
        words[OWNER] = os.getpid()
        words[ABANDONED_SEEN] += abandoned
        words[COUNTER] += 1
        words[LAST_NS] = time.monotonic_ns()
        if rng.random() < 0.2:
            time.sleep(0.001)  # a frame takes a while to write: owners die mid-frame too
        words[OWNER] = 0
        m.release(1 - key)
    m.close()


def run_mutex_kills(rounds: int, workers: int, seed: int) -> dict:
    """Kill a random mutex worker `rounds` times at random moments; replace it. Returns the figures."""
    rng = random.Random(seed)
    fd = create_state(0)
    raw = map_fd(fd, KEYED_MUTEX_STATE_SIZE)
    state = memoryview(raw)
    board = mmap.mmap(-1, 4096)
    words = memoryview(board).cast("q")
    procs = {w: forked(mutex_worker, fd, board, w % 2) for w in range(workers)}
    zombies: list[int] = []
    figures = {"rounds": rounds, "kills": 0, "zombie kills": 0, "owner kills": 0, "grant-pending kills": 0,
               "meta-lock kills": 0}
    latencies: list[float] = []
    try:
        for r in range(rounds):
            time.sleep(rng.uniform(0, 0.01))
            w = rng.randrange(workers)
            if rng.random() < 0.3:  # aim inside the internal meta lock: kill whichever worker holds it now
                by_pid = {pid: i for i, pid in procs.items()}
                end = time.monotonic() + 0.05
                while time.monotonic() < end:
                    holder = int.from_bytes(state[8:12], "little")  # the holder's tid: a worker's main thread
                    if holder in by_pid:
                        w = by_pid[holder]
                        break
            victim = procs[w]
            os.kill(victim, signal.SIGKILL)
            killed = time.monotonic_ns()
            while proc_state(victim) not in "ZX":  # dead (the kernel took it down), not yet reaped
                time.sleep(0.0005)
            figures["kills"] += 1
            meta = int.from_bytes(state[8:12], "little")
            owner_locked = int.from_bytes(state[16:20], "little")
            owner = int.from_bytes(state[32:36], "little")
            figures["meta-lock kills"] += meta == victim
            if owner_locked and owner == victim:  # granted but not yet awake: it never touched the data
                slot = int.from_bytes(state[44:48], "little")
                pending = slot and int.from_bytes(state[92 + 40 * slot:96 + 40 * slot], "little") in (2, 3)
                figures["grant-pending kills" if pending else "owner kills"] += 1
            zombie = rng.random() < 0.5
            if zombie:
                figures["zombie kills"] += 1
                zombies.append(victim)  # reaped only after the mutex has moved on without it
            else:
                status = reap(victim)
                assert os.WIFSIGNALED(status), f"worker {victim} ended on its own: {status:#x}"
            procs[w] = forked(mutex_worker, fd, board, w % 2)
            # Recovery: someone acquires the mutex after the kill, within a generous bound (not a speed test).
            deadline = time.monotonic() + 5
            while words[LAST_NS] <= killed:
                assert time.monotonic() < deadline, f"round {r}: no acquire within 5 s of killing {victim}"
                time.sleep(0.0002)
            latencies.append((words[LAST_NS] - killed) / 1e9)
            for z in zombies:
                assert proc_state(z) == "Z"
                status = reap(z)
                assert os.WIFSIGNALED(status), f"worker {z} ended on its own: {status:#x}"
            zombies.clear()
        words[STOP] = 1
        for w, pid in procs.items():
            status = reap(pid)
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"worker {pid} failed ({status:#x})"
        procs.clear()
        with KeyedMutex(fd) as m:
            s = m.statistics()
            assert s.waiters == 0 and not s.locked
            # every owner killed mid-frame abandoned it once (a classification can miss an owner whose death a
            # waiter handled before it was read, never invent one); a victim granted it but not yet awake did not
            assert figures["owner kills"] <= s.abandoned_count <= figures["kills"] - figures["grant-pending kills"]
            assert words[ABANDONED_SEEN] <= s.abandoned_count
            try:
                m.acquire(0, 0)
            except KeyedMutexAbandoned:  # the last victim's abandonment, if nobody took it: once
                pass
            except KeyedMutexTimeout:
                m.acquire(1, 0)
            m.release(0)
            for _ in range(3):  # then normal operation
                m.acquire(0, 1)
                m.release(0)
            s = m.statistics()
        figures["abandoned"] = s.abandoned_count
        figures["meta steals"] = s.meta_steals
        figures["acquisitions"] = s.acquisitions
        figures.update(latency_figures(latencies))
        return figures
    finally:
        for pid in list(procs.values()) + zombies:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        del words, state
        board.close()
        raw.close()
        os.close(fd)


def test_killing_mutex_holders_at_random_points():
    figures = run_mutex_kills(rounds=150, workers=4, seed=1)
    report("keyed mutex holders", figures)
    assert figures["owner kills"] > 0 and figures["abandoned"] > 0  # the suite did hit owners


@pytest.mark.slow
def test_killing_mutex_holders_at_random_points_long():
    figures = run_mutex_kills(rounds=1500, workers=6, seed=2)
    report("keyed mutex holders (long)", figures)
    assert figures["meta-lock kills"] > 0  # hundreds of kills do land inside the meta lock
