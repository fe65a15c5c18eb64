"""Accuracy metrics: one output against its fp32 reference, and the contract's bounds.

Used by ``segfast.check``, the ONNX export's verification, ``segfast bench`` and
the test-suite, so every number in every report is computed, and judged, the same way.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

# The accuracy contract (README, "Accuracy contract"), against the fp32 eager model on the same inputs:
FP32_MAX_REL = 1e-4  # fp32 engines: rel-L2 at most this
LOWP_MAX_REL = 1e-2  # fp16/bf16 engines: rel-L2 at most this ...
LOWP_FACTOR = 2.0  # ... and at most this × PyTorch's own error in that precision
MIN_MASK_AGREEMENT = 0.995  # argmax masks agree on at least this fraction of pixels
# int8 engines, on held-out inputs (not the calibration set):
INT8_MIN_AGREEMENT = 0.99  # class masks (argmax / threshold) agree on this share of pixels
INT8_MAX_REL = 0.05  # outputs that are not class maps (generators): rel-L2 at most this
INT8_MAX_METRIC_DROP = 0.01  # with labels: Dice (binary) / mIoU drops by at most this


@dataclass(frozen=True)
class Accuracy:
    """How one output compares to its reference.

    ``rel_l2`` = ‖out − ref‖₂ / ‖ref‖₂ (both in fp64; 0 when both are all zero),
    ``max_abs`` = max |out − ref|, ``mask_agreement`` = fraction of positions where
    argmax over the class dimension (dim 1) agrees — or, for integer outputs,
    where the values are equal; ``nonfinite`` counts NaN/Inf in ``out``.
    """

    rel_l2: float
    max_abs: float
    mask_agreement: float | None
    nonfinite: int
    numel: int

    @property
    def finite(self) -> bool:
        return self.nonfinite == 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_int(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex())


def compare(out: torch.Tensor, ref: torch.Tensor, *, class_dim: int | None = 1) -> Accuracy:
    """Compare ``out`` to ``ref`` (same shape); see :class:`Accuracy`.

    ``class_dim`` is the dimension argmax runs over for float logits or
    probabilities with at least two channels there; ``None`` skips the mask metric.
    """
    if tuple(out.shape) != tuple(ref.shape):
        raise ValueError(f"output shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    o = out.detach().to("cpu")
    r = ref.detach().to("cpu")
    if _is_int(o) and _is_int(r):
        agree = (o == r).double().mean().item() if o.numel() else 1.0
        diff = (o.long() - r.long()).abs()
        max_abs = float(diff.max()) if diff.numel() else 0.0
        return Accuracy(float(1.0 - agree), max_abs, agree, 0, o.numel())
    o64, r64 = o.double(), r.double()
    nonfinite = int((~torch.isfinite(o64)).sum())
    ref_norm = torch.linalg.vector_norm(r64)
    diff = o64 - r64
    err_norm = torch.linalg.vector_norm(torch.nan_to_num(diff, nan=float("inf")))
    if ref_norm > 0:
        rel = float(err_norm / ref_norm)
    else:  # an all-zero reference: exact match or infinitely wrong
        rel = 0.0 if err_norm == 0 else float("inf")
    max_abs = float(torch.nan_to_num(diff.abs(), nan=float("inf")).max()) if diff.numel() else 0.0
    agreement = None
    if class_dim is not None and o.dim() > class_dim and o.shape[class_dim] >= 2:
        agreement = float((o64.argmax(class_dim) == r64.argmax(class_dim)).double().mean())
    return Accuracy(rel, max_abs, agreement, nonfinite, o.numel())


def mismatch_report(out: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float) -> str:
    """A detailed description of where ``out`` and ``ref`` differ beyond tolerance."""
    o = out.detach().double().cpu()
    r = ref.detach().double().cpu()
    bad = ~torch.isclose(o, r, rtol=rtol, atol=atol, equal_nan=False)
    n_bad = int(bad.sum())
    lines = [
        f"{n_bad} of {o.numel()} elements differ beyond atol={atol:g} rtol={rtol:g} "
        f"(shape {tuple(o.shape)}, out dtype {out.dtype})",
        f"  NaN in out: {int(torch.isnan(o).sum())}, Inf in out: {int(torch.isinf(o).sum())}",
    ]
    if n_bad:
        idx = bad.nonzero()[:5]
        for i in idx:
            t = tuple(int(v) for v in i)
            lines.append(f"  at {t}: out={o[t].item():.6g} ref={r[t].item():.6g}")
        acc = compare(out, ref, class_dim=None)
        lines.append(f"  rel-L2 {acc.rel_l2:.3g}, max-abs {acc.max_abs:.3g}")
    return "\n".join(lines)


def class_masks(out: torch.Tensor, kind: str, threshold: float = 0.5) -> torch.Tensor | None:
    """The class mask an output stands for: a mask itself; argmax over dim 1 of N×K×H×W
    logits/probabilities (K ≥ 2); ``> threshold`` of one-class probabilities / ``> logit``
    of one-class logits; None for outputs that are not class maps."""
    if not out.is_floating_point():
        return out.long()
    if out.dim() != 4:
        return None
    if out.shape[1] >= 2:
        return out.argmax(dim=1)
    if kind == "probs":
        return (out[:, 0] > threshold).long()
    t = min(max(threshold, 1e-12), 1 - 1e-12)
    return (out[:, 0] > math.log(t / (1 - t))).long()


def segmentation_score(masks: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Dice of class 1 for binary problems (``num_classes`` ≤ 2), else mean IoU over the
    classes present in the labels or the masks — the task metrics of the int8 contract."""
    m, y = masks.long().reshape(-1).cpu(), labels.long().reshape(-1).cpu()
    if m.shape != y.shape:
        raise ValueError(f"masks {tuple(masks.shape)} and labels {tuple(labels.shape)} differ")
    if num_classes <= 2:
        a, b = m == 1, y == 1
        denom = int(a.sum() + b.sum())
        return 1.0 if denom == 0 else 2.0 * int((a & b).sum()) / denom
    ious = []
    for c in range(num_classes):
        a, b = m == c, y == c
        union = int((a | b).sum())
        if union:
            ious.append(int((a & b).sum()) / union)
    return sum(ious) / len(ious) if ious else 1.0
