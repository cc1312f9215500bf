"""Reduce a CRD's openAPIV3Schema to its structure, for the offline field checks in tests/infra.

Usage: strip_crd_schema.py CRD.yaml VERSION SOURCE > infra/aidc_infra/schemas/<group>_<kind>_<version>.json

Keeps what a validator needs (type, properties, items, required, enum, int-or-string,
preserve-unknown-fields, additionalProperties, min/max) and drops descriptions and the
`status` subtree (Pulumi never writes status). SOURCE is recorded as provenance, so the
pinned operator release a schema came from is visible next to it.
"""

from __future__ import annotations

import json
import sys

import yaml

KEEP = {"type", "required", "enum", "minimum", "maximum", "minItems", "maxItems", "minLength", "maxLength",
        "pattern", "format", "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields", "nullable"}


def strip(node: dict) -> dict:
    out = {k: v for k, v in node.items() if k in KEEP}
    if "properties" in node:
        out["properties"] = {k: strip(v) for k, v in node["properties"].items()}
    if isinstance(node.get("items"), dict):
        out["items"] = strip(node["items"])
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = strip(node["additionalProperties"])
    for key in ("anyOf", "oneOf", "allOf"):
        if key in node:
            out[key] = [strip(v) for v in node[key]]
    return out


def main(path: str, version: str, source: str) -> None:
    crd = yaml.safe_load(open(path))
    served = {v["name"]: v for v in crd["spec"]["versions"]}
    schema = strip(served[version]["schema"]["openAPIV3Schema"])
    schema["properties"].pop("status", None)
    doc = {"source": source, "group": crd["spec"]["group"], "kind": crd["spec"]["names"]["kind"],
           "version": version, "schema": schema}
    json.dump(doc, sys.stdout, indent=None, separators=(",", ":"), sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help") else 2)
    main(*sys.argv[1:])
