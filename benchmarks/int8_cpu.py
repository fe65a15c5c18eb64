"""int8 on the CPU, side by side in one run: segfast's int8 engine against fp32 eager,
ONNX Runtime fp32, ONNX Runtime's own int8 (``quantize_static``: QDQ, per-channel,
MinMax, on the same calibration inputs) and segfast's fp32 and bf16 engines.

    python benchmarks/int8_cpu.py [--models unet,deeplab] [--rounds 8] [--iters 40]
                                  [--json benchmarks/results/int8-cpu.json]

Models: U-Net base 32 at 256² (1 channel) and DeepLab v3+ MobileNetV2 at 512², random
weights with randomised BatchNorm statistics (so folding does real work), calibrated
on 16 smooth random images (low-frequency fields plus noise), judged on 4 others.
Every engine is timed in the same interleaved rounds (a short pause before each
block, as ``segfast bench`` does); the table gives the median ms, the ratio to ONNX
Runtime fp32, and each engine's mask agreement with the fp32 model on the held-out
images. Speed claims come from here, never from tests.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import segfast
from segfast import models
from segfast.compiler.ops import _mkldnn_ok
from segfast.timing import measure, median

MODELS = {
    "unet": ("unet", {"base": 32}, (1, 1, 256, 256), "U-Net base 32, 256²"),
    "deeplab": ("deeplabv3plus_mobilenetv2", {}, (1, 3, 512, 512), "DeepLab v3+ MobileNetV2, 512²"),
}


def cpu_description() -> str:
    """This CPU's name and the instruction sets that decide the CPU path, and threads:
    results differ between AVX-512 (+VNNI, BF16) and AVX2-only machines."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name in ("", platform.machine()):
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    if "avx512f" in flags:
        isa = "AVX-512" + "".join(
            f" {label}" for flag, label in (("avx512_vnni", "VNNI"), ("avx512_bf16", "BF16"))
            if flag in flags
        )  # fmt: skip
    elif "avx2" in flags:
        isa = "AVX2, no AVX-512" + (" (AVX-VNNI)" if "avx_vnni" in flags else "")
    else:
        isa = "no AVX2" if flags else "ISA unknown"
    return f"{name} ({isa}), {torch.get_num_threads()} threads"


def smooth(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    coarse = torch.randn(n, c, max(2, h // 16), max(2, w // 16), generator=g)
    x = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    return x + 0.2 * torch.randn(shape, generator=g)


def randomise_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
            m.weight.data.copy_(0.8 + 0.4 * torch.rand(m.num_features, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(m.num_features, generator=g))


class OrtInt8:
    """ONNX Runtime's own int8: ``quantize_static`` of segfast's fp32 ONNX export."""

    def __init__(self, model: nn.Module, x: torch.Tensor, calib: list[torch.Tensor]) -> None:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        from segfast.export import _ort
        from segfast.export.onnx import export_onnx

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.items = iter([{"input": t.numpy()} for t in calib])

            def get_next(self) -> dict[str, np.ndarray] | None:
                return next(self.items, None)

        with tempfile.TemporaryDirectory() as tmp:
            fp32 = Path(tmp) / "fp32.onnx"
            q = Path(tmp) / "int8.onnx"
            export_onnx(model, fp32, example_input=x, output="mask")
            quantize_static(
                str(fp32), str(q), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )  # fmt: skip
            self.session = _ort.cpu_session(q, intra_op_threads=torch.get_num_threads())
        self.name = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        (out,) = self.session.run(None, {self.name: x.numpy()})
        return torch.from_numpy(out)


def engines(key: str) -> tuple[dict[str, Any], nn.Module, list[torch.Tensor], str]:
    name, options, shape, title = MODELS[key]
    torch.manual_seed(0)
    model = models.create(name, **options).eval()
    randomise_bn(model)
    calib = [smooth(shape, seed=i) for i in range(16)]
    held = [smooth(shape, seed=100 + i) for i in range(4)]
    x = calib[0]
    # Random weights with randomised BN put many pixels near a tie: at the default 99 %
    # the U-Net's guard falls back half its layers and still misses (97.8 % all-int8 on
    # an AVX2 EPYC; ONNX Runtime's own int8 was at 98.3 %). The speed comparison wants
    # the all-int8 engine: the bar is 97 % here, and the table prints every engine's
    # agreement beside its time. Trained models meet 99 % (the demo U-Net: 99.9 %).
    cal = segfast.Calibration(calib, holdout=held, min_agreement=0.97)
    built: dict[str, Any] = {}
    t0 = time.perf_counter()
    built["eager fp32"] = segfast.compile(model, x, backend="eager", output="mask")
    built["ORT fp32"] = segfast.compile(model, x, backend="onnxruntime", output="mask")
    built["ORT int8 (quantize_static)"] = OrtInt8(model, x, calib)
    built["segfast fp32"] = segfast.compile(model, x, backend="torch", output="mask")
    if _mkldnn_ok(torch.bfloat16):
        built["segfast bf16"] = segfast.compile(
            model, x, backend="torch", precision="bf16", output="mask"
        )
    else:  # plain PyTorch bf16 convolutions: 15–26× slower than fp32, not worth the time
        print("segfast bf16: left out (oneDNN has no bf16 convolutions on this CPU)")
    built["segfast int8"] = segfast.compile(
        model, x, backend="torch", precision="int8", calibration=cal, output="mask"
    )
    if built["segfast int8"].source.options.get("int8_w7"):  # no VNNI: 7-bit weights on
        built["segfast int8, 8-bit weights"] = segfast.compile(
            model, x, backend="torch", precision="int8", calibration=cal, output="mask",
            options={"int8_w7": False},
        )  # fmt: skip
    print(f"{title}: built in {time.perf_counter() - t0:.0f} s")
    return built, model, held, title


def run(key: str, rounds: int, iters: int) -> dict[str, Any]:
    built, model, held, title = engines(key)
    with torch.inference_mode():
        ref = [model(x).argmax(1).to(torch.uint8) for x in held]
    agreement = {
        name: float(
            np.mean([(fn(x) == r).float().mean().item() for x, r in zip(held, ref, strict=True)])
        )
        for name, fn in built.items()
    }
    samples: dict[str, list[float]] = {name: [] for name in built}
    order = list(built)
    for r in range(rounds):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            time.sleep(0.05)
            fn = built[name]
            call = fn.run_unchecked if hasattr(fn, "run_unchecked") else fn
            samples[name] += measure(
                call,
                [(held[0],)],
                warmup=1,
                iters=max(1, iters // rounds),
                device=torch.device("cpu"),
            ).host_s
    ms = {name: 1e3 * median(s) for name, s in samples.items()}
    base = ms["ORT fp32"]
    print(f"\n{title} — {cpu_description()}")
    print(f"{'engine':28s} {'p50 ms':>8s} {'× ORT fp32':>10s} {'masks vs fp32':>14s}")
    for name in order:
        print(f"{name:28s} {ms[name]:8.1f} {base / ms[name]:10.2f} {100 * agreement[name]:13.2f}%")
    int8 = built["segfast int8"]
    floats = [x for x in int8.info.int8_layers if not x["int8"]]
    print(
        f"segfast int8: {len(int8.info.int8_layers) - len(floats)} of {len(int8.info.int8_layers)} convs on int8"
    )
    return {
        "model": title,
        "p50_ms": ms,
        "mask_agreement": agreement,
        "samples_s": samples,
        "int8_layers": int8.info.int8_layers,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="unet,deeplab")
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
