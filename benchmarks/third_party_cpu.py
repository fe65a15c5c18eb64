"""Models nobody here wrote, on the CPU, side by side in one run: segfast's torch backend
(fp32, bf16 where oneDNN has bf16 convolutions) against its onnxruntime backend (ONNX
Runtime fp32), batch 1, logits, random weights with BatchNorm statistics randomised.

    python benchmarks/third_party_cpu.py [--size 512] [--models tv_lraspp,smp_unet_b0,...]
                                         [--rounds 8] [--iters 4] [--json FILE]

Needs torchvision and segmentation_models_pytorch, which do not install in CI (run it
from a venv with ``torch torchvision segmentation-models-pytorch onnxruntime onnx
onnxscript`` and segfast on ``PYTHONPATH``); a model whose package is missing is skipped
with the reason. Every engine is timed in the same interleaved rounds (2 warm-up calls,
then ``iters`` timed, per round); the table gives the median ms, the ratio to ONNX
Runtime fp32 and each engine's rel-L2 against eager fp32. Speed claims come from here
and ``edge_cpu.py``, never from tests.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from int8_cpu import cpu_description, randomise_bn  # benchmarks/ is on sys.path as a script
from torch import nn

import segfast
from segfast.compiler.ops import _mkldnn_ok
from segfast.timing import median


class _Out(nn.Module):
    """torchvision's segmentation models return {"out": …}: the logits alone."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


def _tv(name: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import torchvision.models.segmentation as tvs

        kw = {"weights": None, "weights_backbone": None, "num_classes": 21}
        if name.startswith("deeplabv3"):
            kw["aux_loss"] = False
        return _Out(getattr(tvs, name)(**kw))

    return make


def _smp(arch: str, encoder: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import segmentation_models_pytorch as smp

        return getattr(smp, arch)(encoder, encoder_weights=None, classes=1)

    return make


MODELS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "tv_lraspp": (_tv("lraspp_mobilenet_v3_large"), "torchvision lraspp_mobilenet_v3_large"),
    "tv_dl3_mnv3": (_tv("deeplabv3_mobilenet_v3_large"),
                    "torchvision deeplabv3_mobilenet_v3_large"),
    "smp_unet_b0": (_smp("Unet", "efficientnet-b0"), 'smp Unet("efficientnet-b0")'),
    "smp_dlv3p_b0": (_smp("DeepLabV3Plus", "efficientnet-b0"),
                     'smp DeepLabV3Plus("efficientnet-b0")'),
    "smp_pan_b0": (_smp("PAN", "efficientnet-b0"), 'smp PAN("efficientnet-b0")'),
    "smp_upp_b0": (_smp("UnetPlusPlus", "efficientnet-b0"), 'smp UnetPlusPlus("efficientnet-b0")'),
    "smp_fpn_mnv2": (_smp("FPN", "mobilenet_v2"), 'smp FPN("mobilenet_v2")'),
    "smp_manet_mnv2": (_smp("MAnet", "mobilenet_v2"), 'smp MAnet("mobilenet_v2")'),
    "smp_psp_mnv2": (_smp("PSPNet", "mobilenet_v2"), 'smp PSPNet("mobilenet_v2")'),
    "smp_unet_mnv3": (_smp("Unet", "timm-mobilenetv3_large_100"),
                      'smp Unet("timm-mobilenetv3_large_100")'),
    "smp_linknet_r18": (_smp("Linknet", "resnet18"), 'smp Linknet("resnet18")'),
    "smp_upernet_r18": (_smp("UPerNet", "resnet18"), 'smp UPerNet("resnet18")'),
    "smp_segformer_b0": (_smp("Segformer", "mit_b0"), 'smp Segformer("mit_b0")'),
    # not in the default run (the table in the README): other encoders and heads
    "smp_unet_mitb0": (_smp("Unet", "mit_b0"), 'smp Unet("mit_b0")'),
    "smp_fpn_b0": (_smp("FPN", "efficientnet-b0"), 'smp FPN("efficientnet-b0")'),
    "smp_dlv3_mnv2": (_smp("DeepLabV3", "mobilenet_v2"), 'smp DeepLabV3("mobilenet_v2")'),
    "smp_linknet_b0": (_smp("Linknet", "efficientnet-b0"), 'smp Linknet("efficientnet-b0")'),
}  # fmt: skip
DEFAULT = [k for k in MODELS if k not in {
    "smp_unet_mitb0", "smp_fpn_b0", "smp_dlv3_mnv2", "smp_linknet_b0"}]  # fmt: skip


def run(key: str, size: int, rounds: int, iters: int) -> dict[str, Any]:
    factory, title = MODELS[key]
    try:
        torch.manual_seed(0)
        model = factory().eval()
    except ImportError as exc:
        return {"model": title, "skipped": f"{type(exc).__name__}: {exc}"}
    randomise_bn(model)
    x = torch.randn(1, 3, size, size)
    t0 = time.perf_counter()
    built: dict[str, Any] = {
        "ORT fp32": segfast.compile(model, x, backend="onnxruntime"),
        "segfast fp32": segfast.compile(model, x, backend="torch"),
    }
    if _mkldnn_ok(torch.bfloat16):
        built["segfast bf16"] = segfast.compile(model, x, backend="torch", precision="bf16")
    build_s = time.perf_counter() - t0
    with torch.inference_mode():
        ref = model(x)
    err = {}
    for name, eng in built.items():
        err[name] = float((eng(x).float() - ref).norm() / ref.norm())
    samples: dict[str, list[float]] = {name: [] for name in built}
    order = list(built)
    for r in range(rounds):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            call = built[name].run_unchecked
            for _ in range(2):
                call(x)
            for _ in range(iters):
                t1 = time.perf_counter()
                call(x)
                samples[name].append(time.perf_counter() - t1)
    ms = {name: 1e3 * median(s) for name, s in samples.items()}
    ratio = {name: ms["ORT fp32"] / v for name, v in ms.items()}
    line = "  ".join(f"{n} {ms[n]:6.1f} ms ({ratio[n]:.2f}×, rel-L2 {err[n]:.1e})" for n in order)
    print(f"{title} {size}² (built in {build_s:.0f} s): {line}", flush=True)
    return {"model": title, "size": size, "p50_ms": ms, "x_ort_fp32": ratio, "rel_l2": err,
            "samples_s": samples}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(DEFAULT), help="any of: " + ",".join(MODELS))
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    print(f"{cpu_description()}, torch {torch.__version__}")
    results = [run(k, args.size, args.rounds, args.iters) for k in args.models.split(",")]
    for r in results:
        if "skipped" in r:
            print(f"{r['model']}: skipped ({r['skipped']})")
    if args.json:
        out = {"device": cpu_description(), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d"), "results": results}  # fmt: skip
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
