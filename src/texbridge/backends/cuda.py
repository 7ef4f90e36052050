"""CUDA backend: zero-copy CUDA, torch and CuPy views of shared memory, and CUDA as a producer.

Two kinds of memory meet here (docs/backends-cuda.md):

- ``opaque_fd`` (exported by the Vulkan backend): imported with cuImportExternalMemory. Buffers and linear images
  become device pointers; optimal-tiling images become a CUDA mipmapped array (``.array`` is level 0), reachable
  through copy helpers, since their texel layout is the driver's own.
- ``cuda_vmm`` (made here): cuMemCreate with POSIX file-descriptor handles, exported with
  cuMemExportToShareableHandle. The fd the broker keeps references the physical allocation, so the memory outlives
  its creator, unlike torch.multiprocessing's cudaIpc handles. Textures are pitch-linear (rows aligned to 256 bytes).

Every CUDA call goes through `check`, the one place a CUresult becomes a BackendError. Work runs in the device's
primary context (the one torch and CuPy use), pushed around each call so the caller's current context is untouched.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Any, Sequence

import numpy as np
from cuda.bindings import driver as cu  # an ImportError here makes the backend unavailable, not texbridge

from .._d3d11 import d3d11_texture_desc

from .._descriptor import (FD_MEMORY, FD_SEMAPHORE, Descriptor, Usage, align, check_texture_size, private_int,
                           texture_layout)
from .._errors import BackendError, IncompatibleDevice, InvalidArgument, InvalidDescriptor
from .._fdinfo import inspect_fd
from .._formats import Format, get_format
from .._memory_types import check_importer
from .._resources import Resource
from ._dlpack import KDLCUDA, dlpack_capsule
from ._fds import OwnedFds, check_semaphore_fd, close_on_error

_SUCCESS = cu.CUresult.CUDA_SUCCESS
_POSIX_FD = cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
_HOST, _DEVICE, _ARRAY = (cu.CUmemorytype.CU_MEMORYTYPE_HOST, cu.CUmemorytype.CU_MEMORYTYPE_DEVICE,
                          cu.CUmemorytype.CU_MEMORYTYPE_ARRAY)
_VK_COLOR_ATTACHMENT, _VK_STORAGE = 0x10, 0x08  # VkImageUsageFlagBits, as recorded in driver_private["vk_usage"]


# -- errors: the one CUresult → exception mapping ----------------------------------------------------------------------
class CudaError(BackendError):
    """A CUDA driver call failed; .result is the CUresult, .call the function name."""

    def __init__(self, message: str, result: Any = None, call: str = "") -> None:
        super().__init__(message)
        self.result, self.call = result, call


class CudaOutOfMemory(CudaError):
    """The device has no room for the allocation or mapping."""


def check(ret: Any, call: str) -> Any:
    """Raise CudaError for a failed cuda-bindings call; return its outputs (None, one value, or a tuple)."""
    err, *out = ret if isinstance(ret, tuple) else (ret,)
    if err != _SUCCESS:
        raise _error(err, call)
    if not out:
        return None
    return out[0] if len(out) == 1 else tuple(out)


def _error(err: Any, call: str) -> CudaError:
    try:
        name = cu.cuGetErrorName(err)[1].decode()
        text = cu.cuGetErrorString(err)[1].decode()
    except Exception:
        name, text = str(err), ""
    cls = CudaOutOfMemory if err == cu.CUresult.CUDA_ERROR_OUT_OF_MEMORY else CudaError
    return cls(f"{call} failed: {name}" + (f" ({text})" if text else ""), err, call)


# -- driver and devices ----------------------------------------------------------------------------------------------
_lock = threading.RLock()
_init_state: list[str | None] = []  # [] = not tried; [None] = ready; [reason] = unavailable
_devices: dict[int, "CudaDevice"] = {}


def unavailable_reason() -> str | None:
    """None when CUDA works here, else why not, naming the missing capability (for skips and `doctor`)."""
    with _lock:
        if not _init_state:
            _init_state.append(_try_init())
        return _init_state[0]


def _try_init() -> str | None:
    try:
        err, = cu.cuInit(0)
    except Exception as e:  # cuda-bindings raises (not returns) when libcuda itself cannot be loaded
        return f"no CUDA driver (libcuda.so.1 not found: {type(e).__name__})"
    if err == cu.CUresult.CUDA_ERROR_NO_DEVICE:
        return "no CUDA device (cuInit: CUDA_ERROR_NO_DEVICE)"
    if err != _SUCCESS:
        return f"CUDA driver unusable: {_error(err, 'cuInit')}"
    count = check(cu.cuDeviceGetCount(), "cuDeviceGetCount")
    return None if count else "no CUDA device (cuDeviceGetCount = 0)"


def _require_driver() -> None:
    reason = unavailable_reason()
    if reason:
        raise BackendError(f"the cuda backend is unavailable: {reason}")


def _uuid_bytes(u: Any) -> bytes:
    b = u.bytes
    return b.encode("latin-1") if isinstance(b, str) else bytes(b)


class CudaDevice:
    """One GPU and its retained primary context (shared with torch/CuPy). `with dev:` makes it current."""

    def __init__(self, ordinal: int) -> None:
        self.ordinal = ordinal
        self.handle = check(cu.cuDeviceGet(ordinal), "cuDeviceGet")
        self.name = check(cu.cuDeviceGetName(256, self.handle), "cuDeviceGetName").split(b"\0")[0].decode()
        self.uuid = _uuid_bytes(check(cu.cuDeviceGetUuid(self.handle), "cuDeviceGetUuid"))
        self.vmm_posix_fd = bool(self.attribute("CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED"))
        self.context = check(cu.cuDevicePrimaryCtxRetain(self.handle), "cuDevicePrimaryCtxRetain")
        self._granularity: int | None = None
        self._peers: dict[int, bool] = {}  # ordinal -> peer access enabled (True) / impossible (False)

    def attribute(self, name: str) -> int:
        attr = getattr(cu.CUdevice_attribute, name, None)
        if attr is None:
            return 0
        return int(check(cu.cuDeviceGetAttribute(attr, self.handle), f"cuDeviceGetAttribute({name})"))

    def __enter__(self) -> "CudaDevice":
        check(cu.cuCtxPushCurrent(self.context), "cuCtxPushCurrent")
        return self

    def __exit__(self, *exc: Any) -> None:
        check(cu.cuCtxPopCurrent(), "cuCtxPopCurrent")

    def alloc_prop(self) -> Any:
        prop = cu.CUmemAllocationProp()
        prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = self.ordinal
        prop.requestedHandleTypes = _POSIX_FD
        return prop

    @property
    def granularity(self) -> int:
        """cuMemCreate's minimum granularity for fd-exportable device memory (2 MiB on current GPUs)."""
        if self._granularity is None:
            self._granularity = int(check(cu.cuMemGetAllocationGranularity(
                self.alloc_prop(), cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM),
                "cuMemGetAllocationGranularity"))
        return self._granularity

    def can_access_peer(self, other: "CudaDevice") -> bool:
        """Whether kernels and copies on this device can read/write `other`'s memory directly (NVLink or PCIe P2P)."""
        if other.ordinal == self.ordinal:
            return True
        return bool(check(cu.cuDeviceCanAccessPeer(self.handle, other.handle), "cuDeviceCanAccessPeer"))

    def enable_peer(self, other: "CudaDevice") -> bool:
        """Let this device's primary context reach `other`'s memory directly (cuCtxEnablePeerAccess; once per pair,
        what torch does for its own peer copies). Without it a cross-device copy is staged through host memory by
        the driver (~10x slower). Returns whether the pair has peer access."""
        if other.ordinal == self.ordinal:
            return True
        if other.ordinal not in self._peers:
            ok = self.can_access_peer(other)
            if ok:
                with self:
                    err, = cu.cuCtxEnablePeerAccess(other.context, 0)
                if err not in (cu.CUresult.CUDA_SUCCESS, cu.CUresult.CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED):
                    raise _error(err, "cuCtxEnablePeerAccess")
            self._peers[other.ordinal] = ok
        return self._peers[other.ordinal]

    def peer_rank(self, other: "CudaDevice") -> int:
        """The driver's relative performance rank of the link to `other` (0 = best); -1 when unknown."""
        attr = getattr(cu.CUdevice_P2PAttribute, "CU_DEVICE_P2P_ATTRIBUTE_PERFORMANCE_RANK", None)
        if attr is None or other.ordinal == self.ordinal:
            return -1
        err, rank = cu.cuDeviceGetP2PAttribute(attr, self.handle, other.handle)
        return int(rank) if err == cu.CUresult.CUDA_SUCCESS else -1

    def mem_info(self) -> tuple[int, int]:
        """(free, total) bytes on this device, as cuMemGetInfo sees them."""
        with self:
            return tuple(int(x) for x in check(cu.cuMemGetInfo(), "cuMemGetInfo"))  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"<CudaDevice {self.ordinal} {self.name} uuid={self.uuid.hex()}>"


