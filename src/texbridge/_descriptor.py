"""The API-neutral resource descriptor.

A descriptor tells an importer everything it needs to map the memory in its own API, the way D3DKMT's shared
resource description does: the geometry and format, the memory handle type, the exporting device's identity, and two
opaque blobs (runtime private data: a D3D11_TEXTURE2D_DESC; driver private data: backend import details). It is
plain data: validation happens here, once, both when a client builds one and when the broker receives one.
"""

from __future__ import annotations

import enum
from copy import deepcopy
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ._errors import InvalidDescriptor, echo
from ._formats import get_format
from ._memory_types import MEMORY_TYPES as _MEMORY_TABLE, get_memory_type

MAX_DIMENSION = 65536
MAX_MIP_LEVELS = 17
MAX_ARRAY_SIZE = 2048
MAX_BYTES = 1 << 40  # 1 TiB: far above any real allocation, far below integer trouble in any consumer
MAX_BLOB = 4096
MAX_PLANES = 4
MAX_FDS = 4

KINDS = ("texture2d", "buffer", "keyed_mutex")
MEMORY_TYPES = tuple(_MEMORY_TABLE)  # the names; what each one means is in _memory_types
GPU_SYNC_TYPES = ("", "timeline_opaque_fd")
KEYED_MUTEX_STATE_SIZE = 4096
# What each fd travelling with a descriptor is (Descriptor.fd_roles gives their order).
FD_MEMORY, FD_SEMAPHORE, FD_MUTEX = "memory", "semaphore", "mutex"


class Usage(enum.IntFlag):
    """What the memory may be used for; backends translate these into their own usage bits."""

    SHADER_READ = 1
    RENDER_TARGET = 2
    TRANSFER_SRC = 4
    TRANSFER_DST = 8
    STORAGE = 16
    CPU_READ = 32
    CPU_WRITE = 64
    DEFAULT = SHADER_READ | RENDER_TARGET | TRANSFER_SRC | TRANSFER_DST | CPU_READ | CPU_WRITE


_MUTEX_ONLY = (FD_MUTEX,)
_ROLES = {(sync, mutex): (FD_MEMORY,) + (FD_SEMAPHORE,) * sync + (FD_MUTEX,) * mutex  # built once: every open asks
          for sync in (False, True) for mutex in (False, True)}


