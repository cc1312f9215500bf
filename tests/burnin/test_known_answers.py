"""Known-answer checks for silent data corruption: every GPU computes the same seeded GEMMs and
training step; a GPU whose result bytes differ from its peers' (or from the stored known answer)
fails by index, whatever DDP's parameter-digest vote says."""

import json

import pytest
import torch

from aidc.burnin import answers
from aidc.burnin import known_answer as ka
from aidc.burnin.gemm import GemmBench
from aidc.burnin.judge import compare_digests, judge
from aidc.burnin.report import BurninReport, NodeResult
from aidc.device.sim import SimBackend, create_node, inject
from aidc.errors import BurninError, DeviceError

CHECKS = {"gemm_fp32", "gemm_bf16", "gemm_fp16", "train_step"}


def _answers(node_dir, gpus, size=32):
    dev = SimBackend(node_dir)
    try:
        return [ka.gpu_known_answers("cpu", size, dev.result_corruption(i)) for i in range(gpus)]
    finally:
        dev.close()


def test_sdc_injected_on_one_simulated_gpu_changes_every_fingerprint_of_that_gpu_only(tmp_path):
    node = create_node(tmp_path / "n", "n", 3)
    inject(node, "sdc", gpu=1)
    healthy0, corrupt, healthy2 = _answers(node, 3)
    assert set(healthy0["fingerprints"]) == CHECKS
    assert healthy0["fingerprints"] == healthy2["fingerprints"]
    for check in CHECKS:
        assert corrupt["fingerprints"][check] != healthy0["fingerprints"][check], check
    assert healthy0["key"] == corrupt["key"]  # same host, same libraries: one comparison group


def test_clear_restores_correct_results(tmp_path):
    node = create_node(tmp_path / "n", "n", 2)
    inject(node, "sdc", gpu=0, rate=0.5)
    inject(node, "clear")
    a, b = _answers(node, 2)
    assert a["fingerprints"] == b["fingerprints"]


@pytest.mark.parametrize("rate,n", [(None, 16), (None, 64), (0.01, 64), (0.25, 16), (0.5, 32), (1.0, 8)])
def test_an_injected_rate_makes_that_fraction_of_each_gemm_result_wrong_and_at_least_one(rate, n):
    a, b = torch.randn(n, n), torch.randn(n, n)
    clean = a @ b
    with ka.corrupted_results(0.0 if rate is None else rate):
        dirty = a @ b
        out = torch.empty_like(a)
        torch.matmul(a, b, out=out)  # the GEMM bench's form
    expected = 1 if rate is None else max(1, round(rate * n * n))
    assert int((dirty != clean).sum()) == expected
    assert int((out != clean).sum()) == expected


def test_the_gemm_bench_fingerprints_its_results_and_sees_the_corruption(tmp_path):
    with ka.corrupted_results(0.0):
        dirty = GemmBench("cpu", "fp32", 32, target_sample_s=0.0)
        dirty.sample()
    clean = GemmBench("cpu", "fp32", 32, target_sample_s=0.0)
    clean.sample()
    assert clean.result().result_digest != dirty.result().result_digest
    assert clean.result().results_stable and dirty.result().results_stable


def test_injecting_sdc_refuses_a_rate_outside_zero_to_one(tmp_path):
    node = create_node(tmp_path / "n", "n", 1)
    for rate in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(DeviceError, match="rate"):
            inject(node, "sdc", rate=rate)


