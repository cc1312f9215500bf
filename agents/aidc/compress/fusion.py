"""Model fusion: several fine-tunes of one checkpoint, averaged in weight space or ensembled."""

from __future__ import annotations

import copy

import torch
from torch import nn

from aidc.compress.variant import Variant
from aidc.errors import CompressError


def fine_tunes(case, model: nn.Module, count: int, steps: int) -> list[nn.Module]:
    """`count` fine-tunes of the same checkpoint that differ only in data order (seed)."""
    if count < 2:
        raise CompressError(f"fusion needs at least 2 fine-tuned checkpoints, got {count}")
    return [case.finetune(copy.deepcopy(model), steps, seed=case.seed + 100 + k) for k in range(count)]


def average_weights(models: list[nn.Module]) -> nn.Module:
    """Uniform weight average (a "model soup"); all models must share one architecture."""
    states = [m.state_dict() for m in models]
    if any(s.keys() != states[0].keys() or any(s[k].shape != states[0][k].shape for k in s) for s in states):
        raise CompressError("weight averaging needs checkpoints of the same architecture")
    fused = copy.deepcopy(models[0])
    fused.load_state_dict({k: torch.stack([s[k].float() for s in states]).mean(0).to(states[0][k].dtype)
                           for k in states[0]})
    return fused.eval()


class Ensemble(nn.Module):
    """Averages the members' outputs (logits)."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x):
        return torch.stack([m(x) for m in self.members]).mean(0)


def fusion_variants(case, model: nn.Module, *, count: int = 3, steps: int = 3,
                    wanted: tuple[str, ...] = ("fusion-average", "fusion-ensemble")) -> list[Variant]:
    if not isinstance(model, nn.Sequential):
        raise CompressError(f"fusion is implemented for the MLP classifier, not {case.name}")
    tuned = fine_tunes(case, model, count, steps)
    out = []
    if "fusion-average" in wanted:
        out.append(Variant("fusion-average", f"weight average of {count} fine-tunes", "fusion",
                           average_weights(tuned), {"checkpoints": count, "finetune_epochs": steps},
                           note="same size as one model"))
    if "fusion-ensemble" in wanted:
        out.append(Variant("fusion-ensemble", f"ensemble of {count} fine-tunes", "fusion",
                           Ensemble(tuned).eval(), {"checkpoints": count, "finetune_epochs": steps},
                           note=f"{count}x the parameters and compute"))
    return out
