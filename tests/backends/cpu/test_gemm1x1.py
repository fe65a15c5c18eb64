"""1×1 convolutions as one GEMM (CPUs without AVX-512; small layers on any): the conv's numbers, the gate
folded into the weight, every fallback; and the plan picks it only there."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import segfast
from segfast.backends.cpu import gemm1x1
from segfast.compiler import ops


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _ref(x, w, b, act, residual=None, after=False, gate=None):
    if gate is not None:
        x = x * gate
    return ops.conv2d_impl(x, w, b, [1, 1], [0, 0], [1, 1], 1, act, 0.1, residual, after,
                           None, "none", False, None, None, False)  # fmt: skip


@pytest.mark.parametrize(("n", "c", "k", "h", "w"), [(1, 3, 5, 1, 1), (2, 17, 33, 7, 9),
                                                     (3, 64, 16, 5, 13)])  # fmt: skip
@pytest.mark.parametrize("act", ["none", "relu", "relu6", "hardswish", "silu", "leaky_relu"])
@pytest.mark.parametrize("res", [None, "before", "after"])
@pytest.mark.parametrize("bias", [True, False])
def test_the_gemm_is_the_convolution(n, c, k, h, w, act, res, bias):
    g = torch.Generator().manual_seed(n * 100 + c)
    x = _nhwc(torch.randn(n, c, h, w, generator=g))
    wt = torch.randn(k, c, 1, 1, generator=g) * 0.3
    b = torch.randn(k, generator=g) if bias else None
    r = None if res is None else _nhwc(torch.randn(n, k, h, w, generator=g))
    conv = gemm1x1.GemmConv1x1(wt, b, act, 0.1, res == "after")
    out = conv(x, r)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, _ref(x, wt, b, act, r, res == "after"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("gate_batch", ["per image", "shared"])
@pytest.mark.parametrize("res", [None, "before"])
def test_the_gate_folds_into_the_weight(n, gate_batch, res):
    g = torch.Generator().manual_seed(n)
    x = _nhwc(torch.randn(n, 24, 6, 11, generator=g))
    gate = torch.rand(n if gate_batch == "per image" else 1, 24, 1, 1, generator=g)
    wt = torch.randn(10, 24, 1, 1, generator=g) * 0.3
    b = torch.randn(10, generator=g)
    r = None if res is None else torch.randn(n, 10, 6, 11, generator=g)
    conv = gemm1x1.GatedGemmConv1x1(wt, b, "relu", 0.0, False)
    torch.testing.assert_close(conv(x, gate, r), _ref(x, wt, b, "relu", r, gate=gate),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def test_what_the_gemm_cannot_take_runs_the_composite():
    g = torch.Generator().manual_seed(0)
    wt = torch.randn(6, 8, 1, 1, generator=g)
    conv = gemm1x1.GemmConv1x1(wt, None, "relu", 0.0, False)
    big = _nhwc(torch.randn(1, 16, 5, 5, generator=g))
    sliced = big[:, 4:12]  # a channel slice: pixels 16 floats apart
    nchw = torch.randn(1, 8, 5, 5, generator=g)  # not NHWC
    for x in (sliced, nchw):
        torch.testing.assert_close(conv(x), _ref(x, wt, None, "relu"), rtol=1e-5, atol=1e-5)
    x = _nhwc(torch.randn(1, 8, 5, 5, generator=g))
    broadcast = torch.randn(1, 6, 1, 5, generator=g)  # a residual of another shape
    torch.testing.assert_close(conv(x, broadcast), _ref(x, wt, None, "relu", broadcast))
    gated = gemm1x1.GatedGemmConv1x1(wt, None, "none", 0.0, False)
    x = _nhwc(torch.randn(2, 8, 4, 4, generator=g))
    spatial_gate = torch.rand(2, 8, 4, 4, generator=g)  # not one value per channel
    torch.testing.assert_close(gated(x, spatial_gate), _ref(x, wt, None, "none", gate=spatial_gate))


def test_applies_only_to_dense_unit_convs():
    w = torch.randn(4, 8, 1, 1)
    assert gemm1x1.applies(w, [1, 1], [0, 0], [1, 1], 1)
    assert not gemm1x1.applies(w, [2, 2], [0, 0], [1, 1], 1)
    assert not gemm1x1.applies(w, [1, 1], [1, 1], [1, 1], 1)
    assert not gemm1x1.applies(torch.randn(4, 4, 1, 1), [1, 1], [0, 0], [1, 1], 2)
    assert not gemm1x1.applies(torch.randn(4, 8, 3, 3), [1, 1], [0, 0], [1, 1], 1)
    assert not gemm1x1.applies(w.bfloat16(), [1, 1], [0, 0], [1, 1], 1)


class SEBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(8, 32, 1), nn.BatchNorm2d(32), nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.BatchNorm2d(32))
        self.fc1, self.fc2 = nn.Conv2d(32, 8, 1), nn.Conv2d(8, 32, 1)
        self.project = nn.Sequential(nn.Conv2d(32, 8, 1), nn.BatchNorm2d(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(self.expand(x))
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        return x + self.project(y * s)


def test_the_plan_takes_the_gemm_for_small_layers():
    """Here (the CPU tests run the AVX-512 choices on every CPU) the block's layers are
    small — 8→32 and 32→8 over 2×12×10 pixels — so both take the GEMM (the project conv
    with its gate folded); the same block at 2×128×128 is past gemm1x1.small and stays on
    oneDNN; ``avx2_kernels=False`` turns it off."""
    from segfast.backends.cpu import native as cpu_native

    torch.manual_seed(0)
    m = SEBlock().eval()
    native = cpu_native.load()
    for x, want in ((torch.randn(2, 8, 12, 10), 2), (torch.randn(2, 8, 128, 128), 0)):
        eng = segfast.compile(m, x, backend="torch")
        off = segfast.compile(m, x, backend="torch", options={"avx2_kernels": False})
        lowered, plain = eng._runner.details["lowered"], off._runner.details["lowered"]
        gemms = sum(v for key, v in lowered.items() if "(MKL)" in key)
        if native is not None and gemm1x1.available():
            assert gemms == want, lowered
        else:
            assert gemms == 0, lowered
        assert not any("MKL" in key for key in plain)
        with torch.inference_mode():
            ref = m(x)
            for e in (eng, off):
                out = e.run_unchecked(x)
                assert float((out - ref).norm() / ref.norm()) < 1e-5
