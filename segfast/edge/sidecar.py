"""TensorRT plan sidecars and engine-cache keys — torch-free, shared by the builder
(``segfast.export.tensorrt``) and the edge runtime (``segfast.edge``).

A TensorRT plan is executable code for one TensorRT version and one GPU architecture, so
``m.plan`` never travels alone: ``m.plan.json`` beside it records what the plan is and
what it was built for::

    {"format": "segfast-tensorrt-plan", "format_version": 1,
     "plan": {"sha256": …, "bytes": …},
     "tensorrt": {"version": "10.8.0.43", "strongly_typed": true},
     "cuda": {"runtime": "12.8", "driver": 12080},        (informational)
     "gpu": {"name": "NVIDIA H100 80GB HBM3", "capability": [9, 0]},
     "precision": "fp16",
     "inputs":  [{"name", "dtype", "shape" (−1 = dynamic), "profile": {"min", "opt", "max"}}],
     "outputs": [{"name", "dtype", "shape"}],
     "onnx": {"sha256": …, "opset": 18},
     "head": {"output": "mask", "threshold": 0.5, "num_classes": 21},
     "preprocess": {"mean", "std", "input_order", "align_corners"},
     "segfast_version": "0.1.0", "cache_key": …, "builder": {…}}

Loading is two steps, both before TensorRT sees a byte: :func:`read_plan` (the sidecar
exists and parses, has every field with the right type, and the plan's size and sha256
match — else the plan is truncated, replaced or tampered with) and
:func:`check_environment` (this machine's TensorRT version and GPU compute capability
equal the plan's). The plan bytes :func:`read_plan` returns are the ones it hashed, so
nothing can swap the file between the check and the deserialisation. The digest detects
corruption and mismatched files; it is not a signature (anyone who can write the plan can
rewrite the sidecar), so deploy plans only from builds you trust.

:func:`cache_key` is the engine cache's key: a sha256 over the ONNX model's bytes (its
sha256), every input's optimisation-profile shapes, the precision, the TensorRT version
and the compute capability — exactly what makes a cached plan unusable when it changes.
Paths, file names, timing caches and builder knobs (workspace, optimisation level) do not
enter it: they change how long a build takes or which tactics win, not whether a plan
built from the same inputs is correct here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segfast._io import atomic_path
from segfast.errors import EngineFileError, InputError

FORMAT = "segfast-tensorrt-plan"
FORMAT_VERSION = 1
CACHE_KEY_VERSION = 1
PRECISIONS = ("fp32", "fp16", "int8")  # int8: a Q/DQ graph, fp32 inputs and outputs
SIDECAR_SUFFIX = ".json"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def sidecar_path(plan_path: str | os.PathLike[str]) -> Path:
    """The sidecar of ``plan_path``: the same name with ``.json`` appended (m.plan.json)."""
    p = Path(plan_path)
    return p.with_name(p.name + SIDECAR_SUFFIX)


# ---------------------------------------------------------------------------------------
# Profiles and the cache key
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """One input's optimisation-profile shapes: min ≤ opt ≤ max per dimension."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def __post_init__(self) -> None:
        for label, s in (("min", self.min), ("opt", self.opt), ("max", self.max)):
            if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in s):
                raise ValueError(f"profile {label} shape must be positive integers, got {s}")
        if not len(self.min) == len(self.opt) == len(self.max):
            raise ValueError(
                f"profile shapes must have one rank, got min {self.min}, opt {self.opt}, "
                f"max {self.max}"
            )
        if not all(a <= b <= c for a, b, c in zip(self.min, self.opt, self.max, strict=True)):
            raise ValueError(
                f"profile shapes must satisfy min ≤ opt ≤ max per dimension, got min "
                f"{self.min}, opt {self.opt}, max {self.max}"
            )

    @classmethod
    def fixed(cls, shape: Sequence[int]) -> Profile:
        s = tuple(int(d) for d in shape)
        return cls(s, s, s)

    @property
    def dynamic(self) -> bool:
        return self.min != self.max

    def as_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    def check(self, name: str, shape: Sequence[int]) -> None:
        """Raise :class:`InputError` unless ``shape`` lies within the profile."""
        s = tuple(int(d) for d in shape)
        if len(s) != len(self.min) or not all(
            lo <= d <= hi for lo, d, hi in zip(self.min, s, self.max, strict=True)
        ):
            rng = (
                f"{list(self.min)}"
                if not self.dynamic
                else f"between {list(self.min)} and {list(self.max)}"
            )
            raise InputError(f"input {name!r} must have shape {rng} for this engine, got {list(s)}")


