"""Burn-in certificates as signed documents that verify offline.

A certificate is a node's latest `burnin.certificate` audit record, exported with every field
the record's hash covers (so the hash can be recomputed from the document) and a signature by
the cluster's signing key (Ed25519, or ECDSA P-256 where the provider has no Ed25519: the
algorithm is named in the signed document and must match the verifying key) over a domain-separated canonical encoding of the
whole document. Export refuses a log that does not verify with that key's public half: a
certificate vouches only for a record in an intact, signed history. Verifying needs the
public key (`aidc kms public-key`) and nothing else: no log, no keyring.
"""

from __future__ import annotations

import base64
import json
import time

from aidc import strict_json
from aidc.audit.log import COLUMNS, AuditLog, record_hash
from aidc.errors import AuditError

FORMAT = "aidc-burnin-certificate-v1"
DOMAIN = FORMAT.encode() + b"\0"
RECORD_KIND = "burnin.certificate"


def _signed_bytes(document: dict) -> bytes:
    # Everything but the signature value: the key id and version it names are signed too.
    body = {**document, "signature": {k: v for k, v in document["signature"].items() if k != "value"}}
    return DOMAIN + strict_json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def export_certificate(log: AuditLog, node: str, signer) -> dict:
    """The signed certificate of `node`'s latest burn-in record; AuditError when there is none
    or when the log does not verify with the signer's public key."""
    result = log.verify(public_key_pem=signer.public_key_pem())
    if not result.ok:
        raise AuditError(f"{log.path} does not verify with key {signer.key_id!r}"
                         f"{result.failure}; no certificate is issued from it")
    record = log.latest_stored(RECORD_KIND, node)
    if record is None:
        raise AuditError(f"{log.path} holds no burn-in certificate for node {node!r}")
    payload = json.loads(record["payload"])
    document = {"format": FORMAT, "node": node, "verdict": payload.get("verdict"), "reason": record["reason"],
                "issued_at": time.time(), "audit_records": result.records, "record": record}
    document["signature"] = {"algorithm": signer.signing_algorithm, "key_id": signer.key_id, "key_version": signer.signing_key_version}
    document["signature"]["value"] = base64.b64encode(signer.sign(_signed_bytes(document))).decode()
    return document


def verify_certificate(text: str, public_key_pem: str) -> tuple[bool, str]:
    """(valid, why): the signature holds under this key and the document is self-consistent."""
    from aidc.kms import KmsError, verify_with_pem

    try:
        document = json.loads(text)
    except ValueError as exc:
        return False, f"not a certificate: not JSON ({exc})"
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        return False, f"not a certificate: format is not {FORMAT}"
    signature, record = document.get("signature"), document.get("record")
    if not isinstance(signature, dict) or not isinstance(signature.get("value"), str):
        return False, "the certificate carries no signature"
    try:
        signature_bytes = base64.b64decode(signature["value"], validate=True)
    except ValueError:
        return False, "the signature is not base64"
    try:
        algorithm = signature.get("algorithm")
        if algorithm is not None and not isinstance(algorithm, str):
            return False, "the signature's algorithm is not a name"
        signed = verify_with_pem(public_key_pem, _signed_bytes(document), signature_bytes, algorithm)
    except KmsError as exc:
        return False, f"the public key: {exc}"
    if not signed:
        return False, ("the signature does not match: the certificate was modified or signed by another key "
                       f"(it names key {signature.get('key_id')!r} version {signature.get('key_version')})")
    # Signed, so these hold unless the exporter itself was wrong; checked all the same.
    if not isinstance(record, dict) or set(record) != set(COLUMNS):
        return False, "the certificate's audit record is incomplete"
    if record_hash(*(record[k] for k in ("prev_hash", "seq", "ts", "actor", "node", "kind", "reason",
                                         "payload"))) != record["hash"]:
        return False, f"audit record {record['seq']} does not match its hash"
    if (record["kind"] != RECORD_KIND or record["node"] != document.get("node")
            or json.loads(record["payload"]).get("verdict") != document.get("verdict")):
        return False, "the certificate's node or verdict differs from its audit record"
    return True, (f"node {document['node']}: burn-in {document['verdict']} ({document['reason']}); audit record "
                  f"{record['seq']}, signed by key {signature.get('key_id')} version {signature.get('key_version')}")
