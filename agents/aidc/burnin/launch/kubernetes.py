"""The Kubernetes launcher: one Job per node, pinned to it, through the official client.

Each Job runs the node program (`python -m aidc.burnin.launch.node`) in the spec's burn-in image
(`kubernetes.burnin.image`, else `agent.image`: aidc with the `burnin` extra) on exactly one
node: a required node affinity on the node's name (`matchFields metadata.name`, as the
DaemonSet controller pins its pods), tolerating aidc's own quarantine taint (any effect), the
spare taint and a cordon, so a quarantined node can be recertified. The pod needs no API access
(no service account token) and asks for every GPU of the node.

The command hosts the run's rendezvous store (aidc.burnin.launch.store) on
`kubernetes.burnin.store_host` (else $POD_IP when it runs in a pod); the pods learn its address
from their environment and its secret key prefix from a Secret the run creates, never from the
Job (whoever may read Jobs may not read Secrets). Each pod learns its node from the downward API
(spec.nodeName), fetches that node's config from the store and puts back its raw results as
JSON; the command judges, certifies and signs them here, as the other launchers do. The Jobs and
the Secret are deleted when the run ends, whatever its end; a Job whose pod fails ends the run.
"""

from __future__ import annotations

import base64
import os
import secrets
import time

from aidc.burnin.launch import LaunchResult
from aidc.burnin.launch.node import ENV_JOB, ENV_NODE
from aidc.burnin.launch.slurm import ENV_SECRET, ENV_STORE, ENV_TIMEOUT, publish_configs
from aidc.errors import BurninError

RUN_LABEL = "aidc.dev/burnin-run"
NODE_ANNOTATION = "aidc.dev/burnin-node"  # node names may be longer than a label value
SECRET_KEY = "store-secret"
UNSCHEDULABLE_TAINT = "node.kubernetes.io/unschedulable"  # what a cordon puts on the node
# What the launcher does through the API, in `kubernetes.namespace`, and all it may do there
# (infra/aidc_infra/burnin.py renders them as the Role `aidc-burnin`).
RBAC_RULES = [{"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "list", "delete"]},
              {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create", "delete"]}]
POLL_S = 0.5
FINISHED_TTL_S = 3600  # a Job left behind by a command that was killed goes away on its own


def render_job(spec, node, *, run_id: str, index: int, store: str, secret_name: str, timeout_s: float) -> dict:
    """The batch/v1 Job that burns in `node` (a spec.Node) for run `run_id`."""
    from aidc.failover.kubernetes import QUARANTINE_TAINT, SPARE_TAINT

    labels = {RUN_LABEL: run_id, "app.kubernetes.io/name": "aidc-burnin", "app.kubernetes.io/managed-by": "aidc"}
    container = {
        "name": "burnin", "image": spec.kubernetes.burnin.image or spec.agent.image,
        "command": ["python", "-m", "aidc.burnin.launch.node"],
        "env": [{"name": ENV_NODE, "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                {"name": ENV_STORE, "value": store},
                {"name": ENV_SECRET, "valueFrom": {"secretKeyRef": {"name": secret_name, "key": SECRET_KEY}}},
                {"name": ENV_TIMEOUT, "value": str(timeout_s)},
                {"name": ENV_JOB, "value": run_id},
                {"name": "OMP_NUM_THREADS", "value": "1"}, {"name": "PYTHONUNBUFFERED", "value": "1"}],
    }
    volumes = []
    if spec.device_backend != "sim":  # the whole node: the device plugin hands the pod every GPU
        container["resources"] = {"limits": {"nvidia.com/gpu": str(node.gpus)}}
        # The storage check measures the checkpoint volume as the node mounts it (a node without
        # that directory never starts the pod, and the run times out naming the Job).
        path = spec.storage.checkpoints.mount_path
        container["volumeMounts"] = [{"name": "checkpoints", "mountPath": path}]
        volumes = [{"name": "checkpoints", "hostPath": {"path": path, "type": "Directory"}}]
    pod = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node.name]}]}]}}},
        "tolerations": [{"key": QUARANTINE_TAINT, "operator": "Exists"},
                        {"key": SPARE_TAINT, "operator": "Exists"},
                        {"key": UNSCHEDULABLE_TAINT, "operator": "Exists", "effect": "NoSchedule"}],
        "containers": [container],
        **({"volumes": volumes} if volumes else {}),
    }
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": f"{run_id}-{index}", "labels": labels, "annotations": {NODE_ANNOTATION: node.name}},
        "spec": {"backoffLimit": 0, "completions": 1, "parallelism": 1,
                 # The Job ends itself with the run, even if the command that watches it is gone.
                 "activeDeadlineSeconds": max(1, int(timeout_s) + 60), "ttlSecondsAfterFinished": FINISHED_TTL_S,
                 "template": {"metadata": {"labels": labels, "annotations": {NODE_ANNOTATION: node.name}},
                              "spec": pod}},
    }


def _store_host(spec) -> str:
    host = spec.kubernetes.burnin.store_host or os.environ.get("POD_IP")
    if not host:
        raise BurninError("kubernetes.burnin.store_host is not set: the address of this command the burn-in pods"
                          " reach (set POD_IP from the downward API when it runs in a pod)")
    return host


