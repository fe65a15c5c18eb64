"""Every zoo model (tiny configuration) through the torch backend: the fused
graph equals eager, and the fusions that should fire do."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import segfast
from segfast import models

SEGMENTATION = models.names("segmentation")


def _bn_count(model: nn.Module) -> int:
    """BatchNorms on the inference path (an auxiliary training head is dropped)."""
    return sum(
        isinstance(m, nn.BatchNorm2d) and not name.startswith("aux")
        for name, m in model.named_modules()
    )


def _randomise_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


@pytest.mark.parametrize("name", SEGMENTATION)
@pytest.mark.parametrize("output", ["logits", "mask"])
def test_zoo_torch_backend_matches_eager(name, output):
    model = _randomise_bn(models.create(name, tiny=True)).eval()
    x = torch.randn(2, model.in_channels, 37, 53)
    eng = segfast.compile(model, x, backend="torch", output=output)
    report = segfast.check(eng, model, [x, torch.randn_like(x)])
    assert report.passed, str(report)
    worst = report.worst
    if output == "logits":
        assert worst.rel_l2 <= 1e-4
    assert worst.mask_agreement is None or worst.mask_agreement >= 0.999
    fused = eng.info.fusions
    assert fused.get("bn_fold", 0) == _bn_count(model), "every BatchNorm is folded"
    assert eng.info.ops_after < eng.info.ops_before
    assert eng.info.bytes_after < eng.info.bytes_before


@pytest.mark.parametrize("name", ["dcgan_generator", "cgan_generator", "dcgan_discriminator"])
def test_zoo_generators(name):
    spec = models.get_spec(name)
    model = _randomise_bn(models.create(name, tiny=True)).eval()
    inputs = spec.make_inputs(model, 3)
    eng = segfast.compile(model, inputs, backend="torch")
    report = segfast.check(eng, model, [inputs])
    assert report.passed, str(report)
    assert eng.info.fusions.get("bn_fold", 0) == _bn_count(model)
    assert eng.info.fusions.get("conv_act", 0) >= 4


@pytest.mark.parametrize("up_mode", ["convT", "bilinear", "nearest"])
def test_unet_decoder_convs_all_take_two_sources(up_mode):
    depth = 3
    model = models.create("unet", tiny=True, depth=depth, up_mode=up_mode).eval()
    x = torch.randn(1, 1, 40, 56)
    eng = segfast.compile(model, x, backend="torch", output="mask")
    fused = eng.info.fusions
    key = "skip_concat" if up_mode == "convT" else "skip_concat_resize"
    assert fused[key] == depth, fused
    assert fused["head_conv"] == 1
    gm = eng._runner.details["graph"]
    assert not any(n.target is torch.ops.aten.cat.default for n in gm.graph.nodes)
    assert segfast.check(eng, model, [x]).passed


@pytest.mark.parametrize(
    ("name", "fusion"),
    [("pspnet", "head_conv"), ("fcn_resnet50", "head_conv"), ("deeplabv3plus_resnet50", "head")],
)
def test_head_fires_on_upsampling_heads(name, fusion):
    model = models.create(name, tiny=True).eval()
    x = torch.randn(1, 3, 48, 40)
    eng = segfast.compile(model, x, backend="torch", output="mask")
    assert eng.info.fusions[fusion] == 1


def test_deeplab_decoder_concat_moves_past_the_depthwise_conv():
    """DeepLab v3+'s decoder concat feeds a *depthwise* conv (the separable conv's
    first half), which reads one channel per input: the concat is pushed past it
    (concat_depthwise) and the pointwise conv after it takes the two-source
    prologue, so no concatenated tensor is left in the graph."""
    model = models.create("deeplabv3plus_mobilenetv2", tiny=True).eval()
    x = torch.randn(1, 3, 45, 61)
    eng = segfast.compile(model, x, backend="torch")
    assert eng.info.fusions["concat_depthwise"] == 1
    assert eng.info.fusions["skip_concat"] >= 1
    assert "skip_concat_resize" not in eng.info.fusions  # the upsample feeds the depthwise conv
    assert segfast.check(eng, model, [x]).passed


@pytest.mark.parametrize("name", ["unet", "deeplabv3plus_resnet50", "segnet", "fcn8s", "pspnet"])
def test_dynamic_shapes(name):
    model = models.create(name, tiny=True).eval()
    x = torch.randn(1, model.in_channels, 64, 64)
    eng = segfast.compile(model, x, backend="torch", output="mask", dynamic=True)
    spec = eng.info.inputs[0]
    assert set(spec.dynamic) == {"height", "width"}
    for size in [(45, 77), (96, 33)]:
        y = torch.randn(1, model.in_channels, *size)
        report = segfast.check(eng, model, [y])
        assert report.passed, str(report)
        assert eng(y).shape == (1, *size)


def test_dynamic_batch():
    model = models.create("unet", tiny=True).eval()
    eng = segfast.compile(model, torch.randn(2, 1, 32, 32), backend="torch", dynamic=["batch"])
    assert eng(torch.randn(5, 1, 32, 32)).shape == (5, 2, 32, 32)
