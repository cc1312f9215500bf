"""Every problem of a stack file, listed; and the JSON Schema of `aidc:cluster` an editor can use.

`aidc spec check` lists each problem (text: one line per problem; --json: a `problems` list),
and `aidc spec schema` prints a JSON Schema generated from the pydantic model. The schema
accepts every shipped stack, and where the schema rejects a value the model rejects it too; the
model rejects more only through the rules a JSON Schema cannot state (SCHEMA_CANNOT_EXPRESS)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import jsonschema
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from aidc.errors import SpecError
from aidc.spec import CONFIG_KEY, MAX_LISTED_PROBLEMS, ClusterSpec, cluster_json_schema, parse_spec
from aidc.stack_yaml import load_stack_yaml

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = [ROOT / "Pulumi.lab.yaml", ROOT / "Pulumi.h100-example.yaml",
           *sorted(ROOT.glob("tests/**/Pulumi.*.yaml"))]
BOUNDED = settings(max_examples=200, deadline=None, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _cluster(path: Path) -> dict:
    return load_stack_yaml(path.read_text())["config"][CONFIG_KEY]


def _validator() -> jsonschema.Draft202012Validator:
    schema = cluster_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


VALIDATOR = _validator()


# -- every problem, listed ----------------------------------------------------------------------
THREE_PROBLEMS = {
    "name": "Bad_Name",
    "colour": "red",
    "node_pools": [{"name": "gpu", "count": 0, "gpu_model": "SIM", "gpus_per_node": 1}],
    "policy": {"max_unavailable": "150%"},  # a union: two errors from pydantic, one problem
}
THREE_KEYS = {"aidc:cluster.name", "aidc:cluster.colour", "aidc:cluster.node_pools[0].count",
              "aidc:cluster.policy.max_unavailable"}


def test_a_spec_error_carries_every_problem_each_with_its_key_path():
    with pytest.raises(SpecError) as err:
        parse_spec(THREE_PROBLEMS, "f.yaml")
    assert {key for key, _ in err.value.problems} == THREE_KEYS
    # The first problem is the error's own key; the one-line message still counts the others.
    assert err.value.problems[0] == (err.value.key, err.value.expected.split(" (and ")[0])
    assert len(str(err.value).splitlines()) == 1


INDEPENDENT_MUTATIONS = [  # (path, bad value, the key path the problem is reported at)
    (("name",), "UPPER", "aidc:cluster.name"),
    (("device_backend",), "cuda", "aidc:cluster.device_backend"),
    (("fabric", "rails"), 99, "aidc:cluster.fabric.rails"),
    (("kms", "rotation_days"), 0, "aidc:cluster.kms.rotation_days"),
    (("agent", "metrics_port"), "9402", "aidc:cluster.agent.metrics_port"),
    (("lab", "base_port"), 80, "aidc:cluster.lab.base_port"),
    (("software", "kubernetes_version"), "1.29", "aidc:cluster.software.kubernetes_version"),
    (("policy", "dry_run"), "yes", "aidc:cluster.policy.dry_run"),
    (("policy", "breaker", "max_quarantines"), "0%", "aidc:cluster.policy.breaker.max_quarantines"),
    (("slurm", "command_timeout_s"), -1, "aidc:cluster.slurm.command_timeout_s"),
    (("typo",), 1, "aidc:cluster.typo"),
]


def _set(data: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        data = data.setdefault(key, {})
    data[path[-1]] = value


@BOUNDED
@given(st.sets(st.sampled_from(range(len(INDEPENDENT_MUTATIONS))), min_size=1))
def test_every_independent_problem_is_listed_once(chosen):
    data = _cluster(ROOT / "Pulumi.lab.yaml")
    for i in chosen:
        path, value, _ = INDEPENDENT_MUTATIONS[i]
        _set(data, path, value)
    with pytest.raises(SpecError) as err:
        parse_spec(data)
    keys = [key for key, _ in err.value.problems]
    assert sorted(keys) == sorted(INDEPENDENT_MUTATIONS[i][2] for i in chosen)


def test_the_listing_is_bounded_and_says_how_many_it_left_out():
    data = _cluster(ROOT / "Pulumi.lab.yaml")
    data["access"] = {"roles": {f"user:u{i}": "king" for i in range(MAX_LISTED_PROBLEMS + 30)}}
    with pytest.raises(SpecError) as err:
        parse_spec(data)
    assert len(err.value.problems) == MAX_LISTED_PROBLEMS
    assert err.value.problems_total == MAX_LISTED_PROBLEMS + 30


def _bad_stack(tmp_path) -> Path:
    path = tmp_path / "Pulumi.bad.yaml"
    path.write_text(yaml.safe_dump({"config": {CONFIG_KEY: THREE_PROBLEMS}}))
    return path


def test_spec_check_prints_one_line_per_problem(tmp_path, aidc_cli):
    path = _bad_stack(tmp_path)
    proc = aidc_cli("spec", "check", "--stack", str(path))
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == len(THREE_KEYS)
    assert all(line.startswith(f"aidc: error: {path}: ") for line in lines)
    assert {line.split(": ")[3] for line in lines} == THREE_KEYS


def test_spec_check_json_lists_every_problem(tmp_path, aidc_cli):
    path = _bad_stack(tmp_path)
    proc = aidc_cli("spec", "check", "--stack", str(path), "--json")
    assert proc.returncode == 2 and proc.stdout == ""
    error = json.loads(proc.stderr)
    assert error["file"] == str(path) and error["exit_code"] == 2
    assert {p["key"] for p in error["problems"]} == THREE_KEYS
    assert all(p["expected"] for p in error["problems"])


# -- the JSON Schema ------------------------------------------------------------------------------
def test_spec_schema_prints_the_schema_that_validates_every_shipped_stack(aidc_cli):
    proc = aidc_cli("spec", "schema")
    assert proc.returncode == 0, proc.stderr
    schema = json.loads(proc.stdout)
    assert schema == cluster_json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    validator = jsonschema.Draft202012Validator(schema)
    assert len(SHIPPED) >= 3
    for path in SHIPPED:
        errors = [e.message for e in validator.iter_errors(_cluster(path))]
        assert errors == [], f"{path.name}: {errors}"


def test_spec_schema_for_the_whole_stack_file_validates_the_files_themselves(aidc_cli):
    proc = aidc_cli("spec", "schema", "--stack-file")
    assert proc.returncode == 0, proc.stderr
    validator = jsonschema.Draft202012Validator(json.loads(proc.stdout))
    for path in SHIPPED:
        assert list(validator.iter_errors(load_stack_yaml(path.read_text()))) == [], path.name
    bad = load_stack_yaml((ROOT / "Pulumi.lab.yaml").read_text())
    bad["config"][CONFIG_KEY]["node_pools"][0]["count"] = 0
    assert not validator.is_valid(bad)


# Rules the model checks that a JSON Schema cannot state: relations between fields, values
# computed from others (node names, totals), and parsing (an IPv4 network). A model error at
# one of these key paths, of pydantic's type value_error, may pass the schema.
SCHEMA_CANNOT_EXPRESS = {
    (): "pool names and derived node names unique, total nodes <= MAX_NODES, relays list nodes of "
        "this cluster, cluster-api pools need a patch release, controller pods' DSN from a Secret, "
        "addresses and machine names unique",
    ("node_pools",): "total nodes across pools <= MAX_NODES; one address per node when listed",
    ("fabric",): "hcas/rail_ifnames as many as rails; RoCE needs gid_index; rails >= 1 for some kinds",
    ("fabric", "ipam_cidr"): "an IPv4 network with no host bits set",
    ("kms",): "provider pkcs11 needs a pkcs11 section",
    ("policy", "burnin"): "allreduce_min_bytes <= allreduce_max_bytes with a power of two between",
    ("kubernetes",): "retry_period_s < renew_deadline_s < lease_duration_s",
    ("state",): "backend sqlite takes no DSN source, backend postgres exactly one",
    ("storage", "datasets", "size"): "at most 1024Pi",
    ("storage", "checkpoints", "size"): "at most 1024Pi",
    ("node_pools", "addresses"): "IP addresses",
    ("agent", "listen_address"): "management or an IP address",
    ("agent", "controller_url"): "an https://HOST:PORT URL",
    ("controller",): "distinct host names and ports",
    ("controller", "hosts", "address"): "an IP address",
}


def _explained(error: dict) -> bool:
    """A model error the schema is allowed to miss (see SCHEMA_CANNOT_EXPRESS)."""
    loc = tuple(p for p in error["loc"] if not isinstance(p, int))
    if error["type"] == "value_error" and (loc in SCHEMA_CANNOT_EXPRESS or loc[:1] == ("notify",)):
        return True  # notify targets: secret_env or secret_file, and no url for slack
    # JSON has no NaN or infinity (YAML does); and JSON Schema's "integer" takes 2.0.
    if error["type"] == "finite_number":
        return True
    return error["type"] == "int_type" and isinstance(error["input"], float) and error["input"].is_integer()


def _verdicts(data) -> tuple[bool, bool, list[dict]]:
    try:
        ClusterSpec.model_validate(data)
        model_ok, errors = True, []
    except ValidationError as exc:
        model_ok, errors = False, exc.errors(include_url=False)
    return model_ok, VALIDATOR.is_valid(data), errors


# Representative bad stacks, each rejected by both: types, bounds, enums, patterns, unknown keys,
# the GPU catalog, Kubernetes >= 1.30, percentages within 0-100%.
BAD = [
    (("name",), "Not-DNS"), (("node_pools", 0, "count"), 0), (("node_pools", 0, "gpu_model"), "H900"),
    (("node_pools", 0, "count"), True), (("node_pools", 0, "count"), "4"), (("fabric", "kind"), "token-ring"),
    (("fabric", "link_speed_gbps"), 0), (("software", "kubernetes_version"), "1.29"),
    (("software", "kubernetes_version"), "1.9"), (("policy", "max_unavailable"), "101%"),
    (("policy", "max_unavailable"), -1), (("policy", "breaker", "max_quarantines"), "0%"),
    (("policy", "breaker", "max_quarantines"), "250%"), (("node_pools", 0, "colour"), "red"),
    (("storage", "datasets", "size"), "10GB"), (("access", "roles"), {"nobody": "viewer"}),
    (("access", "roles"), {"user:ann": "king"}), (("node_pools", 0, "labels"), {"k": "v" * 300}),
    (("transport", "relays"), {"-bad-": ["gpu-0"]}), (("agent", "command"), []),
]


def _mutated(base: dict, path: tuple, value) -> dict:
    data = copy.deepcopy(base)
    target = data
    for key in path[:-1]:
        target = target.setdefault(key, {}) if isinstance(key, str) else target[key]
    target[path[-1]] = value
    return data


@pytest.mark.parametrize("path, value", BAD, ids=[".".join(map(str, p)) + "=" + repr(v)[:20] for p, v in BAD])
def test_representative_bad_stacks_are_rejected_by_the_model_and_the_schema(path, value):
    data = _mutated(_cluster(ROOT / "Pulumi.lab.yaml"), path, value)
    model_ok, schema_ok, _ = _verdicts(data)
    assert (model_ok, schema_ok) == (False, False)


def _leaves(value, path=()):
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _leaves(child, (*path, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            yield from _leaves(child, (*path, i))
    if path:
        yield path


# Values around the model's bounds and types. No string ends in a newline: Python's `re` (which
# the jsonschema package uses) lets `$` match before one, ECMA-262 (JSON Schema's regex) does not.
VALUES = st.one_of(
    st.sampled_from([0, 1, 2, 4, 10, 16, 17, 29, 30, 31, 255, 256, 1024, 65535, 65536, 100000, 10 ** 9, -1,
                     0.5, 1.5, 2.0, 1e6, 1e7, -0.5, math.inf, True, False, None, [], {}, [1], {"x": 1},
                     "", "x", "gpu", "SIM", "H100", "25%", "0%", "100%", "101%", "007%", "1.29", "1.30", "1.31",
                     "1.33.4", "10Gi", "2048Pi", "lo", "static", "netns", "roce", "local", "pkcs11", "alert",
                     "10.0.0.0/8", "10.0.0.1/8", "user:ann", "cert:x", "a" * 300, "Up"]),
    st.integers(min_value=-(2 ** 40), max_value=2 ** 40),
    st.text(alphabet="abz019-._%:/ ", max_size=20),
)


@BOUNDED
@given(st.sampled_from(SHIPPED), st.data())
def test_where_the_schema_rejects_the_model_rejects_and_the_model_rejects_more_only_by_unstated_rules(path, data):
    base = _cluster(path)
    leaf = data.draw(st.sampled_from(list(_leaves(base))))
    action = data.draw(st.sampled_from(["replace", "delete", "add"]))
    mutated = copy.deepcopy(base)
    parent = mutated
    for key in leaf[:-1]:
        parent = parent[key]
    if action == "replace":
        parent[leaf[-1]] = data.draw(VALUES)
    elif action == "delete" and isinstance(parent, dict):
        del parent[leaf[-1]]
    elif isinstance(parent, dict):
        parent[data.draw(st.sampled_from(["extra", "Name", "count", "kind"]))] = data.draw(VALUES)
    model_ok, schema_ok, errors = _verdicts(mutated)
    if not schema_ok:
        assert not model_ok, "the schema rejects a stack the model accepts"
    if not model_ok and schema_ok:
        unexplained = [(e["loc"], e["type"]) for e in errors if not _explained(e)]
        assert unexplained == [], "the schema accepts what the model rejects by a rule it could state"
