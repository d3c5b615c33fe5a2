"""The demo: prompt-tune a small network with a frozen backbone, stock and under MemSaveMode.

The backbone (conv-BN-ReLU-maxpool twice) is frozen; a learnable input prompt and the
linear head train. Gradients for the prompt flow through every frozen layer, which is where
stock autograd keeps activations no requested gradient needs.

Both runs start from the same weights and see the same synthetic batches; every gradient is
compared bit for bit, and the bytes autograd keeps for backward are measured for each.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from torch import nn

from .exactness import bit_identical
from .meter import saved_tensor_bytes
from .mode import MemSaveMode
from .report import format_bytes

__all__ = ["SmallConvNet", "run_demo", "main"]


class SmallConvNet(nn.Module):
    """The demo's network: two conv-BN-ReLU-maxpool stages and a linear head.

    ``prompt_size``: add a learnable input prompt of that spatial size (visual prompt
    tuning), so that training it sends gradients through a frozen backbone.
    """

    def __init__(self, num_classes: int = 10, width: int = 32, prompt_size: int | None = None):
        super().__init__()
        self.prompt = None if prompt_size is None else nn.Parameter(torch.zeros(1, 3, prompt_size, prompt_size))
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d((4, 4)),
        )
        self.head = nn.Linear(2 * width * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.prompt is not None:
            x = x + self.prompt
        return self.head(torch.flatten(self.features(x), 1))


def run_demo(
    steps: int = 5,
    batch: int = 32,
    size: int = 32,
    bn_train: bool = False,
    console: Console | None = None,
    mode: MemSaveMode | None = None,
) -> dict:
    console = console or Console()
    torch.manual_seed(0)
    stock_model = SmallConvNet(prompt_size=size)
    stock_model.features.requires_grad_(False)  # frozen backbone; the input prompt and the head train
    if not bn_train:
        for module in stock_model.features:
            if isinstance(module, nn.BatchNorm2d):
                module.eval()  # running statistics
    mode_model = copy.deepcopy(stock_model)
    generator = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(batch, 3, size, size, generator=generator), torch.randint(0, 10, (batch,), generator=generator))
        for _ in range(steps)
    ]
    mode = mode or MemSaveMode()
    gradients = {"stock": [], "mode": []}
    with Progress(console=console, transient=True) as progress:
        for label, model in (("stock", stock_model), ("mode", mode_model)):
            optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
            task = progress.add_task(f"training ({label})", total=steps)
            for x, y in batches:
                optimizer.zero_grad()
                with mode if label == "mode" else torch.enable_grad():
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                    loss.backward()
                gradients[label].append([p.grad.clone() for p in model.parameters() if p.requires_grad])
                optimizer.step()
                progress.advance(task)

    exact = all(
        bit_identical(a, b)
        for step_a, step_b in zip(gradients["stock"], gradients["mode"])
        for a, b in zip(step_a, step_b)
    ) and all(bit_identical(a, b) for a, b in zip(stock_model.state_dict().values(), mode_model.state_dict().values()))

    x = batches[0][0]
    stock_bytes, _ = saved_tensor_bytes(lambda: stock_model(x), exclude=stock_model)
    with MemSaveMode():
        mode_bytes, _ = saved_tensor_bytes(lambda: mode_model(x), exclude=mode_model)

    mode.print_report(console)
    summary = Table(title="Bytes kept for backward (one forward pass, parameters excluded)", title_justify="left")
    for column in ("stock PyTorch", "MemSaveMode", "ratio", "gradients bit-identical"):
        summary.add_column(column, justify="right")
    summary.add_row(format_bytes(stock_bytes), format_bytes(mode_bytes), f"{mode_bytes / stock_bytes:.3f}", "yes" if exact else "NO")
    console.print(summary)
    return {
        "steps": steps,
        "batch": batch,
        "input": [3, size, size],
        "batchnorm": "train" if bn_train else "eval",
        "stock_bytes": stock_bytes,
        "mode_bytes": mode_bytes,
        "ratio": mode_bytes / stock_bytes,
        "gradients_bit_identical": exact,
        "report": mode.report().to_dict(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m memsave_dispatch",
        description="Prompt-tune a small conv-BN-ReLU-pool network with a frozen backbone, stock and "
        "under MemSaveMode, and compare the memory kept for backward and the gradients.",
    )
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32, help="input height and width")
    parser.add_argument("--bn-train", action="store_true", help="keep batch norm in training mode")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    result = run_demo(args.steps, args.batch, args.size, args.bn_train)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return 0 if result["gradients_bit_identical"] else 1
