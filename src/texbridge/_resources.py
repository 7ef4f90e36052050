"""The base class every shared resource shares, whatever API its memory lives in.

A Resource is one process's reference to a broker-registered resource. Closing it releases this process's
API objects (mapping, VkImage, GL texture, CUDA pointer) and drops its broker reference; the memory itself lives on
while any other process holds a reference. close() is idempotent and swaps state out before releasing, so a failure
half-way never leads to a double free; __del__ is only a backstop and warns, as leaking GPU objects silently would hide
bugs.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Protocol

import numpy as np

from ._descriptor import Descriptor
from ._errors import ClosedError, InvalidArgument, NoKeyedMutex, NotHostVisible
from ._formats import get_format
from ._handle import Handle

if TYPE_CHECKING:
    from .keyed_mutex import KeyedMutex

_uids = itertools.count(1)


class Holder(Protocol):
    """Who registered a resource with the broker (the Session): the only way a resource reaches up, so this layer
    never imports the client that sits above it."""

    def publish(self, handle: Handle, name: str) -> None:
        """Publish the resource's handle under `name`."""

    def _drop(self, res: Resource, handle: Handle) -> None:
        """Called once by Resource.close(): forget `res` and drop this holder's broker reference to `handle`."""


class Resource:
    """A shared texture, buffer or keyed mutex, as seen from one process and one API."""

    backend_name = "base"

    # Optional capabilities, declared here so callers choose without probing (as wgpu-py's base classes do): a
    # backend that has one sets its flag and overrides the method; the defaults raise NotImplementedError.
    host_visible: ClassVar[bool] = False
    """numpy() returns a zero-copy view of the memory (and np.asarray(resource) is that view)."""
    device_copy: ClassVar[bool] = False
    """copy_from_device()/copy_to_device() copy between the resource and linear device memory on the GPU."""

    def __init__(self, descriptor: Descriptor) -> None:
        self.descriptor = descriptor
        self.handle: Handle | None = None
        self._mutex: KeyedMutex | ResourceMutex | None = None
        self._holder: Holder | None = None
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

    # -- optional capabilities (see the class flags) ----------------------------------------------------------------
    def numpy(self) -> np.ndarray:
        """A zero-copy NumPy view of the memory (host_visible backends only): (H, W, C) honouring the row pitch for
        textures, 1-D uint8 for buffers. Elsewhere NotHostVisible (a NotImplementedError): use download()."""
        self._check_open()
        raise NotHostVisible(f"{self!r} lives in {self.descriptor.memory} memory that NumPy cannot see without a "
                             "copy: use resource.download()")

    def copy_from_device(self, src_ptr: int, src_pitch: int | None = None, *, layer: int = 0,
                         stream: Any = None) -> None:
        """Copy linear device memory at src_ptr (rows src_pitch apart) into the texture, on the GPU (device_copy
        backends only)."""
        raise NotImplementedError(f"{type(self).__name__} has no device copy: use upload()")

    def copy_to_device(self, dst_ptr: int, dst_pitch: int | None = None, *, layer: int = 0,
                       stream: Any = None) -> None:
        """Copy the texture into linear device memory at dst_ptr (rows dst_pitch apart), on the GPU (device_copy
        backends only)."""
        raise NotImplementedError(f"{type(self).__name__} has no device copy: use download()")

    def copy_to(self, dst: Any) -> None:
        """Copy this texture into `dst`, a texture of the same API, device (or GL context), size and format, on the
        GPU; complete when it returns, so a caller can re-check what it copied (a receiver's seqlock). Backends
        with a GPU (gl, vulkan, cuda) implement it; elsewhere NotImplementedError."""
        raise NotImplementedError(f"{type(self).__name__} has no GPU copy: use download() and upload()")

    # -- GPU ordering around the keyed mutex (backends with GPU queues override) -----------------------------------
    def gpu_acquired(self, value: int) -> None:
        """After acquire: order this API's next GPU work after the releaser's (wait for `value` on the GPU).

        The default does nothing: CPU-visible memory needs no ordering beyond the mutex itself.
        """

    def gpu_releasing(self, acquired_value: int) -> int | None:
        """Before release: make this API's work visible to the next owner. Returns the sync value to publish
        (a timeline-semaphore value the GPU will signal), or None when the work is already complete."""
        return None

    # -- common -----------------------------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def mutex(self) -> "KeyedMutex | ResourceMutex":
        """The resource's keyed mutex (created with keyed_mutex=True). NoKeyedMutex (an AttributeError) when it has
        none, ClosedError once the resource is closed."""
        if self._mutex is None:
            self._check_open()
            if self._holder is not None or not self.descriptor.keyed_mutex:
                raise NoKeyedMutex(f"{self!r} has no keyed mutex: create it with keyed_mutex=True to use .mutex")
            raise NoKeyedMutex(f"{self!r} is not registered yet: its keyed mutex comes from the session")
        return self._mutex

    @mutex.setter
    def mutex(self, value: "KeyedMutex | ResourceMutex | None") -> None:
        self._mutex = value

    def _check_frame(self, array: Any, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """The one upload check for textures, shared by every backend and by Sender.send: exactly the texture's
        dtype, and its shape, a single-channel (H, W), or a flat array of exactly its element count (row-major
        pixels). Never a cast or a reshape that could scramble pixels (a (W, H, C) array into an (H, W, C) texture)."""
        return check_frame(array, shape or self.shape, get_format(self.descriptor.format).numpy_dtype, self.__repr__)

    def _check_bytes(self, array: Any, capacity: int | None = None) -> np.ndarray:
        """The upload check for buffers: the raw bytes of any numeric array, C order, at most the buffer's size (a
        shorter array fills a prefix: drivers round buffer sizes up). Returns them as 1-D uint8."""
        cap = self.shape[0] if capacity is None else capacity
        arr = np.asarray(array)
        if arr.dtype.hasobject or arr.dtype.kind not in "biufc":
            raise InvalidArgument(f"upload into {self!r} takes numeric arrays, not {arr.dtype}")
        data = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        if data.size > cap:
            raise InvalidArgument(f"upload of {data.size} bytes into {self!r}, which holds {cap}")
        return data

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        """np.asarray(resource) is the zero-copy view (numpy()), np.array(resource) a copy; NotHostVisible for
        memory only a GPU API sees."""
        view = self.numpy()
        if dtype is not None and np.dtype(dtype) != view.dtype:
            if copy is False:
                raise ValueError(f"a {view.dtype} resource has no zero-copy {np.dtype(dtype)} view")
            return view.astype(dtype)
        return view.copy() if copy else view

    def __dlpack__(self, **kwargs: Any) -> Any:
        """DLPack export of the zero-copy view (host_visible resources; CUDA resources override with device
        memory). The capsule holds the view, and the view the mapping: it outlives close() safely."""
        return self.numpy().__dlpack__(**kwargs)

    def __dlpack_device__(self) -> tuple[int, int]:
        if not self.host_visible:
            self.numpy()  # raises NotHostVisible, saying to use download()
        return (1, 0)  # kDLCPU

    @property
    def shape(self) -> tuple[int, ...]:
        d = self.descriptor
        if d.kind == "texture2d":
            return (d.height, d.width, get_format(d.format).channels)
        return (d.size,)

    def _attach(self, holder: Holder, handle: Handle, mutex: KeyedMutex | None) -> None:
        if mutex is not None and not isinstance(mutex, ResourceMutex) and type(self).gpu_releasing is not Resource.gpu_releasing:
            mutex = ResourceMutex(mutex, self)
        self._holder, self.handle, self._mutex = holder, handle, mutex

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"{self!r} is closed")

    def publish(self, name: str) -> None:
        """Publish this resource under `name` in its namespace (names are unique per namespace)."""
        self._check_open()
        assert self._holder is not None and self.handle is not None
        self._holder.publish(self.handle, name)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        holder, handle, mutex = self._holder, self.handle, self._mutex
        self._holder = self._mutex = None
        try:
            if mutex is not None:
                mutex.close()
        finally:
            try:
                # The broker reference goes first: our mappings keep the memory alive whatever the broker does,
                # and the broker's CLOSE work then overlaps the unmapping here instead of delaying our next request.
                if holder is not None and handle is not None:
                    holder._drop(self, handle)
            finally:
                self._release()

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


