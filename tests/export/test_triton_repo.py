"""``segfast export --format triton`` and segfast.export.triton_repo: a model repository
Triton Inference Server loads as is.

The server is a container and cannot run here. What stands in for it: every config.pbtxt
is parsed into Triton's own schema (``tritonclient.grpc.model_config_pb2.ModelConfig``),
and ``model.onnx`` is run in ONNX Runtime through exactly the inputs and outputs the
config declares (names, TYPE_* dtypes, dims with the batch dim re-added when
max_batch_size > 0), against the eager model or the segfast engine. The TensorRT plan
cannot be built here (no TensorRT): its absence is checked, and the build call with a
stand-in for TensorRT's builder.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import segfast
from segfast.cli import main
from segfast.errors import BackendUnavailable, InputError
from segfast.export import triton_repo as TR
from segfast.metrics import FP32_MAX_REL, MIN_MASK_AGREEMENT, compare
from segfast.models import build_from_reference

pytest.importorskip("tritonclient")
# tritonclient.grpc (where Triton's ModelConfig schema ships) imports grpcio: tritonclient[grpc]
pytest.importorskip(
    "grpc", reason="tritonclient.grpc needs grpcio: pip install 'tritonclient[grpc]'"
)
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
no_trt = pytest.mark.skipif(HAS_TRT, reason="checks the behaviour without TensorRT")

# Triton's TYPE_* → the numpy dtype a client sends / receives (tritonclient.utils' table).
NUMPY = {
    "TYPE_FP32": np.float32,
    "TYPE_FP16": np.float16,
    "TYPE_FP64": np.float64,
    "TYPE_UINT8": np.uint8,
    "TYPE_INT8": np.int8,
    "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64,
    "TYPE_BOOL": np.bool_,
}
UNET = ["unet", "--tiny", "--option", "base=4"]


def parse_config(path: Path) -> model_config_pb2.ModelConfig:
    """config.pbtxt parsed into Triton's schema (raises on any field Triton does not know)."""
    return text_format.Parse(path.read_text(encoding="utf-8"), model_config_pb2.ModelConfig())


