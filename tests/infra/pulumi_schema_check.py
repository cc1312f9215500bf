"""Offline checks of what the program creates: Kubernetes built-ins with kubernetes-validate
(strict), custom resources with the structural schemas of the pinned operator releases
(infra/aidc_infra/schemas), Helm values against the pinned charts' value keys."""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from pathlib import Path

import jsonschema
import kubernetes_validate

SCHEMAS = Path(__file__).resolve().parents[2] / "infra" / "aidc_infra" / "schemas"


def strictify(schema: dict) -> dict:
    """Reject unknown fields, as a misspelt field is silently pruned by the API server."""
    schema = copy.deepcopy(schema)

    def walk(node: dict) -> None:
        if "properties" in node:
            if "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            for child in node["properties"].values():
                walk(child)
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                walk(node[key])
        for key in ("anyOf", "oneOf", "allOf"):
            for child in node.get(key, []):
                walk(child)

    walk(schema)
    return schema


@lru_cache(maxsize=1)
def custom_schemas() -> dict[tuple[str, str], dict]:
    out = {}
    for path in SCHEMAS.glob("*_*_*.json"):
        if path.name.endswith(".values.json"):
            continue
        doc = json.loads(path.read_text())
        out[(f"{doc['group']}/{doc['version']}", doc["kind"])] = doc
    return out


def custom_resource_errors(obj: dict) -> list[str]:
    doc = custom_schemas().get((obj["apiVersion"], obj["kind"]))
    if doc is None:
        return [f"no pinned schema for {obj['apiVersion']} {obj['kind']}"]
    validator = jsonschema.Draft7Validator(strictify(doc["schema"]))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(obj)]


def builtin_errors(obj: dict, version: str) -> list[str] | None:
    """kubernetes-validate's strict verdict; None when the kind is not a Kubernetes built-in."""
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return None
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.path))}: {exc.message}"]
    return []


def values_file(chart: str, version: str) -> dict:
    return json.loads((SCHEMAS / f"{chart}_{version}.values.json").read_text())


def unknown_value_keys(values: dict, chart: str, version: str) -> list[str]:
    known = values_file(chart, version)
    keys, open_maps = set(known["keys"]), tuple(p + "." for p in known["open_maps"])
    bad = []

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            path = f"{prefix}{key}"
            if path.startswith(open_maps):
                continue
            if path not in keys:
                bad.append(path)
            elif isinstance(value, dict):
                walk(value, path + ".")

    walk(values, "")
    return bad
