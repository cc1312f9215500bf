"""The controller lease in the state database: leader election with no shared filesystem.

Controllers on different hosts that share one PostgreSQL (`state.backend: postgres`) elect
their leader in the row `controller_lease(name)`:

* **Acquire**: one statement inserts the row or takes it over when it is free (released) or
  expired, and bumps `token`. Row locking makes exactly one of racing contenders win.
* **Renew**: every ttl/3 the holder rewrites `renewed_at`, only while the row still names it
  with its token.
* **Expiry** is `renewed_at + ttl_s` on the *database server's* clock, the one clock every
  controller sees; no two controllers' clocks are ever compared. The holder itself stops
  acting earlier, on its own monotonic clock: `ttl_s - margin` after it *sent* its last
  successful renewal, so it is never still acting when the server hands the lease out.
* **Fencing**: `token` is the fencing token. `fence(conn)` runs inside the store transaction
  that records an action's intent (aidc.failover.controller) and locks the lease row FOR SHARE
  while checking that it still names this holder, this token and is unexpired. A deposed
  leader (paused past its deadline, cut off, slow) therefore cannot write an intent: its
  transaction rolls back and it raises Deposed. A takeover that races the check waits on the
  row lock until the intent is committed, and the new leader then finds it (recover()).

A session advisory lock would free itself when the holder's connection dies, but "dies" is
whatever TCP keepalives make it, and a lock gives no token a later transaction can check; the
row does both with a ttl the operator chose.

`PostgresFence` is the same token for an elector that lives elsewhere (the Kubernetes Lease):
each acquisition there takes a new token here, and the intent transaction checks it the same way.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Callable

from aidc.errors import StateError
from aidc.failover.leader import NotLeader
from aidc.state.postgres import connect, migrate

DEFAULT_NAME = "failover"
MAX_TTL_S = 600.0  # the table's CHECK: a row cannot promise to hold the lease for an hour


class Deposed(NotLeader):
    """This controller's fencing token is no longer the lease's: the write it guarded is refused."""


_ALIVE = "renewed_at + make_interval(secs => ttl_s) > clock_timestamp()"

_ACQUIRE = (
    "INSERT INTO controller_lease AS l (name, holder, token, renewed_at, ttl_s, acquired_at) "
    "VALUES (%(name)s, %(holder)s, 1, clock_timestamp(), %(ttl)s, clock_timestamp()) "
    "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, token = l.token + 1, "
    "renewed_at = excluded.renewed_at, ttl_s = excluded.ttl_s, acquired_at = excluded.acquired_at "
    "WHERE l.holder IS NULL OR l.renewed_at + make_interval(secs => l.ttl_s) <= clock_timestamp() "
    "RETURNING token")

_FREE = f"SELECT holder IS NULL OR NOT ({_ALIVE}) FROM controller_lease WHERE name = %(name)s"

_RENEW = ("UPDATE controller_lease SET renewed_at = clock_timestamp(), ttl_s = %(ttl)s "
          "WHERE name = %(name)s AND holder = %(holder)s AND token = %(token)s RETURNING token")

# A new term of an elector that lives elsewhere: the next token, unconditionally (that elector
# decided), with no expiry here.
_NEW_TERM = (
    "INSERT INTO controller_lease AS l (name, holder, token, renewed_at, ttl_s, acquired_at) "
    "VALUES (%(name)s, %(holder)s, 1, clock_timestamp(), NULL, clock_timestamp()) "
    "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, token = l.token + 1, "
    "renewed_at = excluded.renewed_at, ttl_s = NULL, acquired_at = excluded.acquired_at RETURNING token")

_RELEASE = "UPDATE controller_lease SET holder = NULL WHERE name = %(name)s AND holder = %(holder)s AND token = %(token)s"


def _check_token(txn, name: str, holder: str, token: int, alive: bool) -> None:
    """Lock the lease row FOR SHARE in `txn` (a takeover waits for this transaction) and raise
    Deposed unless it still names `holder` with `token` (and, with `alive`, has not expired)."""
    _psycopg_connection(txn)
    row = txn.execute("SELECT 1 FROM controller_lease WHERE name = %s AND holder = %s AND token = %s"
                      + (f" AND {_ALIVE}" if alive else "") + " FOR SHARE", (name, holder, token)).fetchone()
    if row is None:
        raise Deposed(f"{holder} lost controller lease {name!r} (token {token} is no longer the lease's): "
                      "the action is not recorded")


def _open(dsn: str):
    conn = connect(dsn)
    migrate(conn)  # the lease table may be newer than the database a store made earlier
    return conn


def default_holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _psycopg_connection(txn) -> None:
    """The fence must run in the store's own PostgreSQL transaction, never beside it."""
    if type(txn).__module__.split(".")[0] != "psycopg":
        raise StateError("the postgres controller lease fences writes to the PostgreSQL state store only "
                         "(state.backend: postgres); this store is not one")


