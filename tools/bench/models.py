"""Reference networks with the layer layout of well-known models, defined here so that the
tests and the benchmark need no torchvision (``SmallConvNet`` is the demo's network, from
:mod:`memsave_dispatch.demo`).

``resnet18`` follows torchvision's ResNet-18 exactly (stem conv7x7-BN-ReLU(inplace)-maxpool,
BasicBlocks with residual adds and in-place ReLUs, global average pool, fc).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from memsave_dispatch.demo import SmallConvNet

__all__ = [
    "BasicBlock",
    "ResNet",
    "resnet18",
    "VGG",
    "vgg11_bn",
    "MobileNetV2",
    "mobilenet_v2",
    "transformer_encoder",
    "SmallConvNet",
    "freeze",
    "set_batchnorm_eval",
    "LoRA",
    "add_lora",
]


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, layers: Iterable[int] = (2, 2, 2, 2), num_classes: int = 1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        widths = (64, 128, 256, 512)
        stages = []
        for index, (planes, blocks) in enumerate(zip(widths, layers)):
            stages.append(self._make_layer(planes, blocks, stride=1 if index == 0 else 2))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000) -> ResNet:
    return ResNet((2, 2, 2, 2), num_classes)


class VGG(nn.Module):
    """torchvision's VGG layout: conv3x3-BN-ReLU(inplace) stages with 2x2 max pools, a 7x7
    adaptive average pool, and a Linear-ReLU-Dropout x2 + Linear classifier."""

    def __init__(self, config: Iterable[int | str], num_classes: int = 1000, classifier_width: int = 4096):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
                channels = item
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(channels * 7 * 7, classifier_width),
            nn.ReLU(True),
            nn.Dropout(0.5),
            nn.Linear(classifier_width, classifier_width),
            nn.ReLU(True),
            nn.Dropout(0.5),
            nn.Linear(classifier_width, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def vgg11_bn(num_classes: int = 1000, classifier_width: int = 4096) -> VGG:
    return VGG([64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"], num_classes, classifier_width)


class _InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = inp * expand_ratio
        self.use_residual = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += [nn.Conv2d(inp, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's MobileNetV2 layout: inverted residuals with depthwise convolutions and
    ReLU6, a 1x1 conv to 1280 channels, global average pool, dropout and a linear head."""

    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        channels = 32
        layers: list[nn.Module] = [nn.Conv2d(3, channels, 3, 2, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU6(inplace=True)]
        for expand, out, repeats, stride in self.SETTINGS:
            for index in range(repeats):
                layers.append(_InvertedResidual(channels, out, stride if index == 0 else 1, expand))
                channels = out
        layers += [nn.Conv2d(channels, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(num_classes: int = 1000) -> MobileNetV2:
    return MobileNetV2(num_classes)


def transformer_encoder(activation: str = "relu", d_model: int = 256, heads: int = 4, feed_forward: int = 1024, layers: int = 4) -> nn.TransformerEncoder:
    """``nn.TransformerEncoder`` of ``nn.TransformerEncoderLayer`` (batch_first, dropout 0.1)."""
    layer = nn.TransformerEncoderLayer(
        d_model=d_model, nhead=heads, dim_feedforward=feed_forward, dropout=0.1, batch_first=True, activation=activation
    )
    return nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)


def freeze(modules: Iterable[nn.Module] | nn.Module, *, types: tuple[type, ...] = (nn.Conv2d, nn.BatchNorm2d)) -> None:
    """Turn off requires_grad for the parameters of every submodule of the given types."""
    roots = [modules] if isinstance(modules, nn.Module) else list(modules)
    for root in roots:
        for module in root.modules():
            if isinstance(module, types):
                for parameter in module.parameters(recurse=False):
                    parameter.requires_grad_(False)


def set_batchnorm_eval(model: nn.Module) -> None:
    """Put every batch-norm layer in eval mode (running statistics), the rest untouched."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


class LoRA(nn.Module):
    """A frozen layer plus a trainable low-rank update: ``base(x) + scale * up(down(drop(x)))``.

    ``dropout`` is PEFT's ``lora_dropout``: each adapter draws its own mask over the input.

    For ``nn.Linear``, ``down`` and ``up`` are bias-free linear layers through ``rank``
    features. For ``nn.Conv2d``, ``down`` is a convolution with the base's kernel, stride,
    padding and dilation to ``rank`` channels (so its output has the base's spatial size) and
    ``up`` a 1x1 convolution back to the base's channels. ``up`` starts at zero, as in the LoRA
    paper, so the wrapped model computes exactly what it computed before.
    """

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.drop: nn.Module = nn.Dropout(dropout) if dropout else nn.Identity()
        base.requires_grad_(False)
        if isinstance(base, nn.Linear) or _is_transposed_linear(base):
            features_in, features_out = (base.in_features, base.out_features) if isinstance(base, nn.Linear) else base.weight.shape
            self.down: nn.Module = nn.Linear(features_in, rank, bias=False)
            self.up: nn.Module = nn.Linear(rank, features_out, bias=False)
        elif isinstance(base, nn.Conv2d):
            self.down = nn.Conv2d(
                base.in_channels,
                rank,
                base.kernel_size,
                base.stride,
                base.padding,
                base.dilation,
                bias=False,
                padding_mode=base.padding_mode,
            )
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            raise TypeError(f"LoRA wraps nn.Linear or nn.Conv2d, got {type(base).__name__}")
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.down.to(**factory)
        self.up.to(**factory)
        nn.init.zeros_(self.up.weight)
        self.scale = (rank if alpha is None else alpha) / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * self.up(self.down(self.drop(x)))


def _is_transposed_linear(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D``: a linear layer keeping its weight as (in, out), ``nf`` outputs."""
    weight = getattr(module, "weight", None)
    return hasattr(module, "nf") and isinstance(weight, torch.Tensor) and weight.dim() == 2


def add_lora(model: nn.Module, rank: int = 4, alpha: float | None = None, dropout: float = 0.0) -> list[LoRA]:
    """Wrap every ``nn.Linear`` (GPT-2's ``Conv1D`` too) and ``nn.Conv2d`` submodule of ``model`` in place in a :class:`LoRA` of
    the given rank (their weights and biases frozen) and return the wrappers.

    Other parameters keep their ``requires_grad``: freeze them first for classic LoRA. Layers
    inside ``nn.MultiheadAttention`` are left alone, because attention reads its output
    projection's weight directly instead of calling the layer. For the same reason a wrapped
    ``nn.TransformerEncoderLayer`` runs in training mode only: its eval-mode fast path reads
    ``linear1.weight`` and raises ``AttributeError`` (rather than silently skip the adapters).
    """
    wrappers: list[LoRA] = []

    def visit(module: nn.Module) -> None:
        if isinstance(module, (nn.MultiheadAttention, LoRA)):
            return
        for name, child in module.named_children():
            if isinstance(child, (nn.Linear, nn.Conv2d)) or _is_transposed_linear(child):
                wrapper = LoRA(child, rank, alpha, dropout)
                setattr(module, name, wrapper)
                wrappers.append(wrapper)
            else:
                visit(child)

    visit(model)
    return wrappers
