"""CUDA readiness: verify MemSaveMode on a GPU against stock PyTorch and measure it, in one run.

    timeout 360 python tools/gpu_check.py       # on the GPU machine: a 300 s budget, 6 minutes at most
    python tools/gpu_check.py --device cpu --json /tmp/prep.json --markdown /tmp/prep.md   # the same code here

Parts, most important first, each written to docs/gpu-results.json and .md as soon as it is
done (so a run cut short keeps them): the correctness matrix (every handler family, fp32 /
fp64 / bf16 / fp16 and fp16/bf16 autocast, contiguous and channels-last, the requires-grad
patterns, deterministic algorithms on, raw bits against stock; bytes kept and backward growth),
the codecs' assumptions on the device, ghosts (what zero memory costs, backward kernels given a
ghost against the real tensor and the old zero-stride placeholder), host synchronisation
(``torch.cuda.set_sync_debug_mode``), and the benchmark's GPU columns (``tools.bench``'s runner:
ResNet-18/50 at batch 64 and 224x224, the transformer encoder at batch 32 x 512 tokens, frozen
BN eval / frozen BN train / all trainable / LoRA; compiled columns as the budget allows).
``--render JSON`` prints the markdown report of an earlier run. See docs/gpu.md.

Exit status 0 when every check passed, 1 if any failed, 2 without a GPU.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# cuBLAS reads this when CUDA starts: deterministic matrix products need it set before.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for tools.gpu

from tools.gpu.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
