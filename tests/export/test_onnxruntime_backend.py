"""The ``onnxruntime`` backend: availability, segfast.compile + segfast.check, the
proven-domain refusal, precision handling."""

from __future__ import annotations

import sys

import pytest
import torch

import segfast
from segfast import models
from segfast.backends import availability, available, get_backend
from segfast.errors import BackendUnavailable, InputError


def test_registered_and_available_on_the_cpu():
    be = get_backend("onnxruntime")
    assert (be.name, be.uses_graph) == ("onnxruntime", False)
    ok, why = available("onnxruntime", "cpu")
    assert ok, why
    assert why.startswith("ONNX Runtime ")
    assert why.endswith("CPUExecutionProvider")
    assert "onnxruntime" in availability("cpu")


def test_cuda_needs_the_cuda_execution_provider():
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA execution provider")
    ok, why = available("onnxruntime", "cuda")
    assert not ok
    assert "no CUDAExecutionProvider" in why
    assert "onnxruntime-gpu" in why


def test_missing_onnxruntime_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    ok, why = available("onnxruntime", "cpu")
    assert not ok
    assert why == "onnxruntime is not installed: pip install 'segfast[onnx]'"


@pytest.mark.parametrize(
    ("name", "output", "precision"),
    [
        ("unet", "logits", "fp32"),
        ("fcn_resnet50", "mask", "fp32"),
        ("segnet", "probs", "fp32"),
        ("unet", "mask", "fp16"),
    ],
)
def test_compile_passes_check(name, output, precision):
    model = models.create(name, tiny=True).eval()
    x = torch.randn(1, model.in_channels, 37, 45)
    eng = segfast.compile(
        model,
        x,
        backend="onnxruntime",
        output=output,
        precision=precision,
        options={"intra_op_num_threads": 1},
    )
    report = segfast.check(eng, model, [x, torch.randn_like(x)])
    assert report.passed, str(report)
    assert eng.backend == "onnxruntime"
    notes = "\n".join(eng.info.notes)
    assert "CPUExecutionProvider" in notes
    assert "ONNX opset 18 from torch.onnx.export(dynamo=True)" in notes
    assert "1 intra-op thread(s)" in notes


def test_dynamic_engine_runs_other_sizes_and_refuses_unproven_ones():
    """U-Net (depth 3) is traced assuming its 1/8 bottleneck is not 1×1: H, W ≥ 9."""
    model = models.create("unet", tiny=True).eval()
    eng = segfast.compile(
        model, torch.randn(1, 1, 48, 64), backend="onnxruntime", output="mask", dynamic=True
    )
    for size in [(37, 53), (64, 40), (9, 9)]:
        y = torch.randn(1, 1, *size)
        report = segfast.check(eng, model, [y])
        assert report.passed, str(report)
        assert eng(y).shape == (1, *size)
    with pytest.raises(InputError, match=r"outside the shapes the exported ONNX graph is proven"):
        eng(torch.randn(1, 1, 8, 8))
    assert "shape guard(s), enforced per call" in "\n".join(eng.info.notes)


def test_bf16_is_unavailable_with_the_reason():
    model = models.create("unet", tiny=True)
    with pytest.raises(BackendUnavailable, match="bf16 is not supported"):
        segfast.compile(model, input_shape=(1, 1, 16, 16), backend="onnxruntime", precision="bf16")


def test_an_unexportable_model_is_an_unsupported_model_error():
    from torch import nn

    from segfast.errors import UnsupportedModelError

    class DataDependent(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(UnsupportedModelError, match=r"torch\.export could not capture"):
        segfast.compile(DataDependent(), input_shape=(1, 1, 4, 4), backend="onnxruntime")


def test_engine_save_and_load_rebuilds_the_session(tmp_path):
    model = models.create("unet", tiny=True).eval()
    x = torch.randn(1, 1, 32, 40)
    eng = segfast.compile(model, x, backend="onnxruntime", output="mask")
    eng.save(tmp_path / "e.sfe")
    loaded = segfast.load(tmp_path / "e.sfe")
    assert loaded.backend == "onnxruntime"
    assert torch.equal(loaded(x), eng(x))
