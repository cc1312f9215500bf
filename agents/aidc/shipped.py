"""Project files aidc reads at run time, found with or without a checkout.

The runbooks (`runbooks/*.yaml`, their `schema.json`, the alert rules in `runbooks/alerts/`),
the remediation playbooks (`playbooks/`, run by runbook steps of kind `playbook`), the Grafana
dashboard (`dashboards/aidc.json`, for operators to import) and the example stacks
(`Pulumi.yaml`, `Pulumi.lab.yaml`, `Pulumi.h100-example.yaml`) live at the root of the
repository, where operators edit them. A wheel carries a copy of them under
`aidc/_project/`, laid out like the checkout (`setup.py` copies them at build time), so an
installed aidc finds the same files without the repository. From a checkout (an editable
install, or `agents/` on PYTHONPATH) the checkout's own files win, so an edit takes effect
without a rebuild.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

# What a wheel carries, relative to the project root (setup.py reads this list too).
SHIPPED = ("Pulumi.yaml", "Pulumi.lab.yaml", "Pulumi.h100-example.yaml", "runbooks", "playbooks", "dashboards",
           # The hashed lock the playbooks' aidc_install role installs the agent extra's dependencies from.
           "requirements-agent.lock")
SHIPPED_DIR = "_project"


def checkout_root() -> Path | None:
    """The repository this package was imported from, or None for an installed wheel."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "Pulumi.yaml").is_file() and (root / "agents" / "aidc").is_dir() else None


def shipped_root() -> Path:
    """The copy of the project files inside the installed package (a wheel installs as plain
    files, so this is a real directory that ansible-runner and globbing can use)."""
    return Path(str(resources.files("aidc").joinpath(SHIPPED_DIR)))


def installed_root() -> Path:
    """Where this installation's own project files are: the checkout, else the shipped copy."""
    return checkout_root() or shipped_root()


def project_file(relpath: str, root: Path | None = None) -> Path:
    """`relpath` under `root` (the project root in use) when it is there, else this
    installation's copy: a site's own project directory may hold only its stack files."""
    if root is not None and (root / relpath).exists():
        return root / relpath
    return installed_root() / relpath
