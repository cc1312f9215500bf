"""One burn-in process per node: `python -m aidc.burnin.worker CONFIG.json`, or forked
by `aidc.burnin.zygote` (what the runner does: torch is imported once for all nodes).

The runner starts one of these per node and reads progress from its stdout (lines
starting with `@@aidc `). Per-node measurements are taken one node at a time, in
rounds (every node takes its first sample, then every node its second, ...), so nodes
never share cores while timing and a burst of load from elsewhere hits every node
alike instead of one. Then all nodes run the collective sweeps and the DDP, FSDP and
pipeline training runs together; when the largest all_reduce is slow against the link rate
(`link_rate_gbit_s` in the config: the scaled rail rate on the netns fabric), ring-neighbour
pair tests localise the bad rail (`aidc.burnin.localise`). Only the burn-in tests the config names
run (`tests`, aidc.burnin.suite: a runbook's recertification asks for some; none named: all).
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

from aidc.files import SHARED_MODE, write_atomic

PREFIX = "@@aidc "
BENCHES = ("fp32", "bf16", "memcpy")  # a GPU's timed benches, sampled in rounds (those its tests asked for)
DCGM_TIMEOUT_S = 3600.0  # a level-4 dcgmi diag runs for most of an hour


def emit(event: str, **fields) -> None:
    sys.stdout.write(PREFIX + json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def _open_device(cfg: dict):
    from aidc.device import TimedBackend, open_backend

    return TimedBackend(open_backend(cfg["backend"], **cfg.get("backend_kwargs", {})), cfg["device_timeout_s"])


class NodeBenches:
    """This node's GEMM and memcpy benches, one set per GPU; device errors become reasons."""

    def __init__(self, cfg: dict):
        from aidc.burnin.suite import select

        self.cfg, self.errors, self.gpus, self.slowdown = cfg, [], [], 1.0
        self.tests = select(cfg.get("tests"))  # a config without the key: the whole suite
        self.device_of: dict[int, str] = {}
        self.storage = None  # aidc.burnin.storage.StorageBench on the node's checkpoint path
        self.dcgm: dict = {}  # aidc.burnin.dcgm.run_diag's result
        self.soak: dict = {}  # aidc.burnin.soak: {"seconds", "samples", "series": {gpu: [...]}}

    def setup(self) -> None:
        from aidc.burnin.dcgm import run_diag
        from aidc.burnin.gemm import GemmBench
        from aidc.burnin.known_answer import computing_on, gpu_known_answers
        from aidc.burnin.memory import MemcpyBench

        cfg, tests = self.cfg, self.tests
        if "storage" in tests and cfg.get("storage_path"):
            from aidc.burnin.storage import StorageBench

            try:
                self.storage = StorageBench(cfg["storage_path"], cfg["storage_bytes"], cfg["storage_files"])
            except (OSError, ValueError) as exc:
                self.errors.append(f"checkpoint storage: {exc}")
        # Before the benches, alone on the node: DCGM's stress tests must not share the GPUs.
        if "dcgm" in tests:
            self.dcgm = run_diag(cfg.get("dcgm_diag_level", 1), cfg.get("dcgm_timeout_s", DCGM_TIMEOUT_S))
        try:
            dev = _open_device(cfg)
            count = dev.gpu_count()
            self.slowdown = dev.compute_slowdown()
        except Exception as exc:  # a node whose driver cannot answer fails with the reason
            self.errors.append(f"device: {exc}")
            return
        try:
            for i in range(count):
                try:
                    dev.telemetry(i)  # a GPU that fell off the bus cannot be certified, whatever the tests
                    device = dev.torch_device(i)
                    corruption = dev.result_corruption(i)
                    gpu = {"index": i, "device": device, "corruption": corruption}
                    if "gemm" in tests:
                        with computing_on(corruption):
                            gpu.update({dtype: GemmBench(device, dtype, cfg["gemm_size"], self.slowdown,
                                                         cfg["target_sample_s"]) for dtype in ("fp32", "bf16")})
                        gpu["known_answer"] = gpu_known_answers(device, cfg["gemm_size"], corruption)
                    if "memcpy" in tests:
                        gpu["memcpy"] = MemcpyBench(device, cfg["memcpy_bytes"])
                    self.gpus.append(gpu)
                except Exception as exc:
                    self.errors.append(f"gpu {i}: {exc}")
        finally:
            dev.close()

    def training_corruption(self) -> float | None:
        """The lab's one training rank per node computes with the node's GPUs: a GPU injected with
        wrong answers makes its gradients wrong too (the heaviest injection, if several)."""
        rates = [g["corruption"] for g in self.gpus if g["corruption"] is not None]
        return max(rates) if rates else None

    def sample(self) -> None:
        from aidc.burnin.known_answer import computing_on

        if self.storage is not None:
            try:
                self.storage.sample()
            except OSError as exc:  # a full or failing volume: that figure fails, the run goes on
                self.errors.append(f"checkpoint storage: {exc}")
                self.storage = None
        for g in list(self.gpus):
            try:
                with computing_on(g["corruption"]):
                    for key in BENCHES:
                        if key in g:
                            g[key].sample()
            except Exception as exc:  # e.g. a CUDA error mid-run: that GPU fails, the run goes on
                self.errors.append(f"gpu {g['index']}: {exc}")
                self.gpus.remove(g)

    def soak_all(self, seconds: float) -> None:
        """Hold each GPU's fp32 GEMM for `seconds`, recording its clocks (aidc.burnin.soak)."""
        from aidc.burnin.soak import sample_count, soak
        from aidc.burnin.timing import sync

        if not self.gpus or "gemm" not in self.tests:  # the soak's load is the GEMM bench
            return
        samples = sample_count(seconds)
        try:
            dev = _open_device(self.cfg)
            try:
                series = soak(dev, {g["index"]: g["fp32"].step for g in self.gpus}, seconds, samples,
                              sync=lambda: [sync(g["device"]) for g in self.gpus])
            finally:
                dev.close()
        except Exception as exc:  # a GPU lost or a driver hung mid-soak fails the node with the reason
            self.errors.append(f"soak: {exc}")
            return
        self.soak = {"seconds": seconds, "samples": samples, "series": {str(i): s for i, s in series.items()}}

    def results(self) -> tuple[list[dict], dict[str, float]]:
        gpus = []
        for g in self.gpus:
            try:
                entry = {"index": g["index"], "device": g["device"]}
                if "fp32" in g:
                    fp32, bf16 = g["fp32"].result().to_dict(), g["bf16"].result().to_dict()
                    known = {**g["known_answer"], "fingerprints": {**g["known_answer"]["fingerprints"],
                                                                   # the bench's own product, after the load
                                                                   "gemm_fp32_bench": fp32["result_digest"],
                                                                   "gemm_bf16_bench": bf16["result_digest"]}}
                    entry.update(gemm_fp32=fp32, gemm_bf16=bf16, known_answer=known)
                if "memcpy" in g:
                    entry["memcpy"] = g["memcpy"].result().to_dict()
                gpus.append(entry)
            except Exception as exc:
                self.errors.append(f"gpu {g['index']}: {exc}")
        metrics = {}
        if gpus and "gemm" in self.tests:
            metrics.update(gemm_fp32_tflops=min(g["gemm_fp32"]["tflops"] for g in gpus),
                           gemm_bf16_tflops=min(g["gemm_bf16"]["tflops"] for g in gpus))
        if gpus and "memcpy" in self.tests:
            metrics["memcpy_gbps"] = min(g["memcpy"]["gbps"] for g in gpus)
        if self.storage is not None:
            metrics.update(self.storage.result().metrics())
        return gpus, metrics


