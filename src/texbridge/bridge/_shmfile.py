"""The shared-memory-file transport (the VM path): one file both ends map, QEMU's ivshmem device in between.

The host maps `/dev/shm/texbridge-<ns>` (or any path); QEMU's `memory-backend-file,share=on` + `ivshmem-plain`
puts the same bytes in a guest as PCI BAR2, which the guest maps through sysfs. The serving end creates and
formats the file (a new session id each time); the joining end waits for a live server and announces itself. Layout
and the message ring: `_shmlayout.py`. Streams are `senders.ring` control pages over slots in the file, so the
seqlock, pin and newest-frame-wins rules are the memory ring's, tested once.

Trust nothing: the peer (a guest is anything) can write any byte at any time. We never read back a value we wrote
ourselves (head, slot offsets: kept locally); every word the peer writes is copied out once, checked, then used;
a bad one ends the session with BridgePeerError. Polling only: there is no interrupt across ivshmem-plain.
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import mmap
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np

from .. import _synccore as _core
from .._errors import InvalidArgument
from ..senders.ring import (_CLOSED, _FMT, _GEN, _HANDLES, _HEIGHT, _HSEQ, _LATEST, _NSLOTS, _SLOT_BITS, _SLOT_FRAME,
                            _SLOT_MASK, _WIDTH, CONTROL_SIZE, MAX_SLOTS, ControlWords, RingReader, RingWriter, Stale,
                            _format_word)
from . import _shmlayout as L
from ._link import (HEARTBEAT_S, MAX_DAMAGE, MAX_STREAMS, MAX_USER_DATA, PEER_TIMEOUT_S, BridgeError,
                    BridgePeerError, FrameMeta, LinkStats, StreamFormat)

log = logging.getLogger("texbridge.bridge.shm")
T = TypeVar("T")
SERVE, JOIN = 0, 1
BEAT_S = HEARTBEAT_S / 2.5  # our beat: well inside the 250 ms promise even when the GIL is busy
_WORDS = CONTROL_SIZE // 8
_U64 = (1 << 64) - 1
_CLOSED_HERE = "closed by this end"
_BAD = object()  # a copy callback's marker: the slot's meta was invalid (judged only once the read is untorn)


_tight = threading.local()


def _tight_timers() -> None:
    """Ask the kernel for 1 us timer slack on this (polling) thread: the default 50 us would be added to every short
    sleep, i.e. to the latency. Once per thread; harmless where prctl is unavailable."""
    if getattr(_tight, "done", False):
        return
    _tight.done = True
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(29, 1000, 0, 0, 0)  # PR_SET_TIMERSLACK, in ns
    except (OSError, AttributeError):
        pass


class _Poller:
    """Adaptive polling (no interrupt crosses a VM): spin briefly, then sleep in steps that grow to a cap:
    `active_sleep` while events came within the last `idle_after` seconds (a stream is flowing: ~half of it is the
    added latency), `idle_sleep` once quiet (an idle bridge costs little; the first frame after a pause waits at most
    that long).

    With a `bell` (the peer's doorbell word: it bumps it and futex-wakes it at every message, committed frame and
    heartbeat) the whole wait is one GIL-free call that spins, then sleeps on the bell's futex and looks at the word
    every step: a peer on this kernel (two namespaces, a container, a host-side pair) wakes us at once, a peer across
    a VM is seen within a step. Once a wake has reached us (`wakes_reach`, per link) an idle wait stops looking on
    its own: the peer's wakes come (and the caller's timeout bounds what a peer that rings without waking would cost
    itself); while frames flow the looks go on, as they keep the CPU out of deep idle states. A peer that has never
    rung (an older or hostile one) is polled the plain way, ready() at every step."""

    def __init__(self, spin_s: float = 50e-6, min_sleep: float = 20e-6, active_sleep: float = 100e-6,
                 idle_sleep: float = 1e-3, idle_after: float = 1.0) -> None:
        self.spin_s, self.min_sleep, self.active_sleep, self.idle_sleep = spin_s, min_sleep, active_sleep, idle_sleep
        self.idle_after = idle_after
        self._last_event = 0.0
        self.wakes_reach = False  # a futex wake from the peer ended one of our sleeps (reset for each link)

    def until(self, ready: Callable[[], bool], timeout: float, bell: np.ndarray | None = None,
              spin: float = 0.0) -> bool:
        """True once ready() is, False after `timeout`. bell: the peer's doorbell word as 8 uint8 bytes. spin: spin
        this long rather than `spin_s` (a frame is due: the caller knows the stream's cadence)."""
        start = time.monotonic()
        word = bell.view(np.uint64) if bell is not None else None
        seen = int(word[0]) if word is not None else 0  # read before ready(): a ring after it is not lost
        if ready():
            self._last_event = start
            return True
        deadline = start + max(timeout, 0.0)
        spin_s = max(self.spin_s if start - self._last_event < self.idle_after else 0.0, spin)  # idle: no spin
        if bell is not None and seen:  # the peer rings: wait on its bell alone, GIL-free
            _tight_timers()  # the look-again steps are futex timeouts: 50 us of default slack would stretch them
            while True:
                now = time.monotonic()
                if now >= deadline:
                    return ready()
                # while frames flow, look every active_sleep even when the peer's wakes reach us: a thread woken
                # every 100 us keeps its CPU out of deep idle (a futex wake into deep idle, or into a halted vCPU,
                # costs ~30-100 us more: measured); once idle, sleep until woken (or look every idle_sleep)
                idle = now - self._last_event >= self.idle_after
                cap = self.active_sleep if not idle else 0.0 if self.wakes_reach else self.idle_sleep
                got = _core.wait_word(bell, 0, seen & 0xFFFFFFFF, deadline - now, spin_s, cap)
                if got == 2:
                    self.wakes_reach = True
                if not got and int(word[0]) == seen:
                    return ready()  # the timeout, the bell silent
                seen = int(word[0])
                if ready():
                    self._last_event = time.monotonic()
                    return True
                spin_s = 0.0  # a ring for something not ours to see (a heartbeat): back to sleep
        spin_end = start + spin_s
        while time.monotonic() < spin_end:
            if ready():
                self._last_event = time.monotonic()
                return True
        cap = self.active_sleep if start - self._last_event < self.idle_after else self.idle_sleep
        _tight_timers()
        step = self.min_sleep
        while True:
            now = time.monotonic()
            if now >= deadline:
                return ready()
            time.sleep(min(step, deadline - now))
            if ready():
                self._last_event = time.monotonic()
                return True
            step = min(step * 2, cap)


class _Mapping:
    """The whole shared region as one uint8 array (a file or device we mmap, or a caller's buffer). Views of it keep
    it alive: nothing is unmapped while a view exists, so a late reader never touches unmapped memory."""

    def __init__(self, mem: np.ndarray, fd: int = -1) -> None:
        self.mem = mem
        self.fd = fd
        self.size = mem.nbytes

    @classmethod
    def of_buffer(cls, buffer: Any) -> "_Mapping":
        mem = buffer if isinstance(buffer, np.ndarray) else np.frombuffer(buffer, np.uint8)
        if mem.dtype != np.uint8 or mem.ndim != 1 or not mem.flags.writeable or not mem.flags.c_contiguous:
            raise InvalidArgument("a shared buffer is a writable contiguous 1-D uint8 buffer")
        return cls(mem)

    @classmethod
    def of_fd(cls, fd: int, size: int) -> "_Mapping":
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        return cls(np.frombuffer(mm, np.uint8), fd)

    def u64(self, offset: int, words: int) -> np.ndarray:
        return self.mem[offset:offset + words * 8].view(np.uint64)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class ShmEndpoint:
    """One end of a shared-file bridge. role="serve": create (or grow) and format the file, take its lock, wait for
    a joiner; role="join": map a path (a host file, or the guest's ivshmem BAR: `find_ivshmem()`), wait for a live
    server and join its session. A buffer (bytearray, NumPy array) instead of a path works for tests.

    size: bytes the server makes the file (at least; an existing bigger file is used whole, never shrunk, as a VM may
    map it). max_frame: (w, h) of the largest rgba8 stream this end must be able to write: checked at once, so a file
    too small is a clear error naming the size needed rather than a failure at the first big frame."""

    def __init__(self, target: str | os.PathLike[str] | Any, role: str = "serve", *, size: int | None = None,
                 label: str | None = None, slots: int = L.DEFAULT_SLOTS, max_streams: int = MAX_STREAMS,
                 max_frame: tuple[int, int] | None = None, mode: int = 0o600, poller: _Poller | None = None) -> None:
        if role not in ("serve", "join"):
            raise InvalidArgument(f"role is 'serve' or 'join', not {role!r}")
        if not L.MIN_SLOTS <= slots <= MAX_SLOTS:
            raise InvalidArgument(f"slots per stream: {L.MIN_SLOTS}..{MAX_SLOTS}, got {slots}")
        if not 1 <= max_streams <= MAX_STREAMS:
            raise InvalidArgument(f"max_streams: 1..{MAX_STREAMS}, got {max_streams}")
        self.side = SERVE if role == "serve" else JOIN
        self.label = (label or socket.gethostname())[:L.LABEL_MAX]
        self.slots, self.max_streams, self.mode = slots, max_streams, mode
        self.poller = poller or _Poller()
        self._size_wanted = size
        self._max_frame = max_frame
        self._path: Path | None = None
        self._buffer: Any = None
        if isinstance(target, (str, os.PathLike)):
            self._path = Path(target)
        else:
            self._buffer = target
        self._map: _Mapping | None = None
        self._layout: L.Layout | None = None
        self._session = 0
        self._fresh = False  # server: the current session has not been given to a link yet
        self._link: ShmLink | None = None
        self._lock = threading.Lock()
        self._heart: threading.Thread | None = None
        self._stop = threading.Event()
        self._seen_beat: tuple[int, int] | None = None  # join: (session, server beat) last seen
        self._closed = False
        self.last_problem = ""  # why the last establish() found no peer (for logs and status)

    def describe(self) -> str:
        where = str(self._path) if self._path else f"buffer of {self._buffer_size()} bytes"
        return f"shm {'serve' if self.side == SERVE else 'join'} {where}"

    def _buffer_size(self) -> int:
        return np.frombuffer(self._buffer, np.uint8).nbytes if self._buffer is not None else 0

    # -- mapping ---------------------------------------------------------------------------------------------------
    def _open_serve(self) -> None:
        if self._buffer is not None:
            m = _Mapping.of_buffer(self._buffer)
        else:
            assert self._path is not None
            want = self._size_wanted
            if want and want & (want - 1):
                lo = 1 << (want.bit_length() - 1)
                raise BridgeError(f"{self._path}: {want} bytes is not a power of two, and QEMU aborts on an ivshmem "
                                  f"device of such a size; use {lo >> 20 or lo} or {(lo << 1) >> 20 or lo << 1} MiB")
            # The lock has its own open file: mmap keeps a dup of the fd it maps, which would keep a lock taken on
            # that fd's file description for as long as any view of the mapping lives.
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, self.mode)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise BridgeError(f"another bridge already serves {self._path}") from None
                have = os.fstat(fd).st_size
                want = self._size_wanted or have or L.MIN_SIZE
                if have < want:
                    try:
                        os.ftruncate(fd, want)  # grow only: a VM or a joiner may map the old size
                    except OSError as e:
                        raise BridgeError(f"cannot size {self._path} to {want} bytes: {e.strerror}") from None
                mfd = os.open(self._path, os.O_RDWR | os.O_CLOEXEC)
                try:
                    m = _Mapping(_Mapping.of_fd(mfd, max(have, want)).mem, fd)
                finally:
                    os.close(mfd)
            except BaseException:
                os.close(fd)
                raise
        try:
            self._check_size(m.size)
        except BridgeError:
            m.close()  # (and the lock with it)
            raise
        self._map, self._layout = m, L.Layout.for_size(m.size)

    def _check_size(self, size: int) -> None:
        from ._ivshmem import size_for

        where = self._path or "the buffer"
        if size < L.MIN_SIZE:
            raise BridgeError(f"{where} is {size} bytes: a bridge file needs at least {L.MIN_SIZE} bytes "
                              f"({-(-L.MIN_SIZE // 2**20)} MiB)")
        if size > L.MAX_SIZE:
            raise BridgeError(f"{where} is {size} bytes, more than the {L.MAX_SIZE} a bridge file may have")
        if self._max_frame:
            w, h = self._max_frame
            need = L.stream_bytes(StreamFormat(w, h, "rgba8"), self.slots)
            if L.Layout.for_size(size).area_size < need:
                raise BridgeError(f"{where} is {size} bytes: too small for {w}x{h} frames ({self.slots} slots "
                                  f"need {need} bytes per direction); a file of {size_for(w, h, slots=self.slots)} "
                                  f"bytes ({size_for(w, h, slots=self.slots) >> 20} MiB) holds them (--size)")

    def _open_join(self) -> bool:
        """Map the path if it is there (join may start first: no file yet is not an error)."""
        if self._buffer is not None:
            if self._map is None:
                self._map = _Mapping.of_buffer(self._buffer)
            return True
        assert self._path is not None
        if self._map is not None:
            try:
                st, now = os.fstat(self._map.fd), os.stat(self._path)
                if st.st_size == self._map.size and (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):
                    return True
            except OSError:
                pass
            # the server grew the file, or it was removed and made anew: map it again (views of the old mapping,
            # held by a dead link, stay valid)
            self._map.close()
            self._map = None
        try:
            fd = os.open(self._path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            self.last_problem = f"{self._path} does not exist yet"
            return False
        except OSError as e:
            raise BridgeError(f"cannot open {self._path}: {e.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if size < L.MIN_SIZE:
                os.close(fd)
                self.last_problem = f"{self._path} is {size} bytes (not formatted yet, or too small)"
                return False
            self._map = _Mapping.of_fd(fd, min(size, L.MAX_SIZE))
        except OSError as e:
            os.close(fd)
            raise BridgeError(f"cannot map {self._path}: {e.strerror}") from None
        return True

    # -- the heartbeat ----------------------------------------------------------------------------------------------
    def _start_heart(self) -> None:
        if self._heart is None:
            self._heart = threading.Thread(target=self._beat_loop, name="texbridge-shm-heart", daemon=True)
            self._heart.start()

    def _beat_loop(self) -> None:
        while not self._stop.wait(BEAT_S):
            try:
                with self._lock:
                    m = self._map
                    if m is None:
                        continue
                    page = m.u64(L.Layout.side(self.side), 1)
                    page[0] = (int(page[0]) + 1) & _U64  # the peer may have left any value in it
                    link = self._link
                if link is not None:
                    link._watch(time.monotonic())
                    if not link._dead:
                        link._ring_bell()  # the peer learns at once whether our wakes reach it
            except Exception:  # never let the heart stop silently: the peer would declare us dead
                log.exception("shm heartbeat")

    # -- establishing -------------------------------------------------------------------------------------------------
    def establish(self, timeout: float) -> "ShmLink | None":
        if self._closed:
            raise BridgeError("the endpoint is closed")
        deadline = time.monotonic() + timeout
        if self.side == SERVE:
            with self._lock:
                if self._map is None:
                    self._open_serve()
                if not self._fresh:
                    self._init()
            self._start_heart()
            while True:
                link = self._accept()
                if link is not None or time.monotonic() >= deadline:
                    return link
                time.sleep(min(0.005, max(0.0, deadline - time.monotonic())))
        self._start_heart()
        while True:
            with self._lock:
                link = self._try_join()
            if link is not None or time.monotonic() >= deadline:
                return link
            time.sleep(min(0.01, max(0.0, deadline - time.monotonic())))

    def _init(self) -> None:
        """Format the file for a new session: invalidate (magic 0), clear both sides' pages, rings and tables (frame
        areas need no clearing: nothing points into them), then header and our page, the magic last."""
        m, lay = self._map, self._layout
        assert m is not None and lay is not None
        hdr = m.u64(0, 4)
        hdr[L.H_MAGIC] = 0
        m.mem[L.PAGE:L.FRAMES] = 0
        self._session = secrets.randbits(63) | 1
        hdr[L.H_VERSION], hdr[L.H_SIZE], hdr[L.H_SESSION] = L.VERSION, lay.size, self._session
        page = m.u64(lay.side(SERVE), L.PAGE // 8)
        L.write_label(m.mem[lay.side(SERVE):lay.side(SERVE) + L.PAGE], self.label)
        page[L.S_PID] = os.getpid()
        page[L.S_SESSION] = self._session
        hdr[L.H_MAGIC] = L.MAGIC
        self._fresh = True

    def _accept(self) -> "ShmLink | None":
        with self._lock:
            m, lay = self._map, self._layout
            assert m is not None and lay is not None
            jp = m.u64(lay.side(JOIN), L.PAGE // 8)
            if int(jp[L.S_SESSION]) != self._session or int(jp[L.S_CLOSING]):
                self.last_problem = "no peer has joined yet"
                return None
            peer = L.read_label(m.mem[lay.side(JOIN):lay.side(JOIN) + L.PAGE])
            self._fresh = False
            self._link = ShmLink(self, m, lay, SERVE, self._session, peer)
            return self._link

    def _try_join(self) -> "ShmLink | None":
        if not self._open_join():
            return None
        m = self._map
        assert m is not None
        magic, version, session, size = (int(x) for x in m.u64(0, 4))  # one copy, then checked
        if magic != L.MAGIC:
            self.last_problem = "the file is not formatted (no server yet)"
            return None
        if version != L.VERSION:
            self.last_problem = f"the server speaks bridge file version {version}, this end {L.VERSION}"
            return None
        if not L.MIN_SIZE <= size <= m.size:
            self.last_problem = (f"the server formatted {size} bytes, this end maps {m.size}"
                                 + (" (restart the VM with the new size)" if size > m.size else ""))
            return None
        lay = L.Layout.for_size(size)
        sp = m.u64(lay.side(SERVE), L.PAGE // 8)
        jp = m.u64(lay.side(JOIN), L.PAGE // 8)
        beat = int(sp[L.S_BEAT])
        if int(sp[L.S_SESSION]) != session or int(sp[L.S_CLOSING]) or session == 0:
            self.last_problem = "the server is (re)formatting the file"
            return None
        if int(jp[L.S_SESSION]) == session:
            self.last_problem = "the server's session was already joined (waiting for it to notice and reformat)"
            return None
        seen, self._seen_beat = self._seen_beat, (session, beat)
        if seen is None or seen[0] != session or seen[1] == beat:
            self.last_problem = "waiting for the server's heartbeat"
            return None  # a server is alive only once its beat moves (not a stale file)
        jpage = m.mem[lay.side(JOIN):lay.side(JOIN) + L.PAGE]
        jp[L.S_CLOSING] = 0
        jp[L.S_HEAD] = 0
        jp[L.S_TAIL] = 0
        jp[L.S_PID] = os.getpid()
        L.write_label(jpage, self.label)
        jp[L.S_SESSION] = session
        if int(m.u64(0, 4)[L.H_SESSION]) != session:
            return None
        self._layout = lay
        self._session = session
        peer = L.read_label(m.mem[lay.side(SERVE):lay.side(SERVE) + L.PAGE])
        self._link = ShmLink(self, m, lay, JOIN, session, peer)
        return self._link

    def _link_closed(self, link: "ShmLink") -> None:
        with self._lock:
            if self._link is link:
                self._link = None

    def close(self) -> None:
        """Stop beating, tell a peer we left (closing flag), release the file lock. The file stays (remove())."""
        if self._closed:
            return
        self._closed = True
        link = self._link
        if link is not None:
            link.close()
        self._stop.set()
        if self._heart is not None:
            self._heart.join(timeout=2)
        with self._lock:
            if self._map is not None:
                if self._layout is not None:
                    self._map.u64(self._layout.side(self.side), L.PAGE // 8)[L.S_CLOSING] = 1
                self._map.close()  # the fd (and its lock); the mapping lives as long as views of it


class ShmLink:
    """An established shared-file link (see Link in _link.py). Our writers' streams live in our table and frame
    area; readers read the peer's. A background heartbeat thread (the endpoint's) checks the peer every beat."""

    def __init__(self, ep: ShmEndpoint, m: _Mapping, lay: L.Layout, side: int, session: int, peer_label: str) -> None:
        self._ep, self._m, self._lay, self._side, self._session = ep, m, lay, side, session
        peer = 1 - side
        mem = m.mem
        self._own = m.u64(lay.side(side), L.PAGE // 8)
        self._peer = m.u64(lay.side(peer), L.PAGE // 8)
        self._hdr = m.u64(0, 4)
        self._out = L.RingProducer(mem[lay.ring(side):lay.ring(side) + L.RING_SIZE], self._own[L.S_HEAD:L.S_HEAD + 1],
                                   self._peer[L.S_TAIL:L.S_TAIL + 1])
        self._in = L.RingConsumer(mem[lay.ring(peer):lay.ring(peer) + L.RING_SIZE], self._peer[L.S_HEAD:L.S_HEAD + 1],
                                  self._own[L.S_TAIL:L.S_TAIL + 1])
        self._own_table = mem[lay.table(side):lay.table(side) + L.TABLE_SIZE]
        self._peer_table = mem[lay.table(peer):lay.table(peer) + L.TABLE_SIZE]
        words = self._peer_table.view(np.uint64).reshape(MAX_STREAMS, _WORDS)
        self._peer_latest, self._peer_writing = words[:, _LATEST], words[:, L.C_WRITING]
        self._seen_latest, self._seen_writing = self._peer_latest.copy(), self._peer_writing.copy()
        bell = L.S_BELL * 8
        self._own_bell = mem[lay.side(side) + bell:lay.side(side) + bell + 8]
        self._peer_bell = mem[lay.side(peer) + bell:lay.side(peer) + bell + 8]
        self._bell_count = itertools.count(1)  # ours: never read back from the file
        self._own_area = mem[lay.area(side):lay.area(side) + lay.area_size]
        self._peer_area = mem[lay.area(peer):lay.area(peer) + lay.area_size]
        self._writers: dict[int, _ShmWriter] = {}
        self._readers: set[_ShmReader] = set()
        self._allocs: dict[int, tuple[int, int]] = {}  # stream -> (offset, size) in our area
        self._dead = ""
        self._peer_error = False
        self._beat = (int(self._peer[L.S_BEAT]), time.monotonic())
        self._closed = False
        # The engine calls in from several threads (its export threads send and open writers): the producer ring
        # and the stream bookkeeping each take a lock; writers and readers themselves are used by one thread each.
        self._send_lock, self._recv_lock, self._streams_lock = threading.Lock(), threading.Lock(), threading.RLock()
        self._stats = LinkStats(peer_label=peer_label, alive=True)
        ep.poller.wakes_reach = False  # learnt again for this peer
        log.info("shm link up: session %x, %s side, peer %r", session, "serve" if side == SERVE else "join",
                 peer_label)

    # -- liveness ------------------------------------------------------------------------------------------------
    @property
    def peer_label(self) -> str:
        return self._stats.peer_label

    @property
    def alive(self) -> bool:
        if not self._dead:
            self._watch(time.monotonic())
        return not self._dead

    def _watch(self, now: float) -> None:
        """Is the peer still there? (heartbeat thread, and `alive`). Copies each word once, then judges."""
        if self._dead:
            return
        magic, session = int(self._hdr[L.H_MAGIC]), int(self._hdr[L.H_SESSION])
        peer_session, closing, beat = (int(self._peer[L.S_SESSION]), int(self._peer[L.S_CLOSING]),
                                       int(self._peer[L.S_BEAT]))
        if magic != L.MAGIC or session != self._session:
            if self._side == JOIN:
                self._die("the server reformatted the file (new session)")
            else:
                self._die("the peer overwrote the file header", peer=True)
        elif peer_session != self._session:
            self._die("the peer left the session")
        elif closing:
            self._die("the peer closed the link")  # (warning: on a bridge, the other side going away is news)
        elif beat != self._beat[0]:
            self._beat = (beat, now)
        elif now - self._beat[1] > PEER_TIMEOUT_S:
            self._die(f"the peer's heartbeat stopped ({now - self._beat[1]:.2f} s without a beat)")

    def _die(self, why: str, peer: bool = False) -> None:
        if self._dead:
            return
        self._dead, self._peer_error = why, peer
        _core.wake_word(self._peer_bell, 0)  # our own engine, asleep on the peer's bell: the link is dead now
        self._stats.alive = False
        self._stats.errors = (self._stats.errors + [why])[-8:]
        level = logging.ERROR if peer else logging.DEBUG if why == _CLOSED_HERE else logging.WARNING
        log.log(level, "shm link to %r down: %s", self._stats.peer_label, why)

    def _fail(self, e: BridgePeerError) -> BridgePeerError:
        self._die(f"peer protocol error: {e}", peer=True)
        return e

    def _check(self) -> None:
        if self._dead:
            raise (BridgePeerError if self._peer_error else BridgeError)(f"shm link down: {self._dead}")

    def _ring_bell(self) -> None:
        """Bump our doorbell and wake a peer sleeping on it (one on this kernel; across a VM it sees the bump when it
        next looks). Any thread: a lost bump between two threads still changes the word."""
        self._own_bell.view(np.uint64)[0] = next(self._bell_count)
        _core.wake_word(self._own_bell, 0)

    # -- control messages -------------------------------------------------------------------------------------------
    def send(self, message: dict[str, Any]) -> None:
        self._check()
        data = L.encode(message)
        try:
            with self._send_lock:
                if not self._out.try_push(data):
                    if not self._ep.poller.until(lambda: self._dead != "" or self._out.try_push(data),
                                                 PEER_TIMEOUT_S):
                        raise BridgePeerError(f"the peer has not read its messages for {PEER_TIMEOUT_S} s "
                                              "(ring full)")
                    self._check()
                self._ring_bell()
        except BridgePeerError as e:
            raise self._fail(e) from None

    def receive(self) -> list[dict[str, Any]]:
        self._check()
        try:
            with self._recv_lock:
                return [L.decode(raw) for raw in self._in.pop_all()]
        except BridgePeerError as e:
            raise self._fail(e) from None

    def wait(self, timeout: float, spin: float = 0.0) -> None:
        """Return once a message may be there, a peer stream committed a frame or began one (read_into can follow
        it), the link died, or `timeout`; spin up to `spin` seconds first (GIL released, on the doorbell)."""
        def ready() -> bool:
            return (self._in.pending() or self._dead != ""
                    or not np.array_equal(self._peer_latest, self._seen_latest)
                    or not np.array_equal(self._peer_writing, self._seen_writing))

        self._ep.poller.until(ready, timeout, self._peer_bell, spin)
        self._seen_latest[:] = self._peer_latest
        self._seen_writing[:] = self._peer_writing

    # -- streams ----------------------------------------------------------------------------------------------------
    def open_writer(self, stream: int, fmt: StreamFormat) -> "_ShmWriter":
        self._check()
        if not isinstance(stream, int) or not 0 <= stream < 2**32:
            raise InvalidArgument(f"a stream number is an int in 0..2**32-1, got {stream!r}")
        if not isinstance(fmt, StreamFormat):
            raise InvalidArgument(f"fmt is a StreamFormat, got {type(fmt).__name__}")
        with self._streams_lock:
            return self._open_writer(stream, fmt)

    def _open_writer(self, stream: int, fmt: StreamFormat) -> "_ShmWriter":
        old = self._writers.get(stream)
        if old is not None:
            entry, frame = old._entry, old._ring.frame
            old._release(keep_entry=True)
        else:
            used = {w._entry for w in self._writers.values()}
            free = [i for i in range(MAX_STREAMS) if i not in used]
            if not free:
                raise BridgeError(f"this end already writes {MAX_STREAMS} streams over the link")
            entry, frame = free[0], 0
        off = self._allocate(stream, L.stream_bytes(fmt, self._ep.slots), fmt)
        w = _ShmWriter(self, stream, entry, fmt, off, frame)
        self._writers[stream] = w
        return w

    def _allocate(self, stream: int, need: int, fmt: StreamFormat) -> int:
        """First fit in our frame area (we own it alone: nothing here is read back from the peer)."""
        from ._ivshmem import size_for

        spans = sorted(self._allocs.values())
        pos = 0
        for off, size in spans + [(self._lay.area_size, 0)]:
            if off - pos >= need:
                self._allocs[stream] = (pos, need)
                return pos
            pos = max(pos, off + size)
        used = sum(s for _, s in spans)
        total = used + need
        file_needed = max(L.size_needed(total), size_for(fmt.width, fmt.height, slots=self._ep.slots))
        raise BridgeError(
            f"the shared file is too small: stream {stream} ({fmt.width}x{fmt.height} {fmt.format}, "
            f"{self._ep.slots} slots) needs {need} bytes of frame area, {self._lay.area_size - used} of "
            f"{self._lay.area_size} are free; a file of at least {file_needed} bytes ({-(-file_needed // 2**20)} MiB) "
            f"holds it with the streams open now (--size)")

    def open_reader(self, stream: int, fmt: StreamFormat) -> "_ShmReader":
        self._check()
        if not isinstance(stream, int) or not 0 <= stream < 2**32:
            raise InvalidArgument(f"a stream number is an int in 0..2**32-1, got {stream!r}")
        with self._streams_lock:
            if len(self._readers) >= self._ep.max_streams * 4:
                raise BridgeError(f"too many readers open on this link ({len(self._readers)})")
            r = _ShmReader(self, stream, fmt)
            self._readers.add(r)
            return r

    def stats(self) -> LinkStats:
        self._stats.alive = not self._dead
        s = self._stats
        return LinkStats(s.peer_label, s.alive, s.frames_out, s.frames_in, s.bytes_out, s.bytes_in, s.drops,
                         list(s.errors))

    def close(self) -> None:
        """Retire our streams, tell the peer (closing flag): it notices at once instead of after PEER_TIMEOUT_S."""
        if self._closed:
            return
        self._closed = True
        with self._streams_lock:
            writers, readers = list(self._writers.values()), list(self._readers)
        for w in writers:
            w.close()
        for r in readers:
            r.close()
        if int(self._own[L.S_SESSION]) == self._session:  # not if the file was reformatted meanwhile
            self._own[L.S_CLOSING] = 1
        self._die(_CLOSED_HERE)
        self._ep._link_closed(self)


class _ShmWriter:
    """One stream we write: a ring control page in our table, `nslots` slots in our frame area."""

    def __init__(self, link: ShmLink, stream: int, entry: int, fmt: StreamFormat, offset: int, frame: int) -> None:
        self._link, self.stream, self._entry, self.fmt = link, stream, entry, fmt
        n = link._ep.slots
        stride = L.slot_stride(fmt)
        self._offsets = [offset + i * stride for i in range(n)]  # ours: never read back from the file
        area = link._own_area
        self._pixels = [area[o + L.META_SIZE:o + L.META_SIZE + fmt.nbytes].reshape(fmt.height, fmt.row_bytes)
                        for o in self._offsets]
        self._meta = [area[o:o + L.META_SIZE] for o in self._offsets]
        self._metau = [m.view(np.uint64) for m in self._meta]
        page = link._own_table[entry * CONTROL_SIZE:(entry + 1) * CONTROL_SIZE]
        self._ctl = ControlWords(page)
        u = self._u = self._ctl.u
        u[_CLOSED] = 0
        u[L.C_WRITING] = 0
        u[_LATEST] = (frame << _SLOT_BITS) | _SLOT_MASK  # parked: no reader copies a slot of the old layout
        self._ring = RingWriter(self._ctl, n, pid=os.getpid())
        self._ring.frame = frame
        self._ring.publish_ring(fmt.width, fmt.height, fmt.format, self._offsets)
        u[L.C_STREAM] = stream + 1
        self._slot = -1
        self._begins = 0
        self._closed = False

    def begin(self) -> np.ndarray:
        self._link._check()
        if self._closed:
            raise BridgeError(f"stream {self.stream} is closed")
        if self._slot >= 0:
            raise InvalidArgument("begin() again before commit() or abort() of the frame begun")
        slot = self._ring.begin()
        self._begins += 1
        self._metau[slot][L.M_PROGRESS] = 0
        self._u[L.C_WRITING] = ((self._begins << _SLOT_BITS) | slot) & _U64
        self._slot = slot
        # the peer may follow the rows as they come (read_into); for a frame too small to follow, the early wake
        # still pays: the peer's CPU is out of idle (and its waiter spinning) by the time the commit lands
        self._link._ring_bell()
        return self._pixels[slot]

    def progress(self, rows: int) -> None:
        """Rows [0, rows) of the frame begun are final: a reader may copy them now (Looking Glass's chunked copy)."""
        if self._slot < 0:
            raise InvalidArgument("progress() outside begin() ... commit()")
        self._metau[self._slot][L.M_PROGRESS] = max(0, min(int(rows), self.fmt.height))

    def commit(self, meta: FrameMeta) -> None:
        if self._slot < 0:
            raise InvalidArgument("commit() without begin()")
        frame = meta.frame
        if not isinstance(frame, int) or not self._ring.frame < frame < 1 << 59:
            raise InvalidArgument(f"frame numbers grow: {frame!r} after {self._ring.frame}")
        damage = meta.damage if len(meta.damage) <= MAX_DAMAGE else ()  # more: the whole frame
        for x, y, w, h in damage:
            if not (0 <= x and 0 <= y and 0 < w and 0 < h and x + w <= self.fmt.width and y + h <= self.fmt.height):
                raise InvalidArgument(f"damage rectangle {(x, y, w, h)} outside {self.fmt.width}x{self.fmt.height}")
        if len(meta.user_data) > MAX_USER_DATA:
            raise InvalidArgument(f"user data is at most {MAX_USER_DATA} bytes, got {len(meta.user_data)}")
        slot = self._slot
        m, mu = self._meta[slot], self._metau[slot]
        mu[L.M_TIMESTAMP] = meta.timestamp_ns & (2**64 - 1)
        if damage:
            m[L.M_DAMAGE:L.M_DAMAGE + 16 * len(damage)].view(np.uint32)[:] = np.array(damage, np.uint32).ravel()
        mu[L.M_NDAMAGE] = len(damage)
        if meta.user_data:
            m[L.M_USER:L.M_USER + len(meta.user_data)] = np.frombuffer(meta.user_data, np.uint8)
        mu[L.M_ULEN] = len(meta.user_data)
        mu[L.M_PROGRESS] = self.fmt.height
        self._ring.frame = frame - 1
        self._ring.commit(slot)
        self._u[L.C_WRITING] = 0
        self._slot = -1
        self._link._ring_bell()
        st = self._link._stats
        st.frames_out += 1
        st.bytes_out += self.fmt.nbytes

    def abort(self) -> None:
        if self._slot >= 0:
            self._ring.abort(self._slot)
            self._u[L.C_WRITING] = 0
            self._slot = -1

    def _release(self, keep_entry: bool) -> None:
        with self._link._streams_lock:
            self.abort()
            self._closed = True
            if not keep_entry:
                self._u[L.C_STREAM] = 0
                self._ring.close()
            self._link._allocs.pop(self.stream, None)
            if self._link._writers.get(self.stream) is self:
                del self._link._writers[self.stream]

    def close(self) -> None:
        if not self._closed:
            self._release(keep_entry=False)


class _ShmReader:
    """One peer stream we read. Finds the peer's table entry for the stream, checks the ring generation (slot count,
    geometry against the agreed format, every slot offset against the peer's frame area) and reads through the
    memory ring's seqlock. A format other than the agreed one reads as nothing (the engine reopens after a resize)."""

    def __init__(self, link: ShmLink, stream: int, fmt: StreamFormat) -> None:
        self._link, self.stream, self.fmt = link, stream, fmt
        self._fmtword = _format_word(fmt.format)
        self._stride = L.slot_stride(fmt)
        self._entry = -1
        self._rr: RingReader | None = None
        self._u: np.ndarray | None = None
        self._gen = -1
        self._n = 0
        self._pixels: list[np.ndarray] = []
        self._meta: list[np.ndarray] = []
        self._last = 0
        self._closed = False

    def _find(self) -> bool:
        ids = self._link._peer_table.view(np.uint64).reshape(MAX_STREAMS, _WORDS)[:, L.C_STREAM]
        hits = np.flatnonzero(ids == self.stream + 1)
        if not len(hits):
            return False
        entry = int(hits[0])
        page = self._link._peer_table[entry * CONTROL_SIZE:(entry + 1) * CONTROL_SIZE]
        rr = RingReader(ControlWords(page))
        if not rr.attach(os.getpid(), lambda pid: True):
            raise BridgePeerError(f"no free reader row in the peer's table entry {entry} (the peer filled them)")
        self._entry, self._rr, self._u, self._gen = entry, rr, rr.u, -1
        return True

    def _drop(self) -> None:
        if self._rr is not None:
            self._rr.detach()
        self._entry, self._rr, self._u, self._gen = -1, None, None, -1

    def _snapshot(self) -> bool:
        """Copy the current generation's table words under the header seqlock, check them, build slot views.
        False: the peer is mid-rebuild or writes another format now (read again later)."""
        u = self._u
        assert u is not None
        h1 = int(u[_HSEQ])
        if h1 & 1:
            return False
        gen, n, width, height, fmtw = (int(u[_GEN]), int(u[_NSLOTS]), int(u[_WIDTH]), int(u[_HEIGHT]), int(u[_FMT]))
        handles = [int(x) for x in u[_HANDLES:_HANDLES + MAX_SLOTS]]
        if int(u[_HSEQ]) != h1:
            return False
        if (width, height, fmtw) != (self.fmt.width, self.fmt.height, self._fmtword):
            return False
        if not L.MIN_SLOTS <= n <= MAX_SLOTS:
            raise BridgePeerError(f"stream {self.stream}: {n} slots (allowed {L.MIN_SLOTS}..{MAX_SLOTS})")
        area = self._link._lay.area_size
        for off in handles[:n]:
            if off % L.PAGE or off + self._stride > area:
                raise BridgePeerError(f"stream {self.stream}: slot at {off}+{self._stride} outside the frame area "
                                      f"of {area} bytes")
        pa = self._link._peer_area
        nb = self.fmt.nbytes
        pixels = []
        for off in handles[:n]:
            v = pa[off + L.META_SIZE:off + L.META_SIZE + nb].reshape(self.fmt.height, self.fmt.row_bytes)
            v.flags.writeable = False
            pixels.append(v)
        self._pixels = pixels
        self._meta = [pa[off:off + L.META_USED] for off in handles[:n]]
        self._gen, self._n = gen, n
        return True

    def _parse_meta(self, slot: int) -> FrameMeta | None:
        """The slot's meta, copied once then checked; None if invalid (judged by the caller once untorn)."""
        raw = self._meta[slot]
        words = raw[:40].view(np.uint64).copy()
        ts, nd, ulen = int(words[L.M_TIMESTAMP]), int(words[L.M_NDAMAGE]), int(words[L.M_ULEN])
        if nd > MAX_DAMAGE or ulen > MAX_USER_DATA:
            return None
        damage: tuple[tuple[int, int, int, int], ...] = ()
        if nd:
            rects = raw[L.M_DAMAGE:L.M_DAMAGE + 16 * nd].view(np.uint32).reshape(nd, 4).tolist()
            W, H = self.fmt.width, self.fmt.height
            for x, y, w, h in rects:
                if not (0 < w and 0 < h and x + w <= W and y + h <= H):
                    return None
            damage = tuple(tuple(r) for r in rects)  # type: ignore[misc]
        user = raw[L.M_USER:L.M_USER + ulen].tobytes() if ulen else b""
        return FrameMeta(0, ts, damage, user)

    def _ready(self) -> bool:
        if self._closed:
            raise BridgeError(f"reader of stream {self.stream} is closed")
        if self._u is not None and int(self._u[L.C_STREAM]) != self.stream + 1:
            self._drop()  # the peer retired the stream (or moved it)
        if self._u is None and not self._find():
            return False
        assert self._u is not None
        if int(self._u[_GEN]) != self._gen:
            return self._snapshot()
        return True

    def read(self, copy: Callable[[np.ndarray, FrameMeta], T], after: int) -> T | None:
        link = self._link
        link._check()
        try:
            if not self._ready():
                return None
            u = self._u
            assert u is not None and self._rr is not None
            if int(u[_LATEST]) >> _SLOT_BITS <= after:
                return None
            def cb(slot: int) -> Any:
                meta = self._parse_meta(slot)
                if meta is None:
                    return _BAD  # judged after the read proved untorn (a torn read is retried, not blamed)
                frame = int(u[_SLOT_FRAME + slot])
                return copy(self._pixels[slot], FrameMeta(frame, meta.timestamp_ns, meta.damage, meta.user_data))

            got = self._rr.read(cb, nslots=self._n, generation=self._gen)
            if got is Stale or got is None:
                return None
            assert not isinstance(got, type)
            if got.data is _BAD:
                raise BridgePeerError(f"stream {self.stream}: invalid frame meta (damage or user data out of range)")
            if got.frame <= after:
                return None
            self._count(got.frame)
            return got.data
        except BridgePeerError as e:
            raise link._fail(e) from None

    def _count(self, frame: int) -> None:
        st = self._link._stats
        st.frames_in += 1
        st.bytes_in += self.fmt.nbytes
        if self._last and frame > self._last + 1:
            st.drops += frame - self._last - 1
        self._last = frame

    def read_into(self, out: np.ndarray, after: int, timeout: float = 0.1, follow: bool = True) -> FrameMeta | None:
        """Copy the newest frame above `after` into `out` ((height, row_bytes) uint8). When none is complete but
        the peer is writing one (and `follow`), copy its rows as the writer marks them final
        (StreamWriter.progress) and finish at its commit, waiting up to `timeout`: the copy overlaps the write
        (Looking Glass's chunked copy). `out` holds nothing meaningful when None is returned (a torn or abandoned
        frame)."""
        if out.shape != (self.fmt.height, self.fmt.row_bytes) or out.dtype != np.uint8:
            raise InvalidArgument(f"read_into wants a ({self.fmt.height}, {self.fmt.row_bytes}) uint8 array, "
                                  f"got {out.dtype} {out.shape}")
        got = self.read(lambda v, m: (np.copyto(out, v), m)[1], after)
        if got is not None or not follow:
            return got
        try:
            return self._follow(out, after, timeout)
        except BridgePeerError as e:
            raise self._link._fail(e) from None

    def _follow(self, out: np.ndarray, after: int, timeout: float) -> FrameMeta | None:
        """The chunked path: pin the slot being written (the writer's `writing` word names it), copy rows up to its
        progress while its sequence stays odd, then the rest once it commits (sequence +1, nothing else)."""
        u, rr = self._u, self._rr
        if u is None or rr is None or int(u[_GEN]) != self._gen:
            return None
        tok = int(u[L.C_WRITING])
        slot = tok & _SLOT_MASK
        if not tok or slot >= self._n:
            return None
        s1 = rr.pin(slot)
        try:
            if not s1 & 1 or int(u[L.C_WRITING]) != tok:
                return None  # committed or moved on meanwhile: the next read() takes it
            mu = self._meta[slot][:40].view(np.uint64)
            src, height = self._pixels[slot], self.fmt.height
            done = 0
            deadline = time.monotonic() + timeout
            while True:
                seq = rr.sequence(slot)
                rows = int(mu[L.M_PROGRESS])
                if rows > height:
                    raise BridgePeerError(f"stream {self.stream}: progress of {rows} rows in a {height}-row frame")
                if rows > done:
                    out[done:rows] = src[done:rows]
                    done = rows
                if seq != s1:
                    break
                if time.monotonic() > deadline:
                    return None  # the writer is slow: read() will find the frame once it is committed
            frame = int(u[_SLOT_FRAME + slot])
            if seq != s1 + 1 or int(u[_GEN]) != self._gen or frame <= after:
                return None  # aborted, overwritten, or not newer
            if done < height:
                out[done:] = src[done:]
            meta = self._parse_meta(slot)
            if rr.sequence(slot) != s1 + 1:
                return None
            if meta is None:
                raise BridgePeerError(f"stream {self.stream}: invalid frame meta (damage or user data out of range)")
            self._count(frame)
            return FrameMeta(frame, meta.timestamp_ns, meta.damage, meta.user_data)
        finally:
            rr.release()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._drop()
            with self._link._streams_lock:
                self._link._readers.discard(self)
