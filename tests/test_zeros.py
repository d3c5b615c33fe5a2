"""Zero memory for ghosts, per device: the CPU's zero pages, CUDA's one granule mapped many
times (driven here through a stand-in driver: only a GPU can run the real one), and zeros from
the allocator where mapping is refused. Ghosts keep layout and alignment on each of them."""

from __future__ import annotations

import ctypes
import mmap
import warnings

import pytest
import torch
import torch.nn.functional as F

from memsave_dispatch import zeros
from memsave_dispatch.cuda_vmm import AccessDescription, DriverError, MappingProperties, ZeroGranule
from memsave_dispatch.ghosts import TensorLayout, ghost_like
from memsave_dispatch.raw_memory import tensor_over
from memsave_dispatch.zeros import AllocatedZeros, MappedZeroGranule
from tests.support import compare_with_stock, seeded_randn

GRANULE = 1 << 16


class StandInDriver:
    """The CUDA driver calls ZeroGranule makes, served from one CPU mapping: reservations are
    consecutive ranges of it (zero pages), mappings are recorded. ``refuse`` names calls that
    fail, ``refuse_read_only`` makes read-only access fail."""

    def __init__(self, refuse: tuple[str, ...] = (), refuse_read_only: bool = False) -> None:
        self.arena = mmap.mmap(-1, 1 << 26, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.base = ctypes.addressof(ctypes.c_char.from_buffer(self.arena))
        self.next = self.base
        self.refuse, self.refuse_read_only = refuse, refuse_read_only
        self.calls: list[tuple] = []

    def _call(self, name, *args):
        self.calls.append((name, *args))
        if name in self.refuse:
            raise DriverError(f"{name} refused")

    def cuInit(self, flags):
        self._call("cuInit")

    def cuCtxGetCurrent(self, context):
        self._call("cuCtxGetCurrent")
        context._obj.value = 1  # a context is current

    def cuMemGetAllocationGranularity(self, granularity, properties, option):
        self._call("cuMemGetAllocationGranularity", properties._obj.location.id)
        granularity._obj.value = GRANULE

    def cuMemCreate(self, handle, size, properties, flags):
        self._call("cuMemCreate", size)
        handle._obj.value = 7

    def cuMemAddressReserve(self, pointer, size, alignment, address, flags):
        self._call("cuMemAddressReserve", size, alignment)
        pointer._obj.value = self.next
        self.next += size

    def cuMemMap(self, pointer, size, offset, handle, flags):
        self._call("cuMemMap", pointer, size, handle)

    def cuMemSetAccess(self, pointer, size, description, count):
        flags = description._obj.flags
        self._call("cuMemSetAccess", pointer, size, flags)
        if flags == 1 and self.refuse_read_only:
            raise DriverError("read-only access refused")

    def count(self, name: str) -> int:
        return sum(call[0] == name for call in self.calls)


class CpuMappedZeroGranule(MappedZeroGranule):
    """The CUDA source on CPU memory: only the fill differs (no device to wait for)."""

    def _fill_zeros(self, pointer: int, nbytes: int) -> None:
        self.filled = (pointer, nbytes)
        tensor_over(pointer, nbytes, self.device).zero_()


def test_driver_structs_have_the_cuda_header_layout():
    """CUmemAllocationProp: type, handle types, location (type, id), win32 pointer, flags;
    CUmemAccessDesc: location, flags."""
    assert [MappingProperties.type.offset, MappingProperties.location.offset] == [0, 8]
    assert [MappingProperties.win32HandleMetaData.offset, MappingProperties.allocFlags.offset] == [16, 24]
    assert ctypes.sizeof(MappingProperties) >= 32
    assert ctypes.sizeof(AccessDescription) == 12 and AccessDescription.flags.offset == 8


def test_a_granule_is_made_and_zeroed_once_and_every_region_maps_only_it_read_only():
    driver = StandInDriver()
    filled = []
    granule = ZeroGranule(driver, 0, lambda pointer, nbytes: filled.append(nbytes))
    pointer, size = granule.map_region(5 * GRANULE + 1)
    assert size == 6 * GRANULE and pointer % GRANULE == 0
    again, size_again = granule.map_region(3 * GRANULE)
    assert size_again == 3 * GRANULE and again != pointer
    assert driver.count("cuMemCreate") == 1 and filled == [GRANULE]
    maps = [call for call in driver.calls if call[0] == "cuMemMap"]
    assert len(maps) == 1 + 6 + 3  # the zeroing mapping, then one per granule of each region
    assert {call[3] for call in maps} == {7}  # one physical handle throughout
    accesses = [call[3] for call in driver.calls if call[0] == "cuMemSetAccess"]
    assert accesses == [3, 1, 1]  # writable only to zero the granule
    assert granule.read_only and granule.physical_bytes == GRANULE


def test_regions_stay_writable_where_read_only_access_is_refused():
    driver = StandInDriver(refuse_read_only=True)
    granule = ZeroGranule(driver, 0, lambda pointer, nbytes: None)
    granule.map_region(GRANULE)
    assert not granule.read_only
    granule.map_region(GRANULE)
    accesses = [call[3] for call in driver.calls if call[0] == "cuMemSetAccess"]
    assert accesses == [3, 1, 3, 3]  # read-only tried once


def test_driver_errors_surface_as_driver_errors():
    granule = ZeroGranule(StandInDriver(refuse=("cuMemCreate",)), 0, lambda pointer, nbytes: None)
    with pytest.raises(DriverError, match="cuMemCreate"):
        granule.map_region(GRANULE)


def test_tensor_over_views_foreign_memory_without_a_copy():
    pages = mmap.mmap(-1, 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    pointer = ctypes.addressof(ctypes.c_char.from_buffer(pages))
    tensor = tensor_over(pointer, 4096, torch.device("cpu"))
    assert tensor.dtype == torch.uint8 and tensor.shape == (4096,) and tensor.data_ptr() == pointer
    pages[100] = 5
    assert tensor[100] == 5


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_ghosts_of_the_mapped_granule_keep_layout_and_phase(monkeypatch, channels_last, dtype):
    device = torch.device("cpu", 0)
    source = CpuMappedZeroGranule(device, driver=StandInDriver())
    monkeypatch.setitem(zeros._sources, device, source)
    tensor = torch.randn(3, 8, 9, 9, dtype=dtype)
    if channels_last:
        tensor = tensor.contiguous(memory_format=torch.channels_last)
    tensor = tensor[:, :, 1:]  # a view at a phase other than 0
    layout = TensorLayout.of(tensor)._replace(device=device)
    ghost = ghost_like(layout)
    assert ghost.shape == tensor.shape and ghost.stride() == tensor.stride() and ghost.dtype == dtype
    assert ghost.data_ptr() % 512 == tensor.data_ptr() % 64  # the CPU phase, in a 512-aligned region
    assert not ghost.any()
    assert source.physical_bytes == GRANULE and source.filled[1] == GRANULE
    assert zeros.describe()[str(device)]["source"] == MappedZeroGranule.name


def test_a_refusing_driver_falls_back_to_allocated_zeros_with_a_warning(monkeypatch):
    device = torch.device("cpu", 1)
    monkeypatch.setitem(zeros._sources, device, CpuMappedZeroGranule(device, driver=StandInDriver(refuse=("cuMemMap",))))
    layout = TensorLayout.of(torch.randn(4, 5))._replace(device=device)
    with pytest.warns(UserWarning, match="no zero mapping on cpu:1"):
        ghost = ghost_like(layout)
    assert ghost.shape == (4, 5) and not ghost.any()
    assert isinstance(zeros._sources[device], AllocatedZeros)
    assert zeros.describe()[str(device)]["physical_bytes"] == ghost.untyped_storage().nbytes()


def test_cpu_ghosts_cost_no_allocation():
    zeros.zero_view(torch.device("cpu"), torch.float32, 1 << 22)
    assert zeros.describe()["cpu"]["physical_bytes"] == 0


def test_ghosts_of_a_device_without_a_mapping_are_allocator_zeros():
    """Any device gets ghosts the same way (meta here: no memory at all)."""
    tensor = torch.empty(2, 3, 4, 5, device="meta").contiguous(memory_format=torch.channels_last)
    ghost = ghost_like(TensorLayout.of(tensor))
    assert ghost.device.type == "meta" and ghost.stride() == tensor.stride()


@pytest.fixture
def allocated_cpu_zeros(monkeypatch):
    """CPU ghosts view allocator zeros (CUDA's fallback) for the duration of a test."""
    monkeypatch.setattr(zeros, "_allocated_only", {"cpu"})
    monkeypatch.setattr(zeros, "_sources", {})
    yield
    assert isinstance(zeros._sources[torch.device("cpu")], AllocatedZeros)


@pytest.mark.parametrize("channels_last", [False, True])
def test_gradients_through_fallback_ghosts_are_stock(allocated_cpu_zeros, channels_last):
    """Conv (input dropped), batch norm in eval, pooling: bit-identical with every ghost
    viewing allocator zeros at its original's phase."""
    weight = torch.nn.Parameter(seeded_randn(8, 4, 3, 3, seed=1), requires_grad=False)
    x = seeded_randn(2, 4, 11, 11, requires_grad=True)
    if channels_last:
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)

    def network(x):
        y = F.conv2d(x, weight, padding=1)
        y = F.batch_norm(y, torch.zeros(8), torch.ones(8), training=False)
        return F.avg_pool2d(F.max_pool2d(y, 3, 2, 1), 2)

    stock, mode = compare_with_stock(network, {"x": x})
    assert mode.saved_bytes < stock.saved_bytes


def test_use_allocated_zeros_replaces_the_devices_source(monkeypatch):
    monkeypatch.setattr(zeros, "_allocated_only", set())
    monkeypatch.setattr(zeros, "_sources", {})
    zeros.zero_view(torch.device("cpu"), torch.uint8, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        zeros.use_allocated_zeros("cpu")
    zeros.zero_view(torch.device("cpu"), torch.uint8, 10)
    assert zeros.describe()["cpu"]["source"] == AllocatedZeros.name


def test_any_failure_to_map_falls_back(monkeypatch):
    """Not only driver errors: ctypes or DLPack refusing the mapping falls back the same way."""
    device = torch.device("cpu", 2)
    monkeypatch.setitem(zeros._sources, device, CpuMappedZeroGranule(device, driver=StandInDriver()))

    def refuse(pointer, nbytes, device):
        raise RuntimeError("DLPack refused")

    monkeypatch.setattr(zeros, "tensor_over", refuse)
    with pytest.warns(UserWarning, match="DLPack refused"):
        ghost = zeros.zero_view(device, torch.float32, 4096)
    assert not ghost.any() and isinstance(zeros._sources[device], AllocatedZeros)
