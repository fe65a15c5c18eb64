"""Helpers shared by the Triton kernel modules: activation codes, the launch
device check, and the one factory every autotuned kernel takes its configs from.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

# Epilogue activations, as constexpr codes the kernels branch on at compile time.
ACTIVATIONS: dict[str, int] = {
    "none": 0,
    "relu": 1,
    "relu6": 2,
    "leaky_relu": 3,  # slope in act_param
    "silu": 4,
    "sigmoid": 5,
    "tanh": 6,
}


def act_code(act: str) -> int:
    """The constexpr code of an activation name, with a clear error for unknown ones."""
    try:
        return ACTIVATIONS[act]
    except KeyError:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {act!r}") from None


def apply_activation_reference(y: torch.Tensor, act: str, act_param: float = 0.01) -> torch.Tensor:
    """The PyTorch reference of every epilogue activation."""
    act_code(act)
    if act == "none":
        return y
    if act == "relu":
        return torch.relu(y)
    if act == "relu6":
        return torch.clamp(y, 0.0, 6.0)
    if act == "leaky_relu":
        return torch.nn.functional.leaky_relu(y, act_param)
    if act == "silu":
        return torch.nn.functional.silu(y)
    if act == "sigmoid":
        return torch.sigmoid(y)
    return torch.tanh(y)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_device(*tensors: torch.Tensor | None) -> torch.device:
    """All tensors on one device that Triton can launch on; returns that device.

    CUDA tensors run compiled kernels; CPU tensors only under the interpreter.
    """
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    (device,) = devices
    if device.type == "cuda":
        return device
    if device.type == "cpu" and interpreting():
        return device
    raise RuntimeError(
        f"Triton kernels run on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1); "
        f"got a {device.type} tensor without the interpreter"
    )


def check_float_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def autotune_configs(
    space: Iterable[dict[str, int]],
    *,
    num_warps: Iterable[int] = (4, 8),
    num_stages: Iterable[int] = (3, 4),
    interpreter_config: dict[str, int],
):  # -> list[triton.Config]
    """The one factory of autotune configs.

    On a GPU every block-size dict in ``space`` is crossed with ``num_warps`` and
    ``num_stages``; under the interpreter, where tuning is meaningless and every
    config costs seconds, only ``interpreter_config`` with one warp and stage.
    """
    import triton

    if interpreting():
        return [triton.Config(dict(interpreter_config), num_warps=1, num_stages=1)]
    return [
        triton.Config(dict(blocks), num_warps=w, num_stages=s)
        for blocks in space
        for w in num_warps
        for s in num_stages
    ]


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
