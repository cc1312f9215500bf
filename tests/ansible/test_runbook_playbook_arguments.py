"""Runbooks and playbooks agree: every remediation playbook and every role declares its
arguments, and every runbook step that runs a playbook passes exactly the declared ones, every
required one, with compatible types."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from aidc.runbook.catalog import Catalog, parse_runbook
from aidc.runbook.playbook_args import (
    PARAM_TO_ANSIBLE,
    PlaybookArgsError,
    playbook_argument_spec,
    step_mismatches,
)
from aidc.runbook.params import PARAM_TYPES

ROOT = Path(__file__).resolve().parents[2]
PLAYBOOKS = ROOT / "playbooks"
REMEDIATION = sorted(p for p in PLAYBOOKS.glob("*.yml") if p.name != "site.yml")
ROLES = sorted(p for p in (PLAYBOOKS / "roles").iterdir() if p.is_dir())


def _playbook_steps():
    for rb in Catalog.load(ROOT / "runbooks").runbooks.values():
        for step in (*rb.steps, *rb.on_failure):
            if step.kind == "playbook":
                yield rb, step


def test_every_runbook_declares_its_params_explicitly():
    for path in sorted((ROOT / "runbooks").glob("*.yaml")):
        assert "params" in yaml.safe_load(path.read_text()), f"{path.name} has no params: section"


@pytest.mark.parametrize("playbook", REMEDIATION, ids=lambda p: p.name)
def test_every_remediation_playbook_declares_its_arguments_first(playbook):
    spec = playbook_argument_spec(playbook)
    for name, arg in spec.items():
        assert arg.get("type") in {"str", "int", "bool", "path", "raw", "list", "dict", "float"}, (name, arg)
        assert arg.get("description"), f"{playbook.name}: argument {name} has no description"


def test_every_runbook_playbook_step_passes_exactly_the_declared_arguments():
    problems = []
    steps = list(_playbook_steps())
    assert len(steps) >= 6
    for rb, step in steps:
        problems += step_mismatches(rb, step, playbook_argument_spec(PLAYBOOKS / step.raw["playbook"]))
    assert problems == []


def test_the_two_reported_mismatches_are_gone():
    runbooks = Catalog.load(ROOT / "runbooks")
    [prune] = [s for s in runbooks.get("checkpoint-disk-full").steps if s.kind == "playbook"]
    assert prune.raw["extravars"]["checkpoint_dir"] == "${path}"
    assert playbook_argument_spec(PLAYBOOKS / "prune-checkpoints.yml")["checkpoint_dir"]["required"] is True
    [reset] = [s for s in runbooks.get("infiniband-link").steps if s.kind == "playbook"]
    assert set(reset.raw["extravars"]) == {"ib_device", "ib_port"}


def test_a_playbook_without_a_declaration_is_refused(tmp_path):
    bare = tmp_path / "bare.yml"
    bare.write_text("- name: Bare\n  hosts: all\n  tasks:\n    - name: Hi\n      ansible.builtin.debug: {msg: hi}\n")
    with pytest.raises(PlaybookArgsError, match="does not start with"):
        playbook_argument_spec(bare)


@pytest.mark.parametrize("role", ROLES, ids=lambda p: p.name)
def test_every_role_declares_every_default_with_a_matching_type(role):
    specs = yaml.safe_load((role / "meta" / "argument_specs.yml").read_text())
    options = specs["argument_specs"]["main"]["options"]
    assert specs["argument_specs"]["main"].get("short_description")
    defaults_file = role / "defaults" / "main.yml"
    defaults = (yaml.safe_load(defaults_file.read_text()) or {}) if defaults_file.exists() else {}
    assert sorted(set(defaults) - set(options)) == [], f"{role.name}: defaults without an argument spec"
    for name, value in defaults.items():
        declared = options[name]["type"]
        templated = isinstance(value, str) and "{{" in value
        if templated:
            assert declared == "raw", f"{role.name}.{name}: a templated default's type is known only after templating"
            continue
        python = {"str": str, "int": int, "bool": bool, "list": list, "dict": dict, "path": str, "raw": object}
        assert isinstance(value, python[declared]) and not (declared == "int" and isinstance(value, bool)), \
            f"{role.name}.{name}: default {value!r} is not {declared}"
        assert options[name].get("default") == value, f"{role.name}.{name}: spec default differs from defaults/main.yml"
        assert options[name].get("description"), f"{role.name}.{name}: no description"


# --- the checker itself, on generated runbooks and playbook specs ------------------------------

NAMES = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True)
ANSIBLE_TYPES = st.sampled_from(["str", "int", "bool", "path", "raw"])


def _runbook(extravars: dict, params: dict):
    return parse_runbook({
        "name": "generated", "title": "Generated", "summary": "A generated runbook for the checker.",
        "trigger": {"alerts": [{"alertname": "Generated"}]}, "params": params,
        "steps": [{"id": "ok", "kind": "approve", "prompt": "Go?"},
                  {"id": "run", "kind": "playbook", "playbook": "x.yml", "extravars": extravars}],
    })


@settings(max_examples=150, deadline=None)
@given(spec=st.dictionaries(NAMES, st.fixed_dictionaries({"type": ANSIBLE_TYPES, "required": st.booleans()}),
                            max_size=4),
       passed=st.dictionaries(NAMES, st.one_of(st.booleans(), st.integers(0, 9), st.sampled_from(["a", "/x"])),
                              max_size=4))
# A variable named like the tail of the playbook's name: the old oracle looked for "l: " in the
# messages and found it in "x.yml: ", so it saw a type problem the checker had rightly not reported.
@example(spec={"a": {"type": "str", "required": True}, "l": {"type": "bool", "required": False}},
         passed={"l": False})
def test_the_checker_reports_every_unknown_missing_or_mistyped_variable(spec, passed):
    rb = _runbook(passed, {})
    findings = step_mismatches(rb, rb.steps[1], spec)
    found = {(f.variable, f.kind) for f in findings}
    expected = {(name, "unknown") for name in set(passed) - set(spec)}
    expected |= {(name, "missing") for name, arg in spec.items() if arg["required"] and name not in passed}
    for name in set(passed) & set(spec):
        value, declared = passed[name], spec[name]["type"]
        fits = (declared == "raw" or (declared == "bool" and isinstance(value, bool))
                or (declared == "int" and isinstance(value, int) and not isinstance(value, bool))
                or (declared in ("str", "path") and isinstance(value, str)))
        if not fits:
            expected.add((name, "mistyped"))
    # No choices are generated, so these three kinds are all there is to find, each once.
    assert found == expected and len(findings) == len(found), findings
    for f in findings:
        assert (f.runbook, f.step, f.playbook) == ("generated", "run", "x.yml")
        assert str(f).startswith("generated/run -> x.yml: ") and "\n" not in str(f)


@settings(max_examples=60, deadline=None)
@given(param_type=st.sampled_from(sorted(PARAM_TYPES)), declared=ANSIBLE_TYPES)
def test_a_param_fits_a_playbook_argument_only_of_a_type_that_can_hold_it(param_type, declared):
    extra = {"int": {"min": 0, "max": 3}, "enum": {"values": ["a"]}, "path": {"under": ["/data"]}}
    params = {"v": {"type": param_type, "description": "generated", **extra.get(param_type, {})}}
    rb = _runbook({"v": "${v}"}, params)
    problems = step_mismatches(rb, rb.steps[1], {"v": {"type": declared, "required": True}})
    fits = declared in PARAM_TO_ANSIBLE[param_type]
    assert [(f.variable, f.kind) for f in problems] == ([] if fits else [("v", "mistyped")])


def test_an_enum_param_must_fit_the_playbook_choices():
    params = {"mode": {"type": "enum", "values": ["soft", "hard"], "description": "reset mode"}}
    rb = _runbook({"mode": "${mode}"}, params)
    assert step_mismatches(rb, rb.steps[1], {"mode": {"type": "str", "choices": ["soft", "hard", "cold"]}}) == []
    [problem] = step_mismatches(rb, rb.steps[1], {"mode": {"type": "str", "choices": ["soft"]}})
    assert (problem.variable, problem.kind) == ("mode", "outside_choices")
    assert "outside the playbook's choices" in str(problem)


@pytest.mark.parametrize("playbook", REMEDIATION, ids=lambda p: p.name)
def test_remediation_playbooks_run_programs_with_argv_lists_never_a_shell_string(playbook):
    """A command line string is split on spaces after templating: `gpu="0 --x"` became two
    arguments. An argv list keeps every value one argument."""
    for play in yaml.safe_load(playbook.read_text()):
        for task in (play.get("pre_tasks") or []) + (play.get("tasks") or []):
            assert not {"ansible.builtin.shell", "shell", "ansible.builtin.raw", "raw"} & set(task), task["name"]
            for action in ("ansible.builtin.command", "command"):
                if action in task:
                    assert isinstance(task[action], dict) and "argv" in task[action], task["name"]


def test_extra_variables_are_written_as_unsafe_text_and_odd_input_is_one_clear_error(tmp_path):
    from aidc.ansible.runner import AnsibleRunError, write_unsafe_extravars

    path = write_unsafe_extravars({"gpu": "0 {{ x }}", "n": 3, "more": {"k": ["a"]}}, tmp_path / "ev.yml")
    text = path.read_text()
    assert "gpu: !unsafe '0 {{ x }}'" in text and "n: 3" in text and "- !unsafe 'a'" in text
    with pytest.raises(AnsibleRunError, match="variable names"):
        write_unsafe_extravars({"bad name": 1}, tmp_path / "x.yml")
    with pytest.raises(AnsibleRunError, match="plain data"):
        write_unsafe_extravars({"p": tmp_path}, tmp_path / "y.yml")
