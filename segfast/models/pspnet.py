"""PSPNet (Zhao, Shi, Qi, Wang, Jia, "Pyramid Scene Parsing Network", CVPR 2017).

Written for segfast from the paper. A dilated ResNet-50 (output stride 8; the
standard 7×7 stem rather than the paper's three 3×3 stem convs) feeds the
pyramid pooling module: for each bin size ``b`` in ``bins`` (1, 2, 3, 6),
``F.adaptive_avg_pool2d`` to b×b, a 1×1 conv (no bias) + BN + ReLU down to
``C / len(bins)`` channels, and a bilinear upsample back to the feature size.
The features and the four branches are concatenated (2·C channels), fused by
a 3×3 conv (no bias) + BN + ReLU + Dropout(0.1) to ``C / 4`` channels, and a
1×1 conv gives the class logits, bilinearly upsampled to the input size
(align_corners=False). The paper's auxiliary training loss on layer3 is not
included. 46,592,597 parameters at 21 classes (C = 2048).

Any H×W >= 1 works without padding. When the feature map is smaller than a
bin size, adaptive pooling repeats feature cells (its defined behaviour), so
the 6×6 branch carries no extra information below 41×41 input pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._common import check_image_input, conv_bn_act
from ._registry import ModelSpec, Reference, register
from .backbones.resnet import resnet50


class PyramidPooling(nn.Module):
    """Pyramid pooling module: ``[x, up(conv(pool_b(x))) for b in bins]`` concatenated."""

    def __init__(self, in_ch: int, bins: Sequence[int]) -> None:
        super().__init__()
        self.bins = tuple(bins)
        branch_ch = in_ch // len(self.bins)
        self.branches = nn.ModuleList(conv_bn_act(in_ch, branch_ch, 1) for _ in self.bins)
        self.out_channels = in_ch + branch_ch * len(self.bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, C, h, w] -> [N, C + len(bins) * C/len(bins), h, w]
        size = (x.shape[-2], x.shape[-1])
        outs = [x]
        for b, branch in zip(self.bins, self.branches, strict=True):
            y = branch(F.adaptive_avg_pool2d(x, b))  # [N, C/len(bins), b, b]
            outs.append(F.interpolate(y, size=size, mode="bilinear", align_corners=False))
        return torch.cat(outs, dim=1)


class PSPNet(nn.Module):
    """PSPNet on a dilated ResNet-50; see the module docstring."""

    min_size = 1

    def __init__(
        self,
        num_classes: int = 21,
        in_channels: int = 3,
        width: int = 64,
        layers: Sequence[int] = (3, 4, 6, 3),
        bins: Sequence[int] = (1, 2, 3, 6),
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.backbone = resnet50(in_channels, width, layers, (False, True, True))
        c4 = self.backbone.out_channels[3]
        self.ppm = PyramidPooling(c4, bins)
        mid = c4 // 4
        self.bottleneck = nn.Sequential(conv_bn_act(self.ppm.out_channels, mid, 3), nn.Dropout(0.1))
        self.classifier = nn.Conv2d(mid, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, in_channels, H, W] -> logits [N, num_classes, H, W]
        check_image_input(x, self.in_channels, self.min_size, "PSPNet")
        h, w = x.shape[-2:]
        c4 = self.backbone(x)[3]  # [N, 2048, ceil(H/8), ceil(W/8)]
        y = self.bottleneck(self.ppm(c4))  # [N, 512, H/8, W/8]
        y = self.classifier(y)  # [N, classes, H/8, W/8]
        return F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)


def pspnet(
    num_classes: int = 21,
    in_channels: int = 3,
    width: int = 64,
    layers: Sequence[int] = (3, 4, 6, 3),
    bins: Sequence[int] = (1, 2, 3, 6),
) -> PSPNet:
    """Build :class:`PSPNet` (defaults: ResNet-50, bins 1/2/3/6, PASCAL VOC's 21 classes)."""
    return PSPNet(num_classes, in_channels, width, tuple(layers), tuple(bins))


register(
    ModelSpec(
        name="pspnet",
        factory=pspnet,
        task="segmentation",
        description="PSPNet (Zhao et al. 2017), dilated ResNet-50 + pyramid pooling",
        tiny={"width": 8, "layers": (1, 1, 1, 1)},
        standard_size=(512, 512),
        min_size=PSPNet.min_size,
        reference=Reference(
            params=46_600_000,
            options={"num_classes": 21},
            source="Zhao et al. 2017 on a standard-stem dilated ResNet-50 without the auxiliary "
            "head: ≈46.6M as commonly reported for that form; this implementation sums to "
            "46,592,597 (ResNet-50 features 23,508,032 + PPM 4,198,400 + fusion 18,875,392 "
            "+ classifier 10,773)",
        ),
    ),
    aliases=("psp", "pspnet_resnet50"),
)
