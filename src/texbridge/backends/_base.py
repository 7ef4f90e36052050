"""The interface every backend implements (memfd, vulkan, gl, cuda)."""

from __future__ import annotations

from typing import Any, Protocol, Sequence

from .._descriptor import Descriptor
from .._resources import Resource


class Backend(Protocol):
    """A way to allocate shareable memory and to import memory others shared.

    create_* return an unregistered Resource whose export_fds() the session hands to the broker. import_resource
    takes ownership of `fds` (it closes them, or hands them to an API that takes ownership, on success and on
    failure alike): the caller must not touch them afterwards. Implementations hold them in `_fds.OwnedFds` and
    take() each one only when the API owns it.
    """

    name: str

    def create_texture(self, width: int, height: int, format: str, *, usage: int, **options: Any) -> Resource: ...

    def create_buffer(self, size: int, *, usage: int, **options: Any) -> Resource: ...

    def import_resource(self, descriptor: Descriptor, fds: Sequence[int], **options: Any) -> Resource: ...

    def diagnostics(self) -> dict[str, Any]:
        """What this machine offers for this backend, for `texbridge doctor`. Never raises."""
        ...
