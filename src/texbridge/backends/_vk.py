"""Vulkan plumbing for the vulkan backend: the one VkResult wrapper, the device wrapper, GPU sync, object tracking.

We call the raw cffi `lib` of the `vulkan` package rather than its Python wrappers: pNext chains stay explicit (we
keep every chained struct alive ourselves), and an import costs a handful of C calls instead of hundreds of Python
ones, which matters for the "open → VkImage in under a millisecond" target.
"""

from __future__ import annotations

import atexit
import collections
import os
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable

try:
    import vulkan as _vkmod  # ImportError here is what makes the backend "unavailable" (see backends/__init__.py)
except OSError as _e:  # the package is there but libvulkan.so.1 is not: same meaning for the loader
    raise ImportError(f"the Vulkan loader (libvulkan.so.1) cannot be loaded: {_e}") from _e

from .._descriptor import FD_SEMAPHORE
from .._errors import BackendError, InvalidDescriptor
from ._fds import OwnedFds, check_semaphore_fd, close_on_error

ffi, lib = _vkmod.ffi, _vkmod.lib
vk = _vkmod  # constants

_RESULT_NAMES: dict[int, str] = dict(ffi.typeof("VkResult").elements)


class VulkanError(BackendError):
    """A Vulkan call returned an error VkResult; `.result` is the code, `.call` the function that failed."""

    def __init__(self, message: str, result: int = 0, call: str = "") -> None:
        super().__init__(message)
        self.result, self.call = result, call


class VulkanOutOfMemory(VulkanError):
    """VK_ERROR_OUT_OF_HOST_MEMORY / OUT_OF_DEVICE_MEMORY / TOO_MANY_OBJECTS."""


class VulkanInvalidHandle(VulkanError):
    """VK_ERROR_INVALID_EXTERNAL_HANDLE: the fd is not memory this driver can import (wrong kind, wrong device)."""


class VulkanDeviceLost(VulkanError):
    """VK_ERROR_DEVICE_LOST: the GPU context died; every object of the device is unusable."""


_ERROR_CLASSES = {
    vk.VK_ERROR_OUT_OF_HOST_MEMORY: VulkanOutOfMemory,
    vk.VK_ERROR_OUT_OF_DEVICE_MEMORY: VulkanOutOfMemory,
    vk.VK_ERROR_TOO_MANY_OBJECTS: VulkanOutOfMemory,
    vk.VK_ERROR_INVALID_EXTERNAL_HANDLE: VulkanInvalidHandle,
    vk.VK_ERROR_DEVICE_LOST: VulkanDeviceLost,
}


def check(result: int, call: str) -> int:
    """THE VkResult → exception wrapper: negative results raise a BackendError subclass, others pass through."""
    if result >= 0:
        return result
    name = _RESULT_NAMES.get(result, f"VkResult {result}")
    raise _ERROR_CLASSES.get(result, VulkanError)(f"{call} failed: {name}", result, call)


# -- live-object tracking ------------------------------------------------------------------------------------------
# Every Vulkan object this module or the backend creates is counted here and uncounted when destroyed, so tests can
# prove that 1,000 open/close cycles leave nothing behind.
_live: collections.Counter[str] = collections.Counter()
_live_lock = threading.Lock()


def track(kind: str, delta: int = 1) -> None:
    with _live_lock:
        _live[kind] += delta
        if _live[kind] == 0:
            del _live[kind]


def live_objects() -> dict[str, int]:
    """Vulkan objects created by texbridge and not yet destroyed, by type."""
    with _live_lock:
        return dict(_live)


# -- helpers ---------------------------------------------------------------------------------------------------------
def version_str(v: int) -> str:
    return f"{(v >> 22) & 0x7F}.{(v >> 12) & 0x3FF}.{v & 0xFFF}"


def _api(major: int, minor: int) -> int:
    return (major << 22) | (minor << 12)


API_1_1, API_1_2, API_1_3 = _api(1, 1), _api(1, 2), _api(1, 3)

EXT_MEMORY_FD = "VK_KHR_external_memory_fd"
EXT_SEMAPHORE_FD = "VK_KHR_external_semaphore_fd"
EXT_TIMELINE = "VK_KHR_timeline_semaphore"
EXT_DMA_BUF = "VK_EXT_external_memory_dma_buf"
EXT_DRM_MODIFIER = "VK_EXT_image_drm_format_modifier"
EXT_MEMORY_HOST = "VK_EXT_external_memory_host"
EXT_IMAGE_FORMAT_LIST = "VK_KHR_image_format_list"  # needed by drm_format_modifier before Vulkan 1.2
WANTED_EXTENSIONS = (EXT_MEMORY_FD, EXT_SEMAPHORE_FD, EXT_TIMELINE, EXT_DMA_BUF, EXT_DRM_MODIFIER, EXT_MEMORY_HOST)

