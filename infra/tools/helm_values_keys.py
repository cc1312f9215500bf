"""List the key paths of a Helm chart's default values, for the offline values check in tests/infra.

Usage: helm_values_keys.py values.yaml CHART VERSION SOURCE > infra/aidc_infra/schemas/<chart>_<version>.values.json

A path ending in a map whose default is empty (`{}`) accepts any sub-key; lists are leaves.
"""

from __future__ import annotations

import json
import sys

import yaml


def paths(node: dict, prefix: str = "") -> tuple[list[str], list[str]]:
    keys, open_maps = [], []
    for key, value in node.items():
        path = f"{prefix}{key}"
        keys.append(path)
        if isinstance(value, dict):
            if not value:
                open_maps.append(path)
            sub_keys, sub_open = paths(value, path + ".")
            keys += sub_keys
            open_maps += sub_open
    return keys, open_maps


def main(values_file: str, chart: str, version: str, source: str) -> None:
    keys, open_maps = paths(yaml.safe_load(open(values_file)) or {})
    json.dump({"source": source, "chart": chart, "version": version, "keys": sorted(keys),
               "open_maps": sorted(open_maps)}, sys.stdout, indent=0)
    sys.stdout.write("\n")


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help") else 2)
    main(*sys.argv[1:])
