"""The depthwise CPU kernels against PyTorch: odd sizes, strides, dilations,
paddings, channel counts around the 8/16/64 blocks, epilogues, layouts — for
``sf_dwconv2d`` and ``sf_dwconv8`` (``vec8=True``) alike."""

from __future__ import annotations

import pytest
import torch

from segfast.backends.cpu import native
from segfast.backends.cpu.depthwise import NativeDepthwiseConv2d, reference
from segfast.testing import assert_nhwc_close

lib = native.load()
pytestmark = pytest.mark.skipif(lib is None, reason=f"CPU kernels: {native.status()[1]}")


def _close(y: torch.Tensor, ref: torch.Tensor) -> None:
    assert_nhwc_close(y, ref, 2e-6)


@pytest.mark.parametrize(
    ("c", "hw", "k", "stride", "pad", "dil"),
    [
        (1, (5, 7), 3, 1, 1, 1),
        (7, (13, 11), 3, 2, 1, 1),
        (16, (9, 9), 3, 1, 12, 12),
        (17, (10, 6), 3, 1, 18, 18),
        (64, (8, 8), 3, 1, 6, 6),
        (65, (11, 12), 5, 2, 4, 2),
        (130, (7, 5), 3, 1, 20, 20),  # rate beyond the map: only the centre tap reads data
        (48, (6, 9), 3, 3, 0, 1),
    ],
)
@pytest.mark.parametrize("vec8", [False, True])
def test_matches_pytorch(c, hw, k, stride, pad, dil, vec8):
    x = torch.randn(2, c, *hw).contiguous(memory_format=torch.channels_last)
    w = torch.randn(c, 1, k, k)
    b = torch.randn(c)
    conv = NativeDepthwiseConv2d(
        lib, w, b, [stride] * 2, [pad] * 2, [dil] * 2, "none", 0.0, False, vec8=vec8
    )
    _close(conv(x), reference(x, w, b, [stride] * 2, [pad] * 2, [dil] * 2))


@pytest.mark.parametrize(
    ("c", "hw", "kernel", "stride", "pad"),
    [
        (8, (9, 17), (3, 3), 1, (1, 1)),  # 17 wide: two full 8-pixel tiles and one pixel
        (13, (12, 8), (5, 5), 1, (2, 2)),  # 8 + 5 channels: a partial sub-block
        (72, (7, 23), (5, 5), 2, (2, 2)),  # two chunks (40 + 32 channels)
        (200, (5, 6), (7, 7), 1, (3, 3)),  # four chunks of 56 (7 sub-blocks each)
        (24, (11, 10), (7, 7), 2, (3, 3)),
        (16, (6, 19), (1, 7), 1, (0, 3)),  # 1×7: the generic row for 7-wide, KH 1
        (9, (10, 9), (4, 4), 1, (1, 2)),  # even kernel, uneven padding per axis: generic
        (16, (9, 9), (3, 3), 3, (1, 1)),  # stride 3: generic
        (40, (4, 4), (5, 5), 1, (4, 4)),  # padding larger than the map
        (1, (3, 2), (3, 3), 1, (1, 1)),
    ],
)
@pytest.mark.parametrize("act", ["none", "hardswish"])
def test_vec8_tiles_chunks_and_kernels(c, hw, kernel, stride, pad, act):
    """sf_dwconv8's packed rows, 8-pixel tiles, channel chunks and per-(KW, stride)
    instantiations (3/5/7 × 1/2) against PyTorch, and its generic row elsewhere."""
    x = torch.randn(2, c, *hw).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(c, 1, *kernel), torch.randn(c)
    conv = NativeDepthwiseConv2d(lib, w, b, [stride] * 2, pad, [1, 1], act, 0.0, False, vec8=True)
    _close(conv(x), reference(x, w, b, [stride] * 2, pad, [1, 1], act))
    _close(conv(x), reference(x, w, b, [stride] * 2, pad, [1, 1], act))  # reused row buffers


def test_vec8_rates_and_batches_share_no_rows():
    """Dilated taps (the ring of packed rows spans (KH − 1)·rate + 1 input rows), two
    images and back-to-back calls of other sizes: no row packed for one image, chunk or
    call is read for another."""
    for c, hw, rate in [(24, (20, 13), 6), (33, (9, 30), 2), (24, (20, 13), 1)]:
        x = torch.randn(3, c, *hw).contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(c, 1, 3, 3), torch.randn(c)
        conv = NativeDepthwiseConv2d(lib, w, b, [1, 1], [rate] * 2, [rate] * 2, "relu", 0.0,
                                     False, vec8=True)  # fmt: skip
        _close(conv(x), reference(x, w, b, [1, 1], [rate] * 2, [rate] * 2, "relu"))


