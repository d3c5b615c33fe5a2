"""Codecs and bit packing: packing and every way of unpacking give back the mask exactly."""

from __future__ import annotations

import pytest
import torch

from memsave_dispatch import codecs
from memsave_dispatch.codecs import BitMask, BitMaskCodec

SHAPES = [(1,), (7,), (8,), (9,), (3, 5), (2, 3, 4, 5), (2, 8, 3, 3)]


def _mask(shape, channels_last: bool, seed: int = 0) -> torch.Tensor:
    values = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) > 0.5
    if channels_last and len(shape) == 4:
        values = values.contiguous(memory_format=torch.channels_last)
    return values


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_pack_then_unpack_is_the_mask_with_its_strides(shape, channels_last):
    mask = _mask(shape, channels_last)
    bits, layout = BitMask.pack(mask.clone())  # packing overwrites what it is given
    assert bits.dtype == torch.uint8 and bits.numel() == -(-mask.numel() // 8)
    unpacked = layout.unpack(bits)
    assert torch.equal(unpacked, mask)
    assert unpacked.stride() == mask.stride()


@pytest.mark.parametrize("shape", SHAPES)
def test_bytes_and_table_lookup_agree(shape):
    mask = _mask(shape, False, seed=1)
    bits, layout = BitMask.pack(mask.clone())
    as_bytes = layout.bytes(bits)
    assert torch.equal(as_bytes, mask.to(torch.uint8))
    table = codecs.two_value_table(torch.float32, -2.5, 7.0)
    expected = torch.where(mask, torch.tensor(7.0), torch.tensor(-2.5))
    assert torch.equal(layout.lookup(bits, table), expected)


def test_fast_and_portable_packing_agree():
    every_byte = torch.arange(256).to(torch.uint8)
    words = codecs.byte_patterns().view(torch.int64).view(-1)
    assert torch.equal(codecs.gather_bits_by_shifts(words), every_byte)
    assert torch.equal(codecs.gather_bits_by_multiply(words.clone()), every_byte)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("low, high", [(0.0, 1.0), (-0.0, 1.0), (0.0, 2.0), (-1.0, 1.0), (False, True)])
def test_two_value_codec_decodes_to_exactly_low_and_high(dtype, low, high):
    tensor = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(2)).to(dtype)
    codec = BitMaskCodec(lambda t: t > 0, low, high)
    kept, meta = codec.encode(tensor)
    decoded = codec.decode(kept, meta)
    expected = torch.where(tensor > 0, torch.tensor(high, dtype=dtype), torch.tensor(low, dtype=dtype))
    assert decoded.dtype == dtype
    assert torch.equal(decoded, expected)
    # signed zeros are part of "exactly": compare the bit patterns too
    assert torch.equal(torch.signbit(decoded), torch.signbit(expected))


@pytest.mark.parametrize("decide", [torch.Tensor.clone, torch.Tensor.bool], ids=["fresh", "itself"])
def test_bool_codec_decodes_the_mask_and_leaves_it_alone(decide):
    mask = _mask((4, 8), False, seed=3)  # a multiple of 8: packed without a padded copy
    original = mask.clone()
    codec = BitMaskCodec(decide, False, True)
    kept, meta = codec.encode(mask)
    assert torch.equal(mask, original)  # (a bool tensor's .bool() is the tensor itself)
    assert torch.equal(codec.decode(kept, meta), mask)


def test_byte_patterns_are_the_bits_of_every_byte():
    expected = torch.tensor([[(byte >> j) & 1 for j in range(8)] for byte in range(256)], dtype=torch.uint8)
    assert torch.equal(codecs.byte_patterns(), expected)


def test_tables_are_made_on_the_device_of_the_bits_they_decode():
    """A GPU's tables come from its own kernels; meta stands in for a device here."""
    table = codecs.two_value_table(torch.float32, -0.0, 2.0, "meta")
    assert table.device.type == "meta" and table.shape == (256, 8)
    assert codecs.two_value_table(torch.float32, -0.0, 2.0, "meta") is table  # made once
    cpu = codecs.two_value_table(torch.float32, -0.0, 2.0)
    assert torch.equal(torch.signbit(cpu), ~codecs.byte_patterns().bool())


def test_pooling_windows_move_to_a_device_whole():
    windows = codecs.regular_windows([9, 9], [5, 5], [3, 3], [2, 2], [1, 1], [1, 1])
    moved = windows.to(torch.device("meta"))
    assert all(tensor.device.type == "meta" for tensor in moved)
    assert [tensor.shape for tensor in moved] == [tensor.shape for tensor in windows]
