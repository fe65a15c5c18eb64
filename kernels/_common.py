"""Helpers shared by the Triton kernel modules: activation codes, the launch
device check, the GPU a launch targets, and the one factory every autotuned kernel
takes its configs from.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

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
    "hardswish": 7,  # y·relu6(y + 3)/6 (MobileNetV3)
    "hardsigmoid": 8,  # relu6(y + 3)/6
    "gelu": 9,  # act_param 0: exact (erf); 1: the tanh approximation
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
    if act == "hardswish":
        return torch.nn.functional.hardswish(y)
    if act == "hardsigmoid":
        return torch.nn.functional.hardsigmoid(y)
    if act == "gelu":
        return torch.nn.functional.gelu(y, approximate="tanh" if act_param else "none")
    return torch.tanh(y)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class GpuTarget:
    """What the launchers and the autotune pruning need to know of the GPU a launch runs on."""

    capability: tuple[int, int]  # (9, 0): H100/H200; (8, 7): Jetson Orin
    sm_count: int
    max_shared: int  # bytes of shared memory one block may use (the opt-in maximum)


# Set only inside ``meta_launches``: the GPU that launches on ``meta`` tensors stand for.
_META_TARGET: contextvars.ContextVar[GpuTarget | None] = contextvars.ContextVar(
    "segfast_meta_target", default=None
)


@contextlib.contextmanager
def meta_launches(target: GpuTarget) -> Iterator[None]:
    """Let the launchers take ``meta`` tensors, as if they ran on ``target``.

    For the ahead-of-time compile check (``segfast.kernels.compile_check``), which drives
    every launcher on meta tensors (no memory, no GPU) with Triton's launch intercepted,
    to compile exactly what a real call would. Outside this context a meta tensor is
    refused like any other non-CUDA tensor.
    """
    token = _META_TARGET.set(target)
    try:
        yield
    finally:
        _META_TARGET.reset(token)


@functools.cache
def _cuda_target(index: int) -> GpuTarget:
    from triton.runtime import driver

    props = driver.active.utils.get_device_properties(index)
    return GpuTarget(
        torch.cuda.get_device_capability(index),
        int(props["multiprocessor_count"]),
        int(props["max_shared_mem"]),
    )


def launch_target(device: torch.device) -> GpuTarget | None:
    """The GPU a launch on ``device`` compiles for; None under the interpreter (CPU)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _cuda_target(index)
    if device.type == "meta":
        return _META_TARGET.get()
    return None


def check_device(*tensors: torch.Tensor | None) -> torch.device:
    """All tensors on one device that Triton can launch on; returns that device.

    CUDA tensors run compiled kernels; CPU tensors only under the interpreter; meta
    tensors only inside :func:`meta_launches` (the compile check).
    """
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    (device,) = devices
    if device.type == "cuda":
        return device
    if device.type == "cpu" and interpreting():
        return device
    if device.type == "meta" and _META_TARGET.get() is not None:
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
    fits: Callable[[dict[str, int], int, int], bool] | None = None,
):  # -> list[triton.Config]
    """The one factory of autotune configs.

    On a GPU every block-size dict in ``space`` is crossed with ``num_warps`` and
    ``num_stages``, keeping the combinations ``fits(blocks, warps, stages)`` accepts:
    those that can never fit a GPU (registers spilled whatever the shape) are never
    compiled. What depends on the shape, the dtype or the GPU is each kernel's
    ``early_config_prune``. ``python benchmarks/compile_targets.py`` checks both.
    Under the interpreter, where tuning is meaningless and every config costs seconds,
    only ``interpreter_config`` with one warp and stage.
    """
    import triton

    if interpreting():
        return [triton.Config(dict(interpreter_config), num_warps=1, num_stages=1)]
    return [
        triton.Config(dict(blocks), num_warps=w, num_stages=s)
        for blocks in space
        for w in num_warps
        for s in num_stages
        if fits is None or fits(blocks, w, s)
    ]


def dot_loop_shared_bytes(
    m: int,
    n: int,
    k: int,
    num_stages: int,
    *,
    elem_bytes: int,
    wgmma: bool,
    a_loads: int = 1,
    staged_a: bool = False,
) -> int:
    """Shared memory Triton 3.9's software pipeliner gives a K loop of ``tl.dot`` over
    [m, k] × [k, n] tiles loaded from global memory (matched to the compiled kernels).

    num_stages − 1 buffered stages of every pipelined load — ``a_loads`` loads of the
    [m, k] tile (e.g. the four bilinear neighbours it is blended from) and the [k, n]
    tile; plus the A operand when it is computed in registers and staged for the dot
    (``staged_a``); plus, for Hopper's wgmma (sm_90, fp16/bf16), the A and B operands
    of the dot in flight.
    """
    a, b = m * k, k * n
    elems = (num_stages - 1) * (a_loads * a + b)
    elems += a if staged_a or wgmma else 0
    elems += b if wgmma else 0
    return elems * elem_bytes


def pixel_splits(n: int, c_blocks: int, hw: int, block_p: int, device: torch.device) -> int:
    """How many contiguous pixel ranges a per-(image, channel block) reduction over H·W
    is split into: ~2 programs per SM (one under the interpreter), at most 64, and no
    range shorter than one ``block_p`` tile (so none is empty)."""
    target = launch_target(device)
    sms = target.sm_count if target is not None else 1
    want = -(-2 * sms // max(1, n * c_blocks))
    return max(1, min(want, 64, -(-hw // block_p)))


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


# -- channel statistics written by the conv kernels' epilogues -------------------------
# Output pixels per statistics tile (``conv2d(..., stats=)``): every statistics launch
# tiles over exactly this many pixels of one image, so the consumers (GroupNorm, the
# squeeze-excitation gate) know T = ⌈H·W / STATS_BLOCK⌉ and each tile's pixel count.
STATS_BLOCK = 64


def stats_buffer(n: int, hw: int, channels: int, device: torch.device | str) -> torch.Tensor:
    """The [2, N, T, C] fp32 buffer of ``stats=`` for an output of N images of ``hw``
    pixels and C channels: [0] the per-tile means, [1] the per-tile M2s, T =
    ⌈hw / STATS_BLOCK⌉ tiles of STATS_BLOCK pixels (the last one shorter)."""
    return torch.empty((2, n, -(-hw // STATS_BLOCK), channels), dtype=torch.float32, device=device)


def check_stats(stats: torch.Tensor, n: int, hw: int, channels: int) -> None:
    want = (2, n, -(-hw // STATS_BLOCK), channels)
    if stats.dtype != torch.float32 or not stats.is_contiguous() or tuple(stats.shape) != want:
        raise ValueError(
            f"stats must be a contiguous float32 {list(want)} buffer (stats_buffer), "
            f"got {stats.dtype} {list(stats.shape)}"
        )
