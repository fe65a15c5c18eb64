"""kernels/overlay.py: mask → palette → alpha blend, bit-exact against its reference."""

from __future__ import annotations

import pytest
import torch

from segfast.kernels.overlay import alpha_weight, default_palette, overlay, overlay_reference
from segfast.testing import poison

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(N, H, W, K, mask_dtype=torch.uint8, C=3):
    frames = torch.randint(0, 256, (N, H, W, C), dtype=torch.uint8, device=DEV)
    mask = torch.randint(0, K, (N, H, W), device=DEV).to(mask_dtype)
    palette = torch.randint(0, 256, (K, C), dtype=torch.uint8, device=DEV)
    return frames, mask, palette


def _check(frames, mask, palette, **kw):
    ref = overlay_reference(frames, mask, palette, **kw)
    out = poison(torch.empty_like(ref))
    assert overlay(frames, mask, palette, out=out, **kw) is out
    assert torch.equal(out, ref)
    fresh = overlay(frames, mask, palette, **kw)
    assert fresh.is_contiguous()
    assert torch.equal(fresh, ref)
    return ref


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("skip_class", [None, 0])
@pytest.mark.parametrize("mask_dtype", [torch.uint8, torch.int32, torch.int64])
def test_overlay(alpha, skip_class, mask_dtype):
    frames, mask, palette = _inputs(2, 37, 53, 21, mask_dtype)
    ref = _check(frames, mask, palette, alpha=alpha, skip_class=skip_class)
    keep = mask == 0 if skip_class == 0 else torch.zeros_like(mask, dtype=torch.bool)
    assert torch.equal(ref[keep], frames[keep])
    if alpha == 0.0:
        assert torch.equal(ref, frames)
    if alpha == 1.0:
        assert torch.equal(ref[~keep], palette[mask.long()][~keep])


def test_reference_is_the_float_blend():
    """The fixed-point blend equals floor((1−α)·f + α·p + ½) computed in fp64, except
    within α's quantisation (≤ 255·2⁻¹⁷) of a rounding boundary; exactly for α = k/2¹⁶."""
    frames, mask, palette = _inputs(2, 37, 53, 21)
    col = palette[mask.long()].double()
    for alpha in (0.25, 0.5, 0.3, 0.7071):
        got = overlay_reference(frames, mask, palette, alpha=alpha, skip_class=None).double()
        v = (1 - alpha) * frames.double() + alpha * col
        want = torch.floor(v + 0.5)
        near = (v + 0.5 - want - 0.5).abs() > 0.5 - 255 * 2.0**-17  # next to a boundary
        if alpha * 65536 == round(alpha * 65536):
            assert torch.equal(got, want)
        assert torch.equal(got[~near], want[~near])
        assert (got - want).abs().max() <= 1


def test_single_frame_and_odd_channels():
    frames, mask, palette = _inputs(1, 37, 53, 5)
    _check(frames[0], mask[0], palette, alpha=0.3)
    f1, m1, p1 = _inputs(1, 19, 23, 4, torch.int32, C=1)  # grayscale
    _check(f1, m1, p1, alpha=0.6, skip_class=None)
    f4, m4, p4 = _inputs(2, 19, 23, 4, torch.int64, C=4)  # BGRA
    _check(f4, m4, p4, alpha=0.6, skip_class=3)


def test_non_contiguous_inputs():
    big = torch.randint(0, 256, (2, 50, 70, 4), dtype=torch.uint8, device=DEV)
    frames = big[:, 5:42, 9:62, :3]  # crop of a BGRA frame
    mask_t = torch.randint(0, 21, (2, 53, 37), dtype=torch.int32, device=DEV).transpose(1, 2)
    palette = default_palette(21).to(DEV)
    assert not frames.is_contiguous()
    assert not mask_t.is_contiguous()
    _check(frames, mask_t, palette, alpha=0.3)
    _check(frames, mask_t, default_palette(42, "bgr").to(DEV)[::2], alpha=0.3)


def test_in_place_and_strided_out():
    frames, mask, palette = _inputs(2, 37, 53, 21)
    ref = overlay_reference(frames, mask, palette, alpha=0.4)
    work = frames.clone()
    assert overlay(work, mask, palette, alpha=0.4, out=work) is work
    assert torch.equal(work, ref)
    # in place on a crop of a larger frame: the border stays untouched
    big = torch.randint(0, 256, (2, 41, 60, 3), dtype=torch.uint8, device=DEV)
    before = big.clone()
    view = big[:, 2:39, 3:56]
    want = overlay_reference(view, mask, palette, alpha=0.4)
    overlay(view, mask, palette, alpha=0.4, out=view)
    assert torch.equal(view, want)
    border = torch.ones(big.shape[:3], dtype=torch.bool, device=DEV)
    border[:, 2:39, 3:56] = False
    assert torch.equal(big[border], before[border])