HANDLE_OPAQUE_FD = vk.VK_EXTERNAL_MEMORY_HANDLE_TYPE_OPAQUE_FD_BIT
HANDLE_DMA_BUF = vk.VK_EXTERNAL_MEMORY_HANDLE_TYPE_DMA_BUF_BIT_EXT
HANDLE_HOST = vk.VK_EXTERNAL_MEMORY_HANDLE_TYPE_HOST_ALLOCATION_BIT_EXT
HANDLE_NAMES = {HANDLE_OPAQUE_FD: "opaque_fd", HANDLE_DMA_BUF: "dma_buf", HANDLE_HOST: "host_allocation"}
SEM_OPAQUE_FD = vk.VK_EXTERNAL_SEMAPHORE_HANDLE_TYPE_OPAQUE_FD_BIT


def _cstr(chars: Any) -> str:
    return ffi.string(chars).decode("utf-8", "replace")


@dataclass
class PhysicalDeviceInfo:
    """What texbridge needs to know about one physical device, gathered once."""

    handle: Any
    index: int
    name: str
    api_version: int
    vendor_id: int
    device_id: int
    driver_uuid: bytes
    device_uuid: bytes
    extensions: frozenset[str]
    driver_name: str = ""
    min_host_pointer_alignment: int = 0
    timeline_feature: bool = False

    @property
    def external_memory_fd(self) -> bool:
        return EXT_MEMORY_FD in self.extensions

    @property
    def external_semaphore_fd(self) -> bool:
        return EXT_SEMAPHORE_FD in self.extensions

    @property
    def dma_buf(self) -> bool:
        return EXT_DMA_BUF in self.extensions and EXT_DRM_MODIFIER in self.extensions

    @property
    def external_memory_host(self) -> bool:
        return EXT_MEMORY_HOST in self.extensions

    def summary(self) -> dict[str, Any]:
        return {
            "index": self.index, "name": self.name, "driver": self.driver_name,
            "api_version": version_str(self.api_version),
            "vendor_id": f"0x{self.vendor_id:04x}", "device_id": f"0x{self.device_id:04x}",
            "driver_uuid": self.driver_uuid.hex(), "device_uuid": self.device_uuid.hex(),
            "external_memory_fd": self.external_memory_fd, "external_semaphore_fd": self.external_semaphore_fd,
            "timeline_semaphore": self.timeline_feature, "dma_buf_with_drm_modifier": self.dma_buf,
            "external_memory_host": self.external_memory_host,
        }


def _instance_proc(instance: Any, name: str) -> Any:
    p = lib.vkGetInstanceProcAddr(instance, name.encode())
    if p == ffi.NULL:
        return None
    return ffi.cast(f"PFN_{name}", p)


def describe_physical_device(instance: Any, handle: Any, index: int) -> PhysicalDeviceInfo:
    """Properties, UUIDs and extensions of one physical device (needs Vulkan 1.1 for the *2 queries)."""
    props = ffi.new("VkPhysicalDeviceProperties*")
    lib.vkGetPhysicalDeviceProperties(handle, props)
    api = props.apiVersion
    count = ffi.new("uint32_t*")
    check(lib.vkEnumerateDeviceExtensionProperties(handle, ffi.NULL, count, ffi.NULL), "vkEnumerateDeviceExtensionProperties")
    arr = ffi.new("VkExtensionProperties[]", count[0])
    check(lib.vkEnumerateDeviceExtensionProperties(handle, ffi.NULL, count, arr), "vkEnumerateDeviceExtensionProperties")
    exts = frozenset(_cstr(arr[i].extensionName) for i in range(count[0]))
    info = PhysicalDeviceInfo(handle, index, _cstr(props.deviceName), api, props.vendorID, props.deviceID,
                              b"", b"", exts)
    if api < API_1_1:
        return info
    ids = ffi.new("VkPhysicalDeviceIDProperties*", {"sType": vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_ID_PROPERTIES})
    host = ffi.new("VkPhysicalDeviceExternalMemoryHostPropertiesEXT*",
                   {"sType": vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_EXTERNAL_MEMORY_HOST_PROPERTIES_EXT, "pNext": ids})
    drv = ffi.new("VkPhysicalDeviceDriverProperties*",
                  {"sType": vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_DRIVER_PROPERTIES,
                   "pNext": host if info.external_memory_host else ids})
    has_driver_props = api >= API_1_2 or "VK_KHR_driver_properties" in exts
    head = drv if has_driver_props else (host if info.external_memory_host else ids)
    props2 = ffi.new("VkPhysicalDeviceProperties2*",
                     {"sType": vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PROPERTIES_2, "pNext": head})
    lib.vkGetPhysicalDeviceProperties2(handle, props2)
    info.driver_uuid = bytes(ffi.buffer(ids.driverUUID, 16))
    info.device_uuid = bytes(ffi.buffer(ids.deviceUUID, 16))
    if info.external_memory_host:
        info.min_host_pointer_alignment = host.minImportedHostPointerAlignment
    if has_driver_props:
        info.driver_name = _cstr(drv.driverName)
    if api >= API_1_2 or EXT_TIMELINE in exts:
        tl = ffi.new("VkPhysicalDeviceTimelineSemaphoreFeatures*",
                     {"sType": vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_TIMELINE_SEMAPHORE_FEATURES})
        f2 = ffi.new("VkPhysicalDeviceFeatures2*", {"sType": vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2, "pNext": tl})
        lib.vkGetPhysicalDeviceFeatures2(handle, f2)
        info.timeline_feature = bool(tl.timelineSemaphore)
    return info


