"""A site as its operator describes it, for the role converge tests: the lab stack with real
host addresses, a controller host and TLS on, and the PKI the roles distribute."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import yaml

from aidc.stack_yaml import load_stack_yaml
from ansible_sandbox import ROOT
from runbook.certs import CA

LAB_STACK = ROOT / "Pulumi.lab.yaml"
# The lab's pool on a network of its own: gpu-0..3, then gpu-spare-0; a controller host; metrics
# over mutual TLS. Nothing outside the namespaces this test makes carries these addresses.
NODE_ADDRESSES = ["10.251.0.10", "10.251.0.11", "10.251.0.12", "10.251.0.13", "10.251.0.19"]
CONTROLLER_ADDRESS = "10.251.0.2"  # also the scraper's: the host on the other end of the wire


def production_shaped_lab(directory: Path, scheduler: str = "lab") -> Path:
    """The lab stack as a site without Kubernetes writes it: real host addresses, a controller
    host, events forwarded over mutual TLS and /metrics served over it."""
    doc = load_stack_yaml(LAB_STACK.read_text())
    cluster = doc["config"]["aidc:cluster"]
    cluster["scheduler"] = scheduler
    cluster["node_pools"][0]["addresses"] = NODE_ADDRESSES
    cluster["controller"] = {"hosts": [{"name": "ctl-0", "address": CONTROLLER_ADDRESS}]}
    cluster["agent"]["metrics_tls"] = "mutual"
    path = directory / "Pulumi.site.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def site_pki(directory: Path) -> tuple[Path, dict]:
    """aidc_agent_pki_dir as the roles read it: ca.crt; <host>.crt and <host>.key for gpu-0 (both ends:
    it serves /metrics and reports to the controller) and ctl-0 (its listeners); alertmanager.crt
    and .key (the receiver's client). And a scraper's client certificate."""
    ca = CA.create(directory / "ca", "aidc-site-ca")
    pki = directory / "pki"
    pki.mkdir()
    shutil.copy(ca.cert_file, pki / "ca.crt")
    ca.issue(pki, "gpu-0", server=True, client_too=True, addresses=(NODE_ADDRESSES[0],))
    ca.issue(pki, "ctl-0", server=True, addresses=(CONTROLLER_ADDRESS,))
    ca.issue(pki, "alertmanager", server=False)
    scraper = ca.issue(directory / "ca", "prometheus", server=False)
    return pki, {"ca": str(ca.cert_file), "cert": str(scraper.cert), "key": str(scraper.key)}


def scrape(netns: str, url: str, scraper: dict, timeout_s: float = 45.0, any_status: bool = False,
           alive: subprocess.Popen | None = None) -> str:
    """GET url from inside `netns` (this machine's python3, a TLS client with the scraper's
    certificate), retried until the server answers or the time is up. `any_status`: an HTTP
    error status is an answer too (returned as "HTTP <code>"). `alive`: the server's process, whose
    exit ends the wait at once."""
    code = ("import ssl, sys, urllib.error, urllib.request\n"
            "ctx = ssl.create_default_context(cafile=sys.argv[2]); ctx.load_cert_chain(sys.argv[3], sys.argv[4])\n"
            "try:\n"
            "    print(urllib.request.urlopen(sys.argv[1], context=ctx, timeout=5).read().decode())\n"
            "except urllib.error.HTTPError as exc:\n"
            "    if sys.argv[5] != '1': raise\n"
            "    print(f'HTTP {exc.code}')\n")
    deadline, last = time.monotonic() + timeout_s, ""
    while time.monotonic() < deadline:
        if alive is not None and alive.poll() is not None:
            raise AssertionError(f"the server exited ({alive.returncode}) before {url} answered")
        done = subprocess.run(["ip", "netns", "exec", netns, "/usr/bin/python3", "-c", code, url,
                               scraper["ca"], scraper["cert"], scraper["key"], "1" if any_status else "0"],
                              capture_output=True, text=True, timeout=30)
        if done.returncode == 0:
            return done.stdout
        last = done.stderr[-500:]
        time.sleep(0.5)
    raise AssertionError(f"no answer from {url} within {timeout_s} s: {last}")
