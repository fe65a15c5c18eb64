"""segfast.export.tensorrt, the tensorrt backend and `segfast build` — everything before
the first TensorRT call, on the CPU, without TensorRT: profile resolution, ONNX reading,
the engine cache's key, and the refusals of load_engine before any deserialisation (with
the TensorRT-version and compute-capability probes monkeypatched). The TensorRT runs are
in test_tensorrt_gpu.py (skipped without TensorRT)."""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json

import numpy as np
import pytest
import torch

import segfast
from segfast.backends import available
from segfast.edge import sidecar as S
from segfast.errors import BackendUnavailable, EngineFileError, InputError
from segfast.export import tensorrt as T

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
no_trt = pytest.mark.skipif(HAS_TRT, reason="checks the behaviour without TensorRT")
TRT_VERSION = "10.8.0.43"
CAP = (8, 7)


# ---- profiles --------------------------------------------------------------------------


def _in(name="input", dims=(1, 3, None, None), dtype="float32"):
    return T.OnnxInput(name, dims, dtype)


def test_static_inputs_get_fixed_profiles():
    profs = T.resolve_profiles([_in(dims=(1, 3, 64, 96))])
    assert profs == {"input": S.Profile.fixed((1, 3, 64, 96))}


def test_dynamic_defaults_and_overrides():
    opt = {"input": (1, 3, 64, 96)}
    assert T.resolve_profiles([_in()], opt)["input"] == S.Profile(
        (1, 3, 32, 48), (1, 3, 64, 96), (1, 3, 128, 192)
    )
    got = T.resolve_profiles([_in()], opt, min_size=(16, 16), max_size=(256, 512))["input"]
    assert got == S.Profile((1, 3, 16, 16), (1, 3, 64, 96), (1, 3, 256, 512))
    # dynamic batch: 1 … max_batch
    dyn_batch = T.resolve_profiles(
        [_in(dims=(None, 3, 64, 64))], {"input": (2, 3, 64, 64)}, max_batch=8
    )
    assert dyn_batch["input"] == S.Profile((1, 3, 64, 64), (2, 3, 64, 64), (8, 3, 64, 64))
    # the exporter's proven ranges bound the defaults (PSPNet-like: H, W ≥ 9)
    ranged = T.resolve_profiles(
        [_in()], {"input": (1, 3, 12, 12)}, ranges={"height": (9, 100), "width": (9, 20)}
    )
    assert ranged["input"] == S.Profile((1, 3, 9, 9), (1, 3, 12, 12), (1, 3, 24, 20))
    explicit = T.resolve_profiles(
        [_in(), _in("labels", (None,), "int64")],
        opt,
        {"labels": ((1,), (1,), (4,))},
    )
    assert explicit["labels"] == S.Profile((1,), (1,), (4,))


def test_profile_errors_name_the_input_and_the_problem():
    with pytest.raises(InputError, match="give an example input"):
        T.resolve_profiles([_in()])
    with pytest.raises(InputError, match="does not fit its ONNX shape"):
        T.resolve_profiles([_in()], {"input": (1, 4, 64, 64)})
    with pytest.raises(InputError, match="unknown inputs"):
        T.resolve_profiles([_in()], profiles={"x": ((1,), (1,), (1,))})
    with pytest.raises(InputError, match="does not fit its ONNX"):  # changes a static dim
        T.resolve_profiles([_in()], profiles={"input": ((1, 4, 8, 8), (1, 4, 8, 8), (1, 4, 8, 8))})
    with pytest.raises(InputError, match="min ≤ opt ≤ max"):
        T.resolve_profiles([_in()], {"input": (1, 3, 64, 64)}, min_size=(100, 100))
    with pytest.raises(InputError, match="reaches outside 9…100"):
        T.resolve_profiles(
            [_in()], {"input": (1, 3, 64, 64)}, min_size=(4, 9), ranges={"height": (9, 100)}
        )
    with pytest.raises(InputError, match="must be a Profile"):
        T.resolve_profiles([_in()], profiles={"input": 5})


# ---- ONNX files --------------------------------------------------------------------------


