"""Backbones: torchvision-compatible names, stage widths and strides, dilation."""

from __future__ import annotations

import pytest
import torch

from segfast.models.backbones import make_divisible, mobilenet_v2, resnet18, resnet50, vgg16_bn

TORCHVISION_RESNET50_KEYS = {
    "conv1.weight",
    "bn1.running_mean",
    "layer1.0.conv1.weight",
    "layer1.0.downsample.0.weight",
    "layer1.0.downsample.1.num_batches_tracked",
    "layer3.5.bn3.bias",
    "layer4.2.conv3.weight",
}
TORCHVISION_MOBILENETV2_KEYS = {
    "features.0.0.weight",
    "features.0.1.running_var",
    "features.1.conv.0.0.weight",  # t=1 block: depthwise first
    "features.1.conv.1.weight",
    "features.2.conv.0.0.weight",  # expand 1×1
    "features.2.conv.1.0.weight",  # depthwise
    "features.2.conv.2.weight",  # project
    "features.2.conv.3.bias",
    "features.17.conv.3.running_mean",
    "features.18.0.weight",
}


def test_resnet_names_follow_torchvision():
    keys = set(resnet50(width=8, layers=(1, 1, 6, 3)).state_dict())
    assert keys >= TORCHVISION_RESNET50_KEYS
    assert not any(k.startswith("fc.") for k in keys)
    assert {"layer1.0.conv2.weight", "layer1.0.bn2.weight"} <= set(resnet18(width=8).state_dict())


def test_mobilenetv2_names_follow_torchvision():
    assert set(mobilenet_v2(width_mult=0.25).state_dict()) >= TORCHVISION_MOBILENETV2_KEYS


@pytest.mark.parametrize(
    ("dilate", "sizes", "strides"),
    [
        ((False, False, False), (16, 8, 4, 2), (4, 8, 16, 32)),
        ((False, False, True), (16, 8, 4, 4), (4, 8, 16, 16)),
        ((False, True, True), (16, 8, 8, 8), (4, 8, 8, 8)),
    ],
)
def test_resnet_dilation(dilate, sizes, strides):
    model = resnet50(width=8, layers=(1, 2, 2, 2), replace_stride_with_dilation=dilate).eval()
    assert model.strides == strides
    assert model.out_channels == (32, 64, 128, 256)
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 64, 64))
    assert [f.shape[-1] for f in feats] == list(sizes)
    assert [f.shape[1] for f in feats] == list(model.out_channels)


def test_resnet_dilated_stage_keeps_previous_dilation_in_first_block():
    model = resnet50(width=8, layers=(1, 1, 2, 3), replace_stride_with_dilation=(False, True, True))
    assert model.layer3[0].conv2.dilation == (1, 1)  # the block whose stride became 1
    assert model.layer3[1].conv2.dilation == (2, 2)
    assert model.layer4[0].conv2.dilation == (2, 2)
    assert model.layer4[2].conv2.dilation == (4, 4)
    assert model.layer3[0].conv2.stride == (1, 1)
    assert model.layer3[0].downsample[0].stride == (1, 1)


def test_resnet_stride_is_on_the_3x3_conv():
    model = resnet50(width=8, layers=(1, 1, 1, 1))
    assert model.layer2[0].conv1.stride == (1, 1)
    assert model.layer2[0].conv2.stride == (2, 2)


@pytest.mark.parametrize(
    ("output_stride", "sizes"),
    [(32, (32, 16, 8, 4, 2)), (16, (32, 16, 8, 4, 4)), (8, (32, 16, 8, 8, 8))],
)
def test_mobilenetv2_output_stride(output_stride, sizes):
    model = mobilenet_v2(width_mult=0.25, output_stride=output_stride).eval()
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 64, 64))
    assert [f.shape[-1] for f in feats] == list(sizes)
    assert model.strides == tuple(64 // s for s in sizes)
    assert [f.shape[1] for f in feats] == list(model.out_channels)


def test_mobilenetv2_widths():
    assert mobilenet_v2().out_channels == (16, 24, 32, 96, 1280)
    assert mobilenet_v2(width_mult=0.5).out_channels == (8, 16, 16, 48, 1280)
    assert mobilenet_v2(width_mult=1.4).out_channels == (24, 32, 48, 136, 1792)
    assert [make_divisible(v) for v in (3, 8, 12, 19.2, 36)] == [8, 8, 16, 24, 40]


def test_mobilenetv2_residuals():
    with torch.device("meta"):
        model = mobilenet_v2()
    uses = [getattr(b, "use_residual", None) for b in model.features]
    # Table 2 at width 1.0: residuals in every repeated (stride-1, same-width) block.
    # (At width 0.25 the first block maps 8 -> 8 channels and gets one as well.)
    assert uses[1:18] == [
        False, False, True, False, True, True, False, True, True, True,
        False, True, True, False, True, True, False,
    ]  # fmt: skip


def test_vgg_stages():
    model = vgg16_bn(width=8).eval()
    assert model.out_channels == (8, 16, 32, 64, 64)
    convs = [sum(isinstance(m, torch.nn.Conv2d) for m in s) for s in model.stages]
    assert convs == [2, 2, 3, 3, 3]
    with torch.no_grad():
        pools = model(torch.randn(1, 3, 64, 96))
    assert [p.shape[-2:] for p in pools] == [(64 // s, 96 // s) for s in model.strides]
