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
    INT8_MAX_METRIC_DROP,
    INT8_MAX_REL,
    INT8_MIN_AGREEMENT,
    LOWP_FACTOR,
    LOWP_MAX_REL,
    MIN_MASK_AGREEMENT,
    Accuracy,
    class_masks,
    compare,
    segmentation_score,
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
    # int8: class-mask agreement per input set, and with labels (model score, engine score)
    agreement: list[float] = field(default_factory=list)
    metric: tuple[float, float] | None = None

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
            "agreement": list(self.agreement),
            "metric": list(self.metric) if self.metric is not None else None,
        }

    def __str__(self) -> str:
        w = self.worst
        if self.agreement:
            agree = f", mask agreement {100 * min(self.agreement):.3f}%"
        elif w.mask_agreement is not None:
            agree = f", mask agreement {100 * w.mask_agreement:.3f}%"
        else:
            agree = ""
        if self.metric is not None:
            agree += f", task metric {self.metric[1]:.4f} (model {self.metric[0]:.4f})"
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
    *,
    labels: Iterable[torch.Tensor] | None = None,
    min_agreement: float = INT8_MIN_AGREEMENT,
    max_metric_drop: float = INT8_MAX_METRIC_DROP,
) -> CheckReport:
    """Run ``engine`` and the fp32 eager ``reference_model`` on ``inputs``; judge by the contract.

    ``inputs`` is one tensor, or an iterable of input sets (tensors or tuples).
    int8 engines are judged by the int8 contract: class masks agree on at least
    ``min_agreement`` of the pixels (outputs that are not class maps: rel-L2 at most
    5 %), and with ``labels`` (one label mask per input set, N×H×W class ids) the
    task metric — Dice for binary, mIoU otherwise — drops by at most ``max_metric_drop``.
    Use inputs the engine was not calibrated on.
    """
    sets = _as_sets(inputs)
    if engine.precision == "int8":
        return _check_int8(engine, reference_model, sets, labels, min_agreement, max_metric_drop)
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
            out = _run_at_its_batch(engine, s)
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
                lowp = _lowp_run(lowp_model, s, engine.dtype)
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
                own = f"PyTorch's own {precision} run: {tacc.rel_l2:.3g}"
                if tacc.rel_l2 > LOWP_MAX_REL:  # the model, not the engine: say so
                    own += f" — the model itself is not accurate to {LOWP_MAX_REL:g} in {precision}"
                reasons.append(f"rel-L2 {acc.rel_l2:.3g} > {LOWP_MAX_REL:g} ({own})")
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


def _lowp_run(lowp_model: nn.Module, s: tuple[torch.Tensor, ...], dtype: torch.dtype) -> Any:
    """PyTorch's own run of the model in ``dtype`` (its weights cast, floating inputs
    cast). A model that makes fp32 values itself — ``x.float() / 255`` of uint8 frames —
    fails there (fp32 meets fp16 weights) and runs again under autocast to ``dtype``,
    which casts such values where they meet the weights (segfast's engines cast them
    where they are made)."""
    inputs = tuple(t.to(dtype) if t.is_floating_point() else t for t in s)
    try:
        with torch.inference_mode():
            return lowp_model(*inputs)
    except RuntimeError:
        device = next((t.device.type for t in s), "cpu")
        with torch.inference_mode(), torch.autocast(device, dtype=dtype):
            return lowp_model(*inputs)


