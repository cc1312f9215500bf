"""Short training runs of one small model, three ways: data-parallel (DDP), sharded (FSDP)
and a 2-stage pipeline. In each the loss must fall and every rank must end with the same
parameters.

DDP averages gradients with all_reduce, so after every step all replicas hold the same
bytes. A rank whose parameters differ computed or moved something wrongly without an
error: silent data corruption, which only this kind of check finds.

FSDP (torch's fully_shard) keeps 1/n of every parameter on each rank: each step all_gathers
the parameters for forward and backward and reduce_scatters the gradients. The pipeline
cuts the model in two stages; every rank runs stage 0 of its own pipeline and stage 1 of its
ring predecessor's, so every node sends activations forward and gradients back over a real
link, and the stages' gradients are averaged over all ranks (data parallel across the
pipelines). Both compute the same averaged gradient as DDP from the same per-rank batches,
so their parameters must also match DDP's to float rounding (`max_abs_diff_vs_ddp`).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from aidc.burnin.timing import sync

FEATURES, HIDDEN = 32, 64


@dataclass(frozen=True)
class TrainResult:
    steps: int
    loss_before: float  # on a fixed evaluation batch, identical on every rank
    loss_after: float
    step_losses: list[float] = field(default_factory=list)  # this rank's training-batch losses
    param_digest: str = ""  # sha256 of every parameter's bytes, in order
    mode: str = "ddp"  # ddp | fsdp | pipeline
    step_time_ms: float = 0.0  # mean wall time of one training step on this rank
    max_abs_diff_vs_ddp: float | None = None  # largest parameter difference from the DDP run's

    def to_dict(self) -> dict:
        return asdict(self)


def tiny_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, HIDDEN), torch.nn.Tanh(),
                               torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.Tanh(),
                               torch.nn.Linear(HIDDEN, 1))


def task(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fixed teacher (a random linear map) and a fixed evaluation batch."""
    gen = torch.Generator().manual_seed(seed + 10_000)
    teacher = torch.randn(FEATURES, 1, generator=gen) / FEATURES**0.5
    x_eval = torch.randn(256, FEATURES, generator=gen)
    return teacher, x_eval, x_eval @ teacher


def parameter_digest(model: torch.nn.Module) -> str:
    return tensors_digest(model.named_parameters())


