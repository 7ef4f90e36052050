"""Shared memory this process maps: sealed memfds (creation, sealing) and SharedMapping, the one home of the rule
that a mapping lives as long as any view of it.

Why seals: a process that maps shared memory takes SIGBUS if another process shrinks the file under it.
F_SEAL_SHRINK|F_SEAL_GROW|F_SEAL_SEAL makes the size permanent, so the broker can check the size once and every
importer can map without fear.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import mmap
import os

F_ADD_SEALS = getattr(fcntl, "F_ADD_SEALS", 1033)
F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)
F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW = 0x1, 0x2, 0x4
SIZE_SEALS = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL


def create_sealed(name: str, size: int) -> int:
    """A new memfd of exactly `size` zero bytes whose size can never change. Returns the fd (close-on-exec)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, F_ADD_SEALS, SIZE_SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def map_fd(fd: int, size: int) -> mmap.mmap:
    """Map `size` bytes of `fd` shared read-write. The mapping keeps the memory alive after fd is closed.

    Only for short-lived internal mappings closed by their user; anything that hands out views uses SharedMapping."""
    return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)


@functools.cache
def _ndarray():  # -> np.ndarray: NumPy is imported by users of views only (the broker never needs it)
    import numpy as np

    return np.ndarray


class SharedMapping:
    """A MAP_SHARED mapping that lives as long as any view of it: the one home of texbridge's mapping-lifetime rule.

    Every view holds a buffer export of the mmap: memoryviews directly (the C core's Py_buffer too), NumPy arrays
    through a ctypes array made with from_buffer (NumPy 2 unwraps a memoryview base to the bare mmap, which would
    not hold the export). close() drops texbridge's own references: with no view left the pages are unmapped at
    once, otherwise mmap refuses (BufferError) and the unmap happens when the last view is garbage collected. So no
    Python call can read unmapped memory (no SIGSEGV), and a closed owner never keeps a mapping nobody sees.
    """

    __slots__ = ("_mmap", "_owner", "size")

    def __init__(self, fd: int, size: int) -> None:
        self._mmap: mmap.mmap | None = map_fd(fd, size)
        self._owner: object = None
        self.size = size

    @property
    def closed(self) -> bool:
        return self._mmap is None

    def _check(self) -> mmap.mmap:
        if self._mmap is None:
            from ._errors import ClosedError

            raise ClosedError("the mapping is closed")
        return self._mmap

    def view(self) -> memoryview:
        """A writable memoryview of the whole mapping; it keeps the mapping alive while it exists."""
        return memoryview(self._check())

    def array(self, shape: tuple[int, ...], dtype: object, offset: int = 0,
              strides: tuple[int, ...] | None = None):  # -> np.ndarray (NumPy is imported only by users of views)
        """A NumPy view whose .base keeps the mapping alive."""
        m = self._mmap
        if m is None:
            self._check()  # raises ClosedError
        if self._owner is None:
            self._owner = (ctypes.c_char * self.size).from_buffer(m)
        return _ndarray()(shape, dtype, buffer=self._owner, offset=offset, strides=strides)

    def close(self) -> None:
        """Drop texbridge's references. Idempotent; never fails because views are alive."""
        m, self._mmap, self._owner = self._mmap, None, None
        if m is not None:
            try:
                m.close()
            except BufferError:
                pass  # views are alive: the GC unmaps when the last one goes (sealed memfd: never a SIGBUS either)
