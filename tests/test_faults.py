"""The fault suite: kill -9 at random points, many rounds, and check that everything else carries on.

Victims are mutex holders (reaped at once, or left as zombies until the damage is repaired), producers and
consumers of a broker, and the broker's fd keepers. After every kill: the keyed mutex recovers (the next acquirer
gets KeyedMutexAbandoned once, then normal operation), no waiter waits past its timeout, the broker answers, its fd
count does not grow, and nothing a live process holds is lost. The default rounds keep the suite to about 15 s on
2 cores; the `slow` variants (TEXBRIDGE_SLOW=1) run about ten times more. Workers are forked (cheap, and a fork's
parent decides when a killed child is reaped, which is how zombies are made); a forked child never returns here.

Figures (kills, rounds, recovery latencies) are printed; run with `-s` to see them.
"""
from __future__ import annotations

import mmap
import os
import random
import signal
import statistics
import subprocess
import sys
import time
import traceback

import pytest

from texbridge._descriptor import KEYED_MUTEX_STATE_SIZE
from texbridge._errors import KeyedMutexAbandoned, KeyedMutexTimeout
from texbridge._sharedmem import map_fd
from texbridge.keyed_mutex import KeyedMutex, create_state

from conftest import wait_until

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


LONG = pytest.mark.skipif(not os.environ.get("TEXBRIDGE_SLOW"), reason="set TEXBRIDGE_SLOW=1 for the long variants")


@pytest.mark.slow
@LONG
def test_killing_mutex_holders_at_random_points_long():
    figures = run_mutex_kills(rounds=1500, workers=6, seed=2)
    report("keyed mutex holders (long)", figures)
    assert figures["meta-lock kills"] > 0  # hundreds of kills do land inside the meta lock


# -- producers, consumers and fd keepers of a broker -----------------------------------------------------------------

