"""Ghosts: the layout of the dropped tensor, zeros that were never allocated."""

from __future__ import annotations

import pytest
import torch

from memsave_dispatch.ghosts import TensorLayout, ghost_like


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_ghost_has_the_layout_reads_zero_and_is_shared_per_layout(channels_last, dtype):
    tensor = torch.randn(2, 3, 5, 7, dtype=dtype)
    if channels_last:
        tensor = tensor.contiguous(memory_format=torch.channels_last)
    layout = TensorLayout.of(tensor)
    ghost = ghost_like(layout)
    assert ghost.shape == tensor.shape and ghost.stride() == tensor.stride() and ghost.dtype == dtype
    assert ghost.data_ptr() % 64 == tensor.data_ptr() % 64  # same alignment phase as the original
    assert not ghost.any()
    assert ghost_like(TensorLayout.of(tensor.clone())) is ghost  # one per layout
