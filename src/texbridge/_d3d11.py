"""The D3D11_TEXTURE2D_DESC a texture carries as runtime private data, so Wine/Proton can describe it to D3D."""

from __future__ import annotations

import struct

from ._descriptor import check_texture_size
from ._errors import InvalidDescriptor
from ._formats import get_format

# D3D11_TEXTURE2D_DESC, as runtime private data: Width, Height, MipLevels, ArraySize, Format, SampleDesc.Count,
# SampleDesc.Quality, Usage, BindFlags, CPUAccessFlags, MiscFlags.
_D3D11_DESC = struct.Struct("<11I")
D3D11_BIND_SHADER_RESOURCE, D3D11_BIND_RENDER_TARGET = 0x8, 0x20
D3D11_RESOURCE_MISC_SHARED, D3D11_RESOURCE_MISC_SHARED_KEYEDMUTEX, D3D11_RESOURCE_MISC_SHARED_NTHANDLE = 0x2, 0x100, 0x800


def d3d11_texture_desc(width: int, height: int, format: str, *, mip_levels: int = 1, array_size: int = 1,
                       keyed_mutex: bool = False) -> bytes:
    """A DXGI-compatible D3D11_TEXTURE2D_DESC, so Wine/Proton can describe the texture to D3D without guessing."""
    check_texture_size(width, height)
    misc = D3D11_RESOURCE_MISC_SHARED_NTHANDLE | (
        D3D11_RESOURCE_MISC_SHARED_KEYEDMUTEX if keyed_mutex else D3D11_RESOURCE_MISC_SHARED)
    return _D3D11_DESC.pack(width, height, mip_levels, array_size, get_format(format).dxgi, 1, 0, 0,
                            D3D11_BIND_SHADER_RESOURCE | D3D11_BIND_RENDER_TARGET, 0, misc)


def parse_d3d11_texture_desc(blob: bytes) -> dict[str, int]:
    names = ("Width", "Height", "MipLevels", "ArraySize", "Format", "SampleCount", "SampleQuality", "Usage",
             "BindFlags", "CPUAccessFlags", "MiscFlags")
    if len(blob) != _D3D11_DESC.size:
        raise InvalidDescriptor(f"a D3D11_TEXTURE2D_DESC is {_D3D11_DESC.size} bytes, not {len(blob)}")
    return dict(zip(names, _D3D11_DESC.unpack(blob)))
