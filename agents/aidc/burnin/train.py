"""A short data-parallel training run: the loss must fall and every rank must end with
bit-identical parameters.

DDP averages gradients with all_reduce, so after every step all replicas hold the same
bytes. A rank whose parameters differ computed or moved something wrongly without an
error: silent data corruption, which only this kind of check finds.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

FEATURES, HIDDEN = 32, 64


@dataclass(frozen=True)
class TrainResult:
    steps: int
    loss_before: float  # on a fixed evaluation batch, identical on every rank
    loss_after: float
    step_losses: list[float] = field(default_factory=list)  # this rank's training-batch losses
    param_digest: str = ""  # sha256 of every parameter's bytes, in order

    def to_dict(self) -> dict:
        return asdict(self)


def tiny_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, HIDDEN), torch.nn.Tanh(),
                               torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.Tanh(),
                               torch.nn.Linear(HIDDEN, 1))


def _task(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fixed teacher (a random linear map) and a fixed evaluation batch."""
    gen = torch.Generator().manual_seed(seed + 10_000)
    teacher = torch.randn(FEATURES, 1, generator=gen) / FEATURES**0.5
    x_eval = torch.randn(256, FEATURES, generator=gen)
    return teacher, x_eval, x_eval @ teacher


def parameter_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in model.named_parameters():
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
                     corrupt_after: bool = False) -> TrainResult:
    """Run on every rank of the default process group (gloo on CPU, NCCL on GPU)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    rank = dist.get_rank()
    teacher, x_eval, y_eval = (t.to(device) for t in _task(seed))
    model = tiny_model(seed).to(device)
    ddp = DDP(model, device_ids=[torch.device(device).index] if device.startswith("cuda") else None)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    loss_fn = torch.nn.MSELoss()
    with torch.no_grad():
        loss_before = float(loss_fn(model(x_eval), y_eval))
    gen = torch.Generator().manual_seed(seed * 1000 + rank)  # each rank its own data shard
    losses = []
    for step in range(steps):
        x = torch.randn(batch, FEATURES, generator=gen).to(device)
        loss = loss_fn(ddp(x), x @ teacher)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if on_step:
            on_step(step + 1, losses[-1])
    with torch.no_grad():
        loss_after = float(loss_fn(model(x_eval), y_eval))
    if corrupt_after:
        flip_one_bit(model)
    return TrainResult(steps, loss_before, loss_after, losses, parameter_digest(model))
