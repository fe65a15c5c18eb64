"""The nuclei image and video generator: determinism, shapes, dtypes, image/mask consistency."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from segfast.demo.synth import synth_batch, synth_image, synth_video, to_uint8

SEEDS = range(12)


def test_deterministic_per_seed() -> None:
    a = synth_image(96, 5, labels=True)
    b = synth_image(96, 5, labels=True)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y)
    c = synth_image(96, 6)
    assert not np.array_equal(a.image, c.image)
    # A Generator is consumed: two draws from one generator differ.
    rng = np.random.default_rng(0)
    assert not np.array_equal(synth_image(64, rng).image, synth_image(64, rng).image)


@pytest.mark.parametrize("size", [64, (48, 80), (17, 9)])
def test_shapes_and_dtypes(size: int | tuple[int, int]) -> None:
    image, mask, labels = synth_image(size, 1, labels=True)
    shape = (size, size) if isinstance(size, int) else size
    assert image.shape == mask.shape == labels.shape == shape
    assert image.dtype == np.float32
    assert mask.dtype == np.uint8
    assert labels.dtype == np.int32
    assert image.min() >= 0.0
    assert image.max() <= 1.0
    assert set(np.unique(mask)) <= {0, 1}
    assert synth_image(size, 1).labels is None


def test_mask_matches_labels_and_image() -> None:
    checked = 0
    for seed in SEEDS:
        image, mask, labels = synth_image(128, seed, labels=True)
        assert np.array_equal(labels > 0, mask > 0)
        if not mask.any():  # the generator draws an empty field now and then
            continue
        # Nuclei are brighter than their surroundings: compare the nuclei with a
        # ring of background around them, after a light denoise.
        smooth = ndimage.gaussian_filter(image, 1.0)
        near = ndimage.binary_dilation(mask, iterations=4)
        ring = near & ~ndimage.binary_dilation(mask, iterations=1)
        assert smooth[mask > 0].mean() > smooth[ring].mean(), seed
        checked += 1
    assert checked >= len(SEEDS) - 2


def test_masks_cover_a_range_of_sizes_and_densities() -> None:
    fractions = [synth_image(128, s).mask.mean() for s in SEEDS]
    assert min(fractions) < 0.15
    assert max(fractions) > 0.25
    counts = [ndimage.label(synth_image(128, s).mask)[1] for s in SEEDS]
    assert max(counts) > 4 * max(1, min(c for c in counts if c))


def test_touching_nuclei_exist() -> None:
    # Some labelled nuclei share an edge with another (clusters), so connected
    # components of the mask merge several instances.
    merged = 0
    for s in SEEDS:
        _, mask, labels = synth_image(128, s, labels=True)
        n_inst = len(np.unique(labels)) - 1
        merged += n_inst - ndimage.label(mask)[1]
    assert merged > 0


def test_radius_option_and_errors() -> None:
    small = synth_image(128, 3, radius=(3.0, 3.0)).mask
    large = synth_image(128, 3, radius=(20.0, 20.0)).mask
    assert ndimage.label(small)[1] > 3 * ndimage.label(large)[1]
    with pytest.raises(ValueError, match="radius"):
        synth_image(64, 0, radius=(5.0, 2.0))
    with pytest.raises(ValueError, match="at least 8"):
        synth_image(4, 0)
    with pytest.raises(ValueError, match="size"):
        synth_image((4, 5, 6), 0)  # type: ignore[arg-type]


def test_batch_matches_single_images() -> None:
    images, masks = synth_batch(3, (40, 56), seed=9)
    assert images.shape == masks.shape == (3, 40, 56)
    image, mask, _ = synth_image((40, 56), np.random.SeedSequence([9, 2]))
    assert np.array_equal(images[2], image)
    assert np.array_equal(masks[2], mask)
    with pytest.raises(ValueError, match="n must be"):
        synth_batch(0)


def test_video_frames() -> None:
    video = synth_video(24, (64, 80), seed=2, labels=True, divisions=2.0)
    assert video.frames.shape == video.masks.shape == video.labels.shape == (24, 64, 80)
    assert video.frames.dtype == np.float32
    assert video.masks.dtype == np.uint8
    assert np.array_equal(video.labels > 0, video.masks > 0)
    again = synth_video(24, (64, 80), seed=2, labels=True, divisions=2.0)
    assert np.array_equal(video.frames, again.frames)
    # Slow motion: consecutive masks overlap mostly but not entirely.
    for t in range(23):
        a, b = video.masks[t] > 0, video.masks[t + 1] > 0
        iou = (a & b).sum() / max((a | b).sum(), 1)
        assert 0.5 < iou < 1.0
    # Ids persist from frame to frame; divisions add new ids.
    first, last = set(np.unique(video.labels[0])), set(np.unique(video.labels[-1]))
    assert len(first & set(np.unique(video.labels[1]))) > 0.8 * len(first)
    assert max(last) > max(first)


def test_video_errors_and_uint8() -> None:
    with pytest.raises(ValueError, match="frames"):
        synth_video(0)
    assert synth_video(2, 32, seed=0).labels is None
    frame = to_uint8(np.array([[0.0, 0.5, 1.0, 1.2]], np.float32))
    assert frame.dtype == np.uint8
    assert frame.tolist() == [[0, 128, 255, 255]]
