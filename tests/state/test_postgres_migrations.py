"""The PostgreSQL schema is migrated, never guessed: a version table lists what was applied, a
newer or foreign schema is refused, replicas starting together migrate once."""

from __future__ import annotations

import threading

import pytest

psycopg = pytest.importorskip("psycopg", reason="psycopg 3 is not installed: pip install 'aidc[postgres]'")

from aidc.errors import StateError  # noqa: E402
from aidc.state import event_store_for, open_event_store, resolve_dsn  # noqa: E402
from aidc.state.postgres import migrations  # noqa: E402
from aidc.spec import State  # noqa: E402


def _versions(dsn: str) -> list[tuple[int, str]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT version, name FROM aidc_schema_version ORDER BY version").fetchall()


def test_a_fresh_database_gets_every_shipped_migration_once(postgres_database):
    shipped = [(n, name) for n, name, _sql in migrations()]
    assert shipped[0] == (1, "event_store")
    open_event_store("postgres", postgres_database).close()
    open_event_store("postgres", postgres_database).close()  # a restart applies nothing again
    assert _versions(postgres_database) == shipped


def test_replicas_starting_together_migrate_once_and_share_one_store_id(postgres_database):
    stores, errors = [], []

    def open_one():
        try:
            stores.append(open_event_store("postgres", postgres_database))
        except Exception as exc:  # noqa: BLE001  (the assertion below shows it)
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    try:
        assert errors == []
        assert len({s.store_id for s in stores}) == 1
        assert _versions(postgres_database) == [(n, name) for n, name, _sql in migrations()]
    finally:
        for s in stores:
            s.close()


def test_a_schema_newer_than_this_aidc_is_refused(postgres_database):
    open_event_store("postgres", postgres_database).close()
    newer = len(migrations()) + 1
    with psycopg.connect(postgres_database) as conn:
        conn.execute("INSERT INTO aidc_schema_version VALUES (%s, 'from_the_future', 0)", (newer,))
    with pytest.raises(StateError, match=f"schema version {newer}, newer than this aidc"):
        open_event_store("postgres", postgres_database)


def test_tables_without_a_schema_version_are_not_guessed_at(postgres_database):
    with psycopg.connect(postgres_database) as conn:
        conn.execute("CREATE TABLE events (id integer)")
    with pytest.raises(StateError, match="no schema version"):
        open_event_store("postgres", postgres_database)


def test_an_applied_migration_that_differs_from_the_shipped_one_is_refused(postgres_database):
    open_event_store("postgres", postgres_database).close()
    with psycopg.connect(postgres_database) as conn:
        conn.execute("UPDATE aidc_schema_version SET name = 'something_else' WHERE version = 1")
    with pytest.raises(StateError, match="not the ones this aidc ships"):
        open_event_store("postgres", postgres_database)


def test_an_unreachable_database_is_one_clear_error(tmp_path):
    with pytest.raises(StateError, match="cannot reach the state database"):
        open_event_store("postgres", f"host={tmp_path} dbname=aidc user=postgres connect_timeout=2")


def test_the_dsn_comes_from_the_environment_or_a_private_file(postgres_database, tmp_path, monkeypatch):
    monkeypatch.setenv("AIDC_TEST_STATE_DSN", postgres_database)
    by_env = State(backend="postgres", dsn_env="AIDC_TEST_STATE_DSN")
    assert resolve_dsn(by_env) == postgres_database
    event_store_for(by_env, tmp_path / "unused.db").close()
    assert not (tmp_path / "unused.db").exists()

    secret = tmp_path / "state.dsn"
    secret.write_text(postgres_database + "\n")
    secret.chmod(0o644)
    with pytest.raises(StateError, match="readable by others"):
        resolve_dsn(State(backend="postgres", dsn_file=str(secret)))
    secret.chmod(0o600)
    assert resolve_dsn(State(backend="postgres", dsn_file=str(secret))) == postgres_database
    monkeypatch.delenv("AIDC_TEST_STATE_DSN")
    with pytest.raises(StateError, match="AIDC_TEST_STATE_DSN"):
        resolve_dsn(by_env)


def test_the_sqlite_default_keeps_its_file(tmp_path):
    store = event_store_for(State(), tmp_path / "events.db")
    store.put("k", "v")
    store.close()
    assert (tmp_path / "events.db").exists()
