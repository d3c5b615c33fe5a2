"""The benchmark (see memsave_dispatch.bench): stock against MemSaveMode, eager and compiled.

    python tools/bench.py --quick --json quick.json --png quick.png
    python tools/bench.py --models resnet18 --cases bias lora

Same as ``memsave-dispatch bench`` and ``python -m memsave_dispatch bench``.
"""

from __future__ import annotations

import sys

from memsave_dispatch.bench import main

if __name__ == "__main__":
    sys.exit(main())
