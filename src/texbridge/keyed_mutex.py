"""Keyed mutex: DXGI AcquireSync/ReleaseSync between processes (semantics: docs/keyed-mutex.md).

Two processes take turns on shared memory: the producer acquires key 0, writes, releases with key 1; the consumer
acquires key 1, reads, releases with key 0. The state is one page of a sealed memfd; all the work happens in the C
core (texbridge._synccore) so a handoff costs about a microsecond and never talks to the broker.
"""

from __future__ import annotations

import mmap
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from . import _synccore
from ._descriptor import KEYED_MUTEX_STATE_SIZE
from ._errors import KeyedMutexError, KeyedMutexTimeout, WouldBlock
from ._fdinfo import inspect_fd
from ._sharedmem import SharedMapping, create_sealed

__all__ = ["KeyedMutex", "KeyedMutexStats", "create_state", "abandon_session", "PRIVATE_DATA_CAPACITY",
           "MAX_WAITERS"]

PRIVATE_DATA_CAPACITY: int = _synccore.PRIVATE_CAPACITY
MAX_WAITERS: int = _synccore.MAX_WAITERS  # queued waiters beyond this still work, by polling, without FIFO order
assert _synccore.STATE_SIZE == KEYED_MUTEX_STATE_SIZE


def create_state(initial_key: int = 0) -> int:
    """A new keyed-mutex state: a sealed memfd, free with `initial_key`. Returns the fd; the caller owns it."""
    fd = create_sealed("texbridge:keyed-mutex", KEYED_MUTEX_STATE_SIZE)
    try:
        m = SharedMapping(fd, KEYED_MUTEX_STATE_SIZE)
        try:
            _synccore.init(m.view(), initial_key)
        finally:
            m.close()
    except BaseException:
        os.close(fd)
        raise
    return fd


def _map_state(fd: int) -> SharedMapping:
    """Map a state fd, refusing anything a peer could shrink under us (SIGBUS) or that is too small."""
    facts = inspect_fd(fd)
    if facts.kind != "memfd" or not facts.size_sealed or facts.size != KEYED_MUTEX_STATE_SIZE:
        raise KeyedMutexError(f"keyed mutex state must be a size-sealed memfd of {KEYED_MUTEX_STATE_SIZE} bytes "
                              f"(got {facts.kind}, {facts.size} bytes, seals {facts.seals:#x})")
    return SharedMapping(fd, KEYED_MUTEX_STATE_SIZE)


def abandon_session(fd_or_buffer: "int | mmap.mmap | memoryview", session_id: int) -> bool:
    """Abandon the mutex if `session_id` owns it; the broker calls this when a client session disconnects,
    so waiters learn of the loss even when the owner's process lives on. Returns whether it was abandoned."""
    if isinstance(fd_or_buffer, int):
        m = _map_state(fd_or_buffer)
        try:
            return _synccore.abandon_session(m.view(), session_id)
        finally:
            m.close()
    return _synccore.abandon_session(fd_or_buffer, session_id)


@dataclass(frozen=True, slots=True)
class KeyedMutexStats:
    """A snapshot of the shared state, for tests, the CLI and debugging."""

    key: int
    locked: bool
    abandoned: bool  # free, but its last owner died: the next acquire gets KeyedMutexAbandoned
    owner_pid: int
    owner_session: int
    waiters: int
    acquisitions: int
    contended: int  # acquires that had to queue
    abandoned_count: int
    sync_value: int
    private_data_len: int
    meta_steals: int  # internal lock taken over from a dead process (state was checked after)


class KeyedMutex:
    """One process's handle on a keyed mutex. The owner is this handle (pid, session, handle token), not a thread:
    acquire on one thread and release on another is fine; two handles in one process are two different owners."""

    def __init__(self, fd: int, *, session_id: int = 0) -> None:
        """Map the state behind `fd` (not taken over: the caller still closes it) and check it is one."""
        self._map = _map_state(fd)
        try:
            self._core = _synccore.Core(self._map.view(), session_id)  # the core's buffer keeps the pages mapped
        except BaseException:
            self._map.close()
            raise
        self.session_id = session_id

    # -- the DXGI pair -----------------------------------------------------------------------------------------------
    def acquire(self, key: int, timeout: float | None = None) -> int:
        """Wait until the mutex is free with `key`, and own it. Returns the sync value of the last release.

        timeout: None waits forever, 0 polls, else seconds. Raises KeyedMutexTimeout, or KeyedMutexAbandoned when
        the previous owner died holding it (this handle then owns it: check the data and release)."""
        return self._core.acquire(key, timeout)

    def acquire_nowait(self, key: int) -> int:
        """acquire(key, 0), raising WouldBlock when it is busy or holds another key."""
        try:
            return self._core.acquire(key, 0)
        except KeyedMutexTimeout:
            raise WouldBlock(f"keyed mutex not free with key {key}") from None

    def release(self, key: int, *, private_data: bytes | None = None, sync_value: int | None = None) -> None:
        """Set the key and free the mutex, handing it straight to the first waiter for `key`.

        private_data (≤ PRIVATE_DATA_CAPACITY bytes) replaces the blob when given; sync_value defaults to the last
        one + 1, so acquirers see a rising timeline value."""
        self._core.release(key, private_data, sync_value)

    @property
    def private_data(self) -> bytes:
        """The blob written by the last release that gave one (D3DKMT keyed mutex v2). Owner only."""
        return self._core.private_data()

    @property
    def owned(self) -> bool:
        """Whether this handle owns the mutex now."""
        return self._core.owned()

    @contextmanager
    def hold(self, acquire: int = 0, release: int = 1, timeout: float | None = None) -> Iterator[int]:
        """`with m.hold(0, 1) as sync:` acquires `acquire`, yields the sync value, always releases with `release`.

        KeyedMutexAbandoned propagates with this handle owning the mutex: the caller decides what to release."""
        sync = self._core.acquire(acquire, timeout)
        try:
            yield sync
        finally:
            self._core.release(release, None, None)

    def waiting_keys(self) -> tuple[int, ...]:
        """The keys queued waiters wait for now, oldest waiter first (a hint: read without the lock). The bridge
        polls it to ship a resource's content across only when someone on this side waits for a key. Waiters past
        MAX_WAITERS poll instead of queueing and are not listed."""
        return self._core.waiting_keys()

    def statistics(self) -> KeyedMutexStats:
        return KeyedMutexStats(*self._core.stats())

    # -- lifetime ----------------------------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._core.closed

    def close(self) -> None:
        """Unmap. Idempotent. Closing while owning abandons the mutex, as dying would: the data may be half done.
        Every later call raises ClosedError (the C core checks before touching the state)."""
        if self._core.closed:
            return
        self._core.close()
        self._map.close()

    def __enter__(self) -> "KeyedMutex":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.closed:
            return "<KeyedMutex closed>"
        s = self.statistics()
        state = f"owned by pid {s.owner_pid}" if s.locked else "abandoned" if s.abandoned else "free"
        return f"<KeyedMutex key={s.key} {state} waiters={s.waiters}>"
