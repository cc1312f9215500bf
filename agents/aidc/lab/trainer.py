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
from aidc.files import SHARED_MODE, shared_opener, write_atomic
from aidc.goodput import StepLog
from aidc.health.stragglers import STEP_TIMES_FILE
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
    with open(path, "a", opener=shared_opener) as f:
        f.write(json.dumps(record) + "\n")


def _trace(lab: Path, node: str, what: str) -> None:
    """Timestamped phases of this worker's life, for the failover timeline."""
    with open(lab / "train" / f"trace-{node}.log", "a", opener=shared_opener) as f:
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
    # A member is its node, or with one rank per GPU (lab.ranks: gpu) "node/gpuN".
    member = node if cfg.get("gpu") is None else f"{node}/gpu{cfg['gpu']}"
    dist.all_gather_object(members, member)
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

    # The node's agent follows one step-time file per node: with a rank per GPU, GPU 0's rank keeps it.
    times_dir = lab / "nodes" / node if not cfg.get("gpu") else lab / "nodes" / node / "ranks" / f"gpu{cfg['gpu']}"
    step_times = StepTimeReport(times_dir / STEP_TIMES_FILE, node, rank, members)
    probe = cfg.get("link_probe")
    links = LinkProbe(rank, world, probe["rails"], probe["every"], probe.get("nbytes", 128 << 10)) if probe else None
    for step in range(start_step, cfg["total_steps"] + 1):
        t0 = time.time()
        loss = train_step(ddp, device, cfg, step, rank, step_times, links)
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
        write_atomic(lab / "train" / "done.json", json.dumps({"t": time.time(), "steps": cfg["total_steps"]}), SHARED_MODE)
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


def train_step(ddp: DistributedDataParallel, device: SimBackend, cfg: dict, step: int, rank: int,
               step_times: StepTimeReport | None = None, links: LinkProbe | None = None) -> float:
    """One step in two timed phases. Compute (forward, backward, a simulated slowdown) runs
    under `no_sync`, and the gradients are then all-reduced in one explicit collective, so the
    time this rank waits for the others is measured apart from its own work. In synchronous
    data-parallel every rank leaves that collective together: the slowest rank is the one that
    waits least. The same buffer carries every rank's phase times (see StepTimeReport), so each
    rank learns the fleet's figures without a collective of its own. Every `links.every` steps
    the step begins with the link probe (LinkProbe), outside both timed phases; its per-link
    times travel in the same buffer."""
    world = dist.get_world_size()
    link_s = links.measure(step) if links is not None else []
    # Compute is timed by the device's clock, as burn-in does: on a simulated GPU the thread's
    # CPU time (on this shared machine wall time would mostly measure the other processes);
    # on a GPU it would be CUDA events around the same phase.
    cpu_started = time.thread_time()
    x, y = batch(cfg["seed"], step, rank)
    with ddp.no_sync():
        loss = nn.functional.mse_loss(ddp(x), y)
        loss.backward()
    _straggle(ddp.module, device.compute_slowdown(), time.thread_time() - cpu_started, x)
    compute_s = time.thread_time() - cpu_started
    grads = [p.grad for p in ddp.parameters()]
    rails = links.rails if links is not None else 0
    timings = torch.zeros((2 + rails) * world, dtype=grads[0].dtype)  # seconds in float32: microseconds kept
    timings[rank] = compute_s
    timings[world + rank] = step_times.last_comm_s if step_times else 0.0
    for rail, seconds in enumerate(link_s):  # this rank's ring link (to rank + 1) on each rail
        timings[(2 + rail) * world + rank] = seconds
    flat = torch.cat([g.reshape(-1) for g in grads] + [timings])  # one collective, DDP's volume
    comm_started = time.perf_counter()
    dist.all_reduce(flat)
    comm_s = time.perf_counter() - comm_started
    offset = 0
    with torch.no_grad():
        for p, g in zip(ddp.parameters(), grads):
            p -= cfg["lr"] * (flat[offset:offset + g.numel()].view_as(g) / world)
            offset += g.numel()
            p.grad = None
    if step_times is not None:
        fleet_links = {str(r): flat[offset + (2 + r) * world:offset + (3 + r) * world].tolist() for r in range(rails)}
        step_times.record(step, flat[offset:offset + world].tolist(), flat[offset + world:offset + 2 * world].tolist(),
                          comm_s, fleet_links if link_s else None)
    return loss.detach().item()


