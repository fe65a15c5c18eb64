"""ResNet feature extractors (He, Zhang, Ren, Sun, "Deep Residual Learning for
Image Recognition", CVPR 2016), optionally dilated for dense prediction.

Written for segfast from the paper, in the "v1.5" form common to today's
implementations: the stride of a Bottleneck sits on its 3×3 conv, not on the
first 1×1. Attribute names follow torchvision's (``conv1, bn1, relu, maxpool,
layer1..layer4``; blocks ``conv1, bn1, conv2, bn2[, conv3, bn3], downsample``
with ``downsample.0`` the 1×1 conv and ``downsample.1`` its BatchNorm), so a
torchvision ImageNet state dict (minus ``fc.*``) loads by key.

There is no classifier: ``forward`` returns the four stage outputs
(``layer1`` .. ``layer4``, strides 4, 8, 16, 32 before dilation).
ResNet-50 features-only has 23,508,032 parameters (the paper's 25.6M minus
the 2,049,000 of the 1000-way fc layer).

Dilation (Chen et al., DeepLab; Yu & Koltun 2016): ``replace_stride_with_dilation``
turns the stride 2 of layer2/3/4 into dilation, keeping the feature map larger
(output stride 8 with ``(False, True, True)``, 16 with ``(False, False, True)``).
The first block of a dilated stage keeps the previous stage's dilation (it is
the block whose stride was removed); the later blocks use the new one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(
        in_ch, out_ch, 3, stride=stride, padding=dilation, dilation=dilation, bias=False
    )


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3×3 convs with a residual add (ResNet-18/34)."""

    expansion = 1

    def __init__(
        self,
        in_ch: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        dilation: int = 1,
        first_dilation: int = 1,
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_ch, planes, stride, first_dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, C_in, H, W] -> [N, planes, H/s, W/s]
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (strided, dilated), 1×1 expand ×4, residual add (ResNet-50/101)."""

    expansion = 4

    def __init__(
        self,
        in_ch: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        dilation: int = 1,
        first_dilation: int = 1,
    ) -> None:
        super().__init__()
        # A Bottleneck has one 3×3 conv, so ``first_dilation`` is the one it uses.
        del dilation
        self.conv1 = _conv1x1(in_ch, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, first_dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, C_in, H, W] -> [N, 4*planes, H/s, W/s]
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet trunk without pooling head or classifier; returns layer1..layer4 outputs.

    ``width`` is the stem width (64 in the paper); stage ``i`` has ``width * 2**i``
    planes, times the block's expansion at its output. ``out_channels`` and
    ``strides`` describe the four returned feature maps.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        in_channels: int = 3,
        width: int = 64,
        replace_stride_with_dilation: Sequence[bool] = (False, False, False),
    ) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"layers must have 4 stage depths, got {tuple(layers)}")
        if len(replace_stride_with_dilation) != 3:
            raise ValueError(
                "replace_stride_with_dilation must have 3 flags (layer2..layer4), "
                f"got {tuple(replace_stride_with_dilation)}"
            )
        self.in_channels = in_channels
        self._in_planes = width
        self._dilation = 1
        self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        dilate = (False, *replace_stride_with_dilation)
        stage_strides = (1, 2, 2, 2)
        out_channels: list[int] = []
        strides: list[int] = []
        total_stride = 4
        for i in range(4):
            stage = self._make_layer(block, width * 2**i, layers[i], stage_strides[i], dilate[i])
            self.add_module(f"layer{i + 1}", stage)
            out_channels.append(width * 2**i * block.expansion)
            if not dilate[i]:
                total_stride *= stage_strides[i]
            strides.append(total_stride)
        self.out_channels: tuple[int, ...] = tuple(out_channels)
        self.strides: tuple[int, ...] = tuple(strides)
        self._init_weights()

    def _make_layer(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        planes: int,
        blocks: int,
        stride: int,
        dilate: bool,
    ) -> nn.Sequential:
        previous_dilation = self._dilation
        if dilate:
            self._dilation *= stride
            stride = 1
        downsample = None
        out_ch = planes * block.expansion
        if stride != 1 or self._in_planes != out_ch:
            downsample = nn.Sequential(
                _conv1x1(self._in_planes, out_ch, stride), nn.BatchNorm2d(out_ch)
            )
        stage = [
            block(
                self._in_planes,
                planes,
                stride,
                downsample,
                dilation=self._dilation,
                first_dilation=previous_dilation,
            )
        ]
        self._in_planes = out_ch
        stage += [
            block(out_ch, planes, dilation=self._dilation, first_dilation=self._dilation)
            for _ in range(1, blocks)
        ]
        return nn.Sequential(*stage)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        # x: [N, in_channels, H, W]
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # x: [N, width, H/4, W/4]
        c1 = self.layer1(x)  # [N, out_channels[0], H/4, W/4]
        c2 = self.layer2(c1)  # [N, out_channels[1], H/strides[1], ...]
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return [c1, c2, c3, c4]


def _resnet(
    block: type[BasicBlock] | type[Bottleneck],
    layers: Sequence[int],
    in_channels: int,
    width: int,
    replace_stride_with_dilation: Sequence[bool],
) -> ResNet:
    return ResNet(block, layers, in_channels, width, replace_stride_with_dilation)


def resnet18(
    in_channels: int = 3,
    width: int = 64,
    layers: Sequence[int] = (2, 2, 2, 2),
    replace_stride_with_dilation: Sequence[bool] = (False, False, False),
) -> ResNet:
    """ResNet-18 features (11,176,512 params at width 64; the paper's 11.7M with fc)."""
    return _resnet(BasicBlock, layers, in_channels, width, replace_stride_with_dilation)


def resnet34(
    in_channels: int = 3,
    width: int = 64,
    layers: Sequence[int] = (3, 4, 6, 3),
    replace_stride_with_dilation: Sequence[bool] = (False, False, False),
) -> ResNet:
    """ResNet-34 features (21,284,672 params at width 64; the paper's 21.8M with fc)."""
    return _resnet(BasicBlock, layers, in_channels, width, replace_stride_with_dilation)


def resnet50(
    in_channels: int = 3,
    width: int = 64,
    layers: Sequence[int] = (3, 4, 6, 3),
    replace_stride_with_dilation: Sequence[bool] = (False, False, False),
) -> ResNet:
    """ResNet-50 features (23,508,032 params at width 64; the paper's 25.6M with fc)."""
    return _resnet(Bottleneck, layers, in_channels, width, replace_stride_with_dilation)


def resnet101(
    in_channels: int = 3,
    width: int = 64,
    layers: Sequence[int] = (3, 4, 23, 3),
    replace_stride_with_dilation: Sequence[bool] = (False, False, False),
) -> ResNet:
    """ResNet-101 features (42,500,160 params at width 64; the paper's 44.5M with fc)."""
    return _resnet(Bottleneck, layers, in_channels, width, replace_stride_with_dilation)
