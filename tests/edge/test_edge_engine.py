"""EdgeEngine's checks that run before CUDA or TensorRT is touched (CPU, no GPU): a plan
with a missing, malformed or mismatched sidecar, or one the edge pipeline cannot drive,
is refused before cuda-python is even imported. The GPU runs are in test_edge_gpu.py."""

from __future__ import annotations

import pytest

from segfast.edge import EdgeEngine
from segfast.edge import kernels as K
from segfast.edge import sidecar as S
from segfast.errors import EngineFileError, InputError

PROFILE = S.Profile.fixed((1, 3, 64, 64))


def _plan(tmp_path, inputs=None, outputs=None):
    data = b"plan bytes" * 10
    doc = S.make_sidecar(
        plan_data=data,
        tensorrt_version="10.8.0.43",
        strongly_typed=True,
        capability=(8, 7),
        gpu_name="Orin",
        precision="fp16",
        inputs=inputs or [S.TensorSpec("input", "float16", (1, 3, 64, 64), PROFILE)],
        outputs=outputs or [S.TensorSpec("mask", "uint8", (1, 64, 64))],
        onnx_sha256="cd" * 32,
        opset=18,
        output="mask",
        threshold=0.5,
        preprocess={},
        segfast_version="0.1.0",
        cuda={},
        builder={},
    )
    path = tmp_path / "m.plan"
    S.write_plan(path, data, doc)
    return path, data


@pytest.fixture(autouse=True)
def no_cuda(monkeypatch):
    def refuse():
        raise AssertionError("touched CUDA before the files were checked")

    monkeypatch.setattr(K, "cuda_bindings", refuse)


def test_tampered_plan(tmp_path):
    path, data = _plan(tmp_path)
    path.write_bytes(data.replace(b"plan", b"PLAN", 1))
    with pytest.raises(EngineFileError, match="does not match its sidecar"):
        EdgeEngine(path)


def test_missing_or_malformed_sidecar(tmp_path):
    path, _ = _plan(tmp_path)
    side = S.sidecar_path(path)
    side.write_text("{")
    with pytest.raises(EngineFileError, match="not valid JSON"):
        EdgeEngine(path)
    side.unlink()
    with pytest.raises(EngineFileError, match="is missing"):
        EdgeEngine(path)


def test_plans_the_pipeline_cannot_drive(tmp_path):
    two = [
        S.TensorSpec("z", "float32", (1, 8, 1, 1), S.Profile.fixed((1, 8, 1, 1))),
        S.TensorSpec("labels", "int64", (1,), S.Profile.fixed((1,))),
    ]
    path, _ = _plan(tmp_path, inputs=two)
    with pytest.raises(InputError, match="single-input"):
        EdgeEngine(path)
    vec = [S.TensorSpec("input", "float32", (1, 3), S.Profile.fixed((1, 3)))]
    path, _ = _plan(tmp_path, inputs=vec)
    with pytest.raises(InputError, match=r"\[N, 1 or 3, H, W\] image input"):
        EdgeEngine(path)


def test_bad_nv12_matrix(tmp_path):
    path, _ = _plan(tmp_path)
    with pytest.raises(ValueError, match="matrix/color_range"):
        EdgeEngine(path, matrix="bt2020")
