"""Resize semantics survive ONNX export: ONNX Runtime equals PyTorch's F.interpolate.

The classic mismatches, each a case below: ONNX's ``pytorch_half_pixel``
samples index 0 for an output of size 1 where PyTorch samples the centre;
sizes instead of PyTorch's ``scale_factor`` shift every sample for
non-integer factors; ONNX Resize's nearest picks a neighbouring pixel where
``dst·in/out`` is an integer (14 → 4 rows: row 2 reads 6, PyTorch 7); float32
vs float64 output sizes (45 · 1.4 → 63 vs 62). Each mode is one model that
computes many interpolations of its input, flattened and concatenated; each
case is compared on its own slice, so a failure names the case.
"""

from __future__ import annotations

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segfast.errors import UnsupportedModelError
from segfast.export import export_onnx, run_onnx

# (size, scale_factor, recompute_scale_factor); the static input is 14×21.
STATIC_CASES = [
    ((1, 1), None, None),  # output 1: half_pixel, not pytorch_half_pixel
    ((1, 17), None, None),
    ((4, 6), None, None),  # down; nearest: 14/4 = 3.5 → row 2 reads row 7
    ((20, 27), None, None),  # up, odd
    ((14, 21), None, None),  # identity
    (None, 1.5, None),  # non-integer up: PyTorch samples with 1/1.5, not 14/21
    (None, (0.4, 2.3), None),
    (None, 0.5, None),
    (None, (1 / 3, 0.77), None),
    (None, 2, None),
    (None, 1.7, True),  # recompute_scale_factor: coordinates from the output size
]
# Dynamic exports take sizes and power-of-two factors (other factors are refused).
DYNAMIC_CASES = [
    ((1, 1), None, None),
    ((4, 6), None, None),
    ((20, 27), None, None),
    (None, 2, None),
    (None, 0.5, None),
    (None, (4, 0.25), None),
    (None, 2, True),
]
MODES = [
    ("bilinear", False),
    ("bilinear", True),
    ("bicubic", False),
    ("bicubic", True),
    ("nearest", None),
    ("nearest-exact", None),
    ("area", None),
]


class Interpolations(nn.Module):
    """Every case, plus a 1×1 input upsampled to 4×3, flattened and concatenated: [N, total]."""

    def __init__(
        self, mode: str, align_corners: bool | None, cases: list, antialias: bool = False
    ) -> None:
        super().__init__()
        self.mode, self.align_corners, self.cases, self.antialias = (
            mode,
            align_corners,
            cases,
            antialias,
        )

    def parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        kw = {"mode": self.mode, "align_corners": self.align_corners}
        if self.antialias:
            kw["antialias"] = True
        outs = [
            F.interpolate(x, size=s, scale_factor=f, recompute_scale_factor=r, **kw)
            for s, f, r in self.cases
        ]
        outs.append(F.interpolate(x[:, :, :1, :1], size=(4, 3), **kw))
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([y.flatten(1) for y in self.parts(x)], dim=1)


# Nearest modes copy source pixels: exact. Linear and cubic modes compute float32
# coordinates by different formulas (ORT: x / scale; PyTorch: x · (1/scale)), an ulp
# apart, ~1e-5 on these N(0, 1) inputs; a semantic mismatch (wrong coordinate mode,
# scale or size) is O(0.1) or a shape error. Area averages: float32 summation order.
TOLERANCE = {"nearest": 0.0, "nearest-exact": 0.0, "area": 1e-5, "bilinear": 5e-5, "bicubic": 5e-5}


def case_errors(model: Interpolations, x: torch.Tensor, out: torch.Tensor) -> list[str]:
    """The cases whose slice of ``out`` differs from PyTorch beyond TOLERANCE[mode]."""
    with torch.no_grad():
        refs = model.parts(x)
    total = sum(r[0].numel() for r in refs)
    if out.shape != (x.shape[0], total):
        return [f"output {tuple(out.shape)} != PyTorch's {(x.shape[0], total)}"]
    bad, start = [], 0
    for label, ref in zip([*model.cases, "1×1 input → (4, 3)"], refs, strict=True):
        n = ref[0].numel()
        err = (out[:, start : start + n].reshape(ref.shape) - ref).abs().max().item()
        if not err <= TOLERANCE[model.mode]:
            bad.append(f"{label} at {tuple(x.shape[-2:])}: max-abs {err:.3g}")
        start += n
    return bad


def coordinate_modes(path) -> set[str]:
    return {
        onnx.helper.get_attribute_value(a).decode()
        for n in onnx.load(str(path)).graph.node
        if n.op_type == "Resize"
        for a in n.attribute
        if a.name == "coordinate_transformation_mode"
    }


