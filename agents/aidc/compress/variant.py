"""A compressed model plus how it is stored, and helpers shared by the technique modules."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class Variant:
    technique: str
    label: str
    family: str
    model: nn.Module
    params: dict = field(default_factory=dict)
    to_disk: Callable[[nn.Module], Any] | None = None  # the technique's own storage format, if any
    note: str = ""


def replace_linears(model: nn.Module, make: Callable[[str, nn.Linear], nn.Module]) -> nn.Module:
    """Swap every nn.Linear (by qualified name) for what `make` returns; in place."""
    targets = [(name, mod) for name, mod in model.named_modules() if type(mod) is nn.Linear]
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, make(name, linear))
    return model


def record_linear_ranges(model: nn.Module, batches: list, forward: Callable) -> dict[str, dict]:
    """Per nn.Linear: input min/max, per-input-channel |max|, output min/max over the batches."""
    stats: dict[str, dict] = {}
    hooks = []

    def hook(name):
        def fn(_mod, args, out):
            x = args[0].detach().float()
            y = out.detach().float()
            s = stats.setdefault(name, {"in_min": float("inf"), "in_max": float("-inf"),
                                        "out_min": float("inf"), "out_max": float("-inf"),
                                        "in_absmax": torch.zeros(x.shape[-1])})
            s["in_min"] = min(s["in_min"], float(x.min()))
            s["in_max"] = max(s["in_max"], float(x.max()))
            s["out_min"] = min(s["out_min"], float(y.min()))
            s["out_max"] = max(s["out_max"], float(y.max()))
            s["in_absmax"] = torch.maximum(s["in_absmax"], x.abs().reshape(-1, x.shape[-1]).amax(dim=0))
        return fn

    for name, mod in model.named_modules():
        if type(mod) is nn.Linear:
            hooks.append(mod.register_forward_hook(hook(name)))
    try:
        with torch.inference_mode():
            for batch in batches:
                forward(model, batch)
    finally:
        for h in hooks:
            h.remove()
    return stats
