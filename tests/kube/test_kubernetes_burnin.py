"""Burn-in through Kubernetes: one Job per node, pinned to it, tolerating aidc's quarantine, created
and read back through the official client; the nodes' results come back over the run's store and
are certified where the command runs.

No cluster runs here: the test API server (fake_apiserver.py) stores the Jobs, and `Kubelet`
plays the job controller and the kubelet. It schedules a Job's pod only onto the node it is
pinned to and only if the pod tolerates that node's taints, runs the pod's command with the
environment the pod spec gives it (the downward API's node name, the Secret's key), and writes
the Job's status from the program's exit code.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading

import kubernetes_validate
import pytest
import yaml

from aidc.audit.log import AuditLog
from aidc.errors import BurninError
from aidc.spec import parse_spec
from tests.kube.test_k8s_cli import kubeconfig

NAMESPACE = "aidc-system"
POLICY = {"fleet_tolerance": 0.95, "gemm_size": 64, "repeats": 1, "memcpy_bytes": 1 << 20,
          "allreduce_min_bytes": 4096, "allreduce_max_bytes": 8192, "train_steps": 5, "min_busbw_fraction": 0.0,
          "busbw_fleet_tolerance": 0.99, "storage_bytes": 1 << 20, "storage_files": 5, "storage_tolerance": 0.99}


def k8s_spec(tmp_path, url="http://127.0.0.1:1", backend="sim", **burnin):
    return {"name": "k8sburn", "device_backend": backend, "scheduler": "kubernetes",
            "node_pools": [{"name": "gpu", "count": 3, "gpu_model": "SIM", "gpus_per_node": 2, "spares": 1}],
            "agent": {"device_timeout_s": 2.0}, "policy": {"burnin": POLICY},
            "kubernetes": {"kubeconfig": str(kubeconfig(tmp_path / "kubeconfig", url)),
                           "burnin": {"store_host": "127.0.0.1", **burnin}}}


def tolerated(tolerations: list[dict], taint: dict) -> bool:
    """The API's rule: key equal (or operator Exists with no key), value equal unless Exists, effect
    equal unless the toleration names none."""
    for t in tolerations:
        if t.get("key") not in (None, taint["key"]):
            continue
        if t.get("operator", "Equal") == "Equal" and t.get("value") != taint.get("value"):
            continue
        if t.get("effect") in (None, "", taint["effect"]):
            return True
    return False


def pinned_node(pod_spec: dict) -> str | None:
    terms = pod_spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    names = [set(f["values"]) for term in terms for f in term.get("matchFields", [])
             if f["key"] == "metadata.name" and f["operator"] == "In"]
    return next(iter(names[0])) if len(names) == 1 and len(names[0]) == 1 else None


class Kubelet:
    """The job controller and the kubelet for the test API server (see the module's docstring)."""

    def __init__(self, api, *, run_pods: bool = True, fail: frozenset[str] = frozenset()):
        self.api, self.run_pods, self.fail = api, run_pods, fail
        self.seen: dict[str, str | None] = {}  # Job -> the node its pod ran on (None: unschedulable)
        self.procs: list[subprocess.Popen] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)

    def _loop(self):
        while not self._stop.wait(0.1):
            for job in self.api.job_list(NAMESPACE):
                name = job["metadata"]["name"]
                if name not in self.seen:
                    self.seen[name] = self._schedule(job)

    def _schedule(self, job) -> str | None:
        pod = job["spec"]["template"]["spec"]
        node = pinned_node(pod)
        if node is None or node not in self.api.nodes:
            return None
        current = self.api.node(node)
        taints = list(current["spec"].get("taints", []))
        if current["spec"].get("unschedulable"):  # what the node lifecycle controller adds to a cordoned node
            taints.append({"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"})
        if not all(tolerated(pod.get("tolerations", []), t) for t in taints):
            return None  # Pending for ever, as the scheduler leaves it
        if node in self.fail:
            self.api.set_job_status(NAMESPACE, job["metadata"]["name"], failed_status())
            return node
        if self.run_pods:
            threading.Thread(target=self._run, args=(job, pod, node), daemon=True).start()
        return node

    def _run(self, job, pod, node):
        (container,) = pod["containers"]
        env = {"PATH": os.environ["PATH"], "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
               # The image installs aidc; here the worktree's package stands in for it.
               "PYTHONPATH": os.path.join(os.path.dirname(__file__), "..", "..", "agents")}
        for var in container.get("env", []):
            source = var.get("valueFrom") or {}
            if "value" in var:
                env[var["name"]] = var["value"]
            elif source.get("fieldRef", {}).get("fieldPath") == "spec.nodeName":
                env[var["name"]] = node
            elif "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                secret = self.api.secret(NAMESPACE, ref["name"])
                env[var["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
            else:
                raise AssertionError(f"the kubelet stand-in cannot resolve {var}")
        argv = [sys.executable if container["command"][0] == "python" else container["command"][0],
                *container["command"][1:]]
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        code = proc.wait(timeout=600)
        self.api.set_job_status(NAMESPACE, job["metadata"]["name"], succeeded_status() if code == 0 else failed_status())


def succeeded_status():
    return {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}


def failed_status():
    return {"failed": 1, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                         "message": "Job has reached the specified backoff limit"}]}


