"""A tensor over memory this package manages itself (a driver mapping, not an allocator block).

PyTorch takes foreign memory through DLPack: a ``DLManagedTensor`` describing the bytes, handed
over in a ``"dltensor"`` capsule. Both are built here with ctypes, so no compiled extension and
no new dependency is needed. The description stays alive for the whole process and has no
deleter: what it describes is never freed while the process runs.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor
from torch.utils.dlpack import from_dlpack

__all__ = ["tensor_over", "DLPACK_DEVICE_TYPES"]

#: DLPack's device codes (``DLDeviceType``) for the devices this package maps memory on.
DLPACK_DEVICE_TYPES = {"cpu": 1, "cuda": 2}
_UNSIGNED_INT = 1  # DLDataTypeCode kDLUInt


class _Device(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _Tensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _Device),
        ("ndim", ctypes.c_int32),
        ("dtype", _DataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _ManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _Tensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]

_descriptions: list = []  # every description handed to torch, alive for the process


def tensor_over(pointer: int, nbytes: int, device: torch.device) -> Tensor:
    """A 1-d uint8 tensor over ``nbytes`` at ``pointer`` on ``device``, without a copy. The
    memory must stay valid for the rest of the process."""
    shape = (ctypes.c_int64 * 1)(nbytes)
    managed = _ManagedTensor()
    managed.dl_tensor.data = pointer
    managed.dl_tensor.device = _Device(DLPACK_DEVICE_TYPES[device.type], device.index or 0)
    managed.dl_tensor.ndim = 1
    managed.dl_tensor.dtype = _DataType(_UNSIGNED_INT, 8, 1)
    managed.dl_tensor.shape = shape
    managed.dl_tensor.strides = None  # dense
    managed.dl_tensor.byte_offset = 0
    managed.deleter = None  # torch calls no deleter: the memory is never freed
    _descriptions.append((managed, shape))
    return from_dlpack(_capsule_new(ctypes.addressof(managed), b"dltensor", None))
