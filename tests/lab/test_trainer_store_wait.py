"""A worker of a new round waits for rank 0's store server by connecting every 10 ms, instead of
TCPStore's client backoff (lab/trainer.py `_wait_for_store_server`)."""

from __future__ import annotations

import socket
import threading
import time

import pytest

pytest.importorskip("torch")

from aidc.lab.trainer import _wait_for_store_server  # noqa: E402
from aidc.polling import free_port  # noqa: E402


def test_a_rank_that_starts_first_returns_once_rank_0_listens_having_reached_it(monkeypatch):
    port = free_port()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    accepted = threading.Event()

    def rank_0_starts_late():
        time.sleep(0.2)  # the server is not there yet when the wait begins
        with socket.create_server(("127.0.0.1", port)) as server:
            server.settimeout(30)
            server.accept()[0].close()
            accepted.set()

    starter = threading.Thread(target=rank_0_starts_late, daemon=True)
    starter.start()
    _wait_for_store_server(timeout_s=30)
    starter.join(30)
    assert accepted.is_set(), "it returned only after reaching rank 0's server"


def test_rank_0_does_not_wait_for_its_own_server(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))  # nothing listens: a wait would last the timeout
    _wait_for_store_server(timeout_s=600)


def test_with_no_server_the_wait_ends_at_its_bound_and_leaves_the_rest_to_torch(monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    _wait_for_store_server(timeout_s=0.05)  # returns; init_process_group's own timeout then applies
