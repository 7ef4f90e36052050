"""DLPack export by hand (ctypes): no dependency on torch or CuPy to hand them a zero-copy view.

The structs follow dlpack.h (v0.8 and the versioned v1.0 form). A capsule's struct stays alive in `_dl_live` until
the consumer calls the deleter (or an unconsumed capsule is collected); only then is the resource told that one
view fewer keeps its memory mapped.
"""

from __future__ import annotations

import ctypes
from typing import Any, Protocol

import numpy as np

KDLCUDA = 2  # DLPack device type


class DLPackSource(Protocol):
    """What a capsule needs from the resource it views (CUDAResource)."""

    device: Any  # .ordinal: the CUDA device id
    _views: int  # live views; the resource defers freeing its memory while any remain

    def _view_layout(self) -> tuple[int, tuple[int, ...], tuple[int, ...], np.dtype]: ...

    def _view_released(self) -> None: ...


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32), ("dtype", _DLDataType),
                ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.POINTER(ctypes.c_int64)),
                ("byte_offset", ctypes.c_uint64)]


_Deleter = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", _Deleter)]


class _DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [("version_major", ctypes.c_uint32), ("version_minor", ctypes.c_uint32),
                ("manager_ctx", ctypes.c_void_p), ("deleter", _Deleter), ("flags", ctypes.c_uint64),
                ("dl_tensor", _DLTensor)]


_CAPSULE_NAMES = (b"dltensor", b"dltensor_versioned")  # module constants: capsules keep pointers to them
_py = ctypes.PyDLL(None)  # our own function objects: argtypes set here cannot clash with other libraries'
_py.PyCapsule_New.restype = ctypes.py_object
_py.PyCapsule_New.argtypes = (ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p)
_py.PyCapsule_IsValid.restype = ctypes.c_int
_py.PyCapsule_IsValid.argtypes = (ctypes.c_void_p, ctypes.c_char_p)
_py.PyCapsule_GetPointer.restype = ctypes.c_void_p
_py.PyCapsule_GetPointer.argtypes = (ctypes.c_void_p, ctypes.c_char_p)
_dl_live: dict[int, tuple[Any, ...]] = {}  # struct address → (struct, shape, strides, resource)
_DL_CODES = {"u": 1, "i": 0, "f": 2}


def _dl_delete(address: int) -> None:
    entry = _dl_live.pop(address, None)
    if entry is not None:
        entry[-1]._view_released()


_DL_DELETER = _Deleter(_dl_delete)


@ctypes.CFUNCTYPE(None, ctypes.c_void_p)
def _capsule_destructor(capsule: int) -> None:
    """An unconsumed capsule dies with its tensor; a consumed one was renamed and the consumer calls the deleter."""
    for name in _CAPSULE_NAMES:
        if _py.PyCapsule_IsValid(capsule, name):
            _dl_delete(_py.PyCapsule_GetPointer(capsule, name))


def dlpack_capsule(res: DLPackSource, versioned: bool) -> Any:
    """A "dltensor" (or "dltensor_versioned") capsule over `res`'s memory, counted in res._views until the
    consumer's deleter runs (or the unconsumed capsule dies)."""
    ptr, shape, byte_strides, dtype = res._view_layout()
    item = dtype.itemsize
    if any(s % item for s in byte_strides):
        raise BufferError(f"row pitch is not a multiple of the {dtype} item size: no DLPack view")
    c_shape = (ctypes.c_int64 * len(shape))(*shape)
    c_strides = (ctypes.c_int64 * len(shape))(*(s // item for s in byte_strides))
    managed = (_DLManagedTensorVersioned if versioned else _DLManagedTensor)()
    t = managed.dl_tensor
    t.data, t.ndim, t.shape, t.strides, t.byte_offset = ptr, len(shape), c_shape, c_strides, 0
    t.device.device_type, t.device.device_id = KDLCUDA, res.device.ordinal
    t.dtype.code, t.dtype.bits, t.dtype.lanes = _DL_CODES[dtype.kind], item * 8, 1
    managed.deleter = _DL_DELETER
    if versioned:
        managed.version_major, managed.version_minor = 1, 0
    address = ctypes.addressof(managed)
    _dl_live[address] = (managed, c_shape, c_strides, res)
    res._views += 1
    return _py.PyCapsule_New(address, _CAPSULE_NAMES[versioned], ctypes.cast(_capsule_destructor, ctypes.c_void_p))
