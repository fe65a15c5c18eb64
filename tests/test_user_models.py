"""Models written the way users bring them (torchvision / smp look-alikes), and the
engine behaviour around them that a first user runs into: each test here failed
before the fix it guards (see the docstrings)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import segfast
from segfast import InputError, UnsupportedModelError


def _randomise(model: nn.Module) -> nn.Module:
    """Non-trivial norm statistics and affine parameters (fresh ones fold to identities)."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        norm = isinstance(m, nn.BatchNorm2d | nn.GroupNorm | nn.InstanceNorm2d | nn.LayerNorm)
        if norm and m.weight is not None:
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


class NormsNet(nn.Module):
    """GroupNorm, InstanceNorm, channel-last LayerNorm, PixelShuffle, GELU, a grouped conv,
    a reflect-padded conv, a transposed conv with output_padding, bias-free conv + 1."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.inorm = nn.InstanceNorm2d(16, affine=True)
        self.c3 = nn.Conv2d(16, 32, 3, padding=1, padding_mode="reflect")
        self.ln = nn.LayerNorm(32)
        self.shuffle = nn.PixelShuffle(2)
        self.c4 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(8, 8, 3, stride=2, padding=1, output_padding=1)
        self.cls = nn.Conv2d(8, 3, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.gn(self.c1(x)))
        x = F.silu(self.inorm(self.c2(x)))
        x = self.ln(self.c3(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = self.c4(self.shuffle(F.gelu(x, approximate="tanh")))
        return self.cls(self.up(x)) + 1


@pytest.mark.parametrize("output", ["logits", "mask"])
def test_group_instance_norm_and_pixel_shuffle(output):
    """InstanceNorm decomposes into a ``view`` of N×C×H×W as 1×(N·C)×H×W; after a
    segfast conv the tensor is NHWC, which that view cannot express ("Cannot view a
    tensor with shape ... and strides ..." at batch > 1): views become reshapes."""
    model = _randomise(NormsNet())
    x = torch.randn(2, 3, 9, 11)
    for dynamic in (False, True):
        engine = segfast.compile(model, x, backend="torch", output=output, dynamic=dynamic)
        sets = [x, torch.randn_like(x)] + ([torch.randn(2, 3, 12, 7)] if dynamic else [])
        report = segfast.check(engine, model, sets)
        assert report.passed, str(report)


def test_instance_norm_on_the_triton_backend():
    """The same view → reshape rewrite on the Triton backend (interpreter, tiny size)."""
    model = _randomise(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8, affine=True))
    )
    x = torch.randn(2, 3, 5, 6)
    engine = segfast.compile(model, x, backend="triton")
    assert segfast.check(engine, model, [x]).passed


class EvenOnly(nn.Module):
    """FPN-style ``lateral + upsample(coarser)``: runs only at even heights and widths."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.lat = nn.Conv2d(3, 4, 1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lat(x) + self.up(self.down(x))


def test_dynamic_engine_refuses_sizes_its_guards_exclude(tmp_path):
    """Outside the export's shape guards the graph raised a bare ``AssertionError: Guard
    failed: ... x.size()[3] ...``; now an InputError names the shapes and the guard."""
    model = EvenOnly().eval()
    engine = segfast.compile(model, torch.randn(1, 3, 8, 10), backend="torch", dynamic=True)
    assert segfast.check(engine, model, [torch.randn(1, 3, 12, 6)]).passed
    for eng in (engine, segfast.load(engine.save(tmp_path / "even.segfast"))):
        with pytest.raises(InputError, match=r"1×3×9×10 is outside .*guard"):
            eng(torch.randn(1, 3, 9, 10))
        with pytest.raises(InputError, match="outside"):
            eng.run_unchecked(torch.randn(1, 3, 8, 11))


class RGBD(nn.Module):
    """Two image inputs joined on channels (RGB + depth)."""

    def __init__(self) -> None:
        super().__init__()
        self.rgb = nn.Conv2d(3, 4, 3, padding=1)
        self.depth = nn.Conv2d(1, 4, 3, padding=1)
        self.cls = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        return self.cls(torch.cat([self.rgb(x), self.depth(depth)], dim=-3))


def test_two_image_inputs():
    """Static: fine. Dynamic height/width apply to the first input only, and the second
    pins them: the torch backend used to report "dynamic: height 2..2147483647" and fail
    at the first other size; it now refuses at compile time, saying why."""
    model = RGBD().eval()
    x, d = torch.randn(2, 3, 7, 9), torch.randn(2, 1, 7, 9)
    engine = segfast.compile(model, (x, d), backend="torch", output="mask")
    assert segfast.check(engine, model, [(x, d)]).passed
    with pytest.raises(UnsupportedModelError, match="first input only"):
        segfast.compile(model, (x, d), backend="torch", dynamic=True)
    batch = segfast.compile(model, (x, d), backend="torch", dynamic=["batch"])
    assert segfast.check(batch, model, [(x[:1], d[:1]), (x, d)]).passed


class Branchy(nn.Module):
    """Branches on the batch size, which export resolves while tracing at batch 2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y * 2 if x.shape[0] == 1 else y