def device_count() -> int:
    _require_driver()
    return int(check(cu.cuDeviceGetCount(), "cuDeviceGetCount"))


def get_device(device: int | None = None, device_uuid: bytes | None = None) -> CudaDevice:
    """The device by ordinal, or the one whose UUID is `device_uuid` (IncompatibleDevice when none is)."""
    _require_driver()
    with _lock:
        if device is None and device_uuid is None:
            device = 0
        if device is not None:
            if not isinstance(device, int) or isinstance(device, bool) or not 0 <= device < device_count():
                raise BackendError(f"no CUDA device {device!r} (there are {device_count()})")
            if device not in _devices:
                _devices[device] = CudaDevice(device)
            dev = _devices[device]
            if device_uuid is not None and dev.uuid != device_uuid:
                raise IncompatibleDevice(f"CUDA device {device} ({dev.name}) has UUID {dev.uuid.hex()}, "
                                         f"not {bytes(device_uuid).hex()}")
            return dev
        for i in range(device_count()):
            uuid = _uuid_bytes(check(cu.cuDeviceGetUuid(check(cu.cuDeviceGet(i), "cuDeviceGet")), "cuDeviceGetUuid"))
            if uuid == device_uuid:
                return get_device(i)
        raise IncompatibleDevice(f"no CUDA device has UUID {bytes(device_uuid or b'').hex()}: the memory was "
                                 "exported by another GPU or driver")


def _as_stream(stream: Any) -> Any:
    """None/int/CUstream/torch or CuPy stream → CUstream (None = the legacy default stream)."""
    if stream is None:
        return cu.CUstream(0)
    if isinstance(stream, cu.CUstream):
        return stream
    for attr in ("cuda_stream", "ptr"):  # torch.cuda.Stream, cupy.cuda.Stream
        if hasattr(stream, attr):
            return cu.CUstream(int(getattr(stream, attr)))
    return cu.CUstream(int(stream))


# -- CUDA array formats ------------------------------------------------------------------------------------------------
_ARRAY_FORMATS = {
    "u1": "CU_AD_FORMAT_UNSIGNED_INT8", "u2": "CU_AD_FORMAT_UNSIGNED_INT16", "u4": "CU_AD_FORMAT_UNSIGNED_INT32",
    "f2": "CU_AD_FORMAT_HALF", "f4": "CU_AD_FORMAT_FLOAT",
}


def array_format(fmt: Format) -> tuple[Any, int]:
    """(CUarray_format, NumChannels) holding one texel of `fmt` (packed formats as one 32-bit channel)."""
    dt = fmt.numpy_dtype
    key = f"{dt.kind}{dt.itemsize}"
    if key not in _ARRAY_FORMATS or fmt.channels not in (1, 2, 4):
        raise BackendError(f"format {fmt.name} has no CUDA array format")
    return getattr(cu.CUarray_format, _ARRAY_FORMATS[key]), fmt.channels


