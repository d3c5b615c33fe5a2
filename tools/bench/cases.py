"""The benchmark's rows: the models it trains (with the batches and the loss each one gets) and
the fine-tuning cases (which parameters train, whether the input needs a gradient, batch norm
in training or eval mode); and the three cases of the step-time comparison."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models import (
    add_lora,
    freeze,
    mobilenet_v2,
    resnet18,
    set_batchnorm_eval,
    transformer_encoder,
    vgg11_bn,
)

NUM_CLASSES = 10
SEED = 0
LORA_RANK = 4


# -- models ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """A network and the batches it trains on.

    Image models get ``(batch, 3, size, size)`` inputs and a cross-entropy loss over
    ``NUM_CLASSES`` classes; sequence models (``features`` set) get ``(batch, size, features)``
    tokens and a mean-squared error against random targets.
    """

    name: str
    build: Callable[[], nn.Module]
    features: int | None = None

    def batch(self, batch: int, size: int, device: torch.device) -> tuple[Tensor, Tensor]:
        generator = torch.Generator().manual_seed(SEED + 1)
        if self.features is not None:
            x = torch.randn(batch, size, self.features, generator=generator)
            target = torch.randn(batch, size, self.features, generator=generator)
        else:
            x = torch.randn(batch, 3, size, size, generator=generator)
            target = torch.randint(0, NUM_CLASSES, (batch,), generator=generator)
        return x.to(device), target.to(device)

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        if self.features is not None:
            return F.mse_loss(output, target)
        return F.cross_entropy(output, target)

    def input_shape(self, batch: int, size: int) -> list[int]:
        return [batch, size, self.features] if self.features is not None else [batch, 3, size, size]


MODELS: dict[str, ModelSpec] = {
    "resnet18": ModelSpec("resnet18", lambda: resnet18(NUM_CLASSES)),
    "vgg11_bn": ModelSpec("vgg11_bn", lambda: vgg11_bn(NUM_CLASSES)),
    "mobilenet_v2": ModelSpec("mobilenet_v2", lambda: mobilenet_v2(NUM_CLASSES)),
    "transformer_encoder": ModelSpec("transformer_encoder", transformer_encoder, features=256),
}

_EXTERNAL_BUILDERS: dict[str, Callable[[Any, str], nn.Module]] = {
    "torchvision": lambda package, name: package.models.get_model(name, weights=None, num_classes=NUM_CLASSES),
    "timm": lambda package, name: package.create_model(name, pretrained=False, num_classes=NUM_CLASSES),
}


def model_spec(name: str) -> ModelSpec:
    """A built-in model by name, or ``torchvision:NAME`` / ``timm:NAME`` (randomly initialised
    image classifiers, when that package is installed)."""
    if name in MODELS:
        return MODELS[name]
    package_name, _, model_name = name.partition(":")
    if package_name not in _EXTERNAL_BUILDERS or not model_name:
        raise ValueError(
            f"unknown model {name!r}: use one of {', '.join(MODELS)}, or torchvision:NAME / timm:NAME"
        )
    try:
        package = importlib.import_module(package_name)
    except ImportError:
        raise ValueError(f"model {name!r} needs {package_name}, which is not installed (pip install {package_name})") from None
    builder = _EXTERNAL_BUILDERS[package_name]
    builder(package, model_name)  # fail now on a bad name, not in the middle of the run
    return ModelSpec(name, lambda: builder(package, model_name))


# -- cases -------------------------------------------------------------------------------
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # batch and instance norm
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


@dataclass(frozen=True)
class Case:
    """A fine-tuning setting: ``prepare`` sets requires_grad and train/eval on a fresh model."""

    key: str
    label: str
    prepare: Callable[[nn.Module], None]
    input_grad: bool = False


def _train_only(model: nn.Module, parameters: Iterator[nn.Parameter]) -> None:
    model.requires_grad_(False)
    for parameter in parameters:
        parameter.requires_grad_(True)


def _parameterised_layers(model: nn.Module) -> list[nn.Module]:
    """Modules owning parameters directly, in module (definition) order."""
    return [module for module in model.modules() if next(module.parameters(recurse=False), None) is not None]


def _quarter(model: nn.Module, first: bool) -> None:
    layers = _parameterised_layers(model)
    count = max(1, math.ceil(len(layers) / 4))
    chosen = layers[:count] if first else layers[-count:]
    _train_only(model, (p for layer in chosen for p in layer.parameters(recurse=False)))


def _lora(model: nn.Module) -> None:
    model.requires_grad_(False)
    add_lora(model, LORA_RANK)


CASES: dict[str, Case] = {
    case.key: case
    for case in (
        Case("all", "all trainable", lambda m: None),
        Case("input-bn-train", "input grad, BN train", lambda m: m.requires_grad_(False), input_grad=True),
        Case(
            "input-bn-eval",
            "input grad, BN eval",
            lambda m: (m.requires_grad_(False), set_batchnorm_eval(m)),
            input_grad=True,
        ),
        Case("bias", "bias only", lambda m: _train_only(m, (p for n, p in m.named_parameters() if n.endswith("bias")))),
        Case(
            "norm",
            "norm only",
            lambda m: _train_only(
                m, (p for module in m.modules() if isinstance(module, NORM_TYPES) for p in module.parameters(recurse=False))
            ),
        ),
        Case("first-quarter", "first quarter", lambda m: _quarter(m, first=True)),
        Case("last-quarter", "last quarter", lambda m: _quarter(m, first=False)),
        Case("lora", f"LoRA (rank {LORA_RANK})", _lora),
    )
}


# -- the step-time comparison (python -m tools.bench step) -------------------------------
def _frozen_bn_eval(model: nn.Module) -> None:
    freeze(model)
    set_batchnorm_eval(model)


STEP_CASES: dict[str, Callable[[nn.Module], None]] = {
    "frozen conv/BN, BN eval": _frozen_bn_eval,
    "frozen conv/BN, BN train": freeze,
    "all trainable": lambda m: None,
}


@dataclass(frozen=True)
class StepRow:
    """One model in one case at the batch and image size the step-time comparison uses."""

    key: str
    model: str  # a model_spec name
    case: str  # a STEP_CASES key
    batch: int
    size: int

    @property
    def label(self) -> str:
        return f"{self.model}, {self.case}, batch {self.batch}, {self.size}x{self.size}"


STEP_ROWS: dict[str, StepRow] = {
    row.key: row
    for row in (
        StepRow("resnet18-eval", "resnet18", "frozen conv/BN, BN eval", 8, 128),
        StepRow("resnet18-train", "resnet18", "frozen conv/BN, BN train", 8, 128),
        StepRow("resnet18-all", "resnet18", "all trainable", 8, 128),
        StepRow("resnet50-eval", "torchvision:resnet50", "frozen conv/BN, BN eval", 2, 96),
        StepRow("mobilenet_v3_large-eval", "torchvision:mobilenet_v3_large", "frozen conv/BN, BN eval", 8, 128),
    )
}
