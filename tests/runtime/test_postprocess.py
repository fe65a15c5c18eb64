"""Classical post-processing: known small arrays, SciPy / scikit-image directly, errors."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage import filters, measure

from segfast.errors import InputError
from segfast.runtime import postprocess as pp

# Two objects touching only at a corner, and a 1-pixel speck.
CORNER = np.array(
    [
        [1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 0, 0, 1],
    ],
    np.uint8,
)


def _random_mask(seed: int, shape: tuple[int, ...] = (40, 50), p: float = 0.45) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return ndimage.binary_opening(rng.random(shape) < p).astype(np.uint8)


@pytest.mark.parametrize(("connectivity", "count"), [(1, 3), (4, 3), (2, 1), (8, 1)])
def test_connected_components_known(connectivity: int, count: int) -> None:
    labels, n = pp.connected_components(CORNER, connectivity=connectivity)
    assert n == count
    assert labels.dtype == np.int32
    assert set(np.unique(labels)) == set(range(count + 1))
    assert np.array_equal(labels > 0, CORNER > 0)


@pytest.mark.parametrize("connectivity", [1, 2])
def test_connected_components_matches_scipy(connectivity: int) -> None:
    m = _random_mask(0)
    labels, n = pp.connected_components(m, connectivity=connectivity)
    structure = ndimage.generate_binary_structure(2, connectivity)
    ref, ref_n = ndimage.label(m, structure=structure)
    assert n == ref_n
    # Same partition of the pixels (label numbers may differ): a bijection between labels.
    pairs = set(zip(labels[m > 0].tolist(), ref[m > 0].tolist(), strict=True))
    assert len(pairs) == n == len({a for a, _ in pairs}) == len({b for _, b in pairs})


def test_connected_components_batch_and_torch() -> None:
    batch = np.stack([CORNER, np.zeros_like(CORNER), CORNER.T])
    labels, counts = pp.connected_components(torch.from_numpy(batch))
    assert isinstance(labels, np.ndarray)
    assert labels.shape == batch.shape
    assert counts.tolist() == [3, 0, 3]
    # Nothing connects across the batch axis: each image labelled from 1.
    assert labels[2].max() == 3


def test_class_mask_objects_are_per_value() -> None:
    # Two classes side by side form two objects, not one.
    m = np.array([[1, 1, 2, 2]], np.uint8).repeat(2, 0)
    _, n = pp.connected_components(m)
    assert n == 2


def test_remove_small_known() -> None:
    out = pp.remove_small(CORNER, 2)
    expected = CORNER.copy()
    expected[4, 4] = 0
    assert np.array_equal(out, expected)
    assert out.dtype == CORNER.dtype
    # With corner connectivity the three touch: one object of 9 pixels.
    assert np.array_equal(pp.remove_small(CORNER, 9, connectivity=8), CORNER)
    assert not pp.remove_small(CORNER, 10, connectivity=8).any()
    # min_size counts "smaller than": a 4-pixel object survives min_size=4.
    assert pp.remove_small(CORNER, 4).sum() == 8


@pytest.mark.parametrize("min_size", [1, 5, 13])
def test_remove_small_matches_skimage_on_bool(min_size: int) -> None:
    from skimage import morphology

    m = _random_mask(1).astype(bool)
    ours = pp.remove_small(m, min_size)
    # skimage >= 0.26 removes objects of size <= max_size; ours removes size < min_size.
    labels = measure.label(m, connectivity=1)
    sizes = np.bincount(labels.ravel())
    expected = m & (sizes[labels] >= min_size)
    assert ours.dtype == np.bool_
    assert np.array_equal(ours, expected)
    if "max_size" in morphology.remove_small_objects.__doc__:
        ref = morphology.remove_small_objects(m, max_size=min_size - 1)
        assert np.array_equal(ours, ref)


def test_remove_small_class_mask_and_labels() -> None:
    m = np.zeros((6, 8), np.uint8)
    m[0:3, 0:3] = 1  # 9 px of class 1
    m[0:3, 3:4] = 2  # 3 px of class 2 touching it: its own object
    m[5, 7] = 1  # 1 px speck of class 1
    out = pp.remove_small(m, 4)
    assert (out[0:3, 0:3] == 1).all()
    assert (out[0:3, 3] == 0).all()
    assert out[5, 7] == 0
    # Instance labels: each id is its own object.
    labels, _ = pp.connected_components(CORNER)
    kept = pp.remove_small(labels, 2)
    assert sorted(np.unique(kept).tolist()) == [0, 1, 2]


def test_keep_largest() -> None:
    m = np.zeros((10, 10), np.uint8)
    m[0:4, 0:4] = 1  # 16 px
    m[6:8, 6:9] = 1  # 6 px
    m[0, 9] = 1  # 1 px
    assert np.array_equal(pp.keep_largest(m, 1), (np.arange(10)[:, None] < 4) & (np.arange(10) < 4))
    two = pp.keep_largest(m, 2)
    assert two.sum() == 22
    assert two[0, 9] == 0
    assert np.array_equal(pp.keep_largest(m, 5), m)
    # Per class: the largest object of each class is kept.
    c = m.copy()
    c[6:8, 6:9] = 2
    c[9, 0] = 2
    out = pp.keep_largest(c, 1)
    assert out[0:4, 0:4].all()
    assert (out[6:8, 6:9] == 2).all()
    assert out[9, 0] == 0
    assert out[0, 9] == 0
    # Ties go to the first object in scan order.
    tie = np.array([[1, 0, 1]], np.uint8)
    assert pp.keep_largest(tie, 1).tolist() == [[1, 0, 0]]


def test_keep_largest_matches_regionprops() -> None:
    m = _random_mask(2)
    out = pp.keep_largest(m, 3)
    props = sorted(measure.regionprops(measure.label(m, connectivity=1)), key=lambda r: -r.area)
    expected = np.zeros_like(m)
    for r in props[:3]:
        expected[tuple(r.coords.T)] = 1
    assert np.array_equal(out, expected)


def test_fill_holes() -> None:
    ring = np.zeros((7, 7), np.uint8)
    ring[1:6, 1:6] = 1
    ring[2:5, 2:5] = 0
    ring[3, 3] = 1  # an island inside the hole
    filled = pp.fill_holes(ring)
    assert filled[1:6, 1:6].all()
    assert filled.sum() == 25
    assert np.array_equal(filled.astype(bool), ndimage.binary_fill_holes(ring))
    assert pp.fill_holes(ring.astype(bool)).dtype == np.bool_
    # A ring closed only at corners still encloses (background connects through edges).
    diamond = np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]], np.uint8)
    assert pp.fill_holes(diamond)[1, 1] == 1
    # An open ring has no hole.
    open_ring = ring.copy()
    open_ring[1, 3] = 0
    open_ring[2, 3] = 0
    assert pp.fill_holes(open_ring)[2, 2] == 0


def test_fill_holes_per_value() -> None:
    m = np.zeros((7, 12), np.uint8)
    m[1:6, 1:6] = 2
    m[3, 3] = 0  # hole of class 2
    m[1:6, 6:11] = 1
    m[3, 8] = 0  # hole of class 1
    out = pp.fill_holes(m)
    assert out[3, 3] == 2
    assert out[3, 8] == 1
    # A gap enclosed by two different values is nobody's hole.
    gap = np.zeros((5, 5), np.uint8)
    gap[1:4, 1:4] = 1
    gap[1:4, 3] = 2
    gap[2, 2] = 0
    assert pp.fill_holes(gap)[2, 2] == 0


def test_otsu_matches_skimage() -> None:
    rng = np.random.default_rng(3)
    img = np.concatenate([rng.uniform(0.1, 0.3, 500), rng.uniform(0.7, 0.9, 300)]).reshape(20, 40)
    t, mask = pp.otsu_threshold(img)
    assert t == pytest.approx(filters.threshold_otsu(img))
    assert mask.dtype == np.uint8
    assert np.array_equal(mask, (img > t).astype(np.uint8))
    # uint8 images work as they are; a batch gets one threshold per image.
    ts, masks = pp.otsu_threshold(np.stack([img, img * 0.5]))
    assert ts.shape == (2,)
    assert ts[1] == pytest.approx(filters.threshold_otsu(img * 0.5))
    assert masks.shape == (2, 20, 40)
    t8, _ = pp.otsu_threshold((img * 200).astype(np.uint8))
    assert t8 == pytest.approx(filters.threshold_otsu((img * 200).astype(np.uint8)))


def test_otsu_accepts_fp16_tensors() -> None:
    prob = torch.zeros(2, 8, 8, dtype=torch.float16)
    prob[:, 2:5, 2:5] = 0.9
    prob[1, 0, 0] = 0.4
    ts, masks = pp.otsu_threshold(prob)
    assert masks.shape == (2, 8, 8)
    for i in range(2):
        ref = prob[i].float().numpy()
        assert ts[i] == pytest.approx(filters.threshold_otsu(ref))
        assert np.array_equal(masks[i], (ref > ts[i]).astype(np.uint8))
    assert masks[0].sum() == 9


def test_otsu_constant_image() -> None:
    t, mask = pp.otsu_threshold(np.full((4, 4), 0.3, np.float32))
    assert t == pytest.approx(0.3)
    assert not mask.any()


def test_apply_pipeline() -> None:
    prob = np.zeros((12, 12), np.float32)
    prob[1:6, 1:6] = 0.9
    prob[3, 3] = 0.1  # a hole
    prob[8:10, 8:10] = 0.8  # a smaller object
    prob[11, 0] = 0.7  # a speck
    out = pp.apply(prob, ["otsu", ("min_size", 2), "fill_holes", ("keep_largest", 1)])
    expected = np.zeros((12, 12), np.uint8)
    expected[1:6, 1:6] = 1
    assert np.array_equal(out, expected)
    # The ops compose exactly as the functions do.
    _, m = pp.otsu_threshold(prob)
    assert np.array_equal(
        pp.apply(prob, [pp.Op("otsu"), pp.Op("min_size", 2)]), pp.remove_small(m, 2)
    )
    # No ops: the input back as numpy.
    assert isinstance(pp.apply(torch.from_numpy(CORNER), []), np.ndarray)


def test_apply_batch() -> None:
    batch = np.stack([_random_mask(4), _random_mask(5)])
    out = pp.apply(batch, [("min_size", 6), "fill_holes"])
    for i in range(2):
        assert np.array_equal(out[i], pp.fill_holes(pp.remove_small(batch[i], 6)))


def test_cli_options() -> None:
    p = argparse.ArgumentParser()
    pp.add_arguments(p)
    args = p.parse_args(["--keep-largest", "2", "--fill-holes", "--min-size", "30", "--otsu"])
    assert pp.ops_from_args(args) == [
        pp.Op("otsu"),
        pp.Op("min_size", 30),
        pp.Op("fill_holes"),
        pp.Op("keep_largest", 2),
    ]
    assert args.connectivity == 4
    assert pp.ops_from_args(p.parse_args([])) == []
    with pytest.raises(SystemExit):
        p.parse_args(["--connectivity", "6"])
    with pytest.raises(InputError, match="--min-size"):
        pp.ops_from_args(p.parse_args(["--min-size", "-1"]))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda: pp.connected_components(np.zeros((2, 2, 2, 2), np.uint8)),
            r"\[H, W\].*shape \(2, 2, 2, 2\)",
        ),
        (lambda: pp.connected_components(np.zeros(5, np.uint8)), "shape"),
        (lambda: pp.remove_small(np.zeros((3, 3), np.float32), 2), "bool or integer.*float32"),
        (lambda: pp.fill_holes(np.full((3, 3), -1, np.int32)), "negative"),
        (lambda: pp.keep_largest(CORNER, 0), "n >= 1"),
        (lambda: pp.remove_small(CORNER, -1), "min_size"),
        (lambda: pp.connected_components(CORNER, connectivity=3), "connectivity"),
        (lambda: pp.otsu_threshold(np.array([[np.nan, 1.0]])), "NaN"),
        (lambda: pp.otsu_threshold(CORNER.astype(bool)), "real-valued"),
        (lambda: pp.apply(CORNER, [("min_size", 2), "otsu"]), "must come first"),
        (lambda: pp.apply(CORNER, ["erode"]), "unknown post-processing op 'erode'"),
        (lambda: pp.remove_small([[1, 0]], 1), "numpy array or torch tensor, got list"),
        (lambda: pp.fill_holes(np.zeros((0, 4), np.uint8)), "empty"),
    ],
)
def test_errors(call, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InputError, match=match):
        call()
