"""Roofline: per op of a fused plan, its FLOPs, its compulsory DRAM bytes and the
time floor on a named device — beside the same count for the unfused graph.

    segfast info unet --size 512x512 --gpu h100          # per-op table and totals
    python -m segfast.bench.roofline                      # the zoo's floors (markdown)
    python -m segfast.bench.roofline --readme             # ... written into README.md

What is counted, per op of a graph (the fused plan ``segfast.api.plan`` gives, or the
captured ATen graph before the passes):

- **FLOPs**: 2 per multiply-add of convolutions (``aten.convolution``,
  ``segfast.conv2d`` with its two-source prologue — the input channels are both
  sources' —, ``segfast.conv_transpose2d``, the 1×1 conv inside ``segfast.head``)
  and matrix products (``mm``, ``addmm``, ``bmm``). Everything else — bias, BatchNorm,
  activations, residual adds, pooling, resizes, softmax, argmax — counts 0, as
  ``torch.utils.flop_counter`` counts (``segfast info``'s GFLOPs). So BatchNorm
  folding changes no count, and the fused plan has the unfused graph's FLOPs except
  where ``broadcast_branch`` moved a 1×1 conv's share of a constant (pooled) branch
  to 1×1 — the one pass that removes multiply-adds.
- **compulsory DRAM bytes**: every activation the op reads, once (the distinct
  elements: an ``expand``ed per-image vector is read as the vector), every weight
  once, and every output somebody reads, written once; views move nothing. A fused
  op's intermediates — the concat and the resized tensor of a two-source prologue,
  the pre-activation sum, full-resolution logits in the head — never touch DRAM:
  that is what fusion buys. A concat whose producers write their channel slice of
  one buffer (``concat_slices``) copies only the parts not written so. Floating
  tensors are counted at the precision's width (fp32/tf32 4 bytes, fp16/bf16 2,
  int8 1) except the graph's inputs, read as given; integer tensors (indices,
  masks) at their own width. Caches are assumed to hold nothing between ops (an
  op's inputs come from DRAM once) and everything within one.
- **floor** = max(FLOPs / peak[precision], bytes / DRAM bandwidth), per op; a plan's
  floor is the sum over its ops (they run one after another). Peaks are **dense**
  (no 2:4 sparsity). A kernel can beat a floor only by doing less than this counts
  (Winograd and FFT convolutions do fewer multiplies than 2 per multiply-add of the
  direct form) or by keeping a tensor in cache between ops.

``int8`` floors assume an engine with int8 weights and activations (1 byte each) on
int8 tensor cores; ``tf32`` one that runs fp32 convolutions on TF32 tensor cores.
segfast's own fp32 kernels use IEEE fp32 (never TF32): their floor is ``fp32``.
"""

from __future__ import annotations

import math
import operator
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from segfast.api import plan
from segfast.compiler.graph import concrete, get_tensor, val

aten = torch.ops.aten
segfast_ops = torch.ops.segfast

PRECISIONS = ("fp32", "tf32", "fp16", "bf16", "int8")
# Bytes a floating tensor takes in each precision (int8: quantised weights and activations).
STORAGE_BYTES = {"fp32": 4, "tf32": 4, "fp16": 2, "bf16": 2, "int8": 1}

T = 1e12


# -- devices --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Device:
    """One device's dense peaks (FLOP/s, or OP/s for int8) and DRAM bandwidth (bytes/s)."""

    name: str  # the key users type: --gpu h100
    title: str
    peaks: dict[str, float]
    bandwidth: float | None  # None: not known (the CPU estimate)
    source: str  # where every number comes from, and how the derived ones were derived
    estimated: bool = False  # the CPU: peaks estimated from flags, cores and clock
    # How a CUDA device is recognised: a regex on its name and, where the name is shared
    # by variants, its SM count (AGX Orin 64GB: 16; the 32GB module has 14). None: only
    # by ``--gpu NAME``.
    match: str | None = None
    sms: int | None = None

    def peak(self, precision: str) -> float:
        if precision not in self.peaks:
            raise ValueError(
                f"precision must be one of {', '.join(self.peaks)} on {self.name}, "
                f"got {precision!r}"
            )
        return self.peaks[precision]


