"""Sealed memfds: creation, sealing, inspection. Shared by the memfd backend, the keyed mutex and the broker.

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
import stat
from dataclasses import dataclass

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
        import numpy as np

        m = self._check()
        if self._owner is None:
            self._owner = (ctypes.c_char * self.size).from_buffer(m)
        return np.ndarray(shape, dtype, buffer=self._owner, offset=offset, strides=strides)

    def close(self) -> None:
        """Drop texbridge's references. Idempotent; never fails because views are alive."""
        m, self._mmap, self._owner = self._mmap, None, None
        if m is not None:
            try:
                m.close()
            except BufferError:
                pass  # views are alive: the GC unmaps when the last one goes (sealed memfd: never a SIGBUS either)


@dataclass(frozen=True, slots=True)
class FdFacts:
    """What the broker learns about a received fd before the pure registry decides on it."""

    kind: str  # "memfd" (shmem with seals), "regular", "chardev", "anon", "socket", "directory", "fifo", "other"
    size: int = 0
    seals: int = 0
    detail: str = ""  # anon: the inode's name ("eventfd", "dmabuf", "sync_file"...); chardev: the device path
    major: int = -1  # chardev: the device major number

    @property
    def size_sealed(self) -> bool:
        return self.kind == "memfd" and self.seals & (F_SEAL_SHRINK | F_SEAL_GROW) == F_SEAL_SHRINK | F_SEAL_GROW


def inspect_fd(fd: int) -> FdFacts:
    """Classify an fd without changing it. Never raises for a valid fd; an invalid one is kind "other"."""
    try:
        st = os.fstat(fd)
    except OSError:
        return FdFacts("other")
    mode = st.st_mode
    if stat.S_ISSOCK(mode):
        return FdFacts("socket")
    if stat.S_ISDIR(mode):
        return FdFacts("directory")
    if stat.S_ISFIFO(mode):
        return FdFacts("fifo")
    if stat.S_ISCHR(mode):
        return FdFacts("chardev", st.st_size, detail=_fd_link(fd), major=os.major(st.st_rdev))
    if stat.S_ISREG(mode):
        try:
            seals = fcntl.fcntl(fd, F_GET_SEALS)
        except OSError:
            return FdFacts("regular", st.st_size)
        return FdFacts("memfd", st.st_size, seals)
    if stat.S_IFMT(mode) == 0:  # anon inodes: dma-buf, sync files, driver fds, but also eventfd, epoll, pidfd...
        link = _fd_link(fd)
        name = link.split(":", 1)[1] if link.startswith("anon_inode:") else link.strip("/").split(":", 1)[0]
        return FdFacts("anon", st.st_size, detail=name.strip("[]"))
    return FdFacts("other", st.st_size)


_KCMP_FILE = 0
_SYS_KCMP = {"x86_64": 312, "aarch64": 272, "riscv64": 272, "ppc64le": 354, "s390x": 343}.get(os.uname().machine)


def same_file(fd_a: int, fd_b: int) -> bool:
    """Whether two fds of this process are the same open file (one passed around by SCM_RIGHTS and dup).

    kcmp(KCMP_FILE) answers exactly. Where it is missing (no syscall number, seccomp, ENOSYS), only memfds can be
    told apart, by inode; any other pair is "not the same", which refuses rather than risks a wrong match.
    """
    if _SYS_KCMP is not None:
        pid = os.getpid()
        r = _libc().syscall(_SYS_KCMP, pid, pid, _KCMP_FILE, fd_a, fd_b)
        if r >= 0:
            return r == 0
    try:
        a, b = os.fstat(fd_a), os.fstat(fd_b)
    except OSError:
        return False
    return stat.S_ISREG(a.st_mode) and inspect_fd(fd_a).kind == "memfd" and (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


@functools.cache
def _libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)
def _fd_link(fd: int) -> str:
    """What /proc says the fd is ("anon_inode:[eventfd]", "/dmabuf:", "/dev/null"); "" where /proc is missing."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")[:200]
    except OSError:
        return ""
