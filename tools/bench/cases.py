"""The benchmark's rows: the models it trains (with the batches and the loss each one gets) and
the fine-tuning cases (which parameters train, whether the input needs a gradient, batch norm
in training or eval mode); and the three cases of the step-time comparison."""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .encoders import FINE_TUNING, Config, bert_shaped, gpt2_shaped
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
    tokens and a mean-squared error against random targets; language models (``vocab`` set)
    get ``(batch, size)`` token ids and a cross-entropy loss over their logits (a classifier's,
    or next-token prediction for a causal model: ``causal``). ``fine_tuning`` replaces cases
    the model has its own way of running (an encoder's LoRA goes into its layers only).
    """

    name: str
    build: Callable[[], nn.Module]
    features: int | None = None
    vocab: int | None = None
    causal: bool = False
    fine_tuning: dict[str, Callable[[nn.Module], None]] | None = None

    def batch(self, batch: int, size: int, device: torch.device) -> tuple[Tensor, Tensor]:
        generator = torch.Generator().manual_seed(SEED + 1)
        if self.vocab is not None:
            x = torch.randint(0, self.vocab, (batch, size), generator=generator)
            target = x if self.causal else torch.randint(0, 2, (batch,), generator=generator)
        elif self.features is not None:
            x = torch.randn(batch, size, self.features, generator=generator)
            target = torch.randn(batch, size, self.features, generator=generator)
        else:
            x = torch.randn(batch, 3, size, size, generator=generator)
            target = torch.randint(0, NUM_CLASSES, (batch,), generator=generator)
        return x.to(device), target.to(device)

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        output = getattr(output, "logits", output)  # Hugging Face models return an output object
        if self.causal:
            return F.cross_entropy(output[:, :-1].reshape(-1, output.shape[-1]).float(), target[:, 1:].reshape(-1))
        if self.features is not None:
            return F.mse_loss(output, target)
        return F.cross_entropy(output.float(), target)

    def input_shape(self, batch: int, size: int) -> list[int]:
        if self.vocab is not None:
            return [batch, size]
        return [batch, size, self.features] if self.features is not None else [batch, 3, size, size]

    def prepare(self, case: Case) -> Callable[[nn.Module], None]:
        """How this model runs ``case``."""
        own = (self.fine_tuning or {}).get(case.key)
        return own if own is not None else case.prepare


MODELS: dict[str, ModelSpec] = {
    "resnet18": ModelSpec("resnet18", lambda: resnet18(NUM_CLASSES)),
    "vgg11_bn": ModelSpec("vgg11_bn", lambda: vgg11_bn(NUM_CLASSES)),
    "mobilenet_v2": ModelSpec("mobilenet_v2", lambda: mobilenet_v2(NUM_CLASSES)),
    "transformer_encoder": ModelSpec("transformer_encoder", transformer_encoder, features=256),
    "bert": ModelSpec("bert", bert_shaped, vocab=Config.vocab, fine_tuning=FINE_TUNING),
    "gpt2": ModelSpec("gpt2", gpt2_shaped, vocab=Config.vocab, causal=True, fine_tuning=FINE_TUNING),
}

_EXTERNAL_BUILDERS: dict[str, Callable[[Any, str], nn.Module]] = {
    "torchvision": lambda package, name: package.models.get_model(name, weights=None, num_classes=NUM_CLASSES),
    "timm": lambda package, name: package.create_model(name, pretrained=False, num_classes=NUM_CLASSES),
}


def _hugging_face(model_name: str) -> ModelSpec:
    """``hf:bert`` / ``hf:gpt2``: the Hugging Face models, built from a config shaped like the
    in-repo ones (4 layers, d 256, 4 heads, ff 1024, eager attention, no weights loaded); with
    ``peft`` installed, their LoRA case is PEFT's own (r 4, alpha 8, dropout 0.1, every linear
    of the layers)."""
    import transformers

    shape = Config()
    common = dict(num_attention_heads=shape.heads, attn_implementation="eager")
    if model_name == "bert":
        config = transformers.BertConfig(
            vocab_size=shape.vocab, hidden_size=shape.d, num_hidden_layers=shape.layers,
            intermediate_size=shape.ff, num_labels=2, **common,
        )
        build, causal, targets = (lambda: transformers.BertForSequenceClassification(config)), False, ["query", "key", "value", "dense"]
    elif model_name == "gpt2":
        config = transformers.GPT2Config(vocab_size=shape.vocab, n_embd=shape.d, n_layer=shape.layers, n_inner=shape.ff, n_head=shape.heads, attn_implementation="eager")
        build, causal, targets = (lambda: transformers.GPT2LMHeadModel(config)), True, ["c_attn", "c_proj", "c_fc"]
    else:
        raise ValueError(f"unknown Hugging Face model {model_name!r}: use hf:bert or hf:gpt2")
    fine_tuning = dict(FINE_TUNING)
    fine_tuning["lora"] = _peft_lora(targets) if importlib.util.find_spec("peft") else _no_lora
    return ModelSpec(f"hf:{model_name}", build, vocab=shape.vocab, causal=causal, fine_tuning=fine_tuning)


def _peft_lora(targets: list[str]) -> Callable[[nn.Module], None]:
    def prepare(model: nn.Module) -> None:
        import peft

        config = peft.LoraConfig(r=LORA_RANK, lora_alpha=8, lora_dropout=0.1, target_modules=targets)
        peft.inject_adapter_in_model(config, model)  # freezes the base, adds trainable adapters
    return prepare


def _no_lora(model: nn.Module) -> None:
    raise RuntimeError("the Hugging Face models' LoRA case needs peft (pip install peft)")


def model_spec(name: str) -> ModelSpec:
    """A built-in model by name, ``hf:bert`` / ``hf:gpt2`` (Hugging Face's, built from config,
    when transformers is installed), or ``torchvision:NAME`` / ``timm:NAME`` (randomly
    initialised image classifiers, when that package is installed)."""
    if name in MODELS:
        return MODELS[name]
    if name.startswith("hf:"):
        if importlib.util.find_spec("transformers") is None:
            raise ValueError(f"model {name!r} needs transformers, which is not installed (pip install transformers)")
        return _hugging_face(name.partition(":")[2])
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
