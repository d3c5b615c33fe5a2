"""The meter against an outside measure: what saved_tensor_bytes says the mode saves is what
the allocator itself no longer holds once the forward pass returns."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memsave_dispatch import MemSaveMode, saved_tensor_bytes
from memsave_dispatch.meter import allocator_bytes

FROZEN = torch.randn(8, 3, 3, 3, generator=torch.Generator().manual_seed(3))


def _frozen_trunk(x):
    y = F.relu(F.conv2d(x, FROZEN, padding=1))
    y = F.max_pool2d(y, 2)
    return F.avg_pool2d(F.relu(F.conv2d(y, FROZEN.repeat(1, 3, 1, 1)[:, :8])), 2).sum()


def _features_returned(x):
    y = F.relu(F.conv2d(x, FROZEN, padding=1))
    return F.avg_pool2d(y, 2).sum(), y


CASES = {"frozen trunk": _frozen_trunk, "features returned": _features_returned}


@pytest.mark.parametrize("case", sorted(CASES))
def test_saving_measured_by_the_meter_is_what_the_allocator_frees(case):
    run = CASES[case]
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    measured = {}
    for use_mode in (False, True):
        with MemSaveMode() if use_mode else torch.enable_grad():
            run(x)  # warm caches (ghost tables, pooling windows) outside the measurement
            # the input and the weights live anyway: the meter leaves them out, the allocator
            # never sees them allocated
            allocated = allocator_bytes(lambda: saved_tensor_bytes(lambda: run(x), exclude=[x, FROZEN]))
        kept, outputs = allocated.result
        measured[use_mode] = (kept, allocated.net)
        del outputs, allocated
    (stock_kept, stock_net), (mode_kept, mode_net) = measured[False], measured[True]
    assert mode_kept <= stock_kept
    assert stock_net - mode_net == stock_kept - mode_kept  # the outputs are the same size
    if case == "features returned":
        assert mode_kept == stock_kept  # the caller holds the activation: no mask beside it
