"""Small building blocks shared by the reference models."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_act(
    in_ch: int,
    out_ch: int,
    kernel_size: int = 3,
    *,
    stride: int = 1,
    padding: int | None = None,
    dilation: int = 1,
    groups: int = 1,
    bn: bool = True,
    act: type[nn.Module] | None = nn.ReLU,
) -> nn.Sequential:
    """Conv2d (+ BatchNorm) (+ activation); the conv has a bias only without BN."""
    if padding is None:
        padding = dilation * (kernel_size - 1) // 2
    layers: list[nn.Module] = [
        nn.Conv2d(
            in_ch,
            out_ch,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=not bn,
        )
    ]
    if bn:
        layers.append(nn.BatchNorm2d(out_ch))
    if act is not None:
        layers.append(act(inplace=True) if act in (nn.ReLU, nn.ReLU6) else act())
    return nn.Sequential(*layers)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad H and W at the bottom/right up to a multiple of ``multiple``.

    # x: [N, C, H, W] -> [N, C, ceil(H/m)*m, ceil(W/m)*m]
    Used by architectures whose skip connections need sizes divisible by their
    total stride; the caller crops the output back with ``x[..., :H, :W]``.
    """
    h, w = x.shape[-2:]
    ph = (-h) % multiple
    pw = (-w) % multiple
    # With symbolic (dynamic) shapes the pad amounts are expressions: always pad
    # then, rather than guard on them; with concrete sizes skip the no-op copy.
    if isinstance(ph, int) and isinstance(pw, int) and ph == 0 and pw == 0:
        return x
    return F.pad(x, (0, pw, 0, ph))


def mirror_pad(x: torch.Tensor, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    """Mirror (reflect) padding of any width, as the U-Net paper extrapolates borders.

    ``F.pad(mode="reflect")`` needs each pad smaller than the dimension; wider
    pads are applied in several reflections, so any image of H, W >= 2 works.
    """
    while top or bottom or left or right:
        h, w = x.shape[-2:]
        if ((top or bottom) and h < 2) or ((left or right) and w < 2):
            raise ValueError(f"mirror padding needs H and W >= 2, got {h}x{w}")
        t, b = min(top, h - 1), min(bottom, h - 1)
        lf, r = min(left, w - 1), min(right, w - 1)
        x = F.pad(x, (lf, r, t, b), mode="reflect")
        top, bottom, left, right = top - t, bottom - b, left - lf, right - r
    return x


def check_image_input(x: torch.Tensor, in_channels: int, min_size: int, name: str) -> None:
    """Raise a clear ``ValueError`` when ``x`` is not an N×C×H×W batch this model takes."""
    if x.dim() != 4:
        raise ValueError(f"{name} expects a 4-D N×C×H×W tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(
            f"{name} expects a floating-point image batch, got dtype {x.dtype} "
            "(convert uint8 images with x.float() / 255 or the runtime's preprocess)"
        )
    if x.shape[1] != in_channels:
        raise ValueError(
            f"{name} expects {in_channels} input channels, got {x.shape[1]} "
            f"(shape {tuple(x.shape)})"
        )
    h, w = x.shape[-2:]
    if h < min_size or w < min_size:
        raise ValueError(f"{name} needs H and W >= {min_size}, got {h}x{w}")


def center_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Crop the central ``height``×``width`` window of ``x`` (U-Net's skip crop).

    # x: [N, C, H, W] -> [N, C, height, width]; needs height <= H and width <= W.
    When H - height is odd the extra row goes to the bottom, as in the paper's tiles.
    """
    h, w = x.shape[-2:]
    if height > h or width > w:
        raise ValueError(f"cannot center-crop {h}x{w} to a larger {height}x{width}")
    top = (h - height) // 2
    left = (w - width) // 2
    return x[..., top : top + height, left : left + width]


def bilinear_kernel(
    channels: int, kernel_size: int, *, device: torch.device | None = None
) -> torch.Tensor:
    """Weights that make a ``ConvTranspose2d(channels, channels, k, stride=k//2)`` bilinear.

    Returns a ``[channels, channels, k, k]`` tensor that is zero except a bilinear
    interpolation kernel on the diagonal (channel ``c`` upsamples only channel ``c``),
    the initialisation of FCN's learned upsampling layers (Long et al. 2015, §3.3).
    """
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    og = torch.arange(kernel_size, dtype=torch.float32, device=device)
    filt_1d = 1 - (og - center).abs() / factor  # [k]
    filt = filt_1d[:, None] * filt_1d[None, :]  # [k, k]
    weight = torch.zeros(channels, channels, kernel_size, kernel_size, device=device)
    idx = torch.arange(channels, device=device)
    weight[idx, idx] = filt
    return weight


def crop_to(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Keep the top-left ``height``×``width`` of ``x``: undoes :func:`pad_to_multiple`.

    # x: [N, C, H', W'] -> [N, C, height, width]
    With concrete sizes this is a plain slice. Under ``torch.export`` with dynamic
    H and W a slice would specialise on whether the crop is empty (and fail on
    inputs of the other kind), so a negative ``F.pad`` expresses the crop then.
    """
    h, w = x.shape[-2:]
    if all(isinstance(v, int) for v in (h, w, height, width)):
        return x[..., :height, :width]
    return F.pad(x, (0, width - w, 0, height - h))
