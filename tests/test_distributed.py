"""MemSaveMode under distributed data parallel training on CPU: DDP and FSDP2, gloo backend.

Two processes train the same network on different data shards, once with stock PyTorch and
once under the mode. The mode only changes what backward nodes keep, so it must not change
anything the wrappers see: every gradient (after DDP's all-reduce, or FSDP2's
reduce-scatter, gathered back to the full tensor), every parameter and every buffer must be
bit-identical to the stock run's, after each step, and gradients and parameters must agree
across ranks. The mode's report and a saved-tensor measurement taken through the wrapper
show that it handled operators and kept fewer bytes, so the comparison cannot pass on a
network where the mode had nothing to do.

Each test spawns fresh processes (the interposer and the process group are process-wide
state); results come back as files, and a child's traceback becomes the test's failure
message. A child that hangs (a collective whose peer died) is killed at a deadline.
"""

from __future__ import annotations

import contextlib
import faulthandler
import multiprocessing
import socket
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from memsave_dispatch import MemSaveMode, audit
from memsave_dispatch.handlers import REBUILDS_AVAILABLE
from tests.support import assert_bit_identical
from tools.bench.models import SmallConvNet, freeze

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch built without gloo distributed support"
)

WORLD_SIZE = 2
STEPS = 3
BATCH, SIZE = 8, 16
LR, MOMENTUM = 0.1, 0.9
DEADLINE_S = 60  # whole spawn, both ranks: a hang fails the test instead of blocking the suite

class _NormThenLinear(torch.nn.Module):
    """A LayerNorm closing one FSDP unit and the linear layer reading its output in the next:
    the linear layer's input is rebuilt in backward from the LayerNorm's input and weight, a
    parameter FSDP2 frees after the first unit's forward and gathers again for its backward."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(3 * SIZE * SIZE, 32), torch.nn.LayerNorm(32)
        )
        self.head = torch.nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _conv_net(frozen: bool) -> torch.nn.Module:
    model = SmallConvNet(width=8, prompt_size=SIZE)
    if frozen:
        freeze(model)
    return model


# The input prompt makes gradients flow through the frozen backbone: that is where stock
# keeps activations no requested gradient needs. Without it, a frozen backbone records no
# graph at all and the mode would have nothing to handle.
CASES = {
    "frozen conv/BN": lambda: _conv_net(frozen=True),
    "all trainable": lambda: _conv_net(frozen=False),
    "LayerNorm, linear: two units": _NormThenLinear,
}


# -- what runs in each rank ------------------------------------------------------------------
def _wrap_ddp(model: torch.nn.Module) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model)


def _wrap_fsdp(model: torch.nn.Module) -> torch.nn.Module:
    """Shard the backbone and the head separately, then the root, as FSDP2 is meant to be
    used: forward and backward then all-gather and free parameters around each part, inside
    the mode."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    fully_shard(model.features, mesh=mesh)
    fully_shard(model.head, mesh=mesh)
    return fully_shard(model, mesh=mesh)


WRAPPERS = {"ddp": _wrap_ddp, "fsdp": _wrap_fsdp}


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2's sharded parameters and gradients) gathered to the full tensor; a
    plain tensor as is. Gathering is a collective: every rank calls it in the same order."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().clone()