def _capability(capability: Sequence[int]) -> tuple[int, int]:
    cap = tuple(capability)
    if len(cap) != 2 or not all(isinstance(c, int) and not isinstance(c, bool) for c in cap):
        raise ValueError(f"compute capability must be (major, minor) integers, got {capability}")
    return cap  # type: ignore[return-value]


def cache_key(
    *,
    onnx_sha256: str,
    profiles: Mapping[str, Profile],
    precision: str,
    tensorrt_version: str,
    capability: Sequence[int],
) -> str:
    """The engine cache's key (hex sha256): changes exactly when a cached plan would be
    wrong or unloadable — another model (``onnx_sha256``, the exported file's sha256),
    other input shapes or profile ranges, another precision, TensorRT version or GPU
    compute capability — and for nothing else (input order in ``profiles`` included)."""
    if not isinstance(onnx_sha256, str) or not _SHA256.match(onnx_sha256):
        raise ValueError(f"onnx_sha256 must be 64 lowercase hex digits, got {onnx_sha256!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not isinstance(tensorrt_version, str) or not tensorrt_version:
        raise ValueError(f"tensorrt_version must be a version string, got {tensorrt_version!r}")
    if not profiles:
        raise ValueError("profiles must name at least one input")
    for name, prof in profiles.items():
        if not isinstance(prof, Profile):
            raise TypeError(f"profiles[{name!r}] must be a Profile, got {type(prof).__name__}")
    payload = {
        "key_version": CACHE_KEY_VERSION,
        "onnx": onnx_sha256,
        "profiles": {name: profiles[name].as_dict() for name in sorted(profiles)},
        "precision": precision,
        "tensorrt": tensorrt_version,
        "capability": list(_capability(capability)),
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


# ---------------------------------------------------------------------------------------
# The sidecar
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """An engine input or output: name, dtype name (numpy's spelling), shape (−1: dynamic),
    and for inputs the optimisation-profile range."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    profile: Profile | None = None

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.profile is not None:
            d["profile"] = self.profile.as_dict()
        return d


@dataclass(frozen=True)
class PlanMeta:
    """A verified sidecar: the fields every loader needs, plus the whole document."""

    plan_sha256: str
    plan_bytes: int
    tensorrt_version: str
    capability: tuple[int, int]
    gpu_name: str
    precision: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    onnx_sha256: str
    output: str  # the head: "logits" | "probs" | "mask"
    cache_key: str
    preprocess: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    def input(self, name: str) -> TensorSpec:
        for t in self.inputs:
            if t.name == name:
                return t
        raise KeyError(f"no input {name!r}; inputs: {[t.name for t in self.inputs]}")


def make_sidecar(
    *,
    plan_data: bytes,
    tensorrt_version: str,
    strongly_typed: bool,
    capability: Sequence[int],
    gpu_name: str,
    precision: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    onnx_sha256: str,
    opset: int | None,
    output: str,
    threshold: float,
    num_classes: int | None = None,
    preprocess: Mapping[str, Any],
    segfast_version: str,
    cuda: Mapping[str, Any],
    builder: Mapping[str, Any],
) -> dict[str, Any]:
    """The sidecar document for a freshly built plan (see the module docstring)."""
    profiles = {}
    for t in inputs:
        if t.profile is None:
            raise ValueError(f"input {t.name!r} has no profile")
        profiles[t.name] = t.profile
    cap = _capability(capability)
    key = cache_key(
        onnx_sha256=onnx_sha256,
        profiles=profiles,
        precision=precision,
        tensorrt_version=tensorrt_version,
        capability=cap,
    )
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "plan": {"sha256": hashlib.sha256(plan_data).hexdigest(), "bytes": len(plan_data)},
        "tensorrt": {"version": tensorrt_version, "strongly_typed": bool(strongly_typed)},
        "cuda": dict(cuda),
        "gpu": {"name": gpu_name, "capability": list(cap)},
        "precision": precision,
        "inputs": [t.as_dict() for t in inputs],
        "outputs": [t.as_dict() for t in outputs],
        "onnx": {"sha256": onnx_sha256, "opset": opset},
        "head": {"output": output, "threshold": float(threshold), "num_classes": num_classes},
        "preprocess": dict(preprocess),
        "segfast_version": segfast_version,
        "cache_key": key,
        "builder": dict(builder),
    }


def write_plan(
    plan_path: str | os.PathLike[str], plan_data: bytes, sidecar: dict[str, Any]
) -> Path:
    """Write ``plan_path`` and its sidecar, each atomically (sidecar last, so a reader never
    sees a new sidecar beside an old plan). Returns the sidecar's path."""
    if sidecar["plan"]["sha256"] != hashlib.sha256(plan_data).hexdigest():
        raise ValueError("the sidecar does not describe these plan bytes")
    with atomic_path(plan_path) as tmp:
        tmp.write_bytes(plan_data)
    side = sidecar_path(plan_path)
    with atomic_path(side) as tmp:
        tmp.write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
    return side


def _field(doc: Mapping[str, Any], path: str, kind: type | tuple[type, ...], where: Path) -> Any:
    """doc[a][b]… for path "a.b", of type ``kind``, or an EngineFileError naming both."""
    cur: Any = doc
    for part in path.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            raise EngineFileError(f"{where}: sidecar has no field {path!r}")
        cur = cur[part]
    # bool is an int subclass: a JSON true must not pass for a number.
    if (isinstance(cur, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,))) or (
        not isinstance(cur, kind)
    ):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise EngineFileError(
            f"{where}: sidecar field {path!r} must be {names}, got {type(cur).__name__} {cur!r}"
        )
    return cur


def _shape(value: Any, what: str, where: Path, *, allow_dynamic: bool) -> tuple[int, ...]:
    lo = -1 if allow_dynamic else 1
    if not isinstance(value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and (d >= 1 or d == lo) for d in value
    ):
        raise EngineFileError(
            f"{where}: sidecar {what} must be a list of dimensions, got {value!r}"
        )
    return tuple(value)


def _tensors(doc: Mapping[str, Any], key: str, where: Path) -> tuple[TensorSpec, ...]:
    items = _field(doc, key, list, where)
    if not items:
        raise EngineFileError(f"{where}: sidecar lists no {key}")
    specs = []
    for i, t in enumerate(items):
        if not isinstance(t, Mapping):
            raise EngineFileError(f"{where}: sidecar {key}[{i}] must be an object, got {t!r}")
        name = _field(t, "name", str, where)
        dtype = _field(t, "dtype", str, where)
        shape = _shape(t.get("shape"), f"{key}[{i}].shape", where, allow_dynamic=True)
        profile = None
        if key == "inputs":
            p = _field(t, "profile", Mapping, where)
            try:
                profile = Profile(
                    *(
                        _shape(p.get(k), f"{key}[{i}].profile.{k}", where, allow_dynamic=False)
                        for k in ("min", "opt", "max")
                    )
                )
            except ValueError as exc:
                raise EngineFileError(f"{where}: sidecar {key}[{i}]: {exc}") from None
            if len(profile.min) != len(shape) or any(
                d != -1 and not lo == d == hi
                for d, lo, hi in zip(shape, profile.min, profile.max, strict=True)
            ):
                raise EngineFileError(
                    f"{where}: sidecar {key}[{i}] profile {profile.as_dict()} does not fit "
                    f"its shape {list(shape)}"
                )
        specs.append(TensorSpec(name, dtype, shape, profile))
    return tuple(specs)


def parse_sidecar(doc: Any, where: Path) -> PlanMeta:
    """Validate a sidecar document's structure and types (not the plan or the machine)."""
    if not isinstance(doc, dict):
        raise EngineFileError(f"{where}: a sidecar is a JSON object, got {type(doc).__name__}")
    fmt = doc.get("format")
    if fmt != FORMAT:
        raise EngineFileError(
            f"{where}: not a segfast plan sidecar (format {fmt!r}, want {FORMAT!r})"
        )
    version = _field(doc, "format_version", int, where)
    if version != FORMAT_VERSION:
        raise EngineFileError(
            f"{where}: sidecar format version {version}; this segfast reads version "
            f"{FORMAT_VERSION}: rebuild the plan"
        )
    sha = _field(doc, "plan.sha256", str, where)
    onnx_sha = _field(doc, "onnx.sha256", str, where)
    for label, digest in (("plan.sha256", sha), ("onnx.sha256", onnx_sha)):
        if not _SHA256.match(digest):
            raise EngineFileError(f"{where}: sidecar {label} is not a sha256, got {digest!r}")
    n_bytes = _field(doc, "plan.bytes", int, where)
    cap = _field(doc, "gpu.capability", list, where)
    if len(cap) != 2 or not all(isinstance(c, int) and not isinstance(c, bool) for c in cap):
        raise EngineFileError(f"{where}: sidecar gpu.capability must be [major, minor], got {cap}")
    precision = _field(doc, "precision", str, where)
    if precision not in PRECISIONS:
        raise EngineFileError(
            f"{where}: sidecar precision must be one of {PRECISIONS}, got {precision!r}"
        )
    output = _field(doc, "head.output", str, where)
    if output not in ("logits", "probs", "mask"):
        raise EngineFileError(
            f"{where}: sidecar head.output must be logits/probs/mask, got {output!r}"
        )
    return PlanMeta(
        plan_sha256=sha,
        plan_bytes=n_bytes,
        tensorrt_version=_field(doc, "tensorrt.version", str, where),
        capability=(cap[0], cap[1]),
        gpu_name=_field(doc, "gpu.name", str, where),
        precision=precision,
        inputs=_tensors(doc, "inputs", where),
        outputs=_tensors(doc, "outputs", where),
        onnx_sha256=onnx_sha,
        output=output,
        cache_key=_field(doc, "cache_key", str, where),
        preprocess=dict(_field(doc, "preprocess", Mapping, where)),
        raw=doc,
    )


def read_plan(
    plan_path: str | os.PathLike[str], sidecar: str | os.PathLike[str] | None = None
) -> tuple[PlanMeta, bytes]:
    """The verified sidecar and the plan's bytes — integrity only, no TensorRT needed.

    Refuses (:class:`EngineFileError`) a missing plan or sidecar, a sidecar that is not
    valid JSON or lacks a field, and a plan whose size or sha256 differs from the
    sidecar's (truncated, replaced, tampered with). ``sidecar`` defaults to
    ``<plan>.json``. Follow with :func:`check_environment` before deserialising.
    """
    plan = Path(plan_path)
    side = Path(sidecar) if sidecar is not None else sidecar_path(plan)
    if not plan.is_file():
        raise EngineFileError(f"{plan}: no such plan file")
    if not side.is_file():
        raise EngineFileError(
            f"{plan}: its sidecar {side.name} is missing; a TensorRT plan is executable code "
            "and segfast loads none without the sidecar that vouches for it (rebuild with "
            "`segfast build`)"
        )
    try:
        doc = json.loads(side.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EngineFileError(f"{side}: the sidecar is not valid JSON ({exc})") from None
    meta = parse_sidecar(doc, side)
    data = plan.read_bytes()
    if len(data) != meta.plan_bytes:
        raise EngineFileError(
            f"{plan}: {len(data)} bytes, but its sidecar records {meta.plan_bytes}: the plan "
            "is truncated or was replaced; refusing to deserialise it"
        )
    digest = hashlib.sha256(data).hexdigest()
    if digest != meta.plan_sha256:
        raise EngineFileError(
            f"{plan}: sha256 {digest[:16]}… does not match its sidecar's "
            f"{meta.plan_sha256[:16]}…: the plan was modified or corrupted; refusing to "
            "deserialise it"
        )
    return meta, data


def check_environment(
    meta: PlanMeta, *, tensorrt_version: str, capability: Sequence[int], where: str = "plan"
) -> None:
    """Refuse a plan built for another TensorRT version or GPU architecture.

    TensorRT plans load only into the TensorRT version that built them (segfast builds no
    version-compatible plans) and run only on the compute capability they were built for.
    """
    if meta.tensorrt_version != tensorrt_version:
        raise EngineFileError(
            f"{where}: built with TensorRT {meta.tensorrt_version}, this machine has TensorRT "
            f"{tensorrt_version}; plans load only into the version that built them: rebuild "
            "it here"
        )
    cap = _capability(capability)
    if tuple(meta.capability) != cap:
        raise EngineFileError(
            f"{where}: built for compute capability {meta.capability[0]}.{meta.capability[1]} "
            f"({meta.gpu_name}), this GPU is {cap[0]}.{cap[1]}; rebuild the plan on this GPU"
        )


def load_verified(
    plan_path: str | os.PathLike[str],
    *,
    tensorrt_version: str,
    capability: Sequence[int],
    sidecar: str | os.PathLike[str] | None = None,
) -> tuple[PlanMeta, bytes]:
    """:func:`read_plan` then :func:`check_environment`: the bytes are safe to deserialise."""
    meta, data = read_plan(plan_path, sidecar)
    check_environment(
        meta, tensorrt_version=tensorrt_version, capability=capability, where=str(plan_path)
    )
    return meta, data
