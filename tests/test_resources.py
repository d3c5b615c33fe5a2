"""Long runs: memory stays flat, the report stays bounded, nothing outlives the graph."""

from __future__ import annotations

import gc
import resource
import warnings

import torch
import torch.nn.functional as F

from memsave_dispatch import MemSaveMode, audit, engine


def _live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on deprecated module-level proxies warns
        return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def test_500_training_steps_hold_memory_flat(prompt_tuned_net):
    model = prompt_tuned_net
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    x = torch.randn(8, 3, 16, 16)
    y = torch.arange(8) % 10
    mode = MemSaveMode()
    samples = {}
    for step in range(500):
        with mode:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            assert not engine.pending_count()  # pending encodings die with their tensors
        if step in (49, 499):
            samples[step] = (_live_tensors(), _rss_bytes())
    (tensors_early, rss_early), (tensors_late, rss_late) = samples[49], samples[499]
    assert tensors_late == tensors_early
    assert rss_late - rss_early < 8 * 2**20  # allocator noise, not growth per step
    report = mode.report()
    assert report["aten.relu_.default"].handled == 1000  # every call counted...
    assert len(report.ops) <= 8  # ...in a fixed number of rows
    assert all(len(op.encodings) <= 2 for op in report.ops)  # kinds of encoding, not calls


def test_nothing_is_kept_once_backward_frees_the_graph(prompt_tuned_net):
    model = prompt_tuned_net
    x = torch.randn(4, 3, 16, 16)
    with MemSaveMode():
        F.cross_entropy(model(x), torch.arange(4)).backward()  # warm every cache
        model.zero_grad(set_to_none=True)
        before = _live_tensors()
        out = model(x)
        assert audit(out, model=model).total_bytes > 0
        F.cross_entropy(out, torch.arange(4)).backward()
        assert audit(out, model=model).total_bytes == 0
        del out
        model.zero_grad(set_to_none=True)
        assert _live_tensors() == before
    assert not engine.pending_count()
