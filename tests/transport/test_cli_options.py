"""Transport options of `aidc failover run` and `aidc agent run`: half a configuration, plain
HTTP or a missing file is one error line before anything starts, never a traceback."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("args, says", [
    (("failover", "run", "--ingest-address", "127.0.0.1:9443"), "--ingest-address needs --tls-cert, --tls-key and --client-ca"),
    (("failover", "run", "--ingest-address", "nonsense", "--tls-cert", "a", "--tls-key", "b", "--client-ca", "c"),
     "--ingest-address nonsense: expected HOST:PORT"),
    (("failover", "run", "--ingest-address", "127.0.0.1:1", "--tls-cert", "/nonexistent.crt", "--tls-key", "b",
      "--client-ca", "c"), "--tls-cert /nonexistent.crt: no such file"),
    (("failover", "run", "--client-ca", "c", "--tls-cert", "a", "--tls-key", "b"), "need --ingest-address HOST:PORT"),
    (("agent", "run", "--node", "gpu-0", "--store", "s.db", "--audit-db", "a.db", "--controller-url",
      "http://127.0.0.1:9443", "--tls-cert", "a", "--tls-key", "b", "--ca", "c"), "expected https://HOST:PORT"),
    (("agent", "run", "--node", "gpu-0", "--store", "s.db", "--audit-db", "a.db", "--controller-url",
      "https://127.0.0.1:9443"), "needs --tls-cert, --tls-key and --ca"),
    (("agent", "run", "--node", "gpu-0", "--store", "s.db", "--audit-db", "a.db", "--ca", "c"),
     "--ca given without --controller-url"),
])
def test_transport_options_that_do_not_fit_are_one_error_line(aidc_cli, tmp_path, args, says):
    # The controller gets a lab directory that must not be created; the agent no metrics port.
    extra = ("--lab-dir", str(tmp_path / "lab")) if args[0] == "failover" else ("--port", "0")
    proc = aidc_cli(*args, *extra, cwd=tmp_path)
    assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "lab").exists()  # nothing was started or created


def test_a_relay_the_spec_does_not_list_is_one_error_line(aidc_cli, tmp_path, pki):
    # The lab stack lists no relays (transport.relays): --allow-client names nothing it may speak for.
    tls = ("--tls-cert", str(pki["server"].cert), "--tls-key", str(pki["server"].key),
           "--client-ca", str(pki["ca"].cert_file))
    proc = aidc_cli("failover", "run", "--ingest-address", "127.0.0.1:0", *tls, "--allow-client", "relay",
                    "--lab-dir", str(tmp_path / "lab"), cwd=tmp_path)
    assert proc.returncode == 2 and "--allow-client relay: not a relay of stack lab" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "lab").exists()
