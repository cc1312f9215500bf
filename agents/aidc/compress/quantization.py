"""Quantization: int8 dynamic, int8 static with calibration, fp16/bf16, torchao int8.

Which API, and why. torchao is the maintained home of PyTorch quantization and is used for
the int8 weight-only and int8 dynamic-activation rows. On this CPU (AVX2, no VNNI/AMX)
torchao's int8 dynamic-activation path has no fast eager kernel: a MiniLM batch of 32 ran
~20x slower than fp32, and `torch.compile` of it took over 3 minutes on 2 cores. The only
fast CPU int8 kernels with int8 activations here are FBGEMM's, reached through
`torch.ao.nn.quantized` (deprecated in favour of torchao but still shipped in torch 2.13),
so the int8 dynamic and int8 static rows use those, with the deprecation warning silenced
locally. torch.ao's dynamic linear quantizes activations to 7 bits (reduce_range) on x86
to rule out int16 saturation on AVX2; on MiniLM that cost the cosine to fp32 (0.976 with
per-channel weights) while 8-bit activations gave 0.993; on the digits MLP 8-bit activations
saturate. So the dynamic variant tries both on calibration data and keeps the closer one. Smoothing
activation outliers into the weights (SmoothQuant, alpha 0.5-0.85) made it worse here.
"""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager

import torch
from torch import nn

from aidc.compress.variant import Variant, record_linear_ranges, replace_linears