def run_as_triton(model_dir: Path, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Run ``model_dir/1/model.onnx`` in ONNX Runtime the way Triton would from the config:
    inputs named, typed and shaped as declared (the batch dim added when max_batch_size >
    0; -1 dims free), outputs requested by their declared names and checked against their
    declared types and dims."""
    import onnxruntime as ort

    cfg = parse_config(model_dir / "config.pbtxt")
    assert cfg.platform == "onnxruntime_onnx"
    batched = cfg.max_batch_size > 0
    feeds = {}
    for decl, a in zip(cfg.input, arrays, strict=True):
        dims = list(decl.dims)
        shape = list(a.shape[1:]) if batched else list(a.shape)
        assert len(shape) == len(dims), (decl.name, shape, dims)
        assert all(d in (-1, s) for d, s in zip(dims, shape, strict=True)), (decl.name, dims)
        if batched:
            assert 1 <= a.shape[0] <= cfg.max_batch_size
        dtype = NUMPY[model_config_pb2.DataType.Name(decl.data_type)]
        feeds[decl.name] = a.astype(dtype)
    session = ort.InferenceSession(
        str(model_dir / "1" / cfg.default_model_filename), providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in cfg.output]
    results = dict(zip(names, session.run(names, feeds), strict=True))
    for decl in cfg.output:
        out = results[decl.name]
        assert out.dtype == NUMPY[model_config_pb2.DataType.Name(decl.data_type)]
        shape = out.shape[1:] if batched else out.shape
        assert len(shape) == len(decl.dims)
        assert all(d in (-1, s) for d, s in zip(decl.dims, shape, strict=True))
    return results


def params(cfg: model_config_pb2.ModelConfig) -> dict[str, str]:
    return {k: v.string_value for k, v in cfg.parameters.items()}


# ---- the writer, on small hand-made graphs ---------------------------------------------


def _graph(
    *, batch: str | int = "batch", ranges: str | None = None, fp16: bool = False
) -> onnx.ModelProto:
    """input [batch, 3, H, W] (+ an int64 [batch] label) → logits [batch, 3, H, W]."""
    ft = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    x = helper.make_tensor_value_info("input", ft, [batch, 3, "height", "width"])
    lab = helper.make_tensor_value_info("labels", TensorProto.INT64, [batch])
    y = helper.make_tensor_value_info("logits", ft, [batch, 3, "height", "width"])
    g = helper.make_graph([helper.make_node("Identity", ["input"], ["logits"])], "g", [x, lab], [y])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    if ranges is not None:
        m.metadata_props.add(key="segfast.dynamic_ranges", value=ranges)
    return m


def test_batch_dynamic_config_parses_into_triton_schema(tmp_path):
    repo = TR.write_triton_repo(
        _graph(), tmp_path / "repo", "seg", max_batch_size=4, max_queue_delay_us=250
    )
    cfg = parse_config(repo.config)
    assert (cfg.name, cfg.platform, cfg.max_batch_size) == ("seg", "onnxruntime_onnx", 4)
    assert cfg.default_model_filename == "model.onnx"
    decl = {t.name: (model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in cfg.input}
    assert decl == {"input": ("TYPE_FP32", [3, -1, -1]), "labels": ("TYPE_INT64", [])}
    (out,) = cfg.output
    assert (out.name, model_config_pb2.DataType.Name(out.data_type), list(out.dims)) == (
        "logits",
        "TYPE_FP32",
        [3, -1, -1],
    )
    assert cfg.HasField("dynamic_batching")
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 250
    assert params(cfg) == {
        "segfast_version": segfast.__version__,
        "segfast_output": "logits",
        "segfast_precision": "fp32",
    }
    assert sorted(p.name for p in repo.path.rglob("*")) == ["1", "config.pbtxt", "model.onnx"]
    assert not list((tmp_path / "repo").glob(".*"))  # no temporary folder left beside it


def test_static_config_keeps_full_dims_and_types(tmp_path):
    repo = TR.write_triton_repo(_graph(batch=2, fp16=True), tmp_path, "static")
    cfg = parse_config(repo.config)
    assert cfg.max_batch_size == 0
    assert not cfg.HasField("dynamic_batching")
    assert [list(t.dims) for t in cfg.input] == [[2, 3, -1, -1], [2]]
    assert [model_config_pb2.DataType.Name(t.data_type) for t in cfg.input] == [
        "TYPE_FP16",
        "TYPE_INT64",
    ]
    assert params(cfg)["segfast_precision"] == "fp16"
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 7)).astype(np.float32)
    out = run_as_triton(repo.path, [x, np.zeros(2, np.int64)])
    np.testing.assert_array_equal(out["logits"], x.astype(np.float16))


def test_names_and_values_are_escaped(tmp_path):
    m = _graph()
    odd = 'in "put"\\ é'
    m.graph.input[0].name = odd
    m.graph.node[0].input[0] = odd
    repo = TR.write_triton_repo(m, tmp_path, "odd", parameters={"note": 'a "b"\nc'})
    cfg = parse_config(repo.config)
    assert cfg.input[0].name == odd
    assert params(cfg)["note"] == 'a "b"\nc'


def test_fixed_batch_dim_with_max_batch_size_is_refused(tmp_path):
    with pytest.raises(InputError, match="first dim is not a dynamic batch"):
        TR.write_triton_repo(_graph(batch=1), tmp_path / "repo", "m", max_batch_size=8)
    assert not (tmp_path / "repo").exists()


def test_batch_range_below_what_triton_sends_is_refused(tmp_path):
    m = _graph(ranges='{"batch": [2, 2147483647]}')
    with pytest.raises(InputError, match=r"takes batch 2\.\.2147483647"):
        TR.write_triton_repo(m, tmp_path, "m", max_batch_size=8)
    m = _graph(ranges='{"batch": [1, 4]}')
    with pytest.raises(InputError, match="max_batch_size=8"):
        TR.write_triton_repo(m, tmp_path, "m", max_batch_size=8)
    assert TR.write_triton_repo(m, tmp_path, "m", max_batch_size=4).max_batch_size == 4


def test_queue_delay_needs_batching(tmp_path):
    with pytest.raises(InputError, match="needs max_batch_size > 0"):
        TR.write_triton_repo(_graph(), tmp_path, "m", max_queue_delay_us=100)


def test_output_kind_must_match_the_file(tmp_path):
    m = _graph()
    m.metadata_props.add(key="segfast.output", value="probs")
    with pytest.raises(InputError, match="exported with output='probs', not 'mask'"):
        TR.write_triton_repo(m, tmp_path, "m", output="mask")


@pytest.mark.parametrize("name", ["", "a/b", "..", ".hidden", "-x", "has space", "a\\b"])
def test_bad_names_are_refused(tmp_path, name):
    with pytest.raises(InputError, match="model name"):
        TR.write_triton_repo(_graph(), tmp_path / "repo", name)
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize(
    ("ref", "name"),
    [
        ("unet", "unet"),
        ("deeplabv3plus", "deeplabv3plus"),
        ("models/my_net.py:build", "build"),
        ("pkg.mod:make net", "make_net"),
        ("engines/unet.fp16.segfast", "unet.fp16"),
    ],
)
def test_default_names(ref, name):
    assert TR.default_name(ref) == name
    assert TR.check_name(name) == name


def test_existing_folder_needs_force(tmp_path):
    first = TR.write_triton_repo(_graph(), tmp_path, "m", max_batch_size=2)
    before = {p: p.read_bytes() for p in first.path.rglob("*") if p.is_file()}
    with pytest.raises(InputError, match="exists and is not empty; pass --force"):
        TR.write_triton_repo(_graph(), tmp_path, "m", max_batch_size=8)
    assert {p: p.read_bytes() for p in first.path.rglob("*") if p.is_file()} == before
    again = TR.write_triton_repo(_graph(), tmp_path, "m", max_batch_size=8, force=True)
    assert again.replaced
    assert parse_config(again.config).max_batch_size == 8
    assert sorted(os.listdir(tmp_path)) == ["m"]  # the old folder is gone, nothing beside


def test_empty_folder_is_filled_and_a_file_is_refused(tmp_path):
    (tmp_path / "m").mkdir()
    assert TR.write_triton_repo(_graph(), tmp_path, "m").config.is_file()
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        TR.write_triton_repo(_graph(), tmp_path, "f", force=True)


def test_an_error_mid_write_leaves_nothing(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(TR, "_build_plan", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        TR.write_triton_repo(_graph(), tmp_path / "repo", "m")
    assert not (tmp_path / "repo").exists()
    first = TR.write_triton_repo(_graph(), tmp_path, "m", plan=False)
    before = first.config.read_text()
    with pytest.raises(RuntimeError, match="disk full"):
        TR.write_triton_repo(_graph(), tmp_path, "m", max_batch_size=4, force=True)
    assert first.config.read_text() == before
    assert sorted(os.listdir(tmp_path)) == ["m"]


@no_trt
def test_no_plan_without_tensorrt(tmp_path):
    repo = TR.write_triton_repo(_graph(), tmp_path, "m", max_batch_size=2)
    assert repo.plan is None
    assert "not built: TensorRT cannot build here" in repo.plan_note
    assert not (repo.path / "1" / "model.plan").exists()


def test_plan_is_built_beside_the_onnx_file_where_tensorrt_builds(tmp_path, monkeypatch):
    """The call into build_engine, with a stand-in for TensorRT (the real build runs only
    where TensorRT is installed: tests/export/test_tensorrt_gpu.py)."""
    calls = []

    class Built:
        class meta:
            tensorrt_version = "10.8.0.43"

        seconds = 1.0

    def build_engine(onnx_path, plan_path, **kw):
        calls.append((Path(onnx_path).name, Path(plan_path).name, kw))
        assert Path(onnx_path).is_file()
        Path(plan_path).write_bytes(b"plan")
        return Built()

    monkeypatch.setattr(TR.tensorrt, "build_engine", build_engine)
    repo = TR.write_triton_repo(_graph(fp16=True), tmp_path, "m", max_batch_size=4)
    assert calls == [("model.onnx", "model.plan", {"precision": "fp16", "max_batch": 4})]
    assert repo.plan == repo.path / "1" / "model.plan"
    assert repo.plan.read_bytes() == b"plan"
    assert "tensorrt_plan" in repo.plan_note
    assert parse_config(repo.config).default_model_filename == "model.onnx"

    def unavailable(*args, **kw):
        raise BackendUnavailable("TensorRT needs a CUDA GPU; PyTorch sees none here")

    monkeypatch.setattr(TR.tensorrt, "build_engine", unavailable)
    repo = TR.write_triton_repo(_graph(), tmp_path, "n")
    assert repo.plan is None
    assert "PyTorch sees none here" in repo.plan_note


# ---- segfast export --format triton, end to end ----------------------------------------


def test_cli_zoo_model_static_logits(tmp_path, capsys):
    """`segfast export unet --format triton -o repo/`: static batch, logits, fp32."""
    repo = tmp_path / "repo"
    argv = ["export", *UNET, "--size", "37x45", "--format", "triton", "-o", str(repo)]
    torch.manual_seed(7)
    assert main(argv) == 0
    text = capsys.readouterr().out
    model_dir = repo / "unet"
    assert f"wrote Triton model repository {repo}: model 'unet'" in text
    assert f"{model_dir / 'config.pbtxt'}  platform onnxruntime_onnx, max_batch_size 0" in text
    assert "config input  input    TYPE_FP32  dims [1, 1, 37, 45]" in text
    if not HAS_TRT:
        assert "model.plan  not built: TensorRT cannot build here" in text
    cfg = parse_config(model_dir / "config.pbtxt")
    assert (cfg.name, cfg.max_batch_size) == ("unet", 0)
    assert params(cfg)["segfast_output"] == "logits"

    torch.manual_seed(7)  # the same weights as the command's model
    model = build_from_reference("unet", num_classes=None, in_channels=None, tiny=True, base=4)
    x = torch.randn(1, 1, 37, 45)
    (out,) = run_as_triton(model_dir, [x.numpy()]).values()
    with torch.no_grad():
        ref = model.eval()(x)
    acc = compare(torch.from_numpy(out), ref)
    assert acc.finite, acc
    assert acc.rel_l2 <= FP32_MAX_REL, acc


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> tuple[segfast.Engine, Path]:
    """A batch-dynamic mask engine (torch backend, CPU) and the file it was saved to."""
    torch.manual_seed(0)
    model = segfast.models.create("unet", tiny=True, base=4)
    eng = segfast.compile(
        model, torch.randn(1, 1, 32, 40), backend="torch", output="mask", dynamic=("batch",)
    )
    return eng, eng.save(tmp_path_factory.mktemp("engine") / "seg.segfast")


def test_cli_engine_file_batch_dynamic_mask(engine, tmp_path, capsys):
    eng, path = engine
    repo = tmp_path / "repo"
    argv = ["export", str(path), "--format", "triton", "-o", str(repo)]
    assert main([*argv, "--max-batch-size", "4", "--max-queue-delay-us", "100"]) == 0
    text = capsys.readouterr().out
    assert "max_batch_size 4, dynamic_batching" in text
    assert "config output mask     TYPE_UINT8 dims [32, 40] (+ batch 1..4)" in text
    assert "ONNX Runtime vs the engine at 1×1×32×40: rel-L2 0" in text
    model_dir = repo / "seg"  # the engine file's stem
    cfg = parse_config(model_dir / "config.pbtxt")
    assert cfg.max_batch_size == 4
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 100
    assert [list(t.dims) for t in cfg.input] == [[1, 32, 40]]
    assert params(cfg)["segfast_output"] == "mask"

    for batch in (1, 2):
        x = torch.randn(batch, 1, 32, 40)
        (out,) = run_as_triton(model_dir, [x.numpy()]).values()
        acc = compare(torch.from_numpy(out), eng(x))
        assert acc.mask_agreement >= MIN_MASK_AGREEMENT, (batch, acc)

    # the same folder again, without --force: refused before any work, untouched
    before = {p: p.read_bytes() for p in model_dir.rglob("*") if p.is_file()}
    assert main(argv) == 2
    assert "exists and is not empty; pass --force" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in model_dir.rglob("*") if p.is_file()} == before


def test_cli_refusals(engine, tmp_path, capsys):
    _, engine_file = engine
    repo = tmp_path / "repo"
    base = ["export", "--format", "triton", "-o", str(repo)]

    assert main([*base, *UNET, "--name", "a/b"]) == 2
    assert "model name 'a/b' must not contain '/'" in capsys.readouterr().err

    corrupt = tmp_path / "bad.segfast"
    corrupt.write_bytes(engine_file.read_bytes()[:1000])
    assert main([*base, str(corrupt)]) == 2
    assert "not a readable engine file" in capsys.readouterr().err

    assert main([*base, str(tmp_path / "missing.segfast")]) == 2
    assert "does not exist" in capsys.readouterr().err

    assert main([*base, str(engine_file), "--tiny"]) == 2
    assert "is an engine file, built already: --tiny" in capsys.readouterr().err

    assert main([*base, str(engine_file), "--output", "logits"]) == 2
    assert "built with --output mask" in capsys.readouterr().err

    assert main([*base, *UNET, "--dynamic-batch", "--max-batch-size", "0"]) == 2
    assert "--max-batch-size must be >= 1, got 0" in capsys.readouterr().err

    assert main([*base, *UNET, "--max-batch-size", "4"]) == 2
    assert "need a batch-dynamic export (--dynamic-batch)" in capsys.readouterr().err

    assert main(["export", *UNET, "-o", str(tmp_path / "m.onnx"), "--name", "x"]) == 2
    assert "--name: for --format triton only" in capsys.readouterr().err
    assert not repo.exists()
    assert not (tmp_path / "m.onnx").exists()