# -- the Job's shape -------------------------------------------------------------------------------

@pytest.mark.parametrize("node,backend", [("gpu-0", "sim"), ("gpu-spare-0", "nvml"), ("gpu-2", "nvml")])
def test_each_nodes_job_is_valid_pinned_to_it_and_tolerates_aidcs_quarantine_and_a_cordon(tmp_path, node, backend):
    from aidc.burnin.launch.kubernetes import render_job
    from aidc.failover.kubernetes import QUARANTINE_TAINT

    spec = parse_spec(k8s_spec(tmp_path, backend=backend))
    job = render_job(spec, next(n for n in spec.nodes() if n.name == node), run_id="aidc-burnin-0a1b2c3d",
                     index=1, store="10.0.0.5:4242", secret_name="aidc-burnin-0a1b2c3d", timeout_s=300)
    kubernetes_validate.validate(job, "1.33", strict=True)
    pod = job["spec"]["template"]["spec"]
    assert pinned_node(pod) == node
    for effect in ("NoSchedule", "NoExecute"):
        assert tolerated(pod["tolerations"], {"key": QUARANTINE_TAINT, "value": "XID_79", "effect": effect})
    assert tolerated(pod["tolerations"], {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"})
    assert not tolerated(pod["tolerations"], {"key": "example.com/other", "effect": "NoSchedule"})
    assert pod["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] == 0
    assert pod["automountServiceAccountToken"] is False  # the node program needs no API access
    (container,) = pod["containers"]
    # the default: Dockerfile.burnin's image (torch), not the agent's
    assert container["image"] == spec.kubernetes.burnin.image != spec.agent.image
    env = {v["name"]: v for v in container["env"]}
    assert env["AIDC_BURNIN_NODE"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["AIDC_BURNIN_SECRET"]["valueFrom"]["secretKeyRef"]["name"] == "aidc-burnin-0a1b2c3d"
    assert env["AIDC_BURNIN_STORE"]["value"] == "10.0.0.5:4242"
    gpus = (container.get("resources") or {}).get("limits", {}).get("nvidia.com/gpu")
    assert gpus == (None if backend == "sim" else "2")
    if backend != "sim":  # the storage check measures the node's own mount of the checkpoint volume
        (mount,) = container["volumeMounts"]
        (volume,) = pod["volumes"]
        assert mount["mountPath"] == volume["hostPath"]["path"] == spec.storage.checkpoints.mount_path
        assert mount["name"] == volume["name"]


def test_the_burnin_image_can_be_named_apart_from_the_agents(tmp_path):
    from aidc.burnin.launch.kubernetes import render_job

    spec = parse_spec(k8s_spec(tmp_path, image="registry.example/aidc-burnin:1"))
    job = render_job(spec, spec.nodes()[0], run_id="aidc-burnin-00000000", index=0, store="h:1",
                     secret_name="s", timeout_s=60)
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example/aidc-burnin:1"


def test_without_an_address_the_pods_reach_the_launcher_refuses_before_creating_anything(tmp_path, apiserver):
    from aidc.burnin.launch import launcher_for

    raw = k8s_spec(tmp_path, apiserver.url)
    raw["kubernetes"]["burnin"] = {}
    spec = parse_spec(raw)
    env = {k: v for k, v in os.environ.items() if k != "POD_IP"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "environ", env)
        with pytest.raises(BurninError) as err:
            launcher_for("kubernetes").run(spec, spec.nodes(), lab_dir=tmp_path, audit=None, progress=False,
                                           timeout_s=30, say=lambda m: None)
    assert "store_host" in str(err.value)
    assert apiserver.writes() == []


def test_a_store_host_this_machine_does_not_have_is_refused_in_one_line_before_any_job(tmp_path, apiserver):
    from aidc.burnin.launch import launcher_for

    spec = parse_spec(k8s_spec(tmp_path, apiserver.url, store_host="192.0.2.1"))  # TEST-NET-1: never local
    with pytest.raises(BurninError) as err:
        launcher_for("kubernetes").run(spec, spec.nodes(), lab_dir=tmp_path, audit=None, progress=False,
                                       timeout_s=30, say=lambda m: None)
    assert "192.0.2.1" in str(err.value) and "\n" not in str(err.value)
    assert [w for w in apiserver.writes() if "/jobs" in w[1] or "/secrets" in w[1]] == []


def test_nodes_are_held_to_the_stored_baselines_so_a_bad_baseline_file_stops_the_run_before_any_job(
        tmp_path, apiserver):
    """A recertification through Kubernetes is judged against the stored per-model baselines,
    as on the other launchers: the file is read before anything is created."""
    from aidc.burnin import baseline
    from aidc.burnin.launch import launcher_for

    spec = parse_spec(k8s_spec(tmp_path, apiserver.url))
    baseline.path_for(tmp_path).write_text('{"schema": "not this one"}')
    with pytest.raises(BurninError) as err:
        launcher_for("kubernetes").run(spec, spec.nodes(), lab_dir=tmp_path, audit=None, progress=False,
                                       timeout_s=30, say=lambda m: None)
    assert "baselines" in str(err.value) and "\n" not in str(err.value)
    assert [w for w in apiserver.writes() if "/jobs" in w[1] or "/secrets" in w[1]] == []


# -- a run against the API server ----------------------------------------------------------------------

def run_launcher(tmp_path, apiserver, nodes, timeout_s=60):
    from aidc.burnin.launch import launcher_for

    spec = parse_spec(k8s_spec(tmp_path, apiserver.url))
    for node in spec.nodes():
        apiserver.add_node(node.name)
    chosen = [n for n in spec.nodes() if n.name in nodes]
    with AuditLog(tmp_path / "audit.db") as audit:
        try:
            launcher_for("kubernetes").run(spec, chosen, lab_dir=tmp_path / "lab", audit=audit, progress=False,
                                           timeout_s=timeout_s, say=lambda m: None)
        finally:
            aborted = audit.records(kind="burnin.aborted")
            certs = audit.records(kind="burnin.certificate")
    return aborted, certs


def granted_for(method: str, path: str) -> tuple[str, str, str, str]:
    """(namespace, API group, resource, verb) that an RBAC rule must grant for this request."""
    parts = path.strip("/").split("/")
    group = "" if parts[0] == "api" else parts[1]
    rest = parts[2:] if parts[0] == "api" else parts[3:]
    assert rest[0] == "namespaces", path
    named = len(rest) > 3
    verb = {"POST": "create", "DELETE": "delete", "PUT": "update", "PATCH": "patch"}.get(
        method, "get" if named else "list")
    return rest[1], group, rest[2], verb


def test_a_failed_job_aborts_the_run_records_it_and_removes_every_job_and_the_secret(tmp_path, apiserver):
    with Kubelet(apiserver, run_pods=False, fail=frozenset({"gpu-1"})) as kubelet:
        with pytest.raises(BurninError) as err:
            run_launcher(tmp_path, apiserver, ["gpu-0", "gpu-1"])
    assert "gpu-1" in str(err.value)
    assert sorted(kubelet.seen.values()) == ["gpu-0", "gpu-1"]
    assert apiserver.job_list(NAMESPACE) == [] and apiserver.secrets == {}
    with AuditLog(tmp_path / "audit.db") as audit:
        (aborted,) = audit.records(kind="burnin.aborted")
        assert audit.records(kind="burnin.certificate") == []
    assert aborted.payload["nodes"] == ["gpu-0", "gpu-1"]
    assert aborted.payload["launcher"]["name"] == "kubernetes"
    assert aborted.payload["launcher"]["job_id"].startswith("aidc-burnin-")
    # Every call the launcher made, and nothing else, is what its Role grants (infra renders RBAC_RULES).
    from aidc.burnin.launch.kubernetes import RBAC_RULES

    used = {granted_for(m, p) for m, p, _ in apiserver.requests}
    assert used == {(NAMESPACE, g, r, v) for rule in RBAC_RULES for g in rule["apiGroups"]
                    for r in rule["resources"] for v in rule["verbs"]}


def test_jobs_that_never_run_time_out_and_are_deleted(tmp_path, apiserver):
    with Kubelet(apiserver, run_pods=False):
        with pytest.raises(BurninError) as err:
            run_launcher(tmp_path, apiserver, ["gpu-2"], timeout_s=2)
    assert "timed out" in str(err.value)
    assert apiserver.job_list(NAMESPACE) == [] and apiserver.secrets == {}


@pytest.mark.slow
def test_kubernetes_jobs_are_created_pinned_tolerated_read_back_and_their_certificates_gathered(
        tmp_path, apiserver, aidc_cli):
    from aidc.failover.kubernetes import QUARANTINE_TAINT

    stack = tmp_path / "Pulumi.k8sburn.yaml"
    stack.write_text(yaml.safe_dump({"config": {"aidc:cluster": k8s_spec(tmp_path, apiserver.url)}}))
    for name in ("gpu-0", "gpu-1", "gpu-2", "gpu-spare-0"):
        apiserver.add_node(name)
    # gpu-2 is quarantined by aidc (cordoned and tainted): the burn-in that recertifies it must reach it.
    apiserver.set_node("gpu-2", lambda n: n["spec"].update(
        unschedulable=True, taints=[{"key": QUARANTINE_TAINT, "value": "XID_79", "effect": "NoSchedule"}]))
    lab = tmp_path / "lab"
    with Kubelet(apiserver) as kubelet:
        proc = aidc_cli("burnin", "run", "--stack", str(stack), "--lab-dir", str(lab), "--nodes", "gpu-2,gpu-0",
                        "--timeout", "300", "--json", timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["launcher"] == "kubernetes" and out["job_id"].startswith("aidc-burnin-")
    assert [(n["node"], n["verdict"], n["failed_gpus"]) for n in out["nodes"]] == [("gpu-0", "pass", []),
                                                                                   ("gpu-2", "pass", [])]
    assert sorted(kubelet.seen.values()) == ["gpu-0", "gpu-2"]  # each Job's pod ran on its own node
    for node in out["nodes"]:
        assert len(node["gpus"]) == 2 and node["training"]["steps"] == 5
    created = [r for r in apiserver.writes() if r[0] == "POST" and r[1].endswith("/jobs")]
    assert len(created) == 2 and all(r[1] == f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs" for r in created)
    assert apiserver.job_list(NAMESPACE) == [] and apiserver.secrets == {}  # cleaned up after the run
    with AuditLog(lab / "audit.db") as audit:
        certs = audit.records(kind="burnin.certificate")
        assert audit.verify().ok
    assert sorted(r.node for r in certs) == ["gpu-0", "gpu-2"]
    assert all(r.payload["launcher"] == {"name": "kubernetes", "job_id": out["job_id"]} for r in certs)


@pytest.mark.slow
def test_sdc_on_one_gpu_fails_exactly_that_node_and_gpu_through_kubernetes_jobs(tmp_path, apiserver, aidc_cli):
    """The pods' node program computes on the simulated node the run published for it, so a GPU
    that computes wrong without an error fails its node alone, naming that GPU."""
    from aidc.burnin.runner import lab_node_dirs
    from aidc.device.sim import inject
    from tests.burnin.sdc_expectations import NO_TIMING_FLOORS, assert_only_gpu_1_of_node_gpu_1_failed

    raw = k8s_spec(tmp_path, apiserver.url)
    raw["policy"]["burnin"] = {**POLICY, "floors": NO_TIMING_FLOORS}
    stack = tmp_path / "Pulumi.k8sburn.yaml"
    stack.write_text(yaml.safe_dump({"config": {"aidc:cluster": raw}}))
    for name in ("gpu-0", "gpu-1", "gpu-2", "gpu-spare-0"):
        apiserver.add_node(name)
    lab = tmp_path / "lab"
    inject(lab_node_dirs(parse_spec(raw), lab)["gpu-1"], "sdc", gpu=1)  # what `aidc device inject ... sdc` does
    with Kubelet(apiserver) as kubelet:
        proc = aidc_cli("burnin", "run", "--stack", str(stack), "--lab-dir", str(lab), "--nodes", "gpu-0,gpu-1,gpu-2",
                        "--timeout", "300", "--json", timeout=420)
    assert proc.returncode == 1, proc.stderr[-3000:]  # a node failed its burn-in: not an error of the run
    out = json.loads(proc.stdout)
    assert out["launcher"] == "kubernetes"
    assert sorted(kubelet.seen.values()) == ["gpu-0", "gpu-1", "gpu-2"]
    assert_only_gpu_1_of_node_gpu_1_failed(out, lab)


@pytest.mark.slow
def test_a_runbook_recertifies_a_quarantined_node_through_a_job_and_releases_it_on_the_signed_pass(
        tmp_path, apiserver, aidc_cli):
    """fault -> quarantine (cordon + aidc's taint) -> the runbook's tests in a Job on that node alone,
    tolerating the taint -> release only after the signed pass. (A failing recertification keeps
    the node out: the same step code, shown end to end on Slurm and the lab, tests/slurm and
    tests/runbook; a failing Job's node on Kubernetes: the SDC test above.)"""
    from aidc.failover.kubernetes import QUARANTINE_TAINT, SPARE_TAINT
    from tests.runbook.recertify_case import prepare, write_stack

    pool = {"aidc.dev/pool": "gpu"}  # the nodes runbooks may act on are those of aidc's pools
    for name in ("gpu-0", "gpu-1", "gpu-2"):
        apiserver.add_node(name, labels=pool)
    apiserver.add_node("gpu-spare-0", labels=pool,
                       taints=[{"key": SPARE_TAINT, "value": "true", "effect": "NoSchedule"}])
    stack = write_stack(tmp_path, "k8srecert", "kubernetes", kubernetes={
        "kubeconfig": str(kubeconfig(tmp_path / "kubeconfig", apiserver.url)), "burnin": {"store_host": "127.0.0.1"}})
    tainted_when_scheduled = []

    class WatchingKubelet(Kubelet):
        def _schedule(self, job):
            node = pinned_node(job["spec"]["template"]["spec"])
            tainted_when_scheduled.append(QUARANTINE_TAINT in {t["key"] for t in
                                                               self.api.node(node)["spec"].get("taints", [])})
            return super()._schedule(job)

    with WatchingKubelet(apiserver) as kubelet:
        out = aidc_cli("runbook", "run", *prepare(aidc_cli, tmp_path, stack, tmp_path / "site", "gpu-2"), timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert list(kubelet.seen.values()) == ["gpu-2"] and tainted_when_scheduled == [True]  # recertified in place
    steps = {s["step_id"]: s for s in json.loads(out.stdout)["steps"]}
    assert [steps[s]["status"] for s in ("out", "burn-in", "back")] == ["done"] * 3
    result = steps["burn-in"]["result"]
    assert (result["verdict"], result["launcher"], result["tests"]) == ("pass", "kubernetes",
                                                                       ["gemm", "memcpy", "allreduce"])
    node = apiserver.node("gpu-2")
    assert QUARANTINE_TAINT not in {t["key"] for t in node["spec"].get("taints", [])}
    assert not node["spec"].get("unschedulable")
    with AuditLog(tmp_path / "audit.db") as audit:
        (cert,) = audit.records(kind="burnin.certificate")
        release = [r for r in audit.records(kind="runbook.step") if r.payload.get("step") == "back"]
        assert audit.verify().ok
    assert (cert.node, cert.payload["verdict"], cert.payload["tests"]) == ("gpu-2", "pass",
                                                                         ["gemm", "memcpy", "allreduce"])
    assert cert.payload["training"] == {} and release and release[-1].seq > cert.seq
    assert apiserver.job_list(NAMESPACE) == [] and apiserver.secrets == {}
