"""Edge-class segmentation networks, written for segfast as stand-ins for the ones
users bring from torchvision and segmentation_models_pytorch (neither installs in
segfast's CI): the same layer types, widths, strides and block structure, random
weights. Not in the zoo registry (``segfast.models.names()``); built by the
fusion tests and ``benchmarks/edge_cpu.py``.

- :func:`lraspp_mobilenet_v3_large` — torchvision's ``lraspp_mobilenet_v3_large``:
  the MobileNetV3-Large feature extractor (Howard et al., "Searching for
  MobileNetV3", ICCV 2019, Table 1), last stage dilated (output stride 16), and the
  LR-ASPP head (a 1×1 conv branch gated by a pooled sigmoid branch, bilinear
  upsample to the stride-8 features, two 1×1 classifiers summed, bilinear upsample
  to the input). Bneck: [1×1 expand + BN + act] → depthwise k×k + BN + act →
  [squeeze-excitation: pool → 1×1 → ReLU → 1×1 → hardsigmoid → ×] → 1×1 project +
  BN [+ residual]. ``width`` scales every width (rounded to multiples of 8) for
  tiny test configurations.
- :func:`deeplabv3_mobilenet_v3_large` — torchvision's ``deeplabv3_mobilenet_v3_large``
  without its auxiliary head: the same dilated backbone and DeepLabHead (ASPP at rates
  12/24/36 with an image-pooling branch, 3×3 conv, 1×1 classifier).
- :func:`unet_efficientnet_b0` — smp's ``Unet("efficientnet-b0")``: the
  EfficientNet-B0 encoder (Tan & Le, ICML 2019, Table 1; MBConv with SiLU and
  squeeze-excitation with a sigmoid gate, SE width a quarter of the block input)
  and smp's U-Net decoder (nearest 2× upsample, skip concat, two 3×3 conv + BN +
  ReLU per block, decoder widths 256/128/64/32/16, a 3×3 segmentation head).
- :func:`fpn_groupnorm` — an smp-style FPN head with GroupNorm (3×3 conv +
  GroupNorm(32) + ReLU segmentation blocks on every pyramid level) over a small
  MobileNetV2-style encoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backbones.mobilenetv2 import make_divisible

# MobileNetV3-Large (torchvision's bneck table): kernel, expanded, out, SE, activation
# ("RE" ReLU, "HS" hardswish), stride. Blocks 13-15 form the stage dilated for segmentation.
_MNV3_LARGE = (
    (3, 16, 16, False, "RE", 1),
    (3, 64, 24, False, "RE", 2),
    (3, 72, 24, False, "RE", 1),
    (5, 72, 40, True, "RE", 2),
    (5, 120, 40, True, "RE", 1),
    (5, 120, 40, True, "RE", 1),
    (3, 240, 80, False, "HS", 2),
    (3, 200, 80, False, "HS", 1),
    (3, 184, 80, False, "HS", 1),
    (3, 184, 80, False, "HS", 1),
    (3, 480, 112, True, "HS", 1),
    (3, 672, 112, True, "HS", 1),
    (5, 672, 160, True, "HS", 2),
    (5, 960, 160, True, "HS", 1),
    (5, 960, 160, True, "HS", 1),
)
_LOW_BLOCK = 6  # features[0..6]: stem + 6 blocks → stride 8, 40 channels ("low")


def _act(name: str) -> nn.Module:
    return {"RE": nn.ReLU, "HS": nn.Hardswish, "SI": nn.SiLU}[name](inplace=True)


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, dilation: int = 1,
             act: str | None = None) -> nn.Sequential:  # fmt: skip
    pad = (k - 1) // 2 * dilation
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride, pad, dilation, groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act is not None:
        layers.append(_act(act))
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    """pool → 1×1 → act → 1×1 → gate, times the input (torchvision's / timm's SE)."""

    def __init__(self, channels: int, squeeze: int, act: str = "RE", gate: str = "hardsigmoid",
                 mean: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.act = _act(act)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.gate = nn.Hardsigmoid() if gate == "hardsigmoid" else nn.Sigmoid()
        self.mean = mean  # timm: x.mean((2, 3), keepdim=True); torchvision: adaptive pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True) if self.mean else F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


class Bneck(nn.Module):
    """MobileNetV3's inverted residual block (and EfficientNet's MBConv)."""

    def __init__(self, cin: int, k: int, exp: int, cout: int, se: int, act: str, stride: int,
                 dilation: int = 1, gate: str = "hardsigmoid", se_act: str = "RE",
                 mean: bool = False) -> None:  # fmt: skip
        super().__init__()
        layers: list[nn.Module] = []
        if exp != cin:
            layers.append(_conv_bn(cin, exp, 1, act=act))
        stride = 1 if dilation > 1 else stride
        layers.append(_conv_bn(exp, exp, k, stride, exp, dilation, act=act))
        if se:
            layers.append(SqueezeExcitation(exp, se, se_act, gate, mean))
        layers.append(_conv_bn(exp, cout, 1))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


def _mnv3_large_features(in_channels: int, width: float) -> tuple[nn.Sequential, int, int]:
    """torchvision's dilated MobileNetV3-Large ``features`` (output stride 16): the
    stem, the 15 bnecks (the last three dilated 2) and the 1×1 hardswish conv to 6×
    the last width. Returns (features, stride-8 width, output width)."""

    def w(c: int) -> int:
        return make_divisible(c * width)

    features: list[nn.Module] = [_conv_bn(in_channels, w(16), 3, 2, act="HS")]
    cin = w(16)
    for i, (k, exp, out, se, act, stride) in enumerate(_MNV3_LARGE):
        dilation = 2 if i >= 12 else 1
        squeeze = make_divisible(w(exp) // 4) if se else 0
        features.append(Bneck(cin, k, w(exp), w(out), squeeze, act, stride, dilation))
        cin = w(out)
    features.append(_conv_bn(cin, 6 * cin, 1, act="HS"))
    return nn.Sequential(*features), w(40), 6 * cin


class LRASPPMobileNetV3(nn.Module):
    """torchvision's LR-ASPP with the dilated MobileNetV3-Large backbone."""

    def __init__(self, num_classes: int = 21, width: float = 1.0, inter_channels: int = 128,
                 in_channels: int = 3) -> None:  # fmt: skip
        super().__init__()
        self.in_channels = in_channels
        self.features, low, high = _mnv3_large_features(in_channels, width)
        inter = inter_channels
        self.cbr = _conv_bn(high, inter, 1, act="RE")
        self.scale = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(high, inter, 1, bias=False), nn.Sigmoid()
        )
        self.low_classifier = nn.Conv2d(low, num_classes, 1)
        self.high_classifier = nn.Conv2d(inter, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        low = self.features[: _LOW_BLOCK + 1](x)
        high = self.features[_LOW_BLOCK + 1 :](low)
        y = self.cbr(high) * self.scale(high)
        y = F.interpolate(y, size=low.shape[-2:], mode="bilinear", align_corners=False)
        y = self.low_classifier(low) + self.high_classifier(y)
        return F.interpolate(y, size=size, mode="bilinear", align_corners=False)


def lraspp_mobilenet_v3_large(num_classes: int = 21, width: float = 1.0) -> LRASPPMobileNetV3:
    return LRASPPMobileNetV3(num_classes, width)


class _ASPPPooling(nn.Module):
    """ASPP's image-pooling branch: global pool → 1×1 conv + BN + ReLU → bilinear to the map."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = _conv_bn(cin, cout, 1, act="RE")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(self.pool(x))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


class DeepLabV3MobileNetV3(nn.Module):
    """torchvision's ``deeplabv3_mobilenet_v3_large`` (no auxiliary head): the dilated
    MobileNetV3-Large features and DeepLabHead — ASPP (a 1×1 branch, three 3×3 branches
    at ``rates``, the image-pooling branch; concat → 1×1 project + BN + ReLU; dropout,
    an identity in eval) → 3×3 conv + BN + ReLU → 1×1 classifier — bilinear to the input."""

    def __init__(self, num_classes: int = 21, width: float = 1.0, aspp: int = 256,
                 rates: tuple[int, int, int] = (12, 24, 36), in_channels: int = 3) -> None:  # fmt: skip
        super().__init__()
        self.in_channels = in_channels
        self.features, _, high = _mnv3_large_features(in_channels, width)
        branches: list[nn.Module] = [_conv_bn(high, aspp, 1, act="RE")]
        branches += [_conv_bn(high, aspp, 3, dilation=r, act="RE") for r in rates]
        branches.append(_ASPPPooling(high, aspp))
        self.aspp = nn.ModuleList(branches)
        self.project = nn.Sequential(_conv_bn(len(branches) * aspp, aspp, 1, act="RE"),
                                     nn.Dropout(0.5))  # fmt: skip
        self.head = nn.Sequential(
            _conv_bn(aspp, aspp, 3, act="RE"), nn.Conv2d(aspp, num_classes, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        y = self.features(x)
        y = self.project(torch.cat([branch(y) for branch in self.aspp], dim=1))
        y = self.head(y)
        return F.interpolate(y, size=size, mode="bilinear", align_corners=False)


def deeplabv3_mobilenet_v3_large(num_classes: int = 21, width: float = 1.0, aspp: int = 256,
                                 rates: tuple[int, int, int] = (12, 24, 36)) -> DeepLabV3MobileNetV3:  # fmt: skip
    return DeepLabV3MobileNetV3(num_classes, width, aspp, rates)


# EfficientNet-B0 stages: expand ratio, kernel, stride, out channels, repeats.
_EFFICIENTNET_B0 = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)


class EfficientNetEncoder(nn.Module):
    """EfficientNet-B0 features at strides 2, 4, 8, 16, 32 (smp's skip points)."""

    def __init__(self, in_channels: int = 3, width: float = 1.0, depth: float = 1.0) -> None:
        super().__init__()

        def w(c: int) -> int:
            return make_divisible(c * width)

        self.stem = _conv_bn(in_channels, w(32), 3, 2, act="SI")
        blocks: list[nn.Module] = []
        stage_ends: list[int] = []
        cin = w(32)
        for expand, k, stride, out, repeats in _EFFICIENTNET_B0:
            for r in range(max(1, round(repeats * depth))):
                squeeze = max(1, int(cin * 0.25))
                blocks.append(Bneck(cin, k, cin * expand, w(out), squeeze, "SI",
                                    stride if r == 0 else 1, gate="sigmoid", se_act="SI",
                                    mean=True))  # fmt: skip
                cin = w(out)
            stage_ends.append(len(blocks) - 1)
        self.blocks = nn.ModuleList(blocks)
        # smp's skips: the stem (stride 2), after stages 2 (4), 3 (8), 5 (16), 7 (32)
        self.out_index = [stage_ends[i] for i in (1, 2, 4, 6)]
        self.out_channels = [w(c) for c in (32, 24, 40, 112, 320)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        feats = [x]
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.out_index:
                feats.append(x)
        return feats


class _DecoderBlock(nn.Module):
    def __init__(self, cin: int, skip: int, cout: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn(cin + skip, cout, 3, act="RE")
        self.conv2 = _conv_bn(cout, cout, 3, act="RE")

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class UNetEfficientNet(nn.Module):
    """smp's ``Unet("efficientnet-b0")`` layout (random weights)."""

    def __init__(self, num_classes: int = 1, width: float = 1.0, depth: float = 1.0,
                 decoder: tuple[int, ...] = (256, 128, 64, 32, 16), in_channels: int = 3) -> None:  # fmt: skip
        super().__init__()
        self.in_channels = in_channels
        self.encoder = EfficientNetEncoder(in_channels, width, depth)
        skips = list(reversed(self.encoder.out_channels))  # 320, 112, 40, 24, 32
        cin = skips[0]
        blocks = []
        for i, cout in enumerate(decoder):
            skip = skips[i + 1] if i + 1 < len(skips) else 0
            blocks.append(_DecoderBlock(cin, skip, cout))
            cin = cout
        self.decoder = nn.ModuleList(blocks)
        self.head = nn.Conv2d(cin, num_classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(x)[::-1]
        y = feats[0]
        for i, block in enumerate(self.decoder):
            y = block(y, feats[i + 1] if i + 1 < len(feats) else None)
        return self.head(y)


def unet_efficientnet_b0(num_classes: int = 1, width: float = 1.0, depth: float = 1.0,
                         decoder: tuple[int, ...] = (256, 128, 64, 32, 16)) -> UNetEfficientNet:  # fmt: skip
    return UNetEfficientNet(num_classes, width, depth, decoder)


class FPNGroupNorm(nn.Module):
    """smp-style FPN: lateral 1×1 convs, top-down nearest 2× + add, per level
    [3×3 conv + GroupNorm + ReLU (+ nearest 2×)] up to stride 4, summed, a 1×1
    classifier, bilinear ×4 to the input. ``merge`` sums the levels with Python's
    ``sum`` ("add") or as smp 0.6's ``MergeBlock`` does, ``torch.stack(xs).sum(0)``
    ("stack")."""

    def __init__(self, num_classes: int = 1, pyramid: int = 64, seg: int = 32, groups: int = 8,
                 in_channels: int = 3, merge: str = "add") -> None:  # fmt: skip
        super().__init__()
        if merge not in ("add", "stack"):
            raise ValueError(f"merge must be 'add' or 'stack', got {merge!r}")
        self.merge = merge
        self.in_channels = in_channels
        chans = (16, 24, 32, 64)  # strides 4, 8, 16, 32
        self.stem = _conv_bn(in_channels, 16, 3, 2, act="RE")
        stages, cin = [], 16
        for c in chans:
            stages.append(Bneck(cin, 3, cin * 4, c, 0, "RE", 2))
            cin = c
        self.stages = nn.ModuleList(stages)
        self.lateral = nn.ModuleList(nn.Conv2d(c, pyramid, 1) for c in chans)
        self.seg = nn.ModuleList()
        for level in range(4):
            layers: list[nn.Module] = []
            for i in range(max(1, level)):
                layers += [nn.Conv2d(pyramid if i == 0 else seg, seg, 3, padding=1, bias=False),
                           nn.GroupNorm(groups, seg), nn.ReLU(inplace=True)]  # fmt: skip
                if level > 0:
                    layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
            self.seg.append(nn.Sequential(*layers))
        self.classifier = nn.Conv2d(seg, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        y = self.stem(x)
        feats = []
        for stage in self.stages:
            y = stage(y)
            feats.append(y)
        p = self.lateral[3](feats[3])
        pyramid = [p]
        for level in (2, 1, 0):
            p = F.interpolate(p, scale_factor=2, mode="nearest") + self.lateral[level](feats[level])
            pyramid.insert(0, p)
        levels = [self.seg[level](pyramid[level]) for level in range(4)]
        out = sum(levels) if self.merge == "add" else torch.stack(levels).sum(dim=0)
        out = self.classifier(out)
        return F.interpolate(out, size=size, mode="bilinear", align_corners=False)


def fpn_groupnorm(num_classes: int = 1, pyramid: int = 64, seg: int = 32,
                  groups: int = 8, merge: str = "add") -> FPNGroupNorm:  # fmt: skip
    return FPNGroupNorm(num_classes, pyramid, seg, groups, merge=merge)
