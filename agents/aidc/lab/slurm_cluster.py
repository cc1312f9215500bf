"""A private, real Slurm on this machine: its own munged, one slurmctld, one slurmd per node.

The lab (`aidc lab run --scheduler slurm`) and the tests use it to run aidc against the real
daemons, never the system's: every file (munge key and socket, slurm.conf, gres.conf, state,
spool, logs, PID files) lives under one directory (the Unix sockets under a short one in /tmp,
see `sockets`), every port is a free one picked at start,
and every daemon is stopped by the PID it wrote. This Slurm build has MULTIPLE_SLURMD, so each
lab node is a `slurmd -N <node>` of its own with its own port on 127.0.0.1.

Simulated GPUs are GRES `gpu` backed by character devices made here (`mknod c 1 3`, the same
device as /dev/null): Slurm wants a device file behind each GPU, and hands out indices through
CUDA_VISIBLE_DEVICES exactly as it would on a GPU node.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from aidc.errors import AidcError
from aidc.files import SHARED_MODE, refuse_link, shared_opener, write_atomic
from aidc.polling import free_port
from aidc.process import same_process_alive, start_ticks

DAEMONS = ("munged", "slurmctld", "slurmd")


class SlurmLabError(AidcError):
    """The private Slurm could not be started (or its packages are missing)."""

    exit_code = 1


def missing_packages() -> list[str]:
    """Which of Slurm's daemons and client tools are not installed (`make system-deps`)."""
    needed = ["munged", "slurmctld", "slurmd", "scontrol", "sinfo", "squeue", "sbatch", "srun", "scancel"]
    return [name for name in needed if not _which(name)]


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")


@dataclass(frozen=True)
class SlurmNode:
    name: str
    gpus: int
    cpus: int = 2
    features: tuple[str, ...] = ()  # slurm.conf Features= (e.g. to place a job's batch script)


