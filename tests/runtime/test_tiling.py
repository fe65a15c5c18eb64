"""Overlap-tile inference: equality with the whole-image result, mirror padding at the
borders, Gaussian vs crop blending, bounded memory on a memmapped image, refusals."""

from __future__ import annotations

import dataclasses
import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

import segfast
from segfast import InputError, models
from segfast.outputs import reduce_reference
from segfast.runtime import tiling
from segfast.runtime.engine_io import EngineIO
from segfast.runtime.tiling import segment_large

DYN = ["batch", "height", "width"]


def convnet(in_ch: int = 1, classes: int = 3, layers: int = 3, width: int = 4) -> nn.Module:
    """3×3 'same' convs: receptive-field radius = layers."""
    mods: list[nn.Module] = []
    c = in_ch
    for i in range(layers):
        last = i == layers - 1
        mods.append(nn.Conv2d(c, classes if last else width, 3, padding=1))
        if not last:
            mods.append(nn.ReLU())
        c = width
    torch.manual_seed(0)
    return nn.Sequential(*mods).eval()


def engine(net: nn.Module, size=(32, 32), *, output="logits", dynamic=DYN, batch=1, ch=None):
    ch = ch if ch is not None else next(net.parameters()).shape[1]
    return segfast.compile(
        net, input_shape=(batch, ch, *size), backend="eager", output=output, dynamic=dynamic
    )


def reflect_reference(net: nn.Module, img: np.ndarray, pad: int) -> torch.Tensor:
    """The net on the whole image mirror-padded by ``pad``, cropped back: [K, H, W] probs."""
    x = torch.from_numpy(img).float()[None, None] / 255
    x = F.pad(x, (pad,) * 4, mode="reflect")
    with torch.no_grad():
        p = reduce_reference(net(x), "probs")
    return p[0, :, pad:-pad, pad:-pad]


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (70, 90), dtype=np.uint8)


def test_crop_blend_equals_the_mirror_padded_whole_image_everywhere(image):
    """Crop blending with overlap/2 ≥ the receptive field = the network on the whole
    mirror-padded image, borders included (what the U-Net paper's Fig. 2 describes)."""
    net = convnet(layers=3)
    eng = engine(net)
    probs = segment_large(eng, image, tile=32, overlap=8, blend="crop", output="probs")
    ref = reflect_reference(net, image, 8).numpy()
    assert probs.shape == (3, 70, 90)
    np.testing.assert_allclose(probs, ref, atol=2e-6, rtol=0)
    mask = segment_large(eng, image, tile=32, overlap=8, blend="crop")
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, ref.argmax(0))
    # Too little overlap for the receptive field: the tile edges show.
    seams = segment_large(eng, image, tile=32, overlap=2, blend="crop", output="probs")
    assert np.abs(seams - ref).max() > 1e-3


def test_unet_tiles_equal_the_whole_image_in_the_interior():
    """The zoo U-Net (depth 3: pools align on multiples of 8) tiled with overlap/2 = 56
    beyond its receptive-field radius (≈46), through the fused torch backend: crop
    blending is identical to one whole-image pass, up to fp32 rounding, away from the
    border (where tiles see mirrored context and the whole image zero padding); Gaussian
    blending is close (it weighs in tile-edge pixels a little)."""
    torch.manual_seed(0)
    net = models.create("unet", tiny=True, in_channels=1, num_classes=2).eval()
    eng = segfast.compile(
        net, input_shape=(1, 1, 256, 256), backend="torch", output="logits", dynamic=True
    )
    img = np.random.default_rng(1).integers(0, 256, (320, 448), dtype=np.uint8)
    x = torch.from_numpy(img).float()[None, None] / 255
    with torch.no_grad():
        whole = torch.softmax(eng(x), 1)[0].numpy()
        whole_eager = torch.softmax(net(x), 1)[0].numpy()
    np.testing.assert_allclose(whole, whole_eager, atol=1e-5)  # the engine is the model
    inner = (slice(None), slice(56, -56), slice(56, -56))
    crop = segment_large(eng, img, tile=256, overlap=112, blend="crop", output="probs")
    np.testing.assert_allclose(crop[inner], whole[inner], atol=1e-5, rtol=0)
    assert np.abs(crop - whole).max() > 1e-3  # the borders differ: mirrored context
    gauss = segment_large(eng, img, tile=256, overlap=112, output="probs")
    err = np.abs(gauss[inner] - whole[inner])
    assert err.max() < 1e-2
    assert err.mean() < 5e-4
    # Tiles with too little context differ in the interior too.
    tiled = segment_large(eng, img, tile=256, overlap=16, blend="crop", output="probs")
    assert np.abs(tiled[inner] - whole[inner]).max() > 1e-3


def test_gaussian_weights_are_normalised_exactly():
    """A per-pixel model (1×1 conv) gives every tile the same value at a pixel, so any
    correct weighted average returns it exactly, at the borders and the seams too."""
    net = convnet(layers=1, classes=3)
    net[0] = nn.Conv2d(1, 3, 1)
    eng = engine(net)
    img = np.random.default_rng(2).integers(0, 256, (77, 101), dtype=np.uint8)
    ref = reflect_reference(net, img, 1).numpy()
    for overlap in (0, 6, 15):
        g = segment_large(eng, img, tile=(32, 40), overlap=overlap, output="probs")
        np.testing.assert_allclose(g, ref, atol=2e-6, rtol=0)


