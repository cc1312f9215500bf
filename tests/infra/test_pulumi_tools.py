"""The scripts that derive the pinned schema files from an operator release."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml
from pulumi_harness import ROOT

TOOLS = ROOT / "infra" / "tools"


def test_crd_stripper_keeps_structure_and_drops_descriptions_and_status(tmp_path):
    crd = {"spec": {"group": "example.com", "names": {"kind": "Widget"}, "versions": [{"name": "v1", "schema": {
        "openAPIV3Schema": {"type": "object", "description": "words", "properties": {
            "spec": {"type": "object", "required": ["size"], "description": "more words", "properties": {
                "size": {"type": "integer", "minimum": 1, "description": "x"},
                "mode": {"type": "string", "enum": ["a", "b"]}}},
            "status": {"type": "object"}}}}}]}}
    path = tmp_path / "crd.yaml"
    path.write_text(yaml.safe_dump(crd))
    out = subprocess.run([sys.executable, str(TOOLS / "strip_crd_schema.py"), str(path), "v1", "test"],
                         capture_output=True, text=True, check=True).stdout
    doc = json.loads(out)
    assert (doc["group"], doc["kind"], doc["version"], doc["source"]) == ("example.com", "Widget", "v1", "test")
    assert doc["schema"]["properties"] == {"spec": {"type": "object", "required": ["size"], "properties": {
        "size": {"type": "integer", "minimum": 1}, "mode": {"type": "string", "enum": ["a", "b"]}}}}


def test_values_key_lister_marks_empty_maps_as_open(tmp_path):
    path = tmp_path / "values.yaml"
    path.write_text("driver:\n  enabled: true\n  env: []\n  labels: {}\n")
    out = subprocess.run([sys.executable, str(TOOLS / "helm_values_keys.py"), str(path), "c", "1.0", "test"],
                         capture_output=True, text=True, check=True).stdout
    doc = json.loads(out)
    assert doc["keys"] == ["driver", "driver.enabled", "driver.env", "driver.labels"]
    assert doc["open_maps"] == ["driver.labels"]


def test_tools_print_usage_on_help_and_fail_on_missing_arguments():
    for tool in ("strip_crd_schema.py", "helm_values_keys.py"):
        helped = subprocess.run([sys.executable, str(TOOLS / tool), "--help"], capture_output=True, text=True)
        assert helped.returncode == 0 and "Usage:" in helped.stdout
        assert subprocess.run([sys.executable, str(TOOLS / tool)], capture_output=True).returncode == 2
