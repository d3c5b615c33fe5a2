"""``python -m memsave_dispatch``: the demo (see memsave_dispatch.demo)."""

from .demo import main

raise SystemExit(main())
