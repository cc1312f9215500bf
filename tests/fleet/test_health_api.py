"""The health API on the controller's event listener: every answer matches the shipped OpenAPI
document; a caller without a client certificate is refused in the TLS handshake, a wrong token
gets 401, an identity without the viewer role 403 (audited, repeats aggregated); the signed
certificate it serves verifies with the public key alone; `aidc fleet nodes|node|gpu` are its
clients."""

from __future__ import annotations

import contextlib
import http.client
import json
import ssl
import threading

import jsonschema
import pytest

from aidc import polling
from aidc.audit.log import AuditLog
from aidc.errors import PolicyRefusal
from aidc.fleet.api import openapi_document
from aidc.fleet.client import ApiError, HealthClient
from aidc.identity import token_digest
from aidc.runbook.tls import TLSConfig
from aidc.spec import load_stack
from aidc.transport.forwarder import ClientTLS
from aidc.transport.ingest import IngestServer

from .conftest import VICTIM

ROLES = {"cert:viewer-bot": "viewer"}
TOKEN = "health-api-test-token"
DOCUMENT = openapi_document()


@pytest.fixture(scope="module")
def listener(fleet_lab, pki):
    """The controller's listener over the fleet lab's store and audit log, with the health API."""
    lab_dir, db, _ = fleet_lab
    tls = TLSConfig(pki["server"].cert, pki["server"].key, pki["ca"].cert_file)
    spec = load_stack("lab")
    server = IngestServer(lab_dir.parent / "state.db", db, {n.name for n in spec.nodes()}, tls, "127.0.0.1",
                          polling.free_port(), log=lambda line: None, spec=spec, roles=ROLES,
                          token_map={token_digest(TOKEN): "dashboards"})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    thread.join(timeout=10)


@contextlib.contextmanager
def serving(pki, store_path, audit_path):
    """A listener with the health API over these store and audit files, for one test."""
    tls = TLSConfig(pki["server"].cert, pki["server"].key, pki["ca"].cert_file)
    spec = load_stack("lab")
    server = IngestServer(store_path, audit_path, {n.name for n in spec.nodes()}, tls, "127.0.0.1",
                          polling.free_port(), log=lambda line: None, spec=spec, roles=ROLES)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        thread.join(timeout=10)


def tls_of(pki, name: str) -> ClientTLS:
    return ClientTLS(pki[name].cert, pki[name].key, pki["ca"].cert_file)