def test_skip_class_outside_palette():
    """An ignore label (255) skipped as background is not an out-of-range id."""
    frames, mask, palette = _inputs(1, 37, 53, 21)
    mask[0, :10] = 255
    ref = _check(frames, mask, palette, alpha=0.5, skip_class=255)
    assert torch.equal(ref[0, :10], frames[0, :10])


def test_out_of_range_ids():
    frames, mask, palette = _inputs(1, 37, 53, 21, torch.int32)
    bad = mask.clone()
    bad[0, 3, 4] = 21
    with pytest.raises(ValueError, match=r"outside \[0, 21\) .* e.g. 21"):
        overlay(frames.cpu(), bad.cpu(), palette.cpu())
    bad[0, 3, 4] = -2
    with pytest.raises(ValueError, match=r"e.g. -2"):
        overlay(frames.cpu(), bad.cpu(), palette.cpu(), skip_class=None)
    # the reference clamps, as the kernel does on a GPU
    bad[0, 3, 5] = 99
    ref = overlay_reference(frames, bad, palette, alpha=1.0, skip_class=None)
    assert ref[0, 3, 4].tolist() == palette[0].tolist()
    assert ref[0, 3, 5].tolist() == palette[20].tolist()


def test_empty():
    frames, mask, palette = _inputs(0, 37, 53, 21)
    assert overlay(frames, mask, palette).shape == (0, 37, 53, 3)


def test_default_palette():
    p = default_palette(256)
    assert p.dtype == torch.uint8
    assert p.shape == (256, 3)
    assert p[0].tolist() == [0, 0, 0]
    assert p[1].tolist() == [128, 0, 0]
    assert p[2].tolist() == [0, 128, 0]
    assert p[3].tolist() == [128, 128, 0]
    assert p[4].tolist() == [0, 0, 128]
    assert p[15].tolist() == [192, 128, 128]  # VOC "person"
    assert len({tuple(c) for c in p.tolist()}) == 256
    assert torch.equal(default_palette(21), p[:21])
    assert torch.equal(default_palette(21, "bgr"), p[:21].flip(1))


def test_alpha_weight():
    assert alpha_weight(0.0) == 0
    assert alpha_weight(1.0) == 65536
    assert alpha_weight(0.5) == 32768
    assert alpha_weight(0.3) == 19661


def test_errors():
    frames, mask, palette = _inputs(1, 37, 53, 21)
    with pytest.raises(TypeError, match="frames must be uint8"):
        overlay(frames.float(), mask, palette)
    with pytest.raises(ValueError, match=r"frames must be \[N, H, W, C\]"):
        overlay(frames[0, 0], mask[0, 0], palette)
    with pytest.raises(TypeError, match="mask must be uint8, int32 or int64"):
        overlay(frames, mask.float(), palette)
    with pytest.raises(ValueError, match=r"mask must be \[1, 37, 53\]"):
        overlay(frames, mask[:, :-1], palette)
    with pytest.raises(TypeError, match="palette must be uint8"):
        overlay(frames, mask, palette.int())
    with pytest.raises(ValueError, match=r"palette must be \[K, 3\]"):
        overlay(frames, mask, palette[:, :2])
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        overlay(frames, mask, palette, alpha=1.5)
    with pytest.raises(ValueError, match="out must be uint8"):
        overlay(frames, mask, palette, out=torch.empty_like(frames, dtype=torch.int32))
    with pytest.raises(ValueError, match="order must be"):
        default_palette(3, "rgba")
    with pytest.raises(ValueError, match="k must be in"):
        default_palette(0)


@pytest.mark.gpu
@pytest.mark.parametrize("mask_dtype", [torch.uint8, torch.int64])
def test_1080p_gpu(mask_dtype):
    frames, mask, palette = _inputs(2, 1080, 1920, 21, mask_dtype)
    for alpha in (0.3, 0.5):
        _check(frames, mask, palette, alpha=alpha)
    mask[0, 7, 9] = 200  # out of range on the GPU: clamped, no sync, no error
    _check(frames, mask, palette, alpha=0.5)