@contextmanager
def _quiet_torch_ao():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization.*")
        warnings.filterwarnings("ignore", message=".*quantize_per.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


def _full_range_dynamic_class():
    import torch.ao.nn.quantized.dynamic as nnqd

    class FullRangeDynamicLinear(nnqd.Linear):
        """fbgemm dynamic linear with 8-bit activations (torch.ao's default is 7-bit on x86)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params, reduce_range=False)
            return y.to(x.dtype)

    return FullRangeDynamicLinear


def _dynamic_int8(model: nn.Module, full_range: bool) -> nn.Module:
    import torch.ao.nn.quantized.dynamic as nnqd
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with _quiet_torch_ao():
        q = quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
    if full_range:
        cls = _full_range_dynamic_class()
        for mod in q.modules():
            if type(mod) is nnqd.Linear:
                mod.__class__ = cls
    return q


def _calibration_error(case, reference: nn.Module, candidate: nn.Module) -> float:
    with torch.inference_mode():
        return sum(float((case.forward(candidate, b) - case.forward(reference, b)).abs().mean())
                   for b in case.calibration())


def int8_dynamic(case, model: nn.Module, *, full_range: bool | None = None) -> Variant:
    """Weights int8 per output channel ahead of time; activations quantized per batch at run time.

    full_range=None measures both activation ranges on the calibration data and keeps the
    closer one: 8-bit activations can saturate fbgemm's int16 accumulation on AVX2 (the
    digits MLP's logits moved by up to 1.8 that way), 7-bit ones lose resolution (MiniLM).
    """
    if full_range is None:
        candidates = {fr: _dynamic_int8(model, fr) for fr in (True, False)}
        errors = {fr: _calibration_error(case, model, q) for fr, q in candidates.items()}
        full_range = min(errors, key=errors.get)
        q = candidates[full_range]
    else:
        q = _dynamic_int8(model, full_range)
    return Variant("int8-dynamic", "int8 dynamic", "quantization", q,
                   {"weights": "int8 per-channel", "activations": "8-bit" if full_range else "7-bit"},
                   note="fbgemm kernels via torch.ao (deprecated; torchao has no fast eager CPU path here); "
                        f"{'8' if full_range else '7'}-bit activations chosen on calibration data")


def _act_qparams(lo: float, hi: float, reduce_range: bool) -> tuple[float, int]:
    qmax = 127 if reduce_range else 255
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) / qmax, 1e-8)
    zero_point = int(min(qmax, max(0, round(-lo / scale))))
    return scale, zero_point


class StaticInt8Linear(nn.Module):
    """fbgemm int8 linear whose input and output scales were fixed by calibration."""

    def __init__(self, linear: nn.Linear, stats: dict):
        super().__init__()
        import torch.ao.nn.quantized as nnq

        w = linear.weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8).double()
        with _quiet_torch_ao():
            qweight = torch.quantize_per_channel(w, scales, torch.zeros(len(scales), dtype=torch.long), 0,
                                                 torch.qint8)
            self.inner = nnq.Linear(linear.in_features, linear.out_features, dtype=torch.qint8)
        bias = linear.bias.detach().float() if linear.bias is not None else None
        self.inner.set_weight_bias(qweight, bias)
        out_scale, out_zp = _act_qparams(stats["out_min"], stats["out_max"], reduce_range=False)
        self.inner.scale, self.inner.zero_point = out_scale, out_zp
        in_scale, in_zp = _act_qparams(stats["in_min"], stats["in_max"], reduce_range=True)
        self.in_scale, self.in_zero_point = in_scale, in_zp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.quantize_per_tensor(x.float().contiguous(), self.in_scale, self.in_zero_point, torch.quint8)
        return self.inner(q).dequantize()

    def get_extra_state(self):  # the calibrated input scale travels with the weights
        return {"in_scale": self.in_scale, "in_zero_point": self.in_zero_point}

    def set_extra_state(self, state) -> None:
        self.in_scale, self.in_zero_point = state["in_scale"], state["in_zero_point"]


def int8_static(case, model: nn.Module) -> Variant:
    """Weights and activations int8, activation ranges measured on calibration data beforehand."""
    m = copy.deepcopy(model).eval()
    batches = case.calibration()
    stats = record_linear_ranges(m, batches, case.forward)
    replace_linears(m, lambda name, lin: StaticInt8Linear(lin, stats[name]) if name in stats else lin)
    return Variant("int8-static", "int8 static (calibrated)", "quantization", m,
                   {"calibration_batches": len(batches), "observer": "min/max"},
                   note="fbgemm kernels via torch.ao.nn.quantized; per-tensor activations, per-channel weights")


class CastWrapper(nn.Module):
    """Runs the inner model in a lower float precision; float inputs are cast in, outputs back."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.inner, self.dtype = inner.to(dtype), dtype

    def forward(self, *args, **kwargs):
        cast = lambda v: v.to(self.dtype) if torch.is_tensor(v) and v.is_floating_point() else v  # noqa: E731
        out = self.inner(*[cast(a) for a in args], **{k: cast(v) for k, v in kwargs.items()})
        if torch.is_tensor(out):
            return out.float()
        if hasattr(out, "last_hidden_state"):
            out.last_hidden_state = out.last_hidden_state.float()
        return out


def half_precision(case, model: nn.Module, dtype_name: str) -> Variant:
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    return Variant(dtype_name, dtype_name, "quantization", CastWrapper(copy.deepcopy(model).eval(), dtype),
                   {"dtype": dtype_name}, note="weights and compute in " + dtype_name)


def torchao_int8(case, model: nn.Module, *, dynamic_activations: bool) -> Variant:
    from aidc.compress.cases import quiet_library_logs

    quiet_library_logs()
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

    m = copy.deepcopy(model).eval()
    quantize_(m, Int8DynamicActivationInt8WeightConfig() if dynamic_activations else Int8WeightOnlyConfig())
    if dynamic_activations:
        return Variant("int8-dynamic-torchao", "int8 dynamic (torchao)", "quantization", m,
                       {"api": "torchao.quantize_"}, note="no fast eager CPU kernel on AVX2: slow by design here")
    return Variant("int8-weight-only", "int8 weight-only (torchao)", "quantization", m,
                   {"api": "torchao.quantize_"}, note="int8 weights, float activations")
