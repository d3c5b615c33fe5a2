"""memsave-dispatch: keep only what the requested gradients need, bit-identical to stock.

    with MemSaveMode() as mode:
        loss = loss_fn(model(x), y); loss.backward(); opt.step()
    mode.print_report()
"""

from . import ops  # noqa: F401  (registers the built-in handlers)
from .audit import AuditReport, audit, track_modules
from .interposer import install, uninstall
from .measure import SavedTensorMeter, saved_tensor_bytes
from .mode import MemSaveMode
from .policy import DROP, KEEP, Encode, EncodeWhenReleased, Saved, encodings_enabled
from .registry import (
    Handler,
    RegistrationError,
    SavingPolicy,
    register_handler,
    registered_ops,
    unregister_handler,
)
from .report import OpReport, Report

__version__ = "0.1.0"

__all__ = [
    "MemSaveMode",
    "SavingPolicy",
    "Handler",
    "Saved",
    "KEEP",
    "DROP",
    "Encode",
    "EncodeWhenReleased",
    "encodings_enabled",
    "RegistrationError",
    "register_handler",
    "unregister_handler",
    "registered_ops",
    "Report",
    "OpReport",
    "audit",
    "track_modules",
    "AuditReport",
    "SavedTensorMeter",
    "saved_tensor_bytes",
    "install",
    "uninstall",
]
