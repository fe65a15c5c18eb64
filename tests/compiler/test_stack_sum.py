"""The stack_sum pass: ``torch.stack(xs, d).sum(d)`` and Python's ``sum(xs)`` become
chains of adds — the pattern fires, the fused graph computes what the original did on
random inputs, the convs among the terms absorb the adds (residual epilogues), and
stacks the pass must not touch stay as they are."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import segfast
from segfast.testing import assert_close

aten = torch.ops.aten


class Merge(nn.Module):
    """Three terms: a plain activation, a bilinear upsample and a conv (+ ReLU)."""

    def __init__(self, form: str, dim: int = 0) -> None:
        super().__init__()
        self.form, self.dim = form, dim
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(3, 6, 3, stride=2, padding=1)

    def forward(self, x):
        terms = [
            torch.sigmoid(x.repeat(1, 2, 1, 1)),  # nothing can absorb an add here
            torch.relu(self.a(x)),
            F.interpolate(self.c(x), size=x.shape[-2:], mode="bilinear", align_corners=False),
            self.b(x),
        ]
        if self.form == "python":
            return sum(terms)
        return torch.stack(terms, dim=self.dim).sum(dim=self.dim)


def _ops(eng: segfast.Engine) -> list:
    gm = eng._runner.details["graph"]
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _same(eng: segfast.Engine, model: nn.Module, *shapes: tuple[int, ...]) -> None:
    for shape in shapes:
        x = torch.randn(shape)
        with torch.no_grad():
            ref = model(x)
        assert_close(eng(x), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("form", "dim"), [("stack", 0), ("stack", 1), ("stack", 2), ("stack", -1), ("stack", -5),
                      ("python", 0)],
)  # fmt: skip
def test_stack_sum_becomes_adds_the_convs_absorb(form, dim):
    torch.manual_seed(0)
    model = Merge(form, dim).eval()
    x = torch.randn(2, 3, 9, 11)
    eng = segfast.compile(model, x, backend="torch")
    fused = eng.info.fusions
    assert fused.get("stack_sum", 0) == (form == "stack"), fused
    ops = _ops(eng)
    assert aten.sum.dim_IntList not in ops, ops
    assert aten.cat.default not in ops, ops
    # the two stride-1 convs are summed last and take the running sum as their residual;
    # the upsampled one cannot on this backend: one add stays (0 + … is gone too)
    assert fused.get("conv_residual", 0) == 2, fused
    assert ops.count(aten.add.Tensor) == 1, ops
    _same(eng, model, (2, 3, 9, 11))


def test_dynamic_sizes():
    torch.manual_seed(0)
    model = Merge("stack", 0).eval()
    eng = segfast.compile(model, torch.randn(1, 3, 16, 16), backend="torch", dynamic=True)
    assert eng.info.fusions.get("stack_sum") == 1
    _same(eng, model, (1, 3, 16, 16), (1, 3, 23, 13))


class Untouched(nn.Module):
    def __init__(self, case: str) -> None:
        super().__init__()
        self.case = case
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        a, b = self.conv(x), torch.tanh(self.conv(x))
        s = torch.stack([a, b])
        if self.case == "other_dim":  # a sum over another dimension than the stack's
            return s.sum(dim=1)
        if self.case == "keepdim":
            return s.sum(dim=0, keepdim=True)
        if self.case == "mean":
            return s.mean(dim=0)
        if self.case == "read_twice":  # something else reads the stack too
            return s.sum(dim=0) * s.amax(dim=0)
        if self.case == "two_dims":
            return s.sum(dim=(0, 1))
        raise AssertionError(self.case)


@pytest.mark.parametrize("case", ["other_dim", "keepdim", "mean", "read_twice", "two_dims"])
def test_other_reductions_of_a_stack_stay(case):
    torch.manual_seed(0)
    model = Untouched(case).eval()
    x = torch.randn(2, 3, 5, 7)
    eng = segfast.compile(model, x, backend="torch")
    assert "stack_sum" not in eng.info.fusions
    with torch.no_grad():
        ref = model(x)
    assert_close(eng(x), ref, atol=1e-5, rtol=1e-4)


def test_integer_terms_stay():
    """sum promotes int32 to int64; adds would not: left alone."""

    class M(nn.Module):
        def forward(self, x):
            m = (x > 0).to(torch.int32)
            return x * torch.stack([m, m * 2]).sum(0)  # int64 × float32

    x = torch.randn(1, 2, 5, 5)
    eng = segfast.compile(M().eval(), x, backend="torch")
    assert "stack_sum" not in eng.info.fusions
    assert aten.sum.dim_IntList in _ops(eng)
    assert torch.equal(eng(x), M()(x))


def test_plus_zero_is_dropped_only_where_it_changes_nothing():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            y = self.conv(x) + 0  # dropped
            m = (x[:, :1] > 0).to(torch.int32) + 0.0  # promotes int32 → float32: kept
            return y * m

    x = torch.randn(1, 3, 5, 5)
    model = M().eval()
    eng = segfast.compile(model, x, backend="torch")
    ops = _ops(eng)
    assert ops.count(aten.add.Tensor) == 1, ops
    assert_close(eng(x), model(x), atol=1e-6, rtol=1e-5)


def test_triton_folds_the_upsampled_term_into_the_resize():
    """On the Triton backend the upsampled term's resize adds the running sum as it
    stores: no add, cat or sum left on PyTorch (the sigmoid of a repeat is not a conv's)."""
    torch.manual_seed(0)
    model = Merge("stack", 0).eval()
    x = torch.randn(1, 3, 9, 11)
    eng = segfast.compile(model, x, backend="triton")
    details = eng._runner.details
    assert details["lowered"].get("resize + add") == 1, details["lowered"]
    assert details["kept"] == {"repeat": 1, "sigmoid": 1}, details["kept"]
    _same(eng, model, (1, 3, 9, 11))


def test_one_term_fires_and_a_repeated_term_stays():
    """stack([a]).sum(0) is a itself; stack([a, a]).sum(0) is left alone (2·a is not a
    chain of distinct terms)."""

    class M(nn.Module):
        def __init__(self, repeat: bool) -> None:
            super().__init__()
            self.repeat = repeat
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            a = torch.tanh(self.conv(x))
            return torch.stack([a, a] if self.repeat else [a]).sum(0) * x[:, :1]

    x = torch.randn(1, 3, 6, 7)
    for repeat in (False, True):
        model = M(repeat).eval()
        eng = segfast.compile(model, x, backend="torch")
        assert eng.info.fusions.get("stack_sum", 0) == (not repeat), eng.info.fusions
        assert_close(eng(x), model(x), atol=1e-6, rtol=1e-5)
