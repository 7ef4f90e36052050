"""What an fd is, without changing it: the facts the broker checks before the pure registry decides (kind, size,
seals, anon-inode name, device), and whether two fds are one open file (kcmp). Any fd, not only memfds."""

from __future__ import annotations

import fcntl
import functools
import os
import stat
from dataclasses import dataclass

from ._sharedmem import F_GET_SEALS, F_SEAL_GROW, F_SEAL_SHRINK


_SIZE_SEALED = F_SEAL_SHRINK | F_SEAL_GROW  # the seals that make a memfd's size permanent (no SIGBUS on map)


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
        return self.kind == "memfd" and self.seals & _SIZE_SEALED == _SIZE_SEALED


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


def sealed_size(fd: int) -> int:
    """The size of a size-sealed memfd (shrink and grow both sealed), or -1 for any other fd: what an importer
    needs to map it without fear of SIGBUS, in two syscalls (inspect_fd's classification is not needed here)."""
    try:
        st = os.fstat(fd)
        if st.st_mode & _S_IFMT != _S_IFREG:  # stat.S_ISREG, minus a call
            return -1
        seals = fcntl.fcntl(fd, F_GET_SEALS)
    except OSError:
        return -1
    return st.st_size if seals & _SIZE_SEALED == _SIZE_SEALED else -1


_S_IFMT, _S_IFREG = 0o170000, stat.S_IFREG
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


# Fds that can never be GPU memory or a GPU semaphore, however they are labelled: anon-inode kinds (the name
# /proc/self/fd shows) and character-device majors (mem: /dev/null, /dev/zero...; ttys; misc: kvm, fuse, tun...).
# Refusal is by known-bad kind: drivers export memory as memfds (lavapipe), dma-bufs or device fds (NVIDIA), and
# semaphores as syncobj/sync-file anon inodes (Mesa) or device fds (NVIDIA) — never as a file.
NEVER_GPU_ANON = frozenset({"eventfd", "eventpoll", "pidfd", "signalfd", "timerfd", "inotify", "fanotify",
                            "userfaultfd", "io_uring", "perf_event", "bpf-map", "bpf-prog", "bpf_link", "fscontext",
                            "memfd_secret"})
NEVER_GPU_CHAR_MAJORS = frozenset({1, 4, 5, 7, 10, 13} | set(range(136, 144)))


def never_gpu(facts: FdFacts, *, semaphore: bool = False) -> str | None:
    """Why this fd can never be a GPU export (memory; with semaphore=True a semaphore, which is never a file
    either), or None when it may be one. One rule for the broker (REGISTER) and for every backend's semaphore
    import: a driver handed a wrong fd may poison its device (NVIDIA answered every later vkAllocateMemory with
    VK_ERROR_OUT_OF_DEVICE_MEMORY after a memfd was imported as a semaphore)."""
    if facts.kind in ("socket", "directory", "fifo", "other", "regular") or (semaphore and facts.kind == "memfd"):
        return f"a {facts.kind}"
    if (facts.kind == "anon" and facts.detail in NEVER_GPU_ANON) or (
            facts.kind == "chardev" and facts.major in NEVER_GPU_CHAR_MAJORS):
        return f"a {facts.kind} ({facts.detail}), which no GPU API exports"
    return None
