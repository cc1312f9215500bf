"""Properties of the stack-file reader over generated input: mutations of the real stack files, and
arbitrary text. Whatever the input, the only exception is aidc's SpecError (one bounded line), and
any spec that is accepted is valid: it survives the JSON round trip the Pulumi program makes
(`pulumi config get aidc:cluster --json`) unchanged, and stays inside the model's bounds."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aidc.errors import SpecError
from aidc.spec import MAX_NODES, ClusterSpec, parse_spec, parse_stack_text
from aidc.stack_yaml import MAX_DEPTH, MAX_VALUES, StackYamlError, load_stack_yaml

ROOT = Path(__file__).resolve().parents[1]
STACK_FILES = {path.name: path.read_text() for path in
               [ROOT / "Pulumi.lab.yaml", ROOT / "Pulumi.h100-example.yaml",
                ROOT / "tests/infra/stacks/Pulumi.capi-roce.yaml"]}

# The strategies below carry long lists of sample values; hypothesis warns when it describes them.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")
# Bounded so the whole file runs in a few seconds; no deadline, since wall-clock is not a property.
BOUNDED = settings(max_examples=150, deadline=None, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Scalars that YAML 1.1, YAML 1.2, PyYAML and pydantic disagree about, and the tags a file can carry.
TRICKY_SCALARS = [
    "true", "false", "True", "FALSE", "yes", "no", "on", "off", "y", "n", "~", "null", "''", '""',
    "1:30", "190:20:30", "0x1F", "0o17", "017", "0", "-0", "+12", "1_000", "1e3", "1.0e+300", "-1.5",
    ".inf", "-.inf", ".nan", "2026-01-31", "2001-12-14t21:59:43.10-05:00", "'4'", '"4"', "4", "-1",
    "65536", "99999999999999999999", "9" * 400, "<<", "=", "'a\\nb'", '"\\u0000"', '"\\x85"', "[]", "{}",
    "!!int 3", "!!int abc", "!!float 3", "!!float x", "!!bool yes", "!!str 4", "!!null ''", "!!null x",
    "!!timestamp 2001-12-14", "!!binary aGk=", "!!set {a}", "!!omap [{a: 1}]", "!custom x",
    "!!python/object/apply:os.system [echo]", "!!str [a]", "! 12", "*a", "*undefined", "&a 1", "|", ">-",
    "1Gi", "0Gi", "9999999Pi", "25%", "150%", "H100", "SIM", "gpu", "lo", "10.0.0.0/8", "1.33.4",
]
ANCHORS = st.sampled_from(["a", "b", "c"])
PLAIN_WORDS = st.text(alphabet="abcxyz019-_./:%", min_size=1, max_size=12)


def _bomb(levels: int, fanout: int) -> str:
    """A flow sequence of anchors, each a list of `fanout` aliases to the one before."""
    parts = ["&l0 [" + ", ".join(["lol"] * fanout) + "]"]
    parts += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * fanout) + "]" for i in range(1, levels)]
    return "[" + ", ".join(parts) + "]"


scalars = st.one_of(
    st.sampled_from(TRICKY_SCALARS),
    st.integers(min_value=-(2 ** 70), max_value=2 ** 70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    PLAIN_WORDS,
)
keys = st.one_of(st.sampled_from(["count", "name", "spares", "rails", "kind", "size", "<<", "x", "1", "true", "?"]),
                 PLAIN_WORDS)
# One-line YAML fragments: flow collections, anchors, aliases, merge keys, tags; now and then
# an alias bomb or deep nesting.
flow_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(lambda items: "[" + ", ".join(items) + "]"),
        st.lists(st.tuples(keys, inner), max_size=4).map(
            lambda pairs: "{" + ", ".join(f"{k}: {v}" for k, v in pairs) + "}"),
        st.tuples(ANCHORS, inner).map(lambda t: f"&{t[0]} {t[1]}"),
        ANCHORS.map(lambda name: f"*{name}"),
        st.tuples(ANCHORS, inner).map(lambda t: f"{{<<: *{t[0]}, x: {t[1]}}}"),
        st.tuples(st.sampled_from(["!!map", "!!seq", "!!str", "!!int", "!x", "!!merge"]), inner).map(" ".join),
    ),
    max_leaves=12,
)
fragments = st.integers(0, 9).flatmap(
    lambda pick: st.builds(_bomb, st.integers(1, 10), st.integers(1, 10)) if pick == 0 else
    st.integers(0, 2 * MAX_DEPTH).map(lambda depth: "[" * depth + "x" + "]" * depth) if pick == 1 else
    flow_values)
TRICKY_CHARS = st.text(alphabet="[]{}:,&*!|>'\"%@`#-?<= \t\n\r\\\x00\x85\ufeffaz09.", min_size=1, max_size=3)


def _assert_one_bounded_line(err: SpecError) -> None:
    message = f"aidc: error: {err}"
    assert "\n" not in message and "\r" not in message, message
    assert len(message) < 800, message


def _assert_valid(spec: ClusterSpec) -> None:
    """An accepted spec is what the Pulumi program gets back from JSON, and keeps the model's bounds."""
    as_json = json.dumps(spec.model_dump(mode="json"), allow_nan=False)
    assert parse_spec(json.loads(as_json)) == spec
    assert sum(p.count + p.spares for p in spec.node_pools) <= MAX_NODES
    assert all(type(p.count) is int and type(p.gpus_per_node) is int for p in spec.node_pools)
    assert type(spec.policy.dry_run) is bool
    assert math.isfinite(spec.fabric.link_speed_gbps) and math.isfinite(spec.agent.poll_interval_s)


