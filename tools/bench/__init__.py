"""The benchmark: what MemSaveMode saves, costs and keeps exact, eager and under torch.compile.

    python -m tools.bench --quick                  # ResNet-18, every case: under two minutes on 2 cores
    python -m tools.bench --json bench.json --png bench.png
    python -m tools.bench --models vgg11_bn torchvision:resnet50 --cases bias lora
    python -m tools.bench step                     # step time and per-call overhead, per engine (see step.py)
    python -m tools.bench compare docs/bench-quick.json bench.json   # same bytes and peaks?

Run from the repository root; it is not part of the installed library. Rows are model x
fine-tuning case (which parameters train, whether the input needs a gradient, batch norm in
training or eval mode); columns are stock eager PyTorch, eager under MemSaveMode,
torch.compile, and torch.compile under MemSaveMode. Every cell has:

- **kept**: bytes the graph keeps for backward after one forward pass (saved-tensor hooks,
  distinct storages, parameters and buffers excluded; see :mod:`memsave_dispatch.measure`);
- **peak**: the highest allocation above the step's starting point over one whole training
  step (forward, backward, optimizer step);
- **time**: the median, over interleaved rounds, of the step time against a baseline column
  in the same round (so drift and cache effects hit both alike);
- **exact**: gradients (input and every trainable parameter) against the baseline column.

Stock columns run with the interposing kernels uninstalled, so stock pays nothing for this
library being imported. The optimizer is SGD with momentum and learning rate 0: every step
does the full work of a training step but sees the same weights, so steps stay comparable.

Modules: ``models`` (the model zoo), ``cases`` (model specs and fine-tuning cases),
``measure`` (peak bytes, timing, garbage collection, page faults, gradient comparison),
``compile_backend`` (how the compile columns compile), ``runner`` (columns, one model x case,
a whole run), ``render`` (tables, caption, bar chart), ``step`` (the step-time comparison),
``percall`` (the per-call microbenchmark), ``engines`` (choosing MemSaveMode's engine),
``compare`` (two runs' bytes and peaks), ``cli`` (the command line; ``__main__`` runs it).
"""
