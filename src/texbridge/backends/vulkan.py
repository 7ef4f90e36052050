"""Vulkan backend: exportable VkImages/VkBuffers (dedicated allocations), cross-process import, memfd import.

Memory handle types: OPAQUE_FD always works between processes on the same driver and device (the UUIDs in the
descriptor prove it); DMA_BUF with an explicit DRM format modifier is chosen automatically where the driver has
VK_EXT_external_memory_dma_buf and VK_EXT_image_drm_format_modifier, because GL/EGL, V4L2 and other drivers can
import it too. The choice is recorded in descriptor.memory and driver_private.

Shared images live in VK_IMAGE_LAYOUT_GENERAL between operations (the layout both sides assume, since layouts are
not shared across processes); every helper transitions out of and back into the resource's current layout.

Where things are: _vk.py (instance, device, timeline semaphores, check), _vk_objects.py (creating, allocating,
destroying images and buffers), _vk_host.py (memfd memory: host import and the staging copy), this module (the
resource, the backend, OPAQUE_FD/DMA_BUF import).
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Any, Sequence

import numpy as np

from . import _vk  # imports `vulkan`: an ImportError here makes the backend unavailable, not texbridge
from .._d3d11 import d3d11_texture_desc
from .._descriptor import FD_MEMORY, FD_SEMAPHORE, Descriptor, Usage, private_int
from .._errors import BackendError, IncompatibleDevice, InvalidArgument, InvalidDescriptor
from .._formats import Format, get_format
from .._fdinfo import inspect_fd
from .._memory_types import check_importer
from .._sharedmem import SharedMapping
from .._resources import Resource
from . import _vk_host
from ._fds import OwnedFds, close_on_error
from ._vk import (HANDLE_DMA_BUF, HANDLE_HOST, HANDLE_NAMES, HANDLE_OPAQUE_FD, TimelineSemaphore, VulkanDevice,
                  VulkanError, check, default_device, ffi, lib, live_objects, vk)
from ._vk_host import HostMapping
from ._vk_objects import (COLOR, DEVICE_LOCAL, HOST_VISIBLE, TILINGS, allocate, barrier, check_buffer_support,
                          check_image_support, create_buffer, create_image, destroy, drm_layout, drm_modifiers,
                          has_type, image_params, linear_layout, memory_barrier, requirements, vk_buffer_usage,
                          vk_image_usage)

LAYOUTS = {
    "undefined": vk.VK_IMAGE_LAYOUT_UNDEFINED, "general": vk.VK_IMAGE_LAYOUT_GENERAL,
    "color_attachment_optimal": vk.VK_IMAGE_LAYOUT_COLOR_ATTACHMENT_OPTIMAL,
    "shader_read_only_optimal": vk.VK_IMAGE_LAYOUT_SHADER_READ_ONLY_OPTIMAL,
    "transfer_src_optimal": vk.VK_IMAGE_LAYOUT_TRANSFER_SRC_OPTIMAL,
    "transfer_dst_optimal": vk.VK_IMAGE_LAYOUT_TRANSFER_DST_OPTIMAL,
}
_ALLOWED_BUFFER_USAGE = (vk.VK_BUFFER_USAGE_TRANSFER_SRC_BIT | vk.VK_BUFFER_USAGE_TRANSFER_DST_BIT |
                         vk.VK_BUFFER_USAGE_STORAGE_BUFFER_BIT | vk.VK_BUFFER_USAGE_UNIFORM_BUFFER_BIT |
                         vk.VK_BUFFER_USAGE_UNIFORM_TEXEL_BUFFER_BIT | vk.VK_BUFFER_USAGE_STORAGE_TEXEL_BUFFER_BIT |
                         vk.VK_BUFFER_USAGE_VERTEX_BUFFER_BIT | vk.VK_BUFFER_USAGE_INDEX_BUFFER_BIT)
WHOLE_SIZE = (1 << 64) - 1  # VK_WHOLE_SIZE (the Python module spells it as -1)


class _Staging:
    """A host-visible buffer, mapped persistently, reused by one resource's uploads and downloads.

    Its .array never leaves this module (download() returns copies), so freeing the memory on close() cannot
    leave a live view behind: vkFreeMemory unmaps, and nothing outside can still point into it."""

    def __init__(self, dev: VulkanDevice, size: int) -> None:
        self.dev, self.size = dev, size
        self.buffer = self.memory = None
        with close_on_error(self.close):
            self.buffer = create_buffer(dev, size, vk.VK_BUFFER_USAGE_TRANSFER_SRC_BIT |
                                        vk.VK_BUFFER_USAGE_TRANSFER_DST_BIT, 0)
            rsize, _, bits, _ = requirements(dev, buffer=self.buffer)
            t = dev.find_memory_type(bits, HOST_VISIBLE | vk.VK_MEMORY_PROPERTY_HOST_CACHED_BIT) \
                if has_type(dev, bits, HOST_VISIBLE | vk.VK_MEMORY_PROPERTY_HOST_CACHED_BIT) \
                else dev.find_memory_type(bits, HOST_VISIBLE)
            self.memory = allocate(dev, rsize, t)
            check(lib.vkBindBufferMemory(dev.device, self.buffer, self.memory, 0), "vkBindBufferMemory")
            ptr = ffi.new("void**")
            check(lib.vkMapMemory(dev.device, self.memory, 0, size, 0, ptr), "vkMapMemory")
            self.array = np.frombuffer(ffi.buffer(ptr[0], size), np.uint8)

    def close(self) -> None:
        self.array = None
        buf, mem, self.buffer, self.memory = self.buffer, self.memory, None, None
        destroy(self.dev, buffer=buf, memory=mem)  # freeing the memory unmaps it


def _clear_value(fmt: Format, color: Any) -> Any:
    vals = list(np.atleast_1d(np.asarray(color, dtype=np.float64)).reshape(-1))[:4]
    vals += [0.0] * (4 - len(vals))
    if fmt.name == "r32ui":
        return ffi.new("VkClearColorValue*", {"uint32": [int(v) for v in vals]})
    return ffi.new("VkClearColorValue*", {"float32": vals})


def _exclusive(method: Any) -> Any:
    """Transfers and close() of one resource never overlap: a close() from another thread waits for the transfer, so
    the staging memory it writes through a vkMapMemory pointer is never freed (unmapped) under it."""

    @functools.wraps(method)
    def wrapper(self: "VulkanResource", *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


class VulkanResource(Resource):
    """A texture or buffer visible to Vulkan in this process.

    .image / .buffer / .memory are the raw cffi handles (VkImage, VkBuffer, VkDeviceMemory), .device the
    VulkanDevice, .layout the image's current VkImageLayout. For a memfd imported into Vulkan, `zero_copy` says
    whether Vulkan sees the memfd pages themselves (VK_EXT_external_memory_host) or a copy kept in sync by
    sync_to_image()/sync_to_host() (both no-ops when zero_copy).
    """

    backend_name = "vulkan"

    def __init__(self, descriptor: Descriptor, device: VulkanDevice, *, image: Any = None, buffer: Any = None,
                 memory: Any = None, handle_type: int = 0, exportable: bool = False, layout: int = 0,
                 fd: int = -1, host: HostMapping | None = None, host_map: SharedMapping | None = None,
                 extra_buffer: bool = False) -> None:
        super().__init__(descriptor)
        self._lock = threading.RLock()
        self.device, self.image, self.buffer, self.memory = device, image, buffer, memory
        self.handle_type, self.exportable = handle_type, exportable
        self.layout = layout or vk.VK_IMAGE_LAYOUT_GENERAL
        self.zero_copy = descriptor.memory != "memfd" or host is not None
        self._fd, self._host, self._host_map = fd, host, host_map
        self._staging: _Staging | None = None
        self._extra_buffer = extra_buffer  # memfd textures seen as a VkBuffer too (host path)
        self.semaphore: TimelineSemaphore | None = None  # the keyed mutex's GPU half (descriptor.gpu_sync)
        device._register(self)

    @property
    def format(self) -> Format | None:
        return get_format(self.descriptor.format) if self.descriptor.kind == "texture2d" else None

    # -- export ---------------------------------------------------------------------------------------------------
    def export_fds(self) -> list[int]:
        """A new fd for the memory (vkGetMemoryFdKHR: each call gives a new fd; the caller closes it)."""
        self._check_open()
        if self._fd >= 0:
            return [os.dup(self._fd)]
        if not self.exportable:
            raise BackendError("this Vulkan resource was imported; export the original (the broker keeps its fd)")
        info = ffi.new("VkMemoryGetFdInfoKHR*", {"sType": vk.VK_STRUCTURE_TYPE_MEMORY_GET_FD_INFO_KHR,
                                                 "memory": self.memory, "handleType": self.handle_type})
        out = ffi.new("int*")
        check(self.device.vkGetMemoryFdKHR(self.device.device, info, out), "vkGetMemoryFdKHR")
        fds = [out[0]]
        if self.semaphore is not None:
            with close_on_error(functools.partial(os.close, fds[0])):
                fds.append(self.semaphore.export_fd())
        return fds

    # -- keyed mutex ↔ GPU -------------------------------------------------------------------------------------------
    def gpu_acquired(self, value: int) -> None:
        """The next submit on this device waits (on the GPU) for the releaser's value; no CPU stall."""
        if self.semaphore is not None:
            self.device.submit_wait(value, self.semaphore)

    def gpu_releasing(self, acquired_value: int) -> int | None:
        """Timeline path: the queue signals acquired+1 when this process's work is done, and release returns at
        once. cpu_wait path (no external semaphores, e.g. lavapipe): wait for the queue before releasing."""
        if self.semaphore is None:
            self.device.wait_idle()
            return None
        value = acquired_value + 1
        self.device.submit_signal(value, self.semaphore)
        return value

    def _attach_semaphore(self) -> None:
        """Give an exported resource with a keyed mutex its own shareable timeline semaphore, where the device can."""
        if self.descriptor.keyed_mutex and self.device.gpu_sync == "timeline_semaphore":
            self.semaphore = self.device.create_timeline_semaphore()
            self.descriptor = self.descriptor.with_(gpu_sync="timeline_opaque_fd")

    # -- transfers ------------------------------------------------------------------------------------------------
    def _staging_for(self, size: int) -> _Staging:
        if self._staging is None or self._staging.size < size:
            if self._staging is not None:
                self._staging.close()
                self._staging = None
            self._staging = _Staging(self.device, size)
        return self._staging

    def _texel_bytes(self) -> int:
        d = self.descriptor
        return d.width * d.height * get_format(d.format).bytes_per_pixel

    def _copy_image(self, to_image: bool, staging: _Staging, layer: int = 0) -> None:
        d, img = self.descriptor, self.image
        region = ffi.new("VkBufferImageCopy*", {
            "bufferOffset": 0, "bufferRowLength": 0, "bufferImageHeight": 0,
            "imageSubresource": {"aspectMask": COLOR, "mipLevel": 0, "baseArrayLayer": layer, "layerCount": 1},
            "imageOffset": {"x": 0, "y": 0, "z": 0}, "imageExtent": {"width": d.width, "height": d.height, "depth": 1}})
        op_layout = vk.VK_IMAGE_LAYOUT_TRANSFER_DST_OPTIMAL if to_image else vk.VK_IMAGE_LAYOUT_TRANSFER_SRC_OPTIMAL

        def record(cmd: Any) -> None:
            barrier(cmd, img, self.layout, op_layout, d.mip_levels, d.array_size)
            if to_image:
                lib.vkCmdCopyBufferToImage(cmd, staging.buffer, img, op_layout, 1, region)
            else:
                lib.vkCmdCopyImageToBuffer(cmd, img, op_layout, staging.buffer, 1, region)
            barrier(cmd, img, op_layout, self.layout, d.mip_levels, d.array_size)

        self.device.one_shot(record)

    def _copy_buffer(self, to_buffer: bool, staging: _Staging, regions: list[tuple[int, int, int]]) -> None:
        """regions: (resource offset, staging offset, size)."""
        arr = ffi.new("VkBufferCopy[]", [
            {"srcOffset": so, "dstOffset": ro, "size": n} if to_buffer else {"srcOffset": ro, "dstOffset": so, "size": n}
            for ro, so, n in regions])

        def record(cmd: Any) -> None:
            memory_barrier(cmd)
            if to_buffer:
                lib.vkCmdCopyBuffer(cmd, staging.buffer, self.buffer, len(regions), arr)
            else:
                lib.vkCmdCopyBuffer(cmd, self.buffer, staging.buffer, len(regions), arr)
            memory_barrier(cmd)

        self.device.one_shot(record)

    def _texture_rows(self) -> list[tuple[int, int, int]]:
        """Row regions of a pitched memfd texture seen through .buffer (padding bytes are never touched)."""
        d = self.descriptor
        row = d.width * get_format(d.format).bytes_per_pixel
        return [(d.offset + y * d.row_pitch, y * row, row) for y in range(d.height)]

    @_exclusive
    def upload(self, array: np.ndarray, *, layer: int = 0) -> None:
        """Copy `array` (shape of download()) into mip 0 of `layer` through a staging buffer."""
        self._check_open()
        d = self.descriptor
        if d.kind == "texture2d":
            array = self._check_frame(array)
            fmt = get_format(d.format)
            n = self._texel_bytes()
            staging = self._staging_for(n)
            view = staging.array[:n].view(fmt.numpy_dtype).reshape(self.shape)
        else:
            # A buffer takes any bytes up to its size (a prefix): its size is the allocation's, which drivers round
            # up (create_buffer(10000) may hold 10048 bytes; the request is in driver_private["requested_size"]).
            array = self._check_bytes(array, d.size)
            staging = self._staging_for(d.size)
            view = staging.array[:array.size]
        view[...] = array
        if self.image is not None:
            self._copy_image(True, staging, layer)
        elif d.kind == "texture2d":
            self._copy_buffer(True, staging, self._texture_rows())
        else:
            self._copy_buffer(True, staging, [(0, 0, view.size)])
        if self._host_map is not None:
            self.sync_to_host()

    @_exclusive
    def download(self, *, layer: int = 0) -> np.ndarray:
        """A NumPy copy of mip 0 of `layer` (textures: (H, W, C)) or of the whole buffer, read through Vulkan."""
        self._check_open()
        d = self.descriptor
        if d.kind == "texture2d":
            fmt = get_format(d.format)
            n = self._texel_bytes()
            staging = self._staging_for(n)
            if self.image is not None:
                self._copy_image(False, staging, layer)
            else:
                self._copy_buffer(False, staging, self._texture_rows())
            return staging.array[:n].view(fmt.numpy_dtype).reshape(self.shape).copy()
        staging = self._staging_for(d.size)
        self._copy_buffer(False, staging, [(0, 0, d.size)])
        return staging.array[:d.size].copy()

    @_exclusive
    def copy_to(self, dst: "VulkanResource") -> None:
        """Copy this texture (mip 0, layer 0) into image `dst` on the same VulkanDevice, on the GPU (vkCmdCopyImage;
        vkCmdCopyBufferToImage when this memory has no VkImage here, e.g. a pitched memfd seen as a buffer).
        Complete when it returns (a fence wait): a receiver re-checks the slot's sequence after it."""
        self._check_open()
        if not isinstance(dst, VulkanResource):
            raise InvalidArgument(f"copy_to takes a VulkanResource on the same device, not {dst!r}")
        dst._check_open()
        d, dd = self.descriptor, dst.descriptor
        if d.kind != "texture2d" or dd.kind != "texture2d" or dst.image is None:
            raise InvalidArgument("copy_to copies a texture into a texture with a VkImage")
        if (d.width, d.height, d.format) != (dd.width, dd.height, dd.format):
            raise InvalidArgument(f"copy_to needs the same size and format: {d.width}x{d.height} {d.format} into "
                                  f"{dd.width}x{dd.height} {dd.format}")
        if dst.device is not self.device:
            raise IncompatibleDevice(f"copy_to stays on one VkDevice: {self.device.name} → {dst.device.name}")
        if self._host_map is not None:
            self.sync_to_image()  # staged memfd: the image holds a copy; bring it up to date first
        sub = {"aspectMask": COLOR, "mipLevel": 0, "baseArrayLayer": 0, "layerCount": 1}
        extent = {"width": d.width, "height": d.height, "depth": 1}
        src_op, dst_op = vk.VK_IMAGE_LAYOUT_TRANSFER_SRC_OPTIMAL, vk.VK_IMAGE_LAYOUT_TRANSFER_DST_OPTIMAL
        origin = {"x": 0, "y": 0, "z": 0}

        def record(cmd: Any) -> None:
            barrier(cmd, dst.image, dst.layout, dst_op, dd.mip_levels, dd.array_size)
            if self.image is not None:
                barrier(cmd, self.image, self.layout, src_op, d.mip_levels, d.array_size)
                region = ffi.new("VkImageCopy*", {"srcSubresource": sub, "srcOffset": origin, "dstSubresource": sub,
                                                  "dstOffset": origin, "extent": extent})
                lib.vkCmdCopyImage(cmd, self.image, src_op, dst.image, dst_op, 1, region)
                barrier(cmd, self.image, src_op, self.layout, d.mip_levels, d.array_size)
            else:
                memory_barrier(cmd)
                region = ffi.new("VkBufferImageCopy*", {
                    "bufferOffset": d.offset, "bufferRowLength": d.row_pitch // get_format(d.format).bytes_per_pixel,
                    "bufferImageHeight": 0, "imageSubresource": sub, "imageOffset": origin, "imageExtent": extent})
                lib.vkCmdCopyBufferToImage(cmd, self.buffer, dst.image, dst_op, 1, region)
            barrier(cmd, dst.image, dst_op, dst.layout, dd.mip_levels, dd.array_size)

        with dst._lock:
            self.device.one_shot(record)
            if dst._host_map is not None:
                dst.sync_to_host()

    @_exclusive
    def clear(self, color: Any = (0, 0, 0, 0)) -> None:
        """Fill every mip and layer with `color` (floats for normalized/float formats, ints for r32ui) on the GPU;
        buffers are filled with the 32-bit word `color`."""
        self._check_open()
        d = self.descriptor
        if self.image is None:
            if d.kind == "texture2d":
                raise BackendError("this memfd texture has no VkImage view here (row pitch differs); use upload()")
            word = int(np.asarray(color).reshape(-1)[0]) & 0xFFFFFFFF

            def fill(cmd: Any) -> None:
                memory_barrier(cmd)
                lib.vkCmdFillBuffer(cmd, self.buffer, 0, WHOLE_SIZE, word)
                memory_barrier(cmd)

            self.device.one_shot(fill)
            return
        value = _clear_value(get_format(d.format), color)
        rng = ffi.new("VkImageSubresourceRange*", {"aspectMask": COLOR, "baseMipLevel": 0, "levelCount": d.mip_levels,
                                                   "baseArrayLayer": 0, "layerCount": d.array_size})
        dst = vk.VK_IMAGE_LAYOUT_TRANSFER_DST_OPTIMAL

        def record(cmd: Any) -> None:
            barrier(cmd, self.image, self.layout, dst, d.mip_levels, d.array_size)
            lib.vkCmdClearColorImage(cmd, self.image, dst, value, 1, rng)
            barrier(cmd, self.image, dst, self.layout, d.mip_levels, d.array_size)

        self.device.one_shot(record)
        if self._host_map is not None:
            self.sync_to_host()

    @_exclusive
    def transition(self, layout: int | str) -> None:
        """Move the image to `layout` (a VkImageLayout or a name like "shader_read_only_optimal"); later helpers
        return it there. Leave shared images in "general" before another process uses them."""
        self._check_open()
        new = LAYOUTS[layout] if isinstance(layout, str) else int(layout)
        if self.image is None:
            raise BackendError("a buffer has no image layout")
        d, old = self.descriptor, self.layout
        if new != old:
            self.device.one_shot(lambda cmd: barrier(cmd, self.image, old, new, d.mip_levels, d.array_size))
            self.layout = new

    # -- memfd staging path ----------------------------------------------------------------------------------------
    def _host_view(self) -> np.ndarray:
        d = self.descriptor
        fmt = get_format(d.format)
        assert self._host_map is not None
        return self._host_map.array(self.shape, fmt.numpy_dtype, offset=d.offset,
                                    strides=(d.row_pitch, fmt.bytes_per_pixel, fmt.numpy_dtype.itemsize))

    @_exclusive
    def sync_to_image(self) -> None:
        """memfd → VkImage after CPU writes (staging path only; zero-copy resources share the pages)."""
        self._check_open()
        if self._host_map is None:
            return
        staging = self._staging_for(self._texel_bytes())
        fmt = get_format(self.descriptor.format)
        staging.array[:self._texel_bytes()].view(fmt.numpy_dtype).reshape(self.shape)[...] = self._host_view()
        self._copy_image(True, staging)

    @_exclusive
    def sync_to_host(self) -> None:
        """VkImage → memfd after GPU writes (staging path only)."""
        self._check_open()
        if self._host_map is None:
            return
        staging = self._staging_for(self._texel_bytes())
        self._copy_image(False, staging)
        fmt = get_format(self.descriptor.format)
        self._host_view()[...] = staging.array[:self._texel_bytes()].view(fmt.numpy_dtype).reshape(self.shape)

    # -- lifetime ----------------------------------------------------------------------------------------------------
    @_exclusive
    def _release(self) -> None:
        dev = self.device
        semaphore, self.semaphore = self.semaphore, None
        staging, self._staging = self._staging, None
        image, buffer, memory = self.image, self.buffer, self.memory
        self.image = self.buffer = self.memory = None
        host, self._host = self._host, None
        host_map, self._host_map = self._host_map, None
        fd, self._fd = self._fd, -1
        try:
            if dev.device is not None and not dev.closed:
                lib.vkQueueWaitIdle(dev.queue)  # never destroy what queued work may still touch
                if staging is not None:
                    staging.close()
                if semaphore is not None:
                    semaphore.destroy()
                destroy(dev, image=image, buffer=buffer, memory=memory)
        finally:
            if host is not None:
                host.close()  # after vkFreeMemory: the driver may touch imported pages until then
            if host_map is not None:
                host_map.close()
            if fd >= 0:
                os.close(fd)


