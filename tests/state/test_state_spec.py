"""`state:` in the stack file: which backend holds the controller's state, and where its DSN comes
from. A password never sits in the stack file (it is committed, and shown by `pulumi config`)."""

from __future__ import annotations

import pytest

from aidc.errors import SpecError
from aidc.spec import parse_spec
from tests.test_spec import _minimal


def test_sqlite_is_the_default_and_needs_no_dsn():
    state = parse_spec(_minimal()).state
    assert (state.backend, state.dsn, state.dsn_file, state.dsn_env) == ("sqlite", None, None, None)


@pytest.mark.parametrize("source", [{"dsn": "host=/run/postgresql dbname=aidc user=aidc"},
                                    {"dsn": "postgresql://aidc@db.example:5432/aidc?sslmode=verify-full"},
                                    {"dsn_file": "/etc/aidc/state.dsn"},
                                    {"dsn_env": "AIDC_STATE_DSN"}])
def test_postgres_takes_exactly_one_dsn_source(source):
    # On Slurm: a controller pod on Kubernetes cannot read a DSN file (test_spec's Kubernetes cases).
    state = parse_spec({**_minimal(), "scheduler": "slurm", "state": {"backend": "postgres", **source}}).state
    assert state.backend == "postgres"
    assert {k: getattr(state, k) for k in source} == source


@pytest.mark.parametrize("state, key", [
    ({"backend": "postgres"}, "state"),
    ({"backend": "postgres", "dsn": "dbname=aidc", "dsn_env": "AIDC_STATE_DSN"}, "state"),
    ({"backend": "postgres", "dsn_file": "/etc/aidc/state.dsn", "dsn_env": "X"}, "state"),
    ({"backend": "sqlite", "dsn": "dbname=aidc"}, "state"),
    ({"backend": "postgres", "dsn": "host=db dbname=aidc user=aidc password=hunter2"}, "state.dsn"),
    ({"backend": "postgres", "dsn": "host=db dbname=aidc PASSWORD = 'x y'"}, "state.dsn"),
    ({"backend": "postgres", "dsn": "postgresql://aidc:hunter2@db/aidc"}, "state.dsn"),
    ({"backend": "postgres", "dsn": "postgres://db/aidc?password=hunter2"}, "state.dsn"),
    ({"backend": "postgres", "dsn_env": "1BAD"}, "state.dsn_env"),
    ({"backend": "mysql", "dsn": "x"}, "state.backend"),
])
def test_bad_state_settings_are_refused_naming_the_key(state, key):
    with pytest.raises(SpecError) as err:
        parse_spec({**_minimal(), "state": state})
    assert err.value.key == f"aidc:cluster.{key}"
    assert "hunter2" not in str(err.value)  # the error never repeats the secret


def test_spec_check_names_the_state_problem_in_one_line(aidc_cli, tmp_path):
    from tests.test_spec import _write_stack

    path = _write_stack(tmp_path, {**_minimal(), "state": {"backend": "postgres",
                                                           "dsn": "postgresql://aidc:hunter2@db/aidc"}})
    proc = aidc_cli("spec", "check", "--stack", str(path))
    assert proc.returncode != 0
    assert "state.dsn" in proc.stderr + proc.stdout
    assert "hunter2" not in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
