"""The daemons' configuration: flag > AIDC_<OPTION> environment > --config file > spec > default,
shown by --print-config with where each value came from; JSON logs in one schema for every daemon."""

from __future__ import annotations

import io
import json
import logging

import pytest
from typer.testing import CliRunner

from aidc.cli.main import build_app


def print_config(group: str, args: list[str], env: dict | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(build_app(group), [group, *args, "--print-config"], env=env or {})
    return result.exit_code, result.output


def agent_settings(args: list[str], env: dict | None = None) -> dict:
    code, out = print_config("agent", ["run", *args, "--json"], env)
    assert code == 0, out
    return json.loads(out)


def test_each_layer_wins_over_the_ones_below_it(tmp_path):
    config = tmp_path / "agent.yaml"
    config.write_text("node: from-file\npoll-interval: 0.5\nlisten-address: 0.0.0.0:9400\nstate-dir: /srv/file\n")
    got = agent_settings(["--config", str(config), "--node", "from-flag"],
                         env={"AIDC_POLL_INTERVAL": "0.25", "AIDC_STATE_DIR": "/srv/env"})
    seen = {name: (entry["value"], entry["source"]) for name, entry in got.items()}
    assert seen["node"] == ("from-flag", "flag")  # flag over file
    assert seen["poll-interval"] == (0.25, "env")  # env over file
    assert seen["state-dir"] == ("/srv/env", "env")
    assert seen["listen-address"] == ("0.0.0.0:9400", "file")  # file over default
    assert seen["device-timeout"] == (2.0, "default")
    assert got["poll-interval"]["env"] == "AIDC_POLL_INTERVAL"


def test_the_config_file_can_come_from_the_environment_too(tmp_path):
    config = tmp_path / "agent.yaml"
    config.write_text("node: gpu-7\n")
    got = agent_settings([], env={"AIDC_CONFIG": str(config)})
    assert got["node"] == {"value": "gpu-7", "source": "file", "env": "AIDC_NODE"}


def test_the_spec_sits_between_the_file_and_the_default(tmp_path):
    lab = tmp_path / "lab"
    (lab / "nodes").mkdir(parents=True)
    code, out = print_config("failover", ["run", "--state-dir", str(lab)])
    assert code == 0, out
    rows = {line.split()[0]: line.split()[-1] for line in out.splitlines()}
    assert rows["dry-run"] == "spec"  # the lab stack's policy.dry_run, nothing above it set
    code, out = print_config("failover", ["run", "--state-dir", str(lab)], env={"AIDC_DRY_RUN": "true"})
    assert {line.split()[0]: line.split()[-1] for line in out.splitlines()}["dry-run"] == "env"


def test_secrets_are_redacted(tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret-value\n")
    lab = tmp_path / "lab"
    (lab / "nodes").mkdir(parents=True)
    code, out = print_config("runbook", ["serve", "--state-dir", str(lab), "--token-file", str(token)])
    assert code == 0, out
    assert "s3cret" not in out and str(token) not in out
    assert [line for line in out.splitlines() if line.startswith("token-file")][0].split()[1] == '"<redacted>"'


def test_an_unknown_setting_in_the_file_is_an_error_naming_the_valid_ones(tmp_path):
    config = tmp_path / "agent.yaml"
    config.write_text("nod: gpu-1\n")
    result = CliRunner().invoke(build_app("agent"), ["agent", "run", "--config", str(config), "--print-config"])
    assert result.exit_code != 0
    assert "unknown setting(s) nod" in str(result.exception) and "node" in str(result.exception)


@pytest.mark.parametrize("daemon", ["aidc.agent", "aidc.failover"])
def test_json_logs_share_the_receivers_schema(daemon):
    from aidc.logs import DaemonLog, JsonLines
    from aidc.runbook import serve_metrics

    assert serve_metrics.JsonLines is JsonLines  # runbook serve writes through the same class
    stream = io.StringIO()
    log = DaemonLog(daemon, "json", stream)
    log.capture("aidc.test_daemon_config")
    log.say("ready", event="ready", port=9400)
    logging.getLogger("aidc.test_daemon_config.child").warning("device poll error: %s", "timeout")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["msg"] for line in lines] == ["ready", "device poll error: timeout"]
    for line in lines:
        assert list(line)[:4] == ["ts", "level", "logger", "msg"] and line["ts"].endswith("Z")
    assert lines[0] | {"ts": None} == {"ts": None, "level": "info", "logger": daemon, "msg": "ready",
                                       "event": "ready", "port": 9400}
    assert lines[1]["level"] == "warning" and lines[1]["logger"] == "aidc.test_daemon_config.child"


def test_text_logs_stay_sentences():
    from aidc.logs import DaemonLog

    stream = io.StringIO()
    log = DaemonLog("aidc.agent", "text", stream)
    log.say("watching gpu-1 (sim)")
    log.event("machine-only line")
    assert stream.getvalue() == "aidc agent: watching gpu-1 (sim)\n"


@pytest.mark.slow
def test_the_controller_logs_json_lines_in_the_receivers_schema(tmp_path):
    """End to end: `aidc failover run --log-format json` starts, says so in one JSON line, stops on SIGTERM."""
    import select
    import signal
    import subprocess
    import sys
    import time

    lab = tmp_path / "lab"
    (lab / "nodes").mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-m", "aidc", "failover", "run", "--state-dir", str(lab),
                             "--log-format", "json", "--listen-address", "127.0.0.1:0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        line = ""
        while not line and time.monotonic() < deadline and proc.poll() is None:
            if select.select([proc.stderr], [], [], 1.0)[0]:
                line = proc.stderr.readline()
        record = json.loads(line)
        assert list(record)[:4] == ["ts", "level", "logger", "msg"]
        assert record["logger"] == "aidc.failover" and record["event"] == "ready" and record["stack"] == "lab"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0
