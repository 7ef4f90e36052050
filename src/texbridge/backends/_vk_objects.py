"""Vulkan objects, one helper each: usage and parameter translation, what the device supports, creating images,
buffers and allocations (each tracked in live_objects), barriers and destruction. Shared by the backend (vulkan.py)
and its memfd paths (_vk_host.py); everything here takes a VulkanDevice and returns raw cffi handles.
"""

from __future__ import annotations

from typing import Any, Sequence

from .._descriptor import Usage
from .._errors import BackendError, InvalidDescriptor
from .._formats import get_format
from ._vk import HANDLE_DMA_BUF, HANDLE_HOST, HANDLE_NAMES, VulkanDevice, check, ffi, lib, track, vk

TILINGS = {"optimal": vk.VK_IMAGE_TILING_OPTIMAL, "linear": vk.VK_IMAGE_TILING_LINEAR,
           "drm_modifier": vk.VK_IMAGE_TILING_DRM_FORMAT_MODIFIER_EXT}
TRANSFER = vk.VK_IMAGE_USAGE_TRANSFER_SRC_BIT | vk.VK_IMAGE_USAGE_TRANSFER_DST_BIT
COLOR = vk.VK_IMAGE_ASPECT_COLOR_BIT
DEVICE_LOCAL = vk.VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT
HOST_VISIBLE = vk.VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT | vk.VK_MEMORY_PROPERTY_HOST_COHERENT_BIT
ALLOWED_USAGE = (TRANSFER | vk.VK_IMAGE_USAGE_SAMPLED_BIT | vk.VK_IMAGE_USAGE_STORAGE_BIT |
                 vk.VK_IMAGE_USAGE_COLOR_ATTACHMENT_BIT | vk.VK_IMAGE_USAGE_INPUT_ATTACHMENT_BIT)
# MUTABLE_FORMAT | EXTENDED_USAGE | ALIAS (numeric: the `vulkan` module spells the 1.1 aliases as strings)
ALLOWED_FLAGS = 0x8 | 0x100 | 0x400


def vk_image_usage(usage: int) -> int:
    """texbridge Usage → VkImageUsageFlags. Transfer bits are always on: upload/download/clear need them."""
    u = Usage(usage)
    bits = TRANSFER
    if u & Usage.SHADER_READ:
        bits |= vk.VK_IMAGE_USAGE_SAMPLED_BIT
    if u & Usage.RENDER_TARGET:
        bits |= vk.VK_IMAGE_USAGE_COLOR_ATTACHMENT_BIT
    if u & Usage.STORAGE:
        bits |= vk.VK_IMAGE_USAGE_STORAGE_BIT
    return bits


def vk_buffer_usage(usage: int) -> int:
    bits = vk.VK_BUFFER_USAGE_TRANSFER_SRC_BIT | vk.VK_BUFFER_USAGE_TRANSFER_DST_BIT
    if Usage(usage) & (Usage.SHADER_READ | Usage.STORAGE):
        bits |= vk.VK_BUFFER_USAGE_STORAGE_BUFFER_BIT | vk.VK_BUFFER_USAGE_UNIFORM_BUFFER_BIT
    return bits


