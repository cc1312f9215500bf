"""The installation: what a state directory's installer recorded about roles, policy and keys.

Privileged commands (`aidc runbook run|approve`, `aidc failover release`, `aidc failover
breaker reset`) and every audit verifier take their trust from here, never from a file the
caller names. The installer (`aidc lab run`, the failover controller's first start, or
`aidc failover install`) records `installation.json` in the state directory (the lab
directory: event store, audit log):

* `access` and `policy`: the spec's roles and policy when it was installed;
* `audit_signing`: the public half of the key that signs the audit log beside it, if any.

The record is trusted only when nobody but the installer can change it: a regular file (no
symlink), owned by the state directory's owner, not writable by group or others, in a
directory that others cannot write to (or that has the sticky bit, so they cannot replace
a file they do not own). A caller's `--stack` must agree with it on access and policy; a
caller-named file never grants a right.
"""

from __future__ import annotations

import json
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from aidc.errors import AidcError, PolicyRefusal
from aidc.files import SHARED_MODE, write_atomic

RECORD_NAME = "installation.json"
FORMAT = "aidc-installation-v1"
# The spec's parts a caller's --stack must agree on: who may do what, and what is allowed.
TRUST_PARTS = ("access", "policy")
RECORD_MODE = SHARED_MODE  # 0644: readable by every verifier, writable by the installer only


class InstallationError(AidcError):
    """The installation record is missing, unsafe or not one aidc writes."""


@dataclass(frozen=True)
class Installation:
    path: Path
    stack: str
    parts: dict  # TRUST_PARTS -> the spec's part, as JSON
    public_key_pem: str | None
    key_id: str | None

    @property
    def roles(self) -> dict[str, str]:
        return dict(self.parts["access"]["roles"])


def record_path(state_dir: str | Path) -> Path:
    return Path(state_dir) / RECORD_NAME


def trust_parts(spec) -> dict:
    return {part: getattr(spec, part).model_dump(mode="json") for part in TRUST_PARTS}


def record(state_dir: str | Path, spec, stack: str, *, public_key_pem: str | None = None,
           key_id: str | None = None, recorded_by: str | None = None) -> Path:
    """Write (or replace) the state directory's record, 0644, atomically. A record made without
    a key keeps the signing key an earlier one named: re-installing roles never unsigns a log."""
    path = record_path(state_dir)
    signing = {"key_id": key_id, "public_key": public_key_pem} if public_key_pem else None
    if signing is None and path.exists():
        try:
            earlier = load(state_dir)
        except InstallationError:  # a record others could have changed: none of it is carried over
            earlier = None
        if earlier is not None and earlier.public_key_pem:
            signing = {"key_id": earlier.key_id, "public_key": earlier.public_key_pem}
    doc = {"format": FORMAT, "stack": str(stack), "recorded_at": time.time(), "recorded_by": recorded_by,
           **trust_parts(spec), "audit_signing": signing}
    try:
        write_atomic(path, json.dumps(doc, indent=1, sort_keys=True), mode=RECORD_MODE)
        os.chmod(path, RECORD_MODE)  # the umask narrows write_atomic's mode; every verifier reads this
    except OSError as exc:
        raise InstallationError(f"cannot record the installation in {path}: {exc.strerror or exc}") from None
    return path


def _unsafe(path: Path) -> str | None:
    """Why others than the installer could have changed the record, or None."""
    info = path.lstat()
    if not stat.S_ISREG(info.st_mode):
        return "it is not a regular file"
    directory = path.parent.stat()
    if info.st_uid != directory.st_uid:
        return (f"it is owned by uid {info.st_uid}, its directory by uid {directory.st_uid} "
                f"(the installer owns both)")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"it is writable by others (mode {stat.S_IMODE(info.st_mode):o})"
    if directory.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not directory.st_mode & stat.S_ISVTX:
        return (f"its directory is writable by others without the sticky bit "
                f"(mode {stat.S_IMODE(directory.st_mode):o}): they could replace it")
    return None


def load(state_dir: str | Path) -> Installation | None:
    """The state directory's record; None when there is none. InstallationError when it is
    unsafe (see the module) or not one aidc writes."""
    path = record_path(state_dir)
    try:
        problem = _unsafe(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InstallationError(f"installation record {path}: cannot read it ({exc.strerror})") from None
    if problem:
        raise InstallationError(f"installation record {path} is not trusted: {problem}")
    try:
        doc = json.loads(path.read_text())
        if doc.get("format") != FORMAT or any(not isinstance(doc.get(p), dict) for p in TRUST_PARTS):
            raise ValueError(f"format {doc.get('format')!r}")
        signing = doc.get("audit_signing") or {}
        return Installation(path, str(doc.get("stack")), {p: doc[p] for p in TRUST_PARTS},
                            signing.get("public_key"), signing.get("key_id"))
    except (OSError, ValueError, AttributeError) as exc:
        raise InstallationError(f"installation record {path} is not one aidc writes ({exc})") from None


def audit_public_key(db: str | Path) -> str | None:
    """The signing public key of the installation an audit log belongs to (the record in the
    log's directory); None when it has none. InstallationError when the record is unsafe."""
    found = load(Path(db).parent)
    return found.public_key_pem if found is not None else None


def disagreement(installed: Installation, spec) -> list[str]:
    """The `part.key` paths where a caller's spec differs from the installation's record."""
    given = trust_parts(spec)
    return [f"{part}.{key}" for part in TRUST_PARTS
            for key in sorted(set(given[part]) | set(installed.parts[part]))
            if given[part].get(key) != installed.parts[part].get(key)]


def require(state_dir: str | Path, spec, stack: str, identity: str, action: str, audit=None,
            node: str | None = None, payload: dict | None = None) -> Installation:
    """The installation a privileged action takes its roles and policy from. Refused (audited
    `access.refused`, PolicyRefusal: exit 3) when there is no trusted record, or when the
    caller's --stack disagrees with it on access or policy."""
    path = record_path(state_dir)
    try:
        installed = load(state_dir)
        problem = None if installed is not None else (
            f"no installation record {path}: the installer records it (`aidc failover install --stack ... "
            f"--lab-dir {state_dir}`, `aidc lab run` or the controller's first start)")
    except InstallationError as exc:
        installed, problem = None, str(exc)
    if installed is not None:
        differs = disagreement(installed, spec)
        if differs:
            problem = (f"--stack {stack} disagrees with the installation ({path}) on {', '.join(differs)}: "
                       f"roles and policy come from the installation, not the caller's stack file")
    if problem is None:
        return installed
    reason = f"{identity} may not {action}: {problem}"
    if audit is not None:
        audit.append("access.refused", reason, actor=identity, node=node,
                     payload={**(payload or {}), "identities": [identity], "action": action,
                              "installation": str(path), "problem": problem})
    raise PolicyRefusal(reason)
