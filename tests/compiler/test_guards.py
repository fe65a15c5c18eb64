"""The guard evaluator: torch.export's guard syntax, named sizes, and nothing else."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import segfast
from segfast.compiler.guards import Guards, eager_size_guards, in_domain, size_name
from segfast.errors import InputError


def test_names_and_python_semantics():
    g = Guards(
        [
            "((width + (((-1)*width) % 32)) // 32) != 1",  # FCN-8s: padded width > 32
            "max(1, batch) == batch and not height < 2",
            "math.trunc(0.5*torch.sym_float(height)) >= 2",  # a scale factor's size
            "input1_d0 == batch",
            "torch.sym_max(1, height) + torch.sym_min(width, 64) > 3",  # SegFormer's
        ]
    )
    assert g.first_violated([(2, 3, 40, 33), (2,)]) is None
    assert g.first_violated([(2, 3, 40, 32), (2,)]) == g.text[0]
    assert g.first_violated([(2, 3, 3, 40), (2,)]) == g.text[2]  # trunc(1.5) = 1
    assert g.first_violated([(2, 3, 40, 40), (3,)]) == g.text[3]
    assert [size_name(0, d) for d in range(4)] == ["batch", "channels", "height", "width"]


@pytest.mark.parametrize(
    "guard", ["__import__('os').getcwd() == 0", "height.bit_length() > 1", "[height][0] == 1"]
)
def test_anything_but_shape_arithmetic_is_refused(guard):
    with pytest.raises(ValueError, match="unsupported guard syntax"):
        Guards([guard])  # refused when compiled, before any input is seen


def test_a_guard_on_a_size_the_inputs_lack_is_an_error():
    with pytest.raises(ValueError, match="input1_d0"):
        Guards(["input1_d0 == batch"]).first_violated([(1, 3, 8, 8)])


class _ChecksItsSize(nn.Module):
    """A model that checks its input size in Python and skips the check while traced, as
    segmentation_models_pytorch does (``check_input_shape``): its graph runs any size and,
    pooling by 8 and upsampling by 8, returns a map smaller than a height it refuses."""

    def __init__(self, multiple: int = 8) -> None:
        super().__init__()
        self.multiple = multiple
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            h, w = x.shape[-2:]
            if h % self.multiple or w % self.multiple:
                raise RuntimeError(f"height and width must be divisible by {self.multiple}")
        y = F.avg_pool2d(self.conv(x), 8)
        return F.interpolate(y, scale_factor=8.0, mode="bilinear")


def test_eager_size_guards_find_the_models_own_check():
    x = torch.randn(1, 3, 48, 40)
    guards, notes = eager_size_guards(_ChecksItsSize(8).eval(), (x,), ("height", "width"))
    assert guards == ("height % 8 == 0", "width % 8 == 0")
    assert "multiples of 8" in notes[0]
    assert "divisible by 8" in notes[0]
    x16 = torch.randn(1, 3, 48, 48)
    assert eager_size_guards(_ChecksItsSize(16).eval(), (x16,), ("width",))[0] == (
        "width % 16 == 0",
    )
    plain = nn.Conv2d(3, 4, 3, padding=1).eval()
    assert eager_size_guards(plain, (x,), ("height", "width")) == ((), [])
    why = in_domain([(1, 3, 52, 40)], ("height",), {"height": (2, 99)}, Guards(guards))
    assert why is not None
    assert "height 52: the model takes heights that are multiples of 8" in why


def test_a_dynamic_engine_refuses_sizes_the_model_refuses(tmp_path):
    """Before: the engine took 52×44 and returned 48×40 logits where the model raises."""
    model = _ChecksItsSize(8).eval()
    eng = segfast.compile(model, torch.randn(1, 3, 48, 40), backend="torch", dynamic=True)
    assert any("takes heights that are multiples of 8" in n for n in eng.info.notes)
    with pytest.raises(InputError, match="the model takes heights that are multiples of 8"):
        eng(torch.randn(1, 3, 52, 40))
    with pytest.raises(InputError, match="widths that are multiples of 8"):
        eng(torch.randn(1, 3, 48, 44))
    x = torch.randn(1, 3, 64, 72)
    with torch.no_grad():
        torch.testing.assert_close(eng(x), model(x), rtol=1e-4, atol=1e-5)
    nan = torch.randn(1, 3, 52, 40)
    nan[0, 0, 0, 0] = float("nan")  # the NaN path (the model as compiled) is guarded too
    with pytest.raises(InputError, match="multiples of 8"):
        eng(nan)
    path = tmp_path / "e.segfast"
    eng.save(path)  # the guards travel in the file: the loaded program has no check left
    with pytest.raises(InputError, match="multiples of 8"):
        segfast.load(path)(torch.randn(1, 3, 52, 40))


def test_size_guards_given_by_the_caller():
    x = torch.randn(1, 3, 64, 64)
    conv = nn.Conv2d(3, 4, 3, padding=1).eval()
    eng = segfast.compile(
        conv, x, backend="torch", dynamic=True, options={"size_guards": ["height % 32 == 0"]}
    )
    eng(torch.randn(1, 3, 96, 40))
    with pytest.raises(InputError, match="multiples of 32"):
        eng(torch.randn(1, 3, 80, 40))
    with pytest.raises(ValueError, match="size_guards"):
        segfast.compile(conv, x, backend="torch", dynamic=True, options={"size_guards": "h"})
    with pytest.raises(ValueError, match="unsupported guard syntax"):
        segfast.compile(
            conv, x, backend="torch", dynamic=True, options={"size_guards": ["open(height)"]}
        )


def test_the_onnxruntime_engine_and_file_carry_the_models_size_check(tmp_path):
    """The ONNX export probes the model too; before, its verification ran the model at a
    probe size the model refuses and the build failed with the model's own error."""
    pytest.importorskip("onnxruntime")
    from segfast.export.onnx import export_onnx

    model = _ChecksItsSize(8).eval()
    x = torch.randn(1, 3, 48, 40)
    exp = export_onnx(model, tmp_path / "m.onnx", example_input=x, dynamic=True)
    assert {"height % 8 == 0", "width % 8 == 0"} <= set(exp.guards)
    eng = segfast.compile(model, x, backend="onnxruntime", dynamic=True)
    with pytest.raises(InputError, match="multiples of 8"):
        eng(torch.randn(1, 3, 52, 40))
    y = torch.randn(1, 3, 56, 80)
    with torch.no_grad():
        torch.testing.assert_close(eng(y), model(y), rtol=1e-4, atol=1e-5)