def _join_fabric(cfg: dict) -> None:
    """On the lab's netns fabric: move into this node's namespace before any socket exists,
    and let gloo use every rail (torch takes a comma-separated GLOO_SOCKET_IFNAME: one gloo
    device per rail, collectives spread over them in turn)."""
    if cfg.get("netns"):
        from aidc.lab.fabric import enter_netns

        enter_netns(cfg["netns"])
    ifnames = cfg.get("gloo_ifnames", "lo")
    if ifnames:  # none named: gloo finds the interface its host name resolves to
        os.environ["GLOO_SOCKET_IFNAME"] = ifnames


def _localise(cfg: dict, store, rows: list, node: str) -> dict | None:
    """Pair tests per rail when the fleet's largest all_reduce is below the trigger fraction."""
    from aidc.burnin.localise import distributed_measure, localise

    if not cfg.get("rails") or not rows:
        return None
    link = cfg["link_rate_gbit_s"]
    fleet_fraction = rows[-1]["busbw_gbps"] * 8 / link  # every rank holds the same (slowest-rank) row
    if fleet_fraction >= cfg["localise_below_fraction"]:
        return {"ran": False, "fleet_fraction": fleet_fraction}
    measure = distributed_measure(store, cfg["rank"], link, timeout_s=cfg["pair_timeout_s"],
                                  on_test=(lambda r, a, b: emit("pair", node=node, rail=r, a=a, b=b))
                                  if cfg["rank"] == 0 else None)
    found = localise(cfg["world"], cfg["rails"], measure, cfg["localise_tolerance"])
    return {"ran": True, "fleet_fraction": fleet_fraction, **found.to_dict(cfg["nodes"])}