def check_image_support(dev: VulkanDevice, p: dict[str, Any], handle_type: int, *, export: bool,
                        modifier: int | None = None) -> tuple[int, int]:
    """Raise BackendError unless this device can create (export=True) or import an image with these exact parameters
    as `handle_type` memory. Returns (externalMemoryFeatures, maxResourceSize)."""
    keep = []
    ext = ffi.new("VkPhysicalDeviceExternalImageFormatInfo*",
                  {"sType": vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_EXTERNAL_IMAGE_FORMAT_INFO, "handleType": handle_type})
    keep.append(ext)
    if modifier is not None:
        mod = ffi.new("VkPhysicalDeviceImageDrmFormatModifierInfoEXT*",
                      {"sType": vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_IMAGE_DRM_FORMAT_MODIFIER_INFO_EXT,
                       "drmFormatModifier": modifier, "sharingMode": vk.VK_SHARING_MODE_EXCLUSIVE})
        ext.pNext = mod
        keep.append(mod)
    info = ffi.new("VkPhysicalDeviceImageFormatInfo2*", {
        "sType": vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_IMAGE_FORMAT_INFO_2, "pNext": ext, "format": p["vk_format"],
        "type": vk.VK_IMAGE_TYPE_2D, "tiling": p["vk_tiling"], "usage": p["vk_usage"], "flags": p["vk_flags"]})
    eprops = ffi.new("VkExternalImageFormatProperties*", {"sType": vk.VK_STRUCTURE_TYPE_EXTERNAL_IMAGE_FORMAT_PROPERTIES})
    props = ffi.new("VkImageFormatProperties2*", {"sType": vk.VK_STRUCTURE_TYPE_IMAGE_FORMAT_PROPERTIES_2,
                                                  "pNext": eprops})
    r = lib.vkGetPhysicalDeviceImageFormatProperties2(dev.physical_device, info, props)
    what = (f"{p['format']} {p['width']}x{p['height']} tiling={p['tiling']} usage=0x{p['vk_usage']:x} "
            f"as {HANDLE_NAMES.get(handle_type, handle_type)} on {dev.name}")
    if r == vk.VK_ERROR_FORMAT_NOT_SUPPORTED:
        raise BackendError(f"unsupported image: {what}")
    check(r, "vkGetPhysicalDeviceImageFormatProperties2")
    feats = eprops.externalMemoryProperties.externalMemoryFeatures
    need = vk.VK_EXTERNAL_MEMORY_FEATURE_EXPORTABLE_BIT if export else vk.VK_EXTERNAL_MEMORY_FEATURE_IMPORTABLE_BIT
    if not feats & need:
        raise BackendError(f"not {'exportable' if export else 'importable'}: {what}")
    fp = props.imageFormatProperties
    if (p["width"] > fp.maxExtent.width or p["height"] > fp.maxExtent.height or p["mip_levels"] > fp.maxMipLevels
            or p["array_size"] > fp.maxArrayLayers):
        raise BackendError(f"too large (max {fp.maxExtent.width}x{fp.maxExtent.height}, {fp.maxMipLevels} mips, "
                           f"{fp.maxArrayLayers} layers): {what}")
    return feats, fp.maxResourceSize


def drm_modifiers(dev: VulkanDevice, p: dict[str, Any]) -> list[int]:
    """Single-plane DRM modifiers this device can export an image with these parameters as (dma_buf)."""
    lst = ffi.new("VkDrmFormatModifierPropertiesListEXT*",
                  {"sType": vk.VK_STRUCTURE_TYPE_DRM_FORMAT_MODIFIER_PROPERTIES_LIST_EXT})
    fp = ffi.new("VkFormatProperties2*", {"sType": vk.VK_STRUCTURE_TYPE_FORMAT_PROPERTIES_2, "pNext": lst})
    lib.vkGetPhysicalDeviceFormatProperties2(dev.physical_device, p["vk_format"], fp)
    n = lst.drmFormatModifierCount
    if not n:
        return []
    arr = ffi.new("VkDrmFormatModifierPropertiesEXT[]", n)
    lst.pDrmFormatModifierProperties = arr
    lib.vkGetPhysicalDeviceFormatProperties2(dev.physical_device, p["vk_format"], fp)
    need = vk.VK_FORMAT_FEATURE_TRANSFER_SRC_BIT | vk.VK_FORMAT_FEATURE_TRANSFER_DST_BIT
    if p["vk_usage"] & vk.VK_IMAGE_USAGE_SAMPLED_BIT:
        need |= vk.VK_FORMAT_FEATURE_SAMPLED_IMAGE_BIT
    if p["vk_usage"] & vk.VK_IMAGE_USAGE_COLOR_ATTACHMENT_BIT:
        need |= vk.VK_FORMAT_FEATURE_COLOR_ATTACHMENT_BIT
    if p["vk_usage"] & vk.VK_IMAGE_USAGE_STORAGE_BIT:
        need |= vk.VK_FORMAT_FEATURE_STORAGE_IMAGE_BIT
    out = []
    for i in range(lst.drmFormatModifierCount):
        m = arr[i]
        if m.drmFormatModifierPlaneCount != 1 or m.drmFormatModifierTilingFeatures & need != need:
            continue
        try:
            check_image_support(dev, p, HANDLE_DMA_BUF, export=True, modifier=m.drmFormatModifier)
        except BackendError:
            continue
        out.append(int(m.drmFormatModifier))
    return out


