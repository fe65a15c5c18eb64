"""Engine files: one safetensors file holding the captured program's weights,
with everything else as JSON in its header. No pickle anywhere.

Layout of ``engine.segfast``:

- tensors ``w.<name>``: the exported program's parameters and buffers,
  ``c.<name>``: its tensor constants;
- header metadata ``segfast_engine``: JSON with the format version, the segfast,
  torch and triton versions, backend, precision, output, threshold, device (and
  GPU name / compute capability), input specs, passes and fusions, backend
  options, the serialized ExportedProgram graph (``torch.export``'s JSON form),
  and three sha256 digests — of the weights (names, dtypes, shapes, bytes), of
  the program JSON, and of every other header field.

This module writes files (``Engine.save``) and reads and verifies them
(:func:`read`, :func:`check_compatible`); it builds nothing. Loading —
:func:`segfast.load` in :mod:`segfast.api` — checks, before building anything:
the file parses (a truncated file does not), the digests match (a modified
file does not), the versions and the device fit this machine, and — if the
caller names one — the input shape fits. The engine is then rebuilt by
compiling the stored program with the stored settings. The digests detect
corruption and accidental edits; they are not a signature (anyone can
recompute them), so load engine files you trust.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from segfast._io import atomic_path
from segfast._version import __version__
from segfast._warnings import quiet_torch_internals
from segfast.errors import EngineFileError

FORMAT = "segfast-engine"
FORMAT_VERSION = 1
_META_KEY = "segfast_engine"


def _minor(version: str) -> str:
    """'2.13.0+cpu' -> '2.13'."""
    parts = version.split("+")[0].split(".")
    return ".".join(parts[:2])


def _triton_version() -> str | None:
    try:
        import triton

        return str(triton.__version__)
    except ImportError:
        return None


def _device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"type": device.type}
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        info["name"] = torch.cuda.get_device_name(idx)
        info["capability"] = list(torch.cuda.get_device_capability(idx))
    return info


def header_digest(meta: dict[str, Any]) -> str:
    """sha256 over the header's every other field, as canonical JSON (sorted keys): the
    backend, precision, output, input shapes, options … which the program and weight
    digests do not cover — one flipped bit turns ``"fp32"`` into ``"fp16"``."""
    rest = {k: v for k, v in meta.items() if k != "header_sha256"}
    return hashlib.sha256(
        json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save(engine: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``engine`` to ``path`` atomically (see the module docstring)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    from torch._export.serde.serialize import serialize

    src = engine.source
    program = src.program()
    with quiet_torch_internals():
        artifact = serialize(program)
    program_json = artifact.exported_program.decode("utf-8")
    tensors: dict[str, torch.Tensor] = {}
    for name, t in program.state_dict.items():
        tensors[f"w.{name}"] = t.detach().contiguous().cpu().clone()
    for name, t in program.constants.items():
        if isinstance(t, torch.Tensor):
            tensors[f"c.{name}"] = t.detach().contiguous().cpu().clone()
        else:
            raise EngineFileError(
                f"cannot save: the program holds a non-tensor constant {name!r} "
                f"({type(t).__name__})"
            )
    info = engine.info
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "segfast_version": __version__,
        "torch_version": torch.__version__,
        "triton_version": _triton_version(),
        "backend": info.backend,
        "precision": info.precision,
        "output": info.output,
        "threshold": info.threshold,
        "dynamic": list(src.dynamic),
        "options": src.options,
        "device": _device_info(engine.device),
        "inputs": [
            {
                "shape": list(s.shape),
                "dtype": s.dtype,
                "dynamic": {k: list(v) for k, v in s.dynamic.items()},
            }
            for s in info.inputs
        ],
        "passes": info.passes,
        "fusions": info.fusions,
        "model": src.model_spec,
        "parameters": list(program.graph_signature.parameters),
        "program": program_json,
        "program_sha256": hashlib.sha256(program_json.encode()).hexdigest(),
        "weights_sha256": weights_digest(tensors),
    }
    try:
        meta["header_sha256"] = header_digest(meta)
        header = json.dumps(meta)
    except TypeError as exc:
        raise EngineFileError(
            f"cannot save: engine options are not JSON-serialisable: {exc}"
        ) from exc
    out = Path(path)
    try:
        with atomic_path(out) as tmp:
            save_file(tensors, str(tmp), metadata={_META_KEY: header})
    except (OSError, SafetensorError) as exc:  # a full disk, a read-only folder, a dir
        raise EngineFileError(
            f"cannot write {out}: {exc} (a file there is left as it was)"
        ) from exc
    return out


def read(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Parse and verify an engine file; returns (metadata, tensors). Builds nothing."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if p.is_dir():
        raise EngineFileError(f"{p} is a directory, not an engine file")
    if not p.is_file():
        raise EngineFileError(f"engine file {p} does not exist")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as fh:
            raw = (fh.metadata() or {}).get(_META_KEY)
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open API
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise EngineFileError(
            f"{p} is not a readable engine file (truncated or corrupt?): {exc}"
        ) from exc
    if raw is None:
        raise EngineFileError(f"{p} is a safetensors file but not a segfast engine (no header)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise EngineFileError(f"{p}: engine header is not valid JSON (corrupt?): {exc}") from exc
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise EngineFileError(
            f"{p}: engine format {meta.get('format')!r} v{meta.get('format_version')} is not "
            f"{FORMAT!r} v{FORMAT_VERSION}"
        )
    # files written before the header digest existed have none: their other fields
    # load as they are (the program and weights are still checked)
    if "header_sha256" in meta and header_digest(meta) != meta["header_sha256"]:
        raise EngineFileError(
            f"{p}: the engine header does not match its sha256 (modified or corrupt)"
        )
    _check_fields(meta, p)
    program = meta.get("program", "")
    if hashlib.sha256(program.encode()).hexdigest() != meta.get("program_sha256"):
        raise EngineFileError(f"{p}: the stored program does not match its sha256 (modified?)")
    if weights_digest(tensors) != meta.get("weights_sha256"):
        raise EngineFileError(f"{p}: the weights do not match their sha256 (modified or corrupt)")
    return meta, tensors


# The header fields loading reads, and what each must be (files without the header
# digest — older ones — are checked field by field here only).
_FIELDS: dict[str, type | tuple[type, ...]] = {
    "segfast_version": str, "torch_version": str, "backend": str, "precision": str,
    "output": str, "threshold": (int, float), "dynamic": list, "options": (dict, type(None)),
    "device": dict, "inputs": list, "program": str,
}  # fmt: skip


def _check_fields(meta: dict[str, Any], p: Path) -> None:
    """An :class:`EngineFileError` naming the first header field that is missing or of
    the wrong kind (a corrupt file, not a ``KeyError`` deep in loading)."""
    bad = next((k for k, t in _FIELDS.items() if not isinstance(meta.get(k), t)), None)
    if bad is None and not isinstance(meta["device"].get("type"), str):
        bad = "device"
    for s in meta["inputs"] if bad is None else ():
        dtype = getattr(torch, str(s.get("dtype")), None) if isinstance(s, dict) else None
        shape = s.get("shape") if isinstance(s, dict) else None
        if not isinstance(dtype, torch.dtype) or not (
            isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
        ):
            bad = "inputs"
            break
    if bad is not None:
        raise EngineFileError(
            f"{p}: the engine header's {bad!r} is missing or malformed (corrupt file?)"
        )


def check_compatible(
    meta: dict[str, Any], path: Path, device: torch.device, input_shape: Any
) -> None:
    """Raise :class:`EngineFileError` unless the file at ``path`` (metadata ``meta``) was built
    with this segfast and torch, for a device this machine has, and takes ``input_shape``."""
    here = {"segfast": __version__, "torch": torch.__version__}
    for what, key in (("segfast", "segfast_version"), ("torch", "torch_version")):
        if _minor(str(meta[key])) != _minor(here[what]):
            raise EngineFileError(
                f"{path} was built with {what} {meta[key]}; this is {what} {here[what]}. "
                f"Rebuild the engine with this version."
            )
    built = meta["device"]
    if device.type == "cuda" and not torch.cuda.is_available():
        if built["type"] == "cuda":
            raise EngineFileError(f"{path} was built for CUDA ({built.get('name')}); no GPU here")
        raise EngineFileError(f"cannot load {path} on {device}: no GPU here")
    if device.type != built["type"] and meta["backend"] in ("triton", "tensorrt"):
        raise EngineFileError(
            f"{path} is a {meta['backend']} engine built for {built['type']}; "
            f"it cannot run on {device.type}"
        )
    if input_shape is not None:
        spec = meta["inputs"][0]
        want, dyn = list(spec["shape"]), spec["dynamic"]
        got = list(input_shape)
        names = ["batch", "channels", "height", "width"]
        ok = len(got) == len(want) and all(
            g == w or (d < 4 and names[d] in dyn and dyn[names[d]][0] <= g <= dyn[names[d]][1])
            for d, (g, w) in enumerate(zip(got, want, strict=False))
        )
        if not ok:
            raise EngineFileError(
                f"{path} was built for input {want}"
                + (f" (dynamic {dyn})" if dyn else " (static)")
                + f"; asked for {got}"
            )


def io_of(meta: dict[str, Any]) -> Any:
    """The :class:`~segfast.runtime.engine_io.EngineIO` (input geometry, output kind) an
    engine file describes, without building it (e.g. to plan tiles for workers that
    load the engine elsewhere). The device is the one it was built for."""
    from types import SimpleNamespace

    from segfast.runtime.engine_io import EngineIO

    specs = [
        SimpleNamespace(
            shape=tuple(s["shape"]),
            dynamic={k: tuple(v) for k, v in s["dynamic"].items()},
            torch_dtype=getattr(torch, s["dtype"]),
        )
        for s in meta["inputs"]
    ]
    info = SimpleNamespace(
        inputs=specs, output=meta["output"], num_classes=None,
        device=meta["device"]["type"], threshold=meta.get("threshold", 0.5),
    )  # fmt: skip
    return EngineIO.of(SimpleNamespace(info=info))
