"""The check of a written ONNX file: ONNX Runtime (CPU) against the eager model in fp32.

:func:`segfast.export.onnx.export_onnx` (``check=True``) runs :func:`_verify` on the file
before it is moved into place: the example input, then up to two other sizes inside the
proven dynamic ranges and guards (:func:`_probe_shapes`), then batch 1 below the proven
minimum. Each input set is one :class:`ShapeCheck`, judged by :func:`_judge` against
:mod:`segfast.metrics`' bounds (fp32 masks: :data:`FP32_MIN_MASK_AGREEMENT`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from segfast.compiler.guards import (
    GROW_STEPS,
    SHRINK_STEPS,
    Guards,
    changed_shapes,
    in_domain,
    steps_for,
)
from segfast.errors import UnsupportedModelError
from segfast.export import _ort
from segfast.export.onnx_graph import _first_line
from segfast.metrics import FP32_MAX_REL, LOWP_MAX_REL, MIN_MASK_AGREEMENT, Accuracy, compare

# ONNX Runtime vs eager on the exported file (issue 6): fp32 masks agree on ≥ 99.9 %.
FP32_MIN_MASK_AGREEMENT = 0.999


@dataclass(frozen=True)
class ShapeCheck:
    """ONNX Runtime vs eager PyTorch (fp32) on one random input set."""

    shapes: tuple[tuple[int, ...], ...]
    accuracy: Accuracy | None  # None when ONNX Runtime failed to run (see reason)
    passed: bool
    reason: str = ""


def _random_like(t: torch.Tensor, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A random tensor of ``shape`` like ``t``: normal floats; ints drawn from ``t``'s values."""
    if t.is_floating_point():
        return torch.randn(shape, generator=gen).to(t.device)
    flat = t.reshape(-1)
    idx = torch.randint(0, flat.numel(), shape, generator=gen).to(t.device)
    return flat[idx]


def _probe_shapes(
    inputs: tuple[torch.Tensor, ...],
    axes: tuple[str, ...],
    ranges: dict[str, tuple[int, int]],
    guards: Guards | None,
) -> list[list[tuple[int, ...]]]:
    """Up to two shape sets in the proven domain, differing from the example on each dynamic axis:
    the first larger and the first smaller candidate (see GROW_STEPS, SHRINK_STEPS) that satisfy
    the ranges and the guards."""
    example = [tuple(t.shape) for t in inputs]
    sets: list[list[tuple[int, ...]]] = []
    for candidates in (steps_for(guards, GROW_STEPS, 1), steps_for(guards, SHRINK_STEPS, -1)):
        for step in candidates:
            shapes = changed_shapes(example, axes, step)
            fresh = shapes != example and shapes not in sets
            if fresh and in_domain(shapes, axes, ranges, guards) is None:
                sets.append(shapes)
                break
    return sets


def _judge(out: torch.Tensor, ref: torch.Tensor, precision: str) -> tuple[Accuracy | None, str]:
    if tuple(out.shape) != tuple(ref.shape) or (out.is_floating_point() != ref.is_floating_point()):
        return None, (
            f"ONNX Runtime returned {tuple(out.shape)} {out.dtype}, PyTorch "
            f"{tuple(ref.shape)} {ref.dtype}"
        )
    acc = compare(out.float() if out.is_floating_point() else out, ref)
    if not acc.finite:
        return acc, f"{acc.nonfinite} non-finite values"
    if not out.is_floating_point():
        need = FP32_MIN_MASK_AGREEMENT if precision == "fp32" else MIN_MASK_AGREEMENT
        agree = acc.mask_agreement if acc.mask_agreement is not None else 0.0
        if agree < need:
            return acc, f"mask agreement {100 * agree:.3f}% < {100 * need:g}%"
        return acc, ""
    bound = FP32_MAX_REL if precision == "fp32" else LOWP_MAX_REL
    if acc.rel_l2 > bound:
        return acc, f"rel-L2 {acc.rel_l2:.3g} > {bound:g}"
    return acc, ""


def _verify(
    path: Path,
    reference: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    output: str,
    precision: str,
    axes: tuple[str, ...],
    ranges: dict[str, tuple[int, int]],
    guards: Guards | None,
) -> tuple[tuple[ShapeCheck, ...], dict[str, tuple[int, int]]]:
    """ONNX Runtime (CPU) vs the fp32 eager model: the example, then probe sizes.

    ``reference`` is the model with its head (``WithHead(model, output, threshold)``, not
    training), ``output`` the graph's output name.

    Raises UnsupportedModelError at the first input set that disagrees. Returns
    the checks and the ranges, the batch range extended to 1 when batch 1 matches.
    """
    try:
        session = _ort.cpu_session(path, intra_op_threads=torch.get_num_threads())
    except Exception as exc:  # ORT's errors subclass Exception directly
        raise UnsupportedModelError(
            f"ONNX Runtime cannot load the exported graph: {_first_line(exc)}"
        ) from exc
    names = [i.name for i in session.get_inputs()]
    dtypes = _ort.input_dtypes(session)
    gen = torch.Generator().manual_seed(0)

    def run(sets: tuple[torch.Tensor, ...]) -> ShapeCheck:
        with torch.no_grad():
            ref = reference(*sets)
        shapes = tuple(tuple(t.shape) for t in sets)
        try:
            (out,) = session.run([output], _ort.feeds(names, dtypes, sets))
        except Exception as exc:  # ORT's errors subclass Exception directly
            reason = f"ONNX Runtime failed: {_first_line(exc)}"
            return ShapeCheck(shapes, None, False, reason)
        acc, reason = _judge(torch.from_numpy(out), ref.cpu(), precision)
        return ShapeCheck(shapes, acc, not reason, reason)

    probes = [inputs] + [
        tuple(_random_like(t, s, gen) for t, s in zip(inputs, shapes, strict=True))
        for shapes in _probe_shapes(inputs, axes, ranges, guards)
    ]
    checks = []
    for k, sets in enumerate(probes):
        result = run(sets)
        checks.append(result)
        if not result.passed:
            where = "the example input" if k == 0 else "an input size other than the example's"
            raise UnsupportedModelError(
                f"ONNX Runtime's result on the exported graph differs from the model on {where} "
                f"(shapes {_fmt_shapes(result.shapes)}): {result.reason}. The exporter produced "
                "a graph that computes something else"
                + ("; export with static shapes" if k > 0 else "")
            )
    # Batch 1 is below the proven minimum 2 (torch.export specialises size 1): the one
    # value there, so running it decides. Recorded either way; never an error.
    ranges = dict(ranges)
    if "batch" in ranges and ranges["batch"][0] == 2:
        one = [(1, *t.shape[1:]) for t in inputs]
        guard = guards.first_violated(one) if guards is not None else None
        if guard is None:
            if inputs[0].shape[0] == 1:  # the example itself was batch 1, and it matched
                result = checks[0]
            else:
                result = run(
                    tuple(_random_like(t, s, gen) for t, s in zip(inputs, one, strict=True))
                )
                checks.append(result)
            if result.passed:
                ranges["batch"] = (1, ranges["batch"][1])
            else:
                checks[-1] = ShapeCheck(
                    result.shapes,
                    result.accuracy,
                    False,
                    f"batch 1 (below the proven minimum 2) does not match: {result.reason}; "
                    "the batch range stays from 2",
                )
    return tuple(checks), ranges


def _fmt_shapes(shapes: tuple[tuple[int, ...], ...]) -> str:
    return ", ".join("×".join(str(d) for d in s) for s in shapes)