def create_image(dev: VulkanDevice, p: dict[str, Any], handle_type: int, *, modifiers: Sequence[int] = (),
                 explicit: dict[str, Any] | None = None, initial_layout: int = vk.VK_IMAGE_LAYOUT_UNDEFINED) -> Any:
    ext = ffi.new("VkExternalMemoryImageCreateInfo*",
                  {"sType": vk.VK_STRUCTURE_TYPE_EXTERNAL_MEMORY_IMAGE_CREATE_INFO, "handleTypes": handle_type})
    keep: list[Any] = [ext]
    if modifiers:
        mods = ffi.new("uint64_t[]", list(modifiers))
        lst = ffi.new("VkImageDrmFormatModifierListCreateInfoEXT*",
                      {"sType": vk.VK_STRUCTURE_TYPE_IMAGE_DRM_FORMAT_MODIFIER_LIST_CREATE_INFO_EXT,
                       "drmFormatModifierCount": len(mods), "pDrmFormatModifiers": mods})
        ext.pNext = lst
        keep += [mods, lst]
    elif explicit is not None:
        layout = ffi.new("VkSubresourceLayout*", {"offset": explicit["offset"], "size": 0,
                                                  "rowPitch": explicit["row_pitch"],
                                                  "arrayPitch": explicit.get("array_pitch", 0) if p["array_size"] > 1 else 0,
                                                  "depthPitch": 0})
        exp = ffi.new("VkImageDrmFormatModifierExplicitCreateInfoEXT*",
                      {"sType": vk.VK_STRUCTURE_TYPE_IMAGE_DRM_FORMAT_MODIFIER_EXPLICIT_CREATE_INFO_EXT,
                       "drmFormatModifier": explicit["modifier"], "drmFormatModifierPlaneCount": 1,
                       "pPlaneLayouts": layout})
        ext.pNext = exp
        keep += [layout, exp]
    info = ffi.new("VkImageCreateInfo*", {
        "sType": vk.VK_STRUCTURE_TYPE_IMAGE_CREATE_INFO, "pNext": ext, "flags": p["vk_flags"],
        "imageType": vk.VK_IMAGE_TYPE_2D, "format": p["vk_format"],
        "extent": {"width": p["width"], "height": p["height"], "depth": 1},
        "mipLevels": p["mip_levels"], "arrayLayers": p["array_size"], "samples": vk.VK_SAMPLE_COUNT_1_BIT,
        "tiling": p["vk_tiling"], "usage": p["vk_usage"], "sharingMode": vk.VK_SHARING_MODE_EXCLUSIVE,
        "initialLayout": initial_layout})
    out = ffi.new("VkImage*")
    check(lib.vkCreateImage(dev.device, info, ffi.NULL, out), "vkCreateImage")
    track("VkImage")
    return out[0]


