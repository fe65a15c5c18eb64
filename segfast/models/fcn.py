"""Fully convolutional networks (Long, Shelhamer, Darrell, "Fully Convolutional
Networks for Semantic Segmentation", CVPR 2015).

Two models, written for segfast:

* :class:`FCN8s` — the paper's FCN-8s on VGG-16: fc6/fc7 recast as convs, a
  class-score layer, and two skip fusions (pool4 and pool3) merged by learned
  ×2 upsampling (transposed convs initialised to bilinear interpolation), then
  a ×8 learned upsampling to the input size. About 134.5M parameters at 21
  classes (the paper: 134M).
* :class:`FCNResNet50` — the later "FCN head on a dilated ResNet-50" form
  (torchvision's ``fcn_resnet50``): output stride 8, a 3×3 conv head, bilinear
  upsampling of the logits. 35,322,218 parameters with the auxiliary head at
  21 classes (torchvision: 35.3M).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._common import bilinear_kernel, check_image_input, crop_to, pad_to_multiple
from ._registry import ModelSpec, Reference, register
from .backbones.resnet import resnet50
from .backbones.vgg import VGG16


class FCN8s(nn.Module):
    """FCN-8s on VGG-16.

    Deviation from the paper's Caffe model: fc6 is a 7×7 conv with padding 3
    (the original pads the *input* by 100 pixels and crops the upsampled scores
    with offsets instead). Here the input is zero-padded at the bottom/right to
    a multiple of 32, so pool3/pool4/pool5 are exactly 1/8, 1/16, 1/32 of it,
    the skip additions line up without cropping, and the output is cropped back
    to H×W. Any H×W >= 1 works. The "at-once" variant's 0.01/0.0001 scaling of
    the pool4/pool3 inputs is not applied (the staged FCN-8s has none).
    """

    min_size = 1

    def __init__(
        self,
        num_classes: int = 21,
        in_channels: int = 3,
        width: int = 64,
        fc_width: int = 4096,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.backbone = VGG16(in_channels, width, batch_norm=False)
        c3, c4, c5 = self.backbone.out_channels[2:]
        self.fc6 = nn.Conv2d(c5, fc_width, 7, padding=3)
        self.relu6 = nn.ReLU(inplace=True)
        self.drop6 = nn.Dropout(0.5)
        self.fc7 = nn.Conv2d(fc_width, fc_width, 1)
        self.relu7 = nn.ReLU(inplace=True)
        self.drop7 = nn.Dropout(0.5)
        self.score_fr = nn.Conv2d(fc_width, num_classes, 1)
        self.score_pool4 = nn.Conv2d(c4, num_classes, 1)
        self.score_pool3 = nn.Conv2d(c3, num_classes, 1)
        self.upscore2 = nn.ConvTranspose2d(num_classes, num_classes, 4, 2, 1, bias=False)
        self.upscore_pool4 = nn.ConvTranspose2d(num_classes, num_classes, 4, 2, 1, bias=False)
        self.upscore8 = nn.ConvTranspose2d(num_classes, num_classes, 16, 8, 4, bias=False)
        # Upsampling starts as bilinear interpolation, as in the paper. The paper also
        # zeroes the score layers before training; an untrained reference model would
        # then output all zeros, so they keep PyTorch's default init here.
        for up in (self.upscore2, self.upscore_pool4, self.upscore8):
            with torch.no_grad():
                k = up.kernel_size[0]
                up.weight.copy_(bilinear_kernel(num_classes, k, device=up.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, in_channels, H, W] -> logits [N, num_classes, H, W]
        check_image_input(x, self.in_channels, self.min_size, "FCN8s")
        h, w = x.shape[-2:]
        x = pad_to_multiple(x, 32)  # x: [N, C, P, Q], P and Q multiples of 32
        _, _, pool3, pool4, pool5 = self.backbone(x)  # [N, c, P/8|P/16|P/32, ...]
        y = self.drop6(self.relu6(self.fc6(pool5)))  # [N, fc_width, P/32, Q/32]
        y = self.drop7(self.relu7(self.fc7(y)))
        y = self.upscore2(self.score_fr(y))  # [N, classes, P/16, Q/16]
        y = self.upscore_pool4(y + self.score_pool4(pool4))  # [N, classes, P/8, Q/8]
        y = self.upscore8(y + self.score_pool3(pool3))  # [N, classes, P, Q]
        return crop_to(y, h, w)


class FCNHead(nn.Sequential):
    """3×3 conv (no bias) + BN + ReLU + Dropout(0.1) + 1×1 conv to the classes.

    The module indices (0 conv, 1 BN, 4 classifier conv) match torchvision's ``FCNHead``.
    """

    def __init__(self, in_ch: int, num_classes: int) -> None:
        mid = in_ch // 4
        super().__init__(
            nn.Conv2d(in_ch, mid, 3, padding=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Dropout(0.1),
            nn.Conv2d(mid, num_classes, 1),
        )


class FCNResNet50(nn.Module):
    """FCN head on a dilated ResNet-50 (output stride 8), torchvision's ``fcn_resnet50`` form.

    ``backbone`` is a ResNet-50 with layer3/layer4 dilated 2/4; ``classifier``
    is an :class:`FCNHead` on layer4 (2048 → 512 → classes, mid width =
    in/4, so it scales with ``width``); ``aux_classifier`` (``aux=True``) is the
    same head on layer3 (1024 → 256 → classes). It exists for weight
    compatibility with torchvision checkpoints and training recipes:
    ``forward`` returns the main logits only, bilinearly upsampled
    (align_corners=False) to the input size. Any H×W >= 1 works without padding.
    """

    min_size = 1

    def __init__(
        self,
        num_classes: int = 21,
        in_channels: int = 3,
        aux: bool = True,
        width: int = 64,
        layers: Sequence[int] = (3, 4, 6, 3),
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.backbone = resnet50(in_channels, width, layers, (False, True, True))
        c3, c4 = self.backbone.out_channels[2:]
        self.classifier = FCNHead(c4, num_classes)
        self.aux_classifier = FCNHead(c3, num_classes) if aux else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, in_channels, H, W] -> logits [N, num_classes, H, W]
        check_image_input(x, self.in_channels, self.min_size, "FCNResNet50")
        h, w = x.shape[-2:]
        c4 = self.backbone(x)[3]  # [N, 2048, ceil(H/8), ceil(W/8)]
        y = self.classifier(c4)  # [N, classes, H/8, W/8]
        return F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)


def fcn8s(
    num_classes: int = 21, in_channels: int = 3, width: int = 64, fc_width: int = 4096
) -> FCN8s:
    """Build :class:`FCN8s` (defaults: PASCAL VOC's 21 classes, full VGG-16 widths)."""
    return FCN8s(num_classes, in_channels, width, fc_width)


def fcn_resnet50(
    num_classes: int = 21,
    in_channels: int = 3,
    aux: bool = True,
    width: int = 64,
    layers: Sequence[int] = (3, 4, 6, 3),
) -> FCNResNet50:
    """Build :class:`FCNResNet50` (defaults: torchvision's 21-class model with aux head)."""
    return FCNResNet50(num_classes, in_channels, aux, width, tuple(layers))


register(
    ModelSpec(
        name="fcn8s",
        factory=fcn8s,
        task="segmentation",
        description="FCN-8s on VGG-16 (Long et al. 2015), learned upsampling + skip adds",
        tiny={"width": 8, "fc_width": 32},
        standard_size=(512, 512),
        min_size=FCN8s.min_size,
        reference=Reference(
            params=134_500_000,
            options={"num_classes": 21},
            source="Long et al. 2015, Table 1 (FCN-VGG16: 134M parameters); 134.5M for 21 classes "
            "(VGG-16 convs 14.71M + fc6/fc7 119.55M + scores and upsampling 0.23M)",
        ),
    ),
    aliases=("fcn", "fcn_8s"),
)

register(
    ModelSpec(
        name="fcn_resnet50",
        factory=fcn_resnet50,
        task="segmentation",
        description="FCN head on dilated ResNet-50, output stride 8 (torchvision form)",
        tiny={"width": 8, "layers": (1, 1, 1, 1)},
        standard_size=(512, 512),
        min_size=FCNResNet50.min_size,
        reference=Reference(
            params=35_322_218,
            options={"num_classes": 21, "aux": True},
            source="torchvision.models.segmentation.fcn_resnet50 (aux, 21 classes): "
            "35,322,218 parameters, 35.3M in its model table",
        ),
    ),
)