class VulkanBackend:
    """Creates exportable Vulkan memory and imports what others exported (see module docstring)."""

    name = "vulkan"

    # -- creation ----------------------------------------------------------------------------------------------------
    def create_texture(self, width: int, height: int, format: str, *, usage: int = int(Usage.DEFAULT),
                       keyed_mutex: bool = False, device: VulkanDevice | None = None, tiling: str = "optimal",
                       mip_levels: int = 1, array_size: int = 1, memory: str = "auto") -> VulkanResource:
        """An exportable 2D image with a dedicated allocation, cleared to zero and left in the GENERAL layout.

        memory: "auto" (dma_buf where the driver can, else opaque_fd), "opaque_fd" or "dma_buf".
        """
        dev = device or default_device()
        dev.check_open()
        p = image_params(width, height, format, usage, tiling, mip_levels, array_size)
        if memory not in ("auto", "opaque_fd", "dma_buf"):
            raise InvalidDescriptor(f"memory must be auto, opaque_fd or dma_buf, not {memory!r}")
        modifiers: list[int] = []
        if memory != "opaque_fd" and dev.dma_buf and tiling == "optimal" and mip_levels == 1 and array_size == 1 \
                and get_format(format).drm_fourcc:
            dm = {**p, "tiling": "drm_modifier", "vk_tiling": TILINGS["drm_modifier"]}
            modifiers = drm_modifiers(dev, dm)
            if modifiers:
                p = dm
        if memory == "auto" and modifiers:
            try:
                return self.create_texture(width, height, format, usage=usage, keyed_mutex=keyed_mutex, device=dev,
                                           tiling=tiling, mip_levels=mip_levels, array_size=array_size,
                                           memory="dma_buf")
            except BackendError:  # a driver that lists a modifier but fails the export: OPAQUE_FD still works
                return self.create_texture(width, height, format, usage=usage, keyed_mutex=keyed_mutex, device=dev,
                                           tiling=tiling, mip_levels=mip_levels, array_size=array_size,
                                           memory="opaque_fd")
        if memory == "dma_buf" and not modifiers:
            raise BackendError(f"{dev.name}: no dma_buf export with an explicit DRM modifier for {format} "
                               f"(needs VK_EXT_external_memory_dma_buf and VK_EXT_image_drm_format_modifier)")
        handle_type = HANDLE_DMA_BUF if modifiers else HANDLE_OPAQUE_FD
        if not modifiers:
            check_image_support(dev, p, handle_type, export=True)
        image = mem = None
        with close_on_error(lambda: destroy(dev, image=image, memory=mem)):
            image = create_image(dev, p, handle_type, modifiers=modifiers)
            size, _, bits, _ = requirements(dev, image=image)
            type_index = dev.find_memory_type(bits, DEVICE_LOCAL)
            mem = allocate(dev, size, type_index, image=image, export=handle_type)
            check(lib.vkBindImageMemory(dev.device, image, mem, 0), "vkBindImageMemory")
            dp: dict[str, Any] = {
                "tiling": p["tiling"], "vk_format": p["vk_format"], "vk_usage": p["vk_usage"],
                "vk_flags": p["vk_flags"], "allocation_size": size, "memory_type_index": type_index,
                "memory_type_bits": bits, "memory_type_flags": dev.memory_types[type_index][0], "dedicated": True,
                "handle_type": HANDLE_NAMES[handle_type], "shared_layout": "general",
            }
            planes: tuple[tuple[int, int], ...] = ()
            if modifiers:
                dp.update(drm_layout(dev, image))
                dp["drm_fourcc"] = get_format(format).drm_fourcc
            elif p["tiling"] == "linear":
                # A third party given only the descriptor and the fd must find the pixels: record the layout.
                dp["plane_layouts"] = [linear_layout(dev, image)]
                planes = ((dp["plane_layouts"][0]["offset"], dp["plane_layouts"][0]["row_pitch"]),)
            desc = Descriptor(
                kind="texture2d", size=size, width=width, height=height, format=format, mip_levels=mip_levels,
                array_size=array_size, planes=planes, memory=HANDLE_NAMES[handle_type], backend="vulkan",
                driver_uuid=dev.driver_uuid, device_uuid=dev.device_uuid, usage=int(usage), keyed_mutex=keyed_mutex,
                runtime_private=d3d11_texture_desc(width, height, format, mip_levels=mip_levels,
                                                   array_size=array_size, keyed_mutex=keyed_mutex),
                driver_private=dp).validate()
        res = VulkanResource(desc, dev, image=image, memory=mem, handle_type=handle_type, exportable=True,
                             layout=vk.VK_IMAGE_LAYOUT_GENERAL)
        with close_on_error(res.close):
            # Defined contents (zeros, like a memfd) and the shared GENERAL layout before anyone imports it.
            value, rng = _clear_value(get_format(format), 0), ffi.new("VkImageSubresourceRange*", {
                "aspectMask": COLOR, "levelCount": mip_levels, "layerCount": array_size})

            def init(cmd: Any) -> None:
                dst = vk.VK_IMAGE_LAYOUT_TRANSFER_DST_OPTIMAL
                barrier(cmd, image, vk.VK_IMAGE_LAYOUT_UNDEFINED, dst, mip_levels, array_size)
                lib.vkCmdClearColorImage(cmd, image, dst, value, 1, rng)
                barrier(cmd, image, dst, vk.VK_IMAGE_LAYOUT_GENERAL, mip_levels, array_size)

            dev.one_shot(init)
            res._attach_semaphore()
        return res

    def create_buffer(self, size: int, *, usage: int = int(Usage.DEFAULT), keyed_mutex: bool = False,
                      device: VulkanDevice | None = None) -> VulkanResource:
        """An exportable (OPAQUE_FD) buffer with a dedicated allocation, filled with zeros."""
        dev = device or default_device()
        dev.check_open()
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise InvalidDescriptor(f"size must be a positive integer, not {size!r}")
        vk_usage = vk_buffer_usage(usage)
        check_buffer_support(dev, vk_usage, HANDLE_OPAQUE_FD, export=True)
        buf = mem = None
        with close_on_error(lambda: destroy(dev, buffer=buf, memory=mem)):
            buf = create_buffer(dev, size, vk_usage, HANDLE_OPAQUE_FD)
            alloc, _, bits, _ = requirements(dev, buffer=buf)
            if alloc != size:  # make the buffer span its whole allocation, so size means one thing everywhere
                destroy(dev, buffer=buf)
                buf = None
                buf = create_buffer(dev, alloc, vk_usage, HANDLE_OPAQUE_FD)
                alloc, _, bits, _ = requirements(dev, buffer=buf)
            type_index = dev.find_memory_type(bits, DEVICE_LOCAL)
            mem = allocate(dev, alloc, type_index, buffer=buf, export=HANDLE_OPAQUE_FD)
            check(lib.vkBindBufferMemory(dev.device, buf, mem, 0), "vkBindBufferMemory")
            desc = Descriptor(
                kind="buffer", size=alloc, memory="opaque_fd", backend="vulkan", driver_uuid=dev.driver_uuid,
                device_uuid=dev.device_uuid, usage=int(usage), keyed_mutex=keyed_mutex,
                driver_private={"buffer_size": alloc, "requested_size": size, "vk_usage": vk_usage, "vk_flags": 0, "allocation_size": alloc,
                                "memory_type_index": type_index, "memory_type_bits": bits,
                                "memory_type_flags": dev.memory_types[type_index][0], "dedicated": True,
                                "handle_type": "opaque_fd"}).validate()
        res = VulkanResource(desc, dev, buffer=buf, memory=mem, handle_type=HANDLE_OPAQUE_FD, exportable=True)
        with close_on_error(res.close):
            dev.one_shot(lambda cmd: (lib.vkCmdFillBuffer(cmd, buf, 0, WHOLE_SIZE, 0), memory_barrier(cmd)))
            res._attach_semaphore()
        return res

    # -- import ------------------------------------------------------------------------------------------------------
    def import_resource(self, descriptor: Descriptor, fds: Sequence[int], *, device: VulkanDevice | None = None,
                        host_import: bool | None = None) -> VulkanResource:
        """Open memory another process (or API) exported. Takes ownership of every fd in `fds`, always.

        opaque_fd/dma_buf: the image/buffer is recreated with the exporter's parameters and bound to the imported
        memory. memfd: mapped and imported as host memory (zero copy) where VK_EXT_external_memory_host allows,
        else copied (see sync_to_image/sync_to_host); host_import=False forces the copy path.
        """
        with OwnedFds.for_import(descriptor, fds) as owned:  # closes what the import did not take
            if owned.get(FD_MEMORY) < 0:
                raise InvalidDescriptor("import needs the memory fd")
            dev = device or default_device()
            dev.check_open()
            d = descriptor
            if check_importer(d.memory, "vulkan").host_mappable:
                res = _import_memfd(dev, d, owned, host_import)
            else:
                res = _import_fd(dev, d, owned)
            sem_fd = owned.take_one(FD_SEMAPHORE)
            if sem_fd >= 0:
                with close_on_error(res.close):
                    res.semaphore = dev.import_timeline_semaphore(sem_fd)  # takes the fd, success or failure
            return res

    def diagnostics(self) -> dict[str, Any]:
        try:
            devices = [d.summary() for d in _vk.list_devices()]
            usable = [d for d in devices if d["external_memory_fd"]]
            info: dict[str, Any] = {"available": bool(usable), "devices": devices}
            if usable:
                dev = default_device()
                info["default_device"] = dev.name
                info["gpu_sync"] = dev.gpu_sync
                info["capabilities"] = dev.capabilities
                info["detail"] = f"{dev.name}: OPAQUE_FD export/import" + (", dma_buf" if dev.dma_buf else "")
            else:
                info["detail"] = "no Vulkan device with VK_KHR_external_memory_fd"
            return info
        except Exception as e:  # never raises: doctor reports instead
            return {"available": False, "detail": f"{type(e).__name__}: {e}"}