def check_frame(array: Any, shape: tuple[int, ...], dtype: np.dtype, what: Callable[[], str]) -> np.ndarray:
    """`array` as an ndarray of `shape` (see Resource._check_frame for what is accepted), or InvalidArgument.
    `what` names the destination in the error; a callable, because uploads and sends call this per frame."""
    arr = np.asarray(array)
    if arr.dtype != dtype:
        raise InvalidArgument(f"{what()} takes {dtype} data, got {arr.dtype}: convert it first (e.g. "
                              f"array.astype(np.{dtype.name})); texbridge never casts pixels silently")
    if arr.shape == shape:
        return arr
    n = int(np.prod(shape))
    if arr.ndim == 1 and arr.size == n or (shape[-1] == 1 and arr.shape == shape[:-1]):
        return arr.reshape(shape)
    raise InvalidArgument(f"{what()} takes arrays of shape {shape} (height, width, channels), got {arr.shape}"
                          + (": is it transposed? (width, height) order scrambles rows" if arr.size == n else ""))


class ResourceMutex:
    """A resource's keyed mutex with the resource's GPU ordering folded into acquire and release.

    It is the same mutex (same shared state) as the plain KeyedMutex it wraps; only the GPU side is added:
    acquire waits for the releaser's sync value on this API's queue, release makes this API's work visible first
    (signalling a timeline semaphore, or finishing the queue where there is none). Everything else is delegated.
    """

    def __init__(self, mutex: KeyedMutex, resource: Resource) -> None:
        self._mutex, self._resource = mutex, resource
        self._acquired_value = 0

    def acquire(self, key: int, timeout: float | None = None) -> int:
        value = self._mutex.acquire(key, timeout)
        self._acquired(value)
        return value

    def acquire_nowait(self, key: int) -> int:
        value = self._mutex.acquire_nowait(key)
        self._acquired(value)
        return value

    def _acquired(self, value: int) -> None:
        self._acquired_value = value
        self._resource.gpu_acquired(value)

    def release(self, key: int, *, private_data: bytes | None = None, sync_value: int | None = None) -> None:
        if sync_value is None:
            sync_value = self._resource.gpu_releasing(self._acquired_value)
        if sync_value is None:
            # Nothing was signalled: keep the value, so a peer that waits on the resource's timeline semaphore
            # never waits for a value no one will signal.
            sync_value = self._acquired_value
        self._mutex.release(key, private_data=private_data, sync_value=sync_value)

    @contextlib.contextmanager
    def hold(self, acquire: int = 0, release: int = 1, timeout: float | None = None) -> Iterator[int]:
        value = self.acquire(acquire, timeout)
        try:
            yield value
        finally:
            self.release(release)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._mutex, name)

    def __repr__(self) -> str:
        return f"<ResourceMutex of {self._resource!r}: {self._mutex!r}>"
