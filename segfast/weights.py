"""Loading and saving model weights: safetensors or PyTorch state dicts, never pickle.

``load_weights(model, path)`` checks every key and shape before touching the
model and raises one :class:`~segfast.errors.WeightsError` that lists the first
mismatches; a corrupt, truncated or non-tensor file gives a clear error too.
PyTorch files are read with ``torch.load(weights_only=True)``, which refuses to
run code hidden in a pickle.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segfast._io import atomic_path
from segfast.errors import WeightsError

# How many mismatches an error message lists per kind before it summarises.
_MAX_LISTED = 10
# Common wrappers around a state dict in training checkpoints.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")


def _is_safetensors(path: Path) -> bool:
    # safetensors: 8-byte little-endian header length, then a JSON object.
    with open(path, "rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise WeightsError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}"
        ) from exc


def _read_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message: generic advice, then "WeightsUnpickler error: <what>".
        text = str(exc)
        detail = " ".join(text.partition("WeightsUnpickler error:")[2].split()[:40])
        detail = detail.split(" Check the documentation")[0] or text.splitlines()[0]
        if "Unsupported global" not in text:  # not a pickle of objects: random or cut bytes
            raise WeightsError(
                f"{path} is not a readable PyTorch weights file (truncated or corrupt?): {detail}"
            ) from exc
        # weights_only=True refuses pickles holding anything but tensors and
        # plain containers; say so instead of falling back to unsafe loading.
        raise WeightsError(
            f"{path} holds Python objects other than tensors, which segfast refuses to "
            f"unpickle (weights_only=True). Save a plain state dict or safetensors. "
            f"Detail: {detail}"
        ) from exc
    except Exception as exc:  # a corrupt pickle stream fails in arbitrary ways (IndexError...)
        raise WeightsError(
            f"{path} is not a readable PyTorch weights file (truncated or corrupt?): {exc}"
        ) from exc


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Find the state dict inside a checkpoint and check it holds only tensors."""
    if isinstance(obj, nn.Module):  # cannot happen with weights_only, but be explicit
        raise WeightsError(f"{path} holds a whole module; save its state_dict() instead")
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, not a state dict")
    for key in _WRAPPER_KEYS:
        inner = obj.get(key)
        if (
            isinstance(inner, Mapping)
            and inner
            and all(isinstance(v, torch.Tensor) for v in inner.values())
        ):
            obj = inner
            break
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(
            f"{path} is not a state dict of tensors: entries {bad[:_MAX_LISTED]} are "
            f"{sorted({type(obj[k]).__name__ for k in bad})}"
        )
    return _without_module_prefix({str(k): v for k, v in obj.items()})


def _without_module_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoints saved from DataParallel / DistributedDataParallel prefix every key
    with ``module.`` (in either format: a .pt state dict or a safetensors file)."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file or a PyTorch state dict (``weights_only=True``).

    The format is recognised from the content, not the suffix. Checkpoints that
    wrap the weights (``{"state_dict": ...}``, ``{"model": ...}``) and the
    ``module.`` prefix of DataParallel are unwrapped.
    """
    p = Path(path)
    if not p.exists():
        raise WeightsError(f"weights file {p} does not exist")
    if p.is_dir():
        raise WeightsError(f"weights path {p} is a directory, expected a file")
    if p.stat().st_size == 0:
        raise WeightsError(f"weights file {p} is empty")
    if _is_safetensors(p):
        return _without_module_prefix(_read_safetensors(p))
    if p.suffix == ".safetensors":
        raise WeightsError(f"{p} has a .safetensors name but no safetensors header (corrupt?)")
    return _unwrap(_read_torch(p), p)


def _mismatch_report(
    model: nn.Module, state: Mapping[str, torch.Tensor]
) -> tuple[list[str], list[str], list[str]]:
    expected = model.state_dict()
    # BatchNorm's step counter is not a weight; older checkpoints lack it.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    return missing, unexpected, shapes


def _listing(title: str, items: list[str]) -> str:
    more = f" (and {len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    lines = "\n".join(f"    {it}" for it in items[:_MAX_LISTED])
    return f"  {len(items)} {title}{more}:\n{lines}"


def _kind_mismatches(model: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys whose tensor is integer where the model's is floating point, or the other
    way round: ``load_state_dict`` would cast them silently (a label map loaded as a
    weight, a float into a BatchNorm's ``num_batches_tracked``). fp16/bf16 → fp32 and
    the like are fine."""
    own = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    out = []
    for k, v in state.items():
        mine = own.get(k)
        if mine is not None and mine.is_floating_point() != v.is_floating_point():
            out.append(f"{k}: {str(v.dtype).removeprefix('torch.')} for "
                       f"{str(mine.dtype).removeprefix('torch.')}")  # fmt: skip
    return out


def load_weights(
    model: nn.Module,
    weights: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
) -> nn.Module:
    """Load ``weights`` (a file path or a state dict) into ``model`` and return it.

    Every key and shape is checked first; with ``strict=True`` any missing or
    unexpected key or shape mismatch raises one :class:`WeightsError` listing the
    first mismatches of each kind, and the model is left untouched. With
    ``strict=False`` missing and unexpected keys are tolerated, shape mismatches
    never are.
    """
    if isinstance(weights, Mapping):
        state = _unwrap(weights, Path("<state dict>"))
        source = "the state dict"
    else:
        state = load_state_dict(weights)
        source = str(weights)
    missing, unexpected, shapes = _mismatch_report(model, state)
    problems = []
    if shapes:
        problems.append(_listing("shape mismatches", shapes))
    kinds = _kind_mismatches(model, state)
    if kinds:
        problems.append(_listing("dtype mismatches (integer ↔ floating point)", kinds))
    if strict and missing:
        problems.append(_listing("keys missing from the file", missing))
    if strict and unexpected:
        problems.append(_listing("unexpected keys in the file", unexpected))
    if problems:
        raise WeightsError(
            f"weights in {source} do not match {type(model).__name__}:\n" + "\n".join(problems)
        )
    model.load_state_dict(dict(state), strict=False)
    return model


def save_weights(
    model_or_state: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Save weights as safetensors, atomically (a failed save leaves no file).

    Tensors that share storage are copied apart (safetensors refuses aliases).
    ``metadata`` is stored as one JSON entry (``"segfast"``) of the file header,
    with sorted keys so equal inputs give byte-identical files; a model built by
    :func:`segfast.models.create` records its name and options there too.
    """
    from safetensors.torch import save_file

    if isinstance(model_or_state, nn.Module):
        state = model_or_state.state_dict()
        spec = getattr(model_or_state, "segfast_spec", None)
    else:
        state, spec = dict(model_or_state), None
    seen: set[tuple[int, int]] = set()
    tensors: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        t = t.detach().to("cpu")
        ident = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if ident in seen or not t.is_contiguous():
            t = t.contiguous().clone()
        else:
            seen.add(ident)
        tensors[key] = t
    # One header entry with sorted keys: safetensors writes several entries in hash
    # order, which would make the file's bytes (and its sha256) differ run to run.
    meta = dict(metadata or {})
    if spec is not None:
        meta.setdefault("model", spec)
    header = {"segfast": json.dumps(meta, sort_keys=True, default=list)} if meta else None
    out = Path(path)
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return out