class KubernetesLauncher:
    name = "kubernetes"

    def run(self, spec, nodes, *, lab_dir, audit, progress, timeout_s, say, known_answers=None,
            soak_s: float = 0.0, tests=None) -> LaunchResult:
        from aidc.burnin import baseline, runner
        from aidc.burnin.answers import load_all
        from aidc.burnin.launch.store import JobStore
        from aidc.burnin.suite import select

        tests = select(tests)  # an unknown name is an error before any Job

        host = _store_host(spec)  # before anything is created
        if known_answers is None:  # read before the Jobs: a bad file is an error now, not after them
            known_answers = load_all(None)
        baselines = baseline.load(baseline.path_for(lab_dir))  # likewise: every node is held to its model's
        timeout_s += soak_s  # the soak is time asked for, not a hang
        started = time.monotonic()
        names = [n.name for n in nodes]
        run_id = f"aidc-burnin-{secrets.token_hex(4)}"
        node_dirs = runner.lab_node_dirs(spec, lab_dir) if spec.device_backend == "sim" else {}
        link_rate = runner.spec_link_rate_gbps(spec)
        jobs = _Jobs(spec, run_id)
        try:
            with JobStore(host, timeout_s) as store:
                publish_configs(store, spec, nodes, host, timeout_s=timeout_s, node_dirs=node_dirs, soak_s=soak_s,
                                tests=tests)
                jobs.create(nodes, f"{host}:{store.port}", store.secret, timeout_s)
                say(f"burn-in {run_id}: {len(nodes)} Job(s) in namespace {spec.kubernetes.namespace}")
                jobs.follow(started + timeout_s, timeout_s)
                raw = {}
                for name in names:
                    try:
                        raw[name] = store.get_json(f"result/{name}")
                    except BurninError as exc:
                        raise BurninError(f"node {name} ended without a result in burn-in {run_id} ({exc})") from None
        except BurninError as exc:
            runner.record_abort(audit, exc, names, timeout_s, {"name": self.name, "job_id": run_id})
            raise
        finally:
            jobs.delete()
        report = runner._judged_report(spec, nodes, raw, time.monotonic() - started, link_rate, all_nodes=nodes,
                                       known_answers=known_answers, baselines=baselines, tests=tests)
        if audit is not None:
            runner._certify(audit, report, {"name": self.name, "job_id": run_id})
        return LaunchResult(report, run_id)


class _Jobs:
    """The run's Jobs and Secret in the stack's namespace, through the official client."""

    def __init__(self, spec, run_id: str):
        self.spec, self.run_id = spec, run_id
        self.namespace = spec.kubernetes.namespace
        self.created: dict[str, str] = {}  # Job name -> node
        self.secret_created = False
        self._api = None

    def _client(self):
        if self._api is None:
            from aidc.failover.kubernetes import KubernetesError, api_client_from

            try:
                self._api = api_client_from(self.spec.kubernetes)
            except KubernetesError as exc:
                raise BurninError(str(exc)) from None
        return self._api

    def _call(self, what: str, fn, *args, **kwargs):
        from kubernetes.client.rest import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return fn(*args, **kwargs)
        except ApiException as exc:
            raise BurninError(f"Kubernetes refused to {what} ({exc.status} {exc.reason})") from None
        except (HTTPError, OSError) as exc:
            raise BurninError(f"Kubernetes could not be reached to {what}: {exc}") from None

    def create(self, nodes, store: str, secret: str, timeout_s: float) -> None:
        from kubernetes import client

        core, batch = client.CoreV1Api(self._client()), client.BatchV1Api(self._client())
        body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": self.run_id, "labels": {RUN_LABEL: self.run_id}},
                "data": {SECRET_KEY: base64.b64encode(secret.encode()).decode()}}
        self._call(f"create Secret {self.run_id}", core.create_namespaced_secret, self.namespace, body)
        self.secret_created = True
        for index, node in enumerate(nodes):
            job = render_job(self.spec, node, run_id=self.run_id, index=index, store=store, secret_name=self.run_id,
                             timeout_s=timeout_s)
            self._call(f"create Job {job['metadata']['name']}", batch.create_namespaced_job, self.namespace, job)
            self.created[job["metadata"]["name"]] = node.name

    def follow(self, deadline: float, timeout_s: float) -> None:
        """Until every Job has succeeded; the first that failed (or went missing) ends the run."""
        from kubernetes import client

        batch = client.BatchV1Api(self._client())
        while True:
            listed = self._call("list the burn-in Jobs", batch.list_namespaced_job, self.namespace,
                                label_selector=f"{RUN_LABEL}={self.run_id}")
            by_name = {j.metadata.name: j for j in listed.items}
            done = 0
            for name, node in self.created.items():
                job = by_name.get(name)
                if job is None:
                    raise BurninError(f"burn-in Job {name} (node {node}) was deleted while it ran")
                status = job.status
                failed = [c for c in (status.conditions if status else None) or []
                          if c.type == "Failed" and c.status == "True"]
                if failed or (status and status.failed):
                    why = f"{failed[0].reason}: {failed[0].message}" if failed else f"{status.failed} pod(s) failed"
                    raise BurninError(f"burn-in Job {name} (node {node}) failed ({why})")
                done += bool(status and status.succeeded)
            if done == len(self.created):
                return
            if time.monotonic() > deadline:
                raise BurninError(f"burn-in {self.run_id} timed out after {timeout_s:.0f} s with {done} of"
                                  f" {len(self.created)} Job(s) done (deleted)")
            time.sleep(POLL_S)

    def delete(self) -> None:
        """Delete the Jobs (their pods with them) and the Secret; best effort, each on its own."""
        if self._api is None:
            return
        from kubernetes import client

        batch, core = client.BatchV1Api(self._api), client.CoreV1Api(self._api)
        for name in list(self.created):
            try:
                self._call(f"delete Job {name}", batch.delete_namespaced_job, name, self.namespace,
                           propagation_policy="Background")
            except BurninError:
                continue  # activeDeadlineSeconds and the TTL end it anyway
        if self.secret_created:
            try:
                self._call(f"delete Secret {self.run_id}", core.delete_namespaced_secret, self.run_id, self.namespace)
            except BurninError:
                pass


LAUNCHER = KubernetesLauncher()