def _onnx_file(path, *, dtype="float32", metadata=None):
    onnx = pytest.importorskip("onnx", reason="the onnx package (segfast[onnx]) reads ONNX files")
    from onnx import TensorProto, helper

    et = TensorProto.FLOAT16 if dtype == "float16" else TensorProto.FLOAT
    x = helper.make_tensor_value_info("input", et, [1, 3, "height", "width"])
    y = helper.make_tensor_value_info("logits", et, [1, 3, "height", "width"])
    w = helper.make_tensor("w", et, [1], [1.0])
    graph = helper.make_graph(
        [helper.make_node("Mul", ["input", "w"], ["logits"])], "g", [x], [y], [w]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    for k, v in (metadata or {}).items():
        e = model.metadata_props.add()
        e.key, e.value = k, v
    onnx.save(model, str(path))
    return path


def test_onnx_inputs_skip_initializers_and_mark_dynamic_dims(tmp_path):
    f = _onnx_file(tmp_path / "m.onnx")
    assert T.onnx_inputs(f) == [T.OnnxInput("input", (1, 3, None, None), "float32")]


def test_onnx_source_reads_segfast_metadata(tmp_path):
    meta = {
        "segfast.output": "mask",
        "segfast.threshold": "0.25",
        "segfast.num_classes": "3",
        "segfast.dynamic_ranges": json.dumps({"height": [9, 4096], "width": [9, 4096]}),
    }
    f = _onnx_file(tmp_path / "m.onnx", metadata=meta)
    src = T.onnx_source(f, input_shape=(1, 3, 64, 64))
    assert (src.output, src.threshold, src.num_classes, src.opset) == ("mask", 0.25, 3, 18)
    assert src.ranges == {"height": (9, 4096), "width": (9, 4096)}
    assert src.opt_shapes == {"input": (1, 3, 64, 64)}
    with pytest.raises(InputError, match="exported with output='mask', not 'logits'"):
        T.onnx_source(f, output="logits")
    plain = T.onnx_source(_onnx_file(tmp_path / "p.onnx"))  # not from segfast: defaults
    assert (plain.output, plain.threshold, plain.num_classes, plain.ranges) == (
        "logits",
        0.5,
        None,
        {},
    )
    with pytest.raises(InputError, match="no such ONNX file"):
        T.onnx_source(tmp_path / "missing.onnx")


def test_precision_must_match_the_graph(tmp_path):
    f16 = T.onnx_inputs(_onnx_file(tmp_path / "h.onnx", dtype="float16"))
    T.check_precision(f16, "fp16", "h.onnx")
    with pytest.raises(InputError, match="needs a float32 graph"):
        T.check_precision(f16, "fp32", "h.onnx")
    T.check_precision([_in("labels", (1,), "int64")], "fp16", "x")  # integer inputs: any


def test_the_same_model_exports_to_the_same_cache_key(tmp_path):
    """The engine cache can only hit if exporting a model twice gives the same bytes."""
    pytest.importorskip("onnxscript", reason="the ONNX exporter (segfast[onnx])")
    model = segfast.models.create("fcn", tiny=True).eval()
    x = torch.randn(1, 3, 32, 32)
    keys = []
    for i in range(2):
        src = T.export_source(
            model, tmp_path / str(i), precision="fp32", example_input=x, output="mask", check=False
        )
        profs = T.resolve_profiles(src.inputs, src.opt_shapes, ranges=src.ranges)
        assert profs == {"input": S.Profile.fixed((1, 3, 32, 32))}
        assert (src.output, src.num_classes) == ("mask", model.num_classes)
        keys.append(
            S.cache_key(
                onnx_sha256=hashlib.sha256(src.path.read_bytes()).hexdigest(),
                profiles=profs,
                precision="fp32",
                tensorrt_version=TRT_VERSION,
                capability=CAP,
            )
        )
    assert keys[0] == keys[1]


# ---- load_engine: refusals before deserialisation -----------------------------------------


class FakeSession:
    def __init__(self, plan, meta):
        self.plan, self.meta = plan, meta


@pytest.fixture
def fake_plan(tmp_path, monkeypatch):
    """A plan file TensorRT never sees: probes and deserialiser replaced, calls recorded."""
    data = b"\x00fake engine bytes" * 64
    doc = S.make_sidecar(
        plan_data=data,
        tensorrt_version=TRT_VERSION,
        strongly_typed=True,
        capability=CAP,
        gpu_name="Orin",
        precision="fp16",
        inputs=[S.TensorSpec("input", "float16", (1, 3, 64, 64), S.Profile.fixed((1, 3, 64, 64)))],
        outputs=[S.TensorSpec("mask", "uint8", (1, 64, 64))],
        onnx_sha256="ab" * 32,
        opset=18,
        output="mask",
        threshold=0.5,
        preprocess={},
        segfast_version=segfast.__version__,
        cuda={},
        builder={},
    )
    path = tmp_path / "m.plan"
    S.write_plan(path, data, doc)
    calls = []
    monkeypatch.setattr(T, "_tensorrt_version", lambda: TRT_VERSION)
    monkeypatch.setattr(T, "_capability", lambda device: CAP)
    monkeypatch.setattr(T, "_cuda_device", lambda device: torch.device("cuda", 0))

    def deserialize(plan, meta, device):
        calls.append(plan)
        return FakeSession(plan, meta)

    monkeypatch.setattr(T, "_deserialize", deserialize)
    return path, data, calls


def test_load_engine_deserialises_a_verified_plan(fake_plan):
    path, data, calls = fake_plan
    runner = T.load_engine(path)
    assert calls == [data]
    assert runner.meta.output == "mask"
    assert runner.input_dtypes == [torch.float16]


@pytest.mark.parametrize(
    ("spoil", "match"),
    [
        ("tamper", "sha256 .* does not match"),
        ("truncate", "truncated"),
        ("no_sidecar", "sidecar m.plan.json is missing"),
        ("bad_json", "not valid JSON"),
        ("trt_version", "built with TensorRT 10.8.0.43, this machine has TensorRT 11.0"),
        ("capability", "compute capability 8.7 .*this GPU is 9.0"),
    ],
)
def test_load_engine_refuses_before_deserialising(fake_plan, monkeypatch, spoil, match):
    path, data, calls = fake_plan
    side = S.sidecar_path(path)
    if spoil == "tamper":
        path.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    elif spoil == "truncate":
        path.write_bytes(data[:-1])
    elif spoil == "no_sidecar":
        side.unlink()
    elif spoil == "bad_json":
        side.write_text(side.read_text()[:-20])
    elif spoil == "trt_version":
        monkeypatch.setattr(T, "_tensorrt_version", lambda: "11.0.0.9")
    elif spoil == "capability":
        monkeypatch.setattr(T, "_capability", lambda device: (9, 0))
    with pytest.raises(EngineFileError, match=match):
        T.load_engine(path)
    assert calls == []


def test_integrity_is_checked_before_the_machine_is_probed(fake_plan, monkeypatch):
    path, data, _ = fake_plan

    def no_probe(*args):
        raise AssertionError("probed the machine before checking the files")

    for probe in ("_tensorrt_version", "_capability", "_cuda_device"):
        monkeypatch.setattr(T, probe, no_probe)
    path.write_bytes(data[::-1])
    with pytest.raises(EngineFileError):
        T.load_engine(path)


# ---- TensorRTRunner with a stand-in session ----------------------------------------------


class RecordingSession:
    def __init__(self, meta):
        self.meta = meta
        self.inputs, self.outputs, self.streams = [], [], []

    def set_input(self, name, shape, ptr):
        self.meta.input(name).profile.check(name, shape)
        self.inputs.append((name, shape))

    def output_shape(self, name):
        n, _, h, w = self.inputs[-1][1]
        return (n, h, w)

    def set_output(self, name, ptr):
        self.outputs.append((name, ptr))

    def execute(self, stream):
        self.streams.append(stream)


def _runner(reuse):
    prof = S.Profile((1, 3, 16, 16), (1, 3, 32, 32), (2, 3, 64, 64))
    meta = S.PlanMeta(
        plan_sha256="0" * 64,
        plan_bytes=1,
        tensorrt_version=TRT_VERSION,
        capability=CAP,
        gpu_name="x",
        precision="fp32",
        inputs=(S.TensorSpec("input", "float32", (-1, 3, -1, -1), prof),),
        outputs=(S.TensorSpec("mask", "uint8", (-1, -1, -1)),),
        onnx_sha256="0" * 64,
        output="mask",
        cache_key="k",
    )
    runner = T.TensorRTRunner(RecordingSession(meta), torch.device("cpu"), reuse_outputs=reuse)
    runner._stream_handle = lambda: 1234  # no CUDA here: the stand-in records the handle
    return runner


def test_runner_binds_inputs_and_reuses_outputs_per_shape():
    runner = _runner(reuse=True)
    a = runner(torch.zeros(1, 3, 32, 32))
    b = runner(torch.zeros(1, 3, 32, 32))
    c = runner(torch.zeros(2, 3, 16, 40))
    assert a is b
    assert c is not a
    assert (tuple(a.shape), a.dtype, tuple(c.shape)) == ((1, 32, 32), torch.uint8, (2, 16, 40))
    assert runner.session.streams == [1234] * 3
    assert runner(torch.zeros(1, 3, 32, 32)) is a
    fresh = _runner(reuse=False)
    assert fresh(torch.zeros(1, 3, 32, 32)) is not fresh(torch.zeros(1, 3, 32, 32))


def test_runner_checks_inputs():
    runner = _runner(reuse=True)
    with pytest.raises(InputError, match="takes 1 input"):
        runner()
    with pytest.raises(InputError, match=r"must be torch\.float32, got torch\.float16"):
        runner(torch.zeros(1, 3, 32, 32, dtype=torch.float16))
    with pytest.raises(InputError, match=r"between \[1, 3, 16, 16\] and \[2, 3, 64, 64\]"):
        runner(torch.zeros(1, 3, 65, 32))
    with pytest.raises(InputError, match="must be on cpu"):
        runner(torch.zeros(1, 3, 32, 32, device="meta"))


# ---- without TensorRT ------------------------------------------------------------------


@no_trt
def test_backend_says_why_it_is_unavailable():
    ok, why = available("tensorrt", "cuda")
    assert not ok
    assert why.startswith("TensorRT is not installed")
    with pytest.raises(BackendUnavailable, match="TensorRT is not installed"):
        segfast.compile(
            segfast.models.create("fcn", tiny=True), input_shape=(1, 3, 32, 32), backend="tensorrt"
        )


@no_trt
def test_build_engine_stops_before_exporting(tmp_path, monkeypatch):
    monkeypatch.setattr(
        T, "export_source", lambda *a, **k: pytest.fail("exported without TensorRT")
    )
    with pytest.raises(BackendUnavailable, match="TensorRT is not installed"):
        T.build_engine(segfast.models.create("fcn", tiny=True), tmp_path / "m.plan")
    assert list(tmp_path.iterdir()) == []


def _build_args(*argv):
    from segfast.commands import build

    parser = argparse.ArgumentParser()
    build.register(parser.add_subparsers(dest="command"))
    return build, parser.parse_args(["build", *argv])


def test_build_command_arguments():
    _, args = _build_args(
        "unet",
        "--tiny",
        "-o",
        "u.plan",
        "--option",
        "base=8",
        "--precision",
        "fp16",
        "--dynamic",
        "--min-size",
        "64x96",
    )
    assert (args.out, args.option, args.precision, args.dynamic) == (
        "u.plan",
        [("base", 8)],
        "fp16",
        True,
    )
    assert args.min_size == (64, 96)
    assert (args.backend, args.head, args.workspace) == ("tensorrt", "logits", 1024)
    build, args = _build_args("fcn", "-o", "f.plan", "--max-size", "512x512")
    with pytest.raises(InputError, match="need --dynamic"):
        build.run(args)


@no_trt
def test_build_command_fails_clearly_without_tensorrt(tmp_path):
    build, args = _build_args("fcn", "--tiny", "-o", str(tmp_path / "f.plan"))
    with pytest.raises(
        BackendUnavailable, match=r"segfast build --backend tensorrt: TensorRT is not installed"
    ):
        build.run(args)
    assert list(tmp_path.iterdir()) == []


def test_preprocess_metadata_is_validated():
    meta = T._preprocess_meta({"mean": (0.5, 0.5, 0.5), "input_order": "rgb"})
    assert meta == {
        "mean": [0.5] * 3,
        "std": [0.229, 0.224, 0.225],
        "input_order": "rgb",
        "align_corners": False,
    }
    with pytest.raises(ValueError, match="unknown preprocess keys"):
        T._preprocess_meta({"scale": 1})
    with pytest.raises(ValueError, match="non-zero"):
        T._preprocess_meta({"std": (1, 0, 1)})
    assert np.allclose(T._preprocess_meta(None)["mean"], [0.485, 0.456, 0.406])


# ---- the engine cache ---------------------------------------------------------------------


def _cached(cache, data=b"cached engine" * 20):
    doc = S.make_sidecar(
        plan_data=data,
        tensorrt_version=TRT_VERSION,
        strongly_typed=True,
        capability=CAP,
        gpu_name="Orin",
        precision="fp32",
        inputs=[S.TensorSpec("input", "float32", (1, 3, 8, 8), S.Profile.fixed((1, 3, 8, 8)))],
        outputs=[S.TensorSpec("logits", "float32", (1, 2, 8, 8))],
        onnx_sha256="ef" * 32,
        opset=18,
        output="logits",
        threshold=0.5,
        preprocess=T._preprocess_meta(None),
        segfast_version="0.1.0",
        cuda={},
        builder={"workspace": 1},
    )
    S.write_plan(cache / f"{doc['cache_key']}.plan", data, doc)
    return doc["cache_key"], data


def test_cache_hit_copies_a_verified_plan_with_this_builds_preprocessing(tmp_path):
    key, data = _cached(tmp_path / "cache")
    notes = []
    pre = T._preprocess_meta({"input_order": "rgb"})
    meta = T._from_cache(tmp_path / "cache", key, tmp_path / "m.plan", TRT_VERSION, CAP, pre, notes)
    assert meta is not None
    assert (tmp_path / "m.plan").read_bytes() == data
    loaded, _ = S.load_verified(tmp_path / "m.plan", tensorrt_version=TRT_VERSION, capability=CAP)
    assert loaded.cache_key == key
    assert loaded.preprocess["input_order"] == "rgb"
    assert notes == [f"engine cache hit: {tmp_path / 'cache' / (key + '.plan')}"]
    # a key with no entry: a miss, nothing written
    assert (
        T._from_cache(tmp_path / "cache", "0" * 64, tmp_path / "n.plan", TRT_VERSION, CAP, pre, [])
        is None
    )
    assert not (tmp_path / "n.plan").exists()


@pytest.mark.parametrize("spoil", ["tamper", "trt_version", "key"])
def test_bad_cache_entries_are_reported_and_rebuilt(tmp_path, spoil):
    key, data = _cached(tmp_path / "cache")
    entry = tmp_path / "cache" / f"{key}.plan"
    version = TRT_VERSION
    if spoil == "tamper":
        entry.write_bytes(data[::-1])
    elif spoil == "trt_version":
        version = "10.9.0.34"
    else:  # an entry filed under another key
        entry.rename(tmp_path / "cache" / f"{'1' * 64}.plan")
        S.sidecar_path(entry).rename(tmp_path / "cache" / f"{'1' * 64}.plan.json")
        key = "1" * 64
    notes = []
    with pytest.warns(UserWarning, match="engine cache entry refused"):
        got = T._from_cache(tmp_path / "cache", key, tmp_path / "m.plan", version, CAP, {}, notes)
    assert got is None
    assert not (tmp_path / "m.plan").exists()
    assert notes[0].startswith("engine cache entry refused")


def test_int8_builds_from_a_qdq_export(tmp_path):
    """TensorRT 11 takes int8 only from Q/DQ nodes: the int8 source is the Q/DQ export,
    an fp32 file is recognised as having none (the build refuses it before TensorRT)."""
    pytest.importorskip("onnxscript", reason="the ONNX exporter (segfast[onnx])")
    model = segfast.models.create("unet", tiny=True).eval()
    x = torch.randn(1, 1, 32, 32)
    layers = {n: 4.0 for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    src = T.export_source(
        model, tmp_path / "q", precision="int8", example_input=x, output="mask",
        int8_layers=layers, check=False,
    )  # fmt: skip
    assert T._has_qdq(src.path)
    T.check_precision(src.inputs, "int8", src.path.name)  # fp32 inputs, as int8 plans take
    plain = T.export_source(model, tmp_path / "f", precision="fp32", example_input=x, check=False)
    assert not T._has_qdq(plain.path)
    assert "int8" in S.PRECISIONS
