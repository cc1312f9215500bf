"""GPU check for a lent GPU machine: NVML fields, burn-in GEMM/memcpy, one-GPU NCCL all_reduce,
and on hosts with 2+ GPUs a sweep of NCCL settings that proposes $OUT/nccl.conf (bench/nccl_sweep.py).

Run through `bench/gpu_check.sh`. It installs nothing. Every telemetry field is read
through aidc's `nvml` backend behind `TimedBackend` (XID event registration included);
the measurements are the burn-in's own code on `cuda:N`. Prints a short table and
writes `$OUT/gpu_check.json`. Exit 0 when everything ran and passed, 1 when a check
failed, 3 when there is no NVIDIA driver / GPU (nothing measured).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

NO_GPU = 3


def _write(out: Path, doc: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu_check.json"
    path.write_text(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")
    return path


def probe_driver() -> str | None:
    """None when NVML answers; otherwise why not, in plain words."""
    try:
        import pynvml
    except ImportError:
        return "no NVIDIA driver bindings: nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        if isinstance(exc, (pynvml.NVMLError_LibraryNotFound, pynvml.NVMLError_DriverNotLoaded)):
            return f"no NVIDIA driver (NVML: {exc})"
        return f"NVML cannot start: {exc}"
    pynvml.nvmlShutdown()
    return None


def read_nvml(timeout_s: float, kind: str = "nvml", **kwargs) -> dict:
    from aidc.device import TimedBackend, open_backend

    dev = TimedBackend(open_backend(kind, **kwargs), timeout_s)
    try:
        t0 = time.perf_counter()
        gpus = []
        for i in range(dev.gpu_count()):
            c0 = time.perf_counter()
            telemetry = asdict(dev.telemetry(i))
            telemetry["read_ms"] = round((time.perf_counter() - c0) * 1e3, 2)
            gpus.append(telemetry)
        c0 = time.perf_counter()
        xids = [asdict(e) for e in dev.xid_events(timeout_ms=500)]  # registers the XID event set
        xid_ms = (time.perf_counter() - c0) * 1e3
        return {"gpus": gpus, "xid_events": xids, "xid_wait_ms": round(xid_ms, 1), "hung_calls": dev.hung_calls,
                "read_all_ms": round((time.perf_counter() - t0) * 1e3, 1)}
    finally:
        dev.close()


def catalog() -> dict:
    """The GPU model catalog (floors), or {} when this python lacks pydantic/PyYAML."""
    try:
        from aidc.spec import gpu_models
    except ImportError:
        return {}
    return gpu_models()


def gpu_model_of(name: str) -> str | None:
    models = catalog()
    for model in sorted(models, key=len, reverse=True):
        if model in name.upper() and not models[model].get("simulated"):
            return model
    return None


def measure(index: int, args) -> dict:
    import torch

    from aidc.burnin.gemm import measure_gemm
    from aidc.burnin.memory import measure_memcpy

    if args.simulate:
        device, name = "cpu", "cpu (--simulate)"
    else:
        device, name = f"cuda:{index}", torch.cuda.get_device_name(index)
        torch.cuda.set_device(index)
    out = {"device": device, "torch_name": name}
    for dtype in ("bf16", "fp32"):
        out[f"gemm_{dtype}"] = measure_gemm(device, dtype, args.gemm_size, args.repeats,
                                            target_sample_s=0.2).to_dict()
    out["memcpy"] = measure_memcpy(device, args.memcpy_bytes, args.repeats).to_dict()
    return out


def nccl_checks(args) -> dict:
    import torch.distributed as dist

    from aidc.burnin.collectives import allreduce_sweep, sweep_sizes
    from aidc.burnin.train import run_ddp_training

    device, backend = ("cpu", "gloo") if args.simulate else ("cuda:0", "nccl")
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        rows = allreduce_sweep(device, sweep_sizes(args.allreduce_min, args.allreduce_max))
        training = run_ddp_training(device, args.train_steps)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return {"backend": backend, "allreduce": [r.to_dict() for r in rows], "training": training.to_dict()}


def nccl_settings_sweep(args, out: Path) -> dict:
    """bench/nccl_sweep.py: NCCL knobs measured in fresh processes; the best proposed as nccl.conf."""
    import torch

    if args.simulate or not args.nccl_sweep:
        return {"skipped": "--simulate: no NCCL to tune" if args.simulate else "--no-nccl-sweep"}
    if torch.cuda.device_count() < 2:
        return {"skipped": "one GPU: NCCL moves nothing between GPUs with one rank (busbw is 0), so its"
                           " settings cannot be compared here"}
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from nccl_sweep import SweepError, sweep

    try:
        result, paths = sweep(out, trial_args=["--max-bytes", str(args.nccl_sweep_bytes)], trials=args.nccl_sweep_trials)
    except SweepError as exc:
        return {"error": str(exc)}
    return {**result, "files": {k: str(v) for k, v in paths.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "./out")
    parser.add_argument("--gemm-size", type=int, default=8192)
    parser.add_argument("--memcpy-bytes", type=int, default=1 << 30)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--allreduce-min", type=int, default=1 << 10)
    parser.add_argument("--allreduce-max", type=int, default=1 << 28)
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--device-timeout", type=float, default=5.0)
    parser.add_argument("--nccl-sweep", action=argparse.BooleanOptionalAction, default=True,
                        help="sweep NCCL_ALGO/PROTO/MIN_NCHANNELS/IB_QPS_PER_CONNECTION (bench/nccl_knobs.json) across"
                             " this host's GPUs and write the best as $OUT/nccl.conf (needs 2+ GPUs)")
    parser.add_argument("--nccl-sweep-bytes", type=int, default=256 << 20)
    parser.add_argument("--nccl-sweep-trials", type=int, default=None, help="trials per setting (default: the knobs file's)")
    parser.add_argument("--simulate", metavar="NODE_DIR", default=None,
                        help="test this script without a GPU: a simulated node, CPU tensors, gloo")
    args = parser.parse_args()
    out = Path(args.out)
    started = time.time()
    doc: dict = {"ok": False, "started_at": started, "host": os.uname().nodename}

    why = None if args.simulate else probe_driver()
    if why:
        doc["error"] = why
        path = _write(out, doc)
        print(f"gpu_check: {why}; nothing measured ({path})", file=sys.stderr)
        return NO_GPU
    try:
        doc["nvml"] = (read_nvml(args.device_timeout, "sim", node_dir=args.simulate) if args.simulate
                       else read_nvml(args.device_timeout))
    except Exception as exc:  # the backend's own error, or a checkout without aidc.device.nvml
        doc["error"] = f"the nvml backend failed: {type(exc).__name__}: {exc}"
        path = _write(out, doc)
        print(f"gpu_check: {doc['error']} ({path})", file=sys.stderr)
        return 1
    try:
        import torch
    except ImportError:
        doc["error"] = f"torch is not installed for {sys.executable} (set PYTHON to one that has it)"
        path = _write(out, doc)
        print(f"gpu_check: {doc['error']}; NVML fields written to {path}", file=sys.stderr)
        return NO_GPU

    doc["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda,
                    "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None}
    if not torch.cuda.is_available() and not args.simulate:
        doc["error"] = f"torch {torch.__version__} sees no CUDA device (CPU build?)"
        path = _write(out, doc)
        print(f"gpu_check: {doc['error']}; NVML fields written to {path}", file=sys.stderr)
        return NO_GPU
    gpus = len(doc["nvml"]["gpus"]) if args.simulate else torch.cuda.device_count()
    doc["measure"] = [measure(i, args) for i in range(gpus)]
    doc["nccl"] = nccl_checks(args)
    doc["nccl_sweep"] = nccl_settings_sweep(args, out)

    failures = []
    for g, m in zip(doc["nvml"]["gpus"], doc["measure"]):
        model = gpu_model_of(g["name"])
        floors = catalog()[model]["floors"] if model else {}
        figures = {"gemm_bf16_tflops": m["gemm_bf16"]["tflops"], "gemm_fp32_tflops": m["gemm_fp32"]["tflops"],
                   "memcpy_gbps": m["memcpy"]["gbps"]}
        m["model"], m["floors"] = model, floors
        for key, floor in floors.items():
            if figures[key] < floor:
                failures.append(f"gpu {g['index']}: {key} {figures[key]:.4g} is below the {model} floor {floor:g}")
        if model is None:
            m["note"] = f"no catalog entry matches {g['name']!r}: floors not checked"
    t = doc["nccl"]["training"]
    if not t["loss_after"] < 0.9 * t["loss_before"]:
        failures.append(f"DDP loss did not fall: {t['loss_before']:.4g} -> {t['loss_after']:.4g}")
    if not all(r["correct"] for r in doc["nccl"]["allreduce"]):
        failures.append("all_reduce returned a wrong sum")
    if "error" in doc["nccl_sweep"]:
        failures.append(f"the NCCL settings sweep measured nothing: {doc['nccl_sweep']['error']}")
    if doc["nvml"]["hung_calls"]:
        failures.append(f"{doc['nvml']['hung_calls']} NVML call(s) hung")
    doc["failures"], doc["ok"] = failures, not failures
    doc["duration_s"] = round(time.time() - started, 1)
    path = _write(out, doc)

    print(f"{'gpu':<5}{'name':<28}{'temp C':>7}{'power W':>9}{'PCIe':>10}{'bf16 TFLOP/s':>14}"
          f"{'fp32 TFLOP/s':>14}{'memcpy GB/s':>13}")
    for g, m in zip(doc["nvml"]["gpus"], doc["measure"]):
        print(f"{g['index']:<5}{g['name'][:27]:<28}{g['temperature_c']:>7.0f}{g['power_w']:>9.0f}"
              f"{'Gen%dx%d' % (g['pcie_gen'], g['pcie_width']):>10}{m['gemm_bf16']['tflops']:>14.4g}"
              f"{m['gemm_fp32']['tflops']:>14.4g}{m['memcpy']['gbps']:>13.4g}")
    top = doc["nccl"]["allreduce"][-1]
    print(f"{doc['nccl']['backend']} all_reduce, 1 rank, {top['bytes']} B: {top['time_us']:.0f} us, algbw {top['algbw_gbps']:.1f} GB/s,"
          f" busbw {top['busbw_gbps']:.1f} GB/s (2(n-1)/n = 0 with one rank)")
    tuned = doc["nccl_sweep"]
    if "best" in tuned:
        print(f"NCCL settings sweep: all_reduce busbw {tuned['baseline_gbps']:.4g} GB/s with defaults, {tuned['best_gbps']:.4g}"
              f" GB/s with {tuned['best'] or 'the defaults'} -> {tuned['files']['nccl_conf']}")
    else:
        print(f"NCCL settings sweep: {tuned.get('skipped') or tuned.get('error')}")
    print(f"DDP {t['steps']} steps: loss {t['loss_before']:.4f} -> {t['loss_after']:.4f};"
          f" NVML: {len(doc['nvml']['gpus'])} GPU(s) read in {doc['nvml']['read_all_ms']} ms,"
          f" {len(doc['nvml']['xid_events'])} XID event(s), {doc['nvml']['hung_calls']} hung call(s)")
    print(("PASS" if doc["ok"] else "FAIL: " + "; ".join(failures)) + f"  ({doc['duration_s']} s, {path})")
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