class PostgresLease:
    """The controller lease interface (hold, held, release, describe) plus `fence`."""

    backend = "postgres"

    def __init__(self, dsn: str, name: str = DEFAULT_NAME, holder: str | None = None, ttl_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        if not 0 < ttl_s <= MAX_TTL_S:
            raise ValueError(f"ttl_s must be > 0 and <= {MAX_TTL_S:g}")
        self.dsn, self.name, self.ttl_s, self.clock = dsn, name, float(ttl_s), clock
        self.holder = holder or default_holder()
        self.token: int | None = None
        self._renewed_at = 0.0  # our clock, when the last successful renewal was sent
        self._conn = None

    # -- the controller's lease interface ----------------------------------------------------
    def hold(self) -> bool:
        """Acquire or renew (at most every ttl/3); True while this controller holds the lease.
        Raises StateError when the database cannot be reached (the controller then does not act)."""
        started = self.clock()
        if self.token is not None and started - self._renewed_at < self.ttl_s / 3:
            return self.held()
        args = {"name": self.name, "holder": self.holder, "ttl": self.ttl_s, "token": self.token}
        try:
            conn = self._connection()
            row = None
            if self.token is not None:
                row = conn.execute(_RENEW, args).fetchone()
            if row is None:
                self.token = None  # superseded (or released by an operator): contend like anyone
                # A standby asks every poll: read first, so only a lease that looks free or
                # expired is contended with a write (and its row lock).
                free = conn.execute(_FREE, args).fetchone()
                if free is None or free[0]:
                    row = conn.execute(_ACQUIRE, args).fetchone()
        except StateError:
            raise
        except Exception as exc:  # psycopg's errors: a dropped connection is made again next time
            self._drop_connection()
            raise StateError(f"controller lease {self.name!r}: {str(exc).strip().splitlines()[0]}") from None
        if row is None:
            return False
        self.token, self._renewed_at = int(row[0]), started
        return True

    def held(self) -> bool:
        margin = min(1.0, self.ttl_s / 4)
        return self.token is not None and self.clock() - self._renewed_at < self.ttl_s - margin

    def release(self) -> None:
        """A clean stop frees the row so another controller takes over at once."""
        if self.token is not None:
            try:
                self._connection().execute(_RELEASE, {"name": self.name, "holder": self.holder, "token": self.token})
            except Exception:  # a stop that cannot reach the database leaves the row to expire
                pass
        self.token = None
        self._drop_connection()

    def describe(self) -> dict:
        return {"backend": self.backend, "lease": self.name, "holder": self.holder, "token": self.token,
                "ttl_s": self.ttl_s}

    def current(self) -> dict | None:
        """The row as the database holds it (holder, token, alive), or None before any election."""
        row = self._connection().execute(
            f"SELECT holder, token, {_ALIVE} FROM controller_lease WHERE name = %s", (self.name,)).fetchone()
        return None if row is None else {"holder": row[0], "token": int(row[1]), "alive": bool(row[2])}

    # -- fencing ------------------------------------------------------------------------------
    def fence(self, txn) -> None:
        """Inside the store transaction that records an action: raise Deposed (rolling it back)
        unless the lease row still names this holder with this token and has not expired."""
        if self.token is None or not self.held():
            raise Deposed(f"{self.holder} does not hold controller lease {self.name!r}")
        try:
            _check_token(txn, self.name, self.holder, self.token, alive=True)
        except Deposed:
            self.token = None
            raise

    # -- internals ------------------------------------------------------------------------------
    def _connection(self):
        if self._conn is None or self._conn.closed:
            self._conn = _open(self.dsn)
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
        self._conn = None


class PostgresFence:
    """Another elector (the Kubernetes Lease) with its fencing token kept here: each term it
    begins takes the next token in row `name`, and `fence` checks it in the intent's transaction
    as PostgresLease does, so a replica the API server deposed cannot record an action once its
    successor has begun."""

    def __init__(self, elector, dsn: str, name: str):
        self.elector, self.dsn, self.name = elector, dsn, name
        self.holder = getattr(elector, "identity", None) or default_holder()
        self.token: int | None = None
        self._conn = None

    def hold(self) -> bool:
        if not self.elector.hold():
            self.token = None
            return False
        if self.token is None:  # a new term: from now on the previous holder's writes fail
            # Taking a token deposes whoever has one, so only on the API server's word now, not
            # on a belief that may be stale (after a Deposed, the elector may still think it leads).
            confirm = getattr(self.elector, "try_acquire_or_renew", None)
            if confirm is not None and not confirm():
                return False
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = _open(self.dsn)
                self.token = int(self._conn.execute(_NEW_TERM, {"name": self.name, "holder": self.holder})
                                 .fetchone()[0])
            except StateError:
                raise
            except Exception as exc:
                self._conn = None
                raise StateError(f"fencing token {self.name!r}: {str(exc).strip().splitlines()[0]}") from None
        return True

    def held(self) -> bool:
        return self.token is not None and self.elector.held()

    def check(self) -> None:
        self.elector.check()

    def release(self) -> None:
        self.token = None
        self.elector.release()
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def describe(self) -> dict:
        return {**self.elector.describe(), "fence": self.name, "token": self.token}

    def fence(self, txn) -> None:
        if self.token is None or not self.elector.held():
            raise Deposed(f"{self.holder} does not hold {self.name!r}")
        try:
            _check_token(txn, self.name, self.holder, self.token, alive=False)
        except Deposed:
            self.token = None
            raise
