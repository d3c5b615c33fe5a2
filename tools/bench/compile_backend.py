"""How the compile columns compile: real Inductor, or Inductor up to and including its
partitioner with the graphs run by eager kernels; and the settings every compiled column runs
under."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

# How the compile columns compile: real Inductor, or Inductor's own graph capture,
# decompositions, joint-graph passes and partitioner (so the same tensors are saved for
# backward) with the partitioned graphs run by eager aten kernels instead of generated code.
COMPILE_BACKENDS = ("inductor", "partition", "none")
COMPILE_LABELS = {
    "inductor": "torch.compile (inductor)",
    "partition": "torch.compile (inductor partition, eager kernels)",
}


def _channels_last_weight_outputs(gm: torch.fx.GraphModule) -> list[int]:
    """Which outputs of a forward graph are conv weights that Inductor would convert to
    channels-last (its layout optimisation, always on for CPU convolutions with mkldnn) and so
    save for backward as a converted copy rather than as the parameter itself."""
    from torch._inductor.graph import GraphLowering

    if not GraphLowering.decide_layout_opt(gm, is_inference=False):
        return []
    weights = {
        node.args[1]
        for node in gm.graph.nodes
        if node.target is torch.ops.aten.convolution.default and node.args[1].op == "placeholder"
    }
    (outputs,) = (node.args[0] for node in gm.graph.nodes if node.op == "output")
    return [index for index, output in enumerate(outputs) if output in weights]


def _eager_kernels(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], *, is_backward: bool = False, is_inference: bool = False, **_: Any
) -> Any:
    """Inductor's inner compiler replaced: run the graph with aten kernels, reproducing the one
    lowering decision that changes what is kept (channels-last copies of saved conv weights)."""
    from functorch.compile import make_boxed_func

    converted = [] if is_backward or is_inference else _channels_last_weight_outputs(gm)
    if not converted:
        return make_boxed_func(gm.forward)

    def forward(*args: Any) -> list[Any]:
        # A copy of the same size, in the layout the backward graph was traced for.
        outputs = list(gm.forward(*args))
        for index in converted:
            if not outputs[index].is_contiguous(memory_format=torch.channels_last):
                outputs[index] = outputs[index].clone()
        return outputs

    return make_boxed_func(forward)


def inductor_partition_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Any:
    """``torch.compile`` backend: Inductor up to and including the forward/backward partition
    (graph capture, decompositions, joint-graph passes, min-cut partitioner), then the graphs
    run as they are, with no code generation: seconds instead of half a minute for a ResNet-18
    on two cores, and the same tensors kept for backward."""
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, inner_compile=_eager_kernels)


@contextlib.contextmanager
def compile_settings(backend: str) -> Iterator[None]:
    """Compiled random operators draw from PyTorch's generator (Inductor's ``fallback_random``),
    so that dropout masks, and so gradients, can be compared with eager at all.

    The partition backend must also neither read nor write the compile caches: their keys do
    not include the inner compiler, so it would be handed real Inductor's artifacts (and
    would hand its own to later real compilations)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch._inductor.config.patch(fallback_random=True))
        if backend == "partition":
            stack.enter_context(torch._functorch.config.patch(enable_autograd_cache=False))
            stack.enter_context(torch._inductor.config.patch(fx_graph_cache=False))
        yield


def compile_model(model: nn.Module, backend: str) -> Callable[[Tensor], Tensor]:
    """``torch.compile(model)`` for a compile column: ``backend`` is one of COMPILE_BACKENDS but none."""
    return torch.compile(model, backend=inductor_partition_backend if backend == "partition" else backend)
