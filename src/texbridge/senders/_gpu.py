"""Frames as GPU textures: how a Receiver(backend="gl" | "vulkan" | "cuda") turns a sender's slot into that API's
texture without a CPU round trip (docs/senders.md, "Receiving on the GPU", has the table).

The path is chosen when the receiver opens a sender's slots, and reported as Receiver.gpu_path (+ gpu_path_reason):

* "gpu-copy": the slots' memory imports on this device; each frame is copied on the GPU (glCopyImageSubData,
  vkCmdCopyImage, cuMemcpy3D) into a receiver-owned texture. The copy completes *inside* the ring's seqlock window
  (Resource.copy_to waits for it), so the ring's re-check of the slot's sequence covers the GPU copy: a copy the
  sender overlapped is retried, never returned. Two receiver textures alternate, so a failed or retried copy never
  touches the texture the caller holds from the previous receive().
* "zero-copy" (receive(copy=False)): the imported slot itself, pinned like a NumPy view (still_valid()).
* "upload": the slots are CPU memory (a memfd sender, or the copy path's memfd twins when the slots do not import
  here): one upload per frame from the shared pages. The copy path is the only place a CPU copy happens.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._errors import InvalidArgument
from .._resources import Resource

GPU_BACKENDS = ("gl", "vulkan", "cuda")


def is_gpu_target(out: Any, backend: str) -> bool:
    """Whether `out` is a texture of `backend`'s API that receive(out=...) copies into on the GPU."""
    if isinstance(out, Resource):
        return out.backend_name == backend
    return backend == "gl" and not isinstance(out, np.ndarray) and (hasattr(out, "glo") or isinstance(out, int))


class GpuFrames:
    """A GPU receiver's textures: the pair it alternates between and the copy or upload into them."""

    def __init__(self, backend: str, context: Any = None) -> None:
        if backend not in GPU_BACKENDS:
            raise InvalidArgument(f"GPU frames are for backends {', '.join(GPU_BACKENDS)}, not {backend!r}")
        self.backend, self.context = backend, context
        self._textures: list[Resource] = []  # [front (returned last), back (filled next)]

    def back(self, like: Resource, fmt: str) -> Resource:
        """The texture the next frame is copied into: same size and format as the slot `like`, on its device."""
        h, w = like.shape[:2]
        if self._textures and (self._textures[0].shape[:2] != (h, w) or self._textures[0].descriptor.format != fmt):
            self.close()  # the sender resized
        while len(self._textures) < 2:
            self._textures.append(self._create(like, w, h, fmt))
        return self._textures[1]

    def _create(self, like: Resource, width: int, height: int, fmt: str) -> Resource:
        from ..backends import get_backend

        backend = get_backend(self.backend)
        if self.backend == "gl":
            context = getattr(like, "context", None) or self.context
            return backend.create_texture(width, height, fmt, context=context)
        device = getattr(like, "device", None) if like.backend_name == self.backend else None
        if self.backend == "cuda":
            device = getattr(like, "consumer_device", device)  # a slot on another GPU: frames go to the asker's
            return backend.create_texture(width, height, fmt, **({"device": device.ordinal} if device else {}))
        return backend.create_texture(width, height, fmt, **({"device": device} if device else {}))

    @staticmethod
    def can_share(slot: Resource) -> bool:
        """Whether the imported slot itself is a texture of the API (zero-copy): memory seen only as a buffer of
        pitch-linear rows (CUDA VMM memory in GL or Vulkan) is copied into a texture instead."""
        return bool(getattr(slot, "texture", 1)) and getattr(slot, "image", True) is not None

    def swap(self) -> Resource:
        """The back texture now holds a complete frame: it becomes the front one."""
        self._textures.reverse()
        return self._textures[0]

    def fill(self, dst: Any, slot: Resource, view: np.ndarray | None, fmt: str) -> None:
        """Put one slot's pixels into `dst`: an upload from the shared pages when the slot is CPU memory (`view`),
        else a GPU copy. Both are complete when this returns (the caller re-checks the slot's sequence next)."""
        if view is None:
            slot.copy_to(dst)
        elif isinstance(dst, Resource):
            dst.upload(view)
        else:  # a moderngl texture or GL name (is_gpu_target)
            from ..backends import gl

            if self.context is not None:
                gl.resolve_context(self.context).enter()
            gl.write_texture(dst, view, fmt)

    def close(self) -> None:
        textures, self._textures = self._textures, []
        for t in textures:
            t.close()
