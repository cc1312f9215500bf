"""The lab's processes: simulated nodes, their agents, the controller and the training job.

Everything the lab starts is recorded in `<lab>/lab.json` (name, pid, process group,
node), so `aidc lab down` can stop it from another shell, and so the lab scheduler
can stop a whole node. The `aidc lab run` process itself is recorded as the lab's owner
(pid and start time) from the moment the lab is created: during burn-in nothing else is
running yet, and a second run must not take that for an idle lab. Each process gets its own process group; a node's groups are
also listed in `nodes/<node>/pgids.json` for the scheduler.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from aidc.device import sim
from aidc.errors import AidcError
from aidc.failover.scheduler import LabScheduler
from aidc.files import SHARED_MODE, shared_opener, touch, write_atomic
from aidc.nodenames import node_dir
from aidc.polling import free_port
from aidc.process import same_process_alive, start_ticks
from aidc.spec import ClusterSpec

RUN_ID = "aidc-lab"

# What aidc commands other than `aidc lab run` write at the top of a lab directory: `aidc burnin
# run` (nodes/, audit.db and its companions, fabric.json, known_answers.yaml), `aidc failover`
# (state.db, lease/), `aidc kms` (keyring/), `aidc lab fabric`. A directory holding only these
# (and no lab.json) is a lab in the making, replaced like an old lab.
_SQLITE_COMPANIONS = ("", "-wal", "-shm", "-journal", ".anchor", ".anchor.lock", ".signing")
AIDC_LAB_ENTRIES = frozenset({"lab.json", "nodes", "keyring", "lease", "fabric.json", "known_answers.yaml",
                              *(db + suffix for db in ("audit.db", "state.db") for suffix in _SQLITE_COMPANIONS)})
# Kept when a lab is replaced: the answers an operator recorded on purpose (`--record-known-answers`).
KEPT_ENTRIES = frozenset({"known_answers.yaml"})


class LabError(AidcError):
    """The lab could not be brought up or did not complete its loop."""

    exit_code = 1


class LabCluster:
    def __init__(self, spec: ClusterSpec, lab_dir: str | os.PathLike, say=print):
        self.spec = spec
        self.dir = Path(lab_dir).resolve()
        self.manifest = self.dir / "lab.json"
        self.nodes = spec.nodes()
        self.say = say
        self.fabric = None  # set by bring_up_fabric()

    # -- layout -------------------------------------------------------------------
    def create(self, owned: bool = False) -> None:
        """Lay out a new lab. `owned`: this process drives it (`aidc lab run`) and is recorded
        as its owner until `disown()`, so the lab counts as running from the first moment."""
        if self.manifest.exists() and self.running():
            raise LabError(f"a lab is already running in {self.dir}: run `aidc lab down --lab-dir {self.dir}` first")
        if self.dir.exists():
            if not self.dir.is_dir():
                raise LabError(f"--lab-dir {self.dir} is a file, not a directory")
            # A new lab replaces an old one, or what aidc's other commands left in a lab
            # directory, and nothing else: never delete a directory that is not a lab (`--lab-dir .`
            # by mistake).
            foreign = sorted(p.name for p in self.dir.iterdir() if p.name not in AIDC_LAB_ENTRIES)
            if not self.manifest.exists() and foreign:
                raise LabError(f"--lab-dir {self.dir} is not empty and holds no lab (no lab.json) but "
                               f"{', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}: refusing to "
                               "delete it; choose a new or empty directory")
            import shutil

            # Entry by entry, so what is kept never leaves the directory (a crash here loses nothing kept).
            for entry in self.dir.iterdir():
                if entry.name in KEPT_ENTRIES:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        (self.dir / "logs").mkdir(parents=True)
        for i, node in enumerate(self.nodes):
            sim.create_node(self.node_dir(node.name), node.name, node.gpus, node_index=i,
                            rails=self.spec.fabric.rails, link_speed_gbps=self.spec.fabric.link_speed_gbps)
            if self.ranks_per_gpu:  # a rank per GPU: the lab scheduler may take one GPU out (its rank)
                for gpu in range(node.gpus):
                    (self.node_dir(node.name) / "ranks" / f"gpu{gpu}").mkdir(parents=True)
        ports = {"rdzv": free_port(), "metrics:failover": free_port(),
                 **{f"metrics:{n.name}": free_port() for n in self.nodes}}
        owner = {"name": "lab-run", "pid": os.getpid(), "start": start_ticks(os.getpid())} if owned else None
        # `ranks` (lab.ranks, maybe from `aidc lab run --ranks`): the controller's lab scheduler
        # reads it to count the job's members (aidc.failover.backends).
        self._write({"created_at": time.time(), "ports": ports, "processes": [], "run_id": RUN_ID, "owner": owner,
                     "ranks": self.spec.lab.ranks})

    def bring_up_fabric(self) -> None:
        """The stack's netns fabric (a namespace per node, a shaped bridge per rail), or None:
        loopback, also where namespaces cannot be made (said in one line). `stop()` removes it."""
        from aidc.lab import fabric

        self.fabric = fabric.ensure(self.spec, self.dir, say=self.say)

    def disown(self) -> None:
        """The driving run is over (what it kept up is recorded in `processes`)."""
        if self.manifest.exists():
            data = self.info()
            data["owner"] = None
            self._write(data)

    def node_dir(self, node: str) -> Path:
        return node_dir(self.dir / "nodes", node)

    @property
    def store_path(self) -> Path:
        return self.dir / "state.db"

    @property
    def audit_path(self) -> Path:
        return self.dir / "audit.db"

    def info(self) -> dict:
        return json.loads(self.manifest.read_text())

    def _write(self, data: dict) -> None:
        write_atomic(self.manifest, json.dumps(data, indent=1), SHARED_MODE)

    def port(self, name: str) -> int:
        return self.info()["ports"][name]

    # -- processes ----------------------------------------------------------------
    @property
    def ranks_per_gpu(self) -> bool:
        """lab.ranks: gpu, one training rank per GPU (else one per node)."""
        return self.spec.lab.ranks == "gpu"

    def members(self, node) -> list[str]:
        """The training members a node brings: itself, or (lab.ranks: gpu) `node/gpuN` per GPU."""
        return [f"{node.name}/gpu{g}" for g in range(node.gpus)] if self.ranks_per_gpu else [node.name]

    def start(self, name: str, argv: list[str], node: str | None = None, workload: bool = False,
              netns: str | None = None, env: dict[str, str] | None = None, gpu: int | None = None) -> subprocess.Popen:
        """Start a lab process in its own group. A node's *workload* is what quarantine stops.

        `netns`: in that network namespace (`ip netns exec` execs the command: same pid)."""
        log = open(self.dir / "logs" / f"{name}.log", "ab", opener=shared_opener)
        if netns:
            argv = ["ip", "netns", "exec", netns, *argv]
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=self.dir, env={**os.environ, **env} if env else None)
        log.close()
        data = self.info()
        data["processes"].append({"name": name, "pid": proc.pid, "pgid": proc.pid, "node": node})
        self._write(data)
        if node and workload:
            LabScheduler(self.dir).add_process_group(node, proc.pid, gpu)
        if node:
            where = self.node_dir(node) if gpu is None else LabScheduler(self.dir).rank_dir(node, gpu)
            write_atomic(where / f"{name.split(':')[0]}.pid", str(proc.pid), SHARED_MODE)
        return proc

    def aidc(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "aidc", *args]

    # The training runs on the fabric: launchers in their node's namespace, gloo over the rails,
    # the rendezvous store on the management bridge. (Slurm's job steps start in the root
    # namespace: that lab trains on loopback.)
    trains_on_fabric = True

    @property
    def training_fabric(self):
        return self.fabric if self.trains_on_fabric else None

    def start_rendezvous_store(self) -> subprocess.Popen:
        fab = self.training_fabric
        if fab is None:
            return self.start("rdzv-store", [sys.executable, "-m", "aidc.lab.rdzv_store", "--port",
                                             str(self.port("rdzv"))])
        # Recorded for the processes of the root namespace that talk to it (the controller's eviction).
        data = self.info()
        data["rendezvous"] = {"host": fab.store_addr, "netns": fab.switch_ns, "trusted": [fab.mgmt_cidr]}
        self._write(data)
        return self.start("rdzv-store", [sys.executable, "-m", "aidc.lab.rdzv_store", "--host", fab.store_addr,
                                         "--port", str(self.port("rdzv"))], netns=fab.switch_ns)

    def read_rendezvous_state(self):
        """The training's rendezvous state (torch's), read where the store is, or None."""
        from aidc.failover.rendezvous import read_state

        return _at_rendezvous(self.info(), lambda host, port, trusted: read_state(
            host, port, self.info()["run_id"], trusted_networks=trusted))

    def start_agent(self, node: str) -> subprocess.Popen:
        a = self.spec.agent
        return self.start(f"agent:{node}", self.aidc(
            "agent", "run", "--node", node, "--backend", "sim", "--node-dir", str(self.node_dir(node)),
            "--kernel-log", str(self.node_dir(node) / sim.KERNEL_LOG), "--store", str(self.store_path),
            "--audit-db", str(self.audit_path), "--listen-address", f"127.0.0.1:{self.port(f'metrics:{node}')}",
            "--poll-interval", str(a.poll_interval_s), "--device-timeout", str(a.device_timeout_s),
            "--checkpoint-path", str(self.dir),
            "--straggler-window", str(self.spec.policy.stragglers.window_steps),
            "--straggler-tolerance", str(self.spec.policy.stragglers.tolerance)), node=node)

    def start_controller(self, stack: str) -> subprocess.Popen:
        # Its metrics and probes on loopback, for a Prometheus scraping the lab (PromStack's
        # controller_ports); a lab made before the port was recorded runs without them.
        port = self.info()["ports"].get("metrics:failover")
        return self.start("failover", self.aidc("failover", "run", "--stack", stack, "--state-dir", str(self.dir),
                                                *(["--listen-address", f"127.0.0.1:{port}"] if port else [])))

    def start_trainer(self, node: str, spare: bool = False, gpu: int | None = None) -> subprocess.Popen:
        """The node's elastic agent; with lab.ranks: gpu, one per GPU (`gpu` None: all of them,
        the first one returned)."""
        if self.ranks_per_gpu and gpu is None:
            count = next(n.gpus for n in self.nodes if n.name == node)
            return [self.start_trainer(node, spare, g) for g in range(count)][0]
        lab = self.spec.lab
        primaries = sum(len(self.members(n)) for n in self.nodes if not n.spare)
        fab = self.training_fabric
        store, local = (fab.store_addr, fab.nodes[node].mgmt_addr) if fab else ("127.0.0.1", "127.0.0.1")
        return self.start(f"launcher:{node}" + (f".gpu{gpu}" if gpu is not None else ""), [
            sys.executable, "-m", "aidc.lab.node_launcher", "--node", node, "--lab-dir", str(self.dir),
            "--rdzv", f"{store}:{self.port('rdzv')}", *(["--rdzv-trusted", fab.mgmt_cidr] if fab else []),
            "--local-addr", local, "--run-id", RUN_ID,
            "--nnodes", str(primaries),
            "--total-steps", str(lab.train_steps), "--checkpoint-every", str(lab.checkpoint_every),
            "--start-gate", str(self.start_gate), *(["--spare"] if spare else []),
            *(["--gpu", str(gpu)] if gpu is not None else [])], node=node, workload=True, gpu=gpu,
            netns=fab.nodes[node].netns if fab else None,
            env={"GLOO_SOCKET_IFNAME": ",".join(fab.ifnames)} if fab else None)

    def restart_trainer(self, node: str, spare: bool = True) -> subprocess.Popen:
        """Start a node's elastic agent again (after a release); its old process groups are gone."""
        (self.node_dir(node) / "pgids.json").unlink(missing_ok=True)
        for groups in (self.node_dir(node) / "ranks").glob("gpu*/pgids.json"):
            groups.unlink()
        return self.start_trainer(node, spare=spare)

    @property
    def start_gate(self) -> Path:
        return self.dir / "train" / "go"

    def warm_nodes(self) -> list[str]:
        """Nodes whose elastic agents are all warm (with a rank per GPU: every GPU's)."""
        if self.ranks_per_gpu:
            return [n.name for n in self.nodes
                    if all((self.node_dir(n.name) / "ranks" / f"gpu{g}" / "warm").exists() for g in range(n.gpus))]
        return [n.name for n in self.nodes if (self.node_dir(n.name) / "warm").exists()]

    def launcher_pids(self, node: str, gpu: int | None = None) -> set[int]:
        return launcher_pids(self.node_dir(node), gpu)

    def open_start_gate(self) -> None:
        self.start_gate.parent.mkdir(parents=True, exist_ok=True)
        touch(self.start_gate)

    def _foreign_owner(self, data: dict) -> dict | None:
        """The `aidc lab run` process that owns this lab, when it is alive and not this process."""
        owner = data.get("owner")
        if not owner or owner["pid"] == os.getpid() or not same_process_alive(owner["pid"], owner.get("start")):
            return None
        return owner

    def running(self) -> list[dict]:
        data = self.info()
        procs = [p for p in data.get("processes", []) if _alive(p["pid"])]
        owner = self._foreign_owner(data)
        slurm = [{"name": f"slurm:{p['name']}", "pid": p["pid"], "pgid": None, "node": None}
                 for p in self._local_slurm(data).processes()] if data.get("slurm") else []
        return ([{"name": owner["name"], "pid": owner["pid"], "pgid": None, "node": None}] if owner else []) + procs + slurm

    @staticmethod
    def _local_slurm(data: dict):
        """The lab's private Slurm as recorded in lab.json (`aidc lab run --scheduler slurm`)."""
        from aidc.lab.slurm_cluster import LocalSlurm

        return LocalSlurm(data["slurm"]["root"], [])

    def stop(self, names_prefix: str = "", timeout_s: float = 10.0) -> int:
        """Stop the lab's processes (whole process groups): TERM, then KILL after the timeout.

        Returns how many were still running. Stopped entries leave lab.json, so a later
        `down` never signals a process group whose number has been reused since."""
        data = self.info()
        owner = self._foreign_owner(data) if not names_prefix else None
        if owner:
            # Another shell's `aidc lab run` (maybe still burning in): SIGTERM makes it clean up
            # what it started, as Ctrl-C would. Only its pid: its group is the user's shell job.
            try:
                os.kill(owner["pid"], signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        listed = [p for p in data["processes"] if p["name"].startswith(names_prefix)]
        procs = [p for p in listed if _alive(p["pid"])]
        for p in procs:
            _signal_group(p["pgid"], signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(_alive(p["pid"]) for p in procs):
            time.sleep(0.1)
        for p in procs:
            _signal_group(p["pgid"], signal.SIGKILL)
        for p in procs:  # reap our own children so none is left a zombie
            try:
                os.waitpid(p["pid"], os.WNOHANG)
            except ChildProcessError:
                pass
        if owner:
            while time.monotonic() < deadline and same_process_alive(owner["pid"], owner.get("start")):
                time.sleep(0.1)
        data = self.info()  # again: processes may have been recorded meanwhile
        stopped = {p["pid"] for p in listed}
        data["processes"] = [p for p in data["processes"] if p["pid"] not in stopped]
        self._write(data)
        slurm_stopped = 0
        if data.get("slurm") and not names_prefix:
            # After the owner: a run stopping itself cancels its job first. Jobs, then daemons,
            # then any job task left over, each by PID (LocalSlurm.stop).
            slurm_stopped = len(self._local_slurm(data).stop())
        if not names_prefix:  # last: nothing of the lab runs inside its namespaces any more
            from aidc.lab import fabric

            fabric.teardown(self.dir)
        return len(procs) + (1 if owner else 0) + slurm_stopped


def _alive(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return False
    except ChildProcessError:
        pass
    return same_process_alive(pid, None)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def launcher_pids(where: Path, gpu: int | None = None) -> set[int]:
    """The pids the rendezvous knows a node's elastic agents by (their launcher.pid files): its
    one agent, or one GPU's, or (lab.ranks: gpu, `gpu` None) every GPU's."""
    files = [where / "launcher.pid"] if gpu is None else [where / "ranks" / f"gpu{gpu}" / "launcher.pid"]
    if gpu is None and (where / "ranks").is_dir():
        files = sorted((where / "ranks").glob("gpu*/launcher.pid"))
    return {int(f.read_text()) for f in files if f.exists()}


def evict_from_rendezvous(lab_dir: Path, node: str, world_size: int | None = None, gpu: int | None = None) -> None:
    """Tell the lab's rendezvous at once that `node` is gone: with `world_size`, commit the
    next round with a warm spare in its place (`commit_next_round`; the lab's launchers stay
    in a round committed for them); where that does not apply, expire its heartbeat."""
    from aidc.failover.rendezvous import commit_next_round, evict

    where = node_dir(lab_dir / "nodes", node)
    pids = launcher_pids(where, gpu)  # the node's agent(s), or one GPU's (`gpu`)
    if not pids:
        return
    info = json.loads((lab_dir / "lab.json").read_text())
    started = time.time()
    committed = None
    if world_size:
        committed = _at_rendezvous(info, lambda host, port, trusted: commit_next_round(
            host, port, info["run_id"], world_size, pids=pids, trusted_networks=trusted))
    expired = [] if committed else _at_rendezvous(info, lambda host, port, trusted: evict(
        host, port, info["run_id"], pids=pids, trusted_networks=trusted))
    # Kept beside the node for the failover timeline (and the audit report).
    write_atomic(where / ("rendezvous-evicted.json" if gpu is None else f"rendezvous-evicted-gpu{gpu}.json"), json.dumps(
        {"at": started, "took_s": time.time() - started, "expired": expired, "committed": committed}), SHARED_MODE)


def _at_rendezvous(info: dict, call):
    """call(host, port, trusted_networks) where the lab's rendezvous store can be reached: on
    loopback, or from inside the fabric's switch namespace (on a thread; this one stays put)."""
    where = info.get("rendezvous")
    if not where:
        return call("127.0.0.1", info["ports"]["rdzv"], ())
    from aidc.lab.fabric import in_netns

    return in_netns(where["netns"], lambda: call(where["host"], info["ports"]["rdzv"], where["trusted"]))


def lab_scheduler(lab_dir: str | os.PathLike, world_size: int | None = None) -> LabScheduler:
    """The lab's scheduler backend, wired to tell the rendezvous at once about a quarantine
    (`world_size`: the job's members, nodes or GPU ranks, to commit the next round directly)."""
    lab_dir = Path(lab_dir)
    return LabScheduler(lab_dir, on_quarantine=lambda node: evict_from_rendezvous(lab_dir, node, world_size),
                        on_quarantine_gpu=lambda node, gpu: evict_from_rendezvous(lab_dir, node, world_size, gpu))