def _hopper_sxm() -> dict[str, float]:
    # H100 SXM and H200 SXM: the same GH100 compute (datasheets' sparse figures / 2).
    return {"fp32": 67 * T, "tf32": 494.5 * T, "fp16": 989.5 * T, "bf16": 989.5 * T,
            "int8": 1979 * T}  # fmt: skip


def _orin(fp32: float, int8_sparse: float) -> dict[str, float]:
    # Jetson briefs publish the FP32 CUDA-core rate and sparse INT8 TOPS only. Ampere
    # tensor cores (GA10x/Orin) run dense INT8 at half the sparse rate, FP16 and BF16 at
    # half the INT8 rate, TF32 at half the FP16 rate.
    int8 = int8_sparse / 2
    return {"fp32": fp32, "tf32": int8 / 4, "fp16": int8 / 2, "bf16": int8 / 2, "int8": int8}


# Dense peaks (no 2:4 sparsity) and DRAM bandwidth. NVIDIA's datasheets quote tensor-core
# rates "with sparsity": the dense rate is half. fp32 is the CUDA-core (non-tensor) rate.
DEVICES: dict[str, Device] = {
    d.name: d
    for d in (
        Device(
            "h100",
            "NVIDIA H100 SXM5 80GB",
            _hopper_sxm(),
            3.35e12,
            "NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column: FP32 67 TFLOPS, TF32 989, "
            "BF16/FP16 1,979, INT8 3,958 (with sparsity; dense half), 3.35 TB/s HBM3 — "
            "https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet",
            match=r"H100(?!.*(PCIe|NVL))",
            sms=132,
        ),
        Device(
            "h200",
            "NVIDIA H200 SXM 141GB",
            _hopper_sxm(),
            4.8e12,
            "NVIDIA H200 Tensor Core GPU datasheet, H200 SXM column: the H100 SXM's compute "
            "(FP32 67 TFLOPS, TF32 989, BF16/FP16 1,979, INT8 3,958 with sparsity), 4.8 TB/s "
            "HBM3e — https://www.nvidia.com/en-us/data-center/h200/",
            match=r"H200(?!.*NVL)",
            sms=132,
        ),
        Device(
            "a100",
            "NVIDIA A100 SXM4 80GB",
            {"fp32": 19.5 * T, "tf32": 156 * T, "fp16": 312 * T, "bf16": 312 * T, "int8": 624 * T},
            2.039e12,
            "NVIDIA A100 Tensor Core GPU datasheet, A100 80GB SXM column: FP32 19.5 TFLOPS, "
            "TF32 156, BF16/FP16 312, INT8 624 TOPS (dense; 2× with sparsity), 2,039 GB/s "
            "HBM2e — https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
            "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf",
            match=r"A100-SXM4-80GB",
        ),
        Device(
            "l4",
            "NVIDIA L4 24GB",
            {"fp32": 30.3 * T, "tf32": 60 * T, "fp16": 121 * T, "bf16": 121 * T, "int8": 242.5 * T},
            300e9,
            "NVIDIA L4 Tensor Core GPU datasheet: FP32 30.3 TFLOPS, TF32 120, BF16/FP16 242, "
            "INT8 485 TOPS (with sparsity; dense half), 300 GB/s GDDR6 — "
            "https://www.nvidia.com/en-us/data-center/l4/",
            match=r"\bL4\b",
        ),
        Device(
            "agx-orin",
            "NVIDIA Jetson AGX Orin 64GB (GPU, MAXN)",
            _orin(5.3 * T, 170 * T),
            204.8e9,
            "NVIDIA Jetson AGX Orin Series Technical Brief v1.2 (64GB module): GPU of 2048 "
            "CUDA cores and 64 tensor cores at 1.3 GHz, 5.3 FP32 TFLOPS, 170 sparse INT8 TOPS "
            "(GPU only, DLAs excluded), 204.8 GB/s LPDDR5. Not published, derived: dense INT8 "
            "85 TOPS (sparse / 2), FP16 = BF16 = 42.5 TFLOPS (INT8 / 2; = 64 TCs × 256 FMA × "
            "2 × 1.3 GHz), TF32 21.3 (FP16 / 2) — https://www.nvidia.com/content/dam/en-zz/"
            "Solutions/gtcf21/jetson-orin/nvidia-jetson-agx-orin-technical-brief.pdf",
            match=r"Orin",
            sms=16,
        ),
        Device(
            "orin-nano",
            "NVIDIA Jetson Orin Nano 8GB (15 W, original clocks)",
            _orin(1.28 * T, 40 * T),
            68e9,
            "NVIDIA Jetson Orin Nano Series data sheet (8GB module): 1024 CUDA cores and 32 "
            "tensor cores at 625 MHz, 40 sparse INT8 TOPS, 68 GB/s LPDDR5. Derived: FP32 1.28 "
            "TFLOPS (1024 × 2 × 0.625 GHz), dense INT8 20 TOPS, FP16 = BF16 10, TF32 5 — "
            "https://www.nvidia.com/en-us/autonomous-machines/embedded-systems/jetson-orin/",
        ),
        Device(
            "orin-nano-super",
            "NVIDIA Jetson Orin Nano 8GB Super (25 W, MAXN SUPER)",
            _orin(2.09 * T, 67 * T),
            102e9,
            "NVIDIA Jetson Orin Nano Super Developer Kit: GPU at 1020 MHz, 67 sparse INT8 "
            "TOPS, 102 GB/s. Derived: FP32 2.09 TFLOPS (1024 × 2 × 1.02 GHz), dense INT8 33.5 "
            "TOPS, FP16 = BF16 16.75, TF32 8.4 — https://www.nvidia.com/en-us/autonomous-"
            "machines/embedded-systems/jetson-orin/nano-super-developer-kit/",
            # Not recognised by name: an 8-SM Orin is an Orin Nano 8GB or an Orin NX 8GB
            # (faster clocks), and its power mode cannot be read.
        ),
    )
}


