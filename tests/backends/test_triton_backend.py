"""The triton backend under Triton's CPU interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py without a GPU): the fused graph on segfast's kernels equals
eager on tiny zoo models. Slow by nature (the interpreter), so small sizes."""

from __future__ import annotations

import pytest
import torch

import segfast
from segfast import BackendUnavailable, models
from segfast.kernels._common import interpreting

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
