"""Bad input from Python gets a typed, clear error; importers never leak an fd they were handed."""

from __future__ import annotations

import os

from texbridge._descriptor import Descriptor, texture_layout
from texbridge._memfd import create_sealed
from texbridge._protocol import Op

from conftest import fd_count


def test_memfd_import_closes_the_gpu_sync_fd(session):
    """A descriptor carrying a GPU semaphore (fd 1) opened as memfd: the semaphore fd must not pile up."""
    pitch, size = texture_layout(8, 8, "rgba8")
    desc = Descriptor(kind="texture2d", size=size, width=8, height=8, format="rgba8", planes=((0, pitch),),
                      gpu_sync="timeline_opaque_fd").validate()
    mem, sem = create_sealed("leak-test", size), os.eventfd(0)
    try:
        fields, _ = session._channel.request(Op.REGISTER, {"descriptor": desc.to_wire()}, [mem, sem])
    finally:
        os.close(mem)
        os.close(sem)
    first = session.open(fields["handle"])
    first.close()
    before = fd_count()
    for _ in range(50):
        res = session.open(fields["handle"])
        assert res.descriptor.gpu_sync and res.download().shape == (8, 8, 4)
        res.close()
    assert fd_count() == before
