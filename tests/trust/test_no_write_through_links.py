"""aidc never writes through a symbolic link: a link planted where it creates, appends to or
replaces a file (state and audit databases and their SQLite side files, the audit anchor and
its lock, the signing sidecar, reports, notify files, exported certificates, keyring files,
lab journals, step logs) is refused with LinkRefused, and the file the link names is left as it
was (or, when it did not exist, is not created). A file made from another gets its source's
mode, never a wider one."""

from __future__ import annotations

import os
import stat

import pytest

from aidc.audit import log as audit_log
from aidc.audit.log import AuditLog
from aidc.audit.report import write_report
from aidc.failover.scheduler import LabScheduler
from aidc.files import LinkRefused
from aidc.goodput.steplog import StepLog
from aidc.kms.local import LocalKeyring
from aidc.runbook.actuators import LogNotifier
from aidc.runbook.state import RunState
from aidc.store import Store


@pytest.fixture(autouse=True)
def permissive_umask():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _signed_log(tmp_path):
    keyring = LocalKeyring.create(tmp_path / "keyring", "links-test")
    db = tmp_path / "signed" / "audit.db"
    db.parent.mkdir()
    audit_log.configure_signing(db, keyring.path, keyring.key_id)
    with AuditLog(db) as log:
        log.append("burnin.certificate", "passed burn-in", actor="burnin", node="n1", payload={"verdict": "pass"})
    return db


def _export_certificate(db, out):
    from aidc.cli.burnin_cmd import certificate_export

    certificate_export(node="n1", db=db, out=out, stack=None, lab_dir=None, as_json=True)


def _certificate(tmp_path):
    db = _signed_log(tmp_path)
    return tmp_path / "n1.cert.json", lambda: _export_certificate(db, tmp_path / "n1.cert.json")


def _lab_node(tmp_path):
    (tmp_path / "lab" / "nodes" / "n1").mkdir(parents=True)
    return LabScheduler(tmp_path / "lab"), tmp_path / "lab" / "nodes" / "n1"


def _report(tmp_path, name):
    with AuditLog(tmp_path / "audit.db") as log:
        log.append("test.event", "a record", actor="tester")
    (tmp_path / "report").mkdir()

    def write():
        with AuditLog(tmp_path / "audit.db", read_only=True) as log:
            write_report(log, tmp_path / "report")
    return tmp_path / "report" / name, write


def _rotation(tmp_path):
    keyring = LocalKeyring.create(tmp_path / "keyring", "links-test")
    return keyring.path / "kek-v2.key", keyring.rotate


def _sqlite_side_file(tmp_path, side):
    return tmp_path / f"state.db{side}", lambda: Store(tmp_path / "state.db").set_node_state("n1", "in_service",
                                                                                             "test", "tester")


# Each entry: (where the link goes, what writes there), set up in a fresh directory.
WRITERS = {
    "event store database": lambda t: (t / "state.db", lambda: Store(t / "state.db")),
    "event store -wal": lambda t: _sqlite_side_file(t, "-wal"),
    "event store -shm": lambda t: _sqlite_side_file(t, "-shm"),
    "event store -journal": lambda t: _sqlite_side_file(t, "-journal"),
    "runbook state database": lambda t: (t / "runbook.db", lambda: RunState(t / "runbook.db")),
    "audit database": lambda t: (t / "audit.db", lambda: AuditLog(t / "audit.db")),
    "audit -wal": lambda t: (t / "audit.db-wal", lambda: AuditLog(t / "audit.db")),
    "audit anchor": lambda t: (t / "audit.db.anchor", lambda: AuditLog(t / "audit.db")),
    "audit anchor lock": lambda t: (t / "audit.db.anchor.lock", lambda: AuditLog(t / "audit.db")),
    "audit signing sidecar": lambda t: (t / "audit.db.signing",
                                        lambda: audit_log.configure_signing(t / "audit.db", t / "keyring", "k")),
    "audit report (HTML)": lambda t: _report(t, "report.html"),
    "audit report (JSON)": lambda t: _report(t, "report.json"),
    "notify file": lambda t: (t / "notify.jsonl", lambda: LogNotifier(t / "notify.jsonl").notify("info", "hi", {})),
    "exported certificate": lambda t: _certificate(t),
    "keyring key on rotation": _rotation,
    "goodput step log": lambda t: (t / "steps.jsonl", lambda: StepLog(t / "steps.jsonl", "job").start(0)),
    "lab scheduler journal": lambda t: (lambda s, d: (d / "scheduler.jsonl", lambda: s.release("n1", "test")))(
        *_lab_node(t)),
    "lab quarantine marker": lambda t: (lambda s, d: (d / "quarantined", lambda: s.quarantine("n1", "test")))(
        *_lab_node(t)),
    "lab process groups": lambda t: (lambda s, d: (d / "pgids.json", lambda: s.add_process_group("n1", 1)))(
        *_lab_node(t)),
}


