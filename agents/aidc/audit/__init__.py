"""Tamper-evident audit log (hash-chained SQLite) and its reports."""

from aidc.audit.log import AuditLog, AuditRecord, VerifyResult

__all__ = ["AuditLog", "AuditRecord", "VerifyResult"]
