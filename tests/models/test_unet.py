"""U-Net: valid-mode tile geometry, padding and upsampling modes, overlap-tile behaviour."""

from __future__ import annotations

import pytest
import torch

from segfast.models import UNet, create, unet_valid_geometry, unet_valid_margin


def test_paper_tile():
    # Ronneberger et al. 2015, Fig. 1: a 572×572 tile gives a 388×388 segmentation.
    assert unet_valid_geometry(388, 4) == (572, 388)
    assert unet_valid_geometry(387, 4) == (572, 388)
    assert unet_valid_geometry(389, 4) == (588, 404)
    assert unet_valid_margin(4) == 92 == (572 - 388) // 2


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
def test_geometry_is_consistent(depth):
    margin = unet_valid_margin(depth)
    smallest = unet_valid_geometry(1, depth)[1]
    for size in range(1, 120):
        inp, out = unet_valid_geometry(size, depth)
        assert inp - out == 2 * margin
        # Valid outputs are spaced 2**depth apart: this one covers ``size`` and the
        # next smaller one would not (unless it is already the smallest).
        assert (out - smallest) % 2**depth == 0
        assert out >= size
        assert out == smallest or out - 2**depth < size


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_geometry_matches_the_network(depth):
    torch.manual_seed(0)
    model = UNet(num_classes=2, in_channels=1, base=2, depth=depth, padding="valid").eval()
    for size in (1, 7, 30):
        inp, out = unet_valid_geometry(size, depth)
        with torch.no_grad():
            y = model.forward_unpadded(torch.randn(1, 1, inp, inp))
        assert y.shape[-2:] == (out, out)


def test_smallest_outputs():
    assert unet_valid_geometry(1, 1) == (18, 2)
    assert unet_valid_geometry(1, 2) == (44, 4)
    assert unet_valid_geometry(1, 4) == (188, 4)


@pytest.mark.parametrize("bad", [(0, 4), (5, 0)])
def test_geometry_rejects_bad_arguments(bad):
    with pytest.raises(ValueError, match=">= 1"):
        unet_valid_geometry(*bad)


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("up_mode", ["convT", "bilinear", "nearest"])
@pytest.mark.parametrize("size", [(1, 1), (1, 6), (2, 3), (37, 53)])
def test_any_size(padding, up_mode, size):
    torch.manual_seed(0)
    model = UNet(3, 2, base=4, depth=2, padding=padding, up_mode=up_mode).eval()
    with torch.no_grad():
        y = model(torch.randn(2, 2, *size))
    assert y.shape == (2, 3, *size)
    assert torch.isfinite(y).all()


def test_create_with_custom_channels():
    model = create("unet", num_classes=3, in_channels=3, base=8, depth=3).eval()
    assert (model.num_classes, model.in_channels, model.depth) == (3, 3, 3)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 37, 53)).shape == (1, 3, 37, 53)


@pytest.mark.parametrize(("up_mode", "cat_channels"), [("convT", 16), ("bilinear", 24)])
def test_decoder_widths(up_mode, cat_channels):
    # Top decoder level at base 8: skip (8) + upsample (8 after convT, 16 interpolated).
    model = UNet(base=8, depth=3, up_mode=up_mode)
    assert model.decoders[-1][0][0].in_channels == cat_channels
    assert model.decoders[-1][0][0].out_channels == 8


def test_skip_is_concatenated_first():
    model = UNet(1, 1, base=4, depth=1, batch_norm=False).eval()
    seen = {}
    model.encoders[0].register_forward_hook(lambda m, i, o: seen.setdefault("skip", o))
    model.decoders[0].register_forward_pre_hook(lambda m, i: seen.setdefault("cat", i[0]))
    with torch.no_grad():
        model(torch.randn(1, 1, 8, 8))
    assert seen["cat"].shape[1] == 8
    torch.testing.assert_close(seen["cat"][:, :4], seen["skip"], rtol=0, atol=0)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_valid_mode_overlap_tiles_agree(depth):
    """Tiles of one image agree wherever the tile holds the pixel's whole context.

    That context reaches ``margin`` pixels past the pixel, plus up to ``2**depth - 1``
    from the 2×2 pooling grid's alignment; both runs here share the top-left
    origin (and so the grid), as the paper's tiles do.
    """
    torch.manual_seed(0)
    model = UNet(2, 1, base=4, depth=depth, padding="valid", batch_norm=False).eval()
    x = torch.randn(1, 1, 110, 110)
    tile_size = 80
    keep = tile_size - unet_valid_margin(depth) - (2**depth - 1)
    with torch.no_grad():
        full = model(x)
        tile = model(x[..., :tile_size, :tile_size])
    torch.testing.assert_close(tile[..., :keep, :keep], full[..., :keep, :keep])
    # At the tile's edge its mirrored border differs from the real image.
    assert not torch.allclose(tile[..., -1, -1], full[..., tile_size - 1, tile_size - 1])


def test_valid_mode_mirrors_the_border():
    """The tile the bare network sees is the image, mirror-padded by the margin."""
    model = UNet(2, 1, base=4, depth=2, padding="valid").eval()
    margin = unet_valid_margin(2)
    seen = {}
    model.encoders[0].register_forward_pre_hook(lambda m, i: seen.setdefault("tile", i[0]))
    x = torch.randn(1, 1, 30, 33)
    with torch.no_grad():
        model(x)
    tile = seen["tile"]
    assert tile.shape[-2:] == (unet_valid_geometry(30, 2)[0], unet_valid_geometry(33, 2)[0])
    inner = tile[..., margin : margin + 30, margin : margin + 33]
    torch.testing.assert_close(inner, x, rtol=0, atol=0)
    # Mirrored without repeating the edge: row margin - k is image row k.
    for k in (1, 2, margin):
        torch.testing.assert_close(tile[..., margin - k, margin : margin + 33], x[..., k, :])


@pytest.mark.parametrize(
    "kwargs",
    [{"padding": "full"}, {"up_mode": "pixelshuffle"}, {"depth": 0}, {"base": 0}],
)
def test_bad_options(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        UNet(**kwargs)


def test_valid_mode_exports():
    torch.manual_seed(0)
    model = UNet(2, 1, base=4, depth=2, padding="valid").eval()
    x = torch.randn(1, 1, 21, 30)
    exported = torch.export.export(model, (x,), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-5, atol=1e-6)