def create_buffer(dev: VulkanDevice, size: int, usage: int, handle_type: int) -> Any:
    ext = ffi.new("VkExternalMemoryBufferCreateInfo*",
                  {"sType": vk.VK_STRUCTURE_TYPE_EXTERNAL_MEMORY_BUFFER_CREATE_INFO, "handleTypes": handle_type})
    info = ffi.new("VkBufferCreateInfo*", {"sType": vk.VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO,
                                           "pNext": ext if handle_type else ffi.NULL, "size": size, "usage": usage,
                                           "sharingMode": vk.VK_SHARING_MODE_EXCLUSIVE})
    out = ffi.new("VkBuffer*")
    check(lib.vkCreateBuffer(dev.device, info, ffi.NULL, out), "vkCreateBuffer")
    track("VkBuffer")
    return out[0]


def requirements(dev: VulkanDevice, *, image: Any = None, buffer: Any = None) -> tuple[int, int, int, bool]:
    """(size, alignment, memoryTypeBits, driver prefers/requires a dedicated allocation)."""
    ded = ffi.new("VkMemoryDedicatedRequirements*", {"sType": vk.VK_STRUCTURE_TYPE_MEMORY_DEDICATED_REQUIREMENTS})
    req = ffi.new("VkMemoryRequirements2*", {"sType": vk.VK_STRUCTURE_TYPE_MEMORY_REQUIREMENTS_2, "pNext": ded})
    if image is not None:
        info = ffi.new("VkImageMemoryRequirementsInfo2*",
                       {"sType": vk.VK_STRUCTURE_TYPE_IMAGE_MEMORY_REQUIREMENTS_INFO_2, "image": image})
        lib.vkGetImageMemoryRequirements2(dev.device, info, req)
    else:
        info = ffi.new("VkBufferMemoryRequirementsInfo2*",
                       {"sType": vk.VK_STRUCTURE_TYPE_BUFFER_MEMORY_REQUIREMENTS_INFO_2, "buffer": buffer})
        lib.vkGetBufferMemoryRequirements2(dev.device, info, req)
    r = req.memoryRequirements
    return r.size, r.alignment, r.memoryTypeBits, bool(ded.prefersDedicatedAllocation or ded.requiresDedicatedAllocation)


def allocate(dev: VulkanDevice, size: int, type_index: int, *, image: Any = None, buffer: Any = None,
             export: int = 0, import_fd: tuple[int, int] | None = None, host_ptr: Any = None) -> Any:
    """vkAllocateMemory with the pNext chain for export, fd import or host-pointer import (+ dedicated)."""
    chain: list[Any] = []
    if image is not None or buffer is not None:
        chain.append(ffi.new("VkMemoryDedicatedAllocateInfo*", {
            "sType": vk.VK_STRUCTURE_TYPE_MEMORY_DEDICATED_ALLOCATE_INFO,
            "image": image if image is not None else ffi.NULL, "buffer": buffer if buffer is not None else ffi.NULL}))
    if export:
        chain.append(ffi.new("VkExportMemoryAllocateInfo*",
                             {"sType": vk.VK_STRUCTURE_TYPE_EXPORT_MEMORY_ALLOCATE_INFO, "handleTypes": export}))
    if import_fd is not None:
        chain.append(ffi.new("VkImportMemoryFdInfoKHR*", {"sType": vk.VK_STRUCTURE_TYPE_IMPORT_MEMORY_FD_INFO_KHR,
                                                          "handleType": import_fd[0], "fd": import_fd[1]}))
    if host_ptr is not None:
        chain.append(ffi.new("VkImportMemoryHostPointerInfoEXT*", {
            "sType": vk.VK_STRUCTURE_TYPE_IMPORT_MEMORY_HOST_POINTER_INFO_EXT, "handleType": HANDLE_HOST,
            "pHostPointer": host_ptr}))
    for a, b in zip(chain, chain[1:]):
        a.pNext = b
    info = ffi.new("VkMemoryAllocateInfo*", {"sType": vk.VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_INFO,
                                             "pNext": chain[0] if chain else ffi.NULL, "allocationSize": size,
                                             "memoryTypeIndex": type_index})
    out = ffi.new("VkDeviceMemory*")
    check(lib.vkAllocateMemory(dev.device, info, ffi.NULL, out), "vkAllocateMemory")
    track("VkDeviceMemory")
    return out[0]