def raw_get(server, pki, name: str, path: str, token: str | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPSConnection("127.0.0.1", server.port, timeout=10, context=tls_of(pki, name).context())
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def template_of(path: str) -> str:
    parts = path.split("/")
    if len(parts) == 4 and parts[2] == "nodes":
        return "/v1/nodes/{node}"
    if len(parts) == 6:
        return "/v1/nodes/{node}/gpus/{index}"
    return path


def check_contract(path: str, status: int, body: dict) -> None:
    """The body validates against the document's schema for this path and status."""
    answer = DOCUMENT["paths"][template_of(path)]["get"]["responses"][str(status)]
    if "$ref" in answer:
        answer = DOCUMENT["components"]["responses"][answer["$ref"].rsplit("/", 1)[1]]
    schema = {**answer["content"]["application/json"]["schema"], "components": DOCUMENT["components"]}
    jsonschema.Draft202012Validator(schema).validate(body)


def test_every_answer_of_every_path_matches_the_openapi_document(listener, pki):
    jsonschema.Draft202012Validator.check_schema({"components": DOCUMENT["components"]})
    asked = [("viewer-bot", "/v1/fleet", 200), ("viewer-bot", "/v1/nodes", 200),
             ("viewer-bot", f"/v1/nodes/{VICTIM}", 200), ("viewer-bot", "/v1/nodes/gpu-2", 200),
             ("viewer-bot", f"/v1/nodes/{VICTIM}/gpus/0", 200), ("viewer-bot", "/v1/openapi", 200),
             ("viewer-bot", "/v1/nodes/gpu-9", 404), ("viewer-bot", f"/v1/nodes/{VICTIM}/gpus/2", 404),
             ("no-role-bot", "/v1/fleet", 403), ("no-role-bot", "/v1/nodes", 403),
             ("no-role-bot", "/v1/nodes/gpu-0", 403), ("no-role-bot", "/v1/nodes/gpu-0/gpus/0", 403),
             ("no-role-bot", "/v1/openapi", 403)]
    covered = set()
    for who, path, expected in asked:
        status, body = raw_get(listener, pki, who, path)
        assert status == expected, (path, body)
        check_contract(path, status, body)
        covered.add((template_of(path), str(status)))
    for path in ("/v1/fleet", "/v1/nodes/gpu-0"):
        status, body = raw_get(listener, pki, "viewer-bot", path, token="not-the-token")
        assert status == 401
        check_contract(path, status, body)
        covered.add((template_of(path), "401"))
    declared = {(p, s) for p, item in DOCUMENT["paths"].items() for s in item["get"]["responses"]}
    assert declared - covered <= {(p, "401") for p in DOCUMENT["paths"]}, declared - covered


@pytest.mark.slow
def test_a_node_answer_gives_health_events_quarantine_and_a_certificate_that_verifies(listener, pki, fleet_lab,
                                                                                        aidc_cli, tmp_path):
    lab_dir, _, _ = fleet_lab
    client = HealthClient(f"https://127.0.0.1:{listener.port}", tls_of(pki, "viewer-bot"))
    node = client.node(VICTIM)
    # Recertified and released: healthy, nothing open, no quarantine; the XID 79 is history.
    assert node["health"] == "healthy" and node["quarantine"] is None and node["open_events"] == []
    assert node["scheduler_state"] == "in_service"
    assert node["repeat_offender"] is None and node["repeat_offender_tracking"] == "policy.offenders"
    failed = client.node("gpu-2")
    assert failed["health"] == "uncertified" and failed["certificate"]["verdict"] == "fail"
    assert [g["health"] for g in failed["gpu_health"]] == ["uncertified", "uncertified"]
    # The certificate verifies offline with the key `aidc kms public-key` prints.
    key = aidc_cli("kms", "public-key", "--stack", "lab", "--lab-dir", str(lab_dir))
    assert key.returncode == 0, key.stderr
    (tmp_path / "key.pem").write_text(key.stdout)
    (tmp_path / "cert.json").write_text(json.dumps(node["certificate"]))
    verified = aidc_cli("burnin", "certificate", "verify", str(tmp_path / "cert.json"),
                        "--public-key", str(tmp_path / "key.pem"))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    fleet = client.fleet()
    assert fleet["fleet"]["healthy_gpu_ratio"] == 0.8 and fleet["nodes_by_health"] == {"healthy": 4, "uncertified": 1}


def test_a_caller_without_a_client_certificate_is_refused_in_the_handshake(listener, pki):
    context = ssl.create_default_context(cafile=str(pki["ca"].cert_file))
    conn = http.client.HTTPSConnection("127.0.0.1", listener.port, timeout=10, context=context)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        conn.request("GET", "/v1/fleet")
        conn.getresponse().read()
    conn.close()


def test_a_valid_token_adds_its_identity_and_a_wrong_one_is_401(listener, pki):
    status, _ = raw_get(listener, pki, "no-role-bot", "/v1/fleet", token=TOKEN)
    assert status == 403  # token:dashboards holds no role either: authenticated, not authorized
    status, body = raw_get(listener, pki, "no-role-bot", "/v1/fleet", token="guess")
    assert status == 401 and "bearer token" in body["error"]


def test_refusals_are_audited_once_and_repeats_are_summarised(pki, tmp_path):
    copy = tmp_path / "audit.db"  # a log of its own: the records counted are this test's
    with serving(pki, tmp_path / "state.db", copy) as server:
        client = HealthClient(f"https://127.0.0.1:{server.port}", tls_of(pki, "no-role-bot"))
        for _ in range(5):
            with pytest.raises(PolicyRefusal, match="needs role viewer"):
                client.nodes()
    with AuditLog(copy, read_only=True) as log:
        refused = log.records(kind="access.refused")
    assert [r.actor for r in refused] == ["cert:no-role-bot"] * 2
    assert refused[0].payload["action"] == "read fleet health" and refused[1].payload["count"] == 4


@pytest.mark.slow
def test_fleet_nodes_node_and_gpu_are_clients_of_the_api(aidc_cli, listener, pki):
    tls = ["--url", f"https://127.0.0.1:{listener.port}", "--tls-cert", str(pki["viewer-bot"].cert),
           "--tls-key", str(pki["viewer-bot"].key), "--ca", str(pki["ca"].cert_file)]
    nodes = aidc_cli("fleet", "nodes", *tls, "--json")
    assert nodes.returncode == 0, nodes.stderr
    assert [n["node"] for n in json.loads(nodes.stdout)["nodes"]] == ["gpu-0", "gpu-1", "gpu-2", "gpu-3",
                                                                      "gpu-spare-0"]
    gpu = aidc_cli("fleet", "gpu", VICTIM, "0", *tls)
    assert gpu.returncode == 0 and f"{VICTIM} gpu 0: healthy" in gpu.stdout and "repeat offender: no" in gpu.stdout
    node = aidc_cli("fleet", "node", "gpu-2", *tls)
    assert "gpu-2" in node.stdout and "uncertified" in node.stdout
    missing = aidc_cli("fleet", "node", "gpu-9", *tls, "--json")
    assert missing.returncode == 2 and "no node 'gpu-9'" in json.loads(missing.stderr)["error"]
    refused = aidc_cli("fleet", "nodes", *tls[:2], "--tls-cert", str(pki["no-role-bot"].cert), "--tls-key",
                       str(pki["no-role-bot"].key), "--ca", str(pki["ca"].cert_file))
    assert refused.returncode == 3 and "viewer" in refused.stderr


def test_events_agents_post_to_the_same_listener_show_as_open_events(listener, pki, tmp_path):
    from aidc.events import Action, FaultEvent, FaultKind
    from aidc.store import Store
    from aidc.transport.forwarder import Forwarder

    store = Store(tmp_path / "agent.db")
    with store.transaction():
        store.append(FaultEvent("gpu-3", FaultKind.THERMAL_THROTTLE, Action.RESTART_APP, "GPU 1 throttled",
                                "device", gpu=1))
    forwarder = Forwarder(tmp_path / "agent.db", "gpu-3", f"https://127.0.0.1:{listener.port}", tls_of(pki, "gpu-3"))
    try:
        assert forwarder.forward_once(store) == 1  # POST /v1/events is still the agents' door
    finally:
        forwarder.close()
        store.close()
    client = HealthClient(f"https://127.0.0.1:{listener.port}", tls_of(pki, "viewer-bot"))
    (event,) = client.gpu("gpu-3", 1)["open_events"]
    assert event["kind"] == "thermal_throttle" and event["decided"] is False
    assert client.gpu("gpu-3", 0)["open_events"] == []


def test_an_unreachable_api_is_one_clear_error(pki):
    client = HealthClient(f"https://127.0.0.1:{polling.free_port()}", tls_of(pki, "viewer-bot"), timeout_s=2)
    with pytest.raises(ApiError, match="cannot reach the health API"):
        client.fleet()


def test_a_token_map_without_a_listener_is_one_clear_error(aidc_cli, tmp_path):
    out = aidc_cli("failover", "run", "--state-dir", str(tmp_path), "--stack", "lab", "--api-token-map", str(tmp_path / "tokens"))
    assert out.returncode == 2 and "--api-token-map needs --ingest-address" in out.stderr
    assert not (tmp_path / "state.db").exists()  # refused before anything was created


def test_a_gpu_marked_a_repeat_offender_shows_on_its_gpu_and_node_answers(fleet_lab, pki, tmp_path):
    """The mark failover keeps (aidc.failover.offenders) is what the API serves, in the contract."""
    from aidc.failover.offenders import OFFENDERS_KEY
    from aidc.store import Store

    lab_dir, db, _ = fleet_lab
    store = Store(tmp_path / "state.db")
    mark = {"target": "gpu-2/gpu1", "node": "gpu-2", "gpu": 1, "reason": "3 faults weighing 6 in 30 days",
            "weight": 6, "max_faults": 4, "window_days": 30, "marked_at": 1.0, "event_id": 7, "state": "repair",
            "history": [], "catalog_version": "t"}
    store.put(OFFENDERS_KEY, json.dumps({"gpu-2/gpu1": mark}))
    store.close()
    with serving(pki, tmp_path / "state.db", db) as server:
        client = HealthClient(f"https://127.0.0.1:{server.port}", tls_of(pki, "viewer-bot"))
        gpu = client.gpu("gpu-2", 1)
        check_contract("/v1/nodes/gpu-2/gpus/1", 200, gpu)
        check_contract("/v1/nodes/gpu-2", 200, client.node("gpu-2"))
        assert gpu["repeat_offender"]["target"] == "gpu-2/gpu1" and gpu["repeat_offender"]["state"] == "repair"
        assert client.gpu("gpu-2", 0)["repeat_offender"] is None  # the node's other GPU does not offend
        assert client.node("gpu-2")["repeat_offender"] is None  # nor does the node itself