def create_instance(api_version: int = API_1_3) -> Any:
    """A bare instance (no layers, no WSI) at the highest API the loader offers, at least 1.1."""
    try:
        ver = ffi.new("uint32_t*")
        check(lib.vkEnumerateInstanceVersion(ver), "vkEnumerateInstanceVersion")
        loader = ver[0]
    except AttributeError:  # a 1.0 loader has no vkEnumerateInstanceVersion
        loader = _api(1, 0)
    if loader < API_1_1:
        raise BackendError(f"the Vulkan loader offers {version_str(loader)}; texbridge needs Vulkan 1.1")
    name = ffi.new("char[]", b"texbridge")
    app = ffi.new("VkApplicationInfo*", {"sType": vk.VK_STRUCTURE_TYPE_APPLICATION_INFO, "pApplicationName": name,
                                         "apiVersion": min(api_version, loader)})
    info = ffi.new("VkInstanceCreateInfo*", {"sType": vk.VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO,
                                             "pApplicationInfo": app})
    out = ffi.new("VkInstance*")
    check(lib.vkCreateInstance(info, ffi.NULL, out), "vkCreateInstance")
    track("VkInstance")
    return out[0]


def enumerate_physical_devices(instance: Any) -> list[PhysicalDeviceInfo]:
    count = ffi.new("uint32_t*")
    check(lib.vkEnumeratePhysicalDevices(instance, count, ffi.NULL), "vkEnumeratePhysicalDevices")
    arr = ffi.new("VkPhysicalDevice[]", count[0])
    check(lib.vkEnumeratePhysicalDevices(instance, count, arr), "vkEnumeratePhysicalDevices")
    return [describe_physical_device(instance, arr[i], i) for i in range(count[0])]


def _as_handle(ctype: str, value: Any) -> Any:
    """Accept a handle from this cffi module, from another binding (an int address) or None."""
    if value is None:
        return None
    if isinstance(value, int):
        return ffi.cast(ctype, value)
    if isinstance(value, ffi.CData):
        return ffi.cast(ctype, value) if ffi.typeof(value) != ffi.typeof(ctype) else value
    raise TypeError(f"expected a {ctype} (cffi handle or integer address), not {type(value).__name__}")


def select_physical_device(devices: list[PhysicalDeviceInfo], select: Any = None) -> PhysicalDeviceInfo:
    """Pick by index (int), name substring (str), device UUID (16 bytes or 32 hex chars); default: the first
    device with VK_KHR_external_memory_fd."""
    if not devices:
        raise BackendError("no Vulkan physical device found")
    if select is None:
        for d in devices:
            if d.external_memory_fd and d.api_version >= API_1_1:
                return d
        raise BackendError(f"no Vulkan 1.1 device with {EXT_MEMORY_FD}: "
                           + ", ".join(f"{d.name} ({version_str(d.api_version)})" for d in devices))
    if isinstance(select, bool):
        raise TypeError("device selector must be an index, a name substring or a device UUID")
    if isinstance(select, int):
        if not 0 <= select < len(devices):
            raise BackendError(f"Vulkan device index {select} out of range (0..{len(devices) - 1})")
        return devices[select]
    if isinstance(select, (bytes, bytearray)) and len(select) == 16:
        for d in devices:
            if d.device_uuid == bytes(select):
                return d
        raise BackendError(f"no Vulkan device with UUID {bytes(select).hex()}")
    if isinstance(select, str):
        text = select.strip().lower().replace("-", "")
        if len(text) == 32 and all(c in "0123456789abcdef" for c in text):
            for d in devices:
                if d.device_uuid.hex() == text:
                    return d
        for d in devices:
            if select.lower() in d.name.lower():
                return d
        raise BackendError(f"no Vulkan device matching {select!r}; devices: {', '.join(d.name for d in devices)}")
    raise TypeError("device selector must be an index, a name substring or a device UUID")