@pytest.mark.parametrize(("mode", "align_corners"), MODES, ids=[f"{m}-{a}" for m, a in MODES])
def test_resize_static_matches_pytorch(mode, align_corners, tmp_path):
    model = Interpolations(mode, align_corners, STATIC_CASES).eval()
    x = torch.randn(2, 3, 14, 21)
    exp = export_onnx(model, tmp_path / "r.onnx", example_input=x, check=False)
    onnx.checker.check_model(str(exp.path), full_check=True)
    assert case_errors(model, x, run_onnx(exp.path, x)) == []
    modes = coordinate_modes(exp.path)
    if mode in ("bilinear", "bicubic"):
        assert modes == {"align_corners" if align_corners else "half_pixel"}
    if mode.startswith("nearest"):
        assert modes <= {"asymmetric"}  # only the power-of-two factors stay a Resize
        assert exp.rewrites[f"{mode} resize as exact gathers"] >= 8


@pytest.mark.parametrize(("mode", "align_corners"), MODES, ids=[f"{m}-{a}" for m, a in MODES])
def test_resize_dynamic_matches_pytorch_over_a_sweep_of_sizes(mode, align_corners, tmp_path):
    model = Interpolations(mode, align_corners, DYNAMIC_CASES).eval()
    exp = export_onnx(
        model, tmp_path / "r.onnx", example_input=torch.randn(1, 2, 9, 13), dynamic=True
    )
    bad = []
    for h, w in [(14, 21), (4, 4), (5, 40), (45, 7), (31, 33), (17, 10), (64, 5), (6, 39)]:
        x = torch.randn(1, 2, h, w)
        bad += case_errors(model, x, run_onnx(exp.path, x))
    assert bad == []


def test_antialias_by_size_or_exact_factor_matches(tmp_path):
    cases = [((1, 1), None, None), ((4, 6), None, None), ((20, 27), None, None), (None, 2, None)]
    model = Interpolations("bilinear", False, cases, antialias=True).eval()
    x = torch.randn(1, 2, 14, 21)
    exp = export_onnx(model, tmp_path / "aa.onnx", example_input=x, check=False)
    assert case_errors(model, x, run_onnx(exp.path, x)) == []


def test_float64_output_size_is_kept(tmp_path):
    """45 · 1.4 = 62.999…: PyTorch makes 62 rows, ONNX Runtime's float32 Resize would make 63."""
    model = Interpolations("bilinear", False, [(None, 1.4, None)]).eval()
    x = torch.randn(1, 1, 45, 45)
    exp = export_onnx(model, tmp_path / "s.onnx", example_input=x)
    assert exp.rewrites == {"bilinear resize by a non-power-of-two factor as gathers": 1}
    assert case_errors(model, x, run_onnx(exp.path, x)) == []


class _Call(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


@pytest.mark.parametrize(
    ("fn", "dynamic", "match"),
    [
        (lambda x: F.interpolate(x, scale_factor=1.5, mode="bilinear"), True, "float32"),
        (
            lambda x: F.interpolate(
                x, scale_factor=1.5, mode="nearest", recompute_scale_factor=True
            ),
            True,
            "float32",
        ),
        (
            lambda x: F.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True),
            False,
            "antialias",
        ),
        (lambda x: torch._C._nn.upsample_nearest2d(x, (4, 6), None), False, "rounds differently"),
        (  # 9·1.1 = 9.9 → 9 rows: PyTorch's CPU kernel copies the height, ONNX resamples it
            lambda x: F.interpolate(x, scale_factor=1.1, mode="bilinear"),
            False,
            r"keeps its size \(9 → 9\)",
        ),
        (  # int() of a float size: export guards int(1.5·H) == 13, pinning H to 9
            lambda x: F.interpolate(x, size=(int(x.shape[-2] * 1.5), 4), mode="bilinear"),
            True,
            r"fixes the input height to 9 .*math\.trunc\(1\.5\*torch\.sym_float\(height\)\) == 13",
        ),
        (lambda x: F.adaptive_max_pool2d(x, 4), True, "adaptive_max_pool2d"),
    ],
    ids=[
        "dynamic-factor",
        "dynamic-recompute",
        "antialias-factor",
        "aten-nearest",
        "kept-axis",
        "float-size",
        "adaptive-max",
    ],
)
def test_inexact_resizes_are_refused_with_the_reason(fn, dynamic, match, tmp_path):
    path = tmp_path / "m.onnx"
    with pytest.raises(UnsupportedModelError, match=match):
        export_onnx(_Call(fn), path, input_shape=(1, 2, 9, 13), dynamic=dynamic)
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_align_corners_model_option_is_kept(tmp_path):
    """DeepLab v3+ with align_corners=True (smp's choice) exports with its semantics."""
    from segfast import models
    from segfast.outputs import WithHead
    from segfast.testing import assert_rel_l2

    model = models.create("deeplabv3plus_resnet50", tiny=True, align_corners=True).eval()
    x = torch.randn(1, 3, 37, 45)
    exp = export_onnx(model, tmp_path / "d.onnx", example_input=x)
    assert coordinate_modes(exp.path) == {"align_corners"}
    with torch.no_grad():
        ref = WithHead(model).eval()(x)
    assert_rel_l2(run_onnx(exp.path, x), ref, 1e-4)
