"""Controller lease backends by name: which one elects the controller that acts.

* `directory`: a lease directory (aidc.failover.lease); controllers on several hosts need a
  filesystem they all share. The default with `state.backend: sqlite`.
* `postgres`: a row in the state database (aidc.failover.pg_lease) with a fencing token checked
  in every intent's transaction; no shared filesystem. The default with `state.backend: postgres`.
* `kubernetes`: a coordination.k8s.io Lease (aidc.failover.leader); the default with
  `scheduler: kubernetes`, where aidc.failover.k8s_controller runs it beside its node watch.
  With `state.backend: postgres` its terms also take fencing tokens in the state database
  (`fenced`), checked in every intent's transaction as the postgres lease's are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from aidc.errors import AidcError

LEASE_NAME = "failover"


class LeaseUnavailable(AidcError):
    """A lease backend that does not exist, or cannot work with this stack."""


def _directory(spec, lab_dir: Path, lease_dir: Path | None, ttl_s: float):
    from aidc.failover.lease import Lease

    return Lease(lease_dir or lab_dir / "lease", ttl_s=ttl_s)


def _postgres(spec, lab_dir: Path, lease_dir: Path | None, ttl_s: float):
    if spec.state.backend != "postgres":
        # The fencing token is checked in the store's own transaction: it needs that store there.
        raise LeaseUnavailable(f"lease postgres needs state.backend postgres (this stack's state is "
                               f"{spec.state.backend})")
    if lease_dir is not None:
        raise LeaseUnavailable("--lease-dir names a lease directory: lease postgres (the default with state.backend "
                               "postgres) lives in the state database; pass --lease directory to use the directory")
    from aidc.failover.pg_lease import PostgresLease
    from aidc.state import resolve_dsn

    return PostgresLease(resolve_dsn(spec.state), LEASE_NAME, ttl_s=ttl_s)


def _kubernetes(spec, lab_dir: Path, lease_dir: Path | None, ttl_s: float):
    if spec.scheduler != "kubernetes":
        raise LeaseUnavailable("lease kubernetes needs scheduler: kubernetes (its API server holds the Lease)")
    return None  # aidc.failover.k8s_controller makes the elector with the API client it watches with


LEASE_BACKENDS: dict[str, Callable] = {"directory": _directory, "postgres": _postgres, "kubernetes": _kubernetes}


def default_lease_backend(spec) -> str:
    if spec.scheduler == "kubernetes":
        return "kubernetes"
    return "postgres" if spec.state.backend == "postgres" else "directory"


def open_lease(name: str | None, spec, lab_dir: Path, lease_dir: Path | None = None, ttl_s: float = 10.0):
    """The lease `name` names (None: the stack's default), or None for `kubernetes`."""
    name = name or default_lease_backend(spec)
    opener = LEASE_BACKENDS.get(name)
    if opener is None:
        raise LeaseUnavailable(f"no lease backend {name!r} (there are: {', '.join(LEASE_BACKENDS)})")
    if name != "kubernetes" and spec.scheduler == "kubernetes":
        raise LeaseUnavailable(f"scheduler kubernetes elects its leader with lease kubernetes, not {name}")
    return opener(spec, Path(lab_dir), lease_dir, ttl_s)


def fenced(spec, elector):
    """`elector` (the Kubernetes Lease), with a fencing token in the state database when the
    stack keeps its state in PostgreSQL; as it is otherwise."""
    if spec.state.backend != "postgres":
        return elector
    from aidc.failover.pg_lease import PostgresFence
    from aidc.state import resolve_dsn

    return PostgresFence(elector, resolve_dsn(spec.state),
                         f"kubernetes:{spec.kubernetes.namespace}/{spec.kubernetes.lease_name}")
