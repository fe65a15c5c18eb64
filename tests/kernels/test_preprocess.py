"""kernels/preprocess.py: fused frame preprocessing against its PyTorch reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segfast.kernels.preprocess import preprocess, preprocess_reference
from segfast.testing import assert_close, assert_low_precision_close, poison

DEV = "cuda" if torch.cuda.is_available() else "cpu"
CL = torch.channels_last
# Outputs are O(1) (|value| ≤ 2.7 with ImageNet statistics), computed in fp32 by both.
FP32 = {"atol": 1e-5, "rtol": 1e-5}
GRAY = {"mean": (0.5,), "std": (0.25,)}


def _frames(N, H, W, C=3, kind="contiguous"):
    """uint8 [N, H, W, C] frames: contiguous, a crop of a larger frame, or planar memory."""
    if kind == "contiguous":
        return torch.randint(0, 256, (N, H, W, C), dtype=torch.uint8, device=DEV)
    if kind == "crop":  # a window of a bigger frame with one extra (alpha) channel
        big = torch.randint(0, 256, (N, H + 9, W + 20, C + 1), dtype=torch.uint8, device=DEV)
        return big[:, 4 : 4 + H, 7 : 7 + W, :C]
    if kind == "planar":  # [N, C, H, W] memory seen as HWC: channel stride H·W
        return torch.randint(0, 256, (N, C, H, W), dtype=torch.uint8, device=DEV).permute(
            0, 2, 3, 1
        )
    raise ValueError(kind)


def _check(frames, size=None, **kw):
    """Kernel into a poisoned out= and into its own allocation vs the reference."""
    ref = preprocess_reference(frames, size, **kw)
    out = poison(torch.empty_like(ref))
    assert preprocess(frames, size, out=out, **kw) is out
    fresh = preprocess(frames, size, **kw)
    assert fresh.shape == ref.shape
    assert fresh.dtype == ref.dtype
    fmt = CL if kw.get("layout") == "nhwc" else torch.contiguous_format
    assert fresh.is_contiguous(memory_format=fmt)
    assert ref.is_contiguous(memory_format=fmt)
    if ref.dtype == torch.float32:
        assert_close(out, ref, **FP32)
    assert torch.equal(out, fresh)
    return out, ref


def _torch_chain(frames, size, dtype, input_order="bgr", mean=None, std=None):
    """The same chain written independently (reorder first, F.interpolate, normalise),
    every step in ``dtype``."""
    mean = (0.485, 0.456, 0.406) if mean is None else mean
    std = (0.229, 0.224, 0.225) if std is None else std
    if frames.dim() == 3:
        frames = frames[None]
    if input_order == "bgr":
        frames = frames[..., [2, 1, 0]]
    x = frames.permute(0, 3, 1, 2).to(dtype) / 255
    if size is not None:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    m = torch.tensor(mean, dtype=dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


@pytest.mark.parametrize("size", [None, (32, 48), (50, 70), (5, 3)], ids=str)
@pytest.mark.parametrize("input_order", ["bgr", "rgb"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_sizes_orders_layouts(size, input_order, layout):
    # 37×53 frames: downscale to 32×48 and 5×3, upscale to 50×70, or keep; batch 3 and 1.
    frames = _frames(3 if layout == "nchw" else 1, 37, 53)
    _check(frames, size, input_order=input_order, layout=layout)


def test_reference_matches_torch_chain():
    frames = _frames(2, 37, 53)
    for order in ("bgr", "rgb"):
        for size in (None, (32, 48), (50, 70)):
            want = _torch_chain(frames, size, torch.float32, order)
            assert_close(preprocess_reference(frames, size, input_order=order), want, **FP32)
    # the channel order really is swapped for BGR input
    rgb = preprocess_reference(frames, input_order="rgb")
    bgr = preprocess_reference(frames.flip(-1), input_order="bgr")
    assert torch.equal(rgb, bgr)


@pytest.mark.parametrize("kind", ["crop", "planar"])
def test_non_contiguous_frames(kind):
    frames = _frames(2, 37, 53, kind=kind)
    assert not frames.is_contiguous()
    _check(frames, (32, 48))
    _check(frames, None, layout="nhwc")


def test_single_frame_and_align_corners():
    frame = _frames(1, 37, 53)[0]  # [H, W, 3]
    out, _ = _check(frame, (32, 48), align_corners=True)
    assert out.shape == (1, 3, 32, 48)
    _check(frame, (50, 70), align_corners=True, input_order="rgb")


@pytest.mark.parametrize("shape", [(2, 37, 53), (2, 37, 53, 1), (37, 53)], ids=str)
def test_grayscale(shape):
    frames = torch.randint(0, 256, shape, dtype=torch.uint8, device=DEV)
    out, _ = _check(frames, (32, 48), **GRAY)
    assert out.shape == (shape[0] if len(shape) > 2 else 1, 1, 32, 48)
    x = frames.reshape(-1, 1, 37, 53).float() / 255
    want = (F.interpolate(x, size=(32, 48), mode="bilinear") - 0.5) / 0.25
    assert_close(out, want, **FP32)


@pytest.mark.parametrize("size", [None, (32, 48)], ids=str)
def test_fp16(size):
    frames = _frames(2, 37, 53)
    out, _ = _check(frames, size, dtype=torch.float16, layout="nhwc")
    ref32 = preprocess_reference(frames, size)
    assert_low_precision_close(out, ref32, _torch_chain(frames, size, torch.float16))


def test_out_channel_slice():
    """Write into channels [1:4] of a channels_last buffer (e.g. a concat with a prior)."""
    frames = _frames(2, 37, 53)
    buf = poison(torch.empty(2, 5, 32, 48, device=DEV, memory_format=CL))
    preprocess(frames, (32, 48), out=buf[:, 1:4])
    assert_close(buf[:, 1:4], preprocess_reference(frames, (32, 48)), **FP32)
    assert torch.isnan(buf[:, 0]).all()
    assert torch.isnan(buf[:, 4]).all()


def test_custom_statistics():
    frames = _frames(1, 37, 53)
    _check(frames, (32, 48), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    out, _ = _check(frames, None, mean=(0.1, 0.2, 0.3), std=(0.5, 2.0, 1.0), input_order="rgb")
    want = (frames[0, :, :, 1].float() / 255 - 0.2) / 2.0
    assert_close(out[0, 1], want, **FP32)


def test_empty_batch():
    frames = torch.zeros(0, 37, 53, 3, dtype=torch.uint8, device=DEV)
    assert preprocess(frames, (32, 48)).shape == (0, 3, 32, 48)


def test_errors():
    frames = _frames(1, 37, 53)
    with pytest.raises(TypeError, match=r"frames must be uint8, got torch\.float32"):
        preprocess(frames.float())
    with pytest.raises(ValueError, match=r"colour frames must be \[N, H, W, 3\]"):
        preprocess(_frames(1, 37, 53, C=4))
    with pytest.raises(ValueError, match=r"colour frames must be .* got \(37, 53\)"):
        preprocess(frames[0, :, :, 0])
    with pytest.raises(ValueError, match="grayscale frames"):
        preprocess(frames, **GRAY)
    with pytest.raises(ValueError, match="mean and std must both have 3"):
        preprocess(frames, mean=(0.5, 0.5), std=(0.2, 0.2))
    with pytest.raises(ValueError, match="std must be non-zero"):
        preprocess(frames, std=(0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match="layout must be one of"):
        preprocess(frames, layout="chw")
    with pytest.raises(ValueError, match="input_order must be one of"):
        preprocess(frames, input_order="bgra")
    with pytest.raises(TypeError, match="dtype must be float32, float16 or bfloat16"):
        preprocess(frames, dtype=torch.float64)
    with pytest.raises(ValueError, match="size must be"):
        preprocess(frames, (0, 4))
    with pytest.raises(ValueError, match=r"out must be \[1, 3, 32, 48\]"):
        preprocess(frames, (32, 48), out=torch.empty(1, 3, 32, 47, device=DEV))
    with pytest.raises(TypeError, match=r"out must have dtype torch\.float16"):
        preprocess(frames, (32, 48), dtype=torch.float16, out=torch.empty(1, 3, 32, 48))
    with pytest.raises(ValueError, match="colour frames"):
        preprocess_reference(_frames(1, 37, 53, C=4))


@pytest.mark.gpu
@pytest.mark.parametrize("size", [None, (512, 512)], ids=str)
def test_bf16_gpu(size):
    frames = _frames(2, 480, 640, kind="crop")
    out, _ = _check(frames, size, dtype=torch.bfloat16, layout="nhwc")
    ref32 = preprocess_reference(frames, size)
    assert_low_precision_close(out, ref32, _torch_chain(frames, size, torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("hw", "size"),
    [((480, 640), (512, 512)), ((1080, 1920), (512, 1024)), ((1080, 1920), (2160, 3840))],
)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_realistic_gpu(hw, size, layout):
    frames = _frames(2, *hw, kind="crop")
    _check(frames, size, layout=layout)
    out, _ = _check(frames, size, layout=layout, dtype=torch.float16)
    ref32 = preprocess_reference(frames, size)
    assert_low_precision_close(out, ref32, _torch_chain(frames, size, torch.float16))
