"""memfd backend: textures and buffers in sealed shared memory, seen from NumPy without a copy."""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from .._d3d11 import d3d11_texture_desc

from .._descriptor import FD_MEMORY, Descriptor, Usage, check_buffer_size, texture_layout
from .._errors import InvalidDescriptor
from .._formats import get_format
from .._fdinfo import sealed_size
from .._memory_types import check_importer
from .._sharedmem import SharedMapping, create_sealed
from .._resources import Resource
from ._fds import OwnedFds


class MemfdResource(Resource):
    """A texture or buffer in a sealed memfd, mapped into this process."""

    backend_name = "memfd"
    host_visible = True

    def __init__(self, descriptor: Descriptor, fd: int) -> None:
        """Takes ownership of `fd`: it is mapped and kept only for export, and closed on close()."""
        super().__init__(descriptor)
        self._fd = fd
        self._map = SharedMapping(fd, descriptor.size)

    def export_fds(self) -> list[int]:
        self._check_open()
        return [os.dup(self._fd)]

    def numpy(self) -> np.ndarray:
        """A zero-copy view: (H, W, C) honouring the row pitch for textures, 1-D uint8 for buffers.

        The view keeps the mapping alive: it stays readable after close() (the memory lives on until the last
        view goes), so dropping views is the user's only duty."""
        self._check_open()
        d = self.descriptor
        if d.kind != "texture2d":
            return self._map.array((d.size,), np.uint8)
        fmt = get_format(d.format)
        item = fmt.numpy_dtype.itemsize
        return self._map.array((d.height, d.width, fmt.channels), fmt.numpy_dtype, offset=d.offset,
                               strides=(d.row_pitch, fmt.bytes_per_pixel, item))

    def upload(self, array: np.ndarray) -> None:
        view = self.numpy()
        if self.descriptor.kind == "texture2d":
            view[...] = self._check_frame(array)
        else:
            data = self._check_bytes(array)
            view[:data.size] = data

    def download(self) -> np.ndarray:
        return self.numpy().copy()

    def _release(self) -> None:
        fd, self._fd = self._fd, -1
        os.close(fd)
        self._map.close()  # views made by numpy() keep the pages mapped until they go


class MemfdBackend:
    name = "memfd"

    def create_texture(self, width: int, height: int, format: str, *, usage: int = int(Usage.DEFAULT),
                       keyed_mutex: bool = False, **options: Any) -> MemfdResource:
        _no_options(options)
        pitch, size = texture_layout(width, height, format)
        desc = Descriptor(kind="texture2d", size=size, width=width, height=height, format=format,
                          planes=((0, pitch),), usage=usage, keyed_mutex=keyed_mutex,
                          runtime_private=d3d11_texture_desc(width, height, format, keyed_mutex=keyed_mutex)).validate()
        return MemfdResource(desc, create_sealed(f"texbridge:{width}x{height}:{format}", size))

    def create_buffer(self, size: int, *, usage: int = int(Usage.DEFAULT), keyed_mutex: bool = False,
                      **options: Any) -> MemfdResource:
        _no_options(options)
        check_buffer_size(size)
        desc = Descriptor(kind="buffer", size=size, usage=usage, keyed_mutex=keyed_mutex).validate()
        return MemfdResource(desc, create_sealed(f"texbridge:buffer:{size}", size))

    def import_resource(self, descriptor: Descriptor, fds: Sequence[int], **options: Any) -> MemfdResource:
        """Map fds[0]. Takes ownership of every fd: a GPU semaphore (gpu_sync) means nothing to CPU memory, which
        the keyed mutex alone orders, so it is closed at once."""
        with OwnedFds.for_import(descriptor, fds) as owned:
            fd = owned.get(FD_MEMORY)
            if fd < 0:
                raise InvalidDescriptor("import needs the memory fd")
            _no_options(options)
            check_importer(descriptor.memory, "memfd", "GPU memory has no CPU mapping: open it with one of those "
                           "and call .download() for a NumPy copy")
            if sealed_size(fd) < descriptor.required_size():
                raise InvalidDescriptor("memory is not a size-sealed memfd large enough for its descriptor")
            res = MemfdResource(descriptor, fd)
            owned.take(FD_MEMORY)  # the resource's now
            return res

    def diagnostics(self) -> dict[str, Any]:
        try:
            os.close(create_sealed("texbridge:probe", 4096))
            return {"available": True, "detail": "memfd_create with size seals"}
        except OSError as e:
            return {"available": False, "detail": str(e)}


def _no_options(options: dict[str, Any]) -> None:
    if options:
        raise TypeError(f"memfd backend takes no options: {', '.join(options)}")


BACKEND = MemfdBackend()
