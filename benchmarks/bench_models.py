"""Per model × backend latency (pytest-benchmark), CPU and GPU.

    pytest benchmarks/bench_models.py --benchmark-only                 # everything here
    pytest benchmarks/bench_models.py --benchmark-only -k cpu          # the CPU comparison
    pytest benchmarks/bench_models.py --benchmark-only -k smoke        # seconds: proves the harness

Each case builds its engine once (outside the timing), checks it against the
fp32 eager model (rel-L2 and mask agreement go to extra_info with the device
name), then times ``engine.run_unchecked`` — on a GPU with a synchronise after
each call so host timing covers the device work. ``eager_cl`` is eager PyTorch
with the model and input in channels_last, the cheap trick segfast must beat.
For the full side-by-side report (percentiles, memory, JSON, plots) use
``segfast bench``; this suite is for pytest-benchmark's comparison tooling.
"""

from __future__ import annotations

import functools

import pytest
import torch

import segfast
from segfast import models
from segfast.backends import available
from segfast.metrics import compare

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

# (id, zoo name, options, (H, W), batch)
SMOKE = [("smoke-unet-tiny", "unet", {"tiny": True}, (32, 32), 1)]
CPU_CASES = [
    ("cpu-unet32-256", "unet", {"base": 32, "in_channels": 3, "num_classes": 2}, (256, 256), 1),
    ("cpu-deeplabv3plus_mnv2-512", "deeplabv3plus_mobilenetv2", {}, (512, 512), 1),
]
GPU_CASES = [
    ("gpu-unet-512", "unet", {"in_channels": 3, "num_classes": 2}, (512, 512), 1),
    ("gpu-deeplabv3plus_r50-512", "deeplabv3plus_resnet50", {}, (512, 512), 1),
    ("gpu-deeplabv3plus_r50-1024x2048", "deeplabv3plus_resnet50", {}, (1024, 2048), 1),
    ("gpu-pspnet-512", "pspnet", {}, (512, 512), 1),
    ("gpu-segnet-360x480", "segnet", {}, (360, 480), 1),
]
BACKENDS = ["eager", "eager_cl", "torch", "triton", "inductor", "onnxruntime", "tensorrt"]


@functools.cache
def _model(name: str, opts: tuple) -> torch.nn.Module:
    torch.manual_seed(0)
    return models.create(name, **dict(opts)).eval().to(DEVICE)


@functools.cache
def _engine(name: str, opts: tuple, size: tuple[int, int], batch: int, backend: str,
            precision: str):  # fmt: skip
    model = _model(name, opts)
    x = torch.randn(batch, model.in_channels, *size, device=DEVICE)
    if backend == "eager_cl":
        import copy

        cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        if precision != "fp32":
            cl = cl.to(segfast.runtime.engine.DTYPES[precision])
        xcl = x.contiguous(memory_format=torch.channels_last).to(next(cl.parameters()).dtype)

        def run(_x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return cl(xcl)

        with torch.inference_mode():
            acc = compare(cl(xcl).float(), model(x))
        return run, x, acc
    eng = segfast.compile(model, x, backend=backend, precision=precision)
    with torch.inference_mode():
        acc = compare(eng(x).float(), model(x))
    return eng.run_unchecked, x, acc


def _bench(benchmark, case, backend: str, precision: str = "fp32") -> None:
    cid, name, opts, size, batch = case
    if backend not in ("eager_cl",):
        try:
            ok, why = available(backend, DEVICE)
        except ValueError as exc:  # not a backend of this installation
            ok, why = False, str(exc)
        if not ok:
            pytest.skip(f"{backend}: {why}")
    run, x, acc = _engine(name, tuple(sorted(opts.items())), size, batch, backend, precision)

    def call() -> None:
        run(x)
        if CUDA:
            torch.cuda.synchronize()

    benchmark.group = f"{cid} {precision}"
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if CUDA else "cpu", backend=backend,
        precision=precision, rel_l2=acc.rel_l2, mask_agreement=acc.mask_agreement,
    )  # fmt: skip
    benchmark.pedantic(call, rounds=10 if "smoke" not in cid else 3, warmup_rounds=2)


@pytest.mark.parametrize("backend", ["eager", "torch"])
@pytest.mark.parametrize("case", SMOKE, ids=[c[0] for c in SMOKE])
def test_smoke(benchmark, case, backend):
    _bench(benchmark, case, backend)


@pytest.mark.skipif(CUDA, reason="the CPU comparison runs on CPU-only machines")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["eager", "eager_cl", "torch", "inductor", "onnxruntime"])
@pytest.mark.parametrize("case", CPU_CASES, ids=[c[0] for c in CPU_CASES])
def test_cpu(benchmark, case, backend, precision):
    if precision == "bf16" and backend in ("onnxruntime", "inductor"):
        pytest.skip(f"{backend} is measured in fp32 only (the fastest fp32 peer)")
    _bench(benchmark, case, backend, precision)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_gpu(benchmark, case, backend, precision):
    _bench(benchmark, case, backend, precision)