class VulkanDevice:
    """An instance + physical device + logical device with the external-memory extensions, one queue, one
    command pool and a reusable one-shot command buffer.

    Pass `select` (index, name substring or UUID) to choose the GPU, or hand in your own `instance`,
    `physical_device`, `device` and `queue_family` (objects you hand in are never destroyed by close()); when you hand
    in a device, list the extensions you enabled in `enabled_extensions` so texbridge knows what it may use.
    """

    def __init__(self, select: Any = None, *, instance: Any = None, physical_device: Any = None, device: Any = None,
                 queue_family: int | None = None, enabled_extensions: Iterable[str] | None = None) -> None:
        self._closed = True
        self._lock = threading.RLock()
        self._resources: weakref.WeakSet[Any] = weakref.WeakSet()
        self._owns_instance = instance is None
        self._owns_device = device is None
        self.instance = create_instance() if instance is None else _as_handle("VkInstance", instance)
        self.device = None
        self._pool = self._fence = self._cmd = None
        self._sync_semaphore: TimelineSemaphore | None = None
        self._pending_waits: list[tuple[TimelineSemaphore, int]] = []
        with close_on_error(self._destroy):
            if physical_device is not None:
                pd = _as_handle("VkPhysicalDevice", physical_device)
                self.info = describe_physical_device(self.instance, pd, -1)
            else:
                self.info = select_physical_device(enumerate_physical_devices(self.instance), select)
            if self.info.api_version < API_1_1:
                raise BackendError(f"{self.info.name} offers Vulkan {version_str(self.info.api_version)}; "
                                   "texbridge needs 1.1")
            self.physical_device = self.info.handle
            self.queue_family = self._pick_queue_family() if queue_family is None else int(queue_family)
            if device is None:
                self.enabled_extensions = self._create_device()
            else:
                self.device = _as_handle("VkDevice", device)
                self.enabled_extensions = frozenset(enabled_extensions if enabled_extensions is not None
                                                    else (EXT_MEMORY_FD,))
            if EXT_MEMORY_FD not in self.enabled_extensions:
                raise BackendError(f"{self.info.name}: {EXT_MEMORY_FD} is not enabled")
            q = ffi.new("VkQueue*")
            lib.vkGetDeviceQueue(self.device, self.queue_family, 0, q)
            self.queue = q[0]
            self._load_functions()
            self._create_command_objects()
            mp = ffi.new("VkPhysicalDeviceMemoryProperties*")
            lib.vkGetPhysicalDeviceMemoryProperties(self.physical_device, mp)
            self.memory_types = [(mp.memoryTypes[i].propertyFlags, mp.memoryTypes[i].heapIndex)
                                 for i in range(mp.memoryTypeCount)]
            self.gpu_sync = "timeline_semaphore" if self._timeline_exportable() else "cpu_wait"
            self._closed = False

    # -- construction --------------------------------------------------------------------------------------------
    def _pick_queue_family(self) -> int:
        count = ffi.new("uint32_t*")
        lib.vkGetPhysicalDeviceQueueFamilyProperties(self.physical_device, count, ffi.NULL)
        arr = ffi.new("VkQueueFamilyProperties[]", count[0])
        lib.vkGetPhysicalDeviceQueueFamilyProperties(self.physical_device, count, arr)
        want = vk.VK_QUEUE_GRAPHICS_BIT | vk.VK_QUEUE_COMPUTE_BIT
        for i in range(count[0]):
            if arr[i].queueFlags & vk.VK_QUEUE_GRAPHICS_BIT and arr[i].queueCount:
                return i
        for i in range(count[0]):
            if arr[i].queueFlags & want and arr[i].queueCount:
                return i
        raise BackendError(f"{self.info.name} has no graphics or compute queue")

    def _create_device(self) -> frozenset[str]:
        info = self.info
        names = [e for e in WANTED_EXTENSIONS if e in info.extensions]
        if EXT_DRM_MODIFIER in names and info.api_version < API_1_2:
            if EXT_IMAGE_FORMAT_LIST in info.extensions:
                names.append(EXT_IMAGE_FORMAT_LIST)
            else:
                names.remove(EXT_DRM_MODIFIER)
        if EXT_DMA_BUF in names and EXT_DRM_MODIFIER not in names:
            names.remove(EXT_DMA_BUF)  # dma_buf images need an explicit modifier; don't pretend otherwise
        if EXT_TIMELINE in names and info.api_version >= API_1_2:
            names.remove(EXT_TIMELINE)  # core in 1.2
        keep = [ffi.new("char[]", n.encode()) for n in names]
        ext_arr = ffi.new("char*[]", keep)
        prio = ffi.new("float[]", [1.0])
        qinfo = ffi.new("VkDeviceQueueCreateInfo*", {"sType": vk.VK_STRUCTURE_TYPE_DEVICE_QUEUE_CREATE_INFO,
                                                      "queueFamilyIndex": self.queue_family, "queueCount": 1,
                                                      "pQueuePriorities": prio})
        tl = ffi.new("VkPhysicalDeviceTimelineSemaphoreFeatures*",
                     {"sType": vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_TIMELINE_SEMAPHORE_FEATURES,
                      "timelineSemaphore": 1})
        dinfo = ffi.new("VkDeviceCreateInfo*", {"sType": vk.VK_STRUCTURE_TYPE_DEVICE_CREATE_INFO,
                                                "pNext": tl if info.timeline_feature else ffi.NULL,
                                                "queueCreateInfoCount": 1, "pQueueCreateInfos": qinfo,
                                                "enabledExtensionCount": len(names), "ppEnabledExtensionNames": ext_arr})
        out = ffi.new("VkDevice*")
        check(lib.vkCreateDevice(self.physical_device, dinfo, ffi.NULL, out), "vkCreateDevice")
        track("VkDevice")
        self.device = out[0]
        enabled = set(names)
        if info.timeline_feature:
            enabled.add(EXT_TIMELINE)  # as a capability name, whether core or extension
        return frozenset(enabled)

    def _load_functions(self) -> None:
        def get(name: str, *aliases: str) -> Any:
            for n in (name, *aliases):
                p = lib.vkGetDeviceProcAddr(self.device, n.encode())
                if p != ffi.NULL:
                    return ffi.cast(f"PFN_{name}", p)
            return None

        self.vkGetMemoryFdKHR = get("vkGetMemoryFdKHR")
        self.vkGetMemoryFdPropertiesKHR = get("vkGetMemoryFdPropertiesKHR")
        self.vkGetSemaphoreFdKHR = get("vkGetSemaphoreFdKHR")
        self.vkImportSemaphoreFdKHR = get("vkImportSemaphoreFdKHR")
        self.vkGetMemoryHostPointerPropertiesEXT = get("vkGetMemoryHostPointerPropertiesEXT")
        self.vkGetImageDrmFormatModifierPropertiesEXT = get("vkGetImageDrmFormatModifierPropertiesEXT")
        self.vkGetSemaphoreCounterValue = get("vkGetSemaphoreCounterValue", "vkGetSemaphoreCounterValueKHR")
        self.vkWaitSemaphores = get("vkWaitSemaphores", "vkWaitSemaphoresKHR")
        self.vkSignalSemaphore = get("vkSignalSemaphore", "vkSignalSemaphoreKHR")
        if self.vkGetMemoryFdKHR is None:
            raise BackendError(f"{self.info.name}: vkGetMemoryFdKHR is missing although {EXT_MEMORY_FD} is enabled")

    def _create_command_objects(self) -> None:
        pinfo = ffi.new("VkCommandPoolCreateInfo*", {"sType": vk.VK_STRUCTURE_TYPE_COMMAND_POOL_CREATE_INFO,
                                                     "flags": vk.VK_COMMAND_POOL_CREATE_RESET_COMMAND_BUFFER_BIT,
                                                     "queueFamilyIndex": self.queue_family})
        pool = ffi.new("VkCommandPool*")
        check(lib.vkCreateCommandPool(self.device, pinfo, ffi.NULL, pool), "vkCreateCommandPool")
        track("VkCommandPool")
        self._pool = pool[0]
        ainfo = ffi.new("VkCommandBufferAllocateInfo*", {"sType": vk.VK_STRUCTURE_TYPE_COMMAND_BUFFER_ALLOCATE_INFO,
                                                         "commandPool": self._pool, "commandBufferCount": 1,
                                                         "level": vk.VK_COMMAND_BUFFER_LEVEL_PRIMARY})
        cmd = ffi.new("VkCommandBuffer*")
        check(lib.vkAllocateCommandBuffers(self.device, ainfo, cmd), "vkAllocateCommandBuffers")
        self._cmd = cmd[0]
        finfo = ffi.new("VkFenceCreateInfo*", {"sType": vk.VK_STRUCTURE_TYPE_FENCE_CREATE_INFO})
        fence = ffi.new("VkFence*")
        check(lib.vkCreateFence(self.device, finfo, ffi.NULL, fence), "vkCreateFence")
        track("VkFence")
        self._fence = fence[0]

    def _timeline_exportable(self) -> bool:
        """Timeline semaphores exportable AND importable as OPAQUE_FD: the condition for GPU-side keyed-mutex sync."""
        if not (EXT_SEMAPHORE_FD in self.enabled_extensions and EXT_TIMELINE in self.enabled_extensions
                and self.vkGetSemaphoreFdKHR is not None and self.vkImportSemaphoreFdKHR is not None):
            return False
        ti = ffi.new("VkSemaphoreTypeCreateInfo*", {"sType": vk.VK_STRUCTURE_TYPE_SEMAPHORE_TYPE_CREATE_INFO,
                                                    "semaphoreType": vk.VK_SEMAPHORE_TYPE_TIMELINE})
        q = ffi.new("VkPhysicalDeviceExternalSemaphoreInfo*",
                    {"sType": vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_EXTERNAL_SEMAPHORE_INFO, "pNext": ti,
                     "handleType": SEM_OPAQUE_FD})
        out = ffi.new("VkExternalSemaphoreProperties*", {"sType": vk.VK_STRUCTURE_TYPE_EXTERNAL_SEMAPHORE_PROPERTIES})
        lib.vkGetPhysicalDeviceExternalSemaphoreProperties(self.physical_device, q, out)
        need = vk.VK_EXTERNAL_SEMAPHORE_FEATURE_EXPORTABLE_BIT | vk.VK_EXTERNAL_SEMAPHORE_FEATURE_IMPORTABLE_BIT
        return out.externalSemaphoreFeatures & need == need

    # -- identity and capabilities -------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.info.name

    @property
    def driver_uuid(self) -> bytes:
        return self.info.driver_uuid

    @property
    def device_uuid(self) -> bytes:
        return self.info.device_uuid

    @property
    def closed(self) -> bool:
        return self._closed

    def has(self, extension: str) -> bool:
        return extension in self.enabled_extensions

    @property
    def dma_buf(self) -> bool:
        """Both VK_EXT_external_memory_dma_buf and VK_EXT_image_drm_format_modifier are enabled."""
        return self.has(EXT_DMA_BUF) and self.has(EXT_DRM_MODIFIER) and self.vkGetMemoryFdPropertiesKHR is not None

    @property
    def external_memory_host(self) -> bool:
        return self.has(EXT_MEMORY_HOST) and self.vkGetMemoryHostPointerPropertiesEXT is not None

    @property
    def capabilities(self) -> dict[str, Any]:
        return {
            "external_memory_fd": True,
            "external_semaphore_fd": self.has(EXT_SEMAPHORE_FD),
            "timeline_semaphore": self.has(EXT_TIMELINE),
            "dma_buf": self.dma_buf,
            "external_memory_host": self.external_memory_host,
            "min_imported_host_pointer_alignment": self.info.min_host_pointer_alignment,
            "gpu_sync": self.gpu_sync,
        }

    def check_open(self) -> None:
        if self._closed:
            raise BackendError(f"Vulkan device {self.name} is closed")

    def find_memory_type(self, bits: int, want: int, avoid: int = 0) -> int:
        """The first memory type in `bits` with all `want` flags (preferring ones without `avoid`)."""
        candidates = [i for i, (flags, _) in enumerate(self.memory_types)
                      if bits >> i & 1 and flags & want == want]
        for i in candidates:
            if not self.memory_types[i][0] & avoid:
                return i
        if candidates:
            return candidates[0]
        raise BackendError(f"no Vulkan memory type with flags 0x{want:x} among bits 0x{bits:x}")

    # -- command submission -------------------------------------------------------------------------------------
    def one_shot(self, record: Callable[[Any], None]) -> None:
        """Record commands with `record(cmd)` and run them to completion (fence wait). Pending GPU-sync waits
        (submit_wait without command buffers) are attached to this submit."""
        self.check_open()
        with self._lock:
            cmd = self._cmd
            check(lib.vkResetCommandBuffer(cmd, 0), "vkResetCommandBuffer")
            begin = ffi.new("VkCommandBufferBeginInfo*", {"sType": vk.VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO,
                                                          "flags": vk.VK_COMMAND_BUFFER_USAGE_ONE_TIME_SUBMIT_BIT})
            check(lib.vkBeginCommandBuffer(cmd, begin), "vkBeginCommandBuffer")
            try:
                record(cmd)
            finally:
                check(lib.vkEndCommandBuffer(cmd), "vkEndCommandBuffer")
            waits, self._pending_waits = self._pending_waits, []
            self._submit([cmd], waits, [], self._fence)
            check(lib.vkWaitForFences(self.device, 1, ffi.new("VkFence[]", [self._fence]), 1, 2**64 - 1),
                  "vkWaitForFences")
            check(lib.vkResetFences(self.device, 1, ffi.new("VkFence[]", [self._fence])), "vkResetFences")

    def _submit(self, cmds: list[Any], waits: list[tuple["TimelineSemaphore", int]],
                signals: list[tuple["TimelineSemaphore", int]], fence: Any = None) -> None:
        keep: list[Any] = []
        info: dict[str, Any] = {"sType": vk.VK_STRUCTURE_TYPE_SUBMIT_INFO}
        if cmds:
            arr = ffi.new("VkCommandBuffer[]", cmds)
            keep.append(arr)
            info.update(commandBufferCount=len(cmds), pCommandBuffers=arr)
        if waits or signals:
            wsem = ffi.new("VkSemaphore[]", [s.semaphore for s, _ in waits])
            wval = ffi.new("uint64_t[]", [v for _, v in waits])
            stages = ffi.new("VkPipelineStageFlags[]", [vk.VK_PIPELINE_STAGE_ALL_COMMANDS_BIT] * len(waits))
            ssem = ffi.new("VkSemaphore[]", [s.semaphore for s, _ in signals])
            sval = ffi.new("uint64_t[]", [v for _, v in signals])
            tinfo = ffi.new("VkTimelineSemaphoreSubmitInfo*",
                            {"sType": vk.VK_STRUCTURE_TYPE_TIMELINE_SEMAPHORE_SUBMIT_INFO,
                             "waitSemaphoreValueCount": len(waits), "pWaitSemaphoreValues": wval,
                             "signalSemaphoreValueCount": len(signals), "pSignalSemaphoreValues": sval})
            keep += [wsem, wval, stages, ssem, sval, tinfo]
            info.update(pNext=tinfo, waitSemaphoreCount=len(waits), pWaitSemaphores=wsem, pWaitDstStageMask=stages,
                        signalSemaphoreCount=len(signals), pSignalSemaphores=ssem)
        sinfo = ffi.new("VkSubmitInfo*", info)
        check(lib.vkQueueSubmit(self.queue, 1, sinfo, fence if fence is not None else ffi.NULL), "vkQueueSubmit")

    # -- GPU sync for the keyed mutex -----------------------------------------------------------------------------
    def create_timeline_semaphore(self, initial: int = 0) -> "TimelineSemaphore":
        """A new exportable (OPAQUE_FD) timeline semaphore; needs gpu_sync == "timeline_semaphore"."""
        return TimelineSemaphore(self, initial=initial)

    def import_timeline_semaphore(self, fd: int) -> "TimelineSemaphore":
        """Import a timeline semaphore another process exported. Takes ownership of `fd` (success or failure)."""
        return TimelineSemaphore(self, fd=fd)

    @property
    def sync_semaphore(self) -> "TimelineSemaphore | None":
        """The device's default shared timeline semaphore (created on first use), None on the cpu_wait path."""
        if self.gpu_sync != "timeline_semaphore":
            return None
        with self._lock:
            if self._sync_semaphore is None:
                self._sync_semaphore = self.create_timeline_semaphore()
            return self._sync_semaphore

    def _timeline_for(self, semaphore: "TimelineSemaphore | None") -> "TimelineSemaphore | None":
        """The semaphore a timeline-path submit uses: the one given (a resource's own, shared with its peers); on a
        timeline device, the device's own sync_semaphore only when it was asked for explicitly, since waiting on a
        semaphore the peer never signals would hang the queue. None on the cpu_wait path."""
        self.check_open()
        if self.gpu_sync != "timeline_semaphore":
            return None
        if semaphore is None:
            raise BackendError("a timeline-path submit needs the semaphore shared with the peer "
                               "(a resource's .semaphore, or device.sync_semaphore passed explicitly)")
        return semaphore

    def submit_signal(self, value: int, semaphore: "TimelineSemaphore | None" = None,
                      command_buffers: Iterable[Any] = ()) -> None:
        """Keyed-mutex release, GPU side: the queue signals `value` once all work submitted so far is done.

        On the cpu_wait path (no external semaphore fds, e.g. lavapipe) this instead waits until the queue is idle,
        so the next owner, in whatever process, sees finished memory.
        """
        cmds = list(command_buffers)
        sem = self._timeline_for(semaphore)
        with self._lock:
            if sem is not None:
                waits, self._pending_waits = self._pending_waits, []
                self._submit(cmds, waits, [(sem, int(value))])
                return
            if cmds:
                self._submit(cmds, [], [])
            check(lib.vkQueueWaitIdle(self.queue), "vkQueueWaitIdle")

    def submit_wait(self, value: int, semaphore: "TimelineSemaphore | None" = None,
                    command_buffers: Iterable[Any] = ()) -> None:
        """Keyed-mutex acquire, GPU side: work after this waits on the GPU until the semaphore reaches `value`.

        With `command_buffers`, they are submitted waiting on the value. Without, the wait is attached to this
        device's next submit (a semaphore wait only orders its own batch, so an empty batch would order nothing).
        On the cpu_wait path the releasing process already waited, so only the command buffers are submitted.
        """
        cmds = list(command_buffers)
        sem = self._timeline_for(semaphore)
        with self._lock:
            if sem is not None:
                if cmds:
                    waits, self._pending_waits = self._pending_waits, []
                    self._submit(cmds, waits + [(sem, int(value))], [])
                else:
                    self._pending_waits.append((sem, int(value)))
            elif cmds:
                self._submit(cmds, [], [])

    def wait_idle(self) -> None:
        self.check_open()
        with self._lock:
            check(lib.vkQueueWaitIdle(self.queue), "vkQueueWaitIdle")

    # -- lifetime --------------------------------------------------------------------------------------------------
    def _register(self, resource: Any) -> None:
        self._resources.add(resource)

    def close(self) -> None:
        """Release every resource still open on this device, then destroy what this wrapper created."""
        if self._closed:
            return
        for r in list(self._resources):
            try:
                r.close()
            except Exception:
                pass
        self._closed = True
        self._destroy()

    def _destroy(self) -> None:
        if self.device is not None:
            try:
                lib.vkDeviceWaitIdle(self.device)
            except Exception:
                pass
            if self._sync_semaphore is not None:
                self._sync_semaphore.destroy()
                self._sync_semaphore = None
            if self._fence is not None:
                lib.vkDestroyFence(self.device, self._fence, ffi.NULL)
                track("VkFence", -1)
                self._fence = None
            if self._pool is not None:
                lib.vkDestroyCommandPool(self.device, self._pool, ffi.NULL)  # frees the command buffer too
                track("VkCommandPool", -1)
                self._pool = self._cmd = None
            if self._owns_device:
                lib.vkDestroyDevice(self.device, ffi.NULL)
                track("VkDevice", -1)
            self.device = None
        if self.instance is not None and self._owns_instance:
            lib.vkDestroyInstance(self.instance, ffi.NULL)
            track("VkInstance", -1)
        self.instance = None

    def __enter__(self) -> "VulkanDevice":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else self.gpu_sync
        return f"<VulkanDevice {self.info.name!r} {self.device_uuid.hex()} {state}>"


