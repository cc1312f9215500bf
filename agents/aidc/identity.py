"""Who did it: authenticated identities, their roles, and the refusals.

An identity is what aidc authenticated, never what a caller asserts:
* `user:<name>`: the CLI's operating-system user (the effective uid's passwd entry);
* `cert:<CN>`: a client certificate the receiver's mutual TLS verified;
* `token:<name>`: a bearer token the receiver found in its token map (a file of
  `<name> <sha256 hex of the token>` lines: the tokens themselves are stored nowhere).
A self-asserted name (`--by`, `--actor`) is recorded beside the identity as a note.

Roles (`access.roles` in the stack file, identity -> role), each including the one before:
* `viewer`: read-only (list runs, dry-run plans);
* `operator`: start runbook runs (by hand or by alert);
* `approver`: approve a run's waiting `approve` step (a step waits for a person only when it
  guards a destructive step policy does not allow), release quarantined nodes.
With no roles configured nothing is enforced (identities are still recorded). With roles, an
identity not listed has none and is refused everything; a refusal is audited
(`access.refused`) and is exit 3 on the CLI, 403 on the receiver.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import pwd
import re
import stat
from pathlib import Path

from aidc.errors import AidcError, PolicyRefusal

ROLES = ("viewer", "operator", "approver")
IDENTITY_PATTERN = r"^(user|cert|token):[A-Za-z0-9][A-Za-z0-9._@=+,:/ -]{0,252}$"
TOKEN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
# The single bearer token of --token-file / $AIDC_RUNBOOK_TOKEN (no map) authenticates as this.
DEFAULT_TOKEN_IDENTITY = "token:default"


def cli_identity() -> str:
    """`user:<name>` of the effective uid (not $USER, which anyone can set)."""
    uid = os.geteuid()
    try:
        return f"user:{pwd.getpwuid(uid).pw_name}"
    except KeyError:  # a uid with no passwd entry (a container): the number is still who it is
        return f"user:uid-{uid}"


def cert_identity(peer: str | None) -> str | None:
    """`cert:<CN>` of a verified client certificate's `CN=...` subject, or None."""
    if not peer:
        return None
    return f"cert:{peer[3:] if peer.startswith('CN=') else peer}"


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def load_token_map(path: Path) -> dict[str, str]:
    """{sha256 hex: name} from a file of `<name> <sha256 hex>` lines (`#` comments, blank lines).

    Refused when others can write it (they could map their own token to a name)."""
    try:
        info = path.stat()
        text = path.read_text()
    except OSError as exc:
        raise AidcError(f"cannot read token map {path}: {exc.strerror}") from None
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise AidcError(f"token map {path} is writable by others (mode {stat.S_IMODE(info.st_mode):o}): "
                        f"chmod 600 {path}")
    mapping: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or not TOKEN_NAME.match(parts[0]) or not SHA256_HEX.match(parts[1].lower()):
            raise AidcError(f"token map {path}:{number}: expected '<name> <sha256 hex of the token>' "
                            f"(e.g. printf %s \"$TOKEN\" | sha256sum)")
        digest = parts[1].lower()
        if digest in mapping:
            raise AidcError(f"token map {path}:{number}: the same token is mapped twice")
        mapping[digest] = parts[0]
    if not mapping:
        raise AidcError(f"token map {path} maps no token")
    return mapping


def token_identity(presented: str, single_token: str | None, token_map: dict[str, str]) -> str | None:
    """The identity a presented bearer token authenticates, or None. Constant-time compares."""
    found = None
    if single_token is not None and hmac.compare_digest(presented.encode(), single_token.encode()):
        found = DEFAULT_TOKEN_IDENTITY
    digest = token_digest(presented)
    for known, name in token_map.items():
        if hmac.compare_digest(digest, known):
            found = f"token:{name}"
    return found


def role_of(roles: dict[str, str], identities: list[str]) -> str | None:
    """The highest role any of the identities holds, or None."""
    held = [ROLES.index(roles[i]) for i in identities if i in roles]
    return ROLES[max(held)] if held else None


def authorize(roles: dict[str, str], identities: list[str], needed: str, action: str, audit=None,
              node: str | None = None, payload: dict | None = None) -> None:
    """Return when roles are not configured or an identity holds `needed` (or more); else audit
    `access.refused` and raise PolicyRefusal."""
    if not roles:
        return
    role = role_of(roles, identities)
    if role is not None and ROLES.index(role) >= ROLES.index(needed):
        return
    who = " + ".join(identities) or "an unauthenticated caller"
    reason = (f"{who} ({'role ' + role if role else 'no role'}) may not {action}: it needs role {needed} "
              f"(access.roles in the stack file)")
    if audit is not None:
        audit.append("access.refused", reason, actor=identities[0] if identities else "unknown", node=node,
                     payload={**(payload or {}), "identities": identities, "role": role, "needed": needed,
                              "action": action})
    raise PolicyRefusal(reason)
