"""A SoftHSM2 token made for the test session, in its own token directory."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SOFTHSM_MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
TOKEN_LABEL = "aidc-test"
USER_PIN, SO_PIN = "246810", "13579111"


def softhsm_missing() -> str | None:
    if not shutil.which("softhsm2-util") or not SOFTHSM_MODULE.exists():
        return "softhsm2 is not installed (make system-deps installs it)"
    try:
        import pkcs11  # noqa: F401
    except ImportError:
        return "python-pkcs11 is not installed (pip install -r requirements.lock)"
    return None


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory):
    """SOFTHSM2_CONF for the whole session: SoftHSM reads it once per process (C_Initialize)."""
    reason = softhsm_missing()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("softhsm")
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", TOKEN_LABEL, "--so-pin", SO_PIN,
                    "--pin", USER_PIN], env=env, check=True, capture_output=True, timeout=30)
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    yield {"conf": conf, "module": str(SOFTHSM_MODULE), "label": TOKEN_LABEL, "pin": USER_PIN}
    if previous is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = previous


# -- AWS KMS: moto's server on loopback, a real HTTP endpoint boto3 reaches through AWS_ENDPOINT_URL --
MOTO_ACCOUNT = "111122223333"  # the account Pulumi.h100-example.yaml's key ARNs name
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "AWS_DEFAULT_REGION": "us-east-1"}


def moto_missing() -> str | None:
    import importlib.util

    for module, package in (("boto3", "boto3"), ("moto", "moto[server]"), ("flask", "moto[server]")):
        if importlib.util.find_spec(module) is None:
            return f"{package} is not installed (pip install --no-deps --require-hashes -r requirements-aws.lock)"
    return None


@pytest.fixture(scope="session")
def moto_kms(tmp_path_factory):
    """moto's server (started by PID, stopped at the end) and the environment that points boto3 at it."""
    import socket
    import sys
    import time

    reason = moto_missing()
    if reason:
        pytest.skip(reason)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  env={**os.environ, "MOTO_ACCOUNT_ID": MOTO_ACCOUNT}, stdout=out,
                                  stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.1)
        env = {**AWS_ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield {"endpoint": env["AWS_ENDPOINT_URL"], "env": env, "account": MOTO_ACCOUNT}
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