# Workers are forked by a zygote: a spawned interpreter that imported texbridge and holds no session and no thread,
# so a fork costs a millisecond and is safe. It answers one line per request on stdout; it reaps only when asked, so
# a killed worker stays a zombie as long as the test wants.
ZYGOTE = r'''
import mmap, os, random, sys, time, traceback
import numpy as np
import texbridge
from texbridge._errors import KeyedMutexAbandoned, KeyedMutexTimeout, NotFound

W = memoryview(mmap.mmap(int(sys.argv[1]), 4096)).cast("q")
ERRORS, STUCK, ABANDONED, CYCLES, OPENS = range(5)
TIMEOUT = 2.0  # every wait is bounded by this; one that overruns it by a second counts as stuck


def value(name):
    pid, i = name[1:].split("-")
    return (int(pid) * 31 + int(i)) % 251


def timed_acquire(mutex):
    """acquire(0) within TIMEOUT; returns 'ok', 'abandoned' or None (timed out)."""
    t0 = time.monotonic()
    try:
        mutex.acquire(0, TIMEOUT)
        how = "ok"
    except KeyedMutexTimeout:
        how = None
    except KeyedMutexAbandoned:
        how = "abandoned"
    if time.monotonic() - t0 > TIMEOUT + 1.0:
        W[STUCK] += 1
    return how


def use_arena(arena, rng):
    """The shared arena: its first word says who is inside; a clean acquire must find nobody there."""
    how = timed_acquire(arena.mutex)
    if how is None:
        return
    words = arena.numpy().view(np.int64)
    if how == "abandoned":
        W[ABANDONED] += 1
    elif words[0]:
        W[ERRORS] += 1
        print(f"arena granted to {os.getpid()} while {words[0]} was inside", file=sys.stderr, flush=True)
    words[0] = os.getpid()
    if rng.random() < 0.3:
        time.sleep(0.002)  # a frame takes a while: some owners die mid-frame
    words[0] = 0
    arena.mutex.release(0)


def producer(rng):
    s = texbridge.connect(app_name="fault-producer")
    arena = s.open("arena")
    held, i = [], 0
    while True:
        if len(held) < 10:
            b = s.create_buffer(4096, keyed_mutex=(i % 3 == 0))
            name = f"p{os.getpid()}-{i}"
            b.numpy()[:] = value(name)
            i += 1
            try:
                s.publish(b.handle, name)  # published only once written
            except NotFound:  # the fd keeper that took it was killed meanwhile: the broker lost it
                b.close()
                continue
            held.append(b)
        elif rng.random() < 0.5:
            held.pop(rng.randrange(len(held))).close()
        use_arena(arena, rng)
        W[CYCLES] += 1


def consumer(rng):
    s = texbridge.connect(app_name="fault-consumer")
    arena = s.open("arena")
    while True:
        names = [n for r in s.list() for n in r.get("names") or () if n.startswith("p")]
        if names:
            name = rng.choice(names)
            try:
                r = s.open(name)
            except NotFound:  # its producer (or the keeper holding it) died meanwhile
                r = None
            if r is not None:
                W[OPENS] += 1
                if not (r.numpy() == value(name)).all():
                    W[ERRORS] += 1
                    print(f"{name}: wrong content", file=sys.stderr, flush=True)
                if r.descriptor.keyed_mutex and timed_acquire(r.mutex) is not None:
                    if rng.random() < 0.3:
                        time.sleep(0.002)
                    r.mutex.release(0)
                r.close()
        use_arena(arena, rng)
        W[CYCLES] += 1


for line in sys.stdin:
    cmd, arg = line.split()
    if cmd == "reap":
        _, status = os.waitpid(int(arg), 0)
        print(status, flush=True)
        continue
    pid = os.fork()
    if pid:
        print(pid, flush=True)
        continue
    os.dup2(2, 1)
    code = 0
    try:
        {"producer": producer, "consumer": consumer}[cmd](random.Random(int(arg)))
    except BaseException:
        W[ERRORS] += 1
        traceback.print_exc()
        code = 3
    finally:
        os._exit(code)
'''
Z_ERRORS, Z_STUCK, Z_ABANDONED, Z_CYCLES, Z_OPENS = range(5)