def get_device(name: str) -> Device:
    """The table's device ``name`` (``"cpu"``: this machine's estimate)."""
    key = name.strip().lower().replace("_", "-").replace(" ", "-")
    if key == "cpu":
        cpu = cpu_device()
        if cpu is None:
            raise ValueError("cannot estimate this CPU's peak: no clock in /proc/cpuinfo")
        return cpu
    if key not in DEVICES:
        raise ValueError(f"unknown device {name!r}; known: {', '.join(DEVICES)}, cpu")
    return DEVICES[key]


def _cpuinfo() -> dict[str, Any]:
    info: dict[str, Any] = {"flags": set(), "mhz": 0.0, "vendor": "", "family": None, "name": ""}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key in ("flags", "Features") and not info["flags"]:
                    info["flags"] = set(value.split())
                elif key == "cpu MHz":
                    info["mhz"] = max(info["mhz"], float(value))
                elif key == "vendor_id":
                    info["vendor"] = value
                elif key == "cpu family" and info["family"] is None:
                    info["family"] = int(value)
                elif key == "model name" and not info["name"]:
                    info["name"] = value
    except (OSError, ValueError):
        pass
    try:  # the rated maximum, where the kernel exposes it (not in most VMs)
        khz = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()
        info["mhz"] = max(info["mhz"], int(khz) / 1000)
    except (OSError, ValueError):
        pass
    return info


def cpu_device(threads: int | None = None, bandwidth: float | None = None) -> Device | None:
    """An **estimate** of this CPU's peaks for ``threads`` threads (default: torch's).

    threads × fp32 lanes × 2 FMA units × 2 FLOPs × clock, the lanes from the flags:
    AVX-512 16 (8 on AMD Zen 4, family 25, which runs 512-bit ops as two halves),
    AVX2 + FMA 8, otherwise 4. bf16: 2× fp32 with AVX512_BF16 dot products, 1024
    multiply-adds per cycle per core with AMX; int8 4× with VNNI, 2048 with AMX; fp16
    2× with AVX512_FP16 (else converted, the fp32 rate); tf32 is fp32. The clock is the
    highest in /proc/cpuinfo or cpufreq (a VM's nominal clock, no turbo). Each thread
    is assumed to own a core's FMA units (two SMT siblings share them). DRAM bandwidth
    is unknown unless given: the floor is then the compute floor alone. None when no
    clock can be read.
    """
    info = _cpuinfo()
    if info["mhz"] <= 0:
        return None
    hz = info["mhz"] * 1e6
    n = threads or torch.get_num_threads()
    flags = info["flags"]
    if "avx512f" in flags:
        lanes = 8 if info["vendor"] == "AuthenticAMD" and info["family"] == 25 else 16
    elif "avx2" in flags and "fma" in flags:
        lanes = 8
    else:
        lanes = 4  # SSE / NEON (asimd): 128-bit
    fp32 = n * lanes * 2 * 2 * hz
    bf16 = (
        n * 1024 * 2 * hz if "amx_bf16" in flags else 2 * fp32 if "avx512_bf16" in flags else fp32
    )
    fp16 = (
        n * 1024 * 2 * hz if "amx_fp16" in flags else 2 * fp32 if "avx512_fp16" in flags else fp32
    )
    vnni = "avx512_vnni" in flags or "avx_vnni" in flags
    int8 = n * 2048 * 2 * hz if "amx_int8" in flags else 4 * fp32 if vnni else fp32
    name = info["name"] or "CPU"
    return Device(
        "cpu", f"{name}, {n} threads (estimated)",
        {"fp32": fp32, "tf32": fp32, "fp16": fp16, "bf16": bf16, "int8": int8},
        bandwidth,
        f"estimated: {n} threads × {lanes} fp32 lanes × 2 FMA units × 2 FLOPs × "
        f"{info['mhz'] / 1000:.2f} GHz (/proc/cpuinfo); DRAM bandwidth "
        f"{'given' if bandwidth else 'unknown: compute floor only'}",
        estimated=True,
    )  # fmt: skip