class LinkProbe:
    """A per-link signal while training. In a ring all_reduce a slow link slows every rank's
    wait alike, so the compute/communication split cannot say whose link it is. Every `every`
    steps each rank times a small all_reduce with each ring neighbour over each rail: a 2-rank
    gloo group per (rail, ring pair), bound to that rail's interface, as burn-in's localisation
    (aidc.burnin.localise) builds them. Rank i reports the time of its link to rank i + 1; the
    agent names the node whose links to both neighbours on one rail are slow.

    Pairs run in colour order (even pairs, odd pairs, and the closing pair of an odd ring), so
    no rank waits on a pair whose other end is busy with a later one: no cycle, no deadlock. A
    tiny exchange first lines both ends up, so the timed one measures the link, not a partner
    still finishing its previous pair. A barrier over the job's group ends the probe, so no
    rank starts its compute late because of it (that would read as a late arrival)."""

    def __init__(self, rank: int, world: int, rails: int, every: int, nbytes: int, timeout_s: float = 30.0):
        from aidc.burnin.localise import rail_pair_group, ring_pairs

        self.rank, self.rails, self.every = rank, rails, max(1, int(every))
        pairs = ring_pairs(world)
        closing = len(pairs) - 1 if len(pairs) % 2 else None  # an odd ring's last pair gets a third colour
        self.mine = sorted(((2 if j == closing else j % 2), j, pair) for j, pair in enumerate(pairs) if rank in pair)
        store = dist.distributed_c10d._get_default_store()
        self.groups: dict[tuple[int, int], object] = {}
        for rail in range(rails):
            for _colour, j, pair in self.mine:
                self.groups[rail, j] = rail_pair_group(store, f"linkprobe/{rail}/{j}/", pair.index(rank),
                                                       f"rail{rail}", timeout_s)
        self.payload = torch.ones(max(1, nbytes // 4), dtype=torch.float32)
        self.sync = torch.ones(1, dtype=torch.float32)

    def measure(self, step: int) -> list[float]:
        """Per rail, the seconds of this rank's link to rank + 1 (its ring pair as leader); [] when
        this step has no probe."""
        if step % self.every:
            return []
        out = [0.0] * self.rails
        for rail in range(self.rails):
            for _colour, j, pair in self.mine:
                group = self.groups[rail, j]
                group.allreduce([self.sync]).wait()
                started = time.perf_counter()
                group.allreduce([self.payload]).wait()
                if pair[0] == self.rank:
                    out[rail] = time.perf_counter() - started
        dist.barrier()
        return out


class StepTimeReport:
    """This rank's record of every step's phase times, one JSON line per step in the node's
    directory (`<node_dir>/steptimes.jsonl`), which the node's agent follows (aidc.health.stragglers).

    Each line carries the whole fleet's compute times of that step and their communication
    times of the step before (a rank knows its own wait only after the collective that carries
    the figures): the agent judges its node against the fleet from its own node's file alone.
    """

    def __init__(self, path: Path, node: str, rank: int, members: list):
        self.path, self.node, self.rank, self.members = path, node, rank, members
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.last_comm_s = 0.0
        self._prev_compute: list[float] | None = None
        self._prev_links: dict[str, list[float]] | None = None

    def record(self, step: int, compute_s: list[float], prev_comm_s: list[float], comm_s: float,
               links_s: dict[str, list[float]] | None = None) -> None:
        """`links_s` (probe steps only): per rail, each rank's ring link time (rank i: i to i + 1)."""
        # Pair each step's compute with its own comm: the line for step s-1 is written now.
        if self._prev_compute is not None:
            line = {"step": step - 1, "t": time.time(), "node": self.node, "rank": self.rank,
                    "nodes": self.members, "compute_s": [round(v, 6) for v in self._prev_compute],
                    "comm_s": [round(v, 6) for v in prev_comm_s]}
            if self._prev_links:
                line["links_s"] = {r: [round(v, 6) for v in values] for r, values in self._prev_links.items()}
            _append(self.path, line)
        self._prev_compute, self.last_comm_s, self._prev_links = compute_s, comm_s, links_s


def _straggle(module, slowdown: float, compute_cpu_s: float, x: torch.Tensor, clock=time.thread_time,
              max_passes: int = 10_000) -> int:
    """A simulated GPU with a slowdown factor really computes that much longer: extra forward
    passes of real work until this thread has spent (factor - 1) x the step's compute CPU time
    more. CPU time, not wall time, so other processes on the machine do not change the work
    done; passes on a slice of the batch keep the overshoot small, so 1.1 adds ~10%, not a
    whole step. Returns the passes made (bounded)."""
    extra = (slowdown - 1.0) * compute_cpu_s
    if extra <= 0:
        return 0
    passes, begun, rows = 0, clock(), x[:16]
    with torch.no_grad():
        while clock() - begun < extra and passes < max_passes:
            module(rows)
            passes += 1
    return passes
