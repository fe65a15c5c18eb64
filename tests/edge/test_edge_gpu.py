"""EdgeEngine end to end: a plan built by segfast, run torch-free on frames (GPU, TensorRT
and cuda-python only; skipped with the reason elsewhere).

Not yet run: TensorRT cannot be installed on this project's machines (see README)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import segfast
from segfast.edge import reference as R
from segfast.kernels.preprocess import preprocess_reference

pytestmark = pytest.mark.gpu
pytest.importorskip("tensorrt", reason="TensorRT is not installed (NVIDIA's tensorrt package)")
pytest.importorskip("cuda.bindings", reason="cuda-python (segfast[edge]) is not installed")

from segfast.edge import EdgeEngine  # noqa: E402
from segfast.export.tensorrt import build_engine  # noqa: E402

CSRC = Path(__file__).resolve().parents[2] / "csrc"


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    model = segfast.models.create("fcn", tiny=True).eval().cuda()
    path = tmp_path_factory.mktemp("edge") / "m.plan"
    x = torch.randn(1, 3, 64, 64, device="cuda")
    build_engine(model, path, precision="fp16", example_input=x, output="mask")
    return path, model


def _torch_mask(model, frame_bgr):
    x = preprocess_reference(torch.from_numpy(frame_bgr), (64, 64)).cuda()
    with torch.no_grad():
        return model(x).argmax(1)[0].to(torch.uint8).cpu().numpy()


def test_bgr_frame(plan):
    path, model = plan
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    with EdgeEngine(path) as engine:
        result = engine.run(frame)
    assert result.output.shape == (64, 64)
    assert (result.output == _torch_mask(model, frame)).mean() >= 0.99  # fp16 engine
    palette = R.default_palette(model.num_classes)
    np.testing.assert_array_equal(result.overlay, R.overlay(frame, result.output, palette))


def test_nv12_frame_and_cubins(plan, tmp_path):
    path, model = plan
    subprocess.run(["make", "-C", str(CSRC), f"BUILD={tmp_path}"], check=True)
    rng = np.random.default_rng(1)
    y = rng.integers(0, 256, (120, 160), dtype=np.uint8)
    uv = rng.integers(0, 256, (60, 80, 2), dtype=np.uint8)
    with EdgeEngine(path, kernels=tmp_path) as engine:
        result = engine.run((y, uv))
    bgr = R.nv12_to_bgr(y, uv)
    assert (result.output == _torch_mask(model, bgr)).mean() >= 0.99
    palette = R.default_palette(model.num_classes)
    np.testing.assert_array_equal(result.overlay, R.overlay_nv12(y, uv, result.output, palette))


def test_runs_without_torch(plan):
    path, _ = plan
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from segfast.edge import EdgeEngine\n"
        f"with EdgeEngine({str(path)!r}) as e:\n"
        "    r = e.run(np.zeros((90, 70, 3), np.uint8))\n"
        "print(r.output.shape, r.overlay.shape)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "(64, 64) (90, 70, 3)"
