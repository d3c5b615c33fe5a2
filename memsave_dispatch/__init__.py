"""memsave-dispatch: keep only what the requested gradients need, bit-identical to stock.

    with MemSaveMode() as mode:
        loss = loss_fn(model(x), y); loss.backward(); opt.step()
    mode.print_report()

Writing a handler for another operator: :mod:`memsave_dispatch.handlers`.
"""

from . import handlers, ops  # noqa: F401  (ops registers the built-in handlers)
from .audit import AuditReport, audit, track_modules
from .meter import saved_tensor_bytes
from .mode import MemSaveMode
from .report import Report

__version__ = "0.1.0"

__all__ = ["MemSaveMode", "Report", "audit", "AuditReport", "track_modules", "saved_tensor_bytes", "handlers"]