# -- external semaphores (the GPU half of a keyed mutex) --------------------------------------------------------------
class CudaSemaphore:
    """A Vulkan timeline semaphore imported into CUDA, waited and signalled on CUDA streams."""

    def __init__(self, device: CudaDevice, fd: int) -> None:
        """Takes ownership of `fd` (CUDA owns it after a successful import; closed here on failure)."""
        self.device, self.handle = device, None
        with close_on_error(functools.partial(os.close, fd)):
            check_semaphore_fd(fd, "cuImportExternalSemaphore")
            desc = cu.CUDA_EXTERNAL_SEMAPHORE_HANDLE_DESC()
            desc.type = cu.CUexternalSemaphoreHandleType.CU_EXTERNAL_SEMAPHORE_HANDLE_TYPE_TIMELINE_SEMAPHORE_FD
            desc.handle.fd = fd
            with device:
                self.handle = check(cu.cuImportExternalSemaphore(desc), "cuImportExternalSemaphore")

    def wait(self, value: int, stream: Any = None) -> None:
        """Work queued on `stream` after this waits (on the GPU) until the semaphore reaches `value`."""
        p = cu.CUDA_EXTERNAL_SEMAPHORE_WAIT_PARAMS()
        p.params.fence.value = int(value)
        with self.device:
            check(cu.cuWaitExternalSemaphoresAsync([self.handle], [p], 1, _as_stream(stream)),
                  "cuWaitExternalSemaphoresAsync")

    def signal(self, value: int, stream: Any = None) -> None:
        """The semaphore reaches `value` once the work queued on `stream` so far is done."""
        p = cu.CUDA_EXTERNAL_SEMAPHORE_SIGNAL_PARAMS()
        p.params.fence.value = int(value)
        with self.device:
            check(cu.cuSignalExternalSemaphoresAsync([self.handle], [p], 1, _as_stream(stream)),
                  "cuSignalExternalSemaphoresAsync")

    def destroy(self) -> None:
        h, self.handle = self.handle, None
        if h is not None:
            with self.device:
                check(cu.cuDestroyExternalSemaphore(h), "cuDestroyExternalSemaphore")