def test_cli_injects_sdc_on_the_named_gpu(tmp_path, aidc_cli):
    node = create_node(tmp_path / "n", "n", 2)
    done = aidc_cli("device", "inject", str(node), "sdc", "--gpu", "1", "--rate", "0.25", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["gpu"] == 1
    dev = SimBackend(node)
    assert (dev.result_corruption(0), dev.result_corruption(1)) == (None, 0.25)
    bad = aidc_cli("device", "inject", str(node), "sdc", "--rate", "2")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "rate" in bad.stderr


# --- judging ------------------------------------------------------------------------------------

TRAINED = {"loss_before": 1.0, "loss_after": 0.2, "param_digest": "a" * 64, "steps": 10}
SHARDED = {**TRAINED, "param_digest": "f" * 64, "max_abs_diff_vs_ddp": 6e-8}
KEY = "sim|x86_64|torch=2|n=32"


def gpu(index, fingerprint="good", key=KEY):
    return {"index": index, "known_answer": {"key": key, "fingerprints": {c: f"{c}-{fingerprint}" for c in CHECKS}}}


def fleet(gpus_by_node, model="SIM"):
    return {name: NodeResult(name, model, False, metrics={"gemm_fp32_tflops": 1.0, "gemm_bf16_tflops": 1.0,
                                                          "memcpy_gbps": 10.0},
                             gpus=gpus, training=dict(TRAINED), parallel={"fsdp": dict(SHARDED),
                                                                          "pipeline": dict(SHARDED)})
            for name, gpus in gpus_by_node.items()}


def run(nodes, known=None):
    return judge(nodes, {}, 0.25, 0.1, known_answers=known or {})


def test_one_gpu_with_wrong_results_fails_its_node_by_index_while_the_digest_vote_passes():
    nodes = fleet({"a": [gpu(0), gpu(1)], "b": [gpu(0), gpu(1, "flipped")], "c": [gpu(0), gpu(1)]})
    # DDP averaged b's wrong gradient into every rank: the parameter digests all agree.
    assert compare_digests({n: r.training["param_digest"] for n, r in nodes.items()}) == {}
    run(nodes)
    report = BurninReport("t", nodes, {})
    assert report.verdicts == {"a": "pass", "b": "fail", "c": "pass"}
    assert [n.failed_gpus for n in nodes.values()] == [[], [1], []]
    assert [(n["node"], n["failed_gpus"]) for n in report.to_dict()["nodes"]] == [("a", []), ("b", [1]), ("c", [])]
    assert len(nodes["b"].reasons) == len(CHECKS)  # one reason per check that differs


def test_a_stored_known_answer_outranks_the_majority():
    nodes = fleet({"a": [gpu(0, "old")], "b": [gpu(0, "old")], "c": [gpu(0)]})
    run(nodes, {KEY: {c: f"{c}-good" for c in CHECKS}})
    assert [n.failed_gpus for n in nodes.values()] == [[0], [0], []]
    assert all("stored known answer" in r for r in nodes["a"].reasons)


def test_a_stored_answer_for_another_key_is_not_used():
    nodes = fleet({"a": [gpu(0)], "b": [gpu(0)]})
    run(nodes, {"other|key": {c: "x" for c in CHECKS}})
    assert all(n.passed for n in nodes.values())


def test_without_a_majority_every_disagreeing_gpu_fails():
    nodes = fleet({"a": [gpu(0, "one")], "b": [gpu(0, "two")]})
    run(nodes)
    assert [n.failed_gpus for n in nodes.values()] == [[0], [0]]


def test_gpus_of_different_models_or_keys_are_not_compared():
    nodes = {**fleet({"a": [gpu(0)]}), **fleet({"b": [gpu(0, "other")]}, model="H100")}
    nodes.update(fleet({"c": [gpu(0, "third", key="sim|other-host")]}))
    run(nodes)
    assert all(n.passed for n in nodes.values())
    assert all(any("no stored known answer and no other GPU" in note for note in n.notes) for n in nodes.values())


def test_a_gpu_whose_known_answer_check_did_not_run_fails_that_gpu():
    nodes = fleet({"a": [gpu(0), {"index": 1}], "b": [gpu(0)]})
    run(nodes)
    assert nodes["a"].failed_gpus == [1] and nodes["b"].passed


# --- the stored known answers ------------------------------------------------------------------

def test_recording_keeps_only_answers_every_gpu_agreed_on_and_loads_back(tmp_path):
    nodes = fleet({"a": [gpu(0), gpu(1)], "b": [gpu(0)]})
    nodes.update(fleet({"c": [gpu(0, "one", key="k2")], "d": [gpu(0, "two", key="k2")]}))
    path = tmp_path / "known_answers.yaml"
    recorded, skipped = answers.record(path, nodes)
    assert recorded == [KEY] and skipped == ["k2"]
    assert answers.load(path) == {KEY: {c: f"{c}-good" for c in CHECKS}}
    assert answers.load(tmp_path / "missing.yaml") == {}


@pytest.mark.parametrize("text", ["[1, 2]", "version: 1\nanswers: [x]", "version: 1\nanswers: {k: {c: 3}}",
                                  "version: 9\nanswers: {}", "{{{"])
def test_a_known_answers_file_that_is_not_the_format_is_a_one_line_error(tmp_path, text):
    path = tmp_path / "ka.yaml"
    path.write_text(text)
    with pytest.raises(BurninError, match=str(path)) as info:
        answers.load(path)
    assert "\n" not in str(info.value)


def test_the_packaged_known_answers_file_loads():
    assert isinstance(answers.load(answers.PACKAGED), dict)


def _matmul_failing(monkeypatch, dtype, message):
    real = torch.matmul

    def matmul(a, b, *args, **kwargs):
        if a.dtype == dtype:
            raise RuntimeError(message)
        return real(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "matmul", matmul)


def test_a_device_without_fp16_gemm_is_checked_in_the_other_dtypes_and_says_so(monkeypatch):
    _matmul_failing(monkeypatch, torch.float16, '"addmm_impl_cpu_" not implemented for \'Half\'')
    result = ka.gpu_known_answers("cpu", 16)
    assert set(result["fingerprints"]) == CHECKS - {"gemm_fp16"} and len(result["unsupported"]) == 1
    nodes = fleet({"a": [{"index": 0, "known_answer": result}]})
    run(nodes)
    assert nodes["a"].passed and any("GPU 0: not checked: gemm_fp16" in note for note in nodes["a"].notes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_gemm_that_raises_in_a_required_dtype_is_an_error_not_a_skip(monkeypatch, dtype):
    _matmul_failing(monkeypatch, dtype, "CUDA error: an illegal memory access was encountered")
    with pytest.raises(RuntimeError, match="illegal memory access"):
        ka.gpu_known_answers("cpu", 16)


def test_a_corrupted_gpu_corrupts_a_ddp_run_too_which_is_what_the_digest_vote_cannot_see(tmp_path):
    import torch.distributed as dist

    from aidc.burnin.train import run_ddp_training

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        clean = run_ddp_training("cpu", 3)
        with ka.computing_on(0.0):
            dirty = run_ddp_training("cpu", 3)
    finally:
        dist.destroy_process_group()
    # Every rank of a real run would hold `dirty`'s parameters: the wrong gradient was averaged in.
    assert dirty.param_digest != clean.param_digest
    assert dirty.loss_after < dirty.loss_before  # and the loss still falls: nothing looks wrong