def device_for(device: torch.device | str) -> Device | None:
    """The table's entry for ``device`` (a CUDA GPU by name and SM count; the CPU by its
    estimate), or None when the table does not know it."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return cpu_device()
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(dev)
    for d in DEVICES.values():
        if d.match is None or not re.search(d.match, props.name):
            continue
        if d.sms is not None and props.multi_processor_count != d.sms:
            continue
        return d
    return None


def plan_backend(device: Device) -> str:
    """Whose pass settings make the plan a floor on ``device`` is for: ``triton`` on a
    GPU (concat buffers written in slices), ``torch`` on the CPU."""
    return "torch" if device.name == "cpu" else "triton"


# -- per-op costs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class OpCost:
    node: str  # the graph node's name
    op: str  # what it is, e.g. "conv2d 3×3 +relu +2src"
    shape: tuple[int, ...]  # its (first) output's shape
    flops: int  # 2 per multiply-add
    read_bytes: int  # activations + weights, each once
    write_bytes: int  # outputs somebody reads, once

    @property
    def bytes(self) -> int:
        return self.read_bytes + self.write_bytes

    def floor(self, device: Device, precision: str) -> tuple[float, str]:
        """(seconds, "compute" | "memory" | "-") on ``device`` in ``precision``."""
        t_c = self.flops / device.peak(precision)
        t_m = self.bytes / device.bandwidth if device.bandwidth else 0.0
        if t_c == 0 and t_m == 0:
            return 0.0, "-"
        return max(t_c, t_m), "compute" if t_c >= t_m else "memory"


def _argument(node: fx.Node, i: int) -> Any:
    """Argument ``i`` of an op node, positional or by keyword (its schema default else)."""
    if i < len(node.args):
        return node.args[i]
    arg = node.target._schema.arguments[i]  # type: ignore[union-attr]
    return node.kwargs.get(arg.name, arg.default_value if arg.has_default_value() else None)


def _tensor(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    v = val(node)
    if isinstance(v, torch.Tensor):
        return v
    if node.op == "get_attr":
        t = get_tensor(gm, node)
        return t if isinstance(t, torch.Tensor) else None
    return None


def _numel(shape: Sequence[Any]) -> int:
    return math.prod(concrete(d) for d in shape)


def _distinct(t: torch.Tensor) -> int:
    """Distinct elements: an ``expand``ed (stride-0) axis is read once."""
    try:
        strides = t.stride()
    except RuntimeError:  # sparse or other stride-less layouts
        return _numel(t.shape)
    return math.prod(concrete(d) for d, s in zip(t.shape, strides, strict=True) if s != 0)


def _width(t: torch.Tensor, precision: str, is_input: bool) -> int:
    if t.is_floating_point() and not is_input:
        return STORAGE_BYTES[precision]
    return t.element_size()


def _is_view(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return schema is not None and any(r.alias_info is not None for r in schema.returns)


def _conv_flops(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, transposed: bool) -> int:
    # normal: each output element is Cin/groups × kh × kw multiply-adds (w: [Cout, Cin/g, kh, kw]);
    # transposed: each input element scatters into Cout/groups × kh × kw (w: [Cin, Cout/g, kh, kw])
    per = _numel(w.shape[1:])
    return 2 * per * (_numel(x.shape) if transposed else _numel(out.shape))


def _flops(gm: fx.GraphModule, node: fx.Node) -> int:
    t = node.target
    out = val(node)
    if t is aten.convolution.default:
        x, w = _tensor(gm, node.args[0]), _tensor(gm, node.args[1])
        return _conv_flops(x, w, out, bool(_argument(node, 6)))
    if t is segfast_ops.conv2d.default:
        return _conv_flops(_tensor(gm, node.args[0]), _tensor(gm, node.args[1]), out, False)
    if t is segfast_ops.conv_transpose2d.default:
        return _conv_flops(_tensor(gm, node.args[0]), _tensor(gm, node.args[1]), out, True)
    if t is segfast_ops.head.default:
        w_node = _argument(node, 1)
        if w_node is None:
            return 0
        x, w = _tensor(gm, node.args[0]), _tensor(gm, w_node)
        # 1×1 conv at the input's resolution: per pixel K × C multiply-adds
        return 2 * (_numel(x.shape) // concrete(x.shape[1])) * _numel(w.shape)
    if t in (aten.mm.default, aten.addmm.default, aten.bmm.default):
        a, b = (node.args[1], node.args[2]) if t is aten.addmm.default else node.args[:2]
        ta, tb = _tensor(gm, a), _tensor(gm, b)
        return 2 * _numel(ta.shape) * concrete(tb.shape[-1])  # [..., M, K] @ [..., K, N]
    return 0


def _label(gm: fx.GraphModule, node: fx.Node) -> str:
    t = node.target
    if t in (aten.convolution.default, segfast_ops.conv2d.default,
             segfast_ops.conv_transpose2d.default):  # fmt: skip
        w = _tensor(gm, node.args[1])
        if t is aten.convolution.default:
            transposed, groups = bool(_argument(node, 6)), int(_argument(node, 8))
        else:
            transposed = t is segfast_ops.conv_transpose2d.default
            groups = int(_argument(node, 7 if transposed else 6))
        stride = list(_argument(node, 3))
        kh, kw = (concrete(d) for d in w.shape[2:4])
        text = f"{'convT' if transposed else 'conv'} {kh}×{kw}"
        text += f"/s{stride[0]}" if max(stride) > 1 else ""
        text += " dw" if groups > 1 and groups == concrete(w.shape[0]) and not transposed else ""
        if t is segfast_ops.conv2d.default:
            dil = list(_argument(node, 5))
            text += f" d{dil[0]}" if max(dil) > 1 else ""
        if t is not aten.convolution.default:
            act = _argument(node, 8 if transposed else 7)
            text += f" +{act}" if act != "none" else ""
            text += " +res" if _argument(node, 10 if transposed else 9) is not None else ""
        if t is segfast_ops.conv2d.default and _argument(node, 11) is not None:
            text += " +2src" + ("↑" if _argument(node, 12) != "none" else "")
        return text
    if t is segfast_ops.head.default:
        parts = ["head"]
        parts += ["1×1"] if _argument(node, 1) is not None else []
        parts += ["↑"] if _argument(node, 5) else []
        return " ".join([*parts, str(_argument(node, 9))])
    name = str(t).removeprefix("aten.").removeprefix("segfast.").split(".")[0]
    return name + (" (slices)" if node.meta.get("segfast_slices") else "")


def graph_costs(gm: fx.GraphModule, precision: str = "fp16") -> list[OpCost]:
    """FLOPs and compulsory DRAM bytes of every op of ``gm`` that moves data (see the
    module docstring); views, tuple indexing and layout no-ops are left out."""
    from segfast.compiler.ops import to_nhwc

    if precision not in STORAGE_BYTES:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    costs = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is to_nhwc or _is_view(node):
            continue
        if node.target is operator.getitem:
            continue
        out = val(node)
        slices = node.meta.get("segfast_slices")
        read, write = 0, 0
        if slices:  # concat_slices: only the parts not written into the buffer are copied
            for part, spec in zip(node.args[0], slices, strict=True):
                if spec is None:
                    t = _tensor(gm, part)
                    read += _distinct(t) * _width(t, precision, part.op == "placeholder")
                    write += _numel(t.shape) * _width(t, precision, False)
        else:
            for a in node.all_input_nodes:
                t = _tensor(gm, a)
                if t is not None:
                    read += _distinct(t) * _width(t, precision, a.op == "placeholder")
            outs = [out] if isinstance(out, torch.Tensor) else list(out or ())
            for i, o in enumerate(outs):
                used = isinstance(out, torch.Tensor) or any(
                    u.args[1] == i for u in node.users if u.target is operator.getitem
                )
                if isinstance(o, torch.Tensor) and used:
                    write += _numel(o.shape) * _width(o, precision, False)
        first = out if isinstance(out, torch.Tensor) else next(
            (o for o in out or () if isinstance(o, torch.Tensor)), None
        )  # fmt: skip
        shape = tuple(concrete(d) for d in first.shape) if first is not None else ()
        costs.append(OpCost(node.name, _label(gm, node), shape, _flops(gm, node), read, write))
    return costs


# -- a model's roofline --------------------------------------------------------------------


@dataclass(frozen=True)
class Totals:
    ops: int
    flops: int
    bytes: int
    floor_s: float  # the sum of the ops' floors


@dataclass
class Roofline:
    """The fused plan's and the unfused graph's per-op costs, for one input."""

    inputs: list[tuple[int, ...]]
    precision: str
    backend: str  # whose pass settings made the fused plan
    output: str
    fused: list[OpCost]
    unfused: list[OpCost]
    notes: list[str] = field(default_factory=list)

    def totals(self, device: Device, which: str = "fused") -> Totals:
        ops = self.fused if which == "fused" else self.unfused
        return Totals(
            len(ops),
            sum(o.flops for o in ops),
            sum(o.bytes for o in ops),
            sum(o.floor(device, self.precision)[0] for o in ops),
        )

    def floor_s(self, device: Device) -> float:
        """The fused plan's floor on ``device``, seconds."""
        return self.totals(device).floor_s