def _run_at_its_batch(engine: Any, s: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``engine(*s)``; a set smaller than a dynamic batch's proven minimum (export
    proves a dynamic batch from 2; batch 1 is admitted only after the int8 build, which
    judges the engine on the held-out sets first) runs repeated up to that minimum and
    is judged on its own rows (each image's result does not depend on the others')."""
    specs = getattr(engine.info, "inputs", None) or ()  # segfast.quantize's has none
    lo = max((spec.dynamic.get("batch", (1, 1))[0] for spec in specs), default=1)
    n = s[0].shape[0] if s and s[0].dim() >= 1 else lo
    if n >= lo or n == 0:
        return engine(*s)
    reps = -(-lo // n)
    grown = tuple(t.repeat(reps, *([1] * (t.dim() - 1))) if t.dim() >= 1 else t for t in s)
    return engine(*grown)[:n]


def _label_mask(t: Any, shape: torch.Size, i: int) -> torch.Tensor:
    """Label mask ``i`` as class ids of the mask's ``shape`` (N×H×W; an H×W mask for
    N = 1 too). A mask of another shape — transposed, at another resolution — or of
    non-integer values is refused: reshaped, it would score scrambled pixels and the
    metric guard would pass on a meaningless number."""
    y = torch.as_tensor(t)
    if y.dim() == len(shape) - 1 and shape[0] == 1:
        y = y.unsqueeze(0)
    if tuple(y.shape) != tuple(shape):
        raise InputError(
            f"labels[{i}] has shape {tuple(y.shape)}; the masks it scores are "
            f"{tuple(shape)} (N×H×W class ids at the model's output size)"
        )
    if y.is_floating_point():
        if not bool(torch.equal(y, y.round())):
            raise InputError(f"labels[{i}] holds non-integer values: labels are class ids")
        y = y.long()
    elif y.dtype == torch.bool:
        y = y.long()
    return y


def _check_int8(
    engine: Any,
    reference_model: nn.Module,
    sets: list[tuple[torch.Tensor, ...]],
    labels: Iterable[torch.Tensor] | None,
    min_agreement: float,
    max_metric_drop: float,
) -> CheckReport:
    output, threshold = engine.output, engine.info.threshold
    ref_model = WithHead(_eval_mode(reference_model), output, threshold)
    label_list = list(labels) if labels is not None else None
    if label_list is not None and len(label_list) != len(sets):
        raise InputError(f"{len(label_list)} label masks for {len(sets)} input sets")
    report = CheckReport("int8", output)
    reasons: list[str] = []
    ref_masks, out_masks = [], []
    for s in sets:
        with torch.inference_mode():
            ref = ref_model(*(t.float() if t.is_floating_point() else t for t in s))
            out = _run_at_its_batch(engine, s)
        acc = compare(out, ref)
        report.accuracy.append(acc)
        if not acc.finite:
            reasons.append(f"{acc.nonfinite} non-finite values")
            continue
        mo, mr = class_masks(out, output, threshold), class_masks(ref, output, threshold)
        if mo is None or mr is None:
            if acc.rel_l2 > INT8_MAX_REL:
                reasons.append(f"rel-L2 {acc.rel_l2:.3g} > {INT8_MAX_REL:g}")
            continue
        agree = float((mo == mr).double().mean()) if mo.numel() else 1.0
        report.agreement.append(agree)
        if agree < min_agreement:
            reasons.append(f"mask agreement {100 * agree:.3f}% < {100 * min_agreement:g}%")
        ref_masks.append(mr)
        out_masks.append(mo)
    if label_list is not None and ref_masks and len(ref_masks) == len(sets):
        k = engine.info.num_classes or 2
        pairs = enumerate(zip(label_list, ref_masks, strict=True))
        y = torch.cat([_label_mask(t, m.shape, i) for i, (t, m) in pairs])
        ref_score = segmentation_score(torch.cat(ref_masks), y, k)
        out_score = segmentation_score(torch.cat(out_masks), y, k)
        report.metric = (ref_score, out_score)
        if ref_score - out_score > max_metric_drop:
            name = "Dice" if k <= 2 else "mIoU"
            reasons.append(
                f"{name} {out_score:.4f} is {ref_score - out_score:.4f} below the model's "
                f"{ref_score:.4f} (at most {max_metric_drop:g})"
            )
    report.passed = not reasons
    report.reason = "; ".join(dict.fromkeys(reasons))
    return report
