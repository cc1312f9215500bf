"""What the program deploys for failover on Kubernetes, under Pulumi's mocks: the controller
Deployment with leader election, least-privilege RBAC for it and the agent, a scrapeable agent."""

from __future__ import annotations

import pytest
import yaml
from pulumi_harness import ROOT, build_of

from aidc.errors import SpecError
from aidc.spec import parse_spec

CONTROLLER = "aidc:controller:FailoverController"
AGENT = "aidc:agent:NodeAgent"


def of_parent(build, type_, parent):
    return [r for r in build.of_type(f"kubernetes:{type_}") if r.parent_type == parent]


def test_the_controller_is_a_deployment_of_two_replicas_spread_over_nodes_running_failover(h100):
    (dep,) = of_parent(h100, "apps/v1:Deployment", CONTROLLER)
    spec = dep.inputs["spec"]
    assert spec["replicas"] == 2
    pod = spec["template"]["spec"]
    assert pod["containers"][0]["command"][:3] == ["aidc", "failover", "run"]
    assert pod["containers"][0]["command"][pod["containers"][0]["command"].index("--stack") + 1] == "h100-example"
    assert pod["securityContext"]["runAsNonRoot"] is True
    anti = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
    assert anti["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert h100.exports["failover_controller_replicas"] == 2


def test_the_controller_may_do_what_quarantine_needs_and_nothing_else(h100):
    (role,) = of_parent(h100, "rbac.authorization.k8s.io/v1:ClusterRole", CONTROLLER)
    grants = {(r, v) for rule in role.inputs["rules"] for r in rule["resources"] for v in rule["verbs"]}
    assert grants == {("nodes", "get"), ("nodes", "list"), ("nodes", "watch"), ("nodes", "patch"),
                      ("nodes/status", "patch"), ("pods", "list"), ("pods/eviction", "create"),
                      ("events", "create")}
    (lease_role,) = of_parent(h100, "rbac.authorization.k8s.io/v1:Role", CONTROLLER)
    assert lease_role.inputs["metadata"]["namespace"] == "aidc-system"
    assert lease_role.inputs["rules"] == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                                           "verbs": ["get", "create", "update"]}]
    (binding,) = of_parent(h100, "rbac.authorization.k8s.io/v1:RoleBinding", CONTROLLER)
    assert binding.inputs["roleRef"]["name"] == lease_role.inputs["metadata"]["name"]


def test_the_agent_may_only_report_a_condition_and_events(h100):
    (role,) = of_parent(h100, "rbac.authorization.k8s.io/v1:ClusterRole", AGENT)
    grants = {(r, v) for rule in role.inputs["rules"] for r in rule["resources"] for v in rule["verbs"]}
    assert grants == {("nodes/status", "patch"), ("events", "create")}