def analyse(
    model: nn.Module | str,
    example_input: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    input_shape: Sequence[int] | None = None,
    precision: str = "fp16",
    output: str = "logits",
    backend: str = "triton",
) -> Roofline:
    """Per-op costs of ``model``'s fused plan (``backend``'s passes) and its unfused graph.

    The plan is built in ``precision`` where ``compile`` takes it (fp16, bf16), else in
    fp32; either way floating tensors are counted at ``precision``'s width.
    """
    if precision not in STORAGE_BYTES:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    build = precision if precision in ("fp16", "bf16") else "fp32"
    unfused, fused = plan(
        model, example_input, input_shape=input_shape, backend=backend, precision=build,
        output=output,
    )  # fmt: skip
    inputs = [
        tuple(concrete(d) for d in val(n).shape)
        for n in fused.graph.nodes
        if n.op == "placeholder" and isinstance(val(n), torch.Tensor)
    ]
    return Roofline(inputs, precision, backend, output, graph_costs(fused, precision),
                    graph_costs(unfused, precision))  # fmt: skip


# -- text -----------------------------------------------------------------------------------


def _si(x: float, unit: str) -> str:
    return f"{x / T:,.1f} T{unit}" if x >= 1e12 else f"{x / 1e9:,.1f} G{unit}"