@pytest.mark.parametrize(
    "act", ["relu", "relu6", "leaky_relu", "silu", "tanh", "sigmoid", "hardswish", "hardsigmoid"]
)
@pytest.mark.parametrize("res", [None, "before", "after"])
@pytest.mark.parametrize("vec8", [False, True])
def test_epilogues(act, res, vec8):
    c = 37
    x = torch.randn(1, c, 9, 10).contiguous(memory_format=torch.channels_last) * 4
    w, b = torch.randn(c, 1, 3, 3), torch.randn(c)
    r = None if res is None else torch.randn(1, c, 9, 10)
    after = res == "after"
    conv = NativeDepthwiseConv2d(lib, w, b, [1, 1], [12, 12], [12, 12], act, 0.2, after, vec8)
    ref = reference(x, w, b, [1, 1], [12, 12], [12, 12], act, 0.2, r, after)
    _close(conv(x, r), ref)


@pytest.mark.parametrize("vec8", [False, True])
def test_any_input_layout_and_no_bias(vec8):
    c = 20
    base = torch.randn(1, c + 5, 11, 9)
    x = base[:, 2 : 2 + c]  # a channel slice of an NCHW tensor
    w = torch.randn(c, 1, 3, 3)
    conv = NativeDepthwiseConv2d(lib, w, None, [1, 1], [9, 9], [9, 9], "none", 0.0, False, vec8)
    _close(conv(x), reference(x, w, None, [1, 1], [9, 9], [9, 9]))
    # a channel slice of a channels_last tensor: pixel stride ≠ C
    xs = torch.randn(1, c + 7, 11, 9).contiguous(memory_format=torch.channels_last)[:, 3 : 3 + c]
    conv = NativeDepthwiseConv2d(lib, w, None, [1, 1], [1, 1], [1, 1], "none", 0.0, False, vec8)
    _close(conv(xs), reference(xs, w, None, [1, 1], [1, 1], [1, 1]))


def test_broadcast_residual_falls_back_to_pytorch():
    """A residual the kernel cannot read element for element (here [1, C, 1, 1])
    goes through the composite implementation, with the same result."""
    c = 8
    w, b = torch.randn(c, 1, 3, 3), torch.randn(c)
    conv = NativeDepthwiseConv2d(lib, w, b, [1, 1], [10, 10], [10, 10], "relu", 0.0, False)
    x = torch.randn(1, c, 6, 6)
    r = torch.randn(1, c, 1, 1)
    ref = reference(x, w, b, [1, 1], [10, 10], [10, 10], "relu", 0.0, r, False)
    assert torch.allclose(conv(x, r), ref, atol=1e-6)


def test_rejects_non_fp32_weights():
    with pytest.raises(ValueError, match="fp32 only"):
        NativeDepthwiseConv2d(lib, torch.randn(4, 1, 3, 3).half(), None, [1, 1], [1, 1],
                              [1, 1], "none", 0.0, False)  # fmt: skip


@pytest.mark.parametrize("vec8", [False, True])
@pytest.mark.parametrize(
    ("k", "stride", "begin", "end"),
    [
        (3, 2, (0, 0), (1, 1)),
        (5, 2, (1, 1), (2, 2)),
        (3, 1, (0, 2), (1, 0)),
        (3, 2, (1, 0), (0, 3)),
    ],
)
def test_asymmetric_padding(vec8, k, stride, begin, end):
    """(top, left) and (bottom, right) padding apart — a folded "same" F.pad: the kernels
    read zeros past the map's end, the output size counts both sides."""
    c = 21
    x = torch.randn(2, c, 13, 10).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(c, 1, k, k), torch.randn(c)
    conv = NativeDepthwiseConv2d(lib, w, b, [stride] * 2, list(begin), [1, 1], "relu6", 0.0,
                                 False, vec8=vec8, pad_end=list(end))  # fmt: skip
    xp = torch.nn.functional.pad(x, (begin[1], end[1], begin[0], end[0]))
    ref = reference(xp, w, b, [stride] * 2, [0, 0], [1, 1], "relu6")
    _close(conv(x), ref)
    _close(conv._composite(x, None).contiguous(memory_format=torch.channels_last), ref)
