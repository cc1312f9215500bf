"""Knowledge distillation: a much smaller student trained on the teacher's softened outputs."""

from __future__ import annotations

from torch import nn

from aidc.compress.measure import count_params
from aidc.errors import CompressError


def distill(case, model: nn.Module, *, max_param_ratio: float = 0.25, width_divisor: int = 4,
            epochs: int | None = None):
    from aidc.compress.cases import make_mlp, train_classifier
    from aidc.compress.variant import Variant

    if not isinstance(model, nn.Sequential) or not hasattr(case, "data"):
        raise CompressError(f"distillation is implemented for the MLP classifier, not {case.name}")
    widths = [model[0].in_features] + [m.out_features for m in model if type(m) is nn.Linear]
    student_widths = (widths[0], *(max(8, w // width_divisor) for w in widths[1:-1]), widths[-1])
    student = make_mlp(student_widths, case.seed + 1)
    ratio = count_params(student) / count_params(model)
    if ratio > max_param_ratio:
        raise CompressError(f"student would have {ratio:.2f} of the teacher's parameters (max {max_param_ratio})")
    teacher = model.eval()
    train_classifier(student, case.data.x_train, case.data.y_train, epochs=epochs or case.epochs,
                     seed=case.seed + 1, teacher=teacher, lr=2e-3)
    return Variant("distill", f"distilled student {'-'.join(map(str, student_widths))}", "distillation",
                   student, {"student_widths": list(student_widths), "param_ratio": round(ratio, 4),
                             "loss": "0.7 KL(T=4) + 0.3 CE"}, note=f"{ratio:.1%} of the teacher's parameters")
