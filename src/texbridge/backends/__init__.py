"""Backends: where a resource's memory lives and which API sees it. One module each, heavy imports lazy.

`get_backend(name)` is the one loader: unknown names and unavailable backends raise BackendError saying what is
available and why the others are not, so `import texbridge` works on a machine with no GPU stack at all.
"""

from __future__ import annotations

import importlib

from .._errors import BackendError
from ._base import Backend

BACKENDS = ("memfd", "vulkan", "gl", "cuda")
# Which backend opens a descriptor when the caller does not say: NumPy-visible memory where possible.
DEFAULT_IMPORTER = {"memfd": "memfd", "opaque_fd": "vulkan", "dma_buf": "vulkan", "cuda_vmm": "cuda"}

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