class TimelineSemaphore:
    """A timeline semaphore shareable as an OPAQUE_FD: the GPU half of a keyed mutex (see VulkanDevice.submit_*)."""

    def __init__(self, device: VulkanDevice, *, initial: int = 0, fd: int | None = None) -> None:
        self.device = device
        self.semaphore = None
        with OwnedFds([] if fd is None else [fd], [FD_SEMAPHORE]) as owned, close_on_error(self.destroy):
            device.check_open()
            if fd is not None:
                check_semaphore_fd(fd, device.name)
            if device.gpu_sync != "timeline_semaphore":
                raise BackendError(f"{device.name}: exportable timeline semaphores need {EXT_SEMAPHORE_FD} and "
                                   f"{EXT_TIMELINE} (gpu_sync is {device.gpu_sync!r})")
            ti = ffi.new("VkSemaphoreTypeCreateInfo*", {"sType": vk.VK_STRUCTURE_TYPE_SEMAPHORE_TYPE_CREATE_INFO,
                                                        "semaphoreType": vk.VK_SEMAPHORE_TYPE_TIMELINE,
                                                        "initialValue": initial})
            ex = ffi.new("VkExportSemaphoreCreateInfo*", {"sType": vk.VK_STRUCTURE_TYPE_EXPORT_SEMAPHORE_CREATE_INFO,
                                                          "pNext": ti, "handleTypes": SEM_OPAQUE_FD})
            info = ffi.new("VkSemaphoreCreateInfo*", {"sType": vk.VK_STRUCTURE_TYPE_SEMAPHORE_CREATE_INFO,
                                                      "pNext": ex if fd is None else ti})
            out = ffi.new("VkSemaphore*")
            check(lib.vkCreateSemaphore(device.device, info, ffi.NULL, out), "vkCreateSemaphore")
            track("VkSemaphore")
            self.semaphore = out[0]
            if fd is not None:
                imp = ffi.new("VkImportSemaphoreFdInfoKHR*",
                              {"sType": vk.VK_STRUCTURE_TYPE_IMPORT_SEMAPHORE_FD_INFO_KHR,
                               "semaphore": self.semaphore, "handleType": SEM_OPAQUE_FD, "fd": fd})
                check(device.vkImportSemaphoreFdKHR(device.device, imp), "vkImportSemaphoreFdKHR")
                owned.take(FD_SEMAPHORE)  # Vulkan owns it now

    def export_fd(self) -> int:
        """A new fd referring to this semaphore (the caller owns it)."""
        info = ffi.new("VkSemaphoreGetFdInfoKHR*", {"sType": vk.VK_STRUCTURE_TYPE_SEMAPHORE_GET_FD_INFO_KHR,
                                                    "semaphore": self.semaphore, "handleType": SEM_OPAQUE_FD})
        out = ffi.new("int*")
        check(self.device.vkGetSemaphoreFdKHR(self.device.device, info, out), "vkGetSemaphoreFdKHR")
        return out[0]

    @property
    def value(self) -> int:
        out = ffi.new("uint64_t*")
        check(self.device.vkGetSemaphoreCounterValue(self.device.device, self.semaphore, out),
              "vkGetSemaphoreCounterValue")
        return out[0]

    def wait(self, value: int, timeout: float | None = None) -> bool:
        """Host wait until the counter reaches `value`; False on timeout."""
        sems = ffi.new("VkSemaphore[]", [self.semaphore])
        vals = ffi.new("uint64_t[]", [value])
        info = ffi.new("VkSemaphoreWaitInfo*", {"sType": vk.VK_STRUCTURE_TYPE_SEMAPHORE_WAIT_INFO,
                                                "semaphoreCount": 1, "pSemaphores": sems, "pValues": vals})
        ns = 2**64 - 1 if timeout is None else max(0, int(timeout * 1e9))
        r = check(self.device.vkWaitSemaphores(self.device.device, info, ns), "vkWaitSemaphores")
        return r == vk.VK_SUCCESS

    def signal(self, value: int) -> None:
        """Host signal (the CPU finished its part)."""
        info = ffi.new("VkSemaphoreSignalInfo*", {"sType": vk.VK_STRUCTURE_TYPE_SEMAPHORE_SIGNAL_INFO,
                                                  "semaphore": self.semaphore, "value": value})
        check(self.device.vkSignalSemaphore(self.device.device, info), "vkSignalSemaphore")

    def destroy(self) -> None:
        sem, self.semaphore = self.semaphore, None
        if sem is not None and self.device.device is not None:
            lib.vkDestroySemaphore(self.device.device, sem, ffi.NULL)
            track("VkSemaphore", -1)


# -- the process-wide default device ----------------------------------------------------------------------------------
_default: VulkanDevice | None = None
_default_pid = 0
_default_lock = threading.Lock()


def default_device() -> VulkanDevice:
    """One shared device per process, created on first use and closed at exit (after its resources)."""
    global _default, _default_pid
    with _default_lock:
        if _default is None or _default.closed or _default_pid != os.getpid():
            # after fork() the parent's VkDevice is unusable here: start afresh (and never destroy the parent's)
            _default, _default_pid = VulkanDevice(), os.getpid()
        return _default


@atexit.register
def _close_default() -> None:
    global _default
    dev, _default = _default, None
    if dev is not None and _default_pid == os.getpid():
        try:
            dev.close()
        except Exception:
            pass


def list_devices() -> list[PhysicalDeviceInfo]:
    """Every physical device, through a temporary instance (for diagnostics and device selection UIs)."""
    inst = create_instance()
    try:
        return enumerate_physical_devices(inst)
    finally:
        lib.vkDestroyInstance(inst, ffi.NULL)
        track("VkInstance", -1)


__all__ = ["VulkanDevice", "TimelineSemaphore", "VulkanError", "check", "default_device", "live_objects",
           "list_devices", "InvalidDescriptor"]
