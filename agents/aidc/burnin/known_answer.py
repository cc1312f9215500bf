"""Known-answer checks for silent data corruption (SDC).

DDP averages every rank's gradient with all_reduce, so a GPU that computes a wrong product
still ends with the same parameters as its peers: the parameter-digest vote
(`aidc.burnin.judge.compare_digests`) cannot see it. Here every GPU computes the same seeded
work alone, and the result's bytes are its fingerprint:

- a GEMM of seeded operands in fp32, bf16 and fp16 (fp16 where the device has it);
- a few seeded SGD steps of the burn-in model with deterministic algorithms on.

Fingerprints are compared across the run's GPUs of the same model and the same key (device,
library versions, operand size; on the sim backend the host's CPU instruction set, since
CPU BLAS results differ between instruction sets), and against a stored known answer for the
key when one exists. cuBLAS documents bit-wise identical results from one toolkit version on
GPUs of the same architecture and SM count, so the key names both.

The lab's simulated GPUs can be told to compute wrong answers (`aidc device inject NODE sdc`):
`corrupted_results` makes every GEMM computed under it come out wrong in one element (or a
fraction), without an error: the aten matrix products themselves, so training, the throughput
bench and these checks all compute with the faulty unit.

Judging the fingerprints and the stored known answers: `aidc.burnin.answers` (no torch).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
from importlib import metadata
from pathlib import Path

# Deterministic algorithms on CUDA need cuBLAS's fixed workspace, chosen when torch first uses
# cuBLAS: set on import, before any GPU work (the worker imports this before its benches).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

OPERAND_SEED = 1234  # the GEMM bench's operands (aidc.burnin.gemm.seeded_operands)
TRAIN_SEED, TRAIN_STEPS = 2024, 3
GEMM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Integer views of the same width: a wrong answer is one bit of one element, as an SDC is.
_BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
         torch.float16: torch.int16}
_GEMMS = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm, torch.ops.aten.baddbmm}


def corrupt_(t: torch.Tensor, rate: float) -> None:
    """Flip the lowest mantissa bit of max(1, round(rate * numel)) evenly spaced elements."""
    if t.dtype not in _BITS or t.numel() == 0:
        return
    target = t if t.is_contiguous() else t.contiguous()
    flat = target.view(-1).view(_BITS[t.dtype])
    n = flat.numel()
    k = min(n, max(1, round(rate * n)))
    index = torch.div(torch.arange(k, device=t.device) * n, k, rounding_mode="floor")
    flat[index] ^= 1
    if target is not t:
        t.copy_(target)


class corrupted_results(TorchDispatchMode):
    """Lab fault injection: every matrix product computed under this mode is silently wrong."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Plain tensors only: a tensor subclass (FSDP's DTensor) computes through plain ones.
        if func.overloadpacket in _GEMMS and type(out) is torch.Tensor:
            corrupt_(out, self.rate)
        return out


def computing_on(corruption: float | None):
    """The context a simulated GPU's work runs in: wrong answers when `corruption` is not None."""
    return contextlib.nullcontext() if corruption is None else corrupted_results(corruption)


@contextlib.contextmanager
def _deterministic(device: str):
    was, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    if not device.startswith("cuda"):
        torch.set_num_threads(1)  # CPU BLAS splits work by thread count: one answer per host
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)
        torch.set_num_threads(threads)


def _package_version(*names: str) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return ""


def answer_key(device: str, size: int) -> str:
    """What a known answer holds for: the device model (or, on CPU, the host's instruction set),
    the libraries that compute it, and the operand size."""
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        parts = [props.name, f"sm={props.multi_processor_count}", f"cc={props.major}.{props.minor}",
                 f"cuda={torch.version.cuda}",
                 f"cublas={_package_version('nvidia-cublas-cu12', 'nvidia-cublas-cu13', 'nvidia-cublas')}"]
    else:
        flags = hashlib.sha256(_cpu_flags().encode()).hexdigest()[:12]
        parts = [f"cpu={platform.machine()}", f"isa={torch.backends.cpu.get_cpu_capability()}", f"flags={flags}"]
    return "|".join(parts + [f"torch={torch.__version__}", f"n={size}"])


def _train_step_digest(device: str) -> str:
    from aidc.burnin.train import FEATURES, task, tensors_digest, tiny_model

    model = tiny_model(TRAIN_SEED).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    teacher = task(TRAIN_SEED)[0].to(device)
    gen = torch.Generator().manual_seed(TRAIN_SEED)
    for _ in range(TRAIN_STEPS):
        x = torch.randn(64, FEATURES, generator=gen).to(device)
        loss = torch.nn.functional.mse_loss(model(x), x @ teacher)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return tensors_digest(model.named_parameters())


def gpu_known_answers(device: str, size: int, corruption: float | None = None) -> dict:
    """This GPU's fingerprints: {"key", "fingerprints": {check: sha256}, "unsupported": [...]}."""
    from aidc.burnin.gemm import result_digest, seeded_operands

    fingerprints, unsupported = {}, []
    with _deterministic(device), computing_on(corruption):
        for name, dtype in GEMM_DTYPES.items():
            a, b = seeded_operands(device, dtype, size)
            try:
                fingerprints[f"gemm_{name}"] = result_digest(torch.matmul(a, b))
            except RuntimeError as exc:
                if name != "fp16" or "not implemented" not in str(exc):
                    raise  # a device error, not a missing feature: the GPU fails with it
                unsupported.append(f"gemm_{name}: {str(exc).splitlines()[0]}")  # stated, not failed
        fingerprints["train_step"] = _train_step_digest(device)
    return {"key": answer_key(device, size), "fingerprints": fingerprints, "unsupported": unsupported}
