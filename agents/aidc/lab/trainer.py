"""The lab's training job: a small data-parallel run that checkpoints every step.

Each elastic worker runs `train()`. Like torchtitan's loop it is a short sequence of
named steps; what it adds for the lab is bookkeeping the failover measurements need:
every completed step is logged with its time and membership, and every start records
which checkpoint it resumed from. Checkpoints are encrypted (`aidc.checkpoint`).

The optimizer update is a plain SGD step written out: `torch.optim` imports
`torch._dynamo` on first use (~2 s here), which would be paid again on every failover.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from aidc.checkpoint import BackgroundCheckpointWriter, CheckpointDir
from aidc.device.sim import SimBackend
from aidc.goodput import StepLog
from aidc.kms.local import LocalKeyring

IN_FEATURES, HIDDEN, LAYERS = 64, 384, 3


def build_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(IN_FEATURES, HIDDEN), nn.Tanh()]
    for _ in range(LAYERS - 1):
        layers += [nn.Linear(HIDDEN, HIDDEN), nn.Tanh()]
    layers.append(nn.Linear(HIDDEN, 1))
    return nn.Sequential(*layers)


def batch(seed: int, step: int, rank: int, size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic batch: inputs and the targets of a fixed random 'teacher' function."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 101 + rank)
    x = torch.randn(size, IN_FEATURES, generator=g)
    teacher = torch.Generator().manual_seed(seed)
    w = torch.randn(IN_FEATURES, 1, generator=teacher) / IN_FEATURES**0.5
    return x, torch.sin(3 * x @ w) + 0.5 * (x[:, :1] ** 2)


def _append(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _trace(lab: Path, node: str, what: str) -> None:
    """Timestamped phases of this worker's life, for the failover timeline."""
    with open(lab / "train" / f"trace-{node}.log", "a") as f:
        f.write(f"{time.time():.3f} pid={os.getpid()} {what}\n")


def train(cfg: dict) -> int:
    """Entry point of one worker. cfg: lab_dir, node, job, keyring, total_steps, checkpoint_every, seed, lr,
    checkpoint_mode ("async", the default, or "sync")."""
    lab = Path(cfg["lab_dir"])
    node = cfg["node"]
    (lab / "train").mkdir(parents=True, exist_ok=True)
    slurm_step = os.environ.get("SLURM_STEP_ID")
    _trace(lab, node, "worker started" + (f" in Slurm step {os.environ.get('SLURM_JOB_ID')}.{slurm_step} on"
                                           f" {os.environ.get('SLURMD_NODENAME')}, CUDA_VISIBLE_DEVICES="
                                           f"{os.environ.get('CUDA_VISIBLE_DEVICES')}" if slurm_step else ""))
    try:
        return _train(cfg, lab, node)
    except Exception as exc:
        _trace(lab, node, f"worker failed: {type(exc).__name__}: {str(exc)[:160]}")
        _finish_background_write()
        # Exit now. A normal exit after a peer died tears down the gloo process group and
        # DDP's reducer, which took ~9 s here; the elastic agent only needs the exit code,
        # and the last checkpoint is already on disk (atomic rename).
        sys.stderr.write(f"[{node}] worker failed: {exc}\n")
        sys.stderr.flush()
        os._exit(1)