def _import_fd(dev: VulkanDevice, d: Descriptor, fds: OwnedFds) -> VulkanResource:
    """OPAQUE_FD / DMA_BUF import of the memory fd, taken from `fds` once Vulkan owns it (a successful
    vkAllocateMemory). Identity is checked first: nothing touches the fd before the UUIDs match."""
    fd = fds.get(FD_MEMORY)
    if d.memory == "cuda_vmm":
        return _import_cuda_vmm(dev, d, fds)
    handle_type = HANDLE_OPAQUE_FD if d.memory == "opaque_fd" else HANDLE_DMA_BUF
    if handle_type == HANDLE_OPAQUE_FD:
        if len(d.driver_uuid) != 16 or len(d.device_uuid) != 16:
            raise InvalidDescriptor("an opaque_fd descriptor must name the exporting driver and device UUIDs")
        if d.driver_uuid != dev.driver_uuid or d.device_uuid != dev.device_uuid:
            raise IncompatibleDevice(
                f"memory exported by driver {d.driver_uuid.hex()} / device {d.device_uuid.hex()} cannot be imported "
                f"as OPAQUE_FD on {dev.name} (driver {dev.driver_uuid.hex()} / device {dev.device_uuid.hex()})")
    elif not dev.dma_buf:
        raise BackendError(f"{dev.name} cannot import dma_buf images (needs VK_EXT_external_memory_dma_buf and "
                           "VK_EXT_image_drm_format_modifier)")
    facts = inspect_fd(fd)
    if facts.kind in ("memfd", "regular") and facts.size < d.size:
        # Some drivers (lavapipe) export OPAQUE_FD as a memfd: a short one would SIGBUS on first touch.
        raise InvalidDescriptor(f"the memory fd holds {facts.size} bytes but the descriptor needs {d.size}")
    dp = d.driver_private
    alloc = private_int(dp, "allocation_size", d.size)
    if alloc != d.size:
        raise InvalidDescriptor(f"allocation_size {alloc} differs from the descriptor size {d.size}")
    fd_type_bits = ~0
    if handle_type == HANDLE_DMA_BUF:
        fp = ffi.new("VkMemoryFdPropertiesKHR*", {"sType": vk.VK_STRUCTURE_TYPE_MEMORY_FD_PROPERTIES_KHR})
        check(dev.vkGetMemoryFdPropertiesKHR(dev.device, handle_type, fd, fp), "vkGetMemoryFdPropertiesKHR")
        fd_type_bits = fp.memoryTypeBits
    image = buf = mem = None
    with close_on_error(lambda: destroy(dev, image=image, buffer=buf, memory=mem)):
        if d.kind == "texture2d":
            tiling = dp.get("tiling", "optimal")
            if handle_type == HANDLE_DMA_BUF and tiling != "drm_modifier":
                raise InvalidDescriptor("a dma_buf image descriptor needs tiling 'drm_modifier' and its modifier")
            p = image_params(d.width, d.height, d.format, d.usage, tiling, d.mip_levels, d.array_size,
                             vk_usage=private_int(dp, "vk_usage", vk_image_usage(d.usage)),
                             vk_flags=private_int(dp, "vk_flags", 0))
            if p["vk_format"] != private_int(dp, "vk_format", p["vk_format"]):
                raise InvalidDescriptor(f"driver_private vk_format {dp['vk_format']} does not match format {d.format}")
            explicit = None
            if tiling == "drm_modifier":
                layouts = dp.get("plane_layouts")
                if not (isinstance(layouts, list) and len(layouts) == 1 and isinstance(layouts[0], dict)):
                    raise InvalidDescriptor("a dma_buf descriptor needs one plane layout")
                explicit = {"modifier": private_int(dp, "drm_modifier"),
                            "offset": private_int(layouts[0], "offset"),
                            "row_pitch": private_int(layouts[0], "row_pitch"),
                            "array_pitch": private_int(layouts[0], "array_pitch", 0)}
            check_image_support(dev, p, handle_type, export=False,
                                modifier=explicit["modifier"] if explicit else None)
            image = create_image(dev, p, handle_type, explicit=explicit)
            if tiling == "linear" and d.planes:
                here = linear_layout(dev, image)
                if (here["offset"], here["row_pitch"]) != (d.offset, d.row_pitch):
                    raise IncompatibleDevice(
                        f"the exporter's linear layout (offset {d.offset}, row pitch {d.row_pitch}) differs from "
                        f"{dev.name}'s (offset {here['offset']}, row pitch {here['row_pitch']}): import the memory "
                        "as a buffer and read rows at the descriptor's planes instead")
            need, _, bits, _ = requirements(dev, image=image)
        elif d.kind == "buffer":
            vk_usage = private_int(dp, "vk_usage", vk_buffer_usage(d.usage))
            if vk_usage & ~_ALLOWED_BUFFER_USAGE or not vk_usage:
                raise InvalidDescriptor(f"buffer vk_usage 0x{vk_usage:x} is not one texbridge shares")
            check_buffer_support(dev, vk_usage, handle_type, export=False)
            if private_int(dp, "buffer_size", d.size) != d.size:
                raise InvalidDescriptor("a Vulkan buffer spans its whole allocation: buffer_size must equal size")
            buf = create_buffer(dev, d.size, vk_usage, handle_type)
            need, _, bits, _ = requirements(dev, buffer=buf)
        else:
            raise InvalidDescriptor(f"the vulkan backend cannot import a {d.kind}")
        if need > d.size:
            raise InvalidDescriptor(f"the resource needs {need} bytes here but the exported allocation has {d.size}")
        bits &= fd_type_bits
        want = private_int(dp, "memory_type_index") if "memory_type_index" in dp else -1
        if 0 <= want < 32 and bits >> want & 1:
            type_index = want  # same driver and device (UUIDs matched): use the exporter's memory type
        else:
            type_index = dev.find_memory_type(bits, 0, avoid=0) if not has_type(dev, bits, DEVICE_LOCAL) \
                else dev.find_memory_type(bits, DEVICE_LOCAL)
        mem = allocate(dev, d.size, type_index, image=image, buffer=buf, import_fd=(handle_type, fd))
        fds.take(FD_MEMORY)  # a successful vkAllocateMemory owns the fd
        if image is not None:
            check(lib.vkBindImageMemory(dev.device, image, mem, 0), "vkBindImageMemory")
        else:
            check(lib.vkBindBufferMemory(dev.device, buf, mem, 0), "vkBindBufferMemory")
    return VulkanResource(d, dev, image=image, buffer=buf, memory=mem, handle_type=handle_type,
                          layout=vk.VK_IMAGE_LAYOUT_GENERAL)


