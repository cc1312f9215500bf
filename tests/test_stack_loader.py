"""Stack files are read with YAML 1.2 scalars, strict types, bounds on every size, and limits on
aliases and nesting; every failure is one `aidc: error:` line naming the file and line or key."""

from __future__ import annotations

from pathlib import Path

import pytest

from aidc.errors import SpecError
from aidc.spec import load_stack, parse_spec

ROOT = Path(__file__).resolve().parents[1]
POOL = "{name: gpu, count: 2, gpu_model: SIM, gpus_per_node: 2}"


def _stack_text(*cluster_lines: str, pools: str = f"[{POOL}]", preamble: str = "") -> str:
    body = "".join(f"    {line}\n" for line in cluster_lines)
    return f"{preamble}config:\n  aidc:cluster:\n    name: t\n    node_pools: {pools}\n{body}"


def _load(tmp_path, text: str):
    path = tmp_path / "Pulumi.t.yaml"
    path.write_text(text)
    return load_stack(path)


def _refused(tmp_path, text: str, *needles: str) -> SpecError:
    with pytest.raises(SpecError) as err:
        _load(tmp_path, text)
    message = str(err.value)
    assert "\n" not in message and len(message) < 600, message
    for needle in needles:
        assert needle in message, message
    return err.value


# Scalars: YAML 1.2 core schema, and no coercion between types.
@pytest.mark.parametrize("count, shown", [
    ("true", "true"),        # YAML boolean: not the integer 1
    ("1:30", "'1:30'"),      # YAML 1.1 sexagesimal: not 90
    ("'4'", "'4'"),          # a quoted string: not the integer 4
    ("yes", "'yes'"),        # YAML 1.1 boolean word: a string in YAML 1.2
    ("2.0", "2.0"),          # a float: not an integer
    ("0x_2", "'0x_2'"),
])
def test_a_pool_count_must_be_a_plain_integer(tmp_path, count, shown):
    err = _refused(tmp_path, _stack_text(pools=f"[{{name: gpu, count: {count}, gpu_model: SIM, gpus_per_node: 2}}]"),
                   "aidc:cluster.node_pools[0].count", "integer")
    assert shown in err.expected


@pytest.mark.parametrize("word", ["yes", "no", "on", "off", "y", "'true'", "1", "0"])
def test_a_boolean_setting_takes_only_true_or_false(tmp_path, word):
    _refused(tmp_path, _stack_text(f"policy: {{dry_run: {word}}}"), "aidc:cluster.policy.dry_run", "true or false")


@pytest.mark.parametrize("word", ["yes", "no", "on", "off", "Yes", "OFF"])
def test_yaml_1_1_boolean_words_stay_strings_where_a_string_is_expected(tmp_path, word):
    spec = _load(tmp_path, _stack_text(f"software: {{driver_branch: {word}}}"))
    assert spec.software.driver_branch == word


@pytest.mark.parametrize("value, wanted", [
    ("true", True), ("false", False), ("True", True), ("FALSE", False),
])
def test_yaml_1_2_booleans_are_booleans(tmp_path, value, wanted):
    assert _load(tmp_path, _stack_text(f"policy: {{dry_run: {value}}}")).policy.dry_run is wanted


def test_sexagesimal_and_leading_zero_numbers_are_strings_not_integers(tmp_path):
    spec = _load(tmp_path, _stack_text("software: {driver_branch: 5:70, cuda_version: 012}"))
    assert spec.software.driver_branch == "5:70" and spec.software.cuda_version == "012"


def test_dates_are_strings_not_timestamps(tmp_path):
    assert _load(tmp_path, _stack_text("software: {nccl_version: 2026-01-31}")).software.nccl_version == "2026-01-31"


def test_an_integer_setting_accepts_a_plain_yaml_integer(tmp_path):
    spec = _load(tmp_path, _stack_text("agent: {metrics_port: 9500, poll_interval_s: 2}"))
    assert spec.agent.metrics_port == 9500 and spec.agent.poll_interval_s == 2.0


