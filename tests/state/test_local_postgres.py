"""The private PostgreSQL the state tests run on: reachable on its socket only, stopped by PID."""

from __future__ import annotations

import pytest

psycopg = pytest.importorskip("psycopg", reason="psycopg 3 is not installed: pip install 'aidc[postgres]'")


def test_private_server_answers_on_its_socket_and_listens_on_no_tcp_port(postgres_dsn):
    with psycopg.connect(postgres_dsn) as conn:
        version = conn.execute("SHOW server_version_num").fetchone()[0]
        listen = conn.execute("SHOW listen_addresses").fetchone()[0]
        user = conn.execute("SELECT current_user").fetchone()[0]
    assert int(version) >= 150000
    assert listen == ""
    assert user == "postgres"
