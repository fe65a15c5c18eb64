"""export_onnx: the file (checker, names, metadata, hash), output kinds, fp16, opsets,
atomic writes, the check's safety net and the errors."""

from __future__ import annotations

import copy
import json

import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto
from torch import nn

from segfast import models
from segfast._io import sha256_file
from segfast.errors import UnsupportedModelError
from segfast.export import export_onnx, run_onnx
from segfast.export import rewrites as rewrites_module
from segfast.metrics import compare
from segfast.outputs import WithHead
from segfast.testing import assert_low_precision_close, assert_rel_l2


def eager(model, output, *inputs, threshold=0.5):
    with torch.no_grad():
        return WithHead(model, output, threshold).eval()(*inputs)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return models.create("unet", tiny=True).eval()


def test_file_is_checked_named_hashed_and_described(unet, tmp_path):
    exp = export_onnx(unet, tmp_path / "u.onnx", input_shape=(1, 1, 37, 45), output="mask")
    onnx.checker.check_model(str(exp.path), full_check=True)
    assert exp.sha256 == sha256_file(exp.path)
    assert (exp.input_names, exp.output_names, exp.opset) == (["input"], ["mask"], 18)
    assert (exp.precision, exp.output, exp.num_classes) == ("fp32", "mask", 2)
    assert exp.input_shapes == [(1, 1, 37, 45)]
    assert exp.input_dtypes == ["float32"]
    proto = onnx.load(str(exp.path))
    assert proto.graph.output[0].type.tensor_type.elem_type == TensorProto.UINT8
    assert [n.op_type for n in proto.graph.node].count("ArgMax") == 1
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["segfast.output"] == "mask"
    assert meta["segfast.num_classes"] == "2"
    assert json.loads(meta["segfast.model"])["name"] == "unet"
    assert json.loads(meta["segfast.dynamic_ranges"]) == {}
    assert json.loads(meta["segfast.guards"]) == []
    assert exp.guards == ()
    assert [c.passed for c in exp.checks] == [True]  # the example, ONNX Runtime vs eager
    assert exp.checks[0].accuracy.mask_agreement == 1.0


def test_multi_input_model_gets_its_parameter_names(tmp_path):
    model = models.create("cgan_generator", tiny=True).eval()
    inputs = models.get_spec("cgan_generator").make_inputs(model, 2, (64, 64))
    exp = export_onnx(model, tmp_path / "g.onnx", example_input=inputs, dynamic=["batch"])
    assert exp.input_names == ["z", "labels"]
    assert exp.input_dtypes == ["float32", "int64"]
    graph = onnx.load(str(exp.path)).graph
    assert [d.dim_param for d in graph.input[1].type.tensor_type.shape.dim] == ["batch"]


@pytest.mark.parametrize("output", ["probs", "mask"])
def test_one_class_heads_use_sigmoid_and_the_threshold(output, tmp_path):
    model = models.create("unet", tiny=True, num_classes=1).eval()
    x = torch.randn(1, 1, 29, 35)
    exp = export_onnx(model, tmp_path / "b.onnx", example_input=x, output=output, threshold=0.6)
    out = run_onnx(exp.path, x)
    ref = eager(model, output, x, threshold=0.6)
    if output == "mask":
        assert out.dtype == torch.uint8
        assert compare(out, ref).mask_agreement >= 0.999
    else:
        assert_rel_l2(out, ref, 1e-4)


def test_probs_on_a_many_class_model(tmp_path):
    model = models.create("fcn_resnet50", tiny=True, num_classes=5).eval()
    x = torch.randn(2, 3, 33, 41)
    exp = export_onnx(model, tmp_path / "f.onnx", example_input=x, output="probs")
    assert_rel_l2(run_onnx(exp.path, x), eager(model, "probs", x), 1e-4)


def test_fp16_graph_is_strongly_typed_and_within_the_contract(unet, tmp_path):
    x = torch.randn(1, 1, 37, 45)
    exp = export_onnx(unet, tmp_path / "h.onnx", example_input=x, precision="fp16")
    assert exp.input_dtypes == ["float16"]
    proto = onnx.load(str(exp.path))
    assert proto.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert proto.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    weights = {i.name: i.data_type for i in proto.graph.initializer}
    conv_weights = [n.input[1] for n in proto.graph.node if n.op_type in ("Conv", "ConvTranspose")]
    assert conv_weights
    assert {weights[w] for w in conv_weights} == {TensorProto.FLOAT16}
    out = run_onnx(exp.path, x)
    assert out.dtype == torch.float16
    ref32 = eager(unet, "logits", x)
    ref16 = eager(copy.deepcopy(unet).half(), "logits", x.half())
    assert_low_precision_close(out.float(), ref32, ref16.float())


def test_fp16_dynamic_pspnet_with_rewritten_pooling(tmp_path):
    """The pooling matrices in fp16; ORT's CPU EP runs the fp16 graph (fp32 behind casts)."""
    model = models.create("pspnet", tiny=True).eval()
    exp = export_onnx(
        model,
        tmp_path / "p.onnx",
        input_shape=(1, 3, 48, 64),
        precision="fp16",
        output="probs",
        dynamic=True,
    )
    assert exp.rewrites == {"adaptive_avg_pool2d as pooling matrices": 4}
    x = torch.randn(1, 3, 37, 53)
    out = run_onnx(exp.path, x).float()
    ref32 = eager(model, "probs", x)
    ref16 = eager(copy.deepcopy(model).half(), "probs", x.half()).float()
    assert_low_precision_close(out, ref32, ref16)


