"""Host synchronisation: on a GPU, the mode's encodings and decodings must never make the host
wait for the device (no ``.item()``, ``bool(tensor)``, ``nonzero`` or blocking copy on the
step's path).

Per handler family, one configuration that makes the mode encode or drop runs once to warm
up (what is made once per device and configuration is made then: bit tables, pooling windows,
the zero mapping, hardtanh's and dropout's one probe), then forward and backward run under
``torch.cuda.set_sync_debug_mode("error")``, stock and under the mode: a synchronising call
raises there and is reported with its message. CUDA only: the CPU has nothing to wait for.
"""

from __future__ import annotations

import warnings

import torch

from memsave_dispatch import MemSaveMode

from .matrix import PRECISIONS, Case, cases, run_case


def _representatives(device: torch.device) -> list[tuple[str, Case]]:
    """(precision, case): the first configuration of each family where the mode changes what
    is kept, fp32 contiguous, plus the conv-BN block in fp16 autocast (cuDNN's half batch norm)."""
    chosen: dict[str, tuple[str, Case]] = {}
    for case in cases(device, torch.float32, channels_last=False):
        if case.expect_saving:
            chosen.setdefault(case.family, ("fp32", case))
            if case.family.startswith("conv-bn"):
                chosen.setdefault(f"{case.family} (fp16 autocast)", ("fp16 autocast", case))
    return list(chosen.values())


def _synchronises(case: Case, precision: str, mode: MemSaveMode | None) -> str | None:
    """The message of the first synchronising call forward and backward make, or None."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run_case(case, mode, PRECISIONS[precision][1], measure_backward=False)
    except RuntimeError as error:
        return str(error).splitlines()[0][:160]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return None


def run_sync_checks(device: torch.device) -> list[dict] | None:
    """One row per family: whether stock and the mode synchronise; None off CUDA."""
    if device.type != "cuda":
        return None
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "not verified on cuda": verifying it is this check's job
        for precision, case in _representatives(device):
            mode = MemSaveMode(devices=("cuda",))
            run_case(case, mode, PRECISIONS[precision][1], measure_backward=False)  # warm-up
            stock = _synchronises(case, precision, None)
            ours = _synchronises(case, precision, mode)
            rows.append({
                "family": case.family, "config": f"{precision} {case.config}".strip(), "stock": stock, "mode": ours,
                "problem": None if ours is None or ours == stock else f"the mode synchronises: {ours}",
            })
    return rows