def destroy(dev: VulkanDevice, *, image: Any = None, buffer: Any = None, memory: Any = None) -> None:
    if image is not None:
        lib.vkDestroyImage(dev.device, image, ffi.NULL)
        track("VkImage", -1)
    if buffer is not None:
        lib.vkDestroyBuffer(dev.device, buffer, ffi.NULL)
        track("VkBuffer", -1)
    if memory is not None:
        lib.vkFreeMemory(dev.device, memory, ffi.NULL)
        track("VkDeviceMemory", -1)


def has_type(dev: VulkanDevice, bits: int, want: int) -> bool:
    return any(bits >> i & 1 and f & want == want for i, (f, _) in enumerate(dev.memory_types))


def barrier(cmd: Any, image: Any, old: int, new: int, mips: int, layers: int) -> None:
    """A full image barrier: all earlier work and host writes before, all later work and host reads after. Heavy
    but always correct, and these helpers are for transfers, not hot render loops."""
    b = ffi.new("VkImageMemoryBarrier*", {
        "sType": vk.VK_STRUCTURE_TYPE_IMAGE_MEMORY_BARRIER, "srcAccessMask": vk.VK_ACCESS_MEMORY_WRITE_BIT,
        "dstAccessMask": vk.VK_ACCESS_MEMORY_READ_BIT | vk.VK_ACCESS_MEMORY_WRITE_BIT | vk.VK_ACCESS_HOST_READ_BIT,
        "oldLayout": old, "newLayout": new, "srcQueueFamilyIndex": vk.VK_QUEUE_FAMILY_IGNORED,
        "dstQueueFamilyIndex": vk.VK_QUEUE_FAMILY_IGNORED, "image": image,
        "subresourceRange": {"aspectMask": COLOR, "baseMipLevel": 0, "levelCount": mips, "baseArrayLayer": 0,
                             "layerCount": layers}})
    lib.vkCmdPipelineBarrier(cmd, vk.VK_PIPELINE_STAGE_ALL_COMMANDS_BIT | vk.VK_PIPELINE_STAGE_HOST_BIT,
                             vk.VK_PIPELINE_STAGE_ALL_COMMANDS_BIT | vk.VK_PIPELINE_STAGE_HOST_BIT, 0,
                             0, ffi.NULL, 0, ffi.NULL, 1, b)


def memory_barrier(cmd: Any) -> None:
    b = ffi.new("VkMemoryBarrier*", {"sType": vk.VK_STRUCTURE_TYPE_MEMORY_BARRIER,
                                     "srcAccessMask": vk.VK_ACCESS_MEMORY_WRITE_BIT,
                                     "dstAccessMask": vk.VK_ACCESS_MEMORY_READ_BIT | vk.VK_ACCESS_MEMORY_WRITE_BIT |
                                     vk.VK_ACCESS_HOST_READ_BIT})
    stages = vk.VK_PIPELINE_STAGE_ALL_COMMANDS_BIT | vk.VK_PIPELINE_STAGE_HOST_BIT
    lib.vkCmdPipelineBarrier(cmd, stages, stages, 0, 1, b, 0, ffi.NULL, 0, ffi.NULL)