def test_the_agent_listens_on_all_addresses_in_its_pod_so_probe_and_scrape_reach_it(h100):
    (ds,) = of_parent(h100, "apps/v1:DaemonSet", AGENT)
    cmd = ds.inputs["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[cmd.index("--listen-address") + 1].rpartition(":")[0] == "0.0.0.0"


def monitored_build(tmp_path):
    """The worked example with ServiceMonitor selector labels, built under the mocks."""
    doc = yaml.safe_load((ROOT / "Pulumi.h100-example.yaml").read_text())
    doc["config"]["aidc:cluster"].setdefault("agent", {})["service_monitor_labels"] = {"release": "kube-prometheus-stack"}
    path = tmp_path / "Pulumi.monitored.yaml"
    path.write_text(yaml.safe_dump(doc))
    return build_of(path)


def test_the_service_monitor_sets_hostname_from_the_node_and_carries_the_specs_selector_labels(tmp_path):
    build = monitored_build(tmp_path)
    (monitor,) = of_parent(build, "monitoring.coreos.com/v1:ServiceMonitor", AGENT)
    assert monitor.inputs["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (endpoint,) = monitor.inputs["spec"]["endpoints"]
    assert {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "Hostname",
            "action": "replace"} in endpoint["relabelings"]


def test_a_stack_not_scheduled_by_kubernetes_gets_no_controller(lab):
    assert not [r for r in lab.resources if r.parent_type == CONTROLLER or r.type == CONTROLLER]
    assert lab.exports["failover_controller_replicas"] == 0


def test_the_controller_reads_the_same_spec_the_program_deployed(h100):
    (cm,) = of_parent(h100, "core/v1:ConfigMap", CONTROLLER)
    (text,) = cm.inputs["data"].values()
    assert parse_spec(yaml.safe_load(text)["config"]["aidc:cluster"]).name == "h100-example"


def test_the_controller_knows_its_own_pod_from_the_downward_api_so_it_never_evicts_itself(h100):
    (dep,) = of_parent(h100, "apps/v1:Deployment", CONTROLLER)
    env = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
           for e in dep.inputs["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert (env.get("POD_NAME"), env.get("POD_NAMESPACE")) == ("metadata.name", "metadata.namespace")


def test_the_controller_serves_metrics_and_probes_on_its_pod_address_and_kubernetes_probes_them(h100):
    (dep,) = of_parent(h100, "apps/v1:Deployment", CONTROLLER)
    (container,) = dep.inputs["spec"]["template"]["spec"]["containers"]
    cmd = container["command"]
    (port,) = [p for p in container["ports"] if p["name"] == "metrics"]
    # the mocks give floats
    assert cmd[cmd.index("--listen-address") + 1] == f"0.0.0.0:{int(port['containerPort'])}"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    # A standby is ready too: /readyz is 200 for it, so it stays behind the Service and is scraped.
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}


def test_every_controller_replica_is_scraped_so_the_failover_alerts_can_fire(tmp_path):
    build = monitored_build(tmp_path)
    (dep,) = of_parent(build, "apps/v1:Deployment", CONTROLLER)
    pod_labels = dep.inputs["spec"]["template"]["metadata"]["labels"]
    (service,) = of_parent(build, "core/v1:Service", CONTROLLER)
    assert service.inputs["spec"]["selector"].items() <= pod_labels.items()
    assert service.inputs["spec"]["clusterIP"] == "None"  # every replica an endpoint, not one behind a VIP
    (svc_port,) = service.inputs["spec"]["ports"]
    assert svc_port["targetPort"] == "metrics"
    (monitor,) = of_parent(build, "monitoring.coreos.com/v1:ServiceMonitor", CONTROLLER)
    assert monitor.inputs["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor.inputs["spec"]["selector"]["matchLabels"].items() <= service.inputs["metadata"]["labels"].items()
    assert monitor.inputs["spec"]["namespaceSelector"] == {"matchNames": [dep.inputs["metadata"]["namespace"]]}
    (endpoint,) = monitor.inputs["spec"]["endpoints"]
    assert endpoint["port"] == svc_port["name"] and endpoint.get("path", "/metrics") == "/metrics"


def test_the_agent_is_probed_on_its_health_endpoints_not_on_its_metrics(h100):
    (ds,) = of_parent(h100, "apps/v1:DaemonSet", AGENT)
    (container,) = ds.inputs["spec"]["template"]["spec"]["containers"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}


def test_a_drain_waiting_out_its_eviction_timeout_is_not_taken_for_a_stuck_controller(tmp_path):
    doc = yaml.safe_load((ROOT / "Pulumi.h100-example.yaml").read_text())
    doc["config"]["aidc:cluster"].setdefault("kubernetes", {})["eviction_timeout_s"] = 600
    path = tmp_path / "Pulumi.slow-drain.yaml"
    path.write_text(yaml.safe_dump(doc))
    (dep,) = of_parent(build_of(path), "apps/v1:Deployment", CONTROLLER)
    cmd = dep.inputs["spec"]["template"]["spec"]["containers"][0]["command"]
    assert float(cmd[cmd.index("--stall-after") + 1]) > 600


CAPI_STACK = ROOT / "tests/infra/stacks/Pulumi.capi-roce.yaml"


def controller_pod(build):
    (dep,) = of_parent(build, "apps/v1:Deployment", CONTROLLER)
    return dep.inputs["spec"]["template"]["spec"]


def test_a_controller_on_sqlite_keeps_its_state_in_the_pods_empty_dir(h100):
    pod = controller_pod(h100)
    assert {"name": "state", "emptyDir": {}} in pod["volumes"]
    assert not [e for e in pod["containers"][0]["env"] if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]]


def test_a_controller_on_postgres_reads_the_dsn_from_the_cloudnative_pg_secret_and_keeps_no_state_volume():
    build = build_of(CAPI_STACK)
    pod = controller_pod(build)
    container = pod["containers"][0]
    # No volume for state: only the ConfigMap and an in-memory scratch directory for per-pod files.
    assert [v["name"] for v in pod["volumes"]] == ["config", "scratch"]
    assert pod["volumes"][1]["emptyDir"]["medium"] == "Memory"
    assert "--state-dir" in container["command"] and \
        container["command"][container["command"].index("--state-dir") + 1] == "/run/aidc"
    assert {"name": "AIDC_STATE_DSN", "valueFrom": {"secretKeyRef": {"name": "aidc-state-app", "key": "uri"}}} \
        in container["env"]
    (cluster,) = of_parent(build, "postgresql.cnpg.io/v1:Cluster", CONTROLLER)
    assert cluster.inputs["metadata"]["name"] == "aidc-state"
    assert cluster.inputs["metadata"]["namespace"] == "aidc-system"
    assert cluster.inputs["spec"]["instances"] == 3
    assert cluster.inputs["spec"]["storage"] == {"size": "20Gi", "storageClass": "local-nvme"}
    assert cluster.inputs["spec"]["bootstrap"] == {"initdb": {"database": "aidc", "owner": "aidc"}}


def test_a_controller_on_postgres_without_cloudnative_pg_reads_the_named_secret(tmp_path):
    doc = yaml.safe_load((ROOT / "Pulumi.h100-example.yaml").read_text())
    cluster = doc["config"]["aidc:cluster"]
    cluster["state"] = {"backend": "postgres", "dsn_env": "PGDSN"}
    cluster.setdefault("kubernetes", {}).update(state_secret="site-state-db", state_secret_key="conninfo")
    path = tmp_path / "Pulumi.pg.yaml"
    path.write_text(yaml.safe_dump(doc))
    build = build_of(path)
    container = controller_pod(build)["containers"][0]
    assert {"name": "PGDSN", "valueFrom": {"secretKeyRef": {"name": "site-state-db", "key": "conninfo"}}} \
        in container["env"]
    assert not of_parent(build, "postgresql.cnpg.io/v1:Cluster", CONTROLLER)
    assert [v["name"] for v in controller_pod(build)["volumes"]] == ["config", "scratch"]


@pytest.mark.parametrize("state, kubernetes, expected", [
    ({"backend": "postgres", "dsn_file": "/etc/aidc/dsn"}, {}, "state.dsn_file cannot reach the controller pods"),
    ({"backend": "sqlite"}, {"cloudnative_pg": {}}, "kubernetes.cloudnative_pg holds the state database"),
])
def test_a_dsn_the_controller_pods_cannot_read_is_refused_before_any_resource(state, kubernetes, expected):
    doc = yaml.safe_load((ROOT / "Pulumi.h100-example.yaml").read_text())["config"]["aidc:cluster"]
    doc["state"] = state
    doc.setdefault("kubernetes", {}).update(kubernetes)
    with pytest.raises(SpecError, match=expected):
        parse_spec(doc)
def test_with_dra_the_controller_may_also_manage_device_taint_rules_and_nothing_more(tmp_path):
    doc = yaml.safe_load((ROOT / "Pulumi.h100-example.yaml").read_text())
    doc["config"]["aidc:cluster"].setdefault("kubernetes", {})["gpu_allocation"] = "dra"
    path = tmp_path / "Pulumi.dra.yaml"
    path.write_text(yaml.safe_dump(doc))
    (role,) = of_parent(build_of(path), "rbac.authorization.k8s.io/v1:ClusterRole", CONTROLLER)
    dra = [rule for rule in role.inputs["rules"] if rule["apiGroups"] == ["resource.k8s.io"]]
    assert dra == [{"apiGroups": ["resource.k8s.io"], "resources": ["devicetaintrules"],
                    "verbs": ["get", "create", "delete"]}]
