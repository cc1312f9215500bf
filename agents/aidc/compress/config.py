"""What a benchmark run is asked to do, validated at construction (no torch import here)."""

from __future__ import annotations

from dataclasses import dataclass, field

from aidc.errors import CompressError

MODELS = ("digits-mlp", "minilm-l6")

# name -> (family, human label). The runner maps names to implementations.
TECHNIQUES: dict[str, tuple[str, str]] = {
    "prune-unstructured": ("pruning", "magnitude pruning (unstructured)"),
    "prune-structured": ("pruning", "structured pruning"),
    "int8-dynamic": ("quantization", "int8 dynamic"),
    "int8-static": ("quantization", "int8 static (calibrated)"),
    "int8-weight-only": ("quantization", "int8 weight-only (torchao)"),
    "int8-dynamic-torchao": ("quantization", "int8 dynamic (torchao)"),
    "fp16": ("quantization", "fp16"),
    "bf16": ("quantization", "bf16"),
    "distill": ("distillation", "distilled student"),
    "fusion-average": ("fusion", "weight average of fine-tunes"),
    "fusion-ensemble": ("fusion", "ensemble of fine-tunes"),
}

# torchao's int8 dynamic-activation path has no fast eager CPU kernel here (20x slower than
# fp32 without torch.compile, and compiling took minutes on 2 cores): full runs only.
FULL_ONLY = {"int8-dynamic-torchao"}


def check_sparsity(value: float) -> float:
    if not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise CompressError(f"sparsity must be a fraction between 0 and 1 (exclusive), got {value!r}")
    return float(value)


def check_technique(name: str) -> str:
    if name not in TECHNIQUES:
        raise CompressError(f"unknown technique {name!r}; valid: {', '.join(TECHNIQUES)}")
    return name


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    quick: bool = False
    models: tuple[str, ...] = MODELS
    techniques: tuple[str, ...] = ()          # empty: every technique (FULL_ONLY ones skipped in quick)
    sparsities: tuple[float, ...] = ()        # empty: (0.5,) quick, (0.3, 0.5, 0.7) full
    threads: int = 2
    seed: int = 0
    repeats: int = 0                          # 0: 5 quick, 10 full
    out_dir: str | None = None
    audit_db: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for m in self.models:
            if m not in MODELS:
                raise CompressError(f"unknown model {m!r}; valid: {', '.join(MODELS)}")
        for t in self.techniques:
            check_technique(t)
        for s in self.sparsities:
            check_sparsity(s)
        if not isinstance(self.threads, int) or self.threads < 1:
            raise CompressError(f"threads must be a positive integer, got {self.threads!r}")
        if self.repeats < 0:
            raise CompressError(f"repeats must be >= 0, got {self.repeats}")

    def chosen_techniques(self) -> tuple[str, ...]:
        if self.techniques:
            return self.techniques
        return tuple(t for t in TECHNIQUES if not (self.quick and t in FULL_ONLY))

    def chosen_sparsities(self) -> tuple[float, ...]:
        return self.sparsities or ((0.5,) if self.quick else (0.3, 0.5, 0.7))

    def chosen_repeats(self) -> int:
        return self.repeats or (5 if self.quick else 10)
