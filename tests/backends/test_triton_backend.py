"""The triton backend under Triton's CPU interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py without a GPU): the fused graph on segfast's kernels equals
eager on tiny zoo models. Slow by nature (the interpreter), so small sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import segfast
from segfast import BackendUnavailable, Calibration, models
from segfast.kernels._common import interpreting
from segfast.outputs import WithHead
from segfast.testing import assert_close, assert_no_worse_than

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or interpreting()),
    reason="triton backend needs a GPU or TRITON_INTERPRET=1",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _model(name: str, **kw):
    torch.manual_seed(0)
    return models.create(name, tiny=True, **kw).eval().to(DEVICE)


@pytest.mark.parametrize(
    ("name", "output", "size", "lowered"),
    [
        ("unet", "mask", (21, 27), {"conv2d", "conv_transpose2d", "max_pool2d", "head"}),
        ("segnet", "logits", (19, 23), {"conv2d", "max_pool2d", "max_unpool2d"}),
        ("pspnet", "mask", (24, 20), {"adaptive_avg_pool2d", "concat_slices", "resize", "head"}),
        (
            "deeplabv3plus_resnet50",
            "logits",
            (21, 27),
            {"depthwise_conv2d", "concat_slices", "global_avg_pool2d", "resize"},
        ),
    ],
)
def test_zoo_on_triton_matches_eager(name, output, size, lowered):
    model = _model(name)
    x = torch.randn(1, model.in_channels, *size, device=DEVICE)
    eng = segfast.compile(model, x, backend="triton", output=output)
    report = segfast.check(eng, model, [x])
    assert report.passed, str(report)
    done = eng._runner.details["lowered"]
    assert lowered <= set(done), done
    assert "Triton kernels:" in eng.summary()


def test_generator_on_triton():
    model = _model("dcgan_generator")
    z = torch.randn(2, model.nz, 1, 1, device=DEVICE)
    eng = segfast.compile(model, z, backend="triton")
    report = segfast.check(eng, model, [z])
    assert report.passed, str(report)
    assert eng._runner.details["lowered"]["conv_transpose2d"] == 5


def test_unet_decoder_uses_two_source_prologue_on_triton():
    model = _model("unet", up_mode="bilinear")
    x = torch.randn(1, 1, 16, 24, device=DEVICE)
    eng = segfast.compile(model, x, backend="triton")
    assert eng.info.fusions["skip_concat_resize"] == 3
    assert "cat" not in eng._runner.details["kept"]
    assert segfast.check(eng, model, [x]).passed


class SamePadding(nn.Module):
    """TensorFlow-style "same" padding (efficientnet-pytorch): stride-2 convs after an
    asymmetric zero pad, a stride-1 conv after a symmetric one, a GroupNorm reading a
    padded conv, and a pad that a slice also reads (it must stay)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2)
        self.dw = nn.Conv2d(8, 8, 5, stride=2, groups=8)
        self.pw = nn.Conv2d(8, 8, 3)
        self.norm = nn.GroupNorm(2, 8)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = F.relu(self.stem(F.pad(x, (0, 1, 0, 1))))
        y = self.dw(F.pad(y, (1, 2, 1, 2)))
        p = F.pad(y, (1, 1, 1, 1))
        y = F.silu(self.norm(self.pw(p))) + p[:, :, 1:-1, 1:-1]
        return self.out(y)


