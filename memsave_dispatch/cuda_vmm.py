"""One granule of GPU memory, zeroed once and mapped over and over along a virtual range: a
region of any size that reads as zeros and occupies one granule (2 MiB on current GPUs).

Made with the CUDA driver's virtual memory management (``cuMemCreate``, ``cuMemAddressReserve``,
``cuMemMap``, ``cuMemSetAccess``), called through ctypes: no compiled extension, no new
dependency. Regions are mapped read-only where the driver allows it, so a kernel writing into
one faults instead of changing the zeros every ghost reads. Nothing is ever unmapped (that
would synchronise the device): a larger region is mapped next to the old ones, which stay
valid for the ghosts viewing them and cost address space only.

Every driver error raises :class:`DriverError`; :mod:`.zeros` then falls back to zeros from
the caching allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from collections.abc import Callable

__all__ = ["DriverError", "ZeroGranule", "load_driver", "MappingProperties", "AccessDescription"]

_SUCCESS = 0
_ALLOCATION_PINNED = 1  # CU_MEM_ALLOCATION_TYPE_PINNED
_LOCATION_DEVICE = 1  # CU_MEM_LOCATION_TYPE_DEVICE
_GRANULARITY_MINIMUM = 0  # CU_MEM_ALLOC_GRANULARITY_MINIMUM
ACCESS_READ = 1  # CU_MEM_ACCESS_FLAGS_PROT_READ
ACCESS_READ_WRITE = 3  # CU_MEM_ACCESS_FLAGS_PROT_READWRITE


class DriverError(RuntimeError):
    """The CUDA driver refused a call (or could not be loaded)."""


class _Location(ctypes.Structure):  # CUmemLocation
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocationFlags(ctypes.Structure):
    _fields_ = [
        ("compressionType", ctypes.c_ubyte),
        ("gpuDirectRDMACapable", ctypes.c_ubyte),
        ("usage", ctypes.c_ushort),
        ("reserved", ctypes.c_ubyte * 4),
    ]


class MappingProperties(ctypes.Structure):  # CUmemAllocationProp
    _fields_ = [
        ("type", ctypes.c_int),
        ("requestedHandleTypes", ctypes.c_int),
        ("location", _Location),
        ("win32HandleMetaData", ctypes.c_void_p),
        ("allocFlags", _AllocationFlags),
        ("_zeros", ctypes.c_ubyte * 32),  # room in case a later driver reads a longer struct
    ]


class AccessDescription(ctypes.Structure):  # CUmemAccessDesc
    _fields_ = [("location", _Location), ("flags", ctypes.c_int)]


_u64 = ctypes.c_uint64
_SIGNATURES: dict[str, list] = {
    "cuInit": [ctypes.c_uint],
    "cuDeviceGet": [ctypes.POINTER(ctypes.c_int), ctypes.c_int],
    "cuCtxGetCurrent": [ctypes.POINTER(ctypes.c_void_p)],
    "cuCtxSetCurrent": [ctypes.c_void_p],
    "cuDevicePrimaryCtxRetain": [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int],
    "cuMemGetAllocationGranularity": [ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(MappingProperties), ctypes.c_int],
    "cuMemCreate": [ctypes.POINTER(_u64), ctypes.c_size_t, ctypes.POINTER(MappingProperties), _u64],
    "cuMemAddressReserve": [ctypes.POINTER(_u64), ctypes.c_size_t, ctypes.c_size_t, _u64, _u64],
    "cuMemMap": [_u64, ctypes.c_size_t, ctypes.c_size_t, _u64, _u64],
    "cuMemSetAccess": [_u64, ctypes.c_size_t, ctypes.POINTER(AccessDescription), ctypes.c_size_t],
}


class _Driver:
    """The driver functions used here, each raising DriverError on a non-zero status."""

    def __init__(self, library: ctypes.CDLL) -> None:
        for name, argtypes in _SIGNATURES.items():
            function = getattr(library, name)
            function.argtypes = argtypes
            function.restype = ctypes.c_int
            setattr(self, name, _checked(name, function))


def _checked(name: str, function: Callable[..., int]) -> Callable[..., None]:
    def call(*args) -> None:
        status = function(*args)
        if status != _SUCCESS:
            raise DriverError(f"{name} returned CUDA driver error {status}")

    return call


def load_driver() -> _Driver:
    """libcuda, the driver PyTorch itself runs on."""
    for name in ("libcuda.so.1", ctypes.util.find_library("cuda")):
        if name is None:
            continue
        try:
            return _Driver(ctypes.CDLL(name))
        except (OSError, AttributeError) as error:
            problem = f"cannot load the CUDA driver ({name}): {error}"
    raise DriverError(problem)


class ZeroGranule:
    """Zero regions on one GPU, all backed by the same granule.

    ``fill_zeros(pointer, nbytes)`` zeroes device memory at ``pointer`` and waits until that is
    done; it runs once, through the first region's still-writable mapping.
    """

    def __init__(self, driver, device_index: int, fill_zeros: Callable[[int, int], None]) -> None:
        self._driver = driver
        self._index = device_index
        self._fill_zeros = fill_zeros
        self._lock = threading.Lock()
        self._handle: int | None = None
        self.granularity = 0
        self.read_only = True  # until the driver refuses read-only mappings
        self._properties = MappingProperties()
        self._properties.type = _ALLOCATION_PINNED
        self._properties.location = _Location(_LOCATION_DEVICE, device_index)

    @property
    def physical_bytes(self) -> int:
        return self.granularity if self._handle is not None else 0

    def map_region(self, nbytes: int) -> tuple[int, int]:
        """(pointer, size) of a new read-only region of at least ``nbytes`` zero bytes."""
        with self._lock:
            self._make_current()
            if self._handle is None:
                self._create_granule()
            size = -(-nbytes // self.granularity) * self.granularity
            pointer = _u64()
            self._driver.cuMemAddressReserve(ctypes.byref(pointer), size, self.granularity, 0, 0)
            for offset in range(0, size, self.granularity):
                self._driver.cuMemMap(pointer.value + offset, self.granularity, 0, self._handle, 0)
            self._set_access(pointer.value, size)
            return pointer.value, size

    def _make_current(self) -> None:
        """Driver calls need a context on this thread: PyTorch's, the device's primary one."""
        context = ctypes.c_void_p()
        self._driver.cuInit(0)
        self._driver.cuCtxGetCurrent(ctypes.byref(context))
        if not context.value:
            device = ctypes.c_int()
            self._driver.cuDeviceGet(ctypes.byref(device), self._index)
            self._driver.cuDevicePrimaryCtxRetain(ctypes.byref(context), device.value)
            self._driver.cuCtxSetCurrent(context)

    def _create_granule(self) -> None:
        granularity = ctypes.c_size_t()
        self._driver.cuMemGetAllocationGranularity(
            ctypes.byref(granularity), ctypes.byref(self._properties), _GRANULARITY_MINIMUM
        )
        handle = _u64()
        self._driver.cuMemCreate(ctypes.byref(handle), granularity.value, ctypes.byref(self._properties), 0)
        # Zero it through a writable mapping of its own, kept for the process like every region.
        pointer = _u64()
        self._driver.cuMemAddressReserve(ctypes.byref(pointer), granularity.value, granularity.value, 0, 0)
        self._driver.cuMemMap(pointer.value, granularity.value, 0, handle.value, 0)
        self._driver.cuMemSetAccess(pointer.value, granularity.value, ctypes.byref(self._access(ACCESS_READ_WRITE)), 1)
        self._fill_zeros(pointer.value, granularity.value)
        self.granularity, self._handle = granularity.value, handle.value

    def _set_access(self, pointer: int, size: int) -> None:
        if self.read_only:
            try:
                self._driver.cuMemSetAccess(pointer, size, ctypes.byref(self._access(ACCESS_READ)), 1)
                return
            except DriverError:
                self.read_only = False  # never written all the same
        self._driver.cuMemSetAccess(pointer, size, ctypes.byref(self._access(ACCESS_READ_WRITE)), 1)

    def _access(self, flags: int) -> AccessDescription:
        return AccessDescription(_Location(_LOCATION_DEVICE, self._index), flags)