def image_params(width: int, height: int, format: str, usage: int, tiling: str, mip_levels: int,
                 array_size: int, vk_usage: int | None = None, vk_flags: int = 0) -> dict[str, Any]:
    fmt = get_format(format)
    if tiling not in TILINGS:
        raise InvalidDescriptor(f"tiling must be one of {', '.join(TILINGS)}, not {tiling!r}")
    for name, v in (("width", width), ("height", height), ("mip_levels", mip_levels), ("array_size", array_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise InvalidDescriptor(f"{name} must be a positive integer, not {v!r}")
    if mip_levels > max(width, height).bit_length():
        raise InvalidDescriptor(f"a {width}x{height} image has at most {max(width, height).bit_length()} mip levels")
    # Outside data must never reach vkCreateImage with bits whose valid usage we don't check (sparse, protected...).
    if vk_usage is not None and vk_usage & ~ALLOWED_USAGE:
        raise InvalidDescriptor(f"vk_usage 0x{vk_usage:x} has bits texbridge does not share (allowed 0x{ALLOWED_USAGE:x})")
    if vk_flags & ~ALLOWED_FLAGS:
        raise InvalidDescriptor(f"vk_flags 0x{vk_flags:x} has bits texbridge does not share (allowed 0x{ALLOWED_FLAGS:x})")
    return {"format": format, "vk_format": fmt.vk, "width": width, "height": height, "mip_levels": mip_levels,
            "array_size": array_size, "tiling": tiling, "vk_tiling": TILINGS[tiling],
            "vk_usage": vk_image_usage(usage) if vk_usage is None else vk_usage, "vk_flags": vk_flags}


def check_buffer_support(dev: VulkanDevice, vk_usage: int, handle_type: int, *, export: bool) -> None:
    info = ffi.new("VkPhysicalDeviceExternalBufferInfo*", {
        "sType": vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_EXTERNAL_BUFFER_INFO, "usage": vk_usage, "handleType": handle_type})
    out = ffi.new("VkExternalBufferProperties*", {"sType": vk.VK_STRUCTURE_TYPE_EXTERNAL_BUFFER_PROPERTIES})
    lib.vkGetPhysicalDeviceExternalBufferProperties(dev.physical_device, info, out)
    need = vk.VK_EXTERNAL_MEMORY_FEATURE_EXPORTABLE_BIT if export else vk.VK_EXTERNAL_MEMORY_FEATURE_IMPORTABLE_BIT
    if not out.externalMemoryProperties.externalMemoryFeatures & need:
        raise BackendError(f"{dev.name}: buffers with usage 0x{vk_usage:x} are not "
                           f"{'exportable' if export else 'importable'} as {HANDLE_NAMES.get(handle_type)}")


def linear_layout(dev: VulkanDevice, image: Any) -> dict[str, int]:
    """Where mip 0 / layer 0 of a LINEAR image lives in its memory (vkGetImageSubresourceLayout)."""
    sub = ffi.new("VkImageSubresource*", {"aspectMask": COLOR, "mipLevel": 0, "arrayLayer": 0})
    lay = ffi.new("VkSubresourceLayout*")
    lib.vkGetImageSubresourceLayout(dev.device, image, sub, lay)
    return {"offset": int(lay.offset), "size": int(lay.size), "row_pitch": int(lay.rowPitch),
            "array_pitch": int(lay.arrayPitch)}


def drm_layout(dev: VulkanDevice, image: Any) -> dict[str, Any]:
    props = ffi.new("VkImageDrmFormatModifierPropertiesEXT*",
                    {"sType": vk.VK_STRUCTURE_TYPE_IMAGE_DRM_FORMAT_MODIFIER_PROPERTIES_EXT})
    check(dev.vkGetImageDrmFormatModifierPropertiesEXT(dev.device, image, props),
          "vkGetImageDrmFormatModifierPropertiesEXT")
    sub = ffi.new("VkImageSubresource*", {"aspectMask": vk.VK_IMAGE_ASPECT_MEMORY_PLANE_0_BIT_EXT})
    lay = ffi.new("VkSubresourceLayout*")
    lib.vkGetImageSubresourceLayout(dev.device, image, sub, lay)
    return {"drm_modifier": int(props.drmFormatModifier),
            "plane_layouts": [{"offset": lay.offset, "size": lay.size, "row_pitch": lay.rowPitch,
                               "array_pitch": lay.arrayPitch}]}
