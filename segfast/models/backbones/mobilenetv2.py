"""MobileNetV2 feature extractor (Sandler, Howard, Zhu, Zhmoginov, Chen,
"MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018).

Written for segfast from the paper's Table 2: a stride-2 3×3 stem conv, 17
inverted residual blocks (expand 1×1 + BN + ReLU6, depthwise 3×3 + BN + ReLU6,
linear project 1×1 + BN, residual add when stride is 1 and the widths match)
and a final 1×1 conv to 1280 channels. No classifier: ``forward`` returns the
five stage outputs at strides 2, 4, 8, 16, 32 (16, 24, 32, 96, 1280 channels at
width 1.0). Features-only at width 1.0: 2,223,872 parameters (the paper's 3.4M
minus the 1,281,000 of the 1000-way classifier).

Module names follow torchvision's (``features.<i>.conv.<j>``) so its ImageNet
weights load by key (minus ``classifier.*``).

``width_mult`` scales every width and rounds it to a multiple of 8 (never
below 8 and never more than 10 % under the exact value); the last conv keeps
at least 1280 channels. ``output_stride`` 16 or 8 replaces the stride 2 of the
last one or two stages by dilation 2 (and 4): every depthwise conv of a
dilated stage, its first block included, uses the stage's new dilation, as in
segmentation_models_pytorch's dilated encoders and torchvision's MobileNetV3.
"""

from __future__ import annotations

import torch
from torch import nn

from .._common import conv_bn_act

# (expansion t, output channels c, repeats n, first stride s) from Table 2 of the paper.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
# ``features`` index ranges of the five stages (strides 2, 4, 8, 16, 32).
STAGE_ENDS = (2, 4, 7, 14, 19)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to the nearest multiple of ``divisor``, at least ``divisor``,
    going one step up when rounding would lose more than 10 %."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class InvertedResidual(nn.Module):
    """Expand (1×1) → depthwise 3×3 → linear project (1×1), residual if shapes match."""

    def __init__(
        self, in_ch: int, out_ch: int, stride: int, expand_ratio: int, dilation: int = 1
    ) -> None:
        super().__init__()
        hidden = round(in_ch * expand_ratio)
        self.use_residual = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(conv_bn_act(in_ch, hidden, 1, act=nn.ReLU6))
        layers += [
            conv_bn_act(
                hidden, hidden, 3, stride=stride, dilation=dilation, groups=hidden, act=nn.ReLU6
            ),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, in_ch, H, W] -> [N, out_ch, H/stride, W/stride]
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 trunk; ``forward`` returns the 5 stage outputs (see ``out_channels``)."""

    def __init__(
        self, in_channels: int = 3, width_mult: float = 1.0, output_stride: int = 32
    ) -> None:
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        if width_mult <= 0:
            raise ValueError(f"width_mult must be > 0, got {width_mult}")
        self.in_channels = in_channels
        stem_ch = make_divisible(32 * width_mult)
        last_ch = make_divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [conv_bn_act(in_channels, stem_ch, 3, stride=2, act=nn.ReLU6)]
        widths = [stem_ch]  # output channels of each ``features`` entry
        current_stride, dilation, prev = 2, 1, stem_ch
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            out_ch = make_divisible(c * width_mult)
            for i in range(n):
                stride = s if i == 0 else 1
                if stride > 1 and current_stride >= output_stride:
                    dilation *= stride
                    stride = 1
                current_stride *= stride
                layers.append(InvertedResidual(prev, out_ch, stride, t, dilation))
                widths.append(out_ch)
                prev = out_ch
        layers.append(conv_bn_act(prev, last_ch, 1, act=nn.ReLU6))
        widths.append(last_ch)
        self.features = nn.Sequential(*layers)
        self.out_channels: tuple[int, ...] = tuple(widths[end - 1] for end in STAGE_ENDS)
        self.strides: tuple[int, ...] = tuple(min(2**i, output_stride) for i in range(1, 6))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        # x: [N, in_channels, H, W] -> 5 maps [N, out_channels[i], H/strides[i], W/strides[i]]
        outs = []
        start = 0
        for end in STAGE_ENDS:
            for i in range(start, end):
                x = self.features[i](x)
            outs.append(x)
            start = end
        return outs


def mobilenet_v2(
    in_channels: int = 3, width_mult: float = 1.0, output_stride: int = 32
) -> MobileNetV2:
    """MobileNetV2 features (2,223,872 params at width 1.0)."""
    return MobileNetV2(in_channels, width_mult, output_stride)
