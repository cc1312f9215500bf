"""One lab node's elastic agent: torchrun's LocalElasticAgent, with a warm worker pool.

This is torchrun (`torch.distributed.launcher.elastic_launch`, c10d rendezvous on an
external store) with two changes made at the smallest layer that works:

* Workers are forked from a forkserver that has already imported torch and the
  trainer. torchrun's CLI starts every worker as a fresh interpreter, so each failover
  paid a full `import torch` (~2-4 s on 2 cores) on every survivor and on the spare;
  here the spare and the survivors are warm.
* The rendezvous polls every 0.1 s instead of its hard-coded 1 s when it waits for
  other nodes (`dynamic_rendezvous._delay`, and the state holder's 1 s cache), so a new
  round forms as soon as it can.
* An agent stays in a newer round it finds itself a member of, instead of leaving it, and
  restarts its workers into it as soon as it sees it: on a quarantine the failover
  controller commits the next round (survivors and the spare,
  `failover.rendezvous.commit_next_round`), and each agent only has to read it. torch's own
  exit step would take each survivor out of that round again.

Run as `python -m aidc.lab.node_launcher --node NAME --lab-dir DIR --rdzv HOST:PORT ...`.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import sys
from pathlib import Path

from aidc.files import SHARED_MODE, shared_opener, write_atomic


def _fast_rendezvous_poll(poll_s: float) -> None:
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous

    original = dynamic_rendezvous._delay

    def delay(seconds):  # noqa: F811 - torch calls it with seconds= as a keyword
        # Only the fixed 1 s "wait for the others" poll is shortened; the randomised
        # start-up skew (a tuple) keeps its meaning.
        original(seconds=poll_s if seconds == 1 else seconds)

    dynamic_rendezvous._delay = delay
    # The state holder also serves a cached copy of the shared state for 1 s, so a
    # faster poll alone would still see changes once a second.
    holder = dynamic_rendezvous._BackendRendezvousStateHolder.__init__
    holder.__defaults__ = (poll_s,)


# The rendezvous round this launcher's agent last joined (one agent, one handler per launcher).
JOINED = {"round": -1}
# Where the agent's rendezvous phases go: the node's worker trace (lab/trainer.py's format), for
# the failover timeline (bench/lab_failover.py). None: not traced.
TRACE: dict[str, Path | None] = {"path": None}


def _trace(what: str) -> None:
    import time

    if TRACE["path"] is not None:
        with open(TRACE["path"], "a", opener=shared_opener) as f:
            f.write(f"{time.time():.3f} pid={os.getpid()} {what}\n")


def _stay_in_committed_rounds() -> None:
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous as dr

    joined = JOINED
    original_next, original_exit = dr.DynamicRendezvousHandler.next_rendezvous, dr._RendezvousExitOp.__call__

    def next_rendezvous(self):
        _trace("agent rendezvous started")
        info = original_next(self)
        joined["round"] = self._state_holder.state.round
        _trace(f"agent rendezvous done: round {joined['round']}, rank {info.rank} of {info.world_size}")
        return info

    def exit_op(self, ctx, deadline):
        state = ctx.state
        # A member of a complete round newer than the one it joined was put there by the
        # failover controller: that round is where it goes next, so there is nothing to leave.
        # (torch itself only ever adds a node to a round through that node's own join.)
        if state.complete and ctx.node in state.participants and state.round > joined["round"]:
            return dr._Action.FINISH
        return original_exit(self, ctx, deadline)

    original_waiting = dr.DynamicRendezvousHandler.num_nodes_waiting

    def num_nodes_waiting(self):
        # The agent asks this every monitor interval while its workers are healthy (a state
        # read it makes anyway); "someone waits" restarts its workers into the next round.
        # A round committed for this node is such a reason: its workers are about to fail on
        # the dead peer, and gloo's errors travel from rank to rank (~0.2 s a hop under load).
        waiting = original_waiting(self)
        state = self._state_holder.state
        if not waiting and state.complete and self._this_node in state.participants \
                and state.round > joined["round"]:
            _trace(f"agent restarts into committed round {state.round}")
            return 1
        return waiting

    dr.DynamicRendezvousHandler.next_rendezvous = next_rendezvous
    dr.DynamicRendezvousHandler.num_nodes_waiting = num_nodes_waiting
    dr._RendezvousExitOp.__call__ = exit_op


def _wait_at_gate(warm_marker: Path, gate: Path, timeout_s: float = 600) -> None:
    import time

    write_atomic(warm_marker, str(os.getpid()), SHARED_MODE)
    deadline = time.monotonic() + timeout_s
    while not gate.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"start gate {gate} did not open within {timeout_s:.0f} s")
        time.sleep(0.05)


def _wait_for_full_round(endpoint: str, run_id: str, nnodes: int, timeout_s: float = 600,
                         trusted_networks: list[str] = ()) -> None:
    # Which agent ends up on the redundancy list is otherwise a race; joining after the
    # first round is complete makes this one the spare, deterministically.
    import time

    from aidc.failover.rendezvous import read_state

    host, port = endpoint.rsplit(":", 1)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = read_state(host, int(port), run_id, trusted_networks=trusted_networks)
        if state is not None and state.complete and len(state.participants) >= nnodes:
            return
        time.sleep(0.1)
    raise SystemExit(f"no full rendezvous round of {nnodes} nodes within {timeout_s:.0f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--node", required=True)
    p.add_argument("--lab-dir", required=True)
    p.add_argument("--rdzv", required=True, help="HOST:PORT of the external rendezvous store")
    p.add_argument("--rdzv-trusted", action="append", default=[], metavar="CIDR",
                   help="a private network besides loopback where the rendezvous store may be (the lab fabric's"
                        " management network)")
    p.add_argument("--local-addr", default="127.0.0.1",
                   help="this node's address that the other nodes reach (its management address on the netns fabric)")
    p.add_argument("--run-id", default="aidc-lab")
    p.add_argument("--nnodes", type=int, required=True)
    p.add_argument("--total-steps", type=int, default=200)
    p.add_argument("--checkpoint-every", type=int, default=1)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--poll", type=float, default=0.1)
    p.add_argument("--checkpoint-mode", choices=("async", "sync"), default="async",
                   help="async: snapshot in memory, write in the background; sync: write before the next step")
    p.add_argument("--start-gate", help="Once warm, touch <lab>/nodes/<node>/warm and wait for this file to exist")
    p.add_argument("--gpu", type=int, default=None,
                   help="Train this one GPU of the node in a rank of its own (lab.ranks: gpu): pid, warm marker and"
                        " trace under nodes/<node>/ranks/gpu<N>/")
    p.add_argument("--spare", action="store_true",
                   help="Warm up now, join only once the first round is full (so this node is the spare)")
    args = p.parse_args(argv)

    # Checkpoints are encrypted under the lab's keyring: a missing or unreadable one is one
    # clear error now, not a failure in every worker the elastic agent restarts.
    from aidc.kms import KmsError
    from aidc.kms.local import LocalKeyring

    from aidc.nodenames import NodeNameError, node_dir

    try:
        LocalKeyring(Path(args.lab_dir) / "keyring")
        # The node's name builds its paths (pid file, trace, warm gate): only a name of the node
        # form, directly under nodes/.
        node_path = node_dir(Path(args.lab_dir) / "nodes", args.node)
        if args.gpu is not None:  # this GPU's rank: its own pid and warm marker (the rendezvous knows it by pid)
            node_path = node_path / "ranks" / f"gpu{args.gpu}"
            node_path.mkdir(parents=True, exist_ok=True)
    except (KmsError, NodeNameError) as exc:
        print(f"aidc: error: {exc}", file=sys.stderr)
        return 2

    # Who started this agent (the lab directly, or slurmstepd as a job step) does not know its
    # pid in advance under Slurm; the rendezvous knows nodes by it, and eviction matches on it.
    pid_file = node_path / "launcher.pid"
    write_atomic(pid_file, str(os.getpid()), SHARED_MODE)
    # The default shared store breaks after a membership change; keep it per round.
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ["AIDC_NODE"] = args.node
    if os.environ.get("AIDC_LAB_DEBUG"):
        logging.getLogger("torch.distributed.elastic.rendezvous.dynamic_rendezvous").setLevel(logging.DEBUG)
    logging.basicConfig(level=logging.INFO if os.environ.get("AIDC_LAB_DEBUG") else logging.WARNING, format=f"%(created).3f [{args.node} agent] %(levelname)s %(name)s %(message)s")

    # torch._dynamo is what DDP's constructor imports on first use (~800 modules, 2-9 s
    # here); preloading it keeps that off the failover path too.
    warm = ["torch", "torch.distributed", "torch._dynamo", "aidc.lab.trainer"]
    multiprocessing.set_forkserver_preload(warm)
    from multiprocessing import forkserver

    forkserver.ensure_running()  # warm now, not at the first (or the failover) round

    import importlib

    for module in warm:  # the agent itself too: its failure handling imports lazily
        importlib.import_module(module)
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from aidc.lab.trainer import train

    _fast_rendezvous_poll(args.poll)
    member = args.node if args.gpu is None else f"{args.node}-gpu{args.gpu}"
    TRACE["path"] = Path(args.lab_dir) / "train" / f"trace-{member}.log"
    TRACE["path"].parent.mkdir(parents=True, exist_ok=True)
    _stay_in_committed_rounds()
    if args.start_gate:
        _wait_at_gate(node_path / "warm", Path(args.start_gate))
    if args.spare:
        _wait_for_full_round(args.rdzv, args.run_id, args.nnodes, trusted_networks=args.rdzv_trusted)
    config = LaunchConfig(
        min_nodes=args.nnodes,
        max_nodes=args.nnodes,
        nproc_per_node=1,
        run_id=args.run_id,
        rdzv_backend="c10d",
        rdzv_endpoint=args.rdzv,
        # The store lives outside every agent (is_host=false): killing any node,
        # rank 0's included, must not take the rendezvous with it.
        # Heartbeats are compare-and-set writes of the whole rendezvous state: at 1 s on 2
        # busy cores they collided with the write that completes a round (seen: 14 s of
        # retries) and a starved spare was declared dead. Failover tells the rendezvous
        # about quarantined nodes directly, so expiry only matters for unplanned deaths.
        rdzv_configs={"is_host": False, "join_timeout": 300, "last_call_timeout": 1,
                      "keep_alive_interval": 3, "keep_alive_max_attempt": 3},
        max_restarts=100,  # each failover spends one restart on every survivor
        monitor_interval=0.1,
        start_method="forkserver",
        local_addr=args.local_addr,
    )
    cfg = {"lab_dir": args.lab_dir, "node": args.node, "job": args.run_id,
           "keyring": str(Path(args.lab_dir) / "keyring"), "total_steps": args.total_steps,
           "checkpoint_every": args.checkpoint_every, "seed": args.seed, "lr": args.lr,
           "checkpoint_mode": args.checkpoint_mode, "gpu": args.gpu}
    try:
        elastic_launch(config, train)(cfg)
    except Exception as exc:  # reported by the lab from the exit code and the step log
        print(f"[{args.node} agent] job ended with {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
