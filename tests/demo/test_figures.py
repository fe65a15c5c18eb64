"""README figures: the real images load offline, the baseline works, PNGs stay small."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segfast.demo.figures import MAX_PNG_BYTES, make_figures, otsu_baseline, real_images
from segfast.demo.synth import synth_image
from segfast.demo.train import TrainConfig, dice_scores, train


def test_real_images_load_offline() -> None:
    items = real_images()
    assert {it.name for it in items} >= {"ihc_nuclei", "cell", "coins"}
    for it in items:
        img = it.load()
        assert img.ndim == 2, it.name
        assert np.isfinite(img).all()
        assert img.std() > 0


def test_otsu_baseline_segments_a_generated_image() -> None:
    image, mask, _ = synth_image(128, 20_241)
    base = otsu_baseline(image, 10)
    assert base.dtype == np.uint8
    assert dice_scores(base[None], mask[None])[0] > 0.6


@pytest.mark.slow
def test_make_figures_with_a_tiny_model(tmp_path: Path) -> None:
    weights = tmp_path / "tiny.safetensors"
    train(weights, TrainConfig.tiny(steps=1), log=lambda _: None)
    lines = make_figures(tmp_path / "img", weights)
    pngs = sorted((tmp_path / "img").glob("*.png"))
    assert [p.name for p in pngs] == sorted(
        ["demo_synthetic.png"] + [f"real_{it.name}.png" for it in real_images()]
    )
    for p in pngs:
        assert p.stat().st_size < MAX_PNG_BYTES
        with Image.open(p) as im:
            assert im.width > 300
    assert any("Dice model" in line for line in lines)
