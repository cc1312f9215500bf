"""The lab: one command certifies the cluster, catches a fault, fails over and audits it."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aidc.lab import fabric
from aidc.lab.cluster import LabCluster, LabError
from aidc.spec import load_stack


ROOT = Path(__file__).resolve().parents[2]


def readme_block(section: str) -> list[str]:
    """The command lines of the first code block under the README's `## section`."""
    text = (ROOT / "README.md").read_text().split(f"\n## {section}\n", 1)[1]
    block = text.split("```\n", 2)[1]
    return [line for line in block.splitlines() if line.strip()]


def fresh_copy(dest: Path) -> Path:
    """The repository's tracked files, as a fresh clone has them (nothing built, no .aidc/)."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


@pytest.mark.slow
def test_the_readme_quickstart_runs_from_a_fresh_copy_certifies_fails_over_to_the_spare_and_audits(aidc_cli, tmp_path):
    """Each `aidc` line of the README's Quickstart, in order, in a copy of the tracked files (the
    `make` line is what `make test` itself did). `aidc lab run` also gets `--json` so that its
    summary can be checked; everything else runs as written."""
    repo = fresh_copy(tmp_path / "clone")
    env = {k: v for k, v in os.environ.items() if k != "AIDC_ROOT"}  # found from the working directory
    env["PYTHONPATH"] = str(repo / "agents")
    lab_dir = repo / ".aidc" / "lab"
    ran: dict[str, subprocess.CompletedProcess] = {}
    commands = [shlex.split(line, comments=True) for line in readme_block("Quickstart")]
    commands = [words for words in commands if words and words[0] == "aidc"]
    assert [words[1:3] for words in commands][:2] == [["lab", "run"], ["failover", "status"]]
    for words in commands:
        args = words[1:] + (["--json"] if words[1:3] == ["lab", "run"] else [])
        done = subprocess.run([sys.executable, "-m", "aidc", *args], cwd=repo, env=env, capture_output=True,
                              text=True, timeout=570)
        assert done.returncode == 0, f"{' '.join(words)}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        ran[" ".join(words[1:3])] = done
    out = ran["lab run"]
    # The quickstart's follow-up commands said what they are for.
    assert "quarantined" in ran["failover status"].stdout
    assert (repo / ".aidc" / "report" / "report.html").exists()
    assert "h100-example" in ran["spec check"].stdout + ran["spec check"].stderr
    summary = json.loads(out.stdout)
    for key in ("certified_nodes", "detect_ms", "resume_s", "steps_lost", "ettr", "report_html", "audit_db"):
        assert key in summary, key
    assert summary["certified_nodes"] == ["gpu-0", "gpu-1", "gpu-2", "gpu-3", "gpu-spare-0"]
    assert summary["completed"] and summary["audit_verified"]
    if os.geteuid() == 0:  # as root the lab runs on its netns fabric: burn-in and training over the rails
        assert summary["fabric"] == {"kind": "netns", "rails": 2, "rail_mbit": 200.0, "scale": 0.02, "training": True}
        assert fabric.list_namespaces(fabric.lab_tag(lab_dir)) == []  # removed with the lab
    assert summary["detect_ms"] > 0 and summary["resume_s"] > 0
    assert summary["steps_lost"] <= 1  # checkpoints every step
    assert 0 < summary["ettr"] <= 1
    # Training was shown as it went (on stderr under --json), the spare's membership included.
    assert "training: step" in out.stderr and "new membership" in out.stderr
    # ETTR comes from the job's goodput step log: six parts that add up to the allocation's wall
    # time, the one fault and its restart in them, and an advised checkpoint interval.
    goodput = summary["goodput"]
    assert summary["ettr"] == round(goodput["ettr"], 3)
    assert sum(goodput["seconds"].values()) == pytest.approx(goodput["wall_s"], abs=0.01)
    assert goodput["faults"] == 1 and goodput["restarts"] == 1 and goodput["seconds"]["detection"] > 0
    assert summary["checkpoint_advice"]["advised_interval_s"] > 0
    assert summary["checkpoint_advice"]["mtbf"]["source"] == "audit"
    # One vocabulary and one number per figure (aidc.milestones): decided before quarantined, and
    # the lab's resume_s is the goodput accounting's.
    assert 0 < summary["detect_ms"] <= summary["quarantine_ms"]
    assert summary["resume_s"] == goodput["resume_s"][-1]
    # The burn-in said its phases as it went; torch's own warnings stayed in the lab's log.
    assert "burn-in: collectives" in out.stderr and "burn-in: training" in out.stderr
    assert "[c10d]" not in out.stderr and "UserWarning" not in out.stderr

    # The training finished on the new membership: the spare replaced the faulty node.
    steps = [json.loads(line) for line in (lab_dir / "train" / "steps.jsonl").read_text().splitlines()]
    assert steps[-1]["step"] == load_stack("lab").lab.train_steps
    assert "gpu-spare-0" in steps[-1]["world"] and summary["victim"] not in steps[-1]["world"]

    # It trained on encrypted checkpoints, and says under which key version.
    assert summary["checkpoint_key"] == {"checkpoint": f"step-{steps[-1]['step']:08d}.ckpt", "cipher": "AES-256-GCM",
                                         "provider": "local", "key_id": "aidc-lab-key", "key_version": 1}
    ckpts = sorted((lab_dir / "checkpoints").glob("step-*.ckpt"))
    assert ckpts and all(p.read_bytes()[:8] == b"AIDCCKPT" for p in ckpts)

    # Every stage left its mark in one verified log.
    kinds = {r["kind"] for r in json.loads((lab_dir / "report" / "report.json").read_text())["records"]}
    assert {"burnin.certificate", "health.fault", "failover.decision", "failover.action",
            "lab.inject", "lab.resume", "lab.summary", "kms.keyring.created", "goodput.report"} <= kinds
    html = (lab_dir / "report" / "report.html").read_text()
    assert "Hash chain verified" in html and "gpu-spare-0" in html
    assert "AES-256-GCM, key aidc-lab-key version 1 (local)" in html
    assert "Goodput: job aidc-lab" in html and "Checkpoint interval advised (Daly 2006)" in html

    # The fleet-health figure of the run (aidc.fleet): every installed GPU certified, the faulty
    # node's two out of service; across the run, the drop at its quarantine.
    health = aidc_cli("fleet", "health", "--state-dir", str(lab_dir), "--json")
    assert health.returncode == 0, health.stderr
    installed = 2 * len(summary["certified_nodes"])
    assert json.loads(health.stdout)["fleet"] == {
        "healthy_gpu_ratio": round((installed - 2) / installed, 6), "installed_gpus": installed,
        "certified_gpus": installed, "in_service_gpus": installed - 2, "healthy_gpus": installed - 2}
    records = json.loads((lab_dir / "report" / "report.json").read_text())["records"]
    start, end = records[0]["ts"], records[-1]["ts"]
    run = json.loads(aidc_cli("fleet", "health", "--state-dir", str(lab_dir), "--json",
                              "--compare", str(start), str(end)).stdout)
    assert run["before"]["fleet"]["healthy_gpus"] == 0 and run["after"]["fleet"]["healthy_gpus"] == installed - 2
    assert [c["node"] for c in run["changes"] if c["kind"] == "failover.action"] == [summary["victim"]]

    # Nothing the lab started is left running once `aidc lab down` ran.
    assert LabCluster(load_stack("lab"), lab_dir).running() == []

    # The log is signed with the lab's keyring from every writer, and a burn-in certificate
    # exported from it verifies offline with the public key alone.
    key_file = tmp_path / "signing.pem"
    public_key = aidc_cli("kms", "public-key", "--lab-dir", str(lab_dir))
    assert public_key.returncode == 0, public_key.stderr
    key_file.write_text(public_key.stdout)
    signed = aidc_cli("audit", "verify", "--db", summary["audit_db"], "--public-key", str(key_file), "--json")
    assert signed.returncode == 0, signed.stdout + signed.stderr
    assert json.loads(signed.stdout)["signed"]
    cert = tmp_path / "gpu-spare-0.cert.json"
    assert aidc_cli("burnin", "certificate", "export", "gpu-spare-0", "--db", summary["audit_db"],
                    "--out", str(cert)).returncode == 0
    assert aidc_cli("burnin", "certificate", "verify", str(cert), "--public-key", str(key_file)).returncode == 0

    # The lab run installed its key (installation.json): verifying without --public-key checks it too.
    plain = aidc_cli("audit", "verify", "--db", summary["audit_db"], "--json")
    assert plain.returncode == 0 and json.loads(plain.stdout)["signed"], plain.stdout + plain.stderr
    # One row changed with the sqlite3 shell breaks verification, naming the record.
    if shutil.which("sqlite3"):
        subprocess.run(["sqlite3", summary["audit_db"], "UPDATE audit SET reason = 'all good' WHERE seq = 3"],
                       check=True)
    else:
        db = sqlite3.connect(summary["audit_db"])
        db.execute("UPDATE audit SET reason = 'all good' WHERE seq = 3")
        db.commit()
    failed = aidc_cli("audit", "verify", "--db", summary["audit_db"], "--json")
    assert failed.returncode == 1
    assert json.loads(failed.stdout)["first_bad_seq"] == 3


def test_lab_down_stops_what_a_kept_lab_left_running(aidc_cli, tmp_path):
    cluster = LabCluster(load_stack("lab"), tmp_path / "lab")
    cluster.create()
    cluster.start_agent("gpu-0")
    assert [p["name"] for p in cluster.running()] == ["agent:gpu-0"]
    listed = aidc_cli("lab", "status", "--lab-dir", str(cluster.dir), "--json")
    assert [p["name"] for p in json.loads(listed.stdout)["running"]] == ["agent:gpu-0"]
    out = aidc_cli("lab", "down", "--lab-dir", str(cluster.dir), "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["stopped"] == 1
    for _ in range(50):
        if not cluster.running():
            break
        time.sleep(0.1)
    assert cluster.running() == []


def test_a_running_lab_is_not_overwritten(tmp_path):
    cluster = LabCluster(load_stack("lab"), tmp_path / "lab")
    cluster.create()
    cluster.start("sleeper", ["sleep", "60"])
    try:
        with pytest.raises(LabError, match="already running"):
            LabCluster(load_stack("lab"), tmp_path / "lab").create()
    finally:
        cluster.stop()


def test_lab_run_refused_on_a_running_lab_reports_that_and_leaves_it_alone(aidc_cli, tmp_path):
    cluster = LabCluster(load_stack("lab"), tmp_path / "lab")
    cluster.create()
    cluster.start("sleeper", ["sleep", "60"])
    try:
        out = aidc_cli("lab", "run", "--lab-dir", str(cluster.dir))
        assert out.returncode == 1 and "already running" in out.stderr and "Traceback" not in out.stderr
        assert [p["name"] for p in cluster.running()] == ["sleeper"]
    finally:
        cluster.stop()