def test_gaussian_vs_crop(image):
    """Gaussian blending weighs in tile-edge pixels (computed with the tile's zero
    padding) a little; crop blending is exact. Both give probabilities summing to 1."""
    net = convnet(layers=3)
    eng = engine(net)
    ref = reflect_reference(net, image, 8).numpy()
    crop = segment_large(eng, image, tile=32, overlap=8, blend="crop", output="probs")
    gauss = segment_large(eng, image, tile=32, overlap=8, blend="gaussian", output="probs")
    np.testing.assert_allclose(gauss.sum(0), 1.0, atol=1e-5)
    err_crop, err_gauss = np.abs(crop - ref).max(), np.abs(gauss - ref)
    assert err_crop < 2e-6
    assert 1e-6 < err_gauss.max() < 2e-2
    assert err_gauss.mean() < 1e-3
    mask = segment_large(eng, image, tile=32, overlap=8, blend="gaussian")
    np.testing.assert_array_equal(mask, gauss.argmax(0))


def test_reflect_index_matches_numpy_reflect_padding():
    for n in (1, 2, 3, 7):
        pad = 3 * n + 5  # several reflections
        want = np.pad(np.arange(n), pad, mode="reflect") if n > 1 else np.zeros(n + 2 * pad)
        got = tiling.reflect_index(np.arange(-pad, n + pad), n)
        np.testing.assert_array_equal(got, want)


def test_image_smaller_than_a_tile_and_odd_sizes():
    net = convnet(layers=2)
    eng = engine(net, output="probs")
    for h, w in ((5, 7), (1, 9), (33, 31)):
        img = np.random.default_rng(h).integers(0, 256, (h, w), dtype=np.uint8)
        probs = segment_large(eng, img, tile=16, overlap=4, blend="crop", output="probs")
        assert probs.shape == (3, h, w)
        if h > 4 and w > 4:  # F.pad reflect needs pad < size
            np.testing.assert_allclose(probs, reflect_reference(net, img, 2), atol=2e-6)


def test_static_engines_batches_and_inputs(image):
    """A static batch-3 engine (last batch padded), a batch-1 static engine, a dynamic
    batch, torch and uint16/float inputs, and a 3-channel engine fed grayscale: all the
    same result."""
    net = convnet(layers=2)
    ref = segment_large(engine(net), image, tile=32, overlap=8, blend="crop", output="probs")
    static3 = engine(net, dynamic=False, batch=3)  # rows hold 3 tiles → 3 + padding
    static1 = engine(net, dynamic=False)
    for eng, kw in ((static3, {}), (static1, {}), (engine(net), {"batch": 2})):
        got = segment_large(eng, image, overlap=8, blend="crop", output="probs", **kw)
        np.testing.assert_allclose(got, ref, atol=2e-6)
    t = segment_large(engine(net), torch.from_numpy(image), tile=32, overlap=8, blend="crop",
                      output="probs")  # fmt: skip
    np.testing.assert_allclose(t, ref, atol=2e-6)
    u16 = segment_large(engine(net), image.astype(np.uint16) * 257, tile=32, overlap=8,
                        blend="crop", output="probs")  # fmt: skip
    np.testing.assert_allclose(u16, ref, atol=2e-6)
    f32 = segment_large(engine(net), image.astype(np.float32) / 255, tile=32, overlap=8,
                        blend="crop", output="probs")  # fmt: skip
    np.testing.assert_allclose(f32, ref, atol=2e-6)
    # A colour network fed a grayscale image: the image is repeated on 3 channels.
    rgb_net = convnet(in_ch=3, layers=2)
    with torch.no_grad():
        gray_w = rgb_net[0].weight.sum(1, keepdim=True)
    gray_net = convnet(layers=2)
    gray_net.load_state_dict(rgb_net.state_dict() | {"0.weight": gray_w})
    a = segment_large(engine(rgb_net), image, tile=32, overlap=8, blend="crop", output="probs")
    b = segment_large(engine(gray_net), image, tile=32, overlap=8, blend="crop", output="probs")
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_normalize_and_one_class_models(image):
    net = convnet(layers=2, classes=1)
    eng = engine(net)
    norm = tiling.mean_std((0.5,), (0.25,))
    probs = segment_large(eng, image, tile=32, overlap=8, blend="crop", output="probs",
                          normalize=norm)  # fmt: skip
    x = (torch.from_numpy(image).float()[None, None] / 255 - 0.5) / 0.25
    with torch.no_grad():
        ref = torch.sigmoid(net(F.pad(x, (8,) * 4, mode="reflect")))[0, :, 8:-8, 8:-8]
    assert probs.shape == (1, 70, 90)
    np.testing.assert_allclose(probs, ref.numpy(), atol=2e-6)
    for t in (0.3, 0.7):
        mask = segment_large(eng, image, tile=32, overlap=8, blend="crop", normalize=norm,
                             threshold=t)  # fmt: skip
        np.testing.assert_array_equal(mask, (ref[0].numpy() > t).astype(np.uint8))
    pn = tiling.percentile_normalize(image, 1, 99)
    lo, hi = np.percentile(image, [1, 99])
    np.testing.assert_allclose(pn(torch.tensor([lo, hi])).numpy(), [0, 1], atol=1e-6)


