"""segfast.check computes accuracy against the eager fp32 model and flags errors."""

from __future__ import annotations

import copy

import torch

import segfast
from segfast import models


def test_check_flags_a_perturbed_engine():
    model = models.create("deeplabv3plus_mobilenetv2", tiny=True).eval()
    x = torch.randn(1, 3, 48, 48)
    good = segfast.compile(model, x, backend="torch")
    report = segfast.check(good, model, [x])
    assert report.passed
    assert report.worst.rel_l2 < 1e-5

    wrong = copy.deepcopy(model)
    with torch.no_grad():
        wrong.head.weight.mul_(1.05)  # a 5 % error in the classifier
    bad = segfast.compile(wrong, x, backend="torch")
    report = segfast.check(bad, model, [x])
    assert not report.passed
    assert "rel-L2" in report.reason
    assert report.worst.rel_l2 > 1e-3
    assert "FAIL" in str(report)


def test_check_masks_and_nan():
    model = models.create("unet", tiny=True).eval()
    x = torch.randn(1, 1, 32, 32)
    eng = segfast.compile(model, x, backend="torch", output="mask")
    report = segfast.check(eng, model, x)
    assert report.passed
    assert report.worst.mask_agreement == 1.0

    nan_model = copy.deepcopy(model)
    with torch.no_grad():
        nan_model.head.bias.fill_(float("nan"))
    nan_eng = segfast.compile(nan_model, x, backend="torch")
    report = segfast.check(nan_eng, model, x)
    assert not report.passed
    assert "non-finite" in report.reason


def test_low_precision_is_judged_against_pytorch_own_error():
    model = models.create("fcn_resnet50", tiny=True).eval()
    x = torch.randn(1, 3, 40, 40)
    eng = segfast.compile(model, x, backend="torch", precision="bf16")
    report = segfast.check(eng, model, [x])
    assert report.torch_lowp, "PyTorch's own bf16 error is measured"
    assert report.passed, str(report)


class _Cancels(torch.nn.Module):
    """x + 256 − 256 + a 1×1 conv: in bf16 (8 bits of mantissa) the sum keeps x to a step
    of 2, so any bf16 run of it is far from fp32."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv((x + 256.0) - 256.0)


def test_a_failing_low_precision_engine_is_told_apart_from_its_model():
    """Over the contract's 1e-2, the reason gives PyTorch's own error in that precision
    and says when the model itself is the one not accurate to it."""
    model = _Cancels().eval()
    x = torch.randn(1, 3, 16, 16)
    eng = segfast.compile(model, x, backend="torch", precision="bf16")
    report = segfast.check(eng, model, [x])
    assert not report.passed
    assert "PyTorch's own bf16 run: " in report.reason
    assert "the model itself is not accurate to 0.01 in bf16" in report.reason
