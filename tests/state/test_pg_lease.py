"""The controller lease in PostgreSQL (aidc.failover.pg_lease), on a real private server: one
holder at a time, takeover only after the row expired on the server's clock, a clean release
hands over at once, and the fencing token refuses a deposed leader's intent in its own
transaction. Expiry is produced by ageing the row (what the server's clock would do), not by
waiting."""

from __future__ import annotations

import pytest

psycopg = pytest.importorskip("psycopg", reason="psycopg 3 is not installed: pip install 'aidc[postgres]'")

from aidc.audit import AuditLog  # noqa: E402
from aidc.errors import StateError  # noqa: E402
from aidc.failover.controller import FailoverController  # noqa: E402
from aidc.failover.leases import LeaseUnavailable, default_lease_backend, open_lease  # noqa: E402
from aidc.failover.metrics import FailoverMetrics  # noqa: E402
from aidc.failover.pg_lease import Deposed, PostgresLease  # noqa: E402
from aidc.spec import parse_spec  # noqa: E402
from aidc.state import open_event_store  # noqa: E402
from tests.test_failover import RecordingScheduler, _fault  # noqa: E402


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _spec(dsn: str | None = None, **policy):
    doc = {"name": "t", "node_pools": [{"name": "gpu", "count": 4, "gpu_model": "SIM", "gpus_per_node": 2,
                                        "spares": 1}], "scheduler": "lab",
           "policy": {"max_unavailable": 2, **policy}}
    if dsn:
        doc["state"] = {"backend": "postgres", "dsn": dsn}
    return parse_spec(doc)


