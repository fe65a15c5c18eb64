"""segfast.kernels.group_norm against float64 GroupNorm + the activation: odd
shapes, layouts, GroupNorm and InstanceNorm (one group per channel), with and
without the affine, every activation, large means (where E[x²] − E[x]² would
cancel), fp32 and fp16 (bf16 on a GPU only: the interpreter's bf16 is wrong)."""

from __future__ import annotations

import pytest
import torch

from segfast.kernels._common import ACTIVATIONS
from segfast.kernels.group_norm import group_norm, group_norm_reference
from segfast.testing import assert_close, assert_low_precision_close

# (N, C, H, W, groups, affine)
CASES = [
    (2, 32, 7, 9, 8, True),  # GroupNorm
    (1, 12, 13, 5, 12, False),  # InstanceNorm, no affine
    (3, 6, 3, 3, 1, True),  # one group: LayerNorm over C·H·W
    (1, 4, 1, 1, 2, True),  # one pixel
    (1, 130, 33, 40, 10, True),  # > one channel block, > one split of pixels
]


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "nhwc":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "nchw":
        return x.contiguous()
    big = torch.zeros(x.shape[0], x.shape[1] + 2, x.shape[2], x.shape[3] * 2, dtype=x.dtype)
    view = big[:, 2:, :, ::2]
    view.copy_(x)
    return view


def _affine(c, affine, dtype=torch.float32):
    if not affine:
        return None, None
    g = torch.Generator().manual_seed(5)
    return (0.5 + torch.rand(c, generator=g)).to(dtype), torch.randn(c, generator=g).to(dtype)


@pytest.mark.parametrize("case", CASES, ids=["gn", "in-plain", "g1", "1px", "wide"])
@pytest.mark.parametrize("layout", ["nhwc", "nchw", "strided"])
def test_fp32(case, layout):
    n, c, h, w, groups, affine = case
    x = _layout(torch.randn(n, c, h, w) * 3 + 2, layout)
    wt, b = _affine(c, affine)
    got = group_norm(x, groups, wt, b, 1e-5, "relu")
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert_close(got, group_norm_reference(x, groups, wt, b, 1e-5, "relu"), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_every_activation(act):
    x = torch.randn(2, 16, 5, 6) * 2
    wt, b = _affine(16, True)
    got = group_norm(x, 4, wt, b, 1e-5, act, 0.1)
    assert_close(got, group_norm_reference(x, 4, wt, b, 1e-5, act, 0.1), atol=2e-5, rtol=1e-5)


def test_large_mean_small_spread():
    """Mean 100, spread 0.1: the statistics keep fp32 accuracy, as PyTorch's do. (The
    fp32 mean near 100 is itself rounded by up to half an ulp, 4e-6: 4e-5 of the
    spread, the floor of any fp32 statistics here.)"""
    x = torch.randn(1, 8, 40, 40) * 0.1 + 100.0
    got = group_norm(x, 2)
    ref = group_norm_reference(x, 2)
    torch_err = float((torch.nn.functional.group_norm(x, 2) - ref).abs().max())
    assert float((got - ref).abs().max()) <= max(2e-4, 2 * torch_err)


def test_fp16_no_worse_than_pytorch():
    x = (torch.randn(2, 32, 9, 7) * 2 + 1).half().contiguous(memory_format=torch.channels_last)
    wt, b = _affine(32, True, torch.float16)
    got = group_norm(x, 8, wt, b, 1e-5, "silu")
    f = torch.nn.functional
    ref = f.silu(f.group_norm(x.double(), 8, wt.double(), b.double(), 1e-5))
    lowp = torch.nn.functional.silu(torch.nn.functional.group_norm(x, 8, wt, b, 1e-5))
    assert_low_precision_close(got, ref, lowp)


def test_out_and_errors():
    x = torch.randn(1, 8, 4, 4)
    out = torch.empty(1, 8, 4, 4)
    assert group_norm(x, 4, out=out) is out
    assert_close(out, group_norm_reference(x, 4), atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="groups must divide"):
        group_norm(x, 3)
    with pytest.raises(ValueError, match="weight must be"):
        group_norm(x, 4, torch.ones(7))
    with pytest.raises(ValueError, match="activation must be one of"):
        group_norm(x, 4, act="mish")
    with pytest.raises(ValueError, match="out must be"):
        group_norm(x, 4, out=torch.empty(1, 8, 4, 5))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        group_norm(x[0], 4)