# -- the resource --------------------------------------------------------------------------------------------------------
class CUDAResource(Resource):
    """A texture or buffer visible to CUDA in this process.

    .device_ptr is the linear device address (buffers, cuda_vmm textures, linear Vulkan images); optimal-tiling
    Vulkan images have .array (a CUarray, mip 0) instead, read and written with the copy helpers. Views:
    __cuda_array_interface__ (CuPy, Numba) and __dlpack__ (torch.from_dlpack), zero-copy, (H, W, C) honouring the
    row pitch. A DLPack view keeps the memory mapped after close() until the consumer drops it.
    """

    backend_name = "cuda"
    device_copy = True

    def __init__(self, descriptor: Descriptor, device: CudaDevice, *, ptr: int = 0, pitch: int = 0,
                 array: Any = None, mipmap: Any = None, ext_mem: Any = None, vmm_handle: Any = None,
                 mapped_size: int = 0, exportable: bool = False) -> None:
        super().__init__(descriptor)
        self.device = device  # where this process uses it: its context, streams, DLPack device
        self.memory_device = device  # where the memory lives (another GPU of this host when access != "local")
        self.access = "local"  # "local" | "peer" (mapped over NVLink/PCIe P2P) | "copy" (reach it by peer_copy())
        self.consumer_device = device  # the device open(..., device=N) asked for; peer_copy()'s default target
        self._ptr, self._pitch, self.array, self._mipmap = int(ptr), pitch, array, mipmap
        self._ext_mem, self._vmm_handle, self._mapped_size = ext_mem, vmm_handle, mapped_size
        self.exportable = exportable
        self.semaphore: CudaSemaphore | None = None
        self.cuda_sync: str | None = None  # "timeline_semaphore" | "stream_sync": how the last release synced
        self.sync_stream: Any = None  # where keyed-mutex waits/signals go (a CUstream, torch or cupy stream); None: 0
        self._stream: Any = None
        self._views = 0
        self._cai_exported = False
        self._free_pending = False
        self._scratch_ptr = 0
        self._host: Any = None  # memfd imports: (mmap, its ctypes anchor, address) registered with cuMemHostRegister

    # -- addresses and layout ------------------------------------------------------------------------------------
    @property
    def device_ptr(self) -> int:
        self._check_open()
        if self.array is not None:
            raise BackendError("this optimal-tiling image lives in a CUDA array (.array): copy it with "
                               "copy_to_device()/download(); it has no linear device pointer")
        return self._ptr

    @property
    def row_pitch(self) -> int:
        return self._pitch

    @property
    def format(self) -> Format | None:
        return get_format(self.descriptor.format) if self.descriptor.kind == "texture2d" else None

    def _view_layout(self) -> tuple[int, tuple[int, ...], tuple[int, ...], np.dtype]:
        ptr, d = self.device_ptr, self.descriptor
        if d.kind == "texture2d":
            fmt = get_format(d.format)
            return ptr, self.shape, (self._pitch, fmt.bytes_per_pixel, fmt.numpy_dtype.itemsize), fmt.numpy_dtype
        return ptr, (d.size,), (1,), np.dtype(np.uint8)

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        """Consumers (CuPy, Numba, torch.as_tensor) keep this resource object as the owner of their arrays but
        tell nobody when they let go, so once handed out the memory is freed when the object itself is collected,
        not by close() (views keep the mapping alive, as with DLPack and memfd)."""
        ptr, shape, strides, dtype = self._view_layout()
        self._cai_exported = True
        return {"shape": shape, "typestr": dtype.str, "data": (ptr, False), "version": 3,
                "strides": strides if len(shape) > 1 else None}

    def __dlpack_device__(self) -> tuple[int, int]:
        return (KDLCUDA, self.device.ordinal)

    def __dlpack__(self, *, stream: Any = None, max_version: tuple[int, int] | None = None,
                   dl_device: Any = None, copy: bool | None = None) -> Any:
        """A DLPack capsule over the same memory. Work queued on .stream is finished first (our copies are
        synchronous), so any consumer stream sees complete data."""
        if copy:
            raise BufferError("texbridge CUDA resources only export zero-copy views")
        if dl_device is not None and tuple(dl_device) != self.__dlpack_device__():
            raise BufferError(f"the memory is on CUDA device {self.device.ordinal}, not {tuple(dl_device)}")
        self._check_open()
        if self._stream is not None:
            self.synchronize()
        return dlpack_capsule(self, bool(max_version and max_version[0] >= 1))

    def _view_released(self) -> None:
        self._views -= 1
        if self._views == 0 and self._free_pending:
            self._free()

    # -- streams and sync ----------------------------------------------------------------------------------------
    @property
    def stream(self) -> Any:
        """This resource's own CUDA stream (a blocking stream, created on first use; int(res.stream) is its address)."""
        self._check_open()
        if self._stream is None:
            with self.device:
                self._stream = check(cu.cuStreamCreate(0), "cuStreamCreate")
        return self._stream

    def synchronize(self, stream: Any = None) -> None:
        """Wait for `stream` (default: this resource's stream if it has one, else the legacy default stream)."""
        s = _as_stream(stream if stream is not None else self._stream)
        with self.device:
            check(cu.cuStreamSynchronize(s), "cuStreamSynchronize")

    def import_semaphore(self, fd: int) -> CudaSemaphore:
        """Attach a Vulkan timeline semaphore (OPAQUE_FD, e.g. VulkanDevice.sync_semaphore.export_fd()) that the
        peer signals with the keyed mutex's sync value; acquire/release then sync on the GPU. Takes `fd`."""
        self._check_open()
        sem = CudaSemaphore(self.device, fd)
        if self.semaphore is not None:
            self.semaphore.destroy()
        self.semaphore = sem
        return sem

    # -- keyed mutex ↔ GPU (called by the resource's ResourceMutex) ----------------------------------------------------
    def gpu_acquired(self, value: int) -> None:
        """With the resource's timeline semaphore, `sync_stream` (default: the legacy stream, which orders later
        work on blocking streams) waits on the GPU for the releaser's value; no CPU stall."""
        if self.semaphore is not None:
            self.semaphore.wait(value, self.sync_stream if self.sync_stream is not None else 0)

    def gpu_releasing(self, acquired_value: int) -> int | None:
        """Signal acquired+1 on `sync_stream` after the work queued there (timeline path), else synchronize it so
        the next owner sees finished memory. Records the path in `cuda_sync`."""
        stream = self.sync_stream if self.sync_stream is not None else 0
        if self.semaphore is not None:
            self.semaphore.signal(acquired_value + 1, stream)
            self.cuda_sync = "timeline_semaphore"
            return acquired_value + 1
        self.synchronize(stream)
        self.cuda_sync = "stream_sync"
        return None

    # -- export --------------------------------------------------------------------------------------------------
    def export_fds(self) -> list[int]:
        """A new POSIX fd for the allocation (cuMemExportToShareableHandle; the caller owns it)."""
        self._check_open()
        if self._vmm_handle is None:
            raise BackendError("only cuda_vmm memory can be exported from CUDA; Vulkan memory is exported by its "
                               "creator (the broker keeps its fd)")
        with self.device:
            return [int(check(cu.cuMemExportToShareableHandle(self._vmm_handle, _POSIX_FD, 0),
                              "cuMemExportToShareableHandle"))]

    # -- copies --------------------------------------------------------------------------------------------------
    def _row_bytes(self) -> int:
        d = self.descriptor
        return d.width * get_format(d.format).bytes_per_pixel

    def _here(self, layer: int) -> tuple[Any, ...]:
        d = self.descriptor
        if not 0 <= layer < d.array_size:
            raise ValueError(f"layer {layer} out of range (array_size {d.array_size})")
        if self.array is not None:
            return ("array", self.array, layer)
        return ("device", self._ptr, self._pitch)

    def _describe_copy(self, c: Any, src: tuple[Any, ...], dst: tuple[Any, ...]) -> Any:
        """Fill a CUDA_MEMCPY3D(_PEER) for mip 0 of the texture from `src` to `dst` (("array", a, layer),
        ("device", ptr, pitch) or ("host", ptr, pitch))."""
        d = self.descriptor
        c.WidthInBytes, c.Height, c.Depth = self._row_bytes(), d.height, 1
        for side, spec in (("src", src), ("dst", dst)):
            kind, what, extra = spec
            if kind == "array":
                setattr(c, side + "MemoryType", _ARRAY)
                setattr(c, side + "Array", what)
                setattr(c, side + "Z", extra)
            else:
                setattr(c, side + "MemoryType", _HOST if kind == "host" else _DEVICE)
                setattr(c, side + ("Host" if kind == "host" else "Device"), int(what))
                setattr(c, side + "Pitch", extra)
                setattr(c, side + "Height", d.height)
        return c

    def _copy(self, src: tuple[Any, ...], dst: tuple[Any, ...], stream: Any) -> None:
        c = self._describe_copy(cu.CUDA_MEMCPY3D(), src, dst)
        with self.device:
            if stream is None:
                check(cu.cuMemcpy3D(c), "cuMemcpy3D")
            else:
                check(cu.cuMemcpy3DAsync(c, _as_stream(stream)), "cuMemcpy3DAsync")

    def copy_to_device(self, dst_ptr: int, dst_pitch: int | None = None, *, layer: int = 0,
                       stream: Any = None) -> None:
        """Copy the texture (mip 0 of `layer`) into linear device memory at dst_ptr (rows dst_pitch apart)."""
        self._check_open()
        self._need_texture()
        self._copy(self._here(layer), ("device", int(dst_ptr), dst_pitch or self._row_bytes()), stream)

    def copy_from_device(self, src_ptr: int, src_pitch: int | None = None, *, layer: int = 0,
                         stream: Any = None) -> None:
        """Copy linear device memory at src_ptr (rows src_pitch apart) into the texture (mip 0 of `layer`)."""
        self._check_open()
        self._need_texture()
        self._copy(("device", int(src_ptr), src_pitch or self._row_bytes()), self._here(layer), stream)

    def peer_copy(self, out: "CUDAResource | None" = None, *, device: int | None = None,
                  stream: Any = None) -> "CUDAResource":
        """Copy this resource to another GPU of this host device to device (over NVLink/PCIe P2P when the devices
        can reach each other; the driver stages through host memory only when they cannot): into `out` (same
        geometry, any device), or into a new CUDA texture/buffer on `device` (default: the device open() was
        asked for). Runs on the keyed mutex's sync stream, so it is ordered after the GPU wait of acquire();
        returns when done unless `stream` is given. Returns `out`. The way to reach Vulkan/GL memory (which only
        its own device can import) from another GPU."""
        self._check_open()
        d = self.descriptor
        if out is None:
            target = self.consumer_device.ordinal if device is None else device
            out = (BACKEND.create_texture(d.width, d.height, d.format, device=target) if d.kind == "texture2d"
                   else BACKEND.create_buffer(d.size, device=target))
        elif not isinstance(out, CUDAResource) or out.closed:
            raise BackendError(f"peer_copy(out=...) needs an open CUDAResource, not {out!r}")
        o = out.descriptor
        if o.kind != d.kind or (d.kind == "texture2d" and (o.width, o.height, o.format) != (d.width, d.height,
                                                                                          d.format)) \
                or (d.kind != "texture2d" and o.size < d.size):
            raise BackendError(f"peer_copy: {out!r} does not have this resource's geometry ({d.kind} "
                               f"{d.width}x{d.height} {d.format}, {d.size} bytes)")
        if d.kind == "texture2d" and (d.array_size != 1 or o.array_size != 1):
            raise BackendError("peer_copy copies single-layer textures")
        run_on = stream if stream is not None else (self.sync_stream if self.sync_stream is not None else 0)
        self.device.enable_peer(out.device)
        out.device.enable_peer(self.device)
        with self.device:
            if d.kind == "texture2d":
                src = self._here(0)
                if self.array is not None and out.device.ordinal != self.device.ordinal:
                    # A tiled array read across the link is ~8x slower than linear memory: untile on this GPU
                    # first (fast), then one linear peer copy.
                    src = ("device", self._scratch(), self._row_bytes())
                    self._copy(self._here(0), src, run_on)
                c = self._describe_copy(cu.CUDA_MEMCPY3D_PEER(), src, out._here(0))
                c.srcContext, c.dstContext = self.device.context, out.device.context
                check(cu.cuMemcpy3DPeerAsync(c, _as_stream(run_on)), "cuMemcpy3DPeerAsync")
            else:
                check(cu.cuMemcpyPeerAsync(out.device_ptr, out.device.context, self.device_ptr, self.device.context,
                                           d.size, _as_stream(run_on)), "cuMemcpyPeerAsync")
            if stream is None:
                check(cu.cuStreamSynchronize(_as_stream(run_on)), "cuStreamSynchronize")
        return out

    def _scratch(self) -> int:
        """A linear buffer on this device holding one packed copy of the texture (peer_copy's untiling step)."""
        if self._scratch_ptr == 0:
            with self.device:
                self._scratch_ptr = int(check(cu.cuMemAlloc(self._row_bytes() * self.descriptor.height),
                                              "cuMemAlloc"))
        return self._scratch_ptr

    def copy_to(self, dst: "CUDAResource", *, stream: Any = None) -> None:
        """Copy this texture into texture `dst` (cuMemcpy3D between device memory and CUDA arrays; to another GPU of
        this host, peer_copy()). Complete when it returns (stream None; device-to-device copies are asynchronous to the host, so
        the stream is synchronized), so a receiver can re-check the slot's sequence after it; with a stream, the
        copy is queued there and the caller synchronizes."""
        self._check_open()
        if not isinstance(dst, CUDAResource):
            raise InvalidArgument(f"copy_to takes a CUDAResource, not {dst!r}")
        dst._check_open()
        self._need_texture()
        dst._need_texture()
        d, dd = self.descriptor, dst.descriptor
        if (d.width, d.height, d.format) != (dd.width, dd.height, dd.format):
            raise InvalidArgument(f"copy_to needs the same size and format: {d.width}x{d.height} {d.format} into "
                                  f"{dd.width}x{dd.height} {dd.format}")
        if dst.device.ordinal != self.device.ordinal:
            self.peer_copy(dst, stream=stream)  # another GPU of this host: device to device over the link
            return
        self._copy(self._here(0), dst._here(0), stream if stream is not None else 0)
        if stream is None:
            self.synchronize(0)

    def _need_texture(self) -> None:
        if self.descriptor.kind != "texture2d":
            raise BackendError("copy_to_device/copy_from_device are for textures; use device_ptr for buffers")

    def upload(self, array: np.ndarray, *, layer: int = 0) -> None:
        """Copy a host array (shape of download()) into the resource; returns when the copy is done."""
        self._check_open()
        d = self.descriptor
        if d.kind == "texture2d":
            host = np.ascontiguousarray(self._check_frame(array))
            self._copy(("host", host.ctypes.data, self._row_bytes()), self._here(layer), None)
            return
        host = self._check_bytes(array, d.size)
        with self.device:
            check(cu.cuMemcpyHtoD(self._ptr, host.ctypes.data, host.size), "cuMemcpyHtoD")

    def download(self, *, layer: int = 0) -> np.ndarray:
        """A host copy: (H, W, C) for textures (mip 0 of `layer`), 1-D uint8 for buffers."""
        self._check_open()
        d = self.descriptor
        if d.kind == "texture2d":
            out = np.empty(self.shape, get_format(d.format).numpy_dtype)
            self._copy(self._here(layer), ("host", out.ctypes.data, self._row_bytes()), None)
            return out
        out = np.empty(d.size, np.uint8)
        with self.device:
            check(cu.cuMemcpyDtoH(out.ctypes.data, self._ptr, d.size), "cuMemcpyDtoH")
        return out

    def clear(self, word: int = 0, *, stream: Any = None) -> None:
        """Fill linear memory with the 32-bit `word` on the GPU (textures: every texel row, padding untouched)."""
        self._check_open()
        d, s = self.descriptor, _as_stream(stream)
        with self.device:
            if d.kind != "texture2d":
                check(cu.cuMemsetD32Async(self.device_ptr, word & 0xFFFFFFFF, d.size // 4, s), "cuMemsetD32Async")
                return
            if self._row_bytes() % 4:
                raise BackendError(f"rows of {self._row_bytes()} bytes are not whole 32-bit words")
            check(cu.cuMemsetD2D32Async(self.device_ptr, self._pitch, word & 0xFFFFFFFF, self._row_bytes() // 4,
                                        d.height, s), "cuMemsetD2D32Async")

    # -- lifetime ------------------------------------------------------------------------------------------------
    def _release(self) -> None:
        if self._views or self._cai_exported:
            # A DLPack consumer still maps it (free when the last view goes), or a __cuda_array_interface__
            # consumer may (free when this object is collected: its arrays hold it as their owner).
            self._free_pending = True
            return
        self._free()

    def __del__(self) -> None:
        super().__del__()
        if getattr(self, "_free_pending", False) and not self._views:
            try:
                self._free()
            except Exception:
                pass  # interpreter shutdown: the driver frees everything with the context

    def _free(self) -> None:
        """Destroy every CUDA object, in dependency order; state is swapped out first so nothing is freed twice."""
        self._free_pending = False
        sem, self.semaphore = self.semaphore, None
        stream, self._stream = self._stream, None
        ptr, self._ptr = self._ptr, 0
        mipmap, self._mipmap, self.array = self._mipmap, None, None
        ext_mem, self._ext_mem = self._ext_mem, None
        vmm, self._vmm_handle = self._vmm_handle, None
        scratch, self._scratch_ptr = self._scratch_ptr, 0
        host, self._host = self._host, None
        with self.device:
            # Nothing queued may still touch the memory: our stream, and the legacy stream (which waits for all
            # blocking streams, torch's default included).
            if stream is not None:
                check(cu.cuStreamSynchronize(stream), "cuStreamSynchronize")
            check(cu.cuStreamSynchronize(cu.CUstream(0)), "cuStreamSynchronize")
            try:
                if scratch:
                    check(cu.cuMemFree(scratch), "cuMemFree")
                if vmm is not None:
                    _unmap(ptr, self._mapped_size, vmm)
                elif host is not None:
                    check(cu.cuMemHostUnregister(host[2]), "cuMemHostUnregister")
                else:
                    if ptr:
                        check(cu.cuMemFree(ptr), "cuMemFree")
                    if mipmap is not None:
                        check(cu.cuMipmappedArrayDestroy(mipmap), "cuMipmappedArrayDestroy")
                    if ext_mem is not None:
                        check(cu.cuDestroyExternalMemory(ext_mem), "cuDestroyExternalMemory")
            finally:
                if stream is not None:
                    cu.cuStreamDestroy(stream)
                if sem is not None:
                    sem.destroy()


# -- VMM helpers ---------------------------------------------------------------------------------------------------------
def _map(dev: CudaDevice, handle: Any, size: int) -> int:
    """Reserve a VA range, map `handle` there and give `dev` read-write access (the memory may live on another
    device that `dev` reaches peer to peer: VMM access is granted per device). Current context needed."""
    ptr = int(check(cu.cuMemAddressReserve(size, dev.granularity, 0, 0), "cuMemAddressReserve"))
    with close_on_error(lambda: cu.cuMemAddressFree(ptr, size)):
        check(cu.cuMemMap(ptr, size, 0, handle, 0), "cuMemMap")
        with close_on_error(lambda: cu.cuMemUnmap(ptr, size)):
            access = cu.CUmemAccessDesc()
            access.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
            access.location.id = dev.ordinal
            access.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
            check(cu.cuMemSetAccess(ptr, size, [access], 1), "cuMemSetAccess")
    return ptr


def _unmap(ptr: int, size: int, handle: Any) -> None:
    try:
        if ptr:
            check(cu.cuMemUnmap(ptr, size), "cuMemUnmap")
            check(cu.cuMemAddressFree(ptr, size), "cuMemAddressFree")
    finally:
        check(cu.cuMemRelease(handle), "cuMemRelease")


def _unmap_on(dev: CudaDevice, ptr: int, size: int, handle: Any) -> None:
    """_unmap with `dev`'s context current (for cleanups that run outside one)."""
    with dev:
        _unmap(ptr, size, handle)


def _options(options: dict[str, Any]) -> tuple[int | None, bytes | None]:
    device, device_uuid = options.pop("device", None), options.pop("device_uuid", None)
    if options:
        raise TypeError(f"cuda backend options are device= and device_uuid=, not {', '.join(options)}")
    return device, device_uuid


# -- the backend -----------------------------------------------------------------------------------------------------------
class CUDABackend:
    """CUDA as producer (cuda_vmm) and as importer (cuda_vmm, opaque_fd from Vulkan)."""

    name = "cuda"

    def _allocate(self, dev: CudaDevice, nbytes: int) -> tuple[Any, int, int]:
        """(handle, device pointer, allocation size): fd-exportable device memory, mapped and zeroed."""
        if not dev.vmm_posix_fd:
            raise BackendError(f"{dev.name}: cuMemCreate cannot export POSIX fds "
                               "(CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED = 0)")
        size = align(nbytes, dev.granularity)
        with dev:
            handle = check(cu.cuMemCreate(size, dev.alloc_prop(), 0), "cuMemCreate")
            with close_on_error(lambda: cu.cuMemRelease(handle)):
                ptr = _map(dev, handle, size)
            with close_on_error(lambda: _unmap(ptr, size, handle)):
                check(cu.cuMemsetD8(ptr, 0, size), "cuMemsetD8")  # defined contents, like a memfd
        return handle, ptr, size

    def create_texture(self, width: int, height: int, format: str, *, usage: int = int(Usage.DEFAULT),
                       keyed_mutex: bool = False, **options: Any) -> CUDAResource:
        """A pitch-linear texture (rows aligned to 256 bytes) in fd-exportable device memory, zeroed."""
        dev = get_device(*_options(options))
        fmt = get_format(format)
        check_texture_size(width, height)
        pitch, nbytes = texture_layout(width, height, fmt.name)
        handle, ptr, size = self._allocate(dev, nbytes)
        with close_on_error(functools.partial(_unmap_on, dev, ptr, size, handle)):
            desc = Descriptor(
                kind="texture2d", size=size, width=width, height=height, format=fmt.name, planes=((0, pitch),),
                memory="cuda_vmm", backend="cuda", device_uuid=dev.uuid, usage=int(usage), keyed_mutex=keyed_mutex,
                runtime_private=d3d11_texture_desc(width, height, fmt.name, keyed_mutex=keyed_mutex),
                driver_private={"granularity": dev.granularity, "allocation_size": size, "pitch": pitch}).validate()
        return CUDAResource(desc, dev, ptr=ptr, pitch=pitch, vmm_handle=handle, mapped_size=size, exportable=True)

    def create_buffer(self, size: int, *, usage: int = int(Usage.DEFAULT), keyed_mutex: bool = False,
                      **options: Any) -> CUDAResource:
        """A buffer of `size` bytes rounded up to the allocation granularity (descriptor.size says how much)."""
        dev = get_device(*_options(options))
        if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= 1 << 40:
            raise InvalidDescriptor(f"size must be a positive integer, not {size!r}")
        handle, ptr, alloc = self._allocate(dev, size)
        with close_on_error(functools.partial(_unmap_on, dev, ptr, alloc, handle)):
            desc = Descriptor(kind="buffer", size=alloc, memory="cuda_vmm", backend="cuda", device_uuid=dev.uuid,
                              usage=int(usage), keyed_mutex=keyed_mutex,
                              driver_private={"granularity": dev.granularity, "allocation_size": alloc,
                                              "requested_size": size}).validate()
        return CUDAResource(desc, dev, ptr=ptr, vmm_handle=handle, mapped_size=alloc, exportable=True)

    def import_resource(self, descriptor: Descriptor, fds: Sequence[int], **options: Any) -> CUDAResource:
        """Map memory another process exported. Takes ownership of every fd, on success and failure alike."""
        with OwnedFds.for_import(descriptor, fds) as owned:  # closes what the import did not take
            res = self._import(descriptor, owned, options)
            sem_fd = owned.take_one(FD_SEMAPHORE)
            if sem_fd >= 0:
                with close_on_error(res.close):
                    res.import_semaphore(sem_fd)  # the exporter's timeline: keyed-mutex handoffs order on the GPU
            return res

    def _import(self, descriptor: Descriptor, fds: OwnedFds, options: dict[str, Any]) -> CUDAResource:
        device, device_uuid = _options(options)
        d = descriptor
        if fds.get(FD_MEMORY) < 0:
            raise InvalidDescriptor("import needs the memory fd")
        if check_importer(d.memory, "cuda").host_mappable:
            return _import_host(get_device(device, device_uuid), d, fds)
        if d.kind not in ("texture2d", "buffer"):
            raise InvalidDescriptor(f"the cuda backend cannot import a {d.kind}")
        if len(d.device_uuid) != 16:
            raise InvalidDescriptor(f"{d.memory} memory must name its device UUID")
        if device_uuid is not None and device_uuid != d.device_uuid:
            raise IncompatibleDevice("device_uuid= differs from the UUID of the device that exported the memory")
        home = get_device(None, d.device_uuid)  # where the memory lives; IncompatibleDevice: not on this host
        consumer = home if device is None else get_device(device)
        if d.memory == "cuda_vmm":
            if not consumer.can_access_peer(home):
                raise IncompatibleDevice(
                    f"CUDA device {consumer.ordinal} ({consumer.name}) cannot access device {home.ordinal}'s memory "
                    f"peer to peer (cuDeviceCanAccessPeer = 0): open it on device {home.ordinal} and peer_copy() it")
            res = _import_vmm(consumer, d, fds.get(FD_MEMORY))  # mapped for the consumer: over the link if remote
            res.memory_device, res.access = home, ("local" if consumer is home else "peer")
            return res
        res = _import_opaque(home, d, fds)  # OPAQUE_FD memory imports only on the device that made it
        res.consumer_device, res.access = consumer, ("local" if consumer is home else "copy")
        return res

    def import_semaphore(self, fd: int, *, device: int | None = None) -> CudaSemaphore:
        """Import a Vulkan timeline semaphore (OPAQUE_FD). Takes ownership of `fd`."""
        with close_on_error(functools.partial(os.close, fd)):
            dev = get_device(device)
        return CudaSemaphore(dev, fd)

    def diagnostics(self) -> dict[str, Any]:
        try:
            reason = unavailable_reason()
            if reason:
                return {"available": False, "detail": reason}
            version = int(check(cu.cuDriverGetVersion(), "cuDriverGetVersion"))
            devices = []
            for i in range(device_count()):
                dev = get_device(i)
                devices.append({
                    "ordinal": i, "name": dev.name, "uuid": dev.uuid.hex(), "vmm_posix_fd": dev.vmm_posix_fd,
                    "compute_capability": f"{dev.attribute('CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR')}."
                                          f"{dev.attribute('CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR')}",
                    "memory_bytes": dev.mem_info()[1]})
            usable = [d for d in devices if d["vmm_posix_fd"]]
            report = {"available": True, "driver_version": f"{version // 1000}.{version % 1000 // 10}",
                      "devices": devices,
                      "detail": f"{devices[0]['name']}: opaque_fd import" +
                                (", cuda_vmm export/import (POSIX fds)" if usable else ", no cuda_vmm POSIX fd export")}
            if len(devices) > 1:
                report["peers"] = topology()
                direct = sum(p["peer_access"] for p in report["peers"])
                report["detail"] += f"; {len(devices)} GPUs, {direct} of {len(report['peers'])} pairs peer to peer"
            return report
        except Exception as e:  # never raises: doctor reports instead
            return {"available": False, "detail": f"{type(e).__name__}: {e}"}


def _link_types() -> dict[tuple[int, int], str]:
    """(i, j) -> the link nvidia-smi names between GPUs i and j ("NV18", "SYS", "PHB"...), {} without nvidia-smi.
    nvidia-smi numbers GPUs in PCI order, as CUDA does unless CUDA_DEVICE_ORDER says otherwise."""
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {}
    try:
        text = subprocess.run([exe, "topo", "-m"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # nvidia-smi underlines the header on a terminal-like output
    rows = [line.split() for line in text.splitlines() if line.strip()]
    if not rows:
        return {}
    gpus = [c for c in rows[0] if c.startswith("GPU") and c[3:].isdigit()]
    links = {}
    for row in rows[1:]:
        if row and row[0].startswith("GPU") and row[0][3:].isdigit() and len(row) > len(gpus):
            for j, value in enumerate(row[1:1 + len(gpus)]):
                links[(int(row[0][3:]), j)] = value
    return links


def topology() -> list[dict[str, Any]]:
    """Every ordered pair of CUDA devices: peer access, the driver's link rank, the link type, and the path each
    kind of memory takes from the first device (where it lives) to the second (who uses it)."""
    links = _link_types()
    pairs = []
    for i in range(device_count()):
        for j in range(device_count()):
            if i == j:
                continue
            home, user = get_device(i), get_device(j)
            peer = user.can_access_peer(home)
            pairs.append({
                "from": i, "to": j, "peer_access": peer, "link": links.get((i, j), "unknown"),
                "rank": user.peer_rank(home),
                "cuda_vmm": "peer-mapped, zero-copy (open(..., device=N))" if peer else "refused: no peer access",
                "vulkan/gl memory": ("peer copy (peer_copy(), cuMemcpy3DPeer)" if peer
                                     else "peer_copy() staged through host memory by the driver")})
    return pairs


def _import_vmm(dev: CudaDevice, d: Descriptor, fd: int) -> CUDAResource:
    dp = d.driver_private
    size = private_int(dp, "allocation_size", d.size)
    if size != d.size or size % dev.granularity:
        raise InvalidDescriptor(f"cuda_vmm size {d.size} (allocation {size}) is not a whole number of "
                                f"{dev.granularity}-byte granules")
    pitch = 0
    if d.kind == "texture2d":
        get_format(d.format)
        if len(d.planes) != 1 or d.offset != 0 or d.mip_levels != 1 or d.array_size != 1:
            raise InvalidDescriptor("a cuda_vmm texture is one pitch-linear plane at offset 0")
        pitch = d.row_pitch
    with dev:
        handle = check(cu.cuMemImportFromShareableHandle(fd, _POSIX_FD), "cuMemImportFromShareableHandle")
        # The import does not take the fd: the allocation now lives in `handle`; the caller's OwnedFds closes fd.
        with close_on_error(lambda: cu.cuMemRelease(handle)):
            ptr = _map(dev, handle, size)
    return CUDAResource(d, dev, ptr=ptr, pitch=pitch, vmm_handle=handle, mapped_size=size, exportable=True)


def _import_host(dev: CudaDevice, d: Descriptor, fds: OwnedFds) -> CUDAResource:
    """memfd → CUDA with no staging copy: the shared pages are mapped, page-locked and mapped into the device's
    address space (cuMemHostRegister DEVICEMAP), so kernels and copies read and write the very pages NumPy sees,
    over the bus. .device_ptr / DLPack point at them. The fd closes with `fds` (the mapping keeps the pages)."""
    import ctypes
    import mmap

    if d.kind not in ("texture2d", "buffer") or d.mip_levels != 1 or d.array_size != 1:
        raise InvalidDescriptor("the cuda backend maps memfd textures (one mip, one layer) and buffers")
    facts = inspect_fd(fds.get(FD_MEMORY))
    if not facts.size_sealed or facts.size < d.required_size():
        raise InvalidDescriptor("memory is not a size-sealed memfd large enough for its descriptor")
    mm = mmap.mmap(fds.get(FD_MEMORY), facts.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    anchor = ctypes.c_char.from_buffer(mm)  # pins the mmap (it cannot close under the registration)
    addr = ctypes.addressof(anchor)
    size = align(facts.size, mmap.PAGESIZE)  # the kernel maps whole pages; registration is by page

    def unmap() -> None:
        nonlocal anchor
        del anchor
        mm.close()

    with close_on_error(unmap), dev:
        flags = getattr(cu, "CU_MEMHOSTREGISTER_DEVICEMAP", 2) | getattr(cu, "CU_MEMHOSTREGISTER_PORTABLE", 1)
        check(cu.cuMemHostRegister(addr, size, flags), "cuMemHostRegister")
        with close_on_error(lambda: cu.cuMemHostUnregister(addr)):
            ptr = int(check(cu.cuMemHostGetDevicePointer(addr, 0), "cuMemHostGetDevicePointer"))
    offset = d.offset if d.kind == "texture2d" else 0
    res = CUDAResource(d, dev, ptr=ptr + offset, pitch=d.row_pitch if d.kind == "texture2d" else 0)
    res._host = (mm, anchor, addr)
    return res


def _import_opaque(dev: CudaDevice, d: Descriptor, fds: OwnedFds) -> CUDAResource:
    """OPAQUE_FD import of the memory fd, taken from `fds` once CUDA owns it (a successful cuImportExternalMemory)."""
    dp = d.driver_private
    alloc = private_int(dp, "allocation_size", d.size)
    if alloc != d.size:
        raise InvalidDescriptor(f"allocation_size {alloc} differs from the descriptor size {d.size}")
    tiling = dp.get("tiling", "optimal") if d.kind == "texture2d" else None
    pitch = offset = 0
    if d.kind == "texture2d":
        fmt = get_format(d.format)
        if tiling == "linear":
            layouts = dp.get("plane_layouts")
            if isinstance(layouts, list) and layouts and isinstance(layouts[0], dict):
                offset, pitch = private_int(layouts[0], "offset", 0), private_int(layouts[0], "row_pitch")
            elif "row_pitch" in dp:
                offset, pitch = private_int(dp, "offset", 0), private_int(dp, "row_pitch")
            elif d.planes:
                offset, pitch = d.offset, d.row_pitch
            else:
                raise InvalidDescriptor("a linear image descriptor needs its row pitch (planes or driver_private)")
            if d.array_size != 1 or d.mip_levels != 1 or pitch < d.width * fmt.bytes_per_pixel \
                    or offset + pitch * d.height > alloc:
                raise InvalidDescriptor("linear image layout does not fit its allocation")
        elif tiling == "optimal":
            cu_format, channels = array_format(fmt)
        else:
            raise InvalidDescriptor(f"the cuda backend cannot map {tiling!r} images (optimal or linear tiling only)")
    hd = cu.CUDA_EXTERNAL_MEMORY_HANDLE_DESC()
    hd.type = cu.CUexternalMemoryHandleType.CU_EXTERNAL_MEMORY_HANDLE_TYPE_OPAQUE_FD
    hd.handle.fd = fds.get(FD_MEMORY)
    hd.size = alloc
    hd.flags = cu.CUDA_EXTERNAL_MEMORY_DEDICATED if dp.get("dedicated") else 0
    with dev:
        ext = check(cu.cuImportExternalMemory(hd), "cuImportExternalMemory")
        fds.take(FD_MEMORY)  # CUDA owns the fd now
        with close_on_error(lambda: cu.cuDestroyExternalMemory(ext)):
            if tiling == "optimal":
                md = cu.CUDA_EXTERNAL_MEMORY_MIPMAPPED_ARRAY_DESC()
                md.offset = 0
                a = md.arrayDesc
                a.Width, a.Height, a.Depth = d.width, d.height, d.array_size if d.array_size > 1 else 0
                a.Format, a.NumChannels = cu_format, channels
                vk_usage = private_int(dp, "vk_usage", 0)
                flags = cu.CUDA_ARRAY3D_LAYERED if d.array_size > 1 else 0
                if vk_usage & _VK_COLOR_ATTACHMENT:
                    flags |= cu.CUDA_ARRAY3D_COLOR_ATTACHMENT
                if vk_usage & _VK_STORAGE:
                    flags |= cu.CUDA_ARRAY3D_SURFACE_LDST
                a.Flags = flags
                md.numLevels = d.mip_levels
                mipmap = check(cu.cuExternalMemoryGetMappedMipmappedArray(ext, md),
                               "cuExternalMemoryGetMappedMipmappedArray")
                with close_on_error(lambda: cu.cuMipmappedArrayDestroy(mipmap)):
                    array = check(cu.cuMipmappedArrayGetLevel(mipmap, 0), "cuMipmappedArrayGetLevel")
                return CUDAResource(d, dev, array=array, mipmap=mipmap, ext_mem=ext)
            bd = cu.CUDA_EXTERNAL_MEMORY_BUFFER_DESC()
            bd.offset, bd.size = offset, (alloc - offset)
            ptr = int(check(cu.cuExternalMemoryGetMappedBuffer(ext, bd), "cuExternalMemoryGetMappedBuffer"))
            return CUDAResource(d, dev, ptr=ptr, pitch=pitch, ext_mem=ext)


BACKEND = CUDABackend()

__all__ = ["BACKEND", "CUDABackend", "CUDAResource", "CudaDevice", "CudaError", "CudaOutOfMemory", "CudaSemaphore",
           "array_format", "check", "device_count", "get_device", "topology", "unavailable_reason"]