def _wait_for_store_server(timeout_s: float = 30.0) -> None:
    """Ranks other than 0: wait until rank 0's worker listens on MASTER_ADDR:MASTER_PORT.

    The process group's store is a TCPStore that rank 0's worker starts; a rank that gets there
    first is refused, and TCPStore's client retries with a backoff that cost ~0.3-0.6 s of every
    failover (the workers of a new round start within milliseconds of each other, in any order).
    A plain connect every 10 ms finds the server as soon as it listens."""
    import socket

    if int(os.environ.get("RANK", "0")) == 0 or "MASTER_ADDR" not in os.environ:
        return
    address = (os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:  # bounded; past it, TCPStore's own retries and timeout apply
        try:
            socket.create_connection(address, timeout=1.0).close()
            return
        except OSError:
            time.sleep(0.01)


def _train(cfg: dict, lab: Path, node: str) -> int:
    torch.set_num_threads(1)
    _wait_for_store_server()
    dist.init_process_group("gloo", timeout=__import__("datetime").timedelta(seconds=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    members: list[str | None] = [None] * world
    dist.all_gather_object(members, node)
    _trace(lab, node, f"process group ready: rank {rank} of {world}")

    # Encrypted checkpoints, a fresh data key each, wrapped by the lab's keyring and bound to
    # the job and step. No fsync: the lab's failures are process deaths (the page cache
    # survives them); a real job on shared storage keeps save()'s default fsync.
    ckpt = CheckpointDir(lab / "checkpoints", job=cfg["job"], kms=LocalKeyring(cfg["keyring"]), keep=2, fsync=False)
    model = build_model(cfg["seed"])
    latest = ckpt.load_latest()
    start_step = 1
    if latest:
        step, state = latest
        model.load_state_dict(state["model"])
        start_step = step + 1
    _trace(lab, node, f"checkpoint loaded: resume at step {start_step}")
    ddp = DistributedDataParallel(model)
    _trace(lab, node, "DDP ready")
    # Rank 0 keeps the job's goodput step log (aidc.goodput, docs/goodput-steplog.md) and
    # writes checkpoints in the background unless told to write them in line.
    goodput = StepLog(lab / "train" / "goodput.jsonl", job=cfg["job"]) if rank == 0 else None
    mode = cfg.get("checkpoint_mode", "async")
    writer = None
    if goodput is not None and mode == "async":
        writer = BackgroundCheckpointWriter(ckpt, on_durable=lambda s, w: goodput.checkpoint_durable(s, w))
        _BACKGROUND_WRITERS.append(writer)
    device = SimBackend(lab / "nodes" / node)
    log = lab / "train" / "steps.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        _append(lab / "train" / "starts.jsonl", {
            "t": time.time(), "resumed_from": start_step - 1, "world": members,
            "restart_count": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)),
        })
        goodput.start(start_step - 1, world=members, restart_count=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)))

    for step in range(start_step, cfg["total_steps"] + 1):
        t0 = time.time()
        loss = train_step(ddp, device, cfg, step, rank)
        if rank == 0:
            t1 = time.time()
            goodput.step_done(step, t0, t1)
            if step % cfg["checkpoint_every"] == 0 or step == cfg["total_steps"]:
                c0 = time.time()
                state = {"step": step, "model": model.state_dict()}
                if writer is not None:
                    writer.save(step, state)
                else:
                    ckpt.save(step, state)
                goodput.checkpoint(step, c0, time.time(), mode)
            _append(log, {"step": step, "loss": loss, "t": time.time(), "world": members})
        if step == start_step:
            _trace(lab, node, f"first step done: {step}")

    if writer is not None:
        writer.wait()  # the last checkpoint is on disk before the job says it is done
    if rank == 0:
        goodput.end()
        (lab / "train" / "done.json").write_text(json.dumps({"t": time.time(), "steps": cfg["total_steps"]}))
    # A barrier before teardown: without it a rank sometimes aborts at exit
    # ("terminate called without an active exception") despite correct results.
    dist.barrier()
    dist.destroy_process_group()
    return 0


# This process's background checkpoint writers: a worker exiting on a peer's failure first
# lets a write in flight finish (milliseconds), so the step it holds is not lost with it.
_BACKGROUND_WRITERS: list[BackgroundCheckpointWriter] = []


def _finish_background_write(timeout_s: float = 10.0) -> None:
    for writer in _BACKGROUND_WRITERS:
        try:
            writer.wait(timeout_s)
        except Exception:  # the write failed: the previous checkpoint stands
            pass


def train_step(ddp: DistributedDataParallel, device: SimBackend, cfg: dict, step: int, rank: int) -> float:
    x, y = batch(cfg["seed"], step, rank)
    loss = nn.functional.mse_loss(ddp(x), y)
    loss.backward()  # DDP all-reduces the gradients here
    _straggle(ddp, device, x)
    with torch.no_grad():
        for p in ddp.parameters():
            p -= cfg["lr"] * p.grad
            p.grad = None
    return loss.detach().item()


def _straggle(ddp: DistributedDataParallel, device: SimBackend, x: torch.Tensor) -> None:
    """A simulated GPU with a slowdown factor really computes that much longer."""
    extra = device.compute_slowdown() - 1.0
    if extra <= 0:
        return
    with torch.no_grad():
        # forward+backward ~ 3 forwards: round the product, not the factor, so that a
        # slowdown of 1.5 adds work (round(0.5) would be 0) and 2.5 adds ~4.5 forwards, not 6
        for _ in range(round(3 * extra)):
            ddp.module(x)