def test_same_padding_runs_in_the_conv_kernels():
    model = SamePadding().eval()
    x = torch.randn(2, 3, 16, 18, device=DEVICE)
    eng = segfast.compile(model, x, backend="triton")
    details = eng._runner.details
    # the compiler folds none (two asymmetric, one also read by a slice); the Triton
    # lowering takes the two asymmetric ones into the conv kernels' padding
    assert "pad_into_conv" not in eng.info.fusions
    assert details["lowered"]["pad_into_conv"] == 2
    assert details["kept"].get("constant_pad_nd") == 1
    assert details["lowered"]["channel_stats_from_conv"] == 1
    with torch.no_grad():
        ref = model(x)
    assert_close(eng(x), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-interpreter behaviour")
def test_bf16_is_refused_under_the_interpreter():
    with pytest.raises(BackendUnavailable, match="bf16"):
        segfast.compile(
            _model("unet"), torch.randn(1, 1, 16, 16), backend="triton", precision="bf16"
        )


def test_fp16_on_triton():
    model = _model("fcn_resnet50")
    x = torch.randn(1, 3, 24, 24, device=DEVICE)
    eng = segfast.compile(model, x, backend="triton", precision="fp16")
    report = segfast.check(eng, model, [x])
    assert report.passed, str(report)


@pytest.mark.gpu
def test_segfast_ops_dispatch_to_triton_on_cuda():
    """torch.ops.segfast.conv2d on CUDA tensors runs the Triton implementation."""
    from segfast.compiler.ops import conv2d_impl

    x = torch.randn(1, 4, 9, 11, device="cuda")
    w = torch.randn(6, 4, 3, 3, device="cuda")
    args = (x, w, None, [1, 1], [1, 1], [1, 1], 1, "relu", 0.0, None, False, None, "none",
            False, None, None, False)  # fmt: skip
    with torch.backends.cudnn.flags(allow_tf32=False):
        torch.testing.assert_close(torch.ops.segfast.conv2d(*args), conv2d_impl(*args),
                                   rtol=1e-4, atol=1e-4)  # fmt: skip


# -- int8 -------------------------------------------------------------------------------


def _smooth(seed: int, c: int = 1, size: int = 32) -> torch.Tensor:
    """An image with structure (a low-frequency field and a little noise): what a
    segmentation network sees, and what calibrates it."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, c, size // 8, size // 8, generator=g)
    field = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return (field + 0.1 * torch.randn(1, c, size, size, generator=g)).to(DEVICE)


class _DepthwiseBlock(nn.Module):
    """conv → BN → ReLU6 → depthwise 3×3 → ReLU6 → 1×1 projection (MobileNet-like)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU6(),
            nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU6(),
            nn.Conv2d(16, 4, 1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _int8_engines(model, channels: int, backends=("triton", "torch"), size: int = 32):
    """Int8 engines (logits) of ``backends`` from one calibration, and the data.

    min_agreement 0.9 and no fallback: every conv is int8 in each (the contract itself
    is test_int8.py's; here the backends must compute the same int8 engine)."""
    data = [_smooth(i, channels, size) for i in range(6)]
    cal = Calibration(data[:4], holdout=data[4:5], min_agreement=0.9, max_float_layers=0.0)
    kw = {"precision": "int8", "calibration": cal, "output": "logits"}
    # the torch engine on 8-bit weights throughout (without VNNI it would take 7-bit ones
    # for convs over signed maps: other integers)
    opts = {"torch": {"int8_w7": False}}
    return [
        segfast.compile(model, data[0], backend=b, options=opts.get(b), **kw) for b in backends
    ], data


@pytest.mark.parametrize(
    ("name", "lowered", "kept"),
    [
        ("unet", {"qconv2d": 15}, {"qconv_transpose2d (composite)": 3}),
        ("depthwise_block", {"qconv2d": 2, "depthwise_qconv2d": 1}, {}),
    ],
)
def test_int8_engine_runs_the_qconv_kernel(name, lowered, kept):
    """precision="int8" lowers segfast.qconv2d to the int8 Triton kernel (dense,
    two-source and depthwise), and the engine equals the torch backend's int8 engine:
    the same integers, summed exactly by both (oneDNN's int8 convs on the CPU)."""
    model = _model("unet") if name == "unet" else _DepthwiseBlock().eval().to(DEVICE)
    torch.manual_seed(0)
    # the U-Net at 16² (its bottleneck at 1×1): the interpreter runs every int8 conv of it
    (tri, ref), data = _int8_engines(
        model, 1 if name == "unet" else 3, size=16 if name == "unet" else 32
    )
    details = tri._runner.details
    assert {k: details["lowered"].get(k) for k in lowered} == lowered, details["lowered"]
    assert {k: v for k, v in details["kept"].items() if "qconv" in k} == kept
    assert "qconv2d ×" in tri.summary()
    assert all(x["int8"] for x in tri.info.int8_layers)
    for x in [data[0], data[5]]:  # a calibration input and an unseen one
        a, b = tri(x).float().cpu(), ref(x).float().cpu()
        # identical integers: fp32 rounding of the dequantization only
        assert float((a - b).norm() / b.norm()) <= 1e-5
        assert float((a.argmax(1) == b.argmax(1)).double().mean()) >= 0.995


@pytest.mark.parametrize("fp", ["fp16", pytest.param("bf16", marks=pytest.mark.gpu)])
def test_int8_float_part_in_half_precision(fp):
    """Calibration(float_precision=...): the U-Net's int8 convs read and write ``fp``,
    its int8 up-convs (composite), max-pools, two-source concats and fused head run in
    it; as close to the model as the fp32 float part's engine (not to that engine: the
    rounding moves values across int8 rounding boundaries — a fresh draw of int8's own
    error). bf16 only on a GPU (the interpreter's bf16 arithmetic is wrong)."""
    model = _model("unet")
    data = [_smooth(i, 1, 16) for i in range(6)]
    kw = {"min_agreement": 0.9, "max_float_layers": 0.0}
    # the fp32 float part's engine: the torch backend's, on 8-bit weights — the same
    # integers as Triton's fp32 one (test_int8_engine_runs_the_qconv_kernel), built
    # without the interpreter
    half, full = (
        segfast.compile(
            model,
            data[0],
            backend=b,
            precision="int8",
            output="logits",
            calibration=Calibration(data[:4], holdout=data[4:], float_precision=p, **kw),
            options={"int8_w7": False} if b == "torch" else None,
        )
        for b, p in (("triton", fp), ("torch", "fp32"))
    )
    assert half.info.int8_float == fp
    assert f"the rest in {fp}" in half.summary()
    ref = WithHead(model, "logits")
    for x in (data[1], data[5]):
        out = half(x)
        assert out.dtype == getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[fp])
        with torch.no_grad():
            assert_no_worse_than(out.cpu(), full(x).cpu(), ref(x).cpu())


def test_int8_engine_runs_nonfinite_inputs_through_the_model():
    """int8 cannot carry NaN and saturates ±Inf: such inputs take the eager model."""
    model = _DepthwiseBlock().eval().to(DEVICE)
    (tri,), data = _int8_engines(model, 3, backends=("triton",))
    assert "inputs holding NaN/Inf run the eager model" in tri.summary()
    bad = data[0].clone()
    bad[..., 3:9, 4:12] = float("nan")
    bad[..., 0, 0] = float("inf")
    with torch.no_grad():
        expected = WithHead(model, "logits")(bad)
    got = tri(bad)
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(got.nan_to_num(), expected.nan_to_num())
