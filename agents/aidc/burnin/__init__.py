"""Burn-in: certify nodes before they take work.

Per node: GEMM throughput (fp32, bf16) and memory-copy bandwidth. Across nodes: an
all_reduce size sweep (nccl-tests' algbw/busbw) and a short DDP training run whose loss
must fall and whose parameters must end bit-identical on every rank. Each node is
judged against the fleet median and the spec's floors; a certificate per node goes to
the audit log. Importing this package does not import torch (the CLI stays fast).
"""

from aidc.burnin.report import BurninReport, NodeResult

__all__ = ["BurninReport", "NodeResult", "run_burnin"]


def run_burnin(*args, **kwargs):
    """See `aidc.burnin.runner.run_burnin` (imported lazily: it pulls in torch)."""
    from aidc.burnin.runner import run_burnin as _run

    return _run(*args, **kwargs)