def test_dynamic_batch_takes_batch_one():
    """torch.export specialises size 1: a dynamic batch traced at 1 failed ("the model
    fixes the input batch to 1") and one traced at 2 refused batch 1. Batch 1 is now
    traced at 2, and admitted when the engine matches the model there."""
    model = _randomise(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)))
    for example in (torch.randn(1, 3, 8, 8), torch.randn(2, 3, 8, 8)):
        engine = segfast.compile(model, example, backend="torch", dynamic=["batch"])
        assert engine.info.inputs[0].dynamic["batch"][0] == 1
        report = segfast.check(engine, model, [torch.randn(1, 3, 8, 8), torch.randn(3, 3, 8, 8)])
        assert report.passed, str(report)
    branchy = segfast.compile(Branchy().eval(), example, backend="torch", dynamic=["batch"])
    assert branchy.info.inputs[0].dynamic["batch"][0] == 2
    assert any(
        "batch 1 (below the proven minimum 2) does not match" in n for n in branchy.info.notes
    )
    with pytest.raises(InputError, match="batch is 1; this engine takes 2"):
        branchy(torch.randn(1, 3, 8, 8))


def test_segment_large_with_a_dynamic_batch_engine_and_one_tile_left():
    """Four tiles per call over a row of five (width 54, 12 pixels a tile): the last call
    has one tile, which a dynamic-batch engine proven from batch 2 refused mid-image."""
    model = nn.Conv2d(3, 2, 3, padding=1).eval()
    engine = segfast.compile(
        model, torch.randn(2, 3, 16, 16), backend="torch", output="mask", dynamic=["batch"]
    )
    image = np.random.default_rng(0).integers(0, 255, (16, 54, 3), dtype=np.uint8)
    mask = engine.segment_large(image, overlap=4, blend="crop", batch=4)
    full = model(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255).argmax(1)[0]
    assert mask.shape == (16, 54)
    assert (mask[2:-2, 2:-2] == full[2:-2, 2:-2].numpy()).all()


def test_static_hints_name_the_axis_to_make_dynamic():
    model = nn.Conv2d(3, 2, 1).eval()
    static = segfast.compile(model, torch.randn(1, 3, 8, 8), backend="torch")
    with pytest.raises(InputError, match=r"batch is static: compile with dynamic=\['batch'"):
        static(torch.randn(2, 3, 8, 8))
    with pytest.raises(InputError, match="this engine is static: compile with dynamic=True"):
        static(torch.randn(1, 3, 9, 8))
    hw = segfast.compile(model, torch.randn(1, 3, 8, 8), backend="torch", dynamic=True)
    with pytest.raises(InputError, match=r"batch is static: compile with dynamic=\['batch'"):
        hw(torch.randn(2, 3, 8, 8))  # used to say "this engine is static: dynamic=True"
    batch = segfast.compile(model, torch.randn(1, 3, 8, 8), backend="torch", dynamic=["batch"])
    with pytest.raises(InputError, match=r"height is static: compile with dynamic=\[\.\.\., 'h"):
        batch(torch.randn(1, 3, 9, 8))


def test_trace_inputs_are_new_objects():
    """torch.export marks the tensors it traces as dynamic and keeps the mark when the
    export fails; the next static export of the caller's tensors then traced symbolic
    sizes (a static ONNX export refused a scale factor "with a dynamic height/width")."""
    from segfast.compiler.capture import trace_inputs

    x = torch.randn(1, 3, 4, 4)
    traced = trace_inputs((x,), ("batch", "height"))
    assert traced[0] is not x
    assert traced[0].shape == (2, 3, 4, 4)
    assert trace_inputs((x,), ())[0] is not x


