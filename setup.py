"""Build step the declarative pyproject.toml cannot say: copy the project files aidc reads
at run time (runbooks, playbooks, example stacks, the dashboard; list in aidc.shipped.SHIPPED) from the
repository root into the wheel as package data `aidc/_project/`, so the root stays their one
source. An editable install skips the copy: it reads them from the checkout (aidc.shipped)."""

import ast
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.retry", ".ansible")


def _shipped_constants() -> dict:
    # Read the list without importing aidc (its dependencies need not be installed to build).
    tree = ast.parse((ROOT / "agents" / "aidc" / "shipped.py").read_text())
    wanted = {"SHIPPED", "SHIPPED_DIR"}
    return {t.id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
            for t in node.targets if isinstance(t, ast.Name) and t.id in wanted}


class BuildPyWithProjectFiles(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        consts = _shipped_constants()
        dest = Path(self.build_lib) / "aidc" / consts["SHIPPED_DIR"]
        shutil.rmtree(dest, ignore_errors=True)  # a file deleted from the root must not linger
        for rel in consts["SHIPPED"]:
            src = ROOT / rel
            if not src.exists():
                raise SystemExit(f"setup.py: {rel} is listed in aidc.shipped.SHIPPED but missing")
            if src.is_dir():
                # copytree keeps modes: the inventory script stays executable in the wheel.
                shutil.copytree(src, dest / rel, ignore=IGNORED, dirs_exist_ok=True)
            else:
                dest.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / rel)


setup(cmdclass={"build_py": BuildPyWithProjectFiles})
