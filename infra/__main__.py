"""Pulumi entry point: read `aidc:cluster` from the stack, validate it with the one spec model, build."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "infra"), str(ROOT / "agents")]  # aidc_infra and the aidc package

import pulumi  # noqa: E402

from aidc.errors import AidcError  # noqa: E402
from aidc.spec import parse_spec  # noqa: E402
from aidc_infra.program import build  # noqa: E402

try:
    spec = parse_spec(pulumi.Config("aidc").require_object("cluster"), f"Pulumi.{pulumi.get_stack()}.yaml")
    exports = build(spec, ROOT)
except AidcError as exc:
    raise pulumi.RunError(f"aidc: {exc}") from None  # the CLI shows the message, not a traceback
for key, value in exports.items():
    pulumi.export(key, value)
