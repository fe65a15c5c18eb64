"""Edge-class networks on the CPU, side by side in one run: segfast's torch backend
(fp32, bf16) against eager PyTorch channels_last and ONNX Runtime fp32.

    python benchmarks/edge_cpu.py [--models lraspp,unet_b0,fpn_gn,deeplab] [--rounds 8]
                                  [--iters 40] [--json benchmarks/results/edge-cpu.json]

Models (``segfast.models.edge``, random weights, BatchNorm statistics randomised):
LR-ASPP MobileNetV3-Large at 512² (21 classes; torchvision's layout, 3,221,538
parameters as torchvision's), U-Net EfficientNet-B0 at 256² (1 class; smp's layout,
its parameter count), FPN with GroupNorm at 256², DeepLab v3+ MobileNetV2 at 512² (its
separable ASPP: atrous depthwise convs). Where the plan runs layers on segfast's 8-lane
kernels (depthwise ``sf_dwconv8`` on CPUs without AVX-512, few-output ``sf_conv_few`` on
any AVX2 CPU), the same engine with those layers on oneDNN
(``options={"avx2_kernels": False}``) is timed beside it. Every engine is timed in the same
interleaved rounds (a short pause before each block); the table gives the median ms,
the ratio to ONNX Runtime fp32 and each engine's rel-L2 against fp32 eager. Speed
claims come from here, never from tests.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from int8_cpu import cpu_description, randomise_bn  # benchmarks/ is on sys.path as a script
from torch import nn

import segfast
from segfast.compiler.ops import _mkldnn_ok
from segfast.models import edge
from segfast.models.deeplabv3plus import deeplabv3plus_mobilenetv2
from segfast.timing import measure, median

MODELS = {
    "lraspp": (lambda: edge.lraspp_mobilenet_v3_large(21), (1, 3, 512, 512),
               "LR-ASPP MobileNetV3-Large, 512²"),
    "unet_b0": (lambda: edge.unet_efficientnet_b0(1), (1, 3, 256, 256),
                "U-Net EfficientNet-B0, 256²"),
    "fpn_gn": (lambda: edge.fpn_groupnorm(1), (1, 3, 256, 256), "FPN GroupNorm, 256²"),
    "deeplab": (lambda: deeplabv3plus_mobilenetv2(21), (1, 3, 512, 512),
                "DeepLab v3+ MobileNetV2, 512²"),
}  # fmt: skip
AVX2_KINDS = ("depthwise conv2d (segfast kernel, 8-lane)",
              "conv2d with 1–4 output channels (segfast kernel)",
              "conv2d 1×1 as one GEMM (MKL)",
              "inverted residual block (segfast kernel)")  # fmt: skip


class EagerChannelsLast:
    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.float32) -> None:
        self.model = model.to(memory_format=torch.channels_last).to(dtype)
        self.dtype = dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(x.to(self.dtype).contiguous(memory_format=torch.channels_last))


def run(key: str, rounds: int, iters: int) -> dict[str, Any]:
    factory, shape, title = MODELS[key]
    torch.manual_seed(0)
    model = factory().eval()
    randomise_bn(model)
    x = torch.randn(shape)
    t0 = time.perf_counter()
    built: dict[str, Any] = {
        "eager fp32 (channels_last)": EagerChannelsLast(factory().eval()),
        "ORT fp32": segfast.compile(model, x, backend="onnxruntime"),
        "segfast fp32": segfast.compile(model, x, backend="torch"),
    }
    lowered = built["segfast fp32"]._runner.details.get("lowered", {})
    if any(lowered.get(k) for k in AVX2_KINDS):
        # the same engine with those layers on oneDNN: what the 8-lane kernels buy
        built["segfast fp32, no AVX2 kernels"] = segfast.compile(
            model, x, backend="torch", options={"avx2_kernels": False}
        )
    skipped = {}
    if _mkldnn_ok(torch.bfloat16):
        built["segfast bf16"] = segfast.compile(model, x, backend="torch", precision="bf16")
    else:  # plain PyTorch bf16 convolutions: 30× slower than fp32 here, nothing to learn
        skipped["segfast bf16"] = "oneDNN has no bf16 convolutions on this CPU (no AVX-512 BF16)"
    built["eager fp32 (channels_last)"].model.load_state_dict(model.state_dict())
    print(f"{title}: built in {time.perf_counter() - t0:.0f} s")
    fused = built["segfast fp32"]
    print(fused.summary())
    with torch.inference_mode():
        ref = model(x)
    err = {}
    for name, fn in built.items():
        with torch.inference_mode():
            y = fn(x).float()
        err[name] = float((y - ref).norm() / ref.norm())
    samples: dict[str, list[float]] = {name: [] for name in built}
    order = list(built)
    for r in range(rounds):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            time.sleep(0.05)
            fn = built[name]
            call = fn.run_unchecked if hasattr(fn, "run_unchecked") else fn
            samples[name] += measure(
                call, [(x,)], warmup=1, iters=max(1, iters // rounds), device="cpu"
            ).host_s
    ms = {name: 1e3 * median(s) for name, s in samples.items()}
    base = ms["ORT fp32"]
    print(f"\n{title} — {cpu_description()}")
    print(f"{'engine':28s} {'p50 ms':>8s} {'× ORT fp32':>10s} {'rel-L2 vs eager':>16s}")
    for name in order:
        print(f"{name:28s} {ms[name]:8.1f} {base / ms[name]:10.2f} {err[name]:16.1e}")
    for name, why in skipped.items():
        print(f"{name:28s} skipped: {why}")
    fusions = dict(fused.info.fusions)
    return {"model": title, "p50_ms": ms, "rel_l2": err, "samples_s": samples,
            "skipped": skipped, "fusions": fusions}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="lraspp,unet_b0,fpn_gn,deeplab")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    results = [run(k.strip(), args.rounds, args.iters) for k in args.models.split(",")]
    if args.json:
        doc = {
            "device": cpu_description(),
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"),
            "results": results,
        }
        Path(args.json).write_text(json.dumps(doc, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
