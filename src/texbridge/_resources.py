"""The base class every shared resource shares, whatever API its memory lives in.

A Resource is one process's reference to a broker-registered resource. Closing it releases this process's
API objects (mapping, VkImage, GL texture, CUDA pointer) and drops its broker reference; the memory itself lives on
while any other process holds a reference. close() is idempotent and swaps state out before releasing, so a failure
half-way never leads to a double free; __del__ is only a backstop and warns, as leaking GPU objects silently would hide
bugs.
"""

from __future__ import annotations

import itertools
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from ._descriptor import Descriptor, Handle
from ._errors import ClosedError

if TYPE_CHECKING:
    from ._client import Session
    from .keyed_mutex import KeyedMutex

_uids = itertools.count(1)


class Resource:
    """A shared texture, buffer or keyed mutex, as seen from one process and one API."""

    backend_name = "base"

    def __init__(self, descriptor: Descriptor) -> None:
        self.descriptor = descriptor
        self.handle: Handle | None = None
        self.mutex: KeyedMutex | None = None
        self._session: Session | None = None
        self._uid = next(_uids)
        self._closed = False

    # -- what backends fill in -----------------------------------------------------------------------------------
    def export_fds(self) -> list[int]:
        """New fds for the broker (memory first). The caller owns and closes them after sending."""
        raise NotImplementedError

    def upload(self, array: np.ndarray) -> None:
        """Copy `array` (shape of download()) into the resource."""
        raise NotImplementedError

    def download(self) -> np.ndarray:
        """A NumPy copy of the contents: (H, W, C) for textures, 1-D uint8 for buffers."""
        raise NotImplementedError

    def _release(self) -> None:
        """Free this process's API objects. Called once, by close()."""

    # -- common -----------------------------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def shape(self) -> tuple[int, ...]:
        from ._formats import get_format

        d = self.descriptor
        if d.kind == "texture2d":
            return (d.height, d.width, get_format(d.format).channels)
        return (d.size,)

    def _attach(self, session: Session, handle: Handle, mutex: KeyedMutex | None) -> None:
        self._session, self.handle, self.mutex = session, handle, mutex

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"{self!r} is closed")

    def publish(self, name: str) -> None:
        """Publish this resource under `name` in its namespace (names are unique per namespace)."""
        self._check_open()
        assert self._session is not None and self.handle is not None
        self._session.publish(self.handle, name)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        session, handle, mutex = self._session, self.handle, self.mutex
        self._session = self.mutex = None
        try:
            if mutex is not None:
                mutex.close()
            self._release()
        finally:
            if session is not None and handle is not None:
                session._drop(handle)

    def __enter__(self) -> "Resource":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            warnings.warn(f"{self!r} was not closed", ResourceWarning, stacklevel=2)
            try:
                self.close()
            except Exception:
                pass

    def __repr__(self) -> str:
        d = self.descriptor
        geo = f"{d.width}x{d.height} {d.format}" if d.kind == "texture2d" else f"{d.size} bytes"
        return f"<{type(self).__name__} {self.handle or 'unregistered'} {d.kind} {geo} #{self._uid}>"