class Zygote:
    def __init__(self, board_fd: int, errfile) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE, str(board_fd)], pass_fds=[board_fd],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errfile, text=True)

    def ask(self, cmd: str, arg: int) -> int:
        self.proc.stdin.write(f"{cmd} {arg}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the zygote died"
        return int(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(10)


def broker_children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


def run_broker_kills(runtime, tmp_path, monkeypatch, rounds: int, seed: int) -> dict:
    import texbridge
    from texbridge._sharedmem import create_sealed

    monkeypatch.setenv("TEXBRIDGE_BROKER_LOCAL_FDS", "24")  # producers spill into fd keepers, which get killed too
    rng = random.Random(seed)
    board_fd = create_sealed("fault-board", 4096)
    board = map_fd(board_fd, 4096)
    view = memoryview(board)
    words = view.cast("q")
    errfile = open(tmp_path / "workers.err", "w+")
    figures = {"rounds": rounds, "producer kills": 0, "consumer kills": 0, "keeper kills": 0, "zombie kills": 0}
    latencies: list[float] = []
    survivor_abandoned = 0
    zygote = None
    workers: dict[int, str] = {}
    with texbridge.connect(app_name="fault-survivor") as s:
        broker = s.broker_pid
        # What a live process holds, registered first so that it lives in the broker's own fd table.
        arena = s.create_buffer(4096, name="arena", keyed_mutex=True)
        mine = {}
        for i in range(8):
            b = s.create_buffer(4096 * (i + 1), name=f"survivor-{i}")
            b.numpy()[:] = 0x40 + i
            mine[f"survivor-{i}"] = b
        baseline_fds = len(os.listdir(f"/proc/{broker}/fd"))
        try:
            zygote = Zygote(board_fd, errfile)
            for kind in ("producer", "consumer") * 3:
                workers[zygote.ask(kind, rng.randrange(1 << 30))] = kind
            time.sleep(0.3)
            for r in range(rounds):
                time.sleep(rng.uniform(0, 0.03))
                keepers = broker_children(broker)
                if keepers and rng.random() < 0.15:
                    victim, kind = rng.choice(keepers), "keeper"
                else:
                    victim = rng.choice(list(workers))
                    kind = workers.pop(victim)
                os.kill(victim, signal.SIGKILL)
                killed = time.monotonic()
                figures[f"{kind} kills"] += 1
                if kind != "keeper":
                    if rng.random() < 0.5:
                        figures["zombie kills"] += 1  # reaped only after the checks below
                    else:
                        zygote.ask("reap", victim)
                        victim = None
                    workers[zygote.ask(kind, rng.randrange(1 << 30))] = kind
                # The mutex recovers: the survivor gets it (perhaps abandoned, once) within the workers' bound.
                try:
                    arena.mutex.acquire(0, 5)
                except KeyedMutexAbandoned:
                    survivor_abandoned += 1
                    arena.numpy().view("q")[0] = 0
                latencies.append(time.monotonic() - killed)
                arena.mutex.release(0)
                # The broker is alive and answering, and what the survivor holds is all there.
                assert proc_state(broker) not in "ZX"
                for name, b in mine.items():
                    with s.open(name) as again:
                        assert (again.numpy() == b.numpy()[0]).all(), name
                if kind != "keeper" and victim is not None:
                    assert wait_until(lambda: proc_state(victim) == "Z")  # dead, unreaped all along
                    zygote.ask("reap", victim)
                assert words[Z_ERRORS] == 0 and words[Z_STUCK] == 0, _tail(errfile)
            for pid in workers:
                os.kill(pid, signal.SIGKILL)
                zygote.ask("reap", pid)
            workers.clear()
            # Nothing left behind: only the survivor's resources, and the broker's fds back to where they were
            # (plus one socket per keeper, which stay for later spills).
            assert wait_until(lambda: s.stats()["resources"] == 1 + len(mine), timeout=10), s.stats()
            keepers = broker_children(broker)
            assert wait_until(lambda: len(os.listdir(f"/proc/{broker}/fd")) == baseline_fds + len(keepers)), \
                (len(os.listdir(f"/proc/{broker}/fd")), baseline_fds, keepers)
            try:  # then normal operation
                arena.mutex.acquire(0, 5)
            except KeyedMutexAbandoned:
                survivor_abandoned += 1
            arena.mutex.release(0)
            arena.mutex.acquire(0, 1)
            arena.mutex.release(0)
            assert words[Z_ERRORS] == 0 and words[Z_STUCK] == 0, _tail(errfile)
            figures["worker cycles"] = words[Z_CYCLES]
            figures["opens"] = words[Z_OPENS]
            figures["abandoned seen"] = words[Z_ABANDONED] + survivor_abandoned
            figures.update(latency_figures(latencies))
            return figures
        finally:
            for pid in workers:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if zygote is not None:
                zygote.close()
            words.release()
            view.release()
            board.close()
            os.close(board_fd)
            errfile.close()


def _tail(f) -> str:
    f.flush()
    f.seek(0)
    return f.read()[-3000:]


def test_killing_producers_consumers_and_keepers(runtime, tmp_path, monkeypatch):
    figures = run_broker_kills(runtime, tmp_path, monkeypatch, rounds=150, seed=3)
    report("broker clients and keepers", figures)
    assert figures["keeper kills"] > 0 and figures["abandoned seen"] > 0


@pytest.mark.slow
@LONG
def test_killing_producers_consumers_and_keepers_long(runtime, tmp_path, monkeypatch):
    figures = run_broker_kills(runtime, tmp_path, monkeypatch, rounds=600, seed=4)
    report("broker clients and keepers (long)", figures)
