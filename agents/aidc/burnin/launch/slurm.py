"""The Slurm launcher: the burn-in is ONE job, so Slurm's accounting shows it.

`srun` asks for the named nodes whole (`--exclusive`, `--nodelist`, one task per node, the
spec's `slurm.burnin.partition`/`reservation`) and runs the node program on each
(`python -m aidc.burnin.launch.node`) with the stack's device backend. The
command hosts the run's rendezvous store (aidc.burnin.launch.store) on
`slurm.burnin.store_host` (127.0.0.1 for a Slurm on this machine); its address and secret
reach the tasks in the job's environment, never on a command line (`ps`, `sacct`'s SubmitLine).
Each task fetches its own node's config from the store by its SLURMD_NODENAME and puts back its
raw results as JSON; the command then judges, certifies and signs them here, as the lab does.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from aidc.burnin.launch import LaunchResult
from aidc.burnin.launch.store import JobStore
from aidc.burnin.rundir import run_directory
from aidc.errors import BurninError
from aidc.files import private_opener

JOB_NAME = "aidc-burnin"
ENV_STORE = "AIDC_BURNIN_STORE"    # host:port of the run's store
ENV_SECRET = "AIDC_BURNIN_SECRET"  # its key prefix
ENV_TIMEOUT = "AIDC_BURNIN_TIMEOUT_S"
NODE_COMMAND = [sys.executable, "-m", "aidc.burnin.launch.node"]  # the same install path on every node
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _scheduler(spec):
    from aidc.failover.slurm import SlurmScheduler

    return SlurmScheduler.from_spec(spec)


def srun_argv(spec, names: list[str], node_command: list[str]) -> list[str]:
    """One job over exactly `names`, whole nodes, one task each, every GPU of the node (the tool
    by name: `slurm.bin_dir` or PATH resolves it when the job starts)."""
    settings = spec.slurm.burnin
    gpus = max(n.gpus for n in spec.nodes() if n.name in names)
    return [
        "srun", f"--job-name={JOB_NAME}", f"--nodes={len(names)}", f"--ntasks={len(names)}", "--ntasks-per-node=1",
        f"--nodelist={','.join(names)}", "--exclusive", f"--gres=gpu:{gpus}",
        # One node's program dying would leave the others waiting in a collective: end them all.
        "--kill-on-bad-exit=1",
        *([f"--partition={settings.partition}"] if settings.partition else []),
        *([f"--reservation={settings.reservation}"] if settings.reservation else []),
        *node_command]


def publish_configs(store, spec, nodes, host: str, *, timeout_s: float, node_dirs: dict, soak_s: float,
                    tests: tuple[str, ...] | None = None) -> None:
    """Each node's config under `config/<node>` in the run's store, where its task fetches it by name
    (`tests`: the burn-in tests every node runs, aidc.burnin.suite; None: all)."""
    from aidc.burnin import runner
    from aidc.burnin.suite import select

    names = [n.name for n in nodes]
    for rank, node in enumerate(nodes):
        cfg = {**runner.node_config(spec, node, rank, names, timeout_s=timeout_s,
                                    node_dir=node_dirs.get(node.name), soak_s=soak_s, tests=select(tests)),
               **runner._fabric_config(spec, None, node.name, names),
               "store_host": host, "store_port": store.port}
        if host not in LOOPBACK:  # across machines: gloo's interface is the one its host name names
            cfg["gloo_ifnames"] = ""
        store.put_json(f"config/{node.name}", cfg)


class SlurmLauncher:
    name = "slurm"

    def run(self, spec, nodes, *, lab_dir, audit, progress, timeout_s, say, known_answers=None,
            soak_s: float = 0.0, tests=None) -> LaunchResult:
        from aidc.burnin import baseline, runner
        from aidc.burnin.answers import load_all
        from aidc.burnin.suite import select

        tests = select(tests)  # an unknown name is an error before the job

        if known_answers is None:  # read before the job: a bad file is an error now, not after it
            known_answers = load_all(None)
        baselines = baseline.load(baseline.path_for(lab_dir))
        timeout_s += soak_s  # the soak is time asked for, not a hang
        started = time.monotonic()
        names = [n.name for n in nodes]
        host = spec.slurm.burnin.store_host or "127.0.0.1"
        # Simulated nodes (the lab's Slurm) keep their state under the lab directory, as in the lab.
        node_dirs = runner.lab_node_dirs(spec, lab_dir) if spec.device_backend == "sim" else {}
        link_rate = runner.spec_link_rate_gbps(spec)
        policy = spec.policy.burnin
        sizes = runner.sweep_sizes(policy.allreduce_min_bytes, policy.allreduce_max_bytes)
        bar = runner._progress(progress, nodes=len(nodes), repeats=policy.repeats, sizes=sizes,
                               train_steps=policy.train_steps)
        job = _Job(spec, names)
        try:
            with JobStore(host, timeout_s) as store, run_directory("slurm") as tmp:
                publish_configs(store, spec, nodes, host, timeout_s=timeout_s, node_dirs=node_dirs, soak_s=soak_s,
                                tests=tests)
                job.start(Path(tmp), {ENV_STORE: f"{host}:{store.port}", ENV_SECRET: store.secret,
                                      ENV_TIMEOUT: str(timeout_s)})
                job.follow(store, bar, started + timeout_s, timeout_s)
                raw = {}
                for name in names:
                    try:
                        raw[name] = store.get_json(f"result/{name}")
                    except BurninError as exc:
                        raise BurninError(f"node {name} ended without a result in job {job.job_id} ({exc}):"
                                          f" {job.log_tail()}") from None
        except BurninError as exc:
            runner.record_abort(audit, exc, names, timeout_s, {"name": self.name, "job_id": job.job_id})
            raise
        finally:
            job.stop()
            if bar:
                bar.stop()
        report = runner._judged_report(spec, nodes, raw, time.monotonic() - started, link_rate, all_nodes=nodes,
                                       known_answers=known_answers, baselines=baselines, tests=tests)
        if audit is not None:
            runner._certify(audit, report, {"name": self.name, "job_id": job.job_id})
        return LaunchResult(report, job.job_id)


class _Job:
    """The srun that holds the job: its progress lines, its job id, its end."""

    def __init__(self, spec, names: list[str]):
        self.spec, self.names = spec, names
        self.proc: subprocess.Popen | None = None
        self.job_id: str | None = None
        self.events: queue.Queue = queue.Queue()
        self.log: Path | None = None

    def start(self, tmp: Path, secret_env: dict[str, str]) -> None:
        from aidc.burnin.runner import _worker_env

        env = {**_worker_env(), **secret_env}  # this package first on PYTHONPATH, one thread per task
        if self.spec.slurm.conf:
            env["SLURM_CONF"] = self.spec.slurm.conf
        env.pop("GLOO_SOCKET_IFNAME", None)  # the node program sets it from its config
        self.log = tmp / "srun.log"
        with open(self.log, "wb", opener=private_opener) as log:
            argv = _scheduler(self.spec)._argv(srun_argv(self.spec, self.names, NODE_COMMAND))
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=log, env=env, start_new_session=True)
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()

    def _read(self, stream) -> None:
        from aidc.burnin.worker import PREFIX

        with stream:
            for raw in stream:
                line = raw.decode(errors="replace").rstrip("\n")
                if line.startswith(PREFIX):
                    try:
                        self.events.put(json.loads(line[len(PREFIX):]))
                    except json.JSONDecodeError:
                        continue

    def follow(self, store, bar, deadline: float, timeout_s: float) -> None:
        from aidc.burnin import runner

        while True:
            self._learn_job_id(store)
            runner.next_event(self.events, 0.2, bar)
            code = self.proc.poll()
            if code is not None and self.events.empty():
                self._learn_job_id(store)
                if code != 0:
                    raise BurninError(f"burn-in job {self.job_id or '(not started)'} failed (srun exit code {code}):"
                                      f" {self.log_tail()}")
                return
            if time.monotonic() > deadline:
                raise BurninError(f"burn-in job {self.job_id or '(still pending)'} timed out after {timeout_s:.0f} s"
                                  " (cancelled)")

    def _learn_job_id(self, store) -> None:
        """The job's id, from the first task to start (srun prints it only when asked to be verbose)."""
        if self.job_id is None and store.store.check([f"job/{self.names[0]}"]):
            self.job_id = str(store.get_json(f"job/{self.names[0]}").get("job_id"))

    def log_tail(self, chars: int = 1500) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:].strip() or "(no output)"
        except (OSError, AttributeError):
            return "(no log)"

    def stop(self) -> None:
        """Cancel the job if it still runs: scancel by id, and srun's own cancel (two SIGINTs)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        if self.job_id:
            sched = _scheduler(self.spec)
            subprocess.run(sched._argv(["scancel", self.job_id]), env=sched._env(), capture_output=True,
                           timeout=sched.command_timeout_s, check=False)
        for _ in range(2):
            try:
                self.proc.send_signal(signal.SIGINT)
            except ProcessLookupError:
                return
            time.sleep(0.5)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


LAUNCHER = SlurmLauncher()
