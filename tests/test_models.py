"""Whole networks: the ResNet-18-shaped acceptance cases, bit-identical and measured."""

from __future__ import annotations

import copy

import pytest
import torch

from memsave_dispatch import MemSaveMode, saved_tensor_bytes
from memsave_dispatch.models import SmallConvNet, freeze, resnet18, set_batchnorm_eval

CASES = {
    # case: (prepare, bound on bytes kept under the mode / stock)
    "frozen conv/BN, BN eval": (lambda m: (freeze(m), set_batchnorm_eval(m)), 0.10),
    "frozen conv/BN, BN train": (freeze, 0.56),
    "all trainable": (lambda m: None, 1.00),
}


def _step(model, x, target, use_mode):
    x = x.detach().requires_grad_(True)
    with MemSaveMode() if use_mode else torch.enable_grad():
        loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
    grads = [x.grad] + [p.grad for p in model.parameters() if p.requires_grad]
    return loss.detach(), grads, [b.clone() for b in model.buffers()]


@pytest.mark.parametrize("case", sorted(CASES))
def test_resnet18_bytes_and_exact_gradients(case):
    prepare, bound = CASES[case]
    torch.manual_seed(0)
    base = resnet18(num_classes=10)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    target = torch.randint(0, 10, (4,), generator=torch.Generator().manual_seed(2))
    models = []
    for _ in range(2):
        model = copy.deepcopy(base)
        model.train()
        prepare(model)
        models.append(model)
    stock, mode = _step(models[0], x, target, False), _step(models[1], x, target, True)
    for a, b in zip((stock[0], *stock[1], *stock[2]), (mode[0], *mode[1], *mode[2])):
        assert torch.equal(a, b)

    def kept(use_mode):
        model = copy.deepcopy(models[0])
        with MemSaveMode() if use_mode else torch.enable_grad():
            nbytes, _ = saved_tensor_bytes(lambda: model(x.detach().requires_grad_(True)), exclude=model)
        return nbytes

    stock_bytes, mode_bytes = kept(False), kept(True)
    assert mode_bytes <= bound * stock_bytes, (mode_bytes, stock_bytes, mode_bytes / stock_bytes)


def test_small_net_trains_identically_for_several_steps():
    torch.manual_seed(0)
    nets = [SmallConvNet(), None]
    nets[1] = copy.deepcopy(nets[0])
    for net in nets:
        freeze(net.features[:4])
    optimizers = [torch.optim.SGD([p for p in n.parameters() if p.requires_grad], lr=0.1, momentum=0.9) for n in nets]
    mode = MemSaveMode()
    for step in range(4):
        x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(step))
        y = torch.randint(0, 10, (4,), generator=torch.Generator().manual_seed(100 + step))
        for net, optimizer, use_mode in zip(nets, optimizers, (False, True)):
            optimizer.zero_grad()
            with mode if use_mode else torch.enable_grad():
                torch.nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()
    for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values()):
        assert torch.equal(a, b)
