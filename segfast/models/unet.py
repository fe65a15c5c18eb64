"""U-Net (Ronneberger, Fischer, Brox, "U-Net: Convolutional Networks for Biomedical
Image Segmentation", MICCAI 2015).

Written for segfast from the paper. The contracting path has ``depth`` levels;
level ``i`` holds two 3×3 convs (+ BatchNorm, not in the paper) + ReLU of
``base * 2**i`` channels, followed by a 2×2 max-pool; the bottleneck is level
``depth``. The expanding path upsamples (a 2×2 stride-2 transposed conv that
halves the channels — the paper's "up-convolution" — or a parameter-free
bilinear / nearest ×2 interpolation that keeps them), concatenates the skip
*first* (``torch.cat([skip, up], 1)``), and applies two 3×3 convs + ReLU. A
final 1×1 conv gives the class logits.

The paper's network (1 input channel, 2 classes, base 64, depth 4, transposed
convs, no BatchNorm) has 31,030,658 parameters (the paper does not print the
count; this is the exact count of that architecture).

Any H×W >= 1 is accepted and the output is always ``[N, num_classes, H, W]``:

* ``padding="same"`` (default): 3×3 convs with zero padding 1; the input is
  zero-padded at the bottom/right to a multiple of ``2**depth`` and the logits
  are cropped back to H×W.
* ``padding="valid"``: unpadded convs as in the paper, so the network maps a
  larger tile to a smaller output (572 → 388 at depth 4). The input is
  mirror-padded by the context margin (92 px at depth 4) on every side and up
  to the next size the network takes, then the output is cropped back to H×W —
  the paper's overlap-tile strategy with border mirroring, applied to a single
  tile. The decoder center-crops each skip to the upsampled size before the
  concat, as in the paper's Fig. 1. A 1-pixel-wide side is replicated to 2
  pixels first (mirroring needs two). :func:`unet_valid_geometry` gives the
  tile sizes; :meth:`UNet.forward_unpadded` runs the bare network on one tile.
  The tile geometry is computed in Python from H and W, so valid mode exports
  with static shapes only ("same" mode also exports with dynamic H and W).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ._common import (
    center_crop,
    check_image_input,
    conv_bn_act,
    crop_to,
    mirror_pad,
    pad_to_multiple,
)
from ._registry import ModelSpec, Reference, register

Padding = Literal["same", "valid"]
UpMode = Literal["convT", "bilinear", "nearest"]

# Pixels a 3×3 valid conv pair removes from a side length.
_PAIR_LOSS = 4


def unet_valid_margin(depth: int) -> int:
    """Context margin (pixels lost on each side) of a valid-padding U-Net of ``depth``.

    Equals ``6 * 2**depth - 4``: 92 at the paper's depth 4 ((572 - 388) / 2).
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    return 6 * 2**depth - 4


