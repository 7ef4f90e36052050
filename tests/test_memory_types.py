"""The memory-type table is the one place that says who imports which memory: the loader's defaults, the descriptor's
validation, the broker's fd check and every backend's import all follow it."""

from __future__ import annotations

import os

import pytest

from texbridge import Descriptor, InvalidDescriptor
from texbridge._errors import BackendError
from texbridge._memory_types import MEMORY_TYPES, check_importer, get_memory_type
from texbridge._sharedmem import create_sealed
from texbridge.backends import BACKENDS, DEFAULT_IMPORTER, get_backend

from conftest import fd_count


def test_every_row_names_known_backends_and_its_default_importer_can_import_it():
    for name, mt in MEMORY_TYPES.items():
        assert mt.name == name and mt.importers and mt.fd_kinds and mt.about
        assert set(mt.importers) <= set(BACKENDS), name
        assert mt.default_importer in mt.importers, name
        assert DEFAULT_IMPORTER[name] == mt.default_importer


def test_unknown_memory_types_are_invalid_descriptors():
    for bad in ("host", "", 3, None, ["memfd"]):
        with pytest.raises(InvalidDescriptor, match="memory must be one of"):
            get_memory_type(bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidDescriptor, match="memory must be one of"):
            Descriptor(kind="buffer", size=4096, memory=bad).validate()  # type: ignore[arg-type]


def test_check_importer_names_the_backends_that_can():
    with pytest.raises(InvalidDescriptor, match="open it with vulkan"):
        check_importer("dma_buf", "gl")
    assert check_importer("memfd", "vulkan").host_mappable


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_each_backend_refuses_the_memory_types_it_does_not_import_and_keeps_no_fd(backend):
    try:
        be = get_backend(backend)
        if backend in ("vulkan", "gl"):  # the refusal must come from the table, not from a missing device
            be.diagnostics()["available"] or pytest.skip(f"no {backend} device")
    except BackendError as e:
        pytest.skip(f"backend {backend} is unavailable: {e}")
    refused = [m for m in MEMORY_TYPES.values() if backend not in m.importers]
    if not refused:
        pytest.skip(f"{backend} imports every memory type")
    for i, mt in enumerate(refused * 2):  # the first round warms up what a first import may open (a device)
        desc = Descriptor(kind="buffer", size=4096, memory=mt.name, backend="test").validate()
        before = fd_count()
        fd = create_sealed("texbridge:test", 4096)
        with pytest.raises(InvalidDescriptor, match=f"cannot import {mt.name!r} memory: open it with"):
            be.import_resource(desc, [fd])
        assert fd_count() == before or i < len(refused), f"{backend} leaked the fd of a refused {mt.name} import"
        with pytest.raises(OSError):
            os.fstat(fd)