def _us(s: float) -> str:
    return f"{s * 1e6:,.1f}"


def format_table(roof: Roofline, device: Device) -> str:
    """The per-op table of the fused plan on ``device``, then fused vs unfused totals."""
    p = roof.precision
    unit = "OP" if p == "int8" else "FLOP"
    bw = f"{device.bandwidth / 1e9:,.1f} GB/s DRAM" if device.bandwidth else "DRAM unknown"
    lines = [
        f"roofline on {device.title}, {p}: {_si(device.peak(p), unit + '/s')} dense, {bw}"
        + (" — ESTIMATED" if device.estimated else ""),
        f"  source: {device.source}",
        f"fused plan ({roof.backend} backend's passes, output {roof.output}), per op:",
    ]
    head = ("#", "op", "output shape", f"G{unit}", "MB r+w", "floor µs", "bound")
    rows = []
    for i, o in enumerate(roof.fused, 1):
        s, bound = o.floor(device, p)
        rows.append((str(i), o.op, "×".join(map(str, o.shape)), f"{o.flops / 1e9:.3f}",
                     f"{o.bytes / 1e6:.2f}", _us(s), bound))  # fmt: skip
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for k, r in enumerate([head, *rows]):
        lines.append("  " + "  ".join(
            c.ljust(w) if i in (1, 2, 6) else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip())  # fmt: skip
        if k == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    lines.append("totals:")
    thead = ("", "ops", f"G{unit}", "MB read+written", "floor µs")
    trows = []
    for which, label in (("fused", "fused plan"), ("unfused", "unfused (ATen)")):
        t = roof.totals(device, which)
        trows.append((label, str(t.ops), f"{t.flops / 1e9:,.2f}", f"{t.bytes / 1e6:,.1f}",
                      _us(t.floor_s)))  # fmt: skip
    tw = [max(len(r[i]) for r in [thead, *trows]) for i in range(len(thead))]
    for r in [thead, *trows]:
        lines.append("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                      for i, (c, w) in enumerate(zip(r, tw, strict=True))))  # fmt: skip
    f, u = roof.totals(device), roof.totals(device, "unfused")
    if u.floor_s > 0:
        lines.append(f"  fusion: {u.bytes / max(f.bytes, 1):.2f}× fewer DRAM bytes, floor "
                     f"{u.floor_s / max(f.floor_s, 1e-30):.2f}× lower")  # fmt: skip
    lines.append(
        "  FLOPs: 2 per multiply-add of convs and matmuls (element-wise ops count 0); "
        "bytes: each input, weight and output once; floor: Σ per op of "
        "max(FLOPs / peak, bytes / bandwidth), dense peaks"
    )
    return "\n".join(lines)


# -- the README's zoo table -----------------------------------------------------------------

README_START, README_END = "<!-- roofline:start -->", "<!-- roofline:end -->"
README_DEVICES = ("h100", "agx-orin")


def zoo_rooflines(precision: str = "fp16") -> list[tuple[str, Roofline]]:
    """Every zoo model at its default options and standard input (batch included)."""
    from segfast import models

    out = []
    for name in models.names():
        spec = models.get_spec(name)
        torch.manual_seed(0)
        model = models.create(name).eval()
        inputs = spec.make_inputs(model, spec.standard_batch)
        out.append((name, analyse(model, inputs, precision=precision)))
    return out


def _time(s: float) -> str:
    return f"{s * 1e6:.0f} µs" if s < 1e-3 else f"{s * 1e3:.2f} ms"


def zoo_markdown(precision: str = "fp16", devices: Sequence[str] = README_DEVICES) -> str:
    """The README's table: per zoo model, bytes and floors fused vs unfused."""
    devs = [get_device(d) for d in devices]
    head = "| model | input | GFLOP | DRAM MB fused / unfused |"
    rule = "|---|---|---:|---:|"
    for d in devs:
        head += f" {d.name} floor fused / unfused |"
        rule += "---:|"
    lines = [head, rule]
    for name, roof in zoo_rooflines(precision):
        f0 = roof.totals(devs[0])
        u0 = roof.totals(devs[0], "unfused")
        shapes = ", ".join("×".join(map(str, s)) for s in roof.inputs)
        row = f"| `{name}` | {shapes} | {f0.flops / 1e9:,.1f} | {f0.bytes / 1e6:,.0f} / {u0.bytes / 1e6:,.0f} |"
        for d in devs:
            f, u = roof.totals(d), roof.totals(d, "unfused")
            row += f" {_time(f.floor_s)} / {_time(u.floor_s)} |"
        lines.append(row)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="The zoo's roofline floors, fused vs unfused.")
    ap.add_argument("--precision", choices=PRECISIONS, default="fp16")
    ap.add_argument("--devices", default=",".join(README_DEVICES))
    ap.add_argument(
        "--readme", nargs="?", const=".", default=None, metavar="ROOT",
        help="write the table into ROOT/README.md between the roofline markers",
    )  # fmt: skip
    args = ap.parse_args(argv)
    body = zoo_markdown(args.precision, args.devices.split(","))
    if args.readme is None:
        print(body)
        return 0
    readme = Path(args.readme) / "README.md"
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        print(f"{readme} has no {README_START} … {README_END} markers", file=sys.stderr)
        return 2
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(f"{head}{README_START}\n{body}\n{README_END}{tail}")
    print(f"updated {readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
