"""Who did it: approvals, releases and runs record the identity aidc authenticated (the OS user
of the CLI, the client certificate's CN, the name a bearer token is mapped to), a self-asserted
`--by`/`--actor` only as a note beside it; with `access.roles` an operator cannot approve a
destructive step, and the refusal is audited."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import pwd
from pathlib import Path

import pytest
import yaml

from aidc.audit.log import AuditLog
from aidc.device.sim import create_node
from aidc.errors import PolicyRefusal
from aidc.failover.scheduler import LabScheduler
from aidc.identity import cli_identity
from aidc.installation import record
from aidc.runbook import tls
from aidc.runbook.receiver import Receiver
from aidc.spec import load_stack
from aidc.store import Store
from certs import CA
from runbook_fakes import APPROVE_THEN_QUARANTINE, QUARANTINE_AND_NOTIFY, WITH_PLAYBOOK, alert, write_runbook

ROOT = Path(__file__).resolve().parents[2]
ME = f"user:{pwd.getpwuid(os.geteuid()).pw_name}"


def test_the_cli_identity_is_the_effective_users_not_dollar_user(monkeypatch):
    monkeypatch.setenv("USER", "mallory")
    assert cli_identity() == ME


# --- the engine: roles on approvals ------------------------------------------------------
def waiting_run(make_engine, roles: dict):
    engine = make_engine(WITH_PLAYBOOK)
    engine.access_roles = roles
    sub = engine.submit_alert(alert("NeedsFix", "gpu-0"))
    assert engine.execute(sub.run_id).status == "awaiting_approval"
    return engine, sub.run_id


def test_without_roles_anyone_approves_and_the_identity_and_note_are_recorded(make_engine):
    engine, run_id = waiting_run(make_engine, {})
    engine.approve(run_id, "user:alice", "Alice Example")
    record = engine.audit.records(kind="runbook.approval")[0]
    assert record.actor == "user:alice"
    assert record.payload["approved_by"] == "user:alice" and record.payload["note"] == "Alice Example"
    assert engine.execute(run_id).status == "done"


def test_an_operator_cannot_approve_a_destructive_step_and_the_refusal_is_audited(make_engine, fakes):
    engine, run_id = waiting_run(make_engine, {"user:olga": "operator", "user:alice": "approver"})
    with pytest.raises(PolicyRefusal, match="user:olga \\(role operator\\) may not approve step ok-to-reset.*"
                                            "destructive steps reset, back.*needs role approver"):
        engine.approve(run_id, "user:olga", "Olga")
    refused = engine.audit.records(kind="access.refused")
    assert len(refused) == 1 and refused[0].actor == "user:olga" and refused[0].node == "gpu-0"
    assert refused[0].payload["needed"] == "approver" and refused[0].payload["role"] == "operator"
    assert engine.audit.records(kind="runbook.approval") == []
    assert engine.execute(run_id).status == "awaiting_approval" and fakes.playbooks.calls == []

    engine.approve(run_id, "user:alice")
    assert engine.execute(run_id).status == "done" and fakes.playbooks.calls == [("gpu-reset.yml", "gpu-0", {})]


def test_an_identity_without_a_role_is_refused_once_roles_are_configured(make_engine):
    engine, run_id = waiting_run(make_engine, {"user:alice": "approver"})
    with pytest.raises(PolicyRefusal, match="user:eve \\(no role\\)"):
        engine.approve(run_id, "user:eve")


# --- the CLI: the OS user, --by a note, exit 3 on refusal -----------------------------
@pytest.fixture
def lab(tmp_path):
    for i, name in enumerate(["gpu-0", "gpu-1", "gpu-2", "gpu-3", "gpu-spare-0"]):
        create_node(tmp_path / "lab" / "nodes" / name, name, 2, i)
    (tmp_path / "rb").mkdir()
    write_runbook(tmp_path / "rb", APPROVE_THEN_QUARANTINE)
    return tmp_path


def stack_with_roles(tmp_path: Path, name: str, roles: dict) -> str:
    doc = yaml.safe_load((ROOT / "Pulumi.lab.yaml").read_text())
    doc["config"]["aidc:cluster"]["access"] = {"roles": roles}
    doc["config"]["aidc:cluster"]["policy"]["runbook_auto_approve"] = []  # a quarantine waits for a person
    path = tmp_path / f"Pulumi.{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def opts(lab: Path, stack: str) -> list[str]:
    return ["--stack", stack, "--runbooks", str(lab / "rb"), "--lab-dir", str(lab / "lab"),
            "--state-db", str(lab / "state.db"), "--audit-db", str(lab / "audit.db")]


def test_cli_approval_by_an_operator_is_refused_and_by_an_approver_recorded_as_the_os_user(aidc_cli, lab):
    as_operator = stack_with_roles(lab, "ops", {ME: "operator"})
    record(lab / "lab", load_stack(as_operator), as_operator)  # the installer's roles: ME operates
    started = aidc_cli("runbook", "run", "ask-then-drain", "--node", "gpu-2", "--json", *opts(lab, as_operator))
    assert started.returncode == 0, started.stderr
    run = json.loads(started.stdout)
    assert run["status"] == "awaiting_approval" and run["trigger"]["user"] == ME

    refused = aidc_cli("runbook", "approve", str(run["id"]), "--by", "Olga Operator", *opts(lab, as_operator))
    assert refused.returncode == 3
    assert refused.stderr.startswith("aidc: error: ") and refused.stderr.count("\n") == 1
    assert f"{ME} (role operator) may not approve step ok-to-drain" in refused.stderr
    assert LabScheduler(lab / "lab").state("gpu-2") == "in_service"

    as_approver = stack_with_roles(lab, "approvers", {ME: "approver"})
    # A stack file naming other roles than the installation's grants nothing ...
    ignored = aidc_cli("runbook", "approve", str(run["id"]), *opts(lab, as_approver))
    assert ignored.returncode == 3 and "disagrees with the installation" in ignored.stderr
    assert LabScheduler(lab / "lab").state("gpu-2") == "in_service"
    # ... until the installer records it.
    record(lab / "lab", load_stack(as_approver), as_approver)
    approved = aidc_cli("runbook", "approve", str(run["id"]), "--by", "Alice Approver", "--json",
                        *opts(lab, as_approver))
    assert approved.returncode == 0, approved.stderr
    done = json.loads(approved.stdout)
    assert done["status"] == "done" and done["steps"][0]["result"]["approved_by"] == ME
    assert LabScheduler(lab / "lab").state("gpu-2") == "quarantined"
    log = AuditLog(lab / "audit.db", read_only=True)
    refusal, disagreement = log.records(kind="access.refused")
    assert refusal.actor == ME and refusal.payload["note"] == "Olga Operator"
    assert disagreement.actor == ME and "access.roles" in disagreement.payload["problem"]
    (approval,) = log.records(kind="runbook.approval")
    assert approval.actor == ME and approval.payload["note"] == "Alice Approver"
    log.close()


def test_cli_release_records_the_os_user_with_actor_as_a_note_and_needs_an_approver(aidc_cli, tmp_path):
    lab = tmp_path / "lab"
    (lab / "nodes" / "gpu-1").mkdir(parents=True)
    LabScheduler(lab).quarantine("gpu-1", "XID 79")
    store = Store(lab / "state.db")
    store.set_node_state("gpu-1", "quarantined", "XID 79", "failover")
    store.close()
    release = ("failover", "release", "gpu-1", "--reason", "GPU replaced", "--actor", "Alice", "--lab-dir", str(lab))

    as_operator = stack_with_roles(tmp_path, "ops", {ME: "operator"})
    record(lab, load_stack(as_operator), as_operator)
    refused = aidc_cli(*release, "--stack", as_operator)
    assert refused.returncode == 3 and f"{ME} (role operator) may not release gpu-1" in refused.stderr
    assert LabScheduler(lab).state("gpu-1") == "quarantined"

    open_to_all = stack_with_roles(tmp_path, "open", {})
    record(lab, load_stack(open_to_all), open_to_all)
    released = aidc_cli(*release, "--stack", open_to_all)
    assert released.returncode == 0, released.stderr
    assert LabScheduler(lab).state("gpu-1") == "in_service"
    log = AuditLog(lab / "audit.db", read_only=True)
    assert [r.actor for r in log.records(kind="access.refused")] == [ME]
    (record_,) = log.records(kind="failover.release")
    assert record_.actor == ME and record_.payload["note"] == "Alice"
    log.close()


# --- the receiver: the certificate's CN, a mapped token, roles, no token in a query --------
@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    ca = CA.create(root, "aidc-test-ca")
    return {"ca": ca, "server": ca.issue(root, "aidc-runbook", server=True),
            "alertmanager": ca.issue(root, "alertmanager", server=False),
            "dashboard": ca.issue(root, "dashboard", server=False)}


@pytest.fixture
def serve(make_engine, fakes, serve_receiver):

    def start(roles: dict, tls_config=None, token_map=None, token=None) -> Receiver:
        engine = make_engine(QUARANTINE_AND_NOTIFY)
        engine.access_roles = roles
        fakes.metrics.values['broken{Hostname="gpu-1"}'] = [1.0]
        return serve_receiver(engine, token, tls=tls_config, token_map=token_map)

    return start


def call(rec, method, path, body=None, token=None, context=None):
    conn = (http.client.HTTPSConnection("127.0.0.1", rec.port, timeout=10, context=context) if context
            else http.client.HTTPConnection("127.0.0.1", rec.port, timeout=10))
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, (json.loads(data) if data else None)
    finally:
        conn.close()


def webhook(*alerts) -> bytes:
    return json.dumps({"version": "4", "status": "firing", "alerts": list(alerts)}).encode()


def client(pki, name):
    import ssl

    ctx = ssl.create_default_context(cafile=str(pki["ca"].cert_file))
    ctx.load_cert_chain(str(pki[name].cert), str(pki[name].key))
    return ctx


def test_mutual_tls_records_the_certificates_cn_and_roles_decide_who_may_post(serve, pki):
    config = tls.TLSConfig(pki["server"].cert, pki["server"].key, pki["ca"].cert_file)
    rec = serve({"cert:alertmanager": "operator", "cert:dashboard": "viewer"}, tls_config=config)
    body = webhook(alert("NodeBroken", "gpu-1", fingerprint="f1"))

    status, reply = call(rec, "POST", "/alerts", body, context=client(pki, "dashboard"))
    assert status == 403 and "cert:dashboard (role viewer) may not post alerts" in reply["error"]
    assert call(rec, "GET", "/runs", context=client(pki, "dashboard"))[0] == 200
    (refusal,) = rec.engine.audit.records(kind="access.refused")
    assert refusal.actor == "cert:dashboard" and refusal.payload["path"] == "/alerts"

    status, reply = call(rec, "POST", "/alerts", body, context=client(pki, "alertmanager"))
    assert status == 200 and reply["results"][0]["outcome"] == "started"
    run = rec.engine.state.get_run(reply["results"][0]["run_id"])
    assert run.trigger["sender"]["identity"] == "cert:alertmanager"
    started = rec.engine.audit.records(kind="runbook.run.started")[0]
    assert started.payload["trigger"]["sender"]["identity"] == "cert:alertmanager"


def test_a_mapped_token_authenticates_as_its_name(serve):
    token = "am-token-7f3a"
    rec = serve({}, token_map={hashlib.sha256(token.encode()).hexdigest(): "alertmanager-eu"})
    assert call(rec, "POST", "/alerts", webhook(), token="not-it")[0] == 401
    status, reply = call(rec, "POST", "/alerts", webhook(alert("NodeBroken", "gpu-1", fingerprint="f9")), token=token)
    assert status == 200
    run = rec.engine.state.get_run(reply["results"][0]["run_id"])
    assert run.trigger["sender"]["identity"] == "token:alertmanager-eu"


def test_a_token_in_the_query_string_is_refused_and_never_logged(serve):
    token = "leaky-token-31337"
    rec = serve({}, token=token)
    for path in (f"/alerts?token={token}", f"/alerts?x=1&access_token={token}", f"/runs?Token={token}"):
        method = "GET" if path.startswith("/runs") else "POST"
        status, reply = call(rec, method, path, webhook(alert("NodeBroken", "gpu-1")) if method == "POST" else None)
        assert status == 400 and "query string" in reply["error"] and token not in json.dumps(reply)
    assert call(rec, "GET", f"/nowhere?q={token}", token=token)[0] == 404  # any query: the log omits it
    assert rec.engine.state.runs() == []
    assert len(rec.lines) >= 4 and not any(token in line for line in rec.lines)
    assert any("400 POST /alerts?<query not logged>" in line for line in rec.lines)


# --- configuration: roles in the stack file, token digests in a private file -------------
def test_roles_name_an_authenticated_kind_of_identity_and_a_known_role(tmp_path):
    from aidc.errors import SpecError
    from aidc.spec import load_stack

    assert load_stack(stack_with_roles(tmp_path, "good", {"user:alice": "approver", "cert:am": "operator",
                                                          "token:ci": "viewer"})).access.roles["user:alice"] == "approver"
    with pytest.raises(SpecError, match="access.roles"):
        load_stack(stack_with_roles(tmp_path, "bare", {"alice": "approver"}))  # which alice? say user:/cert:/token:
    with pytest.raises(SpecError, match="access.roles"):
        load_stack(stack_with_roles(tmp_path, "admin", {"user:alice": "admin"}))


def test_a_token_map_holds_digests_and_must_not_be_writable_by_others(tmp_path):
    from aidc.errors import AidcError
    from aidc.identity import load_token_map

    path = tmp_path / "tokens"
    digest = hashlib.sha256(b"t0ken").hexdigest()
    path.write_text(f"# name sha256\nalertmanager {digest}\n")
    os.chmod(path, 0o600)
    assert load_token_map(path) == {digest: "alertmanager"}
    os.chmod(path, 0o620)
    with pytest.raises(AidcError, match="writable by others"):
        load_token_map(path)
    os.chmod(path, 0o600)
    path.write_text("alertmanager t0ken\n")  # a token in clear, not its digest
    with pytest.raises(AidcError, match="tokens:1: expected '<name> <sha256 hex of the token>'"):
        load_token_map(path)


def test_serve_refuses_a_token_map_others_could_write_before_listening(aidc_cli, tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"alertmanager {hashlib.sha256(b't0ken').hexdigest()}\n")
    os.chmod(path, 0o666)
    out = aidc_cli("runbook", "serve", "--port", "0", "--token-map", str(path), "--state-db", str(tmp_path / "s.db"),
                   "--audit-db", str(tmp_path / "a.db"), timeout=60)
    assert out.returncode != 0 and out.stderr.startswith(f"aidc: error: token map {path} is writable by others")
    assert not (tmp_path / "s.db").exists()
