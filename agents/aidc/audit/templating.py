"""The Jinja2 environment of aidc's HTML reports: templates are package data
(aidc/audit/templates), autoescape is on for every template, and an undefined name is an
error rather than an empty string, so a renamed field cannot silently vanish from a report."""

from __future__ import annotations

from functools import lru_cache

import jinja2


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.PackageLoader("aidc.audit", "templates"), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=False, lstrip_blocks=False)


def render(template: str, **context) -> str:
    return environment().get_template(template).render(**context)