def test_opset_17_is_converted_and_runs(unet, tmp_path):
    x = torch.randn(1, 1, 32, 40)
    exp = export_onnx(unet, tmp_path / "o.onnx", example_input=x, opset=17)
    proto = onnx.load(str(exp.path))
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {17}
    assert_rel_l2(run_onnx(exp.path, x), eager(unet, "logits", x), 1e-4)


def test_check_refuses_a_graph_wrong_at_other_sizes(monkeypatch, tmp_path):
    """Without segfast's pooling rewrite the exporter bakes the example's pooling into the
    graph; the check runs another size, sees the difference, and writes nothing."""

    class Pyramid(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.adaptive_avg_pool2d(x, 3)
            return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)

    monkeypatch.setattr(
        rewrites_module.ExportRewrites,
        "__torch_function__",
        lambda self, func, types, args=(), kwargs=None: func(*args, **(kwargs or {})),
    )
    monkeypatch.setattr("segfast.export.onnx.audit", lambda program, dynamic_hw: None)
    path = tmp_path / "p.onnx"
    with pytest.raises(UnsupportedModelError, match="input size other than the example"):
        export_onnx(Pyramid(), path, input_shape=(1, 2, 12, 16), dynamic=True)
    assert list(tmp_path.iterdir()) == []


def test_failed_export_leaves_an_existing_file_untouched(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous export")

    class Unsupported(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.adaptive_max_pool2d(x, 3)  # 8 → 3: torch.onnx has no translation

    with pytest.raises(UnsupportedModelError, match=r"adaptive_max_pool2d.*opset 18"):
        export_onnx(Unsupported(), path, input_shape=(1, 2, 8, 8))
    assert path.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_torch_export_failure_names_the_stage(tmp_path):
    class DataDependent(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(
        UnsupportedModelError, match=r"torch\.export could not capture DataDependent"
    ):
        export_onnx(DataDependent(), tmp_path / "d.onnx", input_shape=(1, 1, 4, 4))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"output": "argmax"}, ValueError, "output must be one of"),
        ({"precision": "bf16"}, ValueError, "bf16.*fp16"),
        ({"precision": "int4"}, ValueError, "precision must be"),
        ({"precision": "int8"}, ValueError, "int8_layers= go together"),
        ({"opset": 16}, ValueError, "opset must be an integer from 17"),
        ({"dynamic": ["depth"]}, ValueError, "dynamic axes must be among"),
    ],
)
def test_bad_arguments_are_refused_before_exporting(unet, kwargs, error, match, tmp_path):
    with pytest.raises(error, match=match):
        export_onnx(unet, tmp_path / "x.onnx", input_shape=(1, 1, 8, 8), **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_mask_needs_image_logits(tmp_path):
    model = models.create("dcgan_discriminator", tiny=True)
    x = models.get_spec("dcgan_discriminator").make_inputs(model)
    with pytest.raises(UnsupportedModelError, match=r"output='mask' needs N×K×H×W logits"):
        export_onnx(model, tmp_path / "d.onnx", example_input=x, output="mask")


def test_export_needs_an_example_or_a_shape(tmp_path):
    """The exporter takes a module and what to trace it with; a zoo model's standard
    size is the api's and the CLI's convenience, not the export layer's."""
    with pytest.raises(ValueError, match="needs example_input or input_shape"):
        export_onnx(models.create("unet", tiny=True), tmp_path / "u.onnx")
    with pytest.raises(TypeError, match=r"must be an nn\.Module, got str"):
        export_onnx("unet", tmp_path / "u.onnx")
    assert list(tmp_path.iterdir()) == []


def test_pinned_dynamic_axis_is_refused(tmp_path):
    class Fixed(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.reshape(x.shape[0], 2, 8, 8) * 2  # pins H and W to 8

    with pytest.raises(UnsupportedModelError, match="fixes the input height to 8"):
        export_onnx(Fixed(), tmp_path / "f.onnx", input_shape=(1, 2, 8, 8), dynamic=True)


def test_dynamic_export_records_the_export_guards(tmp_path):
    """FCN-8s is traced assuming its 1/32 map is not 1×1: a guard the ranges do not show."""
    from segfast.compiler.guards import Guards
    from segfast.export import in_domain

    model = models.create("fcn8s", tiny=True).eval()
    exp = export_onnx(model, tmp_path / "f.onnx", input_shape=(1, 3, 48, 64), dynamic=True)
    assert exp.ranges == {"height": (2, 2**31 - 1), "width": (2, 2**31 - 1)}
    assert exp.guards
    meta = {p.key: p.value for p in onnx.load(str(exp.path)).metadata_props}
    assert json.loads(meta["segfast.guards"]) == list(exp.guards)
    guards = Guards(exp.guards)
    assert in_domain([(1, 3, 33, 40)], exp.dynamic, exp.ranges, guards) is None
    assert "guard" in in_domain([(1, 3, 32, 40)], exp.dynamic, exp.ranges, guards)
    # Every check ran inside the proven domain.
    assert all(in_domain(c.shapes, exp.dynamic, exp.ranges, guards) is None for c in exp.checks)