class LocalSlurm:
    """Start, query and stop one private Slurm cluster rooted at `root`."""

    def __init__(self, root: str | os.PathLike, nodes: list[SlurmNode], cluster_name: str = "aidclab",
                 partition: str = "gpu"):
        self.root = Path(root).resolve()
        self.nodes = list(nodes)
        self.cluster_name = cluster_name
        self.partition = partition
        self.conf = self.root / "etc" / "slurm.conf"
        self.manifest = self.root / "slurm.json"
        self.jobcomp = self.root / "log" / "jobcomp.txt"  # finished jobs, for `sacct -c`
        # Unix socket paths are limited to 107 bytes, and slurmd names each step's socket
        # `<spool>/<node>_<job>.<step>` (a batch step is 4294967291): under a deep root (pytest's
        # tmp_path) they no longer fit and steps fail to start. So the sockets (munged's, and the
        # slurmd spool directories that hold them) live in a short directory named after the root.
        self.sockets = Path(tempfile.gettempdir()) / f"aidc-slurm-{hashlib.sha1(str(self.root).encode()).hexdigest()[:10]}"

    # -- what clients need --------------------------------------------------------
    def env(self) -> dict[str, str]:
        """The environment Slurm's client tools need to reach this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(argv), env=self.env(), capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise SlurmLabError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def node_states(self) -> dict[str, str]:
        """`sinfo`'s long state per node (idle, allocated, drained, down*, ...)."""
        out = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout
        return dict(line.split(None, 1) for line in out.splitlines() if " " in line)

    # -- lifecycle ------------------------------------------------------------------
    def start(self, timeout: float = 60) -> None:
        missing = missing_packages()
        if missing:
            raise SlurmLabError(f"Slurm is not installed (missing {', '.join(missing)}): run `make system-deps`")
        if os.geteuid() != 0:
            # slurmd starts each job step as the submitting user, which takes root.
            raise SlurmLabError("a private Slurm needs root (slurmd launches job steps as their user)")
        self._lay_out()
        self._start_munged()
        self._start("slurmctld", [_which("slurmctld"), "-D", "-f", str(self.conf)], "slurmctld")
        for node in self.nodes:
            self._start(f"slurmd:{node.name}", [_which("slurmd"), "-D", "-f", str(self.conf), "-N", node.name],
                        f"slurmd.{node.name}")
        self.wait_states({n.name: "idle" for n in self.nodes}, timeout)

    def wait_states(self, wanted: dict[str, str], timeout: float = 30) -> dict[str, str]:
        """Wait until every named node shows exactly the wanted `sinfo` state."""
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            self._check_daemons_alive()
            states = self.node_states()
            if all(states.get(n) == s for n, s in wanted.items()):
                return states
            time.sleep(0.2)
        raise SlurmLabError(f"Slurm nodes did not reach {wanted} within {timeout:.0f} s; now {states} "
                            f"(logs in {self.root / 'log'})")

    def stop(self) -> list[str]:
        """Cancel every job, then stop every daemon this cluster started, by PID. Idempotent."""
        if not self.manifest.exists():
            return []
        stopped = []
        if self.conf.exists() and self._alive("slurmctld"):
            self.run("scancel", "--full", "--partition", self.partition, check=False)
            # Steps stop with their job; give slurmd a moment to reap them before it goes.
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
                time.sleep(0.2)
        info = self._info()
        # slurmd first (it owns the job steps), munged last (everyone else authenticates with it).
        order = sorted(info["daemons"].items(), key=lambda kv: (kv[0] == "munged", kv[0] == "slurmctld"))
        for name, proc in order:
            if _daemon_alive(proc):
                _stop_pid(proc["pid"])
                stopped.append(name)
        for pid in self._step_daemons():
            _stop_pid(pid)
            stopped.append(f"slurmstepd:{pid}")
        # Job tasks whose slurmstepd went before them (a killed slurmd, a stop mid-cancel).
        for proc in self.processes():
            _stop_pid(proc["pid"])
            stopped.append(f"{proc['name']}:{proc['pid']}")
        info["daemons"] = {}
        self._write(info)
        shutil.rmtree(self.sockets, ignore_errors=True)
        return stopped

    def stop_daemon(self, name: str) -> None:
        """Stop one daemon (`slurmctld`, `slurmd:<node>`), e.g. to test aidc while it is down."""
        proc = self._info()["daemons"].get(name)
        if proc and _daemon_alive(proc):
            _stop_pid(proc["pid"])

    def start_daemon(self, name: str, timeout: float = 30) -> None:
        """Start one stopped daemon again with the same configuration and state."""
        if name == "slurmctld":
            self._start("slurmctld", [_which("slurmctld"), "-D", "-f", str(self.conf)], "slurmctld")
            deadline = time.monotonic() + timeout
            while self.run("scontrol", "ping", check=False).returncode != 0:
                self._check_daemons_alive()
                if time.monotonic() > deadline:
                    raise SlurmLabError(f"slurmctld did not answer within {timeout:.0f} s")
                time.sleep(0.1)
        elif name.startswith("slurmd:"):
            node = name.split(":", 1)[1]
            self._start(name, [_which("slurmd"), "-D", "-f", str(self.conf), "-N", node], f"slurmd.{node}")
        else:
            raise ValueError(f"unknown daemon {name!r}")

    def running(self) -> bool:
        return self.manifest.exists() and any(
            _daemon_alive(p) for p in self._info()["daemons"].values())

    def processes(self) -> list[dict]:
        """Every live process of this cluster: its daemons, slurmstepd, and job tasks with their
        children (all of which carry this cluster's SLURM_CONF in their environment)."""
        daemons = {p["pid"]: name for name, p in self._info()["daemons"].items()
                   if _daemon_alive(p)}
        found = [{"name": name, "pid": pid} for pid, name in daemons.items()]
        mark = f"SLURM_CONF={self.conf}".encode()
        for pid in _pids_with_environ(mark):
            if pid not in daemons and pid != os.getpid():
                found.append({"name": _comm(pid) or "?", "pid": pid})
        return found

    # -- internals ------------------------------------------------------------------
    def _lay_out(self) -> None:
        for sub in ("etc", "munge", "state", "log", "run", "dev"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.sockets.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        if not refuse_link(key).exists():  # chmod below would follow a link too
            write_atomic(key, os.urandom(1024), 0o400)
        os.chmod(key, 0o400)
        hostname = socket.gethostname().split(".")[0]
        ctld_port = free_port()
        lines = [
            "# Written by aidc.lab.slurm_cluster: a private Slurm on one machine. Do not edit.",
            f"ClusterName={self.cluster_name}",
            f"SlurmctldHost={hostname}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.sockets / 'munge.socket'}",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.sockets / '%n'}",
            f"SlurmctldPidFile={self.root / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'run' / 'slurmd.%n.pid'}",
            f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'log' / 'slurmd.%n.log'}",
            # No cgroups here: processes are tracked by process group, tasks are not bound.
            "ProctrackType=proctrack/pgid",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "ReturnToService=2",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "GresTypes=gpu",
            "AccountingStorageType=accounting_storage/none",
            # Job accounting without a slurmdbd: each finished job is a line in this file, which
            # `sacct -c` reads (burn-in jobs show there; Slurm 22.05, Debian 12's, still has -c).
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={self.jobcomp}",
            # Node sizes are what we declare, not what this 2-core machine has.
            "SlurmdParameters=config_overrides",
            "SlurmdTimeout=300",
            "InactiveLimit=0",
            "KillWait=5",
            "MinJobAge=60",
            "MessageTimeout=10",
        ]
        gres = []
        for node in self.nodes:
            port = free_port()
            lines.append(f"NodeName={node.name} NodeAddr=127.0.0.1 NodeHostname={hostname} Port={port} "
                         f"CPUs={node.cpus} RealMemory=1024 Gres=gpu:{node.gpus} State=UNKNOWN"
                         + (f" Features={','.join(node.features)}" if node.features else ""))
            devices = []
            for i in range(node.gpus):
                dev = self.root / "dev" / f"{node.name}-gpu{i}"
                if not dev.exists():
                    os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 3))
                devices.append(str(dev))
            gres.append(f"NodeName={node.name} Name=gpu File={','.join(devices)}")
        names = ",".join(n.name for n in self.nodes)
        lines.append(f"PartitionName={self.partition} Nodes={names} Default=YES MaxTime=INFINITE State=UP")
        write_atomic(self.conf, "\n".join(lines) + "\n", SHARED_MODE)
        write_atomic(self.root / "etc" / "gres.conf", "\n".join(gres) + "\n", SHARED_MODE)
        if not self.manifest.exists():
            self._write({"conf": str(self.conf), "daemons": {}})

    def _start_munged(self) -> None:
        m = self.root / "munge"
        self._start("munged", [_which("munged"), "--foreground", "--force", f"--socket={self.sockets / 'munge.socket'}",
                               f"--key-file={m / 'munge.key'}", f"--pid-file={m / 'munged.pid'}",
                               f"--log-file={self.root / 'log' / 'munged.log'}", f"--seed-file={m / 'munged.seed'}"],
                    "munged")
        deadline = time.monotonic() + 10
        while not (self.sockets / "munge.socket").exists():
            self._check_daemons_alive()
            if time.monotonic() > deadline:
                raise SlurmLabError(f"munged did not create its socket (see {self.root / 'log' / 'munged.log'})")
            time.sleep(0.05)

    def _start(self, name: str, argv: list[str], log_name: str) -> None:
        with open(self.root / "log" / f"{log_name}.out", "ab", opener=shared_opener) as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, env={**os.environ, "SLURM_CONF": str(self.conf)})
        info = self._info()
        info["daemons"][name] = {"pid": proc.pid, "start": start_ticks(proc.pid)}
        self._write(info)

    def _check_daemons_alive(self) -> None:
        for name, proc in self._info()["daemons"].items():
            if not _daemon_alive(proc):
                log = name.replace(":", ".").split(".")[0]
                raise SlurmLabError(f"{name} exited during start-up; see {self.root / 'log'}/{log}*")

    def _alive(self, name: str) -> bool:
        proc = self._info()["daemons"].get(name)
        return bool(proc) and _daemon_alive(proc)

    def _step_daemons(self) -> list[int]:
        """slurmstepd processes of this cluster (they outlive a killed slurmd)."""
        return [pid for pid in _pids_with_environ(f"SLURM_CONF={self.conf}".encode())
                if (_comm(pid) or "").startswith("slurmstepd")]

    def _info(self) -> dict:
        try:
            return json.loads(self.manifest.read_text())
        except (FileNotFoundError, ValueError):
            return {"conf": str(self.conf), "daemons": {}}

    def _write(self, data: dict) -> None:
        write_atomic(self.manifest, json.dumps(data, indent=1), SHARED_MODE)


def _pids_with_environ(entry: bytes) -> list[int]:
    """Processes whose environment holds exactly this `NAME=value` entry."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if entry in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:  # gone meanwhile, or a kernel thread
            continue
    return found


def _daemon_alive(proc: dict) -> bool:
    """Whether a recorded daemon ({pid, start}) still runs: same process, not exited."""
    return same_process_alive(proc["pid"], proc.get("start")) and not _exited(proc["pid"])


def _exited(pid: int) -> bool:
    """Gone, or a zombie: it has exited and only waits for a parent (maybe one that never reaps,
    such as a container's PID 1, or the process that started it, still running elsewhere)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] == ["Z"]


def _comm(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def _stop_pid(pid: int, grace_s: float = 5.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # not our child: poll for its exit instead
            done = pid if _exited(pid) else 0
        if done:
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
