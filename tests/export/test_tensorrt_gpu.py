"""TensorRT builds and runs (GPU + TensorRT only; skipped with the reason elsewhere).

Not yet run: TensorRT cannot be installed on this project's machines (see README)."""

from __future__ import annotations

import pytest
import torch

import segfast
from segfast.edge import sidecar as S
from segfast.errors import EngineFileError
from segfast.testing import assert_rel_l2

pytestmark = pytest.mark.gpu
trt = pytest.importorskip(
    "tensorrt", reason="TensorRT is not installed (NVIDIA's tensorrt package; needs a GPU)"
)

from segfast.export import tensorrt as T  # noqa: E402  (after the skip)


def _model(name="fcn"):
    return segfast.models.create(name, tiny=True).eval().cuda()


def test_fp32_static_plan_matches_eager(tmp_path):
    model = _model()
    x = torch.randn(1, 3, 64, 64, device="cuda")
    result = T.build_engine(
        model, tmp_path / "m.plan", example_input=x, timing_cache=tmp_path / "t.cache"
    )
    assert not result.cache_hit
    assert (tmp_path / "t.cache").stat().st_size > 0
    assert result.meta.tensorrt_version == trt.__version__
    runner = T.load_engine(tmp_path / "m.plan")
    with torch.no_grad():
        want = model(x)
    assert_rel_l2(runner(x).float(), want, 1e-4)


def test_fp16_dynamic_mask_plan_at_another_size(tmp_path):
    model = _model("unet")
    x = torch.randn(1, model.in_channels, 64, 64, device="cuda")
    T.build_engine(
        model,
        tmp_path / "m.plan",
        precision="fp16",
        example_input=x,
        output="mask",
        dynamic=True,
        min_size=(32, 32),
        max_size=(128, 128),
    )
    runner = T.load_engine(tmp_path / "m.plan")
    y = torch.randn(1, model.in_channels, 96, 80, device="cuda")
    with torch.no_grad():
        want = model(y).argmax(1).to(torch.uint8)
    got = runner(y.half())
    assert got.shape == want.shape
    assert (got == want).float().mean().item() >= 0.995


def test_engine_cache_hits_and_tampering_is_refused(tmp_path):
    model = _model()
    x = torch.randn(1, 3, 64, 64, device="cuda")
    cache = tmp_path / "cache"
    first = T.build_engine(model, tmp_path / "a.plan", example_input=x, cache_dir=cache)
    second = T.build_engine(model, tmp_path / "b.plan", example_input=x, cache_dir=cache)
    assert (first.cache_hit, second.cache_hit) == (False, True)
    assert first.meta.plan_sha256 == second.meta.plan_sha256
    data = (tmp_path / "b.plan").read_bytes()
    (tmp_path / "b.plan").write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(EngineFileError, match="sha256"):
        T.load_engine(tmp_path / "b.plan")
    meta, _ = S.read_plan(tmp_path / "a.plan")
    assert meta.cache_key == first.meta.cache_key


def test_compile_backend_passes_the_accuracy_check():
    model = _model()
    x = torch.randn(1, 3, 64, 64, device="cuda")
    engine = segfast.compile(model, x, backend="tensorrt")
    report = segfast.check(engine, model, [(x,)])
    assert report.passed, report.reason