def unet_valid_geometry(size: int, depth: int) -> tuple[int, int]:
    """``(input, output)`` side lengths of the smallest valid tile whose output is >= ``size``.

    A valid-padding U-Net loses 4 pixels per conv pair and needs an even size at
    every 2×2 pool, so it takes only inputs ``2**depth * (k + 4) + 4 * (2**depth - 1)``
    and returns ``2**depth * k - 4 * (2**depth - 1)`` pixels, ``k`` being the
    bottleneck's output size. ``k`` must also leave every decoder level at least
    one pixel (so the smallest output is 4 for depth >= 2, and 2 for depth 1).
    ``unet_valid_geometry(388, 4) == (572, 388)``, the paper's tile.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    scale = 2**depth
    lost = _PAIR_LOSS * (scale - 1)

    def decoder_ok(k: int) -> bool:
        return all(2**j * k - _PAIR_LOSS * (2**j - 1) >= 1 for j in range(1, depth + 1))

    k = max(1, -(-(size + lost) // scale))  # ceil((size + lost) / scale)
    while not decoder_ok(k):
        k += 1
    return scale * (k + _PAIR_LOSS) + lost, scale * k - lost


def _double_conv(in_ch: int, out_ch: int, pad: int, batch_norm: bool) -> nn.Sequential:
    return nn.Sequential(
        conv_bn_act(in_ch, out_ch, 3, padding=pad, bn=batch_norm),
        conv_bn_act(out_ch, out_ch, 3, padding=pad, bn=batch_norm),
    )


class Interpolate2x(nn.Module):
    """Parameter-free ×2 upsampling with ``F.interpolate`` (channels unchanged)."""

    def __init__(self, mode: str, align_corners: bool) -> None:
        super().__init__()
        self.mode = mode
        # align_corners is only defined for the linear modes.
        self.align_corners: bool | None = align_corners if mode == "bilinear" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, C, H, W] -> [N, C, 2H, 2W]
        return F.interpolate(x, scale_factor=2, mode=self.mode, align_corners=self.align_corners)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, align_corners={self.align_corners}"


class UNet(nn.Module):
    """U-Net; see the module docstring for the padding modes and sizes."""

    min_size = 1

    def __init__(
        self,
        num_classes: int = 2,
        in_channels: int = 1,
        base: int = 64,
        depth: int = 4,
        padding: Padding = "same",
        up_mode: UpMode = "convT",
        align_corners: bool = False,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        if padding not in ("same", "valid"):
            raise ValueError(f"padding must be 'same' or 'valid', got {padding!r}")
        if up_mode not in ("convT", "bilinear", "nearest"):
            raise ValueError(f"up_mode must be 'convT', 'bilinear' or 'nearest', got {up_mode!r}")
        if depth < 1 or base < 1:
            raise ValueError(f"depth and base must be >= 1, got depth={depth}, base={base}")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.depth = depth
        self.padding = padding
        self.up_mode = up_mode
        pad = 1 if padding == "same" else 0
        widths = [base * 2**i for i in range(depth + 1)]

        self.encoders = nn.ModuleList()
        prev = in_channels
        for ch in widths[:-1]:
            self.encoders.append(_double_conv(prev, ch, pad, batch_norm))
            prev = ch
        self.bottleneck = _double_conv(prev, widths[-1], pad, batch_norm)

        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for i in reversed(range(depth)):
            ch, deeper = widths[i], widths[i + 1]
            if up_mode == "convT":
                self.ups.append(nn.ConvTranspose2d(deeper, ch, 2, stride=2))
                cat_ch = 2 * ch  # skip (ch) + halved upsample (ch)
            else:
                self.ups.append(Interpolate2x(up_mode, align_corners))
                cat_ch = ch + deeper  # skip (ch) + upsample (2ch)
            self.decoders.append(_double_conv(cat_ch, ch, pad, batch_norm))
        self.head = nn.Conv2d(widths[0], num_classes, 1)

        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                # The paper's init: Gaussian with std sqrt(2 / fan_in).
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_unpadded(self, x: torch.Tensor) -> torch.Tensor:
        """The bare network on one tile, without padding or cropping.

        "same": H and W must be multiples of ``2**depth``; the output has the same size.
        "valid": H and W must be tile sizes from :func:`unet_valid_geometry`; the
        output is the smaller valid output.
        """
        # x: [N, in_channels, H, W]
        skips = []
        for enc in self.encoders:
            x = enc(x)  # x: [N, base * 2**i, h, w]
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottleneck(x)  # x: [N, base * 2**depth, h, w]
        for up, dec, skip in zip(self.ups, self.decoders, reversed(skips), strict=True):
            x = up(x)
            if self.padding == "valid":
                skip = center_crop(skip, x.shape[-2], x.shape[-1])
            x = dec(torch.cat([skip, x], dim=1))  # skip first
        return self.head(x)  # [N, num_classes, h_out, w_out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, in_channels, H, W] -> logits [N, num_classes, H, W]
        check_image_input(x, self.in_channels, self.min_size, "UNet")
        h, w = x.shape[-2:]
        if self.padding == "same":
            y = self.forward_unpadded(pad_to_multiple(x, 2**self.depth))
            return crop_to(y, h, w)
        if h == 1 or w == 1:
            # Mirroring needs two pixels; the mirror image of one pixel is itself.
            x = F.pad(x, (0, int(w == 1), 0, int(h == 1)), mode="replicate")
        margin = unet_valid_margin(self.depth)
        in_h, _ = unet_valid_geometry(h, self.depth)
        in_w, _ = unet_valid_geometry(w, self.depth)
        cur_h, cur_w = x.shape[-2:]
        x = mirror_pad(x, margin, in_h - cur_h - margin, margin, in_w - cur_w - margin)
        y = self.forward_unpadded(x)  # [N, num_classes, out_h >= H, out_w >= W]
        return crop_to(y, h, w)


def unet(
    num_classes: int = 2,
    in_channels: int = 1,
    base: int = 64,
    depth: int = 4,
    padding: Padding = "same",
    up_mode: UpMode = "convT",
    align_corners: bool = False,
    batch_norm: bool = True,
) -> UNet:
    """Build a :class:`UNet` (defaults: the paper's 1-channel, 2-class network + BatchNorm)."""
    return UNet(num_classes, in_channels, base, depth, padding, up_mode, align_corners, batch_norm)


register(
    ModelSpec(
        name="unet",
        factory=unet,
        task="segmentation",
        description="U-Net (Ronneberger et al. 2015), encoder-decoder with skip concats",
        tiny={"base": 8, "depth": 3},
        standard_size=(512, 512),
        min_size=UNet.min_size,
        reference=Reference(
            params=31_030_658,
            options={"num_classes": 2, "in_channels": 1, "batch_norm": False},
            source="Ronneberger et al. 2015, Fig. 1 architecture (base 64, depth 4, "
            "up-convolutions, no BatchNorm); exact count of that architecture",
        ),
    ),
    aliases=("u_net",),
)
