"""int8 engines: calibration inputs, the quantization of a fused graph, and the
accuracy guard that falls back the most sensitive layers until the contract holds.

Used by :func:`segfast.compile` (``precision="int8"``) and :func:`segfast.quantize`.
The steps, on the fused fp32 graph (every fusion pass already ran: BN is folded
into the weights before they are quantized):

1. **calibrate**: run the graph over the calibration inputs; one observer per
   quantizable layer (max, percentile or entropy; :mod:`segfast.compiler.quant`);
2. **quantize** every layer (:func:`segfast.compiler.quant.quantize_graph`);
3. **judge** the engine built from it on held-out inputs by the int8 contract
   (:func:`segfast.check`): class masks agree with the fp32 model on ≥ 99 % of the
   pixels, and with labels the task metric drops by at most the stated bound;
4. when it misses, measure each layer's **sensitivity** — the rel-L2 error of the
   logits when that layer alone is int8 — and keep the worst layers in floating
   point one at a time, judging again after each, until the contract holds; more
   than ``max_float_layers`` of them and the build fails with the figures.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import fx

from segfast._warnings import quiet_torch_internals
from segfast.check import CheckReport
from segfast.compiler import ops
from segfast.compiler.quant import QuantizedLayer, calibrate, quantize_graph
from segfast.compiler.quant.apply import quantize_weight
from segfast.compiler.quant.observers import METHODS
from segfast.errors import BackendUnavailable, InputError, UnsupportedModelError
from segfast.metrics import INT8_MAX_METRIC_DROP, INT8_MIN_AGREEMENT, class_masks
from segfast.precision import DTYPE_NAMES, DTYPES, resolve_precision

segfast_ops = torch.ops.segfast


@dataclass
class Calibration:
    """What an int8 build calibrates on and is judged on.

    Args:
        inputs: example inputs as the engine takes them — tensors (or numpy arrays),
            or tuples of them for several inputs; any batch size. Real data: random
            inputs calibrate nothing useful.
        method: "percentile" (default), "max" or "entropy" (KL, TensorRT's).
        percentile: the percentile method's share of |x| kept unclipped.
        holdout: inputs the contract is judged on, not calibrated on. Default: every
            fourth calibration input is held out (at least 4 inputs are then needed).
        labels: with ``holdout``, one label mask (N×H×W class ids) per held-out input:
            the task metric (Dice for one or two classes, mIoU otherwise) may then drop
            by at most ``max_metric_drop``.
        min_agreement: share of pixels whose class must match the fp32 model's.
        max_float_layers: the share of quantizable layers the fallback may keep in
            floating point before the build fails.
        float_precision: what int8 does not cover runs in — the fallback layers, the
            head, resizes, pools, residual adds: "fp32", "fp16" or "bf16". Default: fp16
            on a CUDA GPU (``triton`` and ``torch``), fp32 elsewhere; fp16/bf16 are for
            the ``triton`` and ``torch`` backends on a GPU (the CPU's int8 plan and the
            Q/DQ ONNX files keep fp32; see :func:`float_part_dtype`).
    """

    inputs: Any
    method: str = "percentile"
    percentile: float = 99.99
    holdout: Any = None
    labels: Any = None
    min_agreement: float = INT8_MIN_AGREEMENT
    max_metric_drop: float = INT8_MAX_METRIC_DROP
    max_float_layers: float = 0.5
    float_precision: str | None = None

    def __post_init__(self) -> None:
        if self.float_precision is not None:
            try:  # "fp16", "half", "float16", torch.float16 → "fp16"
                self.float_precision = DTYPE_NAMES[resolve_precision(self.float_precision)]
            except ValueError:
                raise InputError(
                    f"float_precision must be one of {tuple(DTYPES)} (or None: fp16 on a "
                    f"GPU, fp32 elsewhere), got {self.float_precision!r}"
                ) from None
        if self.method not in METHODS:
            raise InputError(f"calibration method must be one of {METHODS}, got {self.method!r}")
        if not 0.0 < self.min_agreement <= 1.0:
            raise InputError(f"min_agreement must be in (0, 1], got {self.min_agreement}")
        if not 0.0 <= self.max_float_layers <= 1.0:
            raise InputError(f"max_float_layers must be in [0, 1], got {self.max_float_layers}")
        if self.labels is not None and self.holdout is None:
            raise InputError("labels belong to held-out inputs: give holdout= with them")


def as_calibration(calibration: Any) -> Calibration:
    if calibration is None:
        raise InputError(
            "precision='int8' needs calibration= (example inputs from your data, e.g. a list "
            "of input tensors or a segfast.Calibration): random data calibrates nothing useful"
        )
    return calibration if isinstance(calibration, Calibration) else Calibration(calibration)


GPU_FLOAT_BACKENDS = ("triton", "torch")  # run an int8 graph whose float part is fp16/bf16


def float_part_dtype(requested: str | None, backend: str, device: torch.device) -> torch.dtype:
    """The dtype an int8 engine runs its floating-point part in (fallback layers, head,
    resizes, pools, adds) on ``backend`` and ``device``.

    ``None`` picks fp16 where the graph runs on a CUDA GPU (``triton``, ``torch``) —
    TensorRT's ``--int8 --fp16`` — and fp32 elsewhere. fp16/bf16 asked for where they
    are not built is an error, not a silent fp32: the CPU plan's int8 convolutions
    (oneDNN) read and write fp32, and the Q/DQ ONNX files of ``onnxruntime`` and
    ``tensorrt`` keep their float layers fp32 (an fp16 Q/DQ export is not built).
    The triton backend runs fp16 on the CPU under Triton's interpreter (tests).
    """
    if requested is None:
        gpu = device.type == "cuda" and backend in GPU_FLOAT_BACKENDS
        return torch.float16 if gpu else torch.float32
    dtype = DTYPES[requested]
    if dtype == torch.float32:
        return dtype
    if backend not in GPU_FLOAT_BACKENDS:
        raise UnsupportedModelError(
            f"float_precision={requested!r}: the {backend} backend's int8 engines run the "
            "Q/DQ ONNX file, whose float layers are fp32 (an fp16/bf16 Q/DQ export is not "
            "built); use float_precision='fp32' there, or the triton backend on a GPU"
        )
    if backend == "triton" and device.type != "cuda" and dtype == torch.bfloat16:
        raise BackendUnavailable(
            "float_precision='bf16': bf16 arithmetic is wrong in Triton's CPU interpreter; "
            "a bf16 float part on triton needs a GPU"
        )
    if backend == "torch" and device.type != "cuda":
        raise UnsupportedModelError(
            f"float_precision={requested!r}: int8 engines on the CPU run their float layers "
            "in fp32 (oneDNN's int8 convolutions there read and write fp32; a bf16 float "
            "part is not built); use float_precision='fp32'"
        )
    return dtype


def _as_tensor(item: Any, what: str) -> torch.Tensor:
    if isinstance(item, torch.Tensor):
        return item
    if isinstance(item, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(item))
    raise InputError(f"{what} must be tensors or numpy arrays, got {type(item).__name__}")


def input_sets(
    items: Any,
    like: Sequence[torch.Tensor],
    dynamic: Sequence[str],
    device: torch.device,
    what: str,
) -> list[tuple[torch.Tensor, ...]]:
    """``items`` as input sets shaped like the example ``like``, checked: the count of
    tensors, dtype kind, rank, every size but the batch (and dynamic height/width),
    finite values. Raises :class:`InputError` naming the first bad item."""
    if isinstance(items, torch.Tensor | np.ndarray):
        items = [items]
    try:
        items = list(items)
    except TypeError:
        raise InputError(
            f"{what} must be an iterable of input tensors, got {type(items).__name__}"
        ) from None
    if not items:
        raise InputError(f"{what} is empty: give at least one input")
    sets = []
    for i, item in enumerate(items):
        group = tuple(item) if isinstance(item, tuple | list) else (item,)
        if len(group) != len(like):
            raise InputError(f"{what}[{i}] holds {len(group)} tensors; the model takes {len(like)}")
        out = []
        for j, (raw, ref) in enumerate(zip(group, like, strict=True)):
            t = _as_tensor(raw, what)
            name = f"{what}[{i}]" + (f"[{j}]" if len(like) > 1 else "")
            if t.is_floating_point() != ref.is_floating_point():
                kind = "floating-point" if ref.is_floating_point() else "integer"
                hint = (
                    " (uint8 frames: preprocess them as the engine's inputs are, e.g. with "
                    "segfast.kernels.preprocess)"
                    if t.dtype == torch.uint8
                    else ""
                )
                raise InputError(
                    f"{name} must be a {kind} tensor like the example, got {t.dtype}{hint}"
                )
            if t.dim() != ref.dim():
                raise InputError(
                    f"{name} has shape {tuple(t.shape)}; the example input is {tuple(ref.shape)}"
                )
            for d in range(1, t.dim()):
                free = j == 0 and (
                    (d == 2 and "height" in dynamic) or (d == 3 and "width" in dynamic)
                )
                if not free and t.shape[d] != ref.shape[d]:
                    raise InputError(
                        f"{name} has shape {tuple(t.shape)}; the engine takes "
                        f"{tuple(ref.shape)} (any batch)"
                    )
            if t.shape[0] < 1:
                raise InputError(f"{name} has an empty batch")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise InputError(f"{name} holds NaN or Inf: calibration needs finite data")
            out.append(t.to(device=device, dtype=ref.dtype))
        sets.extend(_static_batches(tuple(out), like, dynamic, f"{what}[{i}]"))
    return sets


def _static_batches(
    group: tuple[torch.Tensor, ...], like: Sequence[torch.Tensor], dynamic: Sequence[str], name: str
) -> list[tuple[torch.Tensor, ...]]:
    """A static-batch engine takes its example's batch: larger batches are cut into it."""
    if "batch" in dynamic:
        return [group]
    b, n = int(like[0].shape[0]), int(group[0].shape[0])
    if any(int(t.shape[0]) != n for t in group):
        raise InputError(f"{name}: its tensors have different batch sizes")
    if n % b:
        raise InputError(
            f"{name} has batch {n}; this static engine takes batches of {b} (give a multiple "
            "of it, or compile with dynamic=['batch'])"
        )
    return [tuple(t[k : k + b] for t in group) for k in range(0, n, b)]


def split_holdout(
    cal: Calibration, like: Sequence[torch.Tensor], dynamic: Sequence[str], device: torch.device
) -> tuple[list[tuple[torch.Tensor, ...]], list[tuple[torch.Tensor, ...]], list[Any] | None]:
    """(calibration sets, held-out sets, labels or None)."""
    sets = input_sets(cal.inputs, like, dynamic, device, "calibration")
    if cal.holdout is not None:
        held = input_sets(cal.holdout, like, dynamic, device, "holdout")
        labels = None
        if cal.labels is not None:
            labels = [_as_tensor(t, "labels") for t in cal.labels]
            if len(labels) != len(held):
                raise InputError(f"{len(labels)} label masks for {len(held)} held-out inputs")
        return sets, held, labels
    if len(sets) < 4:
        raise InputError(
            f"{len(sets)} calibration input(s): give at least 4 (every fourth is held out to "
            "judge the engine on data it was not calibrated on), or holdout= separately"
        )
    held = [s for i, s in enumerate(sets) if i % 4 == 3]
    return [s for i, s in enumerate(sets) if i % 4 != 3], held, None


# -- the graph's view of sensitivity ----------------------------------------------------


def logits_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of the fused graph that returns the logits its fused head reduces."""
    with quiet_torch_internals():
        g = copy.deepcopy(gm)
    for node in g.graph.nodes:
        if node.op == "call_function" and node.target is segfast_ops.head.default:
            args = list(node.args)
            args[9] = "logits"
            node.args = tuple(args)
    g.recompile()
    return g


class _OneLayerInt8(fx.Interpreter):
    """Runs the float graph with one layer computed as int8."""

    def __init__(self, gm: fx.GraphModule, name: str, x_scale: float) -> None:
        super().__init__(gm)
        self.name, self.x_scale = name, x_scale
        node = next(n for n in gm.graph.nodes if n.name == name)
        w = self.fetch_attr(str(node.args[1].target))
        self.transposed = node.target is segfast_ops.conv_transpose2d.default
        self.wq, self.ws = quantize_weight(w, 1 if self.transposed else 0)

    def run_node(self, n: fx.Node) -> Any:
        if n.name != self.name:
            return super().run_node(n)
        args, _ = self.fetch_args_kwargs_from_env(n)
        args = list(args)
        args[1] = self.wq
        impl = ops.qconv_transpose2d_impl if self.transposed else ops.qconv2d_impl
        return impl(*args, self.x_scale, self.ws)


@dataclass(frozen=True)
class Sensitivity:
    """What one layer alone on int8 does to the output, over the held-out inputs."""

    changed: float | None  # share of pixels whose class changes (None: not a class map)
    rel_l2: float  # the logits' relative L2 error

    @property
    def key(self) -> tuple[float, float]:
        """Sort key, worst first: pixels changed (the contract's measure), then rel-L2."""
        return (-(self.changed or 0.0), -self.rel_l2)

    @property
    def value(self) -> float:
        return self.changed if self.changed is not None else self.rel_l2

    def __str__(self) -> str:
        if self.changed is None:
            return f"logits rel-L2 {self.rel_l2:.3g}"
        return f"{100 * self.changed:.2f} % of pixels change, logits rel-L2 {self.rel_l2:.3g}"


def sensitivity(
    gm: fx.GraphModule,
    amax: dict[str, float],
    names: Iterable[str],
    sets: list[tuple],
    output: str,
    threshold: float,
) -> dict[str, Sensitivity]:
    """Per layer: the classes it changes and the logits' rel-L2 error when it alone is
    int8 (the class share decides the order: it is what the contract judges; the
    rel-L2 of large logits alone would rank by the loudest pixels)."""
    g = logits_graph(gm)
    kind = "probs" if output == "probs" else "logits"
    with torch.inference_mode():
        refs = [g(*s).float() for s in sets]
        ref_masks = [class_masks(r, kind, threshold) for r in refs]
        out: dict[str, Sensitivity] = {}
        for name in names:
            run = _OneLayerInt8(g, name, amax[name] / ops.INT8_MAX)
            errs, changed = [], []
            for s, ref, mask in zip(sets, refs, ref_masks, strict=True):
                y = run.run(*s).float()
                denom = float(ref.norm()) or 1.0
                errs.append(float((y - ref).norm()) / denom)
                if mask is not None:
                    changed.append(float((class_masks(y, kind, threshold) != mask).double().mean()))
            out[name] = Sensitivity(
                sum(changed) / len(changed) if changed else None, sum(errs) / len(errs)
            )
    return out


# -- the guard --------------------------------------------------------------------------


@dataclass
class Int8Build:
    """What the int8 stage decided: the quantized graph, its layers, what was judged."""

    graph: fx.GraphModule
    layers: list[QuantizedLayer]
    amax: dict[str, float]
    report: CheckReport
    artefact: Any = None  # what ``judge`` built last (the engine)
    notes: list[str] = field(default_factory=list)

    def float_layers(self) -> list[QuantizedLayer]:
        return [x for x in self.layers if not x.int8]


def quantize_with_guard(
    fp_graph: fx.GraphModule,
    cal: Calibration,
    cal_sets: list[tuple],
    held: list[tuple],
    judge: Callable[[fx.GraphModule, list[QuantizedLayer]], tuple[CheckReport, Any]],
    output: str = "logits",
    threshold: float = 0.5,
) -> Int8Build:
    """Calibrate ``fp_graph``, quantize it, and fall back layers until ``judge`` (which
    builds an engine from a quantized graph and checks it on ``held``) passes."""
    amax, seen = calibrate(fp_graph, cal_sets, method=cal.method, percentile=cal.percentile)
    if not amax:
        raise UnsupportedModelError("the model has no convolution segfast can quantize to int8")

    def attempt(keep: dict[str, str]) -> tuple[fx.GraphModule, list[QuantizedLayer], Any, Any]:
        with quiet_torch_internals():
            g = copy.deepcopy(fp_graph)
        layers = quantize_graph(g, amax, keep)
        report, artefact = judge(g, layers)
        return g, layers, report, artefact

    keep: dict[str, str] = {}
    g, layers, report, artefact = attempt(keep)
    notes = [
        f"int8: calibrated on {seen} input set(s) ({cal.method}"
        + (f" {cal.percentile:g} %" if cal.method == "percentile" else "")
        + f"), judged on {len(held)} held-out set(s)"
    ]
    if report.passed:
        return Int8Build(g, layers, amax, report, artefact, notes)
    first = str(report)
    candidates = [x.name for x in layers if x.int8]
    sens = sensitivity(fp_graph, amax, candidates, held, output, threshold)
    order = sorted(candidates, key=lambda n: sens[n].key)
    limit = math.floor(cal.max_float_layers * len(candidates))
    for rank, name in enumerate(order[:limit], start=1):
        keep[name] = f"fallback {rank} of {len(order)}: alone on int8, {sens[name]}"
        g, layers, report, artefact = attempt(keep)
        if report.passed:
            for x in layers:
                x.sensitivity = sens[x.name].value if x.name in sens else None
            notes.append(
                f"int8: {len(keep)} most sensitive layer(s) kept in floating point; all-int8 "
                f"engine: {first}"
            )
            return Int8Build(g, layers, amax, report, artefact, notes)
    worst = "; ".join(f"{n}: {sens[n]}" for n in order[:5])
    raise UnsupportedModelError(
        f"int8 misses its contract even with the {len(keep)} most sensitive of "
        f"{len(candidates)} layers in floating point (at most {cal.max_float_layers:.0%} may "
        f"be): {report}. All-int8: {first}. Most sensitive layers (each alone on int8): "
        f"{worst}. Calibrate on more representative data, try method='entropy' or "
        "'max', or allow more float layers (max_float_layers)"
    )


def module_ranges(
    layers: Sequence[QuantizedLayer], model: torch.nn.Module
) -> dict[str, float | None]:
    """The layers' decisions by conv module of ``model`` (what the Q/DQ export quantizes):
    a module's input range is the largest of the layers cut from it (a split depthwise
    conv, a branch folded into a residual), and it stays float if any of them does."""
    from segfast.export.qdq import conv_axis

    modules = dict(model.named_modules())
    out: dict[str, float | None] = {}
    for x in layers:
        if x.source is None or not x.source.endswith(".weight"):
            continue
        name = x.source.removesuffix(".weight")
        if name not in modules or conv_axis(modules[name]) is None:
            continue
        if not x.int8:
            out[name] = None
        elif name not in out or out[name] is not None:
            out[name] = max(x.amax, out.get(name) or 0.0)
    return out


class GraphEngine:
    """An int8 fused graph seen as an engine by :func:`segfast.check` (composite
    implementations: what the int8 kernels compute with 8-bit weights; the CPU plan
    without VNNI runs convs over maps that may be negative on 7-bit weights instead,
    unless ``int8_w7=False``)."""

    precision = "int8"

    def __init__(
        self, graph: fx.GraphModule, output: str, threshold: float, num_classes: int | None
    ) -> None:
        self.graph = graph
        self.output = output
        self.info = type("Info", (), {"threshold": threshold, "num_classes": num_classes})()

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.graph(*inputs)


@dataclass
class QuantizedModel:
    """What :func:`segfast.quantize` decided, usable on its own.

    Call it to run the int8 graph (its composite implementation: the meaning of the
    quantized engine with 8-bit weights — the Q/DQ file's, Triton's; the CPU plan
    without VNNI takes 7-bit weights where inputs may be negative unless
    ``int8_w7=False`` — on any device, at floating-point speed); ``summary()`` lists
    every layer; ``export_onnx(path)`` writes the Q/DQ ONNX file ONNX Runtime and
    TensorRT build int8 engines from; ``compile`` it with ``segfast.compile(model, x,
    precision="int8", calibration=...)`` for a fast engine.
    """

    model: torch.nn.Module
    inputs: tuple[torch.Tensor, ...]
    graph: fx.GraphModule
    layers: list[QuantizedLayer]
    report: CheckReport
    output: str
    threshold: float
    notes: list[str] = field(default_factory=list)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.graph(*inputs)

    def module_ranges(self) -> dict[str, float | None]:
        return module_ranges(self.layers, self.model)

    def summary(self) -> str:
        n = sum(x.int8 for x in self.layers)
        lines = [f"int8: {n} of {len(self.layers)} convolutions on int8", *self.notes]
        lines.append(f"contract on held-out inputs: {self.report}")
        lines += ["  " + x.describe() for x in self.layers]
        return "\n".join(lines)

    def export_onnx(self, path: Any, **kwargs: Any) -> Any:
        """The Q/DQ ONNX file (:func:`segfast.export.export_onnx` with ``precision="int8"``);
        keyword arguments (``dynamic``, ``opset``, ``check``) pass through."""
        from segfast.export.onnx import export_onnx

        return export_onnx(
            self.model, path, example_input=self.inputs, output=self.output,
            threshold=self.threshold, precision="int8", int8_layers=self.module_ranges(),
            **kwargs,
        )  # fmt: skip