# Bounds: every count, size and number has an upper bound a real cluster stays under.
@pytest.mark.parametrize("line, key", [
    ("policy: {burnin: {memcpy_bytes: 99999999999999999999}}", "policy.burnin.memcpy_bytes"),
    ("policy: {burnin: {allreduce_max_bytes: 1099511627776}}", "policy.burnin.allreduce_max_bytes"),
    ("policy: {max_unavailable: 1000000000}", "policy.max_unavailable"),
    ("fabric: {link_speed_gbps: 1.0e+300}", "fabric.link_speed_gbps"),
    ("fabric: {kind: roce, rails: 1, gid_index: 100000}", "fabric.gid_index"),
    ("storage: {datasets: {size: 99999999999999999Pi, mount_path: /d}}", "storage.datasets.size"),
    ("storage: {datasets: {size: 0Gi, mount_path: /d}}", "storage.datasets.size"),
    ("lab: {train_steps: 100000000}", "lab.train_steps"),
    ("lab: {inject_xid: -5}", "lab.inject_xid"),
    ("lab: {checkpoint_every: 1000000000}", "lab.checkpoint_every"),
    ("policy: {burnin: {floors: {memcpy_gbps: -1}}}", "policy.burnin.floors.memcpy_gbps"),
    (f"name: {'x' * 5000}", "aidc:cluster.name"),
    (f"kms: {{key_id: {'k' * 5000}}}", "kms.key_id"),
    ("agent: {command: [" + ", ".join(["a"] * 1000) + "]}", "agent.command"),
])
def test_every_size_has_an_upper_bound(tmp_path, line, key):
    if line.startswith("name:"):
        text = _stack_text().replace("name: t\n", f"{line}\n", 1)
    else:
        text = _stack_text(line)
    _refused(tmp_path, text, key)


def test_too_many_nodes_in_all_pools_together_is_refused(tmp_path):
    pools = "[" + ", ".join(f"{{name: p{i}, count: 15000, gpu_model: SIM, gpus_per_node: 1}}" for i in range(8)) + "]"
    _refused(tmp_path, _stack_text(pools=pools), "aidc:cluster.node_pools", "nodes")


def test_a_stack_file_larger_than_the_limit_is_refused_before_parsing(tmp_path):
    _refused(tmp_path, _stack_text() + "# padding\n" * 200_000, "Pulumi.t.yaml", "MiB")


def test_a_file_with_more_values_than_the_limit_is_refused_at_the_first_one_too_many(tmp_path):
    from aidc.stack_yaml import MAX_VALUES

    text = _stack_text(preamble="x-many:\n" + "  - v\n" * (MAX_VALUES + 10))
    err = _refused(tmp_path, text, f"at most {MAX_VALUES} values")
    assert err.key == f"line {MAX_VALUES - 1}"  # the root, x-many and its list are values too


def test_an_endless_device_file_is_refused_without_reading_it_all():
    with pytest.raises(SpecError, match="MiB"):
        load_stack("/dev/zero")


