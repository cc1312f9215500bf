"""How aidc is packaged: the extras, the hashed locks `make` installs, the project files a
wheel carries, `aidc --version` and completion, and the root Dockerfile's image, each checked
against the package metadata (pyproject.toml) rather than against a second hand-kept list."""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

import aidc
from aidc import shipped
from aidc.spec import AGENT_IMAGE_REPOSITORY, BURNIN_IMAGE_REPOSITORY, Agent, KubernetesBurnin

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS = PYPROJECT["optional-dependencies"]
RUNTIME_EXTRAS = ("agent", "burnin", "lab", "compress", "infra", "ansible")
OPTIONAL_MODULES = ("torch", "torchao", "transformers", "sklearn", "matplotlib", "pulumi", "ansible_runner",
                    "kubernetes", "prometheus_client", "pynvml")


def names(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


# ---- locks ---------------------------------------------------------------------------------

def read_lock(name: str) -> dict[str, dict]:
    """{package: {"version", "hashes", "via"}} from a pip-compile lock with hashes."""
    out: dict[str, dict] = {}
    current = None
    for line in (ROOT / name).read_text().splitlines():
        pin = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        if pin:
            current = out[canonicalize_name(pin[1])] = {"version": pin[2], "hashes": set(), "via": set()}
        elif current and (h := re.search(r"--hash=(sha256:[0-9a-f]{64})", line)):
            current["hashes"].add(h[1])
        elif current and (via := re.match(r"^\s+#\s+(?:via\s+)?(-c \S+|[A-Za-z0-9][\w.-]*)", line)):
            if via[1] != "via":
                current["via"].add(via[1] if via[1].startswith("-c") else canonicalize_name(via[1]))
        elif line and not line.startswith((" ", "#")):
            raise AssertionError(f"{name}: unexpected line {line!r}")
    return out


RUNTIME_LOCK = read_lock("requirements.lock")
DEV_LOCK = read_lock("requirements-dev.lock")
AGENT_LOCK = read_lock("requirements-agent.lock")


def test_every_pin_in_both_locks_carries_hashes():
    for lock_name, lock in (("requirements.lock", RUNTIME_LOCK), ("requirements-dev.lock", DEV_LOCK),
                            ("requirements-agent.lock", AGENT_LOCK)):
        assert lock, f"{lock_name} pins nothing"
        unhashed = sorted(name for name, entry in lock.items() if not entry["hashes"])
        assert not unhashed, f"{lock_name}: pins without --hash: {unhashed}"


def test_runtime_lock_pins_every_dependency_of_the_core_and_the_runtime_extras():
    declared = names(PYPROJECT["dependencies"]) | {n for e in RUNTIME_EXTRAS for n in names(EXTRAS[e])}
    assert declared - set(RUNTIME_LOCK) == set()


def test_dev_lock_pins_the_dev_extra_and_agrees_with_the_runtime_lock_on_every_shared_package():
    assert names(EXTRAS["dev"]) - set(DEV_LOCK) == set()
    # `make` installs both in one pip call: a package in both must be the very same pin.
    for name in set(DEV_LOCK) & set(RUNTIME_LOCK):
        assert DEV_LOCK[name]["version"] == RUNTIME_LOCK[name]["version"], name
        assert DEV_LOCK[name]["hashes"] == RUNTIME_LOCK[name]["hashes"], name


def test_torch_is_the_pinned_2_13_0_cpu_build_in_the_lock_and_pinned_in_every_extra_naming_it():
    assert RUNTIME_LOCK["torch"]["version"] == "2.13.0+cpu"
    for extra, reqs in EXTRAS.items():
        for req in map(Requirement, reqs):
            if canonicalize_name(req.name) == "torch":
                assert str(req.specifier) == "==2.13.0", f"extra {extra!r} leaves torch unpinned"


def lock_closure(direct: set[str]) -> set[str]:
    """Every package the lock installs because of `direct`, read from its `# via` notes."""
    children: dict[str, set[str]] = {}
    for name, entry in RUNTIME_LOCK.items():
        for parent in entry["via"]:
            children.setdefault(parent, set()).add(name)
    seen, todo = set(), list(direct)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(children.get(name, ()))
    return seen


def test_the_agent_extra_pulls_no_torch_and_the_lab_extra_does():
    agent = lock_closure(names(PYPROJECT["dependencies"]) | names(EXTRAS["agent"]))
    assert {"kubernetes", "prometheus-client", "nvidia-ml-py"} <= agent
    assert {"psycopg", "psycopg-binary"} <= agent  # the controller in the image runs state.backend postgres too
    assert not agent & {"torch", "torchao", "transformers", "numpy", "pulumi", "ansible-core"}
    # the image's lock is exactly that part of the runtime lock, pin for pin
    assert set(AGENT_LOCK) == agent
    for name in agent:
        assert (AGENT_LOCK[name]["version"], AGENT_LOCK[name]["hashes"]) == \
            (RUNTIME_LOCK[name]["version"], RUNTIME_LOCK[name]["hashes"]), name
    assert "torch" in lock_closure(names(EXTRAS["lab"]))
    assert names(EXTRAS["lab"]) >= names(EXTRAS["agent"]) | names(EXTRAS["burnin"])


def test_make_installs_both_locks_with_hashes_and_reinstalls_when_either_changes():
    makefile = (ROOT / "Makefile").read_text()
    stamp_rule = re.search(r"^\$\(STAMP\):(.*)\n((?:\t.*\n)+)", makefile, re.M)
    assert {"requirements.lock", "requirements-dev.lock", "pyproject.toml"} <= set(stamp_rule[1].split())
    install = [line for line in stamp_rule[2].splitlines() if "-r requirements" in line]
    assert len(install) == 2 and all("--require-hashes" in line for line in install)
    assert "-r requirements.lock" in install[0] and "-r requirements-dev.lock" in install[0]
    assert "--no-deps" in install[1] and "-r requirements-aws.lock" in install[1]
    assert "requirements-aws.lock" in stamp_rule[1].split()


def test_aws_lock_pins_the_aws_extras_with_hashes_and_agrees_with_the_other_locks():
    """boto3 and moto live in their own lock, installed with --no-deps: botocore declares
    python-dateutil<3, kubernetes 37 needs >=3. Every package they share with the other locks
    is the very same pin, and the lock leaves python-dateutil to the runtime lock."""
    aws = read_lock("requirements-aws.lock")
    assert names(EXTRAS["aws"]) | names(EXTRAS["aws-test"]) <= set(aws)
    assert all(entry["hashes"] for entry in aws.values()) and "python-dateutil" not in aws
    for name in set(aws) & (set(RUNTIME_LOCK) | set(DEV_LOCK)):
        other = RUNTIME_LOCK.get(name) or DEV_LOCK[name]
        assert (aws[name]["version"], aws[name]["hashes"]) == (other["version"], other["hashes"]), name


# ---- project files shipped in the wheel ----------------------------------------------------

def test_every_shipped_project_file_exists_at_the_repository_root():
    assert shipped.checkout_root() == ROOT
    assert [rel for rel in shipped.SHIPPED if not (ROOT / rel).exists()] == []
    # the runbook engine, the alert rules and the stack loader read these through aidc.shipped
    for rel in ("runbooks/schema.json", "runbooks/alerts/aidc-alerts.yml", "playbooks/inventory/aidc_spec.sh"):
        assert shipped.project_file(rel) == ROOT / rel


def test_the_grafana_dashboard_ships_and_the_sdist_carries_everything_the_wheel_copies():
    assert shipped.project_file("dashboards/aidc.json") == ROOT / "dashboards" / "aidc.json"
    assert "dashboards" in shipped.SHIPPED
    # setup.py copies SHIPPED from the root: a wheel built from the sdist needs each in it.
    carried = set()
    for line in (ROOT / "MANIFEST.in").read_text().splitlines():
        words = line.split("#")[0].split()
        if words and words[0] in ("include", "graft"):
            carried |= set(words[1:])
    assert [rel for rel in shipped.SHIPPED if rel not in carried] == []


def test_a_site_project_directory_overrides_only_the_project_files_it_has(tmp_path, monkeypatch):
    from aidc.runbook.catalog import runbooks_dir, schema_path

    (tmp_path / "Pulumi.yaml").write_text("name: site\nruntime: python\n")
    monkeypatch.setenv("AIDC_ROOT", str(tmp_path))
    monkeypatch.delenv("AIDC_RUNBOOKS", raising=False)
    assert runbooks_dir() == ROOT / "runbooks"  # the site has none: the installation's
    (tmp_path / "runbooks").mkdir()
    assert runbooks_dir() == tmp_path / "runbooks"
    assert schema_path() == ROOT / "runbooks" / "schema.json"  # no schema of its own


# ---- the CLI -------------------------------------------------------------------------------

def run_cli(*args: str, prelude: str = "", env: dict | None = None) -> subprocess.CompletedProcess:
    code = f"import sys; sys.argv[0] = 'aidc'; {prelude}\nfrom aidc.cli.main import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_version_prints_the_package_version_that_pyproject_reads():
    assert PYPROJECT["dynamic"] == ["version"]
    version_attr = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["dynamic"]["version"]
    assert version_attr == {"attr": "aidc.__version__"}
    result = run_cli("--version")
    assert (result.returncode, result.stdout) == (0, f"aidc {aidc.__version__}\n")


def test_shell_completion_completes_command_groups_and_subcommands():
    def complete(words: str) -> list[str]:
        # bash's view: words split on spaces, the cursor on the last (maybe empty) one
        env = {"_AIDC_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(len(words.split(" ")) - 1)}
        result = run_cli(env=env)
        assert result.returncode == 0, result.stderr
        return result.stdout.split()

    assert complete("aidc runb") == ["runbook"]
    assert set(complete("aidc runbook ")) >= {"list", "show", "run", "serve"}
    assert "--install-completion" in run_cli("--help").stdout


def test_loading_the_cli_imports_no_optional_dependency():
    code = ("import sys, aidc.cli.main; "
            f"print(sorted(m for m in {OPTIONAL_MODULES!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_every_module_of_the_agent_extra_imports_without_the_other_extras():
    # The image has no torch, pulumi or ansible: nothing the agent, the failover controller or
    # the runbook engine imports may need them at import time.
    blocked = ("torch", "torchao", "transformers", "sklearn", "matplotlib", "numpy", "pulumi", "ansible_runner")
    code = (f"import sys, pkgutil, importlib, aidc\nfor m in {blocked!r}: sys.modules[m] = None\n"
            "failed = []\n"
            "for info in pkgutil.walk_packages(aidc.__path__, 'aidc.'):\n"
            "    if info.name.split('.')[1] in ('burnin', 'compress', 'lab', '__main__'): continue\n"
            "    try: importlib.import_module(info.name)\n"
            "    except ImportError as exc: failed.append(f'{info.name}: {exc}')\n"
            "print(len(failed)); print(*failed, sep='\\n')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.splitlines()[0] == "0", out.stdout


@pytest.mark.parametrize("args, blocked, extra", [
    (["compress", "bench", "--quick"], "torch", "compress"),
    (["agent", "run", "--node", "n", "--backend", "sim", "--node-dir", ".", "--store", "s.db",
      "--audit-db", "a.db", "--port", "0"], "prometheus_client", "agent"),
])
def test_a_command_whose_extra_is_not_installed_says_which_extra_in_one_line(tmp_path, args, blocked, extra):
    # `sys.modules[name] = None` makes `import name` fail as if the package were not installed.
    result = subprocess.run([sys.executable, "-c", f"import sys; sys.argv[0] = 'aidc'; sys.modules[{blocked!r}] = None\n"
                             "from aidc.cli.main import main; main()", *args],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"aidc: error: this command needs {blocked}, which this installation lacks; "
        f"install it with: pip install 'aidc[{extra}]'"]


# ---- the Dockerfile ------------------------------------------------------------------------

def dockerfile(name: str = "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / name).read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            out.append((instruction.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for step in dockerfile():
        if step[0] == "FROM":
            out.append([])
        out[-1].append(step)
    return out


def final_stage() -> list[tuple[str, str]]:
    return stages()[-1]


def install_steps() -> list[str]:
    """The shell commands that make the image's Python environment, in build order: the
    wheel stage's `pip wheel` step and the final stage's two `pip install`s (the locked
    dependencies, then the wheel), BuildKit's --mount flags left out (tests/test_wheel_install.py
    runs them with its own paths)."""
    wheel = [args for ins, args in stages()[0] if ins == "RUN" and "pip wheel" in args]
    install = [args for ins, args in final_stage() if ins == "RUN" and "pip install" in args]
    assert len(stages()) == 2 and len(wheel) == 1 and len(install) == 2, "one wheel build, two installs"
    return [wheel[0], *(re.sub(r"--mount=\S+\s+", "", step) for step in install)]


def test_every_stage_builds_on_a_slim_python_that_satisfies_requires_python_pinned_by_digest():
    bases = [args.split()[0] for ins, args in dockerfile() if ins == "FROM"]
    assert bases
    for base in bases:
        match = re.fullmatch(r"python:(\d+\.\d+)(?:\.\d+)?-slim(?:-\w+)?@sha256:[0-9a-f]{64}", base)
        assert match, f"{base}: not a slim Python base image"
        assert SpecifierSet(PYPROJECT["requires-python"]).contains(f"{match[1]}.0"), base


def test_the_image_installs_the_built_wheel_with_the_agent_extra_and_only_hashed_locked_dependencies():
    wheel, dependencies, package = install_steps()
    assert wheel.startswith("pip wheel --no-cache-dir --no-deps --wheel-dir /dist . ")
    # the requirement line names the extra, and pins the wheel by its hash
    requirement = re.search(r'echo "aidc\[(\w+)\] @ file:///dist/\$\{wheel\} --hash=sha256:\$\(sha256sum', wheel)
    assert requirement and requirement[1] == "agent" and "agent" in EXTRAS
    assert shlex.split(dependencies) == ["pip", "install", "--no-cache-dir", "--require-hashes", "--no-deps",
                                         "-r", "/tmp/requirements-agent.lock"]
    # the wheel alone, then a check that the lock gave it every dependency it declares
    assert shlex.split(package) == ["pip", "install", "--no-cache-dir", "--require-hashes", "--no-deps",
                                    "-r", "/dist/requirement.txt", "&&", "pip", "check"]
    mounts = [args for ins, args in final_stage() if ins == "RUN" and "pip install" in args]
    assert "source=requirements-agent.lock,target=/tmp/requirements-agent.lock" in mounts[0]
    assert "from=wheel,source=/dist,target=/dist" in mounts[1] and "/dist" not in mounts[0]
    assert "torch" not in " ".join(args for _, args in dockerfile())


def test_the_locked_dependencies_are_a_layer_of_their_own_before_anything_built_from_the_sources():
    """A source change rebuilds the wheel layer only: nothing before the dependency install
    in the final stage comes from the build context but the lock."""
    steps = final_stage()
    dependencies = next(i for i, (ins, args) in enumerate(steps) if ins == "RUN" and "requirements-agent.lock" in args)
    package = next(i for i, (ins, args) in enumerate(steps) if ins == "RUN" and "/dist/requirement.txt" in args)
    assert dependencies < package
    assert "/dist/requirement.txt" not in steps[dependencies][1]
    assert not [step for step in steps[:dependencies] if step[0] in ("COPY", "ADD")]


def test_the_image_carries_the_oci_labels_with_the_source_revision_version_and_licence():
    labels = dict(re.findall(r'(org\.opencontainers\.image\.[\w.]+)="([^"]*)"', (ROOT / "Dockerfile").read_text()))
    assert labels["org.opencontainers.image.source"].startswith("https://github.com/")
    assert labels["org.opencontainers.image.revision"] == "${VCS_REF}"
    assert [args for ins, args in final_stage() if ins == "ARG" and args.startswith("VCS_REF")]
    assert labels["org.opencontainers.image.version"] == aidc.__version__
    assert labels["org.opencontainers.image.licenses"] == PYPROJECT["license"]


def test_the_image_healthcheck_asks_the_health_endpoint_of_the_default_metrics_port():
    from aidc.spec import AGENT_METRICS_PORT

    checks = [args for ins, args in final_stage() if ins == "HEALTHCHECK"]
    assert len(checks) == 1 and "CMD" in checks[0].split()
    command = json.loads(checks[0].split(" CMD ", 1)[1])
    assert "/healthz" in " ".join(command)
    env = " ".join(args for ins, args in final_stage() if ins == "ENV")
    assert f"AIDC_HEALTH_PORT={AGENT_METRICS_PORT}" in env.split()


def test_the_image_builds_where_a_container_builder_is_available(tmp_path):
    """The static checks above stand in where no engine runs (CI without Docker, this sandbox)."""
    import shutil

    if shutil.which("docker") is None or subprocess.run(["docker", "info"], capture_output=True,
                                                        timeout=30).returncode != 0:
        pytest.skip("no container engine here: the Dockerfile is checked statically above")
    tag = f"aidc-test-build:{os.getpid()}"
    built = subprocess.run(["docker", "build", "--build-arg", "VCS_REF=test", "-t", tag, str(ROOT)],
                           capture_output=True, text=True, timeout=1800)
    assert built.returncode == 0, built.stderr[-3000:]
    try:
        inspect = subprocess.run(["docker", "image", "inspect", tag], capture_output=True, text=True, timeout=60)
        config = json.loads(inspect.stdout)[0]["Config"]
        assert config["Labels"]["org.opencontainers.image.revision"] == "test"
        assert config["User"] == "10001:10001" and "/healthz" in " ".join(config["Healthcheck"]["Test"])
    finally:
        subprocess.run(["docker", "image", "rm", tag], capture_output=True, timeout=60)


def test_the_image_runs_as_the_unprivileged_uid_the_controller_deployment_names():
    users = [args for ins, args in final_stage() if ins == "USER"]
    assert users == ["10001:10001"]
    tree = ast.parse((ROOT / "infra" / "aidc_infra" / "controller.py").read_text())
    run_as = [ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
              and any(isinstance(t, ast.Name) and t.id == "RUN_AS" for t in n.targets)]
    assert run_as == [10001]


def test_the_image_entry_point_is_the_aidc_script_the_spec_commands_start_with():
    entry = [args for ins, args in final_stage() if ins == "ENTRYPOINT"]
    assert entry == ['["aidc"]'] and "aidc" in PYPROJECT["scripts"]
    assert Agent().command[0] == "aidc"


def test_the_spec_default_image_is_what_the_dockerfile_documents_at_the_package_version():
    text = (ROOT / "Dockerfile").read_text()
    image = f"{AGENT_IMAGE_REPOSITORY}:{aidc.__version__}"
    assert Agent().image == image
    assert f"docker build -t {image} ." in text.replace("--build-arg VCS_REF=$(git rev-parse HEAD) ", "")
    labels = dict(re.findall(r'(org\.opencontainers\.image\.[\w.]+)="([^"]*)"', text))
    assert labels["org.opencontainers.image.ref.name"] == image
    assert labels["org.opencontainers.image.version"] == aidc.__version__
    make = subprocess.run(["make", "-s", "-n", "image"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert make.stdout.strip() == f"docker build --build-arg VCS_REF={head} -t {image} ."
    # the worked example stack names the same image
    from aidc.spec import load_stack

    assert load_stack(ROOT / "Pulumi.h100-example.yaml").agent.image == image


def test_the_build_context_leaves_out_local_state():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", ".aidc"} <= ignored
    assert not ignored & {"agents", "runbooks", "playbooks", "pyproject.toml", "setup.py", "README.md",
                          "requirements.lock", "Pulumi.yaml"}


# ---- the burn-in image (Dockerfile.burnin) --------------------------------------------------

def burnin_stages() -> list[list[tuple[str, str]]]:
    """The stages after the global build arguments (which come before the first FROM)."""
    out: list[list[tuple[str, str]]] = []
    for step in dockerfile("Dockerfile.burnin"):
        if step[0] == "FROM":
            out.append([])
        if out:
            out[-1].append(step)
    return out


def build_args() -> dict[str, str]:
    """The burn-in Dockerfile's build arguments with their defaults."""
    return dict(args.split("=", 1) for ins, args in dockerfile("Dockerfile.burnin") if ins == "ARG" and "=" in args)


def test_the_burnin_image_builds_on_the_agent_images_digest_pinned_base():
    bases = {args.split()[0] for ins, args in dockerfile("Dockerfile.burnin") if ins == "FROM"}
    assert bases == {args.split()[0] for ins, args in dockerfile() if ins == "FROM"}
    assert all(re.search(r"@sha256:[0-9a-f]{64}$", base) for base in bases)


def test_the_burnin_image_installs_the_wheel_with_the_burnin_extra_and_a_pinned_cuda_torch():
    wheel_stage, runtime = burnin_stages()
    [wheel] = [args for ins, args in wheel_stage if ins == "RUN" and "pip wheel" in args]
    requirement = re.search(r'echo "aidc\[([\w,]+)\] @ file:///dist/\$\{wheel\} --hash=sha256:', wheel)
    assert requirement and requirement[1].split(",") == ["agent", "burnin"]
    # torch: the burnin extra's pin, the CUDA build from PyTorch's index (both build arguments)
    args = build_args()
    [pin] = [Requirement(r) for r in EXTRAS["burnin"] if canonicalize_name(Requirement(r).name) == "torch"]
    assert str(pin.specifier) == f"=={args['TORCH_VERSION']}"
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", args["TORCH_INDEX_URL"])
    installs = [shlex.split(re.sub(r"--mount=\S+\s+", "", a)) for ins, a in runtime if ins == "RUN" and "pip install" in a]
    dependencies, torch, package = installs
    assert dependencies == ["pip", "install", "--no-cache-dir", "--require-hashes", "--no-deps",
                            "-r", "/tmp/requirements-agent.lock"]
    assert torch == ["pip", "install", "--no-cache-dir", "--index-url", "${TORCH_INDEX_URL}", "torch==${TORCH_VERSION}"]
    assert package == ["pip", "install", "--no-cache-dir", "--require-hashes", "--no-deps",
                       "-r", "/dist/requirement.txt", "&&", "pip", "check"]
    assert [a for ins, a in runtime if ins == "ENTRYPOINT"] == ['["aidc"]']


def test_the_burnin_image_is_the_specs_default_burnin_image_with_its_oci_labels_and_make_target():
    image = f"{BURNIN_IMAGE_REPOSITORY}:{aidc.__version__}"
    assert KubernetesBurnin().image == image and image != Agent().image
    labels = dict(re.findall(r'(org\.opencontainers\.image\.[\w.]+)="([^"]*)"', (ROOT / "Dockerfile.burnin").read_text()))
    assert labels == {"org.opencontainers.image.title": "aidc-burnin",
                      "org.opencontainers.image.source": "https://github.com/aidc-project/aidc",
                      "org.opencontainers.image.revision": "${VCS_REF}",
                      "org.opencontainers.image.version": aidc.__version__,
                      "org.opencontainers.image.ref.name": image,
                      "org.opencontainers.image.licenses": PYPROJECT["license"]}
    make = subprocess.run(["make", "-s", "-n", "image-burnin"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert make.stdout.strip() == f"docker build -f Dockerfile.burnin --build-arg VCS_REF={head} -t {image} ."