def test_failed_dynamic_export_leaves_static_compiles_alone():
    pytest.importorskip("onnxruntime")
    model = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.Upsample(scale_factor=2.5)).eval()
    x = torch.randn(1, 3, 6, 6)
    with pytest.raises(UnsupportedModelError, match="dynamic height/width"):
        segfast.compile(model, x, backend="onnxruntime", dynamic=True)
    assert not getattr(x, "_dynamo_weak_dynamic_indices", None)
    engine = segfast.compile(model, x, backend="onnxruntime", output="probs")
    assert segfast.check(engine, model, [x]).passed


class WithConstants(nn.Module):
    """Normalisation buffers, a tensor made in forward (a lifted constant) and a label."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.emb = nn.Embedding(5, 4)
        self.cls = nn.Conv2d(4, 3, 1)

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        scale = torch.tensor([1.0, 2.0, 0.5, 3.0], device=x.device).view(1, 4, 1, 1)
        y = F.relu(self.conv((x - self.mean) / self.std)) * scale
        return self.cls(y + self.emb(label)[:, :, None, None])


def test_lifted_constants_dynamic_and_low_precision():
    """A tensor made in forward is a lifted constant placeholder: the dynamic ranges were
    read from it ("the model fixes the input batch to 4"), and fp16 left it fp32 (a plain
    attribute, not a buffer), so the engine failed with "Input type (float) and bias
    type (c10::Half)". PyTorch's own fp16 run of this model fails the same way; the check
    then runs it under autocast to fp16 for PyTorch's own error (it used to report the
    failure: the bound could not be computed)."""
    model = WithConstants().eval()
    x, label = torch.rand(2, 3, 6, 7), torch.tensor([1, 3])
    engine = segfast.compile(model, (x, label), backend="torch", dynamic=["batch", "height"])
    sets = [(x, label), (torch.rand(1, 3, 9, 7), torch.tensor([4]))]
    assert segfast.check(engine, model, sets).passed
    half = segfast.compile(model, (x, label), backend="torch", precision="fp16")
    out = half(x, label)
    ref = model(x, label)
    assert out.dtype == torch.float16
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2
    with pytest.raises(RuntimeError), torch.inference_mode():  # PyTorch's own cast model
        copy.deepcopy(model).half()(x.half(), label)
    report = segfast.check(half, model, [(x, label)])
    assert report.passed, report.reason
    assert len(report.torch_lowp) == 1  # PyTorch's own error, under autocast


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_mask_of_a_non_segmentation_output_is_refused(backend):
    """The eager backend used to return an argmax over dim 1 of an N×10 output."""
    model = Classifier().eval()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(UnsupportedModelError, match=r"needs N×K×H×W logits.*\(1, 10\)"):
        segfast.compile(model, x, backend=backend, output="mask")
    assert segfast.compile(model, x, backend=backend).info.num_classes is None


def test_onnxruntime_engine_reports_the_ranges_it_enforces():
    pytest.importorskip("onnxruntime")
    model = EvenOnly().eval()
    engine = segfast.compile(model, torch.randn(1, 3, 8, 10), backend="onnxruntime", dynamic=True)
    lo_h = engine.info.inputs[0].dynamic["height"][0]
    assert lo_h == engine._runner.details["dynamic_ranges"]["height"][0] == 2


def test_api_misuse_gets_segfast_errors():
    model = nn.Conv2d(3, 2, 3, padding=1).eval()
    x = torch.randn(1, 3, 8, 8)
    engine = segfast.compile(model, x, backend="torch")
    for bad in (x.numpy(), [x.numpy()], [(x, "not a tensor")]):  # was an AttributeError
        with pytest.raises(InputError, match="must be"):
            segfast.check(engine, model, bad)
    if not torch.cuda.is_available():  # was "AssertionError: Torch not compiled with CUDA"
        with pytest.raises(segfast.BackendUnavailable, match="no CUDA GPU is available"):
            segfast.compile(model, x, backend="torch", device="cuda")