def _expire(dsn: str, name: str = "failover") -> None:
    """What the server's clock does to a holder that stopped renewing: its row is past its ttl."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE controller_lease SET renewed_at = renewed_at - interval '1 hour' WHERE name = %s", (name,))


@pytest.fixture
def leases(postgres_database):
    made = []

    def make(holder: str, ttl_s: float = 6.0, clock=None):
        lease = PostgresLease(postgres_database, holder=holder, ttl_s=ttl_s, **({"clock": clock} if clock else {}))
        made.append(lease)
        return lease

    open_event_store("postgres", postgres_database).close()  # the schema, as a controller's store makes it
    yield make
    for lease in made:
        lease.release()


def test_of_two_contenders_one_holds_and_the_other_waits(leases):
    a, b = leases("a"), leases("b")
    assert a.hold() is True and a.token == 1
    assert b.hold() is False and b.token is None and not b.held()
    assert b.current() == {"holder": "a", "token": 1, "alive": True}


def test_a_silent_holder_is_replaced_after_its_row_expires_with_a_new_token_and_cannot_renew(leases, postgres_database):
    clock = Clock()
    a, b = leases("a", clock=clock), leases("b")
    assert a.hold()
    _expire(postgres_database)
    assert b.hold() is True and b.token == 2
    clock.now += 3  # a's next renewal is due: the row names b now
    assert a.hold() is False and a.token is None
    assert b.current()["holder"] == "b"


def test_a_clean_release_hands_over_at_once(leases):
    a, b = leases("a"), leases("b")
    assert a.hold()
    a.release()
    assert b.hold() is True and b.token == 2


def test_a_holder_that_could_not_renew_in_time_stops_acting_before_the_row_expires(leases, postgres_database):
    clock = Clock()
    a = leases("a", ttl_s=4.0, clock=clock)
    assert a.hold() and a.held()
    clock.now += 3.0  # ttl 4 s, margin 1 s: past its own deadline although the server would still say alive
    assert not a.held()
    store = open_event_store("postgres", postgres_database)
    try:
        with pytest.raises(Deposed), store.transaction() as txn:
            a.fence(txn)
    finally:
        store.close()


def test_a_deposed_leader_cannot_record_an_intent_and_the_new_leader_acts_once(leases, postgres_database, tmp_path):
    spec = _spec(postgres_database)
    stores = [open_event_store("postgres", postgres_database) for _ in range(2)]
    audits = [AuditLog(tmp_path / f"audit-{i}.db") for i in range(2)]
    scheds = [RecordingScheduler(), RecordingScheduler()]
    metrics = [FailoverMetrics(), FailoverMetrics()]
    a_clock = Clock()
    a, b = leases("a", clock=a_clock), leases("b")
    old, new = (FailoverController(spec, stores[i], audits[i], scheds[i], metrics=metrics[i]) for i in range(2))
    try:
        assert old.poll(a) is True and new.poll(b) is False
        assert [m.lease_held._value.get() for m in metrics] == [1.0, 0.0]
        _expire(postgres_database)  # a stalls (by its own clock it still holds the lease) ...
        assert new.poll(b) is True  # ... and b takes over
        event = stores[0].append(_fault("gpu-1"))
        assert a.held()  # a does not know yet: only the token can stop it
        assert old.run_once(a.held) == []
        assert scheds[0].calls == [] and stores[0].node_state("gpu-1") == "in_service"
        assert [e for e, _ in stores[0].pending()] == [event] and stores[0].outcome(event) is None
        [fenced] = audits[0].records(kind="failover.fenced")
        assert fenced.payload["event_id"] == event and "token 1" in fenced.reason
        assert [d.verdict for d in new.run_once(b.held)] == ["quarantine"]
        assert scheds[1].calls == [("quarantine", "gpu-1")] and stores[1].pending() == []
        a_clock.now += 3
        assert old.poll(a) is False and new.poll(b) is True
        assert [m.lease_held._value.get() for m in metrics] == [0.0, 1.0]
        assert scheds[0].calls == []
    finally:
        for s in stores:
            s.close()
        for log in audits:
            log.close()


def test_the_lease_backend_defaults_to_the_state_backend_and_refuses_what_cannot_fence(tmp_path, postgres_database):
    assert default_lease_backend(_spec()) == "directory"
    assert default_lease_backend(_spec(postgres_database)) == "postgres"
    assert isinstance(open_lease(None, _spec(postgres_database), tmp_path), PostgresLease)
    with pytest.raises(LeaseUnavailable, match="needs state.backend postgres"):
        open_lease("postgres", _spec(), tmp_path)
    with pytest.raises(LeaseUnavailable, match="there are: directory, postgres, kubernetes"):
        open_lease("etcd", _spec(), tmp_path)
    with pytest.raises(LeaseUnavailable, match="--lease directory"):
        open_lease(None, _spec(postgres_database), tmp_path, lease_dir=tmp_path / "lease")


def test_an_unreachable_database_is_a_clear_error_and_no_leadership(tmp_path):
    lease = PostgresLease(f"host={tmp_path} port=1 dbname=none user=nobody connect_timeout=2", holder="a")
    with pytest.raises(StateError, match="cannot reach the state database"):
        lease.hold()
    assert not lease.held()


class Elector:
    """Stands in for the Kubernetes Lease elector: `leader` is what it believes, `api` what the
    API server would answer a renewal now; both set by the test."""

    api_holder: dict = {}

    def __init__(self, identity: str):
        self.identity, self.leader = identity, False

    def hold(self):
        return self.leader

    def try_acquire_or_renew(self):
        self.leader = self.api_holder.get("who") == self.identity
        return self.leader

    def held(self):
        return self.leader

    def check(self):
        pass

    def release(self):
        self.leader = False

    def describe(self):
        return {"holder": self.identity}


def test_each_kubernetes_term_takes_a_new_token_and_the_deposed_replicas_intent_is_refused(postgres_database):
    from aidc.failover.pg_lease import PostgresFence

    store = open_event_store("postgres", postgres_database)
    old_elector, new_elector = Elector("pod-a"), Elector("pod-b")
    old = PostgresFence(old_elector, postgres_database, "kubernetes:aidc-system/aidc-failover-controller")
    new = PostgresFence(new_elector, postgres_database, "kubernetes:aidc-system/aidc-failover-controller")
    try:
        assert old.hold() is False and old.token is None
        old_elector.leader, Elector.api_holder["who"] = True, "pod-a"
        assert old.hold() is True and old.token == 1 and old.describe()["token"] == 1
        # The API server handed the Lease on; pod-a has not noticed yet.
        new_elector.leader, Elector.api_holder["who"] = True, "pod-b"
        assert new.hold() is True and new.token == 2
        with pytest.raises(Deposed, match="token 1"), store.transaction() as txn:
            old.fence(txn)
            store.set_node_state("gpu-1", "quarantining", "deposed", "pod-a")
        assert store.node_state("gpu-1") == "in_service"  # rolled back with the fence
        with store.transaction() as txn:
            new.fence(txn)
            store.set_node_state("gpu-1", "quarantining", "leader", "pod-b")
        assert store.node_state("gpu-1") == "quarantining"
        # Deposed, pod-a takes no new token on its stale belief: the API server says pod-b leads.
        old_elector.leader = True
        assert old.hold() is False and old.token is None and new.token == 2
        with store.transaction() as txn:
            new.fence(txn)
    finally:
        Elector.api_holder.clear()
        old.release(), new.release()
        store.close()


def test_failover_run_refuses_an_unknown_lease_backend_before_it_creates_anything(aidc_cli, tmp_path):
    from tests.conftest import ROOT

    proc = aidc_cli("failover", "run", "--stack", str(ROOT / "Pulumi.lab.yaml"), "--lab-dir", str(tmp_path / "lab"),
                    "--lease", "etcd")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "no lease backend 'etcd' (there are: directory, postgres, kubernetes)" in proc.stderr
    assert not (tmp_path / "lab").exists()


def test_the_fencing_bench_runs_both_sides_on_one_database_and_reports_ratios(postgres_dsn):
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT

    done = subprocess.run([sys.executable, str(ROOT / "bench" / "lease_fencing.py"), "--events", "3",
                           "--transactions", "5", "--rounds", "1", "--dsn", postgres_dsn, "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert set(result["decisions_per_s"]) == {"unfenced", "fenced", "ratio"}
    assert set(result["transaction_ms"]) == {"bare", "fenced", "ratio"}
    assert result["decisions_per_s"]["fenced"] > 0 and result["transaction_ms"]["fenced"] > 0
