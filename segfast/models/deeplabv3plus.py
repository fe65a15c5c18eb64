"""DeepLab v3+ (Chen, Zhu, Papandreou, Schroff, Adam, "Encoder-Decoder with Atrous
Separable Convolution for Semantic Image Segmentation", ECCV 2018).

Written for segfast from the paper, in the layer layout of
segmentation_models_pytorch's ``DeepLabV3Plus`` (so parameter counts agree):

* encoder at output stride 16: a ResNet-50 with layer4 dilated 2, or a
  MobileNetV2 whose last stage is dilated 2;
* ASPP: a 1×1 branch, three atrous *separable* 3×3 branches (depthwise 3×3
  dilated, no bias → pointwise 1×1, no bias → BN → ReLU) at ``atrous_rates``
  and an image-pooling branch (global average → 1×1 conv + BN + ReLU →
  upsample), concatenated and projected 5·D → D by a 1×1 conv + BN + ReLU +
  Dropout(0.5), then a separable 3×3 conv D → D + BN + ReLU (D =
  ``decoder_channels``, 256);
* decoder: the stride-4 low-level features (ResNet layer1, MobileNetV2's
  24-channel stage) are reduced to 48 channels by a 1×1 conv + BN + ReLU; the
  ASPP output is upsampled bilinearly *to their size* and concatenated before
  them; a separable 3×3 conv + BN + ReLU fuses them to D channels;
* head: a 3×3 conv to the classes, bilinearly upsampled to the input size.

Upsampling to explicit sizes (not a fixed ×4) makes any H×W >= 1 work
without padding. smp (and the paper's TensorFlow code) upsample with
``align_corners=True``; here it is the ``align_corners`` option, default False
(PyTorch's default, and what torchvision's DeepLab models use).

Parameters at 1 class (smp's reported sizes): 26,679,633 with ResNet-50
(smp: 26.68M), 4,380,561 with MobileNetV2 (smp: 4.38M).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._common import check_image_input, conv_bn_act
from ._registry import ModelSpec, Reference, register
from .backbones.mobilenetv2 import MobileNetV2
from .backbones.resnet import resnet50

LOW_LEVEL_CHANNELS = 48


class SeparableConv2d(nn.Sequential):
    """Depthwise 3×3 (dilated, no bias) followed by pointwise 1×1 (no bias)."""

    def __init__(self, in_ch: int, out_ch: int, dilation: int = 1) -> None:
        super().__init__(
            nn.Conv2d(
                in_ch, in_ch, 3, padding=dilation, dilation=dilation, groups=in_ch, bias=False
            ),
            nn.Conv2d(in_ch, out_ch, 1, bias=False),
        )


def separable_bn_relu(in_ch: int, out_ch: int, dilation: int = 1) -> nn.Sequential:
    """Separable 3×3 conv + BN + ReLU."""
    return nn.Sequential(
        SeparableConv2d(in_ch, out_ch, dilation), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)
    )


class ImagePooling(nn.Module):
    """ASPP's image-level branch: global average → 1×1 conv + BN + ReLU → upsample."""

    def __init__(self, in_ch: int, out_ch: int, align_corners: bool) -> None:
        super().__init__()
        self.conv = conv_bn_act(in_ch, out_ch, 1)
        self.align_corners = align_corners

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, C, h, w] -> [N, out_ch, h, w]
        size = (x.shape[-2], x.shape[-1])
        y = self.conv(F.adaptive_avg_pool2d(x, 1))  # [N, out_ch, 1, 1]
        return F.interpolate(y, size=size, mode="bilinear", align_corners=self.align_corners)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling with separable atrous branches."""

    def __init__(
        self, in_ch: int, out_ch: int, atrous_rates: Sequence[int], align_corners: bool
    ) -> None:
        super().__init__()
        branches: list[nn.Module] = [conv_bn_act(in_ch, out_ch, 1)]
        branches += [separable_bn_relu(in_ch, out_ch, rate) for rate in atrous_rates]
        branches.append(ImagePooling(in_ch, out_ch, align_corners))
        self.branches = nn.ModuleList(branches)
        self.project = nn.Sequential(
            conv_bn_act(len(branches) * out_ch, out_ch, 1), nn.Dropout(0.5)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, C, h, w] -> [N, out_ch, h, w]
        return self.project(torch.cat([b(x) for b in self.branches], dim=1))


class DeepLabV3Plus(nn.Module):
    """DeepLab v3+ on a feature extractor that returns a list of stage outputs.

    ``low_level_index`` / ``high_level_index`` pick the stride-4 and the deepest
    (output stride 16) maps from the backbone's outputs.
    """

    min_size = 1

    def __init__(
        self,
        backbone: nn.Module,
        low_level_index: int,
        num_classes: int = 21,
        atrous_rates: Sequence[int] = (6, 12, 18),
        decoder_channels: int = 256,
        align_corners: bool = False,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_channels: int = backbone.in_channels
        self.align_corners = align_corners
        self.low_level_index = low_level_index
        self.backbone = backbone
        chans: tuple[int, ...] = backbone.out_channels
        self.aspp = nn.Sequential(
            ASPP(chans[-1], decoder_channels, atrous_rates, align_corners),
            separable_bn_relu(decoder_channels, decoder_channels),
        )
        self.low_level = conv_bn_act(chans[low_level_index], LOW_LEVEL_CHANNELS, 1)
        self.fuse = separable_bn_relu(decoder_channels + LOW_LEVEL_CHANNELS, decoder_channels)
        self.head = nn.Conv2d(decoder_channels, num_classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, in_channels, H, W] -> logits [N, num_classes, H, W]
        check_image_input(x, self.in_channels, self.min_size, type(self).__name__)
        h, w = x.shape[-2:]
        feats = self.backbone(x)
        low = self.low_level(feats[self.low_level_index])  # [N, 48, H/4, W/4]
        y = self.aspp(feats[-1])  # [N, D, H/16, W/16]
        y = F.interpolate(
            y,
            size=(low.shape[-2], low.shape[-1]),
            mode="bilinear",
            align_corners=self.align_corners,
        )  # [N, D, H/4, W/4]
        y = self.fuse(torch.cat([y, low], dim=1))  # [N, D, H/4, W/4]
        y = self.head(y)  # [N, classes, H/4, W/4]
        return F.interpolate(y, size=(h, w), mode="bilinear", align_corners=self.align_corners)


def deeplabv3plus_resnet50(
    num_classes: int = 21,
    in_channels: int = 3,
    atrous_rates: Sequence[int] = (6, 12, 18),
    decoder_channels: int = 256,
    align_corners: bool = False,
    width: int = 64,
    layers: Sequence[int] = (3, 4, 6, 3),
) -> DeepLabV3Plus:
    """DeepLab v3+ on a ResNet-50 with layer4 dilated (output stride 16)."""
    backbone = resnet50(in_channels, width, tuple(layers), (False, False, True))
    return DeepLabV3Plus(
        backbone, 0, num_classes, tuple(atrous_rates), decoder_channels, align_corners
    )


def deeplabv3plus_mobilenetv2(
    num_classes: int = 21,
    in_channels: int = 3,
    atrous_rates: Sequence[int] = (6, 12, 18),
    decoder_channels: int = 256,
    align_corners: bool = False,
    width_mult: float = 1.0,
) -> DeepLabV3Plus:
    """DeepLab v3+ on a MobileNetV2 with its last stage dilated (output stride 16)."""
    backbone = MobileNetV2(in_channels, width_mult, output_stride=16)
    return DeepLabV3Plus(
        backbone, 1, num_classes, tuple(atrous_rates), decoder_channels, align_corners
    )


register(
    ModelSpec(
        name="deeplabv3plus_resnet50",
        factory=deeplabv3plus_resnet50,
        task="segmentation",
        description="DeepLab v3+ (Chen et al. 2018) on ResNet-50, output stride 16 (smp form)",
        tiny={"width": 8, "layers": (1, 1, 1, 1), "decoder_channels": 16},
        standard_size=(512, 512),
        min_size=DeepLabV3Plus.min_size,
        reference=Reference(
            params=26_680_000,
            options={"num_classes": 1},
            source="segmentation_models_pytorch DeepLabV3Plus(encoder_name='resnet50', "
            "classes=1): 26.68M parameters",
        ),
    ),
    aliases=("deeplabv3plus", "deeplabv3+"),
)

register(
    ModelSpec(
        name="deeplabv3plus_mobilenetv2",
        factory=deeplabv3plus_mobilenetv2,
        task="segmentation",
        description="DeepLab v3+ (Chen et al. 2018) on MobileNetV2, output stride 16 (smp form)",
        tiny={"width_mult": 0.25, "decoder_channels": 16},
        standard_size=(512, 512),
        min_size=DeepLabV3Plus.min_size,
        reference=Reference(
            params=4_380_000,
            options={"num_classes": 1},
            source="segmentation_models_pytorch DeepLabV3Plus(encoder_name='mobilenet_v2', "
            "classes=1): 4.38M parameters",
        ),
    ),
    aliases=("deeplabv3plus_mobilenet_v2",),
)
