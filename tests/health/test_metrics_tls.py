"""The agent's /metrics over HTTPS: a scraper that trusts the CA reads it, plain HTTP gets no
page; with a client CA only scrapers holding its certificates do."""

from __future__ import annotations

import http.client
import ssl

import pytest

from aidc.device import sim
from tests.health.conftest import free_port, wait_for
from tests.health.test_cli import start_agent, stop_agent
from tests.runbook.certs import CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    ca = CA.create(root, "metrics-ca")
    return {"ca": ca, "server": ca.issue(root, "n1", server=True),
            "prometheus": ca.issue(root, "prometheus", server=False)}


def scrape_https(port: int, context: ssl.SSLContext) -> tuple[int, str]:
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=context)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def scrape_or_none(port, context):
    try:
        return scrape_https(port, context)
    except (OSError, ssl.SSLError):
        return None


def test_metrics_over_tls_are_read_with_the_ca_and_plain_http_is_refused(tmp_path, pki):
    node_dir = sim.create_node(tmp_path / "n1", "n1", gpus=1)
    port = free_port()
    proc = start_agent(tmp_path, "--node", "n1", "--backend", "sim", "--node-dir", str(node_dir), "--port", str(port),
                       "--metrics-tls-cert", str(pki["server"].cert), "--metrics-tls-key", str(pki["server"].key))
    try:
        trusting = ssl.create_default_context(cafile=str(pki["ca"].cert_file))
        wait_for(lambda: scrape_or_none(port, trusting) is not None)
        status, page = scrape_https(port, trusting)
        assert status == 200 and 'aidc_agent_info{Hostname="n1"' in page
        with pytest.raises(ssl.SSLCertVerificationError):  # a scraper without the CA does not trust it
            scrape_https(port, ssl.create_default_context())
        plain = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        with pytest.raises((ConnectionError, http.client.BadStatusLine, http.client.RemoteDisconnected)):
            plain.request("GET", "/metrics")
            plain.getresponse().read()
        plain.close()
    finally:
        code, _, err = stop_agent(proc)
    assert code == 0, err
    assert f"https://127.0.0.1:{port}/metrics" in err


def test_with_a_client_ca_only_its_scrapers_read_the_metrics(tmp_path, pki):
    node_dir = sim.create_node(tmp_path / "n1", "n1", gpus=1)
    port = free_port()
    proc = start_agent(tmp_path, "--node", "n1", "--backend", "sim", "--node-dir", str(node_dir), "--port", str(port),
                       "--metrics-tls-cert", str(pki["server"].cert), "--metrics-tls-key", str(pki["server"].key),
                       "--metrics-client-ca", str(pki["ca"].cert_file))
    try:
        prometheus = ssl.create_default_context(cafile=str(pki["ca"].cert_file))
        prometheus.load_cert_chain(str(pki["prometheus"].cert), str(pki["prometheus"].key))
        wait_for(lambda: scrape_or_none(port, prometheus) is not None)
        assert scrape_https(port, prometheus)[0] == 200
        anonymous = ssl.create_default_context(cafile=str(pki["ca"].cert_file))
        with pytest.raises((ssl.SSLError, ConnectionError)):
            scrape_https(port, anonymous)
    finally:
        code, _, err = stop_agent(proc)
    assert code == 0, err


def test_half_a_tls_configuration_or_a_missing_file_is_one_error_line(tmp_path, aidc_cli, pki):
    node_dir = sim.create_node(tmp_path / "n1", "n1", gpus=1)
    base = ("agent", "run", "--node", "n1", "--backend", "sim", "--node-dir", str(node_dir),
            "--store", str(tmp_path / "s.db"), "--audit-db", str(tmp_path / "a.db"), "--port", str(free_port()))
    half = aidc_cli(*base, "--metrics-tls-cert", str(pki["server"].cert))
    assert half.returncode != 0 and half.stderr.startswith("aidc: error: --metrics-tls-cert and --metrics-tls-key")
    missing = aidc_cli(*base, "--metrics-tls-cert", str(tmp_path / "nope.crt"), "--metrics-tls-key",
                       str(pki["server"].key))
    assert missing.returncode != 0 and missing.stderr.count("\n") == 1
    assert "metrics TLS: --metrics-tls-cert" in missing.stderr and "no such file" in missing.stderr