@pytest.mark.parametrize("victim_exists", [True, False], ids=["victim exists", "dangling link"])
@pytest.mark.parametrize("writer", WRITERS)
def test_a_link_where_aidc_writes_is_refused_and_its_target_untouched(tmp_path, writer, victim_exists):
    link, write = WRITERS[writer](tmp_path)
    victim = tmp_path / "elsewhere" / "victim"
    victim.parent.mkdir()
    if victim_exists:
        victim.write_bytes(b"someone else's file\n")
        os.chmod(victim, 0o640)
    link.symlink_to(victim)
    with pytest.raises(LinkRefused) as refused:
        write()
    assert refused.value.path == link and "symbolic link" in str(refused.value)
    assert link.is_symlink()
    if victim_exists:
        assert victim.read_bytes() == b"someone else's file\n" and mode(victim) == 0o640
    else:
        assert not victim.exists()


@pytest.mark.parametrize("umask", [0o022, 0o000])
@pytest.mark.parametrize("source_mode", [0o600, 0o640])
def test_a_report_has_the_mode_of_its_audit_log_whatever_the_umask(tmp_path, umask, source_mode):
    with AuditLog(tmp_path / "audit.db") as log:
        log.append("test.event", "a record", actor="tester")
    os.chmod(tmp_path / "audit.db", source_mode)
    os.umask(umask)
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "report.html").write_text("an older, wider report")
    os.chmod(tmp_path / "report" / "report.html", 0o666)
    with AuditLog(tmp_path / "audit.db", read_only=True) as log:
        html, json_path, _ = write_report(log, tmp_path / "report")
    assert (mode(html), mode(json_path)) == (source_mode, source_mode)


@pytest.mark.parametrize("source_mode", [0o600, 0o640])
def test_an_exported_certificate_has_the_mode_of_its_audit_log(tmp_path, source_mode):
    db = _signed_log(tmp_path)
    os.chmod(db, source_mode)
    os.umask(0o000)
    _export_certificate(db, tmp_path / "out" / "n1.cert.json")
    assert mode(tmp_path / "out" / "n1.cert.json") == source_mode


def test_the_cli_refuses_a_linked_report_with_one_line_and_exit_2(tmp_path, aidc_cli):
    with AuditLog(tmp_path / "audit.db") as log:
        log.append("test.event", "a record", actor="tester")
    victim = tmp_path / "victim.html"
    victim.write_text("someone else's page")
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "report.html").symlink_to(victim)
    done = aidc_cli("audit", "report", "--db", str(tmp_path / "audit.db"), "--out", str(tmp_path / "report"))
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert "report.html is a symbolic link" in line
    assert victim.read_text() == "someone else's page"


def _raw_writes(tree) -> list[str]:
    """Calls in a module that create or write a file without aidc.files."""
    import ast

    found = []
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
        f = call.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
        where = f"line {call.lineno}: {ast.unparse(call)[:80]}"
        if name in ("write_text", "write_bytes", "touch", "mkstemp", "NamedTemporaryFile", "copyfile", "copy",
                    "copy2", "symlink_to", "hardlink_to") and isinstance(f, ast.Attribute):
            if name != "copy" or ast.unparse(f.value) == "shutil":
                found.append(where)
        elif name == "open" and isinstance(f, ast.Name) and not any(k.arg == "opener" for k in call.keywords):
            modes = [a for a in call.args[1:2]] + [k.value for k in call.keywords if k.arg == "mode"]
            if any(not (isinstance(m, ast.Constant) and set(str(m.value)) <= set("rbt")) for m in modes):
                found.append(where)
        elif name == "open" and isinstance(f, ast.Attribute) and ast.unparse(f.value) == "os":
            if any(flag in ast.unparse(call) for flag in ("O_WRONLY", "O_RDWR", "O_CREAT", "O_APPEND", "O_TRUNC")):
                found.append(where)
        elif name == "connect" and isinstance(f, ast.Attribute) and ast.unparse(f.value) == "sqlite3":
            found.append(where)
    return found


# Writes that are aidc.files itself, or checked by it just before: SQLite connects after
# private_db, and the audit log's read-only connection (mode=ro) writes nothing.
CHECKED_ELSEWHERE = {
    "aidc/files.py": None,
    "aidc/store.py": 1, "aidc/runbook/state.py": 1, "aidc/audit/log.py": 2,
    "aidc/state/migrate.py": 1,  # the source store, opened read-only (mode=ro) to copy it
    "aidc/compress/measure.py": 1,  # mkstemp: a new random name, O_EXCL, in the temporary directory
}


def test_no_module_writes_a_file_except_through_aidc_files():
    import ast
    from pathlib import Path

    import aidc

    root = Path(aidc.__file__).parent
    unexpected = {}
    for path in sorted(root.rglob("*.py")):
        name = f"aidc/{path.relative_to(root)}"
        allowed = CHECKED_ELSEWHERE.get(name, 0)
        if allowed is None:
            continue
        writes = _raw_writes(ast.parse(path.read_text()))
        if len(writes) != allowed:
            unexpected[name] = writes
    assert unexpected == {}
