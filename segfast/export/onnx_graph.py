"""torch.export → torch.onnx: the traced program, its ONNX translation, and the written
file's names and metadata.

The steps :func:`segfast.export.onnx.export_onnx` runs between its arguments and the file:
the inputs to trace with (:func:`_trace_inputs`), ``torch.export`` with ``Dim.AUTO`` and
segfast's rewrites (:func:`_torch_export`), the dynamo translation at an opset
(:func:`_to_onnx`), then the ``ModelProto``'s dynamic dims named batch/height/width
(:func:`_name_dynamic_dims`) and its ``segfast.*`` metadata (:func:`_set_metadata`). Why
this exporter, and what its graphs compute, is explained in :mod:`segfast.export.onnx`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from segfast._version import __version__
from segfast._warnings import quiet_torch_internals
from segfast.compiler.capture import dynamic_shapes, trace_inputs
from segfast.compiler.guards import AXIS_DIM
from segfast.errors import UnsupportedModelError
from segfast.export.rewrites import ExportRewrites
from segfast.outputs import WithHead

# Loggers whose warnings during export are noise for a segfast user: the
# exporter's registry skipping torchvision ops (not installed, not used), and
# onnx_ir typing an empty attribute list as INTS (correct; the checker verifies it).
_QUIET_LOGGERS = ("torch.onnx._internal.exporter._registration", "onnx_ir._convenience")


# -- what torch.export traces ---------------------------------------------------------


def _trace_inputs(
    inputs: tuple[torch.Tensor, ...], axes: tuple[str, ...], dtype: torch.dtype
) -> tuple[torch.Tensor, ...]:
    """The inputs to trace with (:func:`segfast.compiler.capture.trace_inputs`: new
    tensor objects, a dynamic axis of size 1 doubled to 2), cast to ``dtype``."""
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in trace_inputs(inputs, axes))


def _dynamic_shapes(inputs: tuple[torch.Tensor, ...], axes: tuple[str, ...]) -> Any:
    """``dynamic_shapes`` for ``WithHead.forward(*inputs)``: one entry, the varargs tuple
    of :func:`segfast.compiler.capture.dynamic_shapes`."""
    per_input = dynamic_shapes(inputs, axes)
    return None if per_input is None else (per_input,)


# -- torch.export, then torch.onnx ----------------------------------------------------


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the export noise named at :data:`_QUIET_LOGGERS`, restoring it afterwards."""
    saved = {name: logging.getLogger(name).level for name in _QUIET_LOGGERS}
    try:
        for name in _QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        with quiet_torch_internals():
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _cause_chain(exc: BaseException) -> list[BaseException]:
    chain = []
    cur: BaseException | None = exc
    while cur is not None and cur not in chain:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    return chain


def _torch_export(
    wrapped: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    axes: tuple[str, ...],
    rewrites: ExportRewrites,
) -> torch.export.ExportedProgram:
    try:
        with _quiet_exporter(), torch.no_grad(), rewrites:
            return torch.export.export(
                wrapped, inputs, dynamic_shapes=_dynamic_shapes(inputs, axes), strict=False
            )
    except UnsupportedModelError:
        raise  # a refusal by ExportRewrites: its message names the call
    except Exception as exc:  # torch.export raises many types; name the stage, keep the cause
        inner = type(wrapped.model).__name__ if isinstance(wrapped, WithHead) else "the model"
        raise UnsupportedModelError(
            f"torch.export could not capture {inner}"
            f"{' with dynamic ' + ', '.join(axes) if axes else ''}: {_first_line(exc)}"
        ) from exc


_FAILED_NODE = re.compile(r"Error when translating node %(\S+) .*?target=([\w.]+)", re.S)


def _to_onnx(
    program: torch.export.ExportedProgram,
    inputs: tuple[torch.Tensor, ...],
    input_names: list[str],
    output: str,
    opset: int,
) -> Any:
    """Translate ``program`` with torch.onnx (dynamo); return the ``ModelProto``."""
    try:
        with _quiet_exporter(), torch.no_grad():
            onnx_program = torch.onnx.export(
                program,
                inputs,
                dynamo=True,
                opset_version=opset,
                input_names=input_names,
                output_names=[output],
                optimize=True,
                verbose=False,
            )
    except Exception as exc:  # the exporter wraps the cause in several layers
        chain = _cause_chain(exc)
        for e in chain:
            m = _FAILED_NODE.search(str(e))
            if m:
                raise UnsupportedModelError(
                    f"torch.onnx cannot translate {m.group(2)} (node %{m.group(1)}) to ONNX "
                    f"opset {opset}: {_first_line(chain[-1])}"
                ) from exc
        raise UnsupportedModelError(
            f"torch.onnx could not export the model: {_first_line(chain[-1])}"
        ) from exc
    proto = onnx_program.model_proto
    got = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if got != opset:
        raise UnsupportedModelError(
            f"asked for ONNX opset {opset}, but torch.onnx could only write opset {got} for this "
            "model (its version converter failed); use opset 18 or newer"
        )
    return proto


# -- the written file -----------------------------------------------------------------


def _name_dynamic_dims(proto: Any, input_names: list[str], axes: tuple[str, ...]) -> None:
    """Rename the exporter's symbols (``s77``) of dynamic axes to batch/height/width.

    The names appear in the inputs, outputs and value_info (whole tokens of
    expressions such as ``s77 + 1`` too), so a reader sees ``[batch, 3, height,
    width] -> [batch, height, width]``.
    """
    if not axes:
        return
    rename: dict[str, str] = {}
    by_name = {v.name: v for v in proto.graph.input}
    for i, name in enumerate(input_names):
        dims = by_name[name].type.tensor_type.shape.dim
        for axis in axes:
            d = AXIS_DIM[axis]
            if (d == 0 or (i == 0 and len(dims) == 4)) and d < len(dims) and dims[d].dim_param:
                rename.setdefault(dims[d].dim_param, axis)
    if not rename:
        return
    token = re.compile(r"\b(" + "|".join(re.escape(k) for k in rename) + r")\b")
    values = [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]
    for v in values:
        if not v.type.HasField("tensor_type"):
            continue
        for dim in v.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = token.sub(lambda m: rename[m.group(1)], dim.dim_param)


def _set_metadata(
    proto: Any,
    model: nn.Module,
    precision: str,
    output: str,
    threshold: float,
    num_classes: int | None,
    ranges: dict[str, tuple[int, int]],
    guards: tuple[str, ...] | None,
) -> None:
    import onnxscript

    spec = getattr(model, "segfast_spec", None)
    props = {
        "segfast.version": __version__,
        "segfast.model": json.dumps(spec, default=str) if spec else type(model).__name__,
        "segfast.output": output,
        "segfast.precision": precision,
        "segfast.threshold": repr(float(threshold)),
        "segfast.num_classes": "" if num_classes is None else str(num_classes),
        "segfast.dynamic_ranges": json.dumps({k: list(v) for k, v in ranges.items()}),
        "segfast.guards": json.dumps(list(guards) if guards is not None else None),
        "segfast.exporter": (
            f"torch.onnx.export(dynamo=True), torch {torch.__version__}, "
            f"onnxscript {onnxscript.__version__}"
        ),
    }
    del proto.metadata_props[:]
    for k, v in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    proto.doc_string = (
        f"segfast export: {props['segfast.model']} with output={output}, precision={precision}"
    )
