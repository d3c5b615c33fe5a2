"""``python -m tools.bench``: the benchmark; ``python -m tools.bench step``: the step-time comparison."""

from .cli import main

raise SystemExit(main())
