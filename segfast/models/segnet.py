"""SegNet (Badrinarayanan, Kendall, Cipolla, "SegNet: A Deep Convolutional
Encoder-Decoder Architecture for Image Segmentation", TPAMI 2017).

Written for segfast from the paper. The encoder is the 13-conv VGG-16 trunk
with BatchNorm; each of its five stages ends in a 2×2 stride-2 max-pool that
keeps the argmax *indices*. The decoder mirrors it: each stage first
upsamples with ``F.max_unpool2d`` at the stored indices (the sparse "pooling
indices" upsampling that is SegNet's point: no learned upsampling, no skip
feature maps), then applies the mirrored convs (3×3 + BN + ReLU). The last
conv maps to the classes without BN/ReLU; the softmax is left to the caller.
The decoder convs have no bias (it would be redundant before BatchNorm).
29,446,220 parameters at 12 classes (the paper: 29.5M).

Any H×W >= 1 works without padding: the pools round up (``ceil_mode=True``,
the rounding of the original Caffe model), and each unpool is given the
pre-pool size (``output_size=``), so odd sizes are restored exactly.

``num_classes`` defaults to 12: CamVid's 11 classes plus the void class, the
output of the paper's CamVid model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._common import check_image_input, conv_bn_act
from ._registry import ModelSpec, Reference, register
from .backbones.vgg import STAGE_CONVS, VGG16


class SegNet(nn.Module):
    """SegNet with a VGG-16-BN encoder and a mirrored, index-unpooling decoder."""

    min_size = 1

    def __init__(self, num_classes: int = 12, in_channels: int = 3, width: int = 64) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.encoder = VGG16(in_channels, width, batch_norm=True)
        chans = self.encoder.out_channels
        decoders = []
        # Decoder stage i undoes encoder stage i: it keeps chans[i] for all but its
        # last conv, which maps to the next shallower width (or to the classes).
        for i in reversed(range(len(chans))):
            convs: list[nn.Module] = [
                conv_bn_act(chans[i], chans[i], 3) for _ in range(STAGE_CONVS[i] - 1)
            ]
            if i > 0:
                convs.append(conv_bn_act(chans[i], chans[i - 1], 3))
            else:
                convs.append(nn.Conv2d(chans[0], num_classes, 3, padding=1))
            decoders.append(nn.Sequential(*convs))
        self.decoders = nn.ModuleList(decoders)
        for m in self.decoders.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, in_channels, H, W] -> logits [N, num_classes, H, W]
        check_image_input(x, self.in_channels, self.min_size, "SegNet")
        indices = []
        sizes = []
        for stage in self.encoder.stages:
            x = stage(x)  # [N, c_i, h, w]
            sizes.append((x.shape[-2], x.shape[-1]))
            x, idx = F.max_pool2d(x, 2, 2, ceil_mode=True, return_indices=True)
            indices.append(idx)  # x, idx: [N, c_i, ceil(h/2), ceil(w/2)]
        for dec, idx, size in zip(self.decoders, reversed(indices), reversed(sizes), strict=True):
            x = F.max_unpool2d(x, idx, 2, 2, output_size=size)  # [N, c_i, h, w]
            x = dec(x)
        return x


def segnet(num_classes: int = 12, in_channels: int = 3, width: int = 64) -> SegNet:
    """Build :class:`SegNet` (defaults: CamVid's 11 classes + void, full VGG-16 widths)."""
    return SegNet(num_classes, in_channels, width)


register(
    ModelSpec(
        name="segnet",
        factory=segnet,
        task="segmentation",
        description="SegNet (Badrinarayanan et al. 2017), VGG-16-BN encoder, index unpooling",
        tiny={"width": 8},
        standard_size=(360, 480),
        min_size=SegNet.min_size,
        reference=Reference(
            params=29_500_000,
            options={"num_classes": 12},
            source="Badrinarayanan et al. 2017, architecture comparison (SegNet: 29.5M "
            "trainable parameters); "
            "this implementation: 29,446,220 at 12 classes",
        ),
    ),
)
