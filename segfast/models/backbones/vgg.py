"""VGG-16 convolutional trunk (Simonyan & Zisserman, "Very Deep Convolutional
Networks for Large-Scale Image Recognition", ICLR 2015, configuration D),
with an optional BatchNorm after every conv (the later "VGG16-BN" variant).

Written for segfast from the paper. The 13 3×3 convs are grouped in five
stages (2, 2, 3, 3, 3 convs) of ``width * (1, 2, 4, 8, 8)`` channels; each conv
keeps its bias even with BatchNorm, as the published VGG16-BN weights do.
Pooling is left to the caller — FCN taps pool3/pool4/pool5, SegNet pools with
indices — so ``stages`` holds the conv blocks only and ``forward`` is a
convenience that pools each stage with a 2×2 max-pool.

Parameters at width 64: 14,714,688 (VGG-16 conv part, the paper's 138M minus
the three fc layers) and 14,723,136 with BatchNorm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

STAGE_CONVS = (2, 2, 3, 3, 3)
STAGE_WIDTHS = (1, 2, 4, 8, 8)


def vgg_stage(in_ch: int, out_ch: int, convs: int, batch_norm: bool) -> nn.Sequential:
    """``convs`` × (3×3 conv (+ BN) + ReLU); the first maps ``in_ch`` to ``out_ch``."""
    layers: list[nn.Module] = []
    for i in range(convs):
        layers.append(nn.Conv2d(in_ch if i == 0 else out_ch, out_ch, 3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_ch))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class VGG16(nn.Module):
    """The 13-conv VGG-16 trunk as five stages; ``forward`` returns pool1..pool5."""

    def __init__(self, in_channels: int = 3, width: int = 64, batch_norm: bool = False) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels: tuple[int, ...] = tuple(width * m for m in STAGE_WIDTHS)
        self.strides: tuple[int, ...] = (2, 4, 8, 16, 32)
        stages = []
        prev = in_channels
        for convs, ch in zip(STAGE_CONVS, self.out_channels, strict=True):
            stages.append(vgg_stage(prev, ch, convs, batch_norm))
            prev = ch
        self.stages = nn.ModuleList(stages)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        # x: [N, in_channels, H, W]; stage i output: [N, out_channels[i], H/2**(i+1), W/2**(i+1)]
        pools = []
        for stage in self.stages:
            x = F.max_pool2d(stage(x), kernel_size=2, stride=2)
            pools.append(x)
        return pools


def vgg16(in_channels: int = 3, width: int = 64) -> VGG16:
    """VGG-16 conv trunk (14,714,688 params at width 64)."""
    return VGG16(in_channels, width, batch_norm=False)


def vgg16_bn(in_channels: int = 3, width: int = 64) -> VGG16:
    """VGG-16 conv trunk with BatchNorm (14,723,136 params at width 64)."""
    return VGG16(in_channels, width, batch_norm=True)