def _import_cuda_vmm(dev: VulkanDevice, d: Descriptor, fds: OwnedFds) -> VulkanResource:
    """A CUDA VMM allocation's POSIX fd imported as OPAQUE_FD (NVIDIA: the same driver's memory). Its textures are
    pitch-linear rows, which no VkImage here is guaranteed to match, so the memory is seen as a VkBuffer and the
    texture is read through the descriptor's row pitch (download, copy_to: vkCmdCopyBufferToImage), as a pitched
    memfd is. The allocation is not a dedicated one."""
    if len(d.device_uuid) != 16:
        raise InvalidDescriptor("a cuda_vmm descriptor must name its device UUID")
    if d.device_uuid != dev.device_uuid:
        raise IncompatibleDevice(f"CUDA memory of device {d.device_uuid.hex()} cannot be imported on {dev.name} "
                                 f"(device {dev.device_uuid.hex()}): OPAQUE_FD stays on one GPU")
    if private_int(d.driver_private, "allocation_size", d.size) != d.size:
        raise InvalidDescriptor("a cuda_vmm allocation_size must equal the descriptor size")
    if d.kind == "texture2d" and (len(d.planes) != 1 or d.mip_levels != 1 or d.array_size != 1):
        raise InvalidDescriptor("a cuda_vmm texture is one pitch-linear plane")
    if d.kind not in ("texture2d", "buffer"):
        raise InvalidDescriptor(f"the vulkan backend cannot import a {d.kind}")
    vk_usage = vk_buffer_usage(d.usage) | vk.VK_BUFFER_USAGE_TRANSFER_SRC_BIT | vk.VK_BUFFER_USAGE_TRANSFER_DST_BIT
    check_buffer_support(dev, vk_usage, HANDLE_OPAQUE_FD, export=False)
    buf = mem = None
    with close_on_error(lambda: destroy(dev, buffer=buf, memory=mem)):
        buf = create_buffer(dev, d.size, vk_usage, HANDLE_OPAQUE_FD)
        need, _, bits, _ = requirements(dev, buffer=buf)
        if need > d.size:
            raise InvalidDescriptor(f"a buffer over the allocation needs {need} bytes here; it has {d.size}")
        type_index = dev.find_memory_type(bits, DEVICE_LOCAL) if has_type(dev, bits, DEVICE_LOCAL) \
            else dev.find_memory_type(bits, 0, avoid=0)
        mem = allocate(dev, d.size, type_index, import_fd=(HANDLE_OPAQUE_FD, fds.get(FD_MEMORY)))
        fds.take(FD_MEMORY)  # a successful vkAllocateMemory owns the fd
        check(lib.vkBindBufferMemory(dev.device, buf, mem, 0), "vkBindBufferMemory")
    return VulkanResource(d, dev, buffer=buf, memory=mem, handle_type=HANDLE_OPAQUE_FD,
                          extra_buffer=d.kind == "texture2d")


