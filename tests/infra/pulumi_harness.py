"""Run the Pulumi program under Pulumi's own mocks and record what it registers.

No Pulumi CLI or provider plugin is involved: the real SDK serializes every resource's
inputs exactly as it would for the engine, and the mock monitor hands them to `Recorder`.
The program is re-run from scratch for each stack (fresh root Stack, fresh config).
"""

from __future__ import annotations

import json
import runpy
from dataclasses import dataclass, field
from pathlib import Path

import pulumi
from pulumi.runtime import settings as pulumi_settings
from pulumi.runtime.mocks import MockMonitor
from pulumi.runtime.stack import run_pulumi_func
from pulumi.runtime.sync_await import _sync_await

from aidc.stack_yaml import load_stack_yaml

ROOT = Path(__file__).resolve().parents[2]
PROGRAM = ROOT / "infra" / "__main__.py"


@dataclass
class Registered:
    type: str
    name: str
    inputs: dict
    custom: bool
    parent: str  # the parent's URN ("" for the root stack's direct children)

    @property
    def parent_type(self) -> str:
        # urn:pulumi:<stack>::<project>::<type chain>::<name>; the chain's last element is the parent's type
        return self.parent.split("::")[2].split("$")[-1] if self.parent else ""

    @property
    def k8s_object(self) -> dict:
        """The Kubernetes object as the provider would send it (inputs minus Pulumi-only keys)."""
        return {k: v for k, v in self.inputs.items() if not k.startswith("__")}


@dataclass
class Build:
    resources: list[Registered] = field(default_factory=list)
    exports: dict = field(default_factory=dict)

    def of_type(self, type_: str) -> list[Registered]:
        return [r for r in self.resources if r.type == type_]

    def one(self, type_: str) -> Registered:
        found = self.of_type(type_)
        assert len(found) == 1, f"expected one {type_}, found {[r.name for r in found]}"
        return found[0]

    def kinds(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.resources:
            out[r.type] = out.get(r.type, 0) + 1
        return out


SECRET_SIG = ("4dabf18193072939515e22adb298388d", "1b47061264138c4ac30d75fd1eb44270")


def unwrap_secrets(value):
    """Replace Pulumi's secret envelopes ({sig: secret, value: ...}) by their values."""
    if isinstance(value, dict):
        if value.get(SECRET_SIG[0]) == SECRET_SIG[1]:
            return unwrap_secrets(value["value"])
        return {k: unwrap_secrets(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unwrap_secrets(v) for v in value]
    return value


class Recorder(pulumi.runtime.Mocks):
    def __init__(self, build: Build):
        self.build = build
        self.inputs: dict[tuple[str, str], dict] = {}

    def new_resource(self, args: pulumi.runtime.MockResourceArgs):
        self.inputs[(args.typ, args.name)] = unwrap_secrets(dict(args.inputs))
        state = dict(args.inputs)
        if args.typ == "kubernetes:helm.sh/v3:Release":
            # What the provider reports after an install; the program may read it.
            state["status"] = {"name": args.inputs.get("name", args.name), "namespace": args.inputs.get("namespace"),
                               "status": "deployed", "version": args.inputs.get("version")}
        return f"{args.name}-id", state

    def call(self, args: pulumi.runtime.MockCallArgs):
        return {}


class RecordingMonitor(MockMonitor):
    def __init__(self, mocks: Recorder):
        super().__init__(mocks)
        self.recorder = mocks

    def RegisterResource(self, request):
        response = super().RegisterResource(request)
        if request.type != "pulumi:pulumi:Stack":
            inputs = self.recorder.inputs.get((request.type, request.name), {}) if request.custom else {}
            self.recorder.build.resources.append(
                Registered(request.type, request.name, dict(inputs), bool(request.custom), request.parent))
        return response


def stack_config(stack_file: Path) -> dict[str, str]:
    # Pulumi reads stack files as YAML 1.2 (`yes` and `1:30` are strings), as aidc's reader does;
    # PyYAML's safe_load would hand the program YAML 1.1 values Pulumi never produces.
    doc = load_stack_yaml(stack_file.read_text())
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in doc["config"].items()}


def run_under_mocks(stack: str, config: dict[str, str], program) -> Build:
    """Run `program()` as a Pulumi program of stack `stack` under mocks; return what it registered."""
    build = Build()
    mocks = Recorder(build)
    pulumi.runtime.set_all_config(config)
    pulumi_settings.ROOT.set(None)
    pulumi.runtime.set_mocks(mocks, project="aidc", stack=stack, preview=False, monitor=RecordingMonitor(mocks))
    pulumi_settings.SETTINGS.rpc_manager.clear()
    _sync_await(run_pulumi_func(program))
    build.exports = dict(pulumi.runtime.get_root_resource().outputs)
    return build


def run_program(stack_file: Path, config: dict[str, str] | None = None) -> Build:
    """Run infra/__main__.py for one stack file under mocks, as `pulumi up` would."""
    stack = stack_file.name.removeprefix("Pulumi.").removesuffix(".yaml")
    return run_under_mocks(stack, config if config is not None else stack_config(stack_file),
                           lambda: runpy.run_path(str(PROGRAM), run_name="__main__"))


_builds: dict[str, Build] = {}


def build_of(stack_file: Path) -> Build:
    """The build of `stack_file`, made once per test session."""
    key = str(stack_file)
    if key not in _builds:
        _builds[key] = run_program(stack_file)
    return _builds[key]
