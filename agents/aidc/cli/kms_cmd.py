"""`aidc kms`: the cluster's key (create, rotate, show the public key and status)."""

from __future__ import annotations

from pathlib import Path

import typer

from aidc.cli.options import VocabularyGroup

from aidc.cli.output import JSON_OPTION, emit
from aidc.spec import load_stack

app = typer.Typer(cls=VocabularyGroup, help="The key that encrypts checkpoints and signs records: create, rotate, inspect.",
                  no_args_is_help=True)

STACK = typer.Option("lab", "--stack", "-s", envvar="AIDC_STACK", help="Stack file naming the key (kms: provider, key_id, ...).")
LAB_DIR = typer.Option(None, "--lab-dir", help="Use the lab's own keyring (<lab-dir>/keyring, local provider).")


def _spec_kms(stack: str, lab_dir: Path | None):
    spec = load_stack(stack)
    if lab_dir is None and spec.scheduler == "lab" and spec.kms.provider == "local" and not spec.kms.keyring:
        lab_dir = Path(".aidc/lab")  # a lab stack's keyring lives in the default lab
    if lab_dir is not None and spec.kms.provider != "local":
        from aidc.kms import KmsError

        raise KmsError(f"--lab-dir uses a local keyring, but stack {stack!r} names provider {spec.kms.provider!r}")
    return spec.kms, lab_dir


def _open(stack: str, lab_dir: Path | None):
    from aidc.kms import open_provider

    kms, lab_dir = _spec_kms(stack, lab_dir)
    return open_provider(kms, lab_dir), lab_dir


def _checkpoint_files(paths: list[Path]) -> list[Path]:
    from aidc.checkpoint import CheckpointError

    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(p.glob("*.ckpt"))
        elif p.exists():
            files.append(p)
        else:
            raise CheckpointError(f"{p}: no such checkpoint or directory")
    return files


@app.command("init")
def init(stack: str = STACK, lab_dir: Path = LAB_DIR, as_json: bool = JSON_OPTION) -> None:
    """Create the stack's key: KEK version 1 and a signing key (Ed25519; ECDSA P-256 on AWS KMS).
    Refuses to replace one."""
    from aidc.kms import create_provider

    kms, lab_dir = _spec_kms(stack, lab_dir)
    provider = create_provider(kms, lab_dir)
    try:
        status = provider.status()
    finally:
        provider.close()
    emit(status, as_json, f"created key {status['key_id']} ({status['provider']}), version {status['current_version']}")


@app.command("rotate")
def rotate(stack: str = STACK, lab_dir: Path = LAB_DIR,
           rewrap: list[Path] = typer.Option([], "--rewrap", help="Checkpoint files or directories whose data "
                                             "keys to re-wrap under the new version (payloads are not touched)."),
           audit_db: Path = typer.Option(None, "--audit-db", help="Audit log to record the rotation in "
                                         "(default: <lab-dir>/audit.db when it exists)."),
           dry_run: bool = typer.Option(False, "--dry-run", help="Say what would change; change nothing."),
           as_json: bool = JSON_OPTION) -> None:
    """Add a new key-encryption key version and make it current; old versions still unwrap."""
    from aidc.audit import AuditLog
    from aidc.audit.log import default_actor
    from aidc.checkpoint import read_header
    from aidc.checkpoint import rewrap as rewrap_file

    provider, lab_dir = _open(stack, lab_dir)
    try:
        files = _checkpoint_files(rewrap)
        old = provider.current_version()
        if dry_run:
            plan = {"dry_run": True, "key_id": provider.key_id, "current_version": old, "new_version": old + 1,
                    "rewrap": [{"path": str(f), "key_version": read_header(f).wrapped.version} for f in files]}
            return emit(plan, as_json, f"would rotate key {provider.key_id} from version {old} to {old + 1}"
                        + "".join(f"\n  would re-wrap {r['path']} (now version {r['key_version']})" for r in plan["rewrap"]))
        new = provider.rotate()
        rewrapped = []
        for f in files:
            before, after = rewrap_file(f, provider)
            rewrapped.append({"path": str(f), "from_version": before, "to_version": after})
        result = {"key_id": provider.key_id, "provider": provider.provider, "previous_version": old,
                  "current_version": new, "rewrapped": rewrapped}
    finally:
        provider.close()
    audit_db = audit_db or (lab_dir / "audit.db" if lab_dir is not None and (lab_dir / "audit.db").exists() else None)
    if audit_db is not None:
        with AuditLog(audit_db) as log:
            log.append("kms.rotate", f"key {result['key_id']} rotated to version {new}", actor=default_actor("kms"),
                       payload=result)
    emit(result, as_json, f"key {result['key_id']} rotated: version {old} -> {new}"
         + "".join(f"\n  re-wrapped {r['path']}: version {r['from_version']} -> {r['to_version']}" for r in rewrapped))


@app.command("public-key")
def public_key(stack: str = STACK, lab_dir: Path = LAB_DIR, as_json: bool = JSON_OPTION) -> None:
    """Print the signing key's public half (PEM), for anyone verifying aidc's signatures."""
    provider, _ = _open(stack, lab_dir)
    try:
        pem = provider.public_key_pem()
        data = {"key_id": provider.key_id, "algorithm": provider.signing_algorithm,
                "signing_key_version": provider.signing_key_version, "pem": pem}
    finally:
        provider.close()
    emit(data, as_json, pem.rstrip("\n"))


@app.command("status")
def status(stack: str = STACK, lab_dir: Path = LAB_DIR, as_json: bool = JSON_OPTION) -> None:
    """The key's provider, versions and signing key, after checking the key can be opened."""
    provider, _ = _open(stack, lab_dir)
    try:
        data = provider.status()
    finally:
        provider.close()
    where = (data.get("keyring") or (f"token {data['token_label']}" if "token_label" in data else None)
             or f"region {data.get('region')}")
    emit(data, as_json, f"key {data['key_id']} ({data['provider']}, {where}): KEK versions "
         f"{', '.join(map(str, data['kek_versions']))}, current {data['current_version']}; signing key "
         f"{data['signing_algorithm']} version {data['signing_key_version']}")
