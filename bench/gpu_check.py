"""GPU check for a lent GPU machine: NVML fields, burn-in GEMM/memcpy, one-GPU NCCL all_reduce,
the burn-in node program on this host (nvml backend, cuda:0 collectives, known-answer checks,
dcgmi diag where installed), and on hosts with 2+ GPUs a sweep of NCCL settings that proposes
$OUT/nccl.conf (bench/nccl_sweep.py). `--list` prints the checks and the node program's plan.

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
ROOT = Path(__file__).resolve().parents[1]
# What a run does, in order (`--list`); each check's figures go under its key in gpu_check.json.
CHECKS = {
    "nvml": "every telemetry field and the XID event set through aidc's nvml backend (TimedBackend)",
    "measure": "burn-in GEMM (bf16, fp32) and memcpy on each cuda:N, held to the GPU model's catalog floors",
    "nccl": "one-rank NCCL all_reduce sweep and DDP training on cuda:0",
    "burnin": "the burn-in node program (python -m aidc.burnin.launch.node) as a scheduler's task runs it: one"
              " node, the nvml backend, cuda:0 collectives, known-answer checks, dcgmi diag where installed;"
              " judged as `aidc burnin run` judges",
    "nccl_sweep": "NCCL settings sweep across 2+ GPUs, the best written as nccl.conf",
}


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


def burnin_spec(model: str, gpus: int, storage: Path, backend: str = "nvml"):
    """A one-node stack of this host for the node program: the worked H100 example's policy and
    fabric, this host's GPU model and count, the nvml backend, its checkpoint volume under $OUT."""
    import yaml

    from aidc.spec import parse_spec

    raw = yaml.safe_load((ROOT / "Pulumi.h100-example.yaml").read_text())["config"]["aidc:cluster"]
    raw.update(name="gpu-check", device_backend=backend, scheduler="slurm",
               node_pools=[{"name": "gpu-check", "count": 1, "gpu_model": model, "gpus_per_node": gpus}])
    raw["storage"]["checkpoints"]["mount_path"] = str(storage)
    return parse_spec(raw, "bench/gpu_check.py")


def burnin_plan(spec, timeout_s: float) -> dict:
    """The config the node program fetches from the run's store (aidc.burnin.launch.slurm.publish_configs)."""
    from aidc.burnin import runner

    [node] = spec.nodes()
    return {**runner.node_config(spec, node, 0, [node.name], timeout_s=timeout_s),
            **runner._fabric_config(spec, None, node.name, [node.name])}


def node_burnin(model: str | None, gpus: int, args, out: Path, node_dir: Path | None = None) -> dict:
    """Run the node program on this host the way the Slurm launcher's tasks run it (its store, its
    config under config/<node>, the secret in the environment), then judge its result. `node_dir`:
    a simulated node instead of this host's GPUs (for trying this function without one)."""
    if (args.simulate and node_dir is None) or not args.burnin:
        return {"skipped": "--simulate: the lab's tests run the node program on simulated nodes" if args.simulate
                else "--no-burnin"}
    if model is None:
        return {"skipped": "no catalog model for this GPU: the burn-in has no floors to judge it by"}
    import subprocess

    from aidc.burnin import runner
    from aidc.burnin.answers import load_all
    from aidc.burnin.launch.node import ENV_NODE
    from aidc.burnin.launch.slurm import ENV_SECRET, ENV_STORE, ENV_TIMEOUT, NODE_COMMAND, publish_configs
    from aidc.burnin.launch.store import JobStore
    from aidc.errors import BurninError

    storage = out / "burnin-checkpoints"
    storage.mkdir(parents=True, exist_ok=True)
    spec = burnin_spec(model, gpus, storage, "sim" if node_dir else "nvml")
    nodes = spec.nodes()
    known_answers = load_all(None)
    started = time.monotonic()
    try:
        with JobStore("127.0.0.1", args.burnin_timeout) as store:
            publish_configs(store, spec, nodes, "127.0.0.1", timeout_s=args.burnin_timeout,
                            node_dirs={nodes[0].name: node_dir} if node_dir else {}, soak_s=0.0)
            env = {**runner._worker_env(), ENV_NODE: nodes[0].name,
                   ENV_STORE: f"127.0.0.1:{store.port}", ENV_SECRET: store.secret,
                   ENV_TIMEOUT: str(args.burnin_timeout)}
            proc = subprocess.run(NODE_COMMAND, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=args.burnin_timeout + 30, check=False)
            if proc.returncode != 0:
                return {"error": f"the node program exited {proc.returncode}: {proc.stderr.strip()[-1500:]}"}
            raw = {nodes[0].name: store.get_json(f"result/{nodes[0].name}")}
    except (BurninError, subprocess.TimeoutExpired) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    report = runner._judged_report(spec, nodes, raw, time.monotonic() - started, runner.spec_link_rate_gbps(spec),
                                   known_answers=known_answers)
    failures = [f"burn-in failed {name}: {'; '.join(n.reasons)}" for name, n in report.nodes.items() if not n.passed]
    return {"plan": burnin_plan(spec, args.burnin_timeout), "report": report.to_dict(), "failures": failures}


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
    parser.add_argument("--burnin", action=argparse.BooleanOptionalAction, default=True,
                        help="run the burn-in node program on this host (nvml backend, cuda:0 collectives)")
    parser.add_argument("--burnin-timeout", type=float, default=240.0)
    parser.add_argument("--list", action="store_true",
                        help="print the checks and the burn-in node program's plan for an H100 host as JSON; measure nothing")
    parser.add_argument("--simulate", metavar="NODE_DIR", default=None,
                        help="test this script without a GPU: a simulated node, CPU tensors, gloo")
    args = parser.parse_args()
    out = Path(args.out)
    if args.list:  # no GPU needed: what a run would do, and the config the node program would get
        plan = burnin_plan(burnin_spec("H100", 8, Path("$OUT/burnin-checkpoints")), args.burnin_timeout)
        print(json.dumps({"checks": CHECKS, "burnin_plan": plan}, indent=2, sort_keys=True))
        return 0
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
    models = {gpu_model_of(g["name"]) for g in doc["nvml"]["gpus"]}
    doc["burnin"] = node_burnin(models.pop() if len(models) == 1 else None, gpus, args, out)
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
    if "error" in doc["burnin"]:
        failures.append(f"the burn-in node program did not complete: {doc['burnin']['error']}")
    failures += doc["burnin"].get("failures", [])
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
    burnin = doc["burnin"]
    print(f"burn-in node program: {burnin['report']['verdicts'] if 'report' in burnin else burnin.get('skipped') or burnin.get('error')}")
    print(("PASS" if doc["ok"] else "FAIL: " + "; ".join(failures)) + f"  ({doc['duration_s']} s, {path})")
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
