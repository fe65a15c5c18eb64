"""``segfast.check``: an engine against its fp32 eager reference, by the contract.

The contract (README, "Accuracy contract"): fp32 engines rel-L2 ≤ 1e-4; fp16/bf16 rel-L2 ≤ 1e-2
and no worse than 2× PyTorch's own error in that precision; masks agree on
≥ 99.5 % of pixels; NaN/Inf never pass. Masks are compared by agreement,
probabilities and logits by rel-L2 (and their argmax agreement is reported).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from segfast._warnings import quiet_torch_internals
from segfast.errors import InputError
from segfast.metrics import (
    FP32_MAX_REL,
    LOWP_FACTOR,
    LOWP_MAX_REL,
    MIN_MASK_AGREEMENT,
    Accuracy,
    compare,
)
from segfast.outputs import WithHead


@dataclass
class CheckReport:
    precision: str
    output: str
    accuracy: list[Accuracy] = field(default_factory=list)  # one per input set
    torch_lowp: list[Accuracy] = field(default_factory=list)  # PyTorch's own fp16/bf16 error
    passed: bool = True
    reason: str = ""

    @property
    def worst(self) -> Accuracy:
        return max(self.accuracy, key=lambda a: (a.nonfinite, a.rel_l2, -(a.mask_agreement or 1)))

    def as_dict(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "output": self.output,
            "passed": self.passed,
            "reason": self.reason,
            "accuracy": [a.as_dict() for a in self.accuracy],
            "torch_lowp": [a.as_dict() for a in self.torch_lowp],
        }

    def __str__(self) -> str:
        w = self.worst
        agree = (
            f", mask agreement {100 * w.mask_agreement:.3f}%"
            if w.mask_agreement is not None
            else ""
        )
        return (
            f"{'PASS' if self.passed else 'FAIL'} ({self.precision}, {self.output}): "
            f"rel-L2 {w.rel_l2:.3g}, max-abs {w.max_abs:.3g}{agree}, non-finite {w.nonfinite}"
            + (f" — {self.reason}" if self.reason else "")
        )


def _as_sets(inputs: Any) -> list[tuple[torch.Tensor, ...]]:
    if isinstance(inputs, torch.Tensor):
        return [(inputs,)]
    if not isinstance(inputs, Iterable) or type(inputs).__module__ == "numpy":
        raise InputError(
            f"inputs must be a tensor or an iterable of tensors / tuples of tensors, "
            f"got {type(inputs).__name__}"
        )
    sets = []
    for item in inputs:
        group = (item,) if isinstance(item, torch.Tensor) else tuple(item)
        bad = [type(t).__name__ for t in group if not isinstance(t, torch.Tensor)]
        if bad:
            raise InputError(f"inputs must be torch tensors, got {', '.join(sorted(set(bad)))}")
        sets.append(group)
    return sets


def _eval_mode(model: nn.Module) -> nn.Module:
    """``model`` in eval mode; ``ExportedProgram.module()`` refuses ``eval()`` but was
    exported in the mode it runs in (segfast exports in eval mode)."""
    try:
        return model.eval()
    except NotImplementedError:
        return model


def check(
    engine: Any,
    reference_model: nn.Module,
    inputs: torch.Tensor | Iterable[torch.Tensor | Sequence[torch.Tensor]],
) -> CheckReport:
    """Run ``engine`` and the fp32 eager ``reference_model`` on ``inputs``; judge by the contract.

    ``inputs`` is one tensor, or an iterable of input sets (tensors or tuples).
    """
    sets = _as_sets(inputs)
    output = engine.output
    precision = engine.precision
    ref_model = WithHead(_eval_mode(reference_model), output, engine.info.threshold)
    lowp_model = None
    if precision != "fp32":
        with quiet_torch_internals():
            lowp_model = copy.deepcopy(ref_model).to(engine.dtype)
    report = CheckReport(precision, output)
    reasons: list[str] = []
    for s in sets:
        with torch.inference_mode():
            ref = ref_model(*(t.float() if t.is_floating_point() else t for t in s))
            out = engine(*s)
        acc = compare(out, ref)
        report.accuracy.append(acc)
        if not acc.finite:
            reasons.append(f"{acc.nonfinite} non-finite values")
        integer = not out.is_floating_point()
        if integer:
            if acc.mask_agreement is not None and acc.mask_agreement < MIN_MASK_AGREEMENT:
                reasons.append(
                    f"mask agreement {100 * acc.mask_agreement:.3f}% < {100 * MIN_MASK_AGREEMENT}%"
                )
            continue
        if precision == "fp32":
            if acc.rel_l2 > FP32_MAX_REL:
                reasons.append(f"rel-L2 {acc.rel_l2:.3g} > {FP32_MAX_REL:g}")
        else:
            try:
                with torch.inference_mode():
                    lowp = lowp_model(
                        *(t.to(engine.dtype) if t.is_floating_point() else t for t in s)
                    )
            except RuntimeError as exc:  # e.g. a constant the model makes in fp32 meets fp16
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                reasons.append(
                    f"PyTorch's own {precision} run of the model fails ({first}), so the "
                    f"{precision} bound ({LOWP_FACTOR}× PyTorch's own error) cannot be computed"
                )
                continue
            tacc = compare(lowp, ref)
            report.torch_lowp.append(tacc)
            bound = max(LOWP_FACTOR * tacc.rel_l2, 1e-6)
            if acc.rel_l2 > LOWP_MAX_REL:
                reasons.append(f"rel-L2 {acc.rel_l2:.3g} > {LOWP_MAX_REL:g}")
            elif acc.rel_l2 > bound:
                reasons.append(
                    f"rel-L2 {acc.rel_l2:.3g} > {LOWP_FACTOR}× PyTorch's own {tacc.rel_l2:.3g}"
                )
        if (
            acc.mask_agreement is not None
            and output != "logits"
            and acc.mask_agreement < MIN_MASK_AGREEMENT
        ):
            reasons.append(f"argmax agreement {100 * acc.mask_agreement:.3f}% too low")
    report.passed = not reasons
    report.reason = "; ".join(dict.fromkeys(reasons))
    return report
