"""fd ownership on import, in one place.

The fds that come with a descriptor (its `fd_roles`: memory, GPU semaphore, keyed mutex state) belong to whoever
received them until an API takes one: Vulkan, GL and CUDA take an fd only when their import succeeds, some imports
never take it (cuMemImportFromShareableHandle), a memfd resource keeps it. `OwnedFds` holds them meanwhile: an
importer `take()`s an fd at the moment ownership passes, and leaving the `with` block closes every fd not taken —
on success and on failure alike, so no path can leak one or close one twice.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Sequence

from .._descriptor import FD_MUTEX, Descriptor
from .._errors import BackendError
from .._fdinfo import inspect_fd, never_gpu


class OwnedFds:
    """fds by role (`Descriptor.fd_roles` order); fds past the roles are owned too, and only ever closed.
    (Every open passes here twice, the session's and the backend's: the methods are written for one or two fds.)"""

    __slots__ = ("_fds", "_roles")

    def __init__(self, fds: Sequence[int], roles: Sequence[str]) -> None:
        self._fds = list(fds)
        self._roles = roles if type(roles) is tuple else tuple(roles)

    @classmethod
    def for_import(cls, descriptor: Descriptor, fds: Sequence[int]) -> "OwnedFds":
        """What a backend's import_resource receives: the descriptor's fds up to the keyed mutex state, which the
        session keeps for itself."""
        roles = descriptor.fd_roles
        return cls(fds, roles[:-1] if roles[-1] == FD_MUTEX else roles)

    def get(self, role: str) -> int:
        """The fd for `role`, still owned here; -1 when it did not come or was taken."""
        fds = self._fds
        for i, r in enumerate(self._roles):
            if r == role:
                return fds[i] if i < len(fds) else -1
        return -1

    def take(self, *roles: str) -> list[int]:
        """Hand over the fds for `roles` (those that came, in role order): the caller owns them from here on."""
        taken = []
        fds = self._fds
        n = len(fds)
        for i, r in enumerate(self._roles):
            if i >= n:
                break
            if r in roles and fds[i] >= 0:
                taken.append(fds[i])
                fds[i] = -1
        return taken

    def take_one(self, role: str) -> int:
        """take() for one role: its fd, or -1 when it did not come."""
        taken = self.take(role)
        return taken[0] if taken else -1

    def close(self) -> None:
        """Close every fd not taken (idempotent)."""
        fds = self._fds
        if max(fds, default=-1) < 0:  # the common case: every fd was taken
            return
        for i, fd in enumerate(fds):
            if fd >= 0:
                fds[i] = -1
                os.close(fd)

    def __enter__(self) -> "OwnedFds":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def close_on_error(*cleanups: Callable[[], object]) -> Iterator[None]:
    """Run `cleanups` in order if the block raises (anything, KeyboardInterrupt included), then re-raise; nothing on
    success. For what is half-built: the block's objects belong to the caller only once it completes."""
    try:
        yield
    except BaseException:
        for cleanup in cleanups:
            cleanup()
        raise


def check_semaphore_fd(fd: int, api: str) -> None:
    """BackendError unless `fd` may be a GPU semaphore export, checked before any driver sees it: a driver handed
    a file as a semaphore may poison its whole device (see _fdinfo.never_gpu). The caller still owns `fd`."""
    reason = never_gpu(inspect_fd(fd), semaphore=True)
    if reason:
        raise BackendError(f"{api}: fd {fd} is {reason}, not a semaphore export")
