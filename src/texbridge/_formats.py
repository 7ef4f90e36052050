"""The one format table. Every backend maps formats through it, so a texture means the same thing in each API.

Byte order: a format's name lists components in memory order (rgba8 = R at the lowest address), as Vulkan and DXGI
do; the DRM fourcc is the little-endian packed name of the same layout. GL has no BGRA storage format, so bgra
formats are stored as RGBA8 in GL with a swizzle for sampling; raw transfers (glGetTexImage with `gl_format`) then
return the memory's own byte order.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ._errors import InvalidDescriptor, echo


def _fourcc(code: str) -> int:
    a, b, c, d = (ord(ch) for ch in code)
    return a | (b << 8) | (c << 16) | (d << 24)


# GL enums used below (kept numeric so importing this module never needs PyOpenGL).
GL_RED, GL_RG, GL_RGBA, GL_RED_INTEGER = 0x1903, 0x8227, 0x1908, 0x8D94
GL_UNSIGNED_BYTE, GL_UNSIGNED_SHORT, GL_UNSIGNED_INT, GL_HALF_FLOAT, GL_FLOAT = 0x1401, 0x1403, 0x1405, 0x140B, 0x1406
GL_UNSIGNED_INT_2_10_10_10_REV = 0x8368
_SWIZZLE_BGRA = ("b", "g", "r", "a")


@dataclass(frozen=True, slots=True)
class Format:
    """One row of the table: the same texel layout named in every API texbridge speaks."""

    name: str
    dxgi: int  # DXGI_FORMAT
    vk: int  # VkFormat
    gl_internal: int  # sized internal format for glTexStorageMem2DEXT
    gl_format: int  # transfer format (glTexSubImage/glGetTexImage) giving memory byte order
    gl_type: int
    drm_fourcc: int  # 0 where DRM has no such format
    dtype: str  # NumPy dtype of one component (or of the packed texel)
    channels: int  # last axis of a NumPy view; 1 = no channel axis is dropped, shape stays (H, W, 1)
    bytes_per_pixel: int
    gl_swizzle: tuple[str, str, str, str] | None = None

    @property
    def numpy_dtype(self) -> np.dtype:
        return _dtype(self.dtype)


@functools.lru_cache(maxsize=None)
def _dtype(spec: str) -> np.dtype:
    """np.dtype(spec), built once per spec: every NumPy view of a texture asks for it."""
    return np.dtype(spec)


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("rgba8", 28, 37, 0x8058, GL_RGBA, GL_UNSIGNED_BYTE, _fourcc("AB24"), "u1", 4, 4),
        Format("bgra8", 87, 44, 0x8058, GL_RGBA, GL_UNSIGNED_BYTE, _fourcc("AR24"), "u1", 4, 4, _SWIZZLE_BGRA),
        Format("rgba8_srgb", 29, 43, 0x8C43, GL_RGBA, GL_UNSIGNED_BYTE, _fourcc("AB24"), "u1", 4, 4),
        Format("bgra8_srgb", 91, 50, 0x8C43, GL_RGBA, GL_UNSIGNED_BYTE, _fourcc("AR24"), "u1", 4, 4, _SWIZZLE_BGRA),
        Format("rgb10a2", 24, 64, 0x8059, GL_RGBA, GL_UNSIGNED_INT_2_10_10_10_REV, _fourcc("AB30"), "<u4", 1, 4),
        Format("rgba16", 11, 91, 0x805B, GL_RGBA, GL_UNSIGNED_SHORT, _fourcc("AB48"), "<u2", 4, 8),
        Format("rgba16f", 10, 97, 0x881A, GL_RGBA, GL_HALF_FLOAT, _fourcc("AB4H"), "<f2", 4, 8),
        Format("rgba32f", 2, 109, 0x8814, GL_RGBA, GL_FLOAT, 0, "<f4", 4, 16),
        Format("r8", 61, 9, 0x8229, GL_RED, GL_UNSIGNED_BYTE, _fourcc("R8  "), "u1", 1, 1),
        Format("rg8", 49, 16, 0x822B, GL_RG, GL_UNSIGNED_BYTE, _fourcc("GR88"), "u1", 2, 2),
        Format("r16", 56, 70, 0x822A, GL_RED, GL_UNSIGNED_SHORT, _fourcc("R16 "), "<u2", 1, 2),
        Format("r16f", 54, 76, 0x822D, GL_RED, GL_HALF_FLOAT, 0, "<f2", 1, 2),
        Format("rg16f", 34, 83, 0x822F, GL_RG, GL_HALF_FLOAT, 0, "<f2", 2, 4),
        Format("r32f", 41, 100, 0x822E, GL_RED, GL_FLOAT, 0, "<f4", 1, 4),
        Format("rg32f", 16, 103, 0x8230, GL_RG, GL_FLOAT, 0, "<f4", 2, 8),
        Format("r32ui", 42, 98, 0x8236, GL_RED_INTEGER, GL_UNSIGNED_INT, 0, "<u4", 1, 4),
    )
}


def get_format(name: str) -> Format:
    """Look a format up by name; unknown names are an InvalidDescriptor listing the known ones."""
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise InvalidDescriptor(f"unknown format {echo(name)}; known: {', '.join(FORMATS)}") from None


def format_by_vk(vk: int) -> Format:
    for f in FORMATS.values():
        if f.vk == vk:
            return f
    raise InvalidDescriptor(f"VkFormat {vk} has no texbridge format")


def format_by_dxgi(dxgi: int) -> Format:
    for f in FORMATS.values():
        if f.dxgi == dxgi:
            return f
    raise InvalidDescriptor(f"DXGI_FORMAT {dxgi} has no texbridge format")
