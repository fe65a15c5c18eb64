"""The squeeze-excitation gate's CPU kernel (``sf_se_gate``) against the composite
(segfast.compiler.ops.se_gate_impl): channel counts below, at and past a vector
block, one- and two-stage gates, every activation it takes, fp32 and bf16 maps, a
batch, channel slices of a larger buffer and layouts it hands back to the composite;
and its lowering in the CPU plan."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import segfast
from segfast.backends.cpu import native
from segfast.backends.cpu.se_gate import NativeSEGate, applies
from segfast.compiler import ops

lib = native.load()
pytestmark = pytest.mark.skipif(lib is None, reason=f"CPU kernels: {native.status()[1]}")
CL = torch.channels_last


def _weights(c, c1, c2, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(c1, c, 1, 1, generator=g) / c**0.5
    w2 = None if c2 is None else torch.randn(c2, c1, 1, 1, generator=g) / c1**0.5
    b1 = torch.randn(c1, generator=g) if bias else None
    b2 = torch.randn(c2, generator=g) if bias and c2 is not None else None
    return w1, b1, w2, b2


def _check(p, w1, b1, act1, w2, b2, act2, param=0.0):
    gate = NativeSEGate(lib, w1, b1, act1, param, w2, b2, act2, 0.0)
    out = gate(p)
    ref = ops.se_gate_impl(
        p.float(), w1, b1, act1, param, w2, b2, act2, 0.0
    )  # the meaning, in fp32
    assert out.dtype == p.dtype
    assert out.shape == ref.shape
    # fp32 sums in another order; a bf16 gate is the fp32 one rounded once
    tol = 2e-6 if p.dtype == torch.float32 else 4e-3
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    ("n", "c", "c1", "c2", "hw"),
    [
        (1, 32, 8, 32, (17, 13)),  # two vector blocks, odd map
        (2, 13, 5, 13, (7, 9)),  # fewer channels than a block, a batch
        (1, 40, 10, 40, (1, 1)),  # one pixel, a block and a tail
        (1, 1152, 48, 1152, (8, 8)),  # EfficientNet's last stage
        (1, 96, 4, 96, (64, 64)),  # parallel pooling
        (1, 24, 6, None, (5, 6)),  # one stage only (the gate is the first conv)
        (3, 17, 17, 5, (4, 3)),  # second conv to another width
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_se_gate_matches_the_composite(n, c, c1, c2, hw, dtype):
    g = torch.Generator().manual_seed(c)
    p = (torch.randn(n, c, *hw, generator=g) + 0.3).to(dtype).contiguous(memory_format=CL)
    w1, b1, w2, b2 = _weights(c, c1, c2)
    _check(p, w1, b1, "silu", w2, b2, "sigmoid")


@pytest.mark.parametrize(
    ("act1", "act2"),
    [("relu", "hardsigmoid"), ("hardswish", "sigmoid"), ("none", "relu6"),
     ("leaky_relu", "hardswish"), ("relu6", "none")],
)  # fmt: skip
def test_se_gate_activations_and_no_bias(act1, act2):
    p = torch.randn(2, 21, 6, 7).contiguous(memory_format=CL)
    w1, b1, w2, b2 = _weights(21, 7, 21, bias=False)
    _check(p, w1, b1, act1, w2, b2, act2, param=0.1)


def test_se_gate_reads_a_channel_slice_and_falls_back_on_other_layouts():
    big = torch.randn(2, 48, 9, 11).contiguous(memory_format=CL)
    w1, b1, w2, b2 = _weights(20, 6, 20)
    _check(big[:, 8:28], w1, b1, "silu", w2, b2, "sigmoid")  # pixel stride 48, not 20
    _check(torch.randn(2, 20, 9, 11), w1, b1, "silu", w2, b2, "sigmoid")  # NCHW: composite
    empty = torch.randn(0, 20, 4, 4).contiguous(memory_format=CL)
    assert NativeSEGate(lib, w1, b1, "relu", 0.0, w2, b2, "sigmoid", 0.0)(empty).shape == (
        0, 20, 1, 1,
    )  # fmt: skip


def test_se_gate_propagates_nan_and_refuses_what_it_cannot_do():
    w1, b1, w2, b2 = _weights(16, 4, 16)
    p = torch.randn(1, 16, 5, 5).contiguous(memory_format=CL)
    p[0, 3, 2, 2] = float("nan")
    out = NativeSEGate(lib, w1, b1, "none", 0.0, w2, b2, "none", 0.0)(p)
    # the NaN mean reaches every output through the convs (a ReLU in the kernels maps
    # NaN to 0, as every segfast CPU kernel: engines run non-finite inputs eagerly)
    assert torch.isnan(out).all()
    assert not applies("gelu", w2, "sigmoid")
    with pytest.raises(ValueError, match="no activation"):
        NativeSEGate(lib, w1, b1, "gelu", 0.0, w2, b2, "sigmoid", 0.0)
    with pytest.raises(ValueError, match="second conv takes"):
        NativeSEGate(lib, w1, b1, "relu", 0.0, torch.randn(16, 5, 1, 1), b2, "sigmoid", 0.0)


class SE(nn.Module):
    def __init__(self, c: int, r: int, act: type[nn.Module], gate: type[nn.Module]) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.act = nn.Conv2d(c, r, 1), act()
        self.fc2, self.gate = nn.Conv2d(r, c, 1), gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc2(self.act(self.fc1(self.pool(x)))))


class MBConvNet(nn.Module):
    """Two MBConv-style blocks (SiLU + sigmoid SE, ReLU + hardsigmoid SE) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 24, 3, 2, 1), nn.BatchNorm2d(24), nn.SiLU())
        self.dw1 = nn.Sequential(nn.Conv2d(24, 24, 3, 1, 1, groups=24), nn.SiLU())
        self.se1 = SE(24, 6, nn.SiLU, nn.Sigmoid)
        self.pw1 = nn.Conv2d(24, 40, 1)
        self.dw2 = nn.Sequential(nn.Conv2d(40, 40, 5, 1, 2, groups=40), nn.ReLU())
        self.se2 = SE(40, 8, nn.ReLU, nn.Hardsigmoid)
        self.pw2 = nn.Conv2d(40, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pw1(self.se1(self.dw1(self.stem(x))))
        return self.pw2(self.se2(self.dw2(y)))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_plan_runs_se_gates_on_the_kernel(precision):
    from segfast.compiler import ops as cops

    if precision == "bf16" and not cops._mkldnn_ok(torch.bfloat16):
        pytest.skip("oneDNN has no bf16 convolutions on this CPU (no CPU plan in bf16)")
    torch.manual_seed(0)
    model = MBConvNet().eval()
    x = torch.randn(1, 3, 30, 38)
    eng = segfast.compile(model, x, backend="torch", precision=precision)
    lowered = eng._runner.details["lowered"]
    assert lowered["squeeze-excitation gate (segfast kernel)"] == 2, lowered
    report = segfast.check(eng, model, [x, torch.randn(1, 3, 30, 38)])
    assert report.passed, report
