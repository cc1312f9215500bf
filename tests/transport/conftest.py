"""Fixtures for the event transport: a throwaway PKI and controllers' listeners."""

from __future__ import annotations

import pytest

from tests.transport.transport_helpers import CA, Controller


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    ca = CA.create(root, "aidc-cluster-ca")
    rogue = CA.create(root / "rogue", "rogue-ca")
    issued = {name: ca.issue(root, name, server=False) for name in ("gpu-0", "gpu-1", "relay")}
    return {"ca": ca, "server": ca.issue(root, "aidc-controller", server=True), **issued,
            "intruder": rogue.issue(root / "rogue", "gpu-0", server=False)}


@pytest.fixture
def controller(pki, tmp_path):
    made: list[Controller] = []

    def make(relays=None, start: bool = True) -> Controller:
        c = Controller(pki, tmp_path / "controller", relays or {})
        (tmp_path / "controller").mkdir(exist_ok=True)
        made.append(c)
        return c.start() if start else c

    yield make
    for c in made:
        c.stop()
