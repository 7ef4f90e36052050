"""fd ownership on import (backends/_fds.py): what is not taken is closed, exactly once, on success and failure."""

from __future__ import annotations

import os

import pytest

from texbridge import Descriptor, InvalidDescriptor
from texbridge._descriptor import FD_MEMORY, FD_MUTEX, FD_SEMAPHORE
from texbridge.backends._fds import OwnedFds, close_on_error

from conftest import fd_count


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def test_descriptor_fd_roles_are_the_fd_layout():
    tex = Descriptor(kind="buffer", size=4096)
    assert tex.fd_roles == (FD_MEMORY,) and tex.nfds == 1
    both = Descriptor(kind="buffer", size=4096, memory="opaque_fd", gpu_sync="timeline_opaque_fd", keyed_mutex=True)
    assert both.fd_roles == (FD_MEMORY, FD_SEMAPHORE, FD_MUTEX) and both.nfds == 3
    assert Descriptor(kind="keyed_mutex", size=4096).fd_roles == (FD_MUTEX,)
    with pytest.raises(InvalidDescriptor, match="no GPU semaphore"):
        Descriptor(kind="keyed_mutex", size=4096, gpu_sync="timeline_opaque_fd").validate()


def test_what_is_not_taken_is_closed_and_what_is_taken_is_not():
    before = fd_count()
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(4)]  # memory, semaphore, and two nobody expects
    with OwnedFds(fds, (FD_MEMORY, FD_SEMAPHORE)) as owned:
        assert owned.get(FD_MEMORY) == fds[0] and owned.get(FD_MUTEX) == -1
        assert owned.take(FD_MEMORY) == [fds[0]]
        assert owned.get(FD_MEMORY) == -1 and owned.take_one(FD_MEMORY) == -1  # taken once only
    assert _is_open(fds[0]) and not any(_is_open(fd) for fd in fds[1:])
    os.close(fds[0])
    assert fd_count() == before


def test_failure_inside_closes_everything_not_taken():
    before = fd_count()
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(2)]
    with pytest.raises(KeyboardInterrupt):
        with OwnedFds(fds, (FD_MEMORY, FD_SEMAPHORE)):
            raise KeyboardInterrupt
    assert fd_count() == before


def test_for_import_leaves_the_mutex_to_the_session_and_missing_fds_read_as_absent():
    d = Descriptor(kind="buffer", size=4096, memory="opaque_fd", gpu_sync="timeline_opaque_fd", keyed_mutex=True)
    fd = os.open("/dev/null", os.O_RDONLY)
    with OwnedFds.for_import(d, [fd]) as owned:  # the semaphore did not come
        assert owned.get(FD_SEMAPHORE) == -1 and owned.take(FD_MEMORY, FD_SEMAPHORE) == [fd]
    os.close(fd)


def test_close_on_error_cleans_up_in_order_only_on_error():
    calls = []
    with close_on_error(lambda: calls.append("never")):
        pass
    with pytest.raises(ValueError):
        with close_on_error(lambda: calls.append(1), lambda: calls.append(2)):
            raise ValueError
    assert calls == [1, 2]


def test_a_file_is_never_handed_to_a_driver_as_a_semaphore():
    """check_semaphore_fd refuses what can never be a semaphore export before Vulkan, GL or CUDA sees it; what a
    driver might export passes. The caller keeps its fd either way."""
    from texbridge._errors import BackendError
    from texbridge._sharedmem import create_sealed
    from texbridge.backends._fds import check_semaphore_fd

    for fd in (create_sealed("not-a-semaphore", 4096), os.eventfd(0)):
        try:
            with pytest.raises(BackendError, match="not a semaphore export"):
                check_semaphore_fd(fd, "test")
            os.fstat(fd)  # still open: the caller owns it
        finally:
            os.close(fd)
