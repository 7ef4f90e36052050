"""Backends: where a resource's memory lives and which API sees it. One module each, heavy imports lazy.

`get_backend(name)` is the one loader: unknown names and unavailable backends raise BackendError saying what is
available and why the others are not, so `import texbridge` works on a machine with no GPU stack at all.
"""

from __future__ import annotations

import importlib

from .._errors import BackendError
from .._memory_types import MEMORY_TYPES
from ._base import Backend

# The one list of backend names (the CLI's choices and help read it), each with what it is for.
BACKENDS: dict[str, str] = {
    "memfd": "CPU shared memory (sealed memfd), seen from NumPy without a copy",
    "vulkan": "Vulkan images and buffers (opaque fd or dma-buf), also imports memfd memory",
    "gl": "OpenGL textures and buffers through EXT_memory_object_fd, backed by Vulkan memory",
    "cuda": "CUDA arrays and device memory (CUDA VMM), also imports Vulkan opaque-fd memory",
}
# Which backend opens a descriptor when the caller does not say: NumPy-visible memory where possible.
DEFAULT_IMPORTER = {name: m.default_importer for name, m in MEMORY_TYPES.items()}

_loaded: dict[str, Backend] = {}


def get_backend(name: str) -> Backend:
    if name in _loaded:
        return _loaded[name]
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; backends: {', '.join(BACKENDS)}")
    try:
        module = importlib.import_module(f"{__name__}.{name}")
        backend = module.BACKEND
    except ImportError as e:
        raise BackendError(f"backend {name!r} is unavailable: {e} (install texbridge[{name}])") from e
    _loaded[name] = backend
    return backend


__all__ = ["BACKENDS", "DEFAULT_IMPORTER", "Backend", "get_backend"]
