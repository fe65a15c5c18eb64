"""Engine precisions: the names users give (``"fp16"``) and the dtypes they mean."""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# int8 engines: convolutions on int8, everything else (and fallback layers) in fp32
PRECISIONS = (*DTYPES, "int8")


def compute_dtype(precision: str) -> torch.dtype:
    """The floating-point dtype an engine of ``precision`` computes in (fp32 for int8)."""
    return torch.float32 if precision == "int8" else DTYPES[precision]


def resolve_precision(precision: str | torch.dtype) -> torch.dtype:
    """``"fp16"`` / ``"half"`` / ``"float16"`` / ``torch.float16`` → ``torch.float16`` (etc.);
    ``ValueError`` naming the choices for anything else."""
    if isinstance(precision, torch.dtype):
        if precision not in DTYPE_NAMES:
            raise ValueError(f"precision must be fp32, fp16 or bf16, got {precision}")
        return precision
    key = str(precision).lower().replace("float", "fp").replace("bfloat", "bf")
    key = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "half": "fp16"}.get(key, key)
    if key not in DTYPES:
        raise ValueError(f"precision must be 'fp32', 'fp16' or 'bf16', got {precision!r}")
    return DTYPES[key]
