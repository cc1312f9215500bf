import pytest

from aidc.audit.log import AuditLog

from .lab_log import build_lab_audit_log


@pytest.fixture
def lab_log(tmp_path):
    """(path of a lab-like audit log, a function that renders its report as HTML)."""
    from aidc.audit.report import render_html

    db = build_lab_audit_log(tmp_path)

    def render(now: float = 1.8e9) -> str:
        with AuditLog(db, read_only=True) as log:
            return render_html(log, now=now)
    return db, render