def test_mask_engines_work_with_crop_blending_only(image):
    net = convnet(layers=2)
    mask_eng = engine(net, output="mask")
    logits_eng = engine(net)
    a = segment_large(mask_eng, image, tile=32, overlap=8, blend="crop")
    b = segment_large(logits_eng, image, tile=32, overlap=8, blend="crop")
    np.testing.assert_array_equal(a, b)
    with pytest.raises(InputError, match=r"gaussian blending averages probabilities.*crop"):
        segment_large(mask_eng, image, tile=32)
    with pytest.raises(InputError, match="output='probs' needs probabilities"):
        segment_large(mask_eng, image, tile=32, blend="crop", output="probs")


def _torch_peak_bytes(prof) -> int:
    """Peak of live CPU tensor bytes in a profile: allocations (ops' own memory) and
    frees ('[memory]' events) summed in time order."""
    live = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def test_memory_is_bounded_by_the_tile_row_not_the_image(tmp_path):
    """A 3000×1000 uint8 memmap (3 MB; a float32 copy would be 12 MB): the tensors alive
    at once (torch profiler) and the numpy arrays besides the mask (tracemalloc) stay far
    below one float copy, and don't grow when the image gets three times taller."""
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1)).eval()
    eng = engine(net, size=(128, 128))
    h, w = 3000, 1000
    mm = np.memmap(tmp_path / "big.u8", dtype=np.uint8, mode="w+", shape=(h, w))
    mm[:] = np.random.default_rng(0).integers(0, 256, (h, w), dtype=np.uint8)
    mm.flush()
    img = np.memmap(tmp_path / "big.u8", dtype=np.uint8, mode="r", shape=(h, w))
    float_copy = h * w * 4

    peaks = {}
    for rows in (h // 3, h):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            segment_large(eng, img[:rows], tile=128, overlap=32, batch=2)
        peaks[rows] = _torch_peak_bytes(prof)
    # The Gaussian band, K·tile·(W + overlap) fp32 = 1.1 MB here, and one batch of tiles.
    assert peaks[h] <= 1.02 * peaks[h // 3], peaks
    assert peaks[h] < float_copy / 5, peaks

    for blend in ("gaussian", "crop"):
        out = np.memmap(tmp_path / "mask.u8", dtype=np.uint8, mode="w+", shape=(h, w))
        tracemalloc.start()
        segment_large(eng, img, tile=128, overlap=32, batch=2, blend=blend, out=out)
        _, np_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert np_peak < float_copy / 20, (blend, np_peak)

    # The same measurement does see a float copy of the image.
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.from_numpy(np.array(img)).float()
    assert _torch_peak_bytes(prof) >= float_copy


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image": np.zeros((2, 3, 40, 40), np.uint8)}, "H×W or H×W×C"),
        ({"image": np.zeros((3, 40, 40), np.uint8)}, "channels-first"),
        ({"image": np.zeros((40, 40), np.int64)}, "dtype must be uint8"),
        ({"image": np.zeros((40, 40), bool)}, "dtype must be uint8"),
        ({"image": np.zeros((40, 40, 2), np.uint8)}, "2 channel.*engine takes 1"),
        ({"image": [[1, 2]]}, "numpy array"),
        ({"overlap": 16}, "less than half the tile"),
        ({"overlap": -1}, "overlap must be ≥ 0"),
        ({"tile": 48}, "static engine takes only 32×32|tile is 48×48"),
        ({"batch": 2}, "batch is fixed at 1"),
        ({"blend": "max"}, "blend must be one of"),
        ({"output": "logits"}, "output must be one of"),
        ({"out": np.zeros((40, 41), np.uint8)}, "out must be a numpy array of shape"),
        ({"sigma": 0.0}, "sigma must be positive"),
    ],
)
def test_refusals(kwargs, match):
    eng = engine(convnet(layers=1), dynamic=False)
    args = {"image": np.zeros((40, 40), np.uint8), "overlap": 8} | kwargs
    with pytest.raises(InputError, match=match):
        segment_large(eng, **args)


def test_dynamic_engine_range_is_checked_and_progress_shows(capsys):
    net = convnet(layers=1)
    eng = engine(net)
    io = dataclasses.replace(EngineIO.of(eng), height_range=(16, 64), width_range=(16, 64))
    io.check_hw((32, 64), "tile")
    with pytest.raises(InputError, match=r"tile is 8×32; this engine takes heights 16\.\.64"):
        io.check_hw((8, 32), "tile")
    mask = segment_large(eng, np.zeros((40, 40), np.uint8), tile=32, overlap=8, progress=True)
    assert mask.shape == (40, 40)
    assert "tiles" in capsys.readouterr().err
