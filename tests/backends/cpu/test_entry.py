"""The engine's entry layout conversion (segfast.backends.cpu.entry, ``sf_to_nhwc``):
bit-identical to PyTorch's ``_to_copy`` over odd shapes, strides and values, its
fallbacks, and the plan taking it (fired, equal to eager)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import segfast
from segfast.backends.cpu import entry, native
from segfast.compiler import ops

KIND = "layout conversion to NHWC (segfast kernel)"
CL = torch.channels_last
aten = torch.ops.aten

pytestmark = pytest.mark.skipif(native.load() is None, reason="segfast's CPU kernels not built")


def _ref(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return aten._to_copy.default(x, dtype=dtype, memory_format=CL)


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert (a.dtype, a.shape, a.stride()) == (b.dtype, b.shape, b.stride())
    # NaN where PyTorch has NaN (its payloads differ between its own paths), the rest
    # bitwise (-0.0, rounding)
    nan = a.isnan()
    assert torch.equal(nan, b.isnan())
    bits = torch.int16 if a.dtype == torch.bfloat16 else torch.int32
    assert torch.equal(a.view(bits)[~nan], b.view(bits)[~nan])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape", [(1, 3, 5, 7), (2, 3, 1, 1), (2, 1, 4, 3), (3, 5, 3, 9), (1, 3, 37, 64), (1, 19, 6, 2)]
)
def test_bit_identical_to_to_copy(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g) * 100
    flat = x.view(-1)
    # values where rounding to bf16 matters: ties, NaN, infinities, signed zero, subnormal
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40,
                             1.0 + 2**-8, 1.0 + 3 * 2**-8, 3.4e38])  # fmt: skip
    flat[: min(len(specials), flat.numel())] = specials[: flat.numel()]
    conv = entry.NativeToNHWC(native.load(), dtype)
    _same(conv(x), _ref(x, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_any_input_strides(dtype):
    g = torch.Generator().manual_seed(7)
    conv = entry.NativeToNHWC(native.load(), dtype)
    base = torch.randn(2, 6, 10, 14, generator=g)
    for x in (
        base[:, ::2, 1:9, ::3],  # every stride odd
        base.contiguous(memory_format=CL),  # already NHWC
        base.transpose(2, 3),  # W before H in memory
        base[:1].expand(3, 6, 10, 14),  # a zero batch stride
    ):
        _same(conv(x), _ref(x, dtype))


def test_what_it_does_not_take_runs_to_copy():
    conv = entry.NativeToNHWC(native.load(), torch.float32)
    g = torch.Generator().manual_seed(8)
    for x in (
        torch.randn(1, 3, 4, 5, generator=g, dtype=torch.float64),
        torch.randn(1, 3, 4, 5, generator=g).half(),
        torch.randn(1, 3, 4, 5, generator=g).bfloat16(),
        torch.randn(0, 3, 4, 5),
        torch.randn(1, 3, 0, 5),
    ):
        _same(conv(x), _ref(x, torch.float32))
    with pytest.raises(ValueError, match="fp32 or bf16"):
        entry.NativeToNHWC(native.load(), torch.float16)


def test_applies_only_to_the_conversion_it_makes():
    f32, bf16 = torch.float32, torch.bfloat16
    assert entry.applies({"dtype": f32, "memory_format": CL}, f32, 4)
    assert entry.applies({"dtype": bf16, "memory_format": CL}, bf16, 4)
    assert not entry.applies({"dtype": torch.float16, "memory_format": CL}, torch.float16, 4)
    assert not entry.applies({"memory_format": CL}, f32, 4)  # keeps the input's dtype
    assert not entry.applies({"dtype": f32}, f32, 4)  # no layout change asked
    assert not entry.applies({"dtype": f32, "memory_format": torch.contiguous_format}, f32, 4)
    assert not entry.applies({"dtype": f32, "memory_format": CL, "layout": torch.strided}, f32, 4)
    assert not entry.applies({"dtype": f32, "memory_format": CL}, f32, 3)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.Hardswish(), nn.Conv2d(8, 4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.mark.skipif(not ops._mkldnn_ok(), reason="oneDNN is not usable here")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_plan_takes_the_entry_conversion(precision):
    if precision == "bf16" and not ops._mkldnn_ok(torch.bfloat16):
        pytest.skip("oneDNN has no bf16 convolutions on this CPU")
    torch.manual_seed(3)
    model = Net().eval()
    x = torch.randn(2, 3, 33, 47)
    eng = segfast.compile(model, x, backend="torch", precision=precision)
    assert eng._runner.details["lowered"][KIND] == 1
    # a non-contiguous frame, and an fp64 one (the fallback), both as eager computes them
    frames = [x, torch.randn(2, 3, 47, 33).transpose(2, 3), x.double()]
    report = segfast.check(eng, model, frames)
    assert report.passed, report
    assert max(a.rel_l2 for a in report.accuracy) <= (1e-6 if precision == "fp32" else 6e-3)
