"""`aidc kms` as a user runs it: init, rotate (with re-wrap, dry run, audit), public-key, status; one error line."""

from __future__ import annotations

import json
import os

import pytest

from aidc.kms import verify_with_pem
from aidc.kms.local import LocalKeyring

LAB_STACK = """config:
  aidc:cluster:
    name: t
    device_backend: sim
    scheduler: lab
    node_pools: [{name: gpu, count: 2, gpu_model: SIM, gpus_per_node: 2}]
    kms: %s
"""


def _stack(tmp_path, kms: str, name: str = "Pulumi.t.yaml"):
    path = tmp_path / name
    path.write_text(LAB_STACK % kms)
    return str(path)


def _one_error_line(proc, *needles: str) -> str:
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("aidc: error:"), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_init_rotate_rewrap_and_status_on_a_lab_keyring(tmp_path, aidc_cli):
    torch = pytest.importorskip("torch")
    from aidc.checkpoint import load, read_header, save

    lab = tmp_path / "lab"
    assert aidc_cli("kms", "init", "--lab-dir", str(lab)).returncode == 0
    keyring = LocalKeyring(lab / "keyring")
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for step in (1, 2):
        save(ckpts / f"step-{step}.ckpt", {"w": torch.full((3,), float(step))}, job="j", step=step, kms=keyring)

    plan = aidc_cli("kms", "rotate", "--lab-dir", str(lab), "--rewrap", str(ckpts), "--dry-run", "--json")
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["new_version"] == 2 and keyring.current_version() == 1  # nothing changed

    audit = tmp_path / "audit.db"
    done = aidc_cli("kms", "rotate", "--lab-dir", str(lab), "--rewrap", str(ckpts), "--audit-db", str(audit), "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (result["previous_version"], result["current_version"]) == (1, 2)
    assert [(r["from_version"], r["to_version"]) for r in result["rewrapped"]] == [(1, 2), (1, 2)]
    assert all(read_header(ckpts / f"step-{s}.ckpt").wrapped.version == 2 for s in (1, 2))
    assert torch.equal(load(ckpts / "step-2.ckpt", job="j", kms=keyring)["w"], torch.full((3,), 2.0))

    from aidc.audit import AuditLog

    with AuditLog(audit) as log:
        [record] = log.records(kind="kms.rotate")
    assert record.payload["current_version"] == 2 and len(record.payload["rewrapped"]) == 2

    status = json.loads(aidc_cli("kms", "status", "--lab-dir", str(lab), "--json").stdout)
    assert status["kek_versions"] == [1, 2] and status["signing_algorithm"] == "Ed25519"
    pem = aidc_cli("kms", "public-key", "--lab-dir", str(lab)).stdout
    assert verify_with_pem(pem, b"record", keyring.sign(b"record"))


def test_kms_bad_input_is_one_error_line(tmp_path, aidc_cli):
    _one_error_line(aidc_cli("kms", "status", "--lab-dir", str(tmp_path / "none")), "no keyring at", "aidc kms init")
    vault = _stack(tmp_path, "{provider: vault-transit, key_id: 'transit/aidc'}")
    _one_error_line(aidc_cli("kms", "rotate", "--stack", vault), "'vault-transit' is not available in this build")
    lab = tmp_path / "lab"
    assert aidc_cli("kms", "init", "--lab-dir", str(lab)).returncode == 0
    _one_error_line(aidc_cli("kms", "init", "--lab-dir", str(lab)), "a keyring already exists")
    _one_error_line(aidc_cli("kms", "rotate", "--lab-dir", str(lab), "--rewrap", str(tmp_path / "gone.ckpt")),
                    "gone.ckpt: no such checkpoint or directory")
    os.chmod(lab / "keyring", 0o755)
    _one_error_line(aidc_cli("kms", "public-key", "--lab-dir", str(lab)), "accessible to group or others")


def test_pkcs11_key_through_the_cli(tmp_path, aidc_cli, softhsm):
    stack = _stack(tmp_path, "{provider: pkcs11, key_id: cli-key, pkcs11: {module: %s, token_label: %s, "
                             "pin_env: AIDC_CLI_PIN}}" % (softhsm["module"], softhsm["label"]))
    env = {**os.environ, "AIDC_CLI_PIN": softhsm["pin"]}
    _one_error_line(aidc_cli("kms", "status", "--stack", stack, env=env), "holds no key 'cli-key'")
    assert aidc_cli("kms", "init", "--stack", stack, env=env).returncode == 0
    assert aidc_cli("kms", "rotate", "--stack", stack, env=env).returncode == 0
    status = json.loads(aidc_cli("kms", "status", "--stack", stack, "--json", env=env).stdout)
    assert status["provider"] == "pkcs11" and status["kek_versions"] == [1, 2]
    assert aidc_cli("kms", "public-key", "--stack", stack, env=env).stdout.startswith("-----BEGIN PUBLIC KEY-----")
    _one_error_line(aidc_cli("kms", "status", "--stack", stack, env={**env, "AIDC_CLI_PIN": "000000"}),
                    "refused the PIN")


def test_a_lab_node_without_its_keyring_stops_at_start_with_one_error_line(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "aidc.lab.node_launcher", "--node", "gpu-0", "--lab-dir", str(tmp_path),
                           "--rdzv", "127.0.0.1:1", "--nnodes", "2"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"aidc: error: no keyring at {tmp_path / 'keyring'} (create one with `aidc kms init`)"
