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