def tensors_digest(named) -> str:
    h = hashlib.sha256()
    for name, p in named:
        h.update(name.encode())
        h.update(p.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def flip_one_bit(model: torch.nn.Module) -> None:
    """Lab fault injection: the lowest mantissa bit of one weight, as a flaky ALU would."""
    p = next(model.parameters())
    with torch.no_grad():
        flat = p.data.view(-1)
        as_int = flat[:1].view(torch.int32) if p.dtype == torch.float32 else None
        if as_int is None:
            raise ValueError("bit flip implemented for fp32 parameters")
        as_int ^= 1


def run_ddp_training(device: str, steps: int, seed: int = 2024, batch: int = 64,
                     on_step: Callable[[int, float], None] | None = None,
                     corrupt_after: bool = False, parameters_out: dict | None = None) -> TrainResult:
    """Run on every rank of the default process group (gloo on CPU, NCCL on GPU).

    `parameters_out`, when given, receives a copy of the trained parameters (before any
    injected corruption): the reference the FSDP and pipeline runs are compared with."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    rank = dist.get_rank()
    teacher, x_eval, y_eval = (t.to(device) for t in task(seed))
    model = tiny_model(seed).to(device)
    ddp = DDP(model, device_ids=[torch.device(device).index] if device.startswith("cuda") else None)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    loss_fn = torch.nn.MSELoss()
    with torch.no_grad():
        loss_before = float(loss_fn(model(x_eval), y_eval))
    gen = torch.Generator().manual_seed(seed * 1000 + rank)  # each rank its own data shard
    losses, clock = _fit(ddp, opt, loss_fn, teacher, gen, batch, device, steps, on_step)
    with torch.no_grad():
        loss_after = float(loss_fn(model(x_eval), y_eval))
    if parameters_out is not None:
        parameters_out.update({name: p.detach().clone() for name, p in model.named_parameters()})
    if corrupt_after:
        flip_one_bit(model)
    return TrainResult(steps, loss_before, loss_after, losses, parameter_digest(model), "ddp", clock.mean_ms())


def _fit(model, opt, loss_fn, teacher, gen, batch: int, device: str, steps: int,
         on_step: Callable[[int, float], None] | None) -> tuple[list[float], "_StepClock"]:
    """The training loop DDP and FSDP share: the same data, the same optimiser steps, timed."""
    losses, clock = [], _StepClock(device)
    for step in range(steps):
        with clock:
            x = torch.randn(batch, FEATURES, generator=gen).to(device)
            loss = loss_fn(model(x), x @ teacher)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        losses.append(float(loss.detach()))
        if on_step:
            on_step(step + 1, losses[-1])
    return losses, clock


class _StepClock:
    """Wall time per training step (after a device synchronisation on GPUs)."""

    def __init__(self, device: str):
        self.device, self.total, self.count = device, 0.0, 0

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        sync(self.device)
        self.total += time.perf_counter() - self.t0
        self.count += 1

    def mean_ms(self) -> float:
        return self.total / max(self.count, 1) * 1e3


def _max_diff(named, reference: dict | None) -> float | None:
    if not reference:
        return None
    return max(float((p.detach().to("cpu") - reference[name].to("cpu")).abs().max()) for name, p in named)


def run_fsdp_training(device: str, steps: int, seed: int = 2024, batch: int = 64,
                      on_step: Callable[[int, float], None] | None = None,
                      reference: dict | None = None) -> TrainResult:
    """The DDP run's model and data, sharded with fully_shard over every rank of the default group."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    rank, world = dist.get_rank(), dist.get_world_size()
    teacher, x_eval, y_eval = (t.to(device) for t in task(seed))
    model = tiny_model(seed).to(device)
    mesh = init_device_mesh(torch.device(device).type, (world,))
    # One unit for the whole (small) model: per step one all_gather for forward, one again for
    # backward (parameters are freed after forward) and one reduce_scatter of the gradients.
    # Wrapping each layer too would triple the collectives without testing anything new.
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = torch.nn.MSELoss()
    with torch.no_grad():
        loss_before = float(loss_fn(model(x_eval), y_eval))
    gen = torch.Generator().manual_seed(seed * 1000 + rank)  # the same shards as the DDP run
    losses, clock = _fit(model, opt, loss_fn, teacher, gen, batch, device, steps, on_step)
    with torch.no_grad():
        loss_after = float(loss_fn(model(x_eval), y_eval))
        # Every rank gathers the whole model: the ranks' copies of it must be the same bytes.
        full = [(name, p.full_tensor()) for name, p in model.named_parameters()]
    return TrainResult(steps, loss_before, loss_after, losses, tensors_digest(full), "fsdp", clock.mean_ms(),
                       _max_diff(full, reference))


def _exchange(send: torch.Tensor, to: int, recv: torch.Tensor, frm: int) -> None:
    """Send one tensor to a rank while receiving one from another (non-blocking both ways, so a
    ring of ranks doing this at once cannot deadlock)."""
    import torch.distributed as dist

    if to == dist.get_rank():  # one rank: both stages are here
        recv.copy_(send)
        return
    for work in dist.batch_isend_irecv([dist.P2POp(dist.isend, send, to), dist.P2POp(dist.irecv, recv, frm)]):
        work.wait()


def run_pipeline_training(device: str, steps: int, seed: int = 2024, batch: int = 64,
                          on_step: Callable[[int, float], None] | None = None,
                          reference: dict | None = None) -> TrainResult:
    """The DDP run's model cut into two stages, run as a ring of 2-stage pipelines (see the module
    docstring). `step_losses` are the losses stage 1 computed here (on the predecessor's batch)."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    nxt, prev = (rank + 1) % world, (rank - 1) % world
    teacher, x_eval, y_eval = (t.to(device) for t in task(seed))
    model = tiny_model(seed).to(device)
    stage0, stage1 = model[:2], model[2:]  # views sharing the model's parameters
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = torch.nn.MSELoss()
    with torch.no_grad():
        loss_before = float(loss_fn(model(x_eval), y_eval))
    gen = torch.Generator().manual_seed(seed * 1000 + rank)  # the same shards as the DDP run
    inbound = torch.empty(batch, HIDDEN + 1, device=device)  # activations and the batch's targets
    grad_back = torch.empty(batch, HIDDEN, device=device)
    params = list(model.parameters())
    losses, clock = [], _StepClock(device)
    for step in range(steps):
        with clock:
            x = torch.randn(batch, FEATURES, generator=gen).to(device)
            opt.zero_grad(set_to_none=False)
            act = stage0(x)
            _exchange(torch.cat([act.detach(), x @ teacher], dim=1), nxt, inbound, prev)
            act_in = inbound[:, :HIDDEN].clone().requires_grad_(True)
            # Mean over the global batch, as DDP's gradient averaging computes it.
            loss = loss_fn(stage1(act_in), inbound[:, HIDDEN:])
            (loss / world).backward()
            _exchange(act_in.grad.contiguous(), prev, grad_back, nxt)
            act.backward(grad_back)
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            dist.all_reduce(flat)
            offset = 0
            for p in params:
                p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
            opt.step()
        losses.append(float(loss.detach()))
        if on_step:
            on_step(step + 1, losses[-1])
    with torch.no_grad():
        loss_after = float(loss_fn(model(x_eval), y_eval))
    named = list(model.named_parameters())
    return TrainResult(steps, loss_before, loss_after, losses, tensors_digest(named), "pipeline", clock.mean_ms(),
                       _max_diff(named, reference))
