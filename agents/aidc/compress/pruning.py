"""Pruning: unstructured magnitude pruning, and structured pruning that shrinks tensors.

Unstructured pruning zeroes the smallest weights of every linear layer; dense kernels run
no faster on zeros, so its gain is storage only, and it is stored in a real sparse format
(a bit mask plus the surviving values). Structured pruning removes whole hidden units
(MLP neurons, attention heads, FFN rows) and rebuilds smaller nn.Linear layers, so the
matrix multiplies themselves shrink. Both fine-tune briefly afterwards.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune

from aidc.compress.config import check_sparsity
from aidc.compress.variant import Variant
from aidc.errors import CompressError


# ---------------------------------------------------------------- sparse storage

def sparse_state(module: nn.Module, min_zero_fraction: float = 0.25) -> dict:
    """State dict with mostly-zero float matrices stored as (bit mask, non-zero values)."""
    out: dict = {}
    for key, t in module.state_dict().items():
        if torch.is_tensor(t) and t.is_floating_point() and t.dim() == 2 and \
                float((t == 0).float().mean()) >= min_zero_fraction:
            mask = (t != 0).flatten().numpy()
            out[key] = {"shape": tuple(t.shape), "mask": torch.from_numpy(np.packbits(mask)),
                        "values": t.flatten()[torch.from_numpy(mask)].clone()}
        else:
            out[key] = t
    return out


def dense_from_sparse(state: dict) -> dict:
    """Inverse of sparse_state: the ordinary state dict back."""
    out = {}
    for key, v in state.items():
        if isinstance(v, dict) and "mask" in v:
            n = int(np.prod(v["shape"]))
            mask = torch.from_numpy(np.unpackbits(v["mask"].numpy())[:n].astype(bool))
            dense = torch.zeros(n, dtype=v["values"].dtype)
            dense[mask] = v["values"]
            out[key] = dense.reshape(v["shape"])
        else:
            out[key] = v
    return out


# ---------------------------------------------------------------- unstructured

def magnitude_prune(case, model: nn.Module, sparsity: float, finetune_steps: int) -> Variant:
    sparsity = check_sparsity(sparsity)
    m = copy.deepcopy(model)
    linears = [mod for mod in m.modules() if type(mod) is nn.Linear]
    for mod in linears:
        prune.l1_unstructured(mod, "weight", amount=sparsity)
    if finetune_steps:
        case.finetune(m, finetune_steps)  # the masks stay applied while training
    for mod in linears:
        prune.remove(mod, "weight")
    return Variant("prune-unstructured", f"magnitude pruning {int(sparsity * 100)}%", "pruning", m.eval(),
                   {"sparsity": sparsity, "finetune_steps": finetune_steps}, to_disk=sparse_state,
                   note="stored as bit mask + values; dense kernels, so no speed-up expected")


# ---------------------------------------------------------------- structured

def _keep_outputs(linear: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    new = nn.Linear(linear.in_features, len(idx), bias=linear.bias is not None)
    with torch.no_grad():
        new.weight.copy_(linear.weight[idx])
        if linear.bias is not None:
            new.bias.copy_(linear.bias[idx])
    return new


def _keep_inputs(linear: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    new = nn.Linear(len(idx), linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        new.weight.copy_(linear.weight[:, idx])
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    return new


def _top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    return torch.topk(scores, keep).indices.sort().values


def _keep_count(total: int, sparsity: float) -> int:
    return max(1, int(round(total * (1.0 - sparsity))))


def shrink_mlp(model: nn.Sequential, sparsity: float) -> nn.Sequential:
    """Remove the weakest hidden neurons of a Linear/activation stack (rows in, columns out)."""
    positions = [i for i, mod in enumerate(model) if type(mod) is nn.Linear]
    for a, b in zip(positions, positions[1:]):
        first, second = model[a], model[b]
        score = first.weight.detach().norm(dim=1) * second.weight.detach().norm(dim=0)
        idx = _top(score, _keep_count(first.out_features, sparsity))
        model[a], model[b] = _keep_outputs(first, idx), _keep_inputs(second, idx)
    return model


def shrink_bert(model: nn.Module, sparsity: float) -> nn.Module:
    """Remove the weakest attention heads and FFN rows of every BERT layer."""
    for layer in model.encoder.layer:
        att = layer.attention.self
        d = att.attention_head_size
        heads = att.query.out_features // d
        head_score = torch.stack([
            sum(lin.weight.detach()[h * d:(h + 1) * d].norm() for lin in (att.query, att.key, att.value))
            * layer.attention.output.dense.weight.detach()[:, h * d:(h + 1) * d].norm()
            for h in range(heads)])
        kept = _top(head_score, _keep_count(heads, sparsity))
        idx = torch.cat([torch.arange(h * d, (h + 1) * d) for h in kept.tolist()])
        att.query, att.key, att.value = (_keep_outputs(lin, idx) for lin in (att.query, att.key, att.value))
        att.num_attention_heads, att.all_head_size = len(kept), len(idx)
        layer.attention.output.dense = _keep_inputs(layer.attention.output.dense, idx)

        up, down = layer.intermediate.dense, layer.output.dense
        ffn_score = up.weight.detach().norm(dim=1) * down.weight.detach().norm(dim=0)
        idx = _top(ffn_score, _keep_count(up.out_features, sparsity))
        layer.intermediate.dense, layer.output.dense = _keep_outputs(up, idx), _keep_inputs(down, idx)
    return model


def structured_prune(case, model: nn.Module, sparsity: float, finetune_steps: int) -> Variant:
    sparsity = check_sparsity(sparsity)
    m = copy.deepcopy(model)
    if isinstance(m, nn.Sequential):
        shrink_mlp(m, sparsity)
        what = "hidden neurons"
    elif hasattr(m, "encoder") and hasattr(m.encoder, "layer"):
        shrink_bert(m, sparsity)
        what = "attention heads and FFN rows"
    else:
        raise CompressError(f"structured pruning supports MLPs and BERT encoders, not {type(m).__name__}")
    if finetune_steps:
        case.finetune(m, finetune_steps)
    return Variant("prune-structured", f"structured pruning {int(sparsity * 100)}%", "pruning", m.eval(),
                   {"sparsity": sparsity, "removed": what, "finetune_steps": finetune_steps},
                   note=f"removes {what}; tensors really shrink")