def _shard(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's batch for this step: deterministic, and different on every rank."""
    generator = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(BATCH, 3, SIZE, SIZE, generator=generator)
    return x, torch.randint(0, 10, (BATCH,), generator=generator)


def _build(wrapper: str, case: str) -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial weights in both runs and on both ranks
    return WRAPPERS[wrapper](CASES[case]())


def _train(wrapper: str, case: str, rank: int, use_mode: bool) -> dict:
    """STEPS of SGD with momentum, the whole step (forward, backward, optimizer) inside the
    mode or not; returns the full gradients after each step and the final state."""
    model = _build(wrapper, case)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.SGD([p for _, p in trainable], lr=LR, momentum=MOMENTUM)
    mode = MemSaveMode()
    losses, grads = {}, {}
    for step in range(STEPS):
        x, y = _shard(rank, step)
        optimizer.zero_grad()
        with mode if use_mode else contextlib.nullcontext():
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
        losses[f"step {step}"] = loss.detach().clone()
        grads.update({f"step {step} {name}": _full(p.grad) for name, p in trainable})
    result = {
        "losses": losses,
        "grads": grads,
        "params": {name: _full(p) for name, p in model.named_parameters()},
        "buffers": {name: _full(b) for name, b in model.named_buffers()},
        "kept_bytes": _kept_bytes(model, rank, use_mode),
    }
    if use_mode:
        report = mode.report()
        result["report"] = {"handled": report.handled, "stock": report.stock_bytes, "kept": report.kept_bytes}
    return result


def _kept_bytes(model: torch.nn.Module, rank: int, use_mode: bool) -> int:
    """Bytes the graph of one forward pass through the wrapped model keeps for backward, read
    off the graph (saved-tensor hooks would change what the mode does).

    Runs on every rank (FSDP2's forward all-gathers parameters) and finishes with a backward
    pass, so the wrapper's per-iteration state is complete. Parameters and buffers are
    excluded as the tensors this rank holds (its local shard under FSDP2; the gathered full
    parameters FSDP2 frees after the forward count as empty storages)."""
    from torch.distributed.tensor import DTensor

    state = [t.to_local() if isinstance(t, DTensor) else t for t in (*model.parameters(), *model.buffers())]
    x, _ = _shard(rank, STEPS)
    with MemSaveMode() if use_mode else contextlib.nullcontext():
        out = model(x)
        kept = audit(out, exclude=state).total_bytes
        out.sum().backward()
    return kept


def _worker(rank: int, port: int, wrapper: str, case: str, out_dir: str) -> None:
    """Child entry point: train stock then under the mode, save the results, or the
    traceback, for the parent to read."""
    torch.set_num_threads(1)
    out = Path(out_dir)
    # A crash in native code leaves no Python traceback: record where each thread was.
    faulthandler.enable(open(out / f"rank{rank}.faults", "w"))
    try:
        dist.init_process_group(
            "gloo",
            rank=rank,
            world_size=WORLD_SIZE,
            init_method=f"tcp://127.0.0.1:{port}",
            timeout=timedelta(seconds=DEADLINE_S),
        )
        try:
            result = {
                "stock": _train(wrapper, case, rank, use_mode=False),
                "mode": _train(wrapper, case, rank, use_mode=True),
            }
        finally:
            dist.destroy_process_group()
        torch.save(result, out / f"rank{rank}.pt")
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


# -- the parent ----------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn(wrapper: str, case: str, out_dir: Path) -> list[dict]:
    """Run _worker on WORLD_SIZE fresh processes; return each rank's results, or fail with
    the first child's traceback. Stops every child as soon as one fails (its peers would
    wait in a collective) or the deadline passes."""
    context = multiprocessing.get_context("spawn")
    port = _free_port()
    processes = [
        context.Process(target=_worker, args=(rank, port, wrapper, case, str(out_dir)), daemon=True)
        for rank in range(WORLD_SIZE)
    ]
    for process in processes:
        process.start()
    deadline = time.monotonic() + DEADLINE_S
    timed_out = False
    try:
        while any(p.is_alive() for p in processes):
            if any(p.exitcode not in (None, 0) for p in processes):
                break
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.05)
    finally:
        killed = [rank for rank, process in enumerate(processes) if process.is_alive()]
        for rank in killed:
            processes[rank].kill()
        for process in processes:
            process.join(timeout=10)
    for rank in range(WORLD_SIZE):
        error = out_dir / f"rank{rank}.err"
        if error.exists():
            pytest.fail(f"rank {rank} failed:\n{error.read_text()}", pytrace=False)
    if timed_out:
        pytest.fail(f"the ranks were still running after {DEADLINE_S} s (a hang?) and were killed", pytrace=False)
    # a rank that died on its own first: the ones killed here only waited for it
    for rank in sorted(range(WORLD_SIZE), key=lambda rank: rank in killed):
        if processes[rank].exitcode != 0:
            faults = out_dir / f"rank{rank}.faults"
            where = faults.read_text() if faults.exists() else ""
            reported = (out_dir / f"rank{rank}.pt").exists()
            pytest.fail(
                f"rank {rank} exited with code {processes[rank].exitcode} "
                f"{'after' if reported else 'before'} reporting (see its stderr)\n{where}",
                pytrace=False,
            )
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]


def _assert_same(actual: dict, expected: dict, what: str, keys: tuple[str, ...]) -> None:
    """Bit-identical entries, for each of ``keys`` (each a dict of named tensors)."""
    for key in keys:
        assert actual[key].keys() == expected[key].keys(), f"{what}: {key}"
        for name in expected[key]:
            assert_bit_identical(actual[key][name], expected[key][name], f"{what}: {key}, {name}")


# FSDP2 frees the LayerNorm's gathered weight after its unit's forward, before the linear
# layer's input could be planned for a rebuild: that input is kept, as stock keeps it.
KEPT_AS_STOCK = {("fsdp", "LayerNorm, linear: two units")}
if not REBUILDS_AVAILABLE:  # nothing else to save in that network
    KEPT_AS_STOCK.add(("ddp", "LayerNorm, linear: two units"))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_mode_matches_stock_under_data_parallel(wrapper, case, tmp_path):
    ranks = _spawn(wrapper, case, tmp_path)

    for rank, result in enumerate(ranks):
        stock, mode = result["stock"], result["mode"]
        assert len(stock["losses"]) == STEPS and len(stock["grads"]) > 0
        # the mode changes nothing the wrapper sees: losses, gradients after every step,
        # parameters and BN running statistics at the end
        _assert_same(mode, stock, f"rank {rank}, mode vs stock", ("losses", "grads", "params", "buffers"))

        # ... and it did something: handled operators and kept fewer bytes, by its own report
        # and as measured through the wrapper
        report = mode["report"]
        assert report["handled"] > 0, report
        if (wrapper, case) in KEPT_AS_STOCK:
            assert report["kept"] == report["stock"], report
            assert mode["kept_bytes"] == stock["kept_bytes"], (mode["kept_bytes"], stock["kept_bytes"])
        else:
            assert report["kept"] < report["stock"], report
            assert mode["kept_bytes"] < stock["kept_bytes"], (mode["kept_bytes"], stock["kept_bytes"])

    # the ranks saw different data, yet hold the same synchronized gradients and parameters
    # (buffers stay per rank: BN running statistics follow each rank's own shard)
    first, second = ranks
    assert not torch.equal(first["stock"]["losses"]["step 0"], second["stock"]["losses"]["step 0"])
    for run in ("stock", "mode"):
        _assert_same(second[run], first[run], f"{run}: rank 1 vs rank 0", ("grads", "params"))
