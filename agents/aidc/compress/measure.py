"""What a compressed model costs and how well it works: params, bytes, latency, quality.

Bytes are measured by really serialising (torch.save to a file, then stat), never
estimated from dtypes; a technique may bring its own on-disk format (sparse weights).
Latency is the median of repeats after warm-up, with torch's thread count pinned by the
runner and reported with the results.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

LINEAR_KINDS: tuple[type, ...] = (nn.Linear,)


def _quantized_linear_kinds() -> tuple[type, ...]:
    kinds: list[type] = []
    try:
        import torch.ao.nn.quantized as nnq
        import torch.ao.nn.quantized.dynamic as nnqd

        kinds += [nnq.Linear, nnqd.Linear]
    except ImportError:  # pragma: no cover - torch without the quantized modules
        pass
    return tuple(kinds)


QUANTIZED_LINEAR_KINDS = _quantized_linear_kinds()


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, LINEAR_KINDS + QUANTIZED_LINEAR_KINDS)


def count_params(model: nn.Module) -> int:
    """Number of weights, counting packed (quantized) linear weights that .parameters() hides."""
    total = 0
    for module in model.modules():
        if isinstance(module, QUANTIZED_LINEAR_KINDS):
            total += module.weight().numel()
            bias = module.bias()
            total += bias.numel() if bias is not None else 0
        else:
            total += sum(p.numel() for p in module.parameters(recurse=False))
    return total


def serialised_bytes(obj: Any) -> int:
    """Bytes of `obj` written with torch.save to a real file."""
    fd, path = tempfile.mkstemp(suffix=".pt", prefix="aidc-compress-")
    os.close(fd)
    try:
        torch.save(obj, path)
        return os.path.getsize(path)
    finally:
        os.unlink(path)


def model_bytes(model: nn.Module, to_disk: Callable[[nn.Module], Any] | None = None) -> int:
    """Bytes on disk of the model's weights (its state_dict, or the technique's own format)."""
    return serialised_bytes(to_disk(model) if to_disk else model.state_dict())


def linear_bytes(model: nn.Module, to_disk: Callable[[nn.Module], Any] | None = None) -> int:
    """Bytes on disk of the linear layers alone (weights and biases), as the technique stores them."""
    parts = {name: (to_disk(mod) if to_disk else mod.state_dict())
             for name, mod in model.named_modules() if is_linear(mod)}
    return serialised_bytes(parts)


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def cosine_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


def top1_agreement(queries_a: torch.Tensor, docs_a: torch.Tensor,
                   queries_b: torch.Tensor, docs_b: torch.Tensor) -> float:
    """Fraction of queries whose nearest document is the same under both embeddings."""
    best_a = (nn.functional.normalize(queries_a.float(), dim=-1)
              @ nn.functional.normalize(docs_a.float(), dim=-1).T).argmax(dim=-1)
    best_b = (nn.functional.normalize(queries_b.float(), dim=-1)
              @ nn.functional.normalize(docs_b.float(), dim=-1).T).argmax(dim=-1)
    return float((best_a == best_b).float().mean())
