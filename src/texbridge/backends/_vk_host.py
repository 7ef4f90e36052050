"""memfd memory seen by Vulkan: the host-import and staging paths of the Vulkan backend.

A memfd texture or buffer reaches Vulkan two ways. Zero copy: the memfd is mapped and imported as host memory
(VK_EXT_external_memory_host), a VkBuffer bound to those very pages and, where the driver's LINEAR layout matches
the memfd's row pitch, a VkImage aliasing them. Otherwise a copy: an OPTIMAL device image beside the memfd mapping,
kept in sync by VulkanResource.sync_to_image()/sync_to_host(). This module builds those objects; vulkan.py makes
the resource that owns them.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from typing import Any

from .._descriptor import Descriptor, align
from .._errors import BackendError, InvalidDescriptor
from .._fdinfo import inspect_fd
from .._formats import get_format
from .._sharedmem import SharedMapping
from ._fds import close_on_error
from ._vk import HANDLE_HOST, VulkanDevice, check, ffi, lib, track, vk
from ._vk_objects import (COLOR, DEVICE_LOCAL, TRANSFER, allocate, barrier, check_buffer_support, check_image_support,
                          create_buffer, create_image, destroy, image_params, requirements)

PAGE_SIZE = mmap.PAGESIZE


class HostMapping:
    """A MAP_SHARED mapping of a memfd made with libc mmap, because Python's mmap refuses lengths past EOF and host
    pointer import needs the length rounded up to minImportedHostPointerAlignment (bytes past EOF inside the last
    page read as zero and are never written by us, so no SIGBUS)."""

    _libc = ctypes.CDLL(None, use_errno=True)
    _libc.mmap.restype = ctypes.c_void_p
    _libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
    _libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)

    def __init__(self, fd: int, length: int) -> None:
        addr = self._libc.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            err = ctypes.get_errno()
            raise BackendError(f"mmap of the memfd failed: {os.strerror(err)}")
        self.address, self.length = addr, length
        track("host_mapping")

    @property
    def pointer(self) -> Any:
        return ffi.cast("void*", self.address)

    def close(self) -> None:
        if self.address:
            self._libc.munmap(self.address, self.length)
            self.address = 0
            track("host_mapping", -1)


def _linear_alias(dev: VulkanDevice, d: Descriptor, mem: Any, length: int, host_bits: int) -> Any:
    """A LINEAR VkImage on the imported memfd pages, if this driver's linear layout is exactly the memfd's row
    pitch; None otherwise (the texture is then reachable as .buffer only)."""
    if d.mip_levels != 1 or d.array_size != 1:
        return None
    p = image_params(d.width, d.height, d.format, d.usage, "linear", 1, 1,
                     vk_usage=TRANSFER | vk.VK_IMAGE_USAGE_SAMPLED_BIT)
    try:
        check_image_support(dev, p, HANDLE_HOST, export=False)
    except BackendError:
        return None
    image = create_image(dev, p, HANDLE_HOST, initial_layout=vk.VK_IMAGE_LAYOUT_PREINITIALIZED)
    with close_on_error(lambda: destroy(dev, image=image)):
        sub = ffi.new("VkImageSubresource*", {"aspectMask": COLOR})
        lay = ffi.new("VkSubresourceLayout*")
        lib.vkGetImageSubresourceLayout(dev.device, image, sub, lay)
        size, alignment, bits, _ = requirements(dev, image=image)
        if (lay.offset != 0 or lay.rowPitch != d.row_pitch or not bits & host_bits or d.offset % alignment
                or d.offset + size > length):
            destroy(dev, image=image)
            return None
        check(lib.vkBindImageMemory(dev.device, image, mem, d.offset), "vkBindImageMemory")
    return image


def _host_alignment(dev: VulkanDevice) -> int:
    return max(PAGE_SIZE, dev.info.min_host_pointer_alignment or PAGE_SIZE)


def zero_copy(dev: VulkanDevice, d: Descriptor, fd: int, host_import: bool | None) -> bool:
    """Whether the memfd `fd` is imported zero-copy (True) or staged (False); host_import=True insists on zero copy,
    False forces the copy. InvalidDescriptor unless it is a size-sealed memfd large enough for `d`."""
    facts = inspect_fd(fd)
    if not facts.size_sealed or facts.size < d.required_size():
        raise InvalidDescriptor("memory is not a size-sealed memfd large enough for its descriptor")
    can_host = dev.external_memory_host and _host_alignment(dev) == PAGE_SIZE
    if host_import and not can_host:
        raise BackendError(f"{dev.name}: zero-copy memfd import needs VK_EXT_external_memory_host with "
                           f"minImportedHostPointerAlignment <= {PAGE_SIZE}")
    return bool(can_host) and host_import is not False


def host_objects(dev: VulkanDevice, d: Descriptor, fd: int) -> dict[str, Any]:
    """The zero-copy objects over the memfd's pages (VulkanResource keyword arguments): the host mapping, a
    VkBuffer bound to it and, for textures, a LINEAR VkImage alias where the layouts match (else None)."""
    if d.kind == "texture2d":
        get_format(d.format)  # unknown formats are InvalidDescriptor before any Vulkan object exists
    length = align(d.size, _host_alignment(dev))
    host = HostMapping(fd, length)
    buf = mem = image = None
    with close_on_error(lambda: destroy(dev, image=image, buffer=buf, memory=mem), host.close):
        hp = ffi.new("VkMemoryHostPointerPropertiesEXT*",
                     {"sType": vk.VK_STRUCTURE_TYPE_MEMORY_HOST_POINTER_PROPERTIES_EXT})
        check(dev.vkGetMemoryHostPointerPropertiesEXT(dev.device, HANDLE_HOST, host.pointer, hp),
              "vkGetMemoryHostPointerPropertiesEXT")
        usage = vk.VK_BUFFER_USAGE_TRANSFER_SRC_BIT | vk.VK_BUFFER_USAGE_TRANSFER_DST_BIT | \
            vk.VK_BUFFER_USAGE_STORAGE_BUFFER_BIT | vk.VK_BUFFER_USAGE_UNIFORM_BUFFER_BIT
        check_buffer_support(dev, usage, HANDLE_HOST, export=False)
        buf = create_buffer(dev, d.size, usage, HANDLE_HOST)
        _, _, bits, _ = requirements(dev, buffer=buf)
        bits &= hp.memoryTypeBits
        if not bits:
            raise BackendError(f"{dev.name}: no memory type can hold both this buffer and imported host memory")
        mem = allocate(dev, length, dev.find_memory_type(bits, 0), host_ptr=host.pointer)
        check(lib.vkBindBufferMemory(dev.device, buf, mem, 0), "vkBindBufferMemory")
        if d.kind == "texture2d":
            image = _linear_alias(dev, d, mem, length, hp.memoryTypeBits)
    return {"image": image, "buffer": buf, "memory": mem, "host": host}


def staged_objects(dev: VulkanDevice, d: Descriptor, fd: int) -> dict[str, Any]:
    """The copy path's objects (VulkanResource keyword arguments): an OPTIMAL device image in the GENERAL layout
    plus the memfd mapping, synced explicitly."""
    if d.kind != "texture2d":
        raise BackendError(f"{dev.name}: memfd buffers need VK_EXT_external_memory_host to be seen by Vulkan")
    p = image_params(d.width, d.height, d.format, d.usage, "optimal", 1, d.array_size)
    fp = ffi.new("VkImageFormatProperties*")
    r = lib.vkGetPhysicalDeviceImageFormatProperties(dev.physical_device, p["vk_format"], vk.VK_IMAGE_TYPE_2D,
                                                     p["vk_tiling"], p["vk_usage"], 0, fp)
    if r == vk.VK_ERROR_FORMAT_NOT_SUPPORTED:
        raise BackendError(f"{dev.name} cannot hold a {d.format} image with usage 0x{p['vk_usage']:x}")
    check(r, "vkGetPhysicalDeviceImageFormatProperties")
    host_map = SharedMapping(fd, d.size)
    image = mem = None
    with close_on_error(lambda: destroy(dev, image=image, memory=mem), host_map.close):
        info = ffi.new("VkImageCreateInfo*", {
            "sType": vk.VK_STRUCTURE_TYPE_IMAGE_CREATE_INFO, "imageType": vk.VK_IMAGE_TYPE_2D,
            "format": p["vk_format"], "extent": {"width": d.width, "height": d.height, "depth": 1}, "mipLevels": 1,
            "arrayLayers": d.array_size, "samples": vk.VK_SAMPLE_COUNT_1_BIT, "tiling": p["vk_tiling"],
            "usage": p["vk_usage"], "sharingMode": vk.VK_SHARING_MODE_EXCLUSIVE})
        out = ffi.new("VkImage*")
        check(lib.vkCreateImage(dev.device, info, ffi.NULL, out), "vkCreateImage")
        track("VkImage")
        image = out[0]
        size, _, bits, _ = requirements(dev, image=image)
        mem = allocate(dev, size, dev.find_memory_type(bits, DEVICE_LOCAL), image=image)
        check(lib.vkBindImageMemory(dev.device, image, mem, 0), "vkBindImageMemory")
        dev.one_shot(lambda cmd: barrier(cmd, image, vk.VK_IMAGE_LAYOUT_UNDEFINED, vk.VK_IMAGE_LAYOUT_GENERAL,
                                         1, d.array_size))
    return {"image": image, "memory": mem, "host_map": host_map}