def test_a_failed_guard_names_the_nearest_sizes_the_engine_takes():
    """A U-Net traced with its 1/32 bottleneck wider than 1 refuses width 32: the message
    says which widths to send instead (the guard alone is shape arithmetic)."""
    g = Guards(["(1 + (((-1) + width) // 32)) != 1", "(height // 2) * 2 == height"])
    both = ("height", "width")
    why = in_domain([(1, 3, 32, 32)], both, {"height": (2, 999), "width": (2, 999)}, g)
    assert why is not None
    assert why.endswith("(the nearest sizes this engine takes: width 33)")
    why = in_domain([(1, 3, 31, 40)], both, {"height": (2, 999), "width": (2, 999)}, g)
    assert why is not None
    assert why.endswith("(the nearest sizes this engine takes: height 30 or 32)")


@pytest.mark.parametrize(("size", "guard"), [(512, "width % 64 == 0"), (96, "width % 48 == 0")])
def test_a_stepped_axis_is_not_taken_for_a_pinned_one(size, guard):
    """The pinned-axis probes (+3, +11, +32, ×2 …) never land on a multiple of 48 or 64:
    a model whose own check asks for one was refused as "fixes the input width"."""
    from segfast.compiler.guards import refuse_pinned

    ranges = {"height": (2, 9999), "width": (2, 9999)}
    refuse_pinned((torch.empty(1, 3, size, size),), ("height", "width"), ranges, Guards([guard]))
