"""Each technique on a tiny model: really smaller on disk, outputs within a stated tolerance."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from aidc.compress import distillation, fusion, pruning, quantization
from aidc.compress.measure import count_params, linear_bytes, model_bytes
from aidc.errors import CompressError


def _logits(case, model):
    with torch.inference_mode():
        return case.forward(model, case.data.x_test)


def _agreement(case, model) -> float:
    return float((_logits(case, model).argmax(-1) == _logits(case, case.model).argmax(-1)).float().mean())


# ---------------------------------------------------------------- pruning

def test_magnitude_pruning_zeroes_that_fraction_and_the_sparse_file_is_smaller(tiny_digits):
    v = pruning.magnitude_prune(tiny_digits, tiny_digits.model, 0.7, finetune_steps=1)
    for mod in v.model.modules():
        if type(mod) is nn.Linear:
            assert abs(float((mod.weight == 0).float().mean()) - 0.7) < 0.02
    dense = model_bytes(tiny_digits.model)
    assert model_bytes(v.model, v.to_disk) < 0.6 * dense
    # tolerance: 70% of weights gone, one fine-tune epoch: accuracy within 5 points
    base = tiny_digits.evaluate(tiny_digits.model)["accuracy_pct"]
    assert tiny_digits.evaluate(v.model)["accuracy_pct"] >= base - 5


def test_sparse_storage_round_trips_exactly(tiny_digits):
    v = pruning.magnitude_prune(tiny_digits, tiny_digits.model, 0.5, finetune_steps=0)
    restored = pruning.dense_from_sparse(pruning.sparse_state(v.model))
    for key, t in v.model.state_dict().items():
        assert torch.equal(restored[key], t)


def test_structured_pruning_shrinks_mlp_tensors_and_keeps_accuracy(tiny_digits):
    v = pruning.structured_prune(tiny_digits, tiny_digits.model, 0.5, finetune_steps=3)
    shapes = [tuple(m.weight.shape) for m in v.model.modules() if type(m) is nn.Linear]
    assert shapes == [(128, 64), (128, 128), (10, 128)]
    assert count_params(v.model) < 0.45 * count_params(tiny_digits.model)
    assert model_bytes(v.model) < 0.5 * model_bytes(tiny_digits.model)
    base = tiny_digits.evaluate(tiny_digits.model)["accuracy_pct"]
    assert tiny_digits.evaluate(v.model)["accuracy_pct"] >= base - 5  # tolerance: 5 points


def test_structured_pruning_removes_bert_heads_and_ffn_rows(tiny_bert):
    v = pruning.structured_prune(tiny_bert, tiny_bert.model, 0.5, finetune_steps=2)
    for layer in v.model.encoder.layer:
        assert layer.attention.self.query.weight.shape == (16, 32)  # 2 of 4 heads of size 8
        assert layer.attention.self.value.weight.shape == (16, 32)
        assert layer.attention.output.dense.weight.shape == (32, 16)
        assert layer.intermediate.dense.weight.shape == (32, 32)
        assert layer.output.dense.weight.shape == (32, 32)
    assert linear_bytes(v.model) < 0.6 * linear_bytes(tiny_bert.model)
    emb = tiny_bert.forward(v.model, tiny_bert.batch(3))
    assert emb.shape == (3, 32) and torch.isfinite(emb).all()


def test_structured_pruning_refuses_other_architectures(tiny_digits):
    with pytest.raises(CompressError, match="MLPs and BERT"):
        pruning.structured_prune(tiny_digits, nn.Conv2d(1, 2, 3), 0.5, finetune_steps=0)


def test_pruning_rejects_sparsity_outside_zero_one(tiny_digits):
    with pytest.raises(CompressError):
        pruning.magnitude_prune(tiny_digits, tiny_digits.model, 1.5, finetune_steps=0)
    with pytest.raises(CompressError):
        pruning.structured_prune(tiny_digits, tiny_digits.model, 1.5, finetune_steps=0)


# ---------------------------------------------------------------- quantization

def test_int8_dynamic_stores_linear_weights_in_a_quarter_and_keeps_predictions(tiny_digits):
    v = quantization.int8_dynamic(tiny_digits, tiny_digits.model)
    # per output row torch stores a float64 scale and an int64 zero point, and biases stay fp32
    assert linear_bytes(v.model) < linear_bytes(tiny_digits.model) / 3
    assert count_params(v.model) == count_params(tiny_digits.model)       # same weights, fewer bits
    assert _agreement(tiny_digits, v.model) >= 0.97                       # tolerance: 3% of predictions
    assert torch.allclose(_logits(tiny_digits, v.model), _logits(tiny_digits, tiny_digits.model), atol=0.25)


def test_int8_dynamic_bert_embeddings_stay_close(tiny_bert):
    v = quantization.int8_dynamic(tiny_bert, tiny_bert.model)
    # 32-wide rows: the 16 bytes of scale and zero point per row weigh as much as the int8 row
    assert linear_bytes(v.model) < linear_bytes(tiny_bert.model) / 1.5
    assert tiny_bert.evaluate(v.model)["cosine_mean"] >= 0.98  # tolerance: cosine 0.98 on a random 32-wide BERT


def test_int8_static_uses_calibrated_scales_and_is_smaller(tiny_digits):
    v = quantization.int8_static(tiny_digits, tiny_digits.model)
    wrapped = [m for m in v.model.modules() if isinstance(m, quantization.StaticInt8Linear)]
    assert len(wrapped) == 3 and all(m.in_scale > 0 for m in wrapped)
    assert model_bytes(v.model) < model_bytes(tiny_digits.model) / 3
    assert _agreement(tiny_digits, v.model) >= 0.95  # tolerance: 5% of predictions


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_halves_the_bytes_and_outputs_stay_close(tiny_digits, dtype):
    v = quantization.half_precision(tiny_digits, tiny_digits.model, dtype)
    ratio = model_bytes(v.model) / model_bytes(tiny_digits.model)
    assert 0.45 < ratio < 0.6
    atol = 0.05 if dtype == "fp16" else 0.3  # bf16 keeps 8 mantissa bits
    assert torch.allclose(_logits(tiny_digits, v.model), _logits(tiny_digits, tiny_digits.model), atol=atol)


def test_torchao_weight_only_int8_is_smaller_and_close(tiny_digits):
    v = quantization.torchao_int8(tiny_digits, tiny_digits.model, dynamic_activations=False)
    assert model_bytes(v.model) < model_bytes(tiny_digits.model) / 2.5
    assert _agreement(tiny_digits, v.model) >= 0.97


# ---------------------------------------------------------------- distillation and fusion

def test_distilled_student_has_at_most_a_quarter_of_the_parameters(tiny_digits):
    v = distillation.distill(tiny_digits, tiny_digits.model, epochs=10)
    assert count_params(v.model) <= 0.25 * count_params(tiny_digits.model)
    assert model_bytes(v.model) < model_bytes(tiny_digits.model) / 3
    base = tiny_digits.evaluate(tiny_digits.model)["accuracy_pct"]
    assert tiny_digits.evaluate(v.model)["accuracy_pct"] >= base - 8  # tolerance: 8 points for a 64-wide student


def test_distillation_refuses_a_student_above_the_parameter_cap(tiny_digits):
    with pytest.raises(CompressError, match="teacher's parameters"):
        distillation.distill(tiny_digits, tiny_digits.model, width_divisor=1)


def test_weight_average_of_identical_checkpoints_is_that_checkpoint(tiny_digits):
    fused = fusion.average_weights([copy.deepcopy(tiny_digits.model) for _ in range(3)])
    assert torch.allclose(_logits(tiny_digits, fused), _logits(tiny_digits, tiny_digits.model), atol=1e-6)


def test_weight_average_refuses_different_architectures(tiny_digits):
    small = pruning.structured_prune(tiny_digits, tiny_digits.model, 0.5, finetune_steps=0).model
    with pytest.raises(CompressError):
        fusion.average_weights([tiny_digits.model, small])


def test_fusion_variants_average_and_ensemble_fine_tunes(tiny_digits):
    avg, ens = fusion.fusion_variants(tiny_digits, tiny_digits.model, count=2, steps=1)
    assert count_params(avg.model) == count_params(tiny_digits.model)
    assert count_params(ens.model) == 2 * count_params(tiny_digits.model)
    members = [_logits(tiny_digits, m) for m in ens.model.members]
    assert torch.allclose(_logits(tiny_digits, ens.model), (members[0] + members[1]) / 2, atol=1e-5)
    base = tiny_digits.evaluate(tiny_digits.model)["accuracy_pct"]
    assert tiny_digits.evaluate(avg.model)["accuracy_pct"] >= base - 3
    with pytest.raises(CompressError, match="at least 2"):
        fusion.fine_tunes(tiny_digits, tiny_digits.model, 1, 1)