# Aliases, depth and tags.
def _alias_bomb(levels: int = 9, fanout: int = 9) -> str:
    lines = ["x-bomb:", "  a0: &a0 [" + ", ".join(["lol"] * fanout) + "]"]
    lines += [f"  a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * fanout) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("where", ["policy: {max_unavailable: *a8}", "fabric: {hcas: *a8}", "name2: *a8"])
def test_an_alias_bomb_is_refused_quickly_without_quoting_its_expansion(tmp_path, where):
    err = _refused(tmp_path, _stack_text(where, preamble=_alias_bomb()), "Pulumi.t.yaml", "alias")
    assert "lol" not in str(err)


def test_an_alias_to_a_node_that_contains_it_is_refused(tmp_path):
    _refused(tmp_path, _stack_text("agent: &loop {command: [*loop]}"), "line 5", "recursive")


@pytest.mark.parametrize("opening, closing", [("[", "]"), ("{a: ", "}")])
def test_very_deep_nesting_is_refused_with_a_line_not_a_recursion_error(tmp_path, opening, closing):
    deep = opening * 5000 + "x" + closing * 5000
    _refused(tmp_path, _stack_text(f"agent: {{command: {deep}}}"), "line 5", "nest")


def test_nesting_built_from_aliases_is_bounded_like_written_nesting(tmp_path):
    preamble = ("x-deep:\n  a: &a " + "[" * 20 + "x" + "]" * 20 + "\n"
                "  b: &b " + "[" * 20 + "*a" + "]" * 20 + "\n")
    _refused(tmp_path, _stack_text("agent: {command: *b}", preamble=preamble), "line 3", "levels of nesting")


@pytest.mark.parametrize("value, needle", [
    ("!!int abc", "integer"),
    ("!!float abc", "number"),
    ("!!bool maybe", "true or false"),
    ("!!null x", "null"),
    ("!!timestamp 2024-13-45", "timestamp"),
    ("!!binary aGVsbG8=", "binary"),
    ("!!python/name:os.system ''", "python"),
    ("!custom x", "custom"),
    ("!!set {a, b}", "set"),
    ("!!omap [{a: 1}]", "omap"),
    ("!!str [a]", "scalar"),
])
def test_unknown_or_malformed_tags_are_refused_naming_the_line(tmp_path, value, needle):
    _refused(tmp_path, _stack_text(f"software: {{driver_branch: {value}}}"), "line 5", needle)


def test_explicit_core_tags_are_honoured(tmp_path):
    spec = _load(tmp_path, _stack_text("software: {driver_branch: !!str 570}", "agent: {metrics_port: !!int 9401}"))
    assert spec.software.driver_branch == "570" and spec.agent.metrics_port == 9401


# Merge keys and duplicate keys.
def test_merge_keys_share_settings_between_pools(tmp_path):
    pools = ("\n      - &base {name: a, count: 2, gpu_model: SIM, gpus_per_node: 2, spares: 1}"
             "\n      - <<: *base\n        name: b\n        count: 3")
    spec = _load(tmp_path, _stack_text(pools=pools))
    assert [(p.name, p.count, p.spares, p.gpus_per_node) for p in spec.node_pools] == [("a", 2, 1, 2), ("b", 3, 1, 2)]


def test_merge_keys_take_a_list_of_mappings_and_the_first_wins(tmp_path):
    text = _stack_text(pools=f"[{{<<: [{{count: 4, spares: 1}}, {{count: 9, gpus_per_node: 2}}], name: g, gpu_model: SIM}}]")
    pool = _load(tmp_path, text).node_pools[0]
    assert (pool.count, pool.spares, pool.gpus_per_node) == (4, 1, 2)


def test_a_merge_key_with_a_non_mapping_value_is_refused(tmp_path):
    _refused(tmp_path, _stack_text(pools=f"[{{<<: 3, name: g, count: 1, gpu_model: SIM, gpus_per_node: 2}}]"),
             "line 4", "merge")


def test_duplicate_keys_are_still_refused_and_merged_keys_may_be_overridden(tmp_path):
    _refused(tmp_path, _stack_text(pools=f"[{{name: a, name: b, count: 1, gpu_model: SIM, gpus_per_node: 2}}]"),
             "line 4", "duplicate key 'name'")
    _refused(tmp_path, _stack_text(pools=f"[{{<<: {{count: 1}}, <<: {{spares: 1}}, name: a, gpu_model: SIM, gpus_per_node: 2}}]"),
             "line 4", "duplicate key '<<'")


def test_a_huge_duplicate_key_is_quoted_truncated(tmp_path):
    key = "k" * 1000  # PyYAML's limit for a plain key is 1024 characters
    err = _refused(tmp_path, _stack_text(pools=f"[{{{key}: 1, {key}: 2}}]"), "duplicate key")
    assert len(err.expected) < 300


# Errors in the data itself (e.g. from Pulumi's JSON config) are bounded too.
def test_an_error_on_a_huge_value_quotes_it_truncated():
    huge = ["x" * 1000] * 1000
    with pytest.raises(SpecError) as err:
        parse_spec({"name": "t", "node_pools": [{"name": "g", "count": 1, "gpu_model": "SIM", "gpus_per_node": 1}],
                    "policy": {"max_unavailable": huge}})
    assert err.value.key == "aidc:cluster.policy.max_unavailable" and len(str(err.value)) < 400


def test_a_key_with_a_newline_is_shown_on_one_line():
    with pytest.raises(SpecError) as err:
        parse_spec({"name": "t", "node_pools": [{"name": "g", "count": 1, "gpu_model": "SIM", "gpus_per_node": 1}],
                    "bad\nkey": 1})
    assert err.value.key == "aidc:cluster.'bad\\nkey'"
    assert "\n" not in str(err.value)



# The copy of the spec the aidc_agent role installs on every host is read back by this loader.
def test_the_spec_the_agent_role_installs_reads_back_unchanged_even_with_number_like_strings(tmp_path):
    import jinja2
    import yaml
    from ansible.plugins.filter.core import FilterModule

    tasks = yaml.safe_load((ROOT / "playbooks/roles/aidc_agent/tasks/main.yml").read_text())
    install = next(t for t in tasks if t["name"].startswith("Install the cluster spec"))
    expression = install["ansible.builtin.copy"]["content"]
    # Strings a YAML 1.1 writer leaves unquoted but YAML 1.2 reads as numbers or booleans.
    labels = {"build": "3141e59", "mode": "0o17", "answer": "yes", "time": "1:30", "share": ".5", "n": "12"}
    spec = load_stack("lab")
    cluster = spec.model_dump(mode="json")
    cluster["node_pools"][0]["labels"] = labels
    env = jinja2.Environment()
    env.filters.update(FilterModule().filters())
    (tmp_path / "stack.yaml").write_text(env.from_string(expression).render(aidc_cluster_spec=cluster))
    installed = load_stack(tmp_path / "stack.yaml")
    assert installed.node_pools[0].labels == labels
    assert installed == parse_spec(cluster)


@pytest.mark.parametrize("text, needle", [
    (_stack_text("fabric: {hcas: *a8}", preamble=_alias_bomb()), "alias bomb"),
    (_stack_text(pools="[{name: gpu, count: 1:30, gpu_model: SIM, gpus_per_node: 2}]"), "not the string '1:30'"),
])
def test_the_cli_reports_each_class_as_one_error_line(tmp_path, aidc_cli, text, needle):
    path = tmp_path / "Pulumi.t.yaml"
    path.write_text(text)
    proc = aidc_cli("spec", "show", "--stack", str(path))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"aidc: error: {path}: ") and needle in lines[0], lines[0]
