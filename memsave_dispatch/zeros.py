"""Zero memory: bytes that read as zeros, are never written, and cost (next to) nothing. Ghosts
(:mod:`.ghosts`) are views of it laid out like the tensors they stand in for.

Per device, one source that grows to the largest request:

- CPU: a private anonymous mapping, only ever read, so every page is the kernel's shared zero
  page: no physical memory, no allocator traffic.
- CUDA: one granule of GPU memory mapped again and again along a virtual range
  (:mod:`.cuda_vmm`): one granule (2 MiB) per GPU whatever the size, outside the caching
  allocator. Where the driver refuses, zeros from the caching allocator instead, as large as
  the largest ghost (kept for the process, and counted by ``torch.cuda.memory_allocated``).
- Any other device: zeros from its allocator.

Regions handed out stay valid for the process; a larger request maps a larger region.
"""

from __future__ import annotations

import mmap
import threading
import warnings

import torch
from torch import Tensor

from .cuda_vmm import DriverError, ZeroGranule, load_driver
from .raw_memory import tensor_over

__all__ = ["ALIGNMENT", "alignment", "zero_view", "generation", "describe", "use_allocated_zeros", "ZeroSource"]

#: Bytes each device's allocator aligns blocks to (CPU: 64; CUDA's caching allocator: 512). A
#: ghost keeps its original's address modulo this, so kernels that pick a path by alignment
#: (vectorised loads) pick the same one.
ALIGNMENT = {"cpu": 64, "cuda": 512}
_DEFAULT_ALIGNMENT = 64
_SMALLEST_REGION = 1 << 20


def alignment(device_type: str) -> int:
    return ALIGNMENT.get(device_type, _DEFAULT_ALIGNMENT)


class ZeroSource:
    """Zero bytes on one device; ``view`` hands out the current region as ``dtype``."""

    name = "zeros"
    read_only = False  # whether a write through a ghost would fault rather than land

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._lock = threading.Lock()
        self._nbytes = 0
        self._views: dict[torch.dtype, Tensor] = {}

    @property
    def physical_bytes(self) -> int:
        """Memory the source occupies on its device."""
        return 0

    @property
    def region_bytes(self) -> int:
        """Size of the current region (what the largest ghost so far needed, rounded up)."""
        return self._nbytes

    def view(self, dtype: torch.dtype, nbytes: int) -> Tensor:
        """A 1-d ``dtype`` view of at least ``nbytes`` zero bytes."""
        if nbytes > self._nbytes:
            self._grow(nbytes)
        views = self._views
        found = views.get(dtype)
        if found is None:
            found = views.setdefault(dtype, views[torch.uint8].view(dtype))
        return found

    def _grow(self, nbytes: int) -> None:
        global _generation
        with self._lock:
            if nbytes <= self._nbytes:
                return
            size = max(_SMALLEST_REGION, 1 << (nbytes - 1).bit_length())
            region = self._region(size)
            self._views = {torch.uint8: region}
            self._nbytes = region.numel()
            _generation += 1

    def _region(self, nbytes: int) -> Tensor:
        """A fresh 1-d uint8 tensor of at least ``nbytes`` zeros."""
        raise NotImplementedError


class AnonymousZeroPages(ZeroSource):
    """CPU: an anonymous private mapping nobody writes (the kernel's zero page throughout)."""

    name = "anonymous mapping (zero page)"

    def _region(self, nbytes: int) -> Tensor:
        pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        return torch.frombuffer(pages, dtype=torch.uint8)


class MappedZeroGranule(ZeroSource):
    """CUDA: one zeroed granule mapped along each region (see :mod:`.cuda_vmm`)."""

    name = "one granule mapped many times (CUDA virtual memory)"

    def __init__(self, device: torch.device, driver=None) -> None:
        super().__init__(device)
        index = device.index if device.index is not None else torch.cuda.current_device()
        self.device = torch.device(device.type, index)
        self.granule = ZeroGranule(driver if driver is not None else load_driver(), index, self._fill_zeros)

    @property
    def physical_bytes(self) -> int:
        return self.granule.physical_bytes

    @property
    def read_only(self) -> bool:
        return self.granule.read_only

    def _region(self, nbytes: int) -> Tensor:
        try:
            pointer, size = self.granule.map_region(nbytes)
            return tensor_over(pointer, size, self.device)
        except DriverError:
            raise
        except Exception as error:  # ctypes or DLPack refusing: fall back all the same
            raise DriverError(f"mapping zero memory failed: {type(error).__name__}: {error}") from error

    def _fill_zeros(self, pointer: int, nbytes: int) -> None:
        """Once per GPU, when the granule is made: zero it and wait (it is read from any stream)."""
        tensor_over(pointer, nbytes, self.device).zero_()
        torch.cuda.synchronize(self.device)


class AllocatedZeros(ZeroSource):
    """Zeros from the device's own allocator: as large as the largest request."""

    name = "zeros from the allocator"

    @property
    def physical_bytes(self) -> int:
        return self._nbytes

    def _region(self, nbytes: int) -> Tensor:
        return torch.zeros(nbytes, dtype=torch.uint8, device=self.device)


_sources: dict[torch.device, ZeroSource] = {}
_sources_lock = threading.Lock()
_allocated_only: set[str] = set()
_generation = 0


def generation() -> int:
    """Changes whenever some source maps a larger region (views of older ones stay valid)."""
    return _generation


def zero_view(device: torch.device, dtype: torch.dtype, nbytes: int) -> Tensor:
    """A 1-d ``dtype`` tensor of at least ``nbytes`` zero bytes on ``device``, never written."""
    source = _sources.get(device)
    if source is None:
        source = _source_for(device)
    try:
        return source.view(dtype, nbytes)
    except DriverError as error:
        return _fall_back(source, error).view(dtype, nbytes)


def _source_for(device: torch.device) -> ZeroSource:
    with _sources_lock:
        source = _sources.get(device)
        if source is None:
            source = _sources[device] = _new_source(device)
        return source


def _new_source(device: torch.device) -> ZeroSource:
    if device.type in _allocated_only:
        return AllocatedZeros(device)
    if device.type == "cpu":
        return AnonymousZeroPages(device)
    if device.type == "cuda":
        try:
            return MappedZeroGranule(device)
        except DriverError as error:
            _warn_fallback(device, error)
    return AllocatedZeros(device)


def _fall_back(source: ZeroSource, error: DriverError) -> ZeroSource:
    _warn_fallback(source.device, error)
    with _sources_lock:
        replacement = _sources[source.device] = AllocatedZeros(source.device)
    return replacement


def _warn_fallback(device: torch.device, error: Exception) -> None:
    warnings.warn(
        f"memsave_dispatch: no zero mapping on {device} ({error}); ghosts there view zeros from the "
        f"caching allocator instead, as large as the largest dropped tensor",
        stacklevel=3,
    )


def use_allocated_zeros(device_type: str) -> None:
    """From now on, ghosts on ``device_type`` view zeros from its allocator (where mapping zero
    memory is not wanted: a check of the fallback, or a driver that misbehaves)."""
    with _sources_lock:
        _allocated_only.add(device_type)
        for device in [device for device in _sources if device.type == device_type]:
            del _sources[device]


def describe() -> dict[str, dict]:
    """Per device in use: which source its ghosts view and what it occupies there."""
    return {
        str(device): {
            "source": source.name,
            "physical_bytes": source.physical_bytes,
            "region_bytes": source.region_bytes,
            "read_only": source.read_only,
        }
        for device, source in list(_sources.items())
    }
