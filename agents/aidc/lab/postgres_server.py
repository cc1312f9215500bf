"""A private, real PostgreSQL for tests and the lab: one cluster in a directory, listening on a
Unix socket in that directory (and, when asked, on TCP addresses inside a network namespace the
caller made: controllers on other "hosts"), run as the `postgres` user, stopped by its PID.

initdb refuses to run as root, so the data directory is handed to `postgres` and the server
runs under `runuser -u postgres`. Nothing here touches the system's own cluster
(/var/lib/postgresql): no pg_ctlcluster, no systemd, a port only in the socket's file name.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import time
from pathlib import Path

from aidc.files import FILE_MODE, touch, write_atomic

PG_ROOT = Path("/usr/lib/postgresql")
MIN_VERSION = 15
SERVICE_USER = "postgres"
START_TIMEOUT_S = 60


def binaries() -> Path | None:
    """The bin directory of the newest installed PostgreSQL >= MIN_VERSION, or None."""
    versions = sorted((int(p.name), p / "bin") for p in PG_ROOT.glob("*")
                      if p.name.isdigit() and (p / "bin" / "initdb").exists())
    usable = [b for v, b in versions if v >= MIN_VERSION]
    return usable[-1] if usable else None


def unavailable_reason() -> str | None:
    """Why a private PostgreSQL cannot run here, or None when it can."""
    if binaries() is None:
        return f"PostgreSQL {MIN_VERSION}+ is not installed under {PG_ROOT}: run `make system-deps`"
    if os.geteuid() != 0:
        return "a private PostgreSQL needs root (its files are handed to the postgres user)"
    try:
        pwd.getpwnam(SERVICE_USER)
    except KeyError:
        return f"there is no {SERVICE_USER} user (the postgresql package creates it)"
    if shutil.which("runuser") is None:
        return "runuser (util-linux) is missing"
    return None


class LocalPostgres:
    """`base` must be reachable by the postgres user (pytest's tmp dirs under root are not:
    use a fresh directory under /tmp, see tests/conftest.py)."""

    def __init__(self, base: Path, port: int = 5432, database: str = "aidc", netns: str | None = None,
                 tcp_addresses: tuple[str, ...] = (), trusted_networks: tuple[str, ...] = ()):
        self.base = Path(base)
        # TCP only where the caller asks, inside its namespace `netns` (never the root one), and
        # trusted (no password) only from `trusted_networks`, the namespaces' own subnets.
        self.netns, self.tcp_addresses, self.trusted_networks = netns, tuple(tcp_addresses), tuple(trusted_networks)
        self.data = self.base / "data"
        self.socket_dir = self.base / "socket"
        self.port = port  # only names the socket file (.s.PGSQL.<port>): listen_addresses is empty
        self.database = database
        self.pid: int | None = None
        self.bin = binaries()

    @property
    def dsn(self) -> str:
        return f"host={self.socket_dir} port={self.port} dbname={self.database} user={SERVICE_USER}"

    def tcp_dsn(self, address: str) -> str:
        return f"host={address} port={self.port} dbname={self.database} user={SERVICE_USER} connect_timeout=5"

    def _as_postgres(self, *argv: str, in_netns: bool = False) -> None:
        prefix = ["ip", "netns", "exec", self.netns] if in_netns and self.netns else []
        done = subprocess.run([*prefix, "runuser", "-u", SERVICE_USER, "--", *argv], capture_output=True,
                              text=True, timeout=120)
        if done.returncode:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"{Path(argv[0]).name} failed ({done.returncode}): {tail[0]}")

    def start(self) -> None:
        user = pwd.getpwnam(SERVICE_USER)
        for d in (self.base, self.socket_dir):
            d.mkdir(parents=True, exist_ok=True)
            os.chown(d, user.pw_uid, user.pw_gid)
        self.socket_dir.chmod(0o700)  # only postgres (and root) may reach the socket
        self._as_postgres(str(self.bin / "initdb"), "-D", str(self.data), "-U", SERVICE_USER,
                          "--auth=trust", "--encoding=UTF8", "--no-sync")
        log = self.base / "postgres.log"
        touch(log, FILE_MODE)
        os.chown(log, user.pw_uid, user.pw_gid)
        if self.trusted_networks:
            hba = self.data / "pg_hba.conf"
            lines = "".join(f"host all all {net} trust\n" for net in self.trusted_networks)
            write_atomic(hba, hba.read_text() + lines, FILE_MODE)
            os.chown(hba, user.pw_uid, user.pw_gid)
        listen = ",".join(self.tcp_addresses)
        self._as_postgres(str(self.bin / "pg_ctl"), "start", "-D", str(self.data), "-l", str(log), "-w",
                          "-t", str(START_TIMEOUT_S), "-o",
                          f"-c listen_addresses='{listen}' -c unix_socket_directories='{self.socket_dir}' "
                          f"-p {self.port} -c fsync=off", in_netns=True)
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])
        self._as_postgres(str(self.bin / "createdb"), "-h", str(self.socket_dir), "-p", str(self.port),
                          self.database)

    def stop(self) -> None:
        """Fast shutdown by PID (SIGINT to the postmaster), waiting for it to go."""
        if self.pid is None:
            return
        try:
            os.kill(self.pid, signal.SIGINT)
        except ProcessLookupError:
            self.pid = None
            return
        for _ in range(600):  # at most 60 s
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.kill(self.pid, signal.SIGKILL)
        self.pid = None