def _import_memfd(dev: VulkanDevice, d: Descriptor, fds: OwnedFds, host_import: bool | None) -> VulkanResource:
    """memfd → Vulkan, zero-copy where the device can, else through a copy (the objects: _vk_host). The resource
    takes the memory fd from `fds` once it exists (kept for export_fds)."""
    fd = fds.get(FD_MEMORY)
    if _vk_host.zero_copy(dev, d, fd, host_import):
        res = VulkanResource(d, dev, handle_type=HANDLE_HOST, fd=fd, layout=vk.VK_IMAGE_LAYOUT_GENERAL,
                             **_vk_host.host_objects(dev, d, fd))
        fds.take(FD_MEMORY)  # the resource's now: its close() closes it
        image = res.image
        if image is not None:
            with close_on_error(res.close):  # PREINITIALIZED → GENERAL keeps the bytes NumPy wrote
                res.device.one_shot(lambda cmd: barrier(cmd, image, vk.VK_IMAGE_LAYOUT_PREINITIALIZED,
                                                        vk.VK_IMAGE_LAYOUT_GENERAL, 1, d.array_size))
        return res
    res = VulkanResource(d, dev, fd=fd, layout=vk.VK_IMAGE_LAYOUT_GENERAL, **_vk_host.staged_objects(dev, d, fd))
    fds.take(FD_MEMORY)  # the resource's now: its close() closes it
    with close_on_error(res.close):
        res.sync_to_image()
    return res


BACKEND = VulkanBackend()

__all__ = ["BACKEND", "VulkanBackend", "VulkanResource", "VulkanDevice", "TimelineSemaphore", "VulkanError",
           "default_device", "live_objects", "vk_image_usage", "vk_buffer_usage"]
