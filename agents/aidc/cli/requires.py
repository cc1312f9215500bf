"""What a command needs from the installation, checked before the command changes anything."""

from __future__ import annotations

import importlib


def require(*modules: str) -> None:
    """Import the optional modules a command will need, before it creates a file, a directory or
    a namespace. One that is missing raises ModuleNotFoundError, which aidc.cli.main turns into one
    line naming the extra to install, and the command has left nothing behind."""
    for module in modules:
        importlib.import_module(module)