def main(config_path: str) -> int:
    """The lab's way in: the config from a file, the result written to `result_path`."""
    cfg = json.loads(Path(config_path).read_text())
    return run_node(cfg, lambda result: write_atomic(cfg["result_path"], json.dumps(result), SHARED_MODE))


def run_node(cfg: dict, deliver) -> int:
    """Run this node's part of the burn-in; `deliver(result)` gets its raw results (a JSON object)
    before the final barrier. A scheduler's task (aidc.burnin.launch.node) delivers them to the
    run's store, so nothing of the run, its secret included, is written to the node's disk."""
    from aidc.burnin.suite import collectives_of, select

    t_start = time.monotonic()
    tests = select(cfg.get("tests"))
    _join_fabric(cfg)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(cfg.get("threads", 1))
    torch.set_num_interop_threads(1)
    from aidc.burnin.collectives import collective_sweep
    from aidc.burnin.known_answer import computing_on
    from aidc.burnin.train import run_ddp_training, run_fsdp_training, run_pipeline_training

    rank, world, node = cfg["rank"], cfg["world"], cfg["node"]
    timeout = timedelta(seconds=cfg["pg_timeout_s"])
    store = dist.TCPStore(cfg.get("store_host", "127.0.0.1"), cfg["store_port"], world_size=None, is_master=False,
                          timeout=timeout)
    if cfg.get("store_prefix"):  # the run's secret key prefix (the store itself has no authentication)
        store = dist.PrefixStore(cfg["store_prefix"], store)
    store.set(f"joined/{node}", "1")  # the runner names the nodes that never get this far
    backend = "nccl" if cfg.get("collective_device", "cpu").startswith("cuda") else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    emit("ready", node=node)
    phase_s = {"startup": time.monotonic() - t_start}
    t0 = time.monotonic()

    benches = NodeBenches(cfg)
    for round_no in range(cfg["repeats"]):
        for turn in range(world):
            if turn == rank:
                if round_no == 0:
                    benches.setup()
                benches.sample()
                emit("sampled", node=node, round=round_no)
            dist.barrier()
    if cfg.get("soak_s", 0) > 0:
        # Every node at once: clocks and heat are judged here, not throughput, and a rack's
        # power and cooling see the whole load as they will in training.
        benches.soak_all(cfg["soak_s"])
        dist.barrier()
    gpus, metrics = benches.results()
    phase_s["per_node"], t0 = time.monotonic() - t0, time.monotonic()

    device = cfg.get("collective_device", "cpu")
    collectives = {}
    for op in cfg.get("collectives", collectives_of(tests)):
        rows = collective_sweep(op, device, cfg["sizes"],
                                on_size=(lambda b, op=op: emit("collective", node=node, op=op, nbytes=b))
                                if rank == 0 else None)
        collectives[op] = [r.to_dict() for r in rows]
        phase_s[op], t0 = time.monotonic() - t0, time.monotonic()
    localisation = _localise(cfg, store, collectives.get("all_reduce", []), node)
    phase_s["localise"], t0 = time.monotonic() - t0, time.monotonic()
    on_step = (lambda mode: lambda s, l: emit("train", node=node, mode=mode, step=s, loss=l)) if rank == 0 else (
        lambda mode: None)
    ddp_parameters: dict = {}
    training, parallel = {}, {}
    if "train" in tests:
        with computing_on(benches.training_corruption()):
            training = run_ddp_training(device, cfg["train_steps"], on_step=on_step("ddp"),
                                        corrupt_after=cfg.get("corrupt_parameters", False),
                                        parameters_out=ddp_parameters).to_dict()
            phase_s["train_ddp"], t0 = time.monotonic() - t0, time.monotonic()
            for mode, run in (("fsdp", run_fsdp_training), ("pipeline", run_pipeline_training)):
                parallel[mode] = run(device, cfg["train_steps"], on_step=on_step(mode),
                                     reference=ddp_parameters).to_dict()
                phase_s[f"train_{mode}"], t0 = time.monotonic() - t0, time.monotonic()
    result = {"phase_s": phase_s, "node": node, "rank": rank, "tests": list(tests), "gpus": gpus, "metrics": metrics,
              "errors": benches.errors, "slowdown": benches.slowdown, "collectives": collectives,
              "training": training, "parallel": parallel, "localisation": localisation, "dcgm": benches.dcgm,
              "soak": benches.soak}
    deliver(result)
    # A barrier before tearing down: without it a rank can abort at exit (seen here with gloo).
    dist.barrier()
    dist.destroy_process_group()
    emit("done", node=node)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.stderr.write("usage: python -m aidc.burnin.worker CONFIG.json\n")
        sys.exit(2)
    code = main(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    # Exit without joining threads: a device call abandoned by TimedBackend (a hung driver)
    # would otherwise keep this process alive until the call returns, maybe never.
    os._exit(code)