@dataclass(frozen=True, slots=True)
class Descriptor:
    """What a resource is. Immutable; `validate()` is called by every constructor path that takes outside data."""

    kind: str
    size: int  # bytes of the memory object (fd 0)
    width: int = 0
    height: int = 0
    format: str = ""
    mip_levels: int = 1
    array_size: int = 1
    planes: tuple[tuple[int, int], ...] = ()  # (offset, row_pitch) per plane; CPU-visible layouts only
    memory: str = "memfd"
    backend: str = "memfd"  # the API that created it
    driver_uuid: bytes = b""
    device_uuid: bytes = b""
    usage: int = int(Usage.DEFAULT)
    keyed_mutex: bool = False  # when true, the LAST fd is the keyed-mutex state memfd
    gpu_sync: str = ""  # "" or "timeline_opaque_fd": fd 1 is a timeline semaphore the keyed mutex's values refer to
    runtime_private: bytes = b""
    driver_private: dict[str, Any] = field(default_factory=dict)

    @property
    def fd_roles(self) -> tuple[str, ...]:
        """The fds that travel with this descriptor, in order: the memory, the GPU semaphore (gpu_sync), the keyed
        mutex state last (keyed_mutex). A keyed_mutex resource's memory is its state: one fd, FD_MUTEX."""
        if self.kind == "keyed_mutex":
            return _MUTEX_ONLY
        return _ROLES[bool(self.gpu_sync), bool(self.keyed_mutex)]

    @property
    def nfds(self) -> int:
        return len(self.fd_roles)

    @property
    def row_pitch(self) -> int:
        return self.planes[0][1] if self.planes else 0

    @property
    def offset(self) -> int:
        return self.planes[0][0] if self.planes else 0

    def required_size(self) -> int:
        """Bytes the memory must have for every CPU-visible byte the descriptor promises (memfd layouts)."""
        planes = self.planes
        if self.kind != "texture2d" or not planes:
            return self.size
        if len(planes) == 1:  # every open of a memfd texture asks: no generator for the common case
            off, pitch = planes[0]
            return off + pitch * self.height * self.array_size
        return max(off + pitch * self.height * self.array_size for off, pitch in planes)

    def validate(self) -> "Descriptor":
        _check(self.kind in KINDS, f"kind must be one of {KINDS}, not {echo(self.kind)}")
        get_memory_type(self.memory)  # InvalidDescriptor naming the known types
        _check(is_int(self.size) and 0 < self.size <= MAX_BYTES, f"size must be 1..{MAX_BYTES}, not {echo(self.size)}")
        for name in ("width", "height", "mip_levels", "array_size", "usage"):
            _check(is_int(getattr(self, name)), f"{name} must be an integer")
        _check(isinstance(self.backend, str) and len(self.backend) <= 32, "backend must be a short string")
        for name in ("driver_uuid", "device_uuid"):
            v = getattr(self, name)
            _check(isinstance(v, bytes) and len(v) in (0, 16), f"{name} must be empty or 16 bytes")
        _check(isinstance(self.runtime_private, bytes) and len(self.runtime_private) <= MAX_BLOB,
               f"runtime_private must be at most {MAX_BLOB} bytes")
        _check(isinstance(self.driver_private, dict), "driver_private must be a mapping")
        _check(self.gpu_sync in GPU_SYNC_TYPES, f"gpu_sync must be one of {GPU_SYNC_TYPES}")
        _check(isinstance(self.keyed_mutex, bool), "keyed_mutex must be a boolean")
        if self.kind == "texture2d":
            fmt = get_format(self.format)
            for name, hi in (("width", MAX_DIMENSION), ("height", MAX_DIMENSION), ("mip_levels", MAX_MIP_LEVELS),
                             ("array_size", MAX_ARRAY_SIZE)):
                v = getattr(self, name)
                _check(1 <= v <= hi, f"{name} must be 1..{hi}, not {v}")
            _check(len(self.planes) <= MAX_PLANES, f"at most {MAX_PLANES} planes")
            for plane in self.planes:
                _check(isinstance(plane, tuple) and len(plane) == 2 and all(is_int(x) for x in plane),
                       "each plane is (offset, row_pitch)")
                off, pitch = plane
                _check(0 <= off <= MAX_BYTES, f"plane offset {off} out of range")
                _check(self.width * fmt.bytes_per_pixel <= pitch <= MAX_BYTES,
                       f"row pitch {pitch} is below width*bytes_per_pixel = {self.width * fmt.bytes_per_pixel}")
            if get_memory_type(self.memory).host_mappable:
                _check(len(self.planes) >= 1, f"a {self.memory} texture needs its plane layout")
                _check(self.mip_levels == 1, f"{self.memory} textures have one mip level")
            _check(self.required_size() <= self.size,
                   f"layout needs {self.required_size()} bytes but size is {self.size}")
        elif self.kind == "buffer":
            _check(not self.planes and not self.format, "a buffer has no format or planes")
        else:
            _check(self.size >= KEYED_MUTEX_STATE_SIZE, "keyed mutex state is one page")
            _check(not self.gpu_sync, "a keyed mutex resource has no GPU semaphore: its state page is its one fd")
        return self

    # -- wire form ------------------------------------------------------------------------------------------------
    def to_wire(self) -> dict[str, Any]:
        """The msgpack-ready map. Field by field, not dataclasses.asdict: asdict recurses and deep-copies every
        value (~25 us, on the path of every OPEN); only driver_private is mutable, so only it is copied."""
        d = {name: getattr(self, name) for name in _FIELD_NAMES}
        d["planes"] = [list(p) for p in self.planes]
        d["driver_private"] = deepcopy(self.driver_private) if self.driver_private else {}
        return d

    @classmethod
    def from_wire(cls, data: Any, *, validated: bool = False) -> "Descriptor":
        """Build and validate a descriptor from untrusted wire data; every failure is InvalidDescriptor.

        validated=True skips the range checks for a descriptor the broker validated when it was registered (an
        OPEN reply); the structure is still checked, and backends still check the memory itself against it.
        """
        if not isinstance(data, dict):
            raise InvalidDescriptor("descriptor must be a map")
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise InvalidDescriptor(f"unknown descriptor fields: {', '.join(echo(k) for k in sorted(map(str, unknown))[:4])}")
        try:
            planes = tuple(tuple(p) for p in data.get("planes", ()))
            desc = cls(**{**data, "planes": planes})
        except TypeError as e:
            raise InvalidDescriptor(f"malformed descriptor: {echo(str(e))}") from None
        return desc if validated else desc.validate()

    def with_(self, **changes: Any) -> "Descriptor":
        return replace(self, **changes)


_FIELD_NAMES = tuple(f.name for f in fields(Descriptor))


def is_int(v: object) -> bool:
    """An int on the wire: exactly int (True == 1 == 1.0 in Python, but a bool or a float is not a count)."""
    return isinstance(v, int) and not isinstance(v, bool)


def private_int(dp: dict[str, Any], key: str, default: int | None = None) -> int:
    """driver_private[key] (or `default`) as a non-negative int, else InvalidDescriptor: backends read the
    exporter's import details through this, so a blob from another process never reaches an API as a bad value."""
    v = dp.get(key, default)
    if not is_int(v) or v < 0:
        raise InvalidDescriptor(f"driver_private[{key!r}] must be a non-negative integer, not {v!r}")
    return v


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidDescriptor(message)


def align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def check_texture_size(width: Any, height: Any) -> None:
    """The one check of user-given texture dimensions, before any arithmetic or packing sees them."""
    for name, v in (("width", width), ("height", height)):
        if not is_int(v) or not 1 <= v <= MAX_DIMENSION:
            raise InvalidDescriptor(f"{name} must be an integer in 1..{MAX_DIMENSION}, not {v!r}")


def check_buffer_size(size: Any) -> None:
    if not is_int(size) or not 1 <= size <= MAX_BYTES:
        raise InvalidDescriptor(f"a buffer size must be an integer in 1..{MAX_BYTES}, not {size!r}")


def texture_layout(width: int, height: int, format: str, *, pitch_align: int = 256) -> tuple[int, int]:
    """(row_pitch, size) of a tightly packed CPU texture, rows aligned like D3D's 256-byte pitch rule."""
    check_texture_size(width, height)
    fmt = get_format(format)
    pitch = align(width * fmt.bytes_per_pixel, pitch_align)
    return pitch, pitch * height