def _check(text: str) -> None:
    try:
        spec = parse_stack_text(text, "Pulumi.generated.yaml")
    except SpecError as err:
        _assert_one_bounded_line(err)
        return
    _assert_valid(spec)


def _leaf_lines(lines: list[str]) -> list[int]:
    """The lines `key: value` of a stack file whose value is on the same line."""
    return [i for i, line in enumerate(lines) if ": " in line and not line.rstrip().endswith(":")
            and not line.lstrip().startswith(("#", "- "))]


# Anchors the fragments' aliases can name (a fragment may also redefine them, as YAML allows).
ANCHOR_PREAMBLE = "x-anchors: {a: &a {spares: 1}, b: &b {count: 3, gpus_per_node: 2}, c: &c 4}\n"


@st.composite
def mutated_stack_files(draw) -> str:
    """A real stack file with some values replaced by fragments and some characters changed."""
    lines = (ANCHOR_PREAMBLE + STACK_FILES[draw(st.sampled_from(sorted(STACK_FILES)))]).splitlines()
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.sampled_from(_leaf_lines(lines)))
        lines[i] = f"{lines[i].split(': ', 1)[0]}: {draw(fragments)}"
    for _ in range(draw(st.integers(0, 1))):
        where = draw(st.integers(1, len(lines) - 1))  # a sibling of the line it goes before
        indent = lines[where][:len(lines[where]) - len(lines[where].lstrip(" -"))].replace("-", " ")
        lines.insert(where, f"{indent}{draw(keys)}: {draw(fragments)}")
    text = "\n".join(lines) + "\n"
    for _ in range(draw(st.integers(0, 1))):
        at = draw(st.integers(0, len(text)))
        cut = draw(st.integers(0, 2))
        text = text[:at] + draw(TRICKY_CHARS) + text[at + cut:]
    return text


@BOUNDED
@given(mutated_stack_files())
def test_mutated_stack_files_give_a_valid_spec_or_one_spec_error_line(text):
    _check(text)


@BOUNDED
@given(st.sampled_from(sorted(STACK_FILES)), st.data())
def test_one_value_of_a_real_stack_file_replaced_gives_a_valid_spec_or_one_error_line(name, data):
    # Kept apart from the heavier mutations above so that many generated values reach pydantic.
    lines = STACK_FILES[name].splitlines()
    i = data.draw(st.sampled_from(_leaf_lines(lines)))
    key, original = lines[i].split(": ", 1)
    value = data.draw(st.one_of(
        fragments,
        st.integers(-1, 70000).map(str),
        st.sampled_from([original, f"&z {original}", f"!!str {original}", f"'{original}'", f"[{original}]"]),
    ))
    lines[i] = f"{key}: {value}"
    _check(ANCHOR_PREAMBLE + "\n".join(lines) + "\n")


YAML_LINE_BREAK = re.compile("\r\n|[\r\n\x85\u2028\u2029]")


def _shape(value) -> tuple[int, int]:
    """Checks a loaded document holds only plain YAML 1.2 core values; returns (values, nesting)."""
    if isinstance(value, (dict, list)):
        children = [x for pair in value.items() for x in pair] if isinstance(value, dict) else value
        measured = [_shape(child) for child in children]
        return 1 + sum(n for n, _ in measured), 1 + max((d for _, d in measured), default=0)
    assert value is None or type(value) in (str, int, float, bool), type(value)
    return 1, 0


@BOUNDED
@given(st.one_of(st.text(alphabet=st.characters(codec="utf-8"), max_size=200),
                 st.lists(st.one_of(fragments, TRICKY_CHARS, keys.map(lambda k: f"{k}: ")), max_size=12).map("".join)))
def test_any_text_loads_as_core_yaml_values_within_the_limits_or_one_yaml_error(text):
    try:
        doc = load_stack_yaml(text)
    except StackYamlError as err:
        assert err.line is None or 1 <= err.line <= len(YAML_LINE_BREAK.split(text)) + 1
        assert "\n" not in str(err) and len(str(err)) < 500, str(err)
        return
    values, nesting = _shape(doc)
    assert values <= MAX_VALUES and nesting <= MAX_DEPTH
