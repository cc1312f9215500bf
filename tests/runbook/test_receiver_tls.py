"""The webhook receiver over HTTPS with mutual TLS, on loopback with a throwaway CA.

A sender without a certificate from the configured CA is refused in the TLS handshake,
before any HTTP; the receiver logs one line and keeps serving. The verified client's name
is written into the run's audited trigger.
"""

from __future__ import annotations

import http.client
import json
import ssl
import subprocess
import sys

import pytest

from aidc import polling
from aidc.errors import AidcError
from aidc.runbook import tls
from aidc.runbook.receiver import Receiver
from certs import CA
from runbook_fakes import QUARANTINE_AND_NOTIFY, alert

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    ca = CA.create(root, "aidc-test-ca")
    rogue_ca = CA.create(root / "rogue", "rogue-ca")
    return {"ca": ca, "server": ca.issue(root, "aidc-runbook", server=True),
            "client": ca.issue(root, "alertmanager", server=False),
            "intruder": rogue_ca.issue(root / "rogue", "intruder", server=False)}


@pytest.fixture
def start(make_engine, fakes, pki, serve_receiver):

    def start_receiver(token: str | None, client_ca: bool = True) -> Receiver:
        engine = make_engine(QUARANTINE_AND_NOTIFY)
        fakes.metrics.values['broken{Hostname="gpu-1"}'] = [1.0]
        config = tls.TLSConfig(pki["server"].cert, pki["server"].key, pki["ca"].cert_file if client_ca else None)
        return serve_receiver(engine, token, tls=config)

    return start_receiver


def client_context(pki, identity: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki["ca"].cert_file))
    if identity:
        ctx.load_cert_chain(str(pki[identity].cert), str(pki[identity].key))
    return ctx


def request(rec, pki, identity: str | None, method="POST", path="/alerts", body: bytes | None = None,
            token: str | None = None):
    conn = http.client.HTTPSConnection("127.0.0.1", rec.port, timeout=10, context=client_context(pki, identity))
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, (json.loads(data) if data else None)
    finally:
        conn.close()


def webhook(*alerts) -> bytes:
    return json.dumps({"version": "4", "status": "firing", "alerts": list(alerts)}).encode()


# Under TLS 1.3 the client may finish its side of the handshake before the server checks the
# client certificate; the refusal then surfaces on the first read as an SSL alert or a reset.
REFUSED = (ssl.SSLError, ConnectionError)


def test_a_client_certificate_from_the_ca_is_enough_without_a_token(start, pki):
    rec = start(token=None)
    status, reply = request(rec, pki, "client", body=webhook(alert("NodeBroken", "gpu-1", fingerprint="f1")))
    assert status == 200 and reply["results"][0]["outcome"] == "started"
    run = rec.engine.state.get_run(reply["results"][0]["run_id"])
    assert run.trigger["sender"] == {"address": "127.0.0.1", "client": "CN=alertmanager",
                                     "identity": "cert:alertmanager", "identities": ["cert:alertmanager"]}
    assert any(line.startswith("200 POST /alerts from 127.0.0.1 (CN=alertmanager)") for line in rec.lines)


@pytest.mark.parametrize("identity", [None, "intruder"], ids=["no-client-certificate", "certificate-of-another-ca"])
def test_senders_without_a_certificate_from_the_ca_are_refused_in_the_handshake(start, pki, identity):
    rec = start(token=None)
    with pytest.raises(REFUSED):
        request(rec, pki, identity, body=webhook(alert("NodeBroken", "gpu-1")))
    assert rec.engine.state.runs() == []
    polling.wait_for("the refusal's log line",
                     lambda: any(line.startswith("TLS handshake refused from 127.0.0.1") for line in rec.lines), 5.0)
    # ... and the receiver lives on for the rightful sender.
    assert request(rec, pki, "client", "GET", "/healthz")[0] == 200


def test_plain_http_to_the_tls_port_is_refused_and_the_receiver_lives_on(start, pki):
    rec = start(token=None)
    conn = http.client.HTTPConnection("127.0.0.1", rec.port, timeout=10)
    with pytest.raises((ConnectionError, http.client.BadStatusLine)):
        conn.request("POST", "/alerts", body=webhook(alert("NodeBroken", "gpu-1")))
        conn.getresponse()
    conn.close()
    assert rec.engine.state.runs() == []
    assert request(rec, pki, "client", "GET", "/healthz")[0] == 200


def test_with_a_token_and_mutual_tls_both_are_required(start, pki):
    rec = start(token=TOKEN)
    body = webhook(alert("NodeBroken", "gpu-1", fingerprint="f2"))
    assert request(rec, pki, "client", body=body)[0] == 401
    with pytest.raises(REFUSED):
        request(rec, pki, None, body=body, token=TOKEN)
    assert rec.engine.state.runs() == []
    status, reply = request(rec, pki, "client", body=body, token=TOKEN)
    assert status == 200 and reply["results"][0]["outcome"] == "started"


def test_tls_without_a_client_ca_still_needs_the_token(start, pki, make_engine):
    config = tls.TLSConfig(pki["server"].cert, pki["server"].key)
    with pytest.raises(ValueError, match="authentication is required"):
        Receiver(make_engine(QUARANTINE_AND_NOTIFY), None, "127.0.0.1", 0, tls=config)
    rec = start(token=TOKEN, client_ca=False)  # HTTPS + token: a client certificate is not asked for
    assert request(rec, pki, None, body=webhook(alert("NodeBroken", "gpu-1")))[0] == 401
    assert request(rec, pki, None, body=webhook(alert("NodeBroken", "gpu-1")), token=TOKEN)[0] == 200


def test_half_a_tls_configuration_is_an_error_not_plain_http(pki, tmp_path):
    server, ca = pki["server"], pki["ca"].cert_file
    assert tls.from_options(None, None, None) is None
    with pytest.raises(AidcError, match="--client-ca needs --tls-cert and --tls-key"):
        tls.from_options(None, None, ca)
    with pytest.raises(AidcError, match="go together"):
        tls.from_options(server.cert, None, None)
    assert tls.from_options(server.cert, server.key, ca).mutual


def test_bad_certificate_files_are_named_at_start_up(pki, tmp_path):
    server, client = pki["server"], pki["client"]
    with pytest.raises(AidcError, match=r"--tls-cert .*missing\.crt: no such file"):
        tls.TLSConfig(tmp_path / "missing.crt", server.key).server_context()
    with pytest.raises(AidcError, match="not a matching PEM certificate and key"):
        tls.TLSConfig(server.cert, client.key).server_context()
    garbage = tmp_path / "ca.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(AidcError, match=r"--client-ca .*ca\.pem: not a PEM CA certificate"):
        tls.TLSConfig(server.cert, server.key, garbage).server_context()


def test_serve_refuses_to_start_without_any_authentication(tmp_path, pki):
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)}
    base = [sys.executable, "-m", "aidc", "runbook", "serve", "--port", "0", "--lab-dir", str(tmp_path / "lab")]
    # HTTPS without a client CA and without a token: nobody would be authenticated.
    proc = subprocess.run([*base, "--tls-cert", str(pki["server"].cert), "--tls-key", str(pki["server"].key)],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode != 0 and "authentication is required" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([*base, "--client-ca", str(pki["ca"].cert_file)], capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode != 0 and "--client-ca needs --tls-cert and --tls-key" in proc.stderr
