"""The one memory-type table: for each kind of memory a descriptor can name, which backends import it, which one
does when the caller names none, what fd the broker accepts for it, and whether the CPU can map it.

Plain data, like `_formats.py`: the descriptor validates `memory` against it, the backend loader picks default
importers from it, the broker checks memory fds with it, and every backend's import refuses what it does not list.
A new memory type is one row here plus the backend code that imports it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._errors import InvalidDescriptor, echo

# What GPU drivers hand out as memory fds (FdFacts.kind): memfds (Mesa lavapipe), anon inodes (dma-bufs, driver
# objects), device nodes (NVIDIA). The broker refuses every other kind (sockets, files, pipes, directories).
GPU_FD_KINDS = ("memfd", "anon", "chardev")


@dataclass(frozen=True, slots=True)
class MemoryType:
    """One row: a memory handle type and who may touch it."""

    name: str
    default_importer: str  # the backend `Session.open` uses when the caller names none
    importers: tuple[str, ...]  # every backend whose import_resource accepts it
    fd_kinds: tuple[str, ...]  # the FdFacts kinds the broker accepts for the memory fd
    host_mappable: bool  # the CPU maps it (NumPy views): the broker then also wants it size-sealed and large enough,
    #                      or an importer's mapping could SIGBUS; its descriptor carries the CPU plane layout
    about: str


MEMORY_TYPES: dict[str, MemoryType] = {
    m.name: m
    for m in (
        MemoryType("memfd", "memfd", ("memfd", "vulkan", "gl", "cuda"), ("memfd",), True,
                   "sealed shared memory: NumPy sees it without a copy; Vulkan imports it as host memory or stages, "
                   "CUDA registers the mapping (cuMemHostRegister), GL keeps an uploaded copy"),
        MemoryType("opaque_fd", "vulkan", ("vulkan", "gl", "cuda"), GPU_FD_KINDS, False,
                   "a driver's opaque memory fd (VK_KHR_external_memory_fd): same driver and device only"),
        MemoryType("dma_buf", "vulkan", ("vulkan",), GPU_FD_KINDS, False,
                   "a Linux dma-buf with an explicit DRM format modifier"),
        MemoryType("cuda_vmm", "cuda", ("cuda", "vulkan", "gl"), GPU_FD_KINDS, False,
                   "a CUDA virtual-memory allocation exported as a POSIX fd (NVIDIA's Vulkan and GL import it as "
                   "OPAQUE_FD: pitch-linear rows in a buffer)"),
    )
}


def get_memory_type(name: str) -> MemoryType:
    try:
        return MEMORY_TYPES[name]
    except (KeyError, TypeError):
        raise InvalidDescriptor(f"memory must be one of {tuple(MEMORY_TYPES)}, not {echo(name)}") from None


def check_importer(memory: str, backend: str, hint: str = "") -> MemoryType:
    """The row for `memory`, or InvalidDescriptor when `backend` cannot import it, naming the backends that can."""
    mt = get_memory_type(memory)
    if backend not in mt.importers:
        raise InvalidDescriptor(f"the {backend} backend cannot import {memory!r} memory: open it with "
                                f"{' or '.join(mt.importers)}" + (f" ({hint})" if hint else ""))
    return mt
