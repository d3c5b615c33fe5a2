"""Whole networks: the ResNet-18-shaped acceptance cases, bit-identical and measured."""

from __future__ import annotations

import copy

import pytest
import torch

from memsave_dispatch import MemSaveMode, saved_tensor_bytes
from tools.bench.models import (
    SmallConvNet,
    freeze,
    resnet18,
    set_batchnorm_eval,
    transformer_encoder,
    vgg11_bn,
)

CASES = {
    # case: (prepare, bound on bytes kept under the mode / stock)
    "frozen conv/BN, BN eval": (lambda m: (freeze(m), set_batchnorm_eval(m)), 0.03),
    "frozen conv/BN, BN train": (freeze, 0.50),
    "all trainable": (lambda m: None, 0.82),
}


def _step(model, x, target, use_mode):
    x = x.detach().requires_grad_(True)
    torch.manual_seed(7)  # dropout layers draw the same noise in both runs
    with MemSaveMode() if use_mode else torch.enable_grad():
        loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
    grads = [x.grad] + [p.grad for p in model.parameters() if p.requires_grad]
    return loss.detach(), grads, [b.clone() for b in model.buffers()]


def _check_exact_and_bound(base, prepare, bound, x, target):
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


def _images(batch=4, size=64):
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    return x, torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("case", sorted(CASES))
def test_resnet18_bytes_and_exact_gradients(case):
    prepare, bound = CASES[case]
    torch.manual_seed(0)
    _check_exact_and_bound(resnet18(num_classes=10), prepare, bound, *_images())


VGG_CASES = {"frozen conv/BN, BN eval": 0.04, "frozen conv/BN, BN train": 0.43}


@pytest.mark.parametrize("case", sorted(VGG_CASES))
def test_vgg11_bn_bytes_and_exact_gradients(case):
    torch.manual_seed(0)
    _check_exact_and_bound(vgg11_bn(num_classes=10), CASES[case][0], VGG_CASES[case], *_images())


@pytest.mark.parametrize("activation,bound", [("relu", 0.52), ("gelu", 0.68)])
def test_transformer_encoder_bias_only(activation, bound):
    """d_model 256, 4 heads, feed-forward 1024, dropout 0.1, 4 layers, batch 8 x 128 tokens,
    only biases trainable, input needs grad; outputs and gradients bit-identical under the
    same seed (the dropouts draw the same noise)."""
    torch.manual_seed(0)
    model = transformer_encoder(activation)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.endswith("bias"))
    x = torch.randn(8, 128, 256, generator=torch.Generator().manual_seed(1))

    def run(use_mode):
        inputs = x.detach().requires_grad_(True)
        torch.manual_seed(7)
        with MemSaveMode() if use_mode else torch.enable_grad():
            kept, out = saved_tensor_bytes(lambda: model(inputs), exclude=model)
            out.backward(torch.ones_like(out))
        grads = [inputs.grad] + [p.grad for p in model.parameters() if p.requires_grad]
        model.zero_grad(set_to_none=True)
        return kept, out.detach(), grads

    stock_bytes, stock_out, stock_grads = run(False)
    mode_bytes, mode_out, mode_grads = run(True)
    assert torch.equal(stock_out, mode_out)
    assert all(torch.equal(a, b) for a, b in zip(stock_grads, mode_grads))
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
