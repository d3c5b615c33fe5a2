"""Why a handled call ran stock: the words the report uses, shared by both engines (the
compiled engine counts these by position in :data:`COMPILED`)."""

from __future__ import annotations

__all__ = [
    "GRAD_MODE_OFF",
    "NOTHING_TO_SAVE",
    "NO_INPUT_REQUIRES_GRAD",
    "IN_PLACE_ON_A_VIEW",
    "INPUT_HANDED_BACK",
    "DURING_BACKWARD",
    "CHECKPOINTED_REGION",
    "device_not_enabled",
    "COMPILED",
]

GRAD_MODE_OFF = "grad mode off"
NOTHING_TO_SAVE = "nothing to save"
NO_INPUT_REQUIRES_GRAD = "no input requires grad"
IN_PLACE_ON_A_VIEW = "in place on a view"
INPUT_HANDED_BACK = "input handed back"
# the Python engine's only (the compiled engine hands these calls to it)
DURING_BACKWARD = "during backward"
CHECKPOINTED_REGION = "checkpointed region"


def device_not_enabled(device: str) -> str:
    return f"device {device} not enabled"


#: The reasons the compiled engine gives itself, in the order of csrc/engine.h's Reason.
COMPILED = (
    GRAD_MODE_OFF,
    NOTHING_TO_SAVE,
    device_not_enabled("cpu"),
    NO_INPUT_REQUIRES_GRAD,
    IN_PLACE_ON_A_VIEW,
    INPUT_HANDED_BACK,
)
