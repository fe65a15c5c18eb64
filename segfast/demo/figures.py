"""README pictures: the demo model's masks next to a classical Otsu baseline.

    python -m segfast.demo.figures [--out docs/images] [--weights PATH]

Writes (PNG, palette-quantised to stay well under 300 KB each):

* ``demo_synthetic.png`` — two held-out generated images with their exact
  ground truth, the model's mask and the baseline's, with Dice scores;
* ``real_<name>.png`` — real microscopy (and one non-microscopy) images that
  ship inside scikit-image's wheel and load offline: the input as the model
  sees it, the model's mask, the baseline's mask, and object counts.

The model's mask is its plain argmax, with no post-processing. The baseline is
the classical pipeline of :mod:`segfast.runtime.postprocess`: Gaussian smoothing
(σ = 1 px), Otsu's threshold, removal of objects under ``min_size`` pixels and
hole filling. Both see the same single-channel image, bright objects on dark.
"""

from __future__ import annotations

import argparse
import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from segfast.demo import DEMO_WEIGHTS, load_demo_model, predict_proba
from segfast.demo.synth import synth_image
from segfast.runtime import postprocess

# Largest PNG the README should carry.
MAX_PNG_BYTES = 300_000
MODEL_COLOUR = (1.0, 0.85, 0.1)  # yellow
OTSU_COLOUR = (0.2, 0.8, 1.0)  # cyan


@dataclass(frozen=True)
class RealImage:
    """A real image shipped with scikit-image, and how it is turned into the model's input."""

    name: str
    title: str
    load: Callable[[], np.ndarray]  # -> one grey-level channel, bright objects
    scale: float  # resize factor applied before segmentation (nuclei radius ~3-40 px)
    min_size: int  # the baseline's small-object threshold (pixels, after scaling)
    note: str


def _ihc_hematoxylin() -> np.ndarray:
    from skimage import color, data

    # Colour deconvolution (Ruifrok & Johnston): the hematoxylin channel stains nuclei.
    return color.rgb2hed(data.immunohistochemistry())[..., 0]


def _inverted(loader: Callable[[], np.ndarray]) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        img = loader().astype(np.float32)
        return img.max() - img

    return load


def real_images() -> list[RealImage]:
    """The offline scikit-image samples used in the README."""
    from skimage import data

    return [
        RealImage(
            "ihc_nuclei",
            "immunohistochemistry, hematoxylin channel",
            _ihc_hematoxylin,
            1.0,
            20,
            "skimage.data.immunohistochemistry(), colour-deconvolved (rgb2hed), channel H: "
            "nuclei of a colon tissue section",
        ),
        RealImage(
            "cell",
            "cell (skimage.data.cell)",
            data.cell,
            0.5,
            20,
            "skimage.data.cell(): one cell floating in saline, downscaled 2× so it falls in "
            "the trained size range",
        ),
        RealImage(
            "coins",
            "coins (not microscopy)",
            data.coins,
            1.0,
            20,
            "skimage.data.coins(): Greek coins on a grey background with uneven lighting",
        ),
        RealImage(
            "microaneurysms",
            "retina, inverted (microaneurysms)",
            _inverted(data.microaneurysms),
            2.0,
            10,
            "skimage.data.microaneurysms(), inverted so the dark lesions are bright, "
            "upscaled 2×: retinal fundus, vessels and two microaneurysms",
        ),
    ]


def _resize(img: np.ndarray, scale: float) -> np.ndarray:
    if scale == 1.0:
        return img.astype(np.float32)
    from skimage.transform import rescale

    return rescale(img.astype(np.float32), scale, order=1, anti_aliasing=scale < 1).astype(
        np.float32
    )


def otsu_baseline(image: np.ndarray, min_size: int) -> np.ndarray:
    """Classical segmentation: smooth (σ 1), Otsu, remove objects < ``min_size`` px, fill holes."""
    smooth = ndimage.gaussian_filter(image.astype(np.float32), 1.0)
    return postprocess.apply(smooth, ["otsu", ("min_size", min_size), "fill_holes"])


def _overlay(ax, image: np.ndarray, mask: np.ndarray | None, colour: tuple[float, ...]) -> None:  # type: ignore[no-untyped-def]
    from skimage.segmentation import find_boundaries

    lo, hi = np.percentile(image, (0.5, 99.5))
    grey = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)
    rgb = np.repeat(grey[..., None], 3, -1)
    if mask is not None:
        m = mask.astype(bool)
        rgb[m] = 0.65 * rgb[m] + 0.35 * np.asarray(colour)
        labels, _ = postprocess.connected_components(m)
        edge = find_boundaries(labels, mode="inner")
        rgb[edge] = colour
    ax.imshow(rgb, interpolation="nearest")
    ax.set_axis_off()


def _save(fig, path: Path) -> int:  # type: ignore[no-untyped-def]
    """Save ``fig`` as a palette PNG (adaptive 256 colours) and return its size in bytes."""
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    buf.seek(0)
    img = Image.open(buf).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG", optimize=True)
    size = path.stat().st_size
    if size > MAX_PNG_BYTES:
        raise RuntimeError(f"{path} is {size} bytes, over the {MAX_PNG_BYTES}-byte README budget")
    return size


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    p, t = pred.astype(bool), truth.astype(bool)
    total = p.sum() + t.sum()
    return float(2 * (p & t).sum() / total) if total else 1.0


def synthetic_figure(model, out: Path) -> list[str]:  # type: ignore[no-untyped-def]
    """Two held-out generated images: image, ground truth, model, baseline."""
    import matplotlib.pyplot as plt

    lines = []
    seeds = (20_241, 20_247)
    fig, axes = plt.subplots(len(seeds), 4, figsize=(12, 3.2 * len(seeds)), dpi=80)
    for row, seed in zip(axes, seeds, strict=True):
        image, truth, _ = synth_image(256, seed)
        pred = (predict_proba(model, image) > 0.5).astype(np.uint8)
        base = otsu_baseline(image, 20)
        d_model, d_base = _dice(pred, truth), _dice(base, truth)
        _overlay(row[0], image, None, MODEL_COLOUR)
        row[0].set_title(f"generated image (seed {seed})", fontsize=10)
        _overlay(row[1], image, truth, (0.3, 1.0, 0.3))
        row[1].set_title("exact ground truth", fontsize=10)
        _overlay(row[2], image, pred, MODEL_COLOUR)
        row[2].set_title(f"demo U-Net: Dice {d_model:.3f}", fontsize=10)
        _overlay(row[3], image, base, OTSU_COLOUR)
        row[3].set_title(f"Otsu + clean-up: Dice {d_base:.3f}", fontsize=10)
        lines.append(f"synthetic seed {seed}: Dice model {d_model:.3f}, Otsu baseline {d_base:.3f}")
    fig.tight_layout()
    size = _save(fig, out / "demo_synthetic.png")
    plt.close(fig)
    lines.append(f"  -> {out / 'demo_synthetic.png'} ({size / 1e3:.0f} KB)")
    return lines


def real_figure(model, item: RealImage, out: Path) -> list[str]:  # type: ignore[no-untyped-def]
    """One real image: input, model mask, baseline mask, with object counts."""
    import matplotlib.pyplot as plt

    image = _resize(item.load(), item.scale)
    pred = (predict_proba(model, image) > 0.5).astype(np.uint8)
    base = otsu_baseline(image, item.min_size)
    _, n_pred = postprocess.connected_components(pred)
    _, n_base = postprocess.connected_components(base)
    agree = _dice(pred, base)
    h, w = image.shape
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.2 * h / w + 0.5), dpi=80)
    _overlay(axes[0], image, None, MODEL_COLOUR)
    axes[0].set_title(item.title, fontsize=10)
    _overlay(axes[1], image, pred, MODEL_COLOUR)
    axes[1].set_title(f"demo U-Net: {n_pred} objects, {pred.mean():.0%} of pixels", fontsize=10)
    _overlay(axes[2], image, base, OTSU_COLOUR)
    axes[2].set_title(
        f"Otsu + clean-up: {n_base} objects, {base.mean():.0%} of pixels", fontsize=10
    )
    fig.tight_layout()
    path = out / f"real_{item.name}.png"
    size = _save(fig, path)
    plt.close(fig)
    return [
        f"{item.name}: {h}×{w}, model {n_pred} objects ({pred.mean():.1%} px), Otsu baseline "
        f"{n_base} objects ({base.mean():.1%} px), model-vs-baseline Dice {agree:.3f}",
        f"  -> {path} ({size / 1e3:.0f} KB)",
    ]


def make_figures(
    out: str | os.PathLike[str], weights: str | os.PathLike[str] = DEMO_WEIGHTS
) -> list[str]:
    """Render every figure into ``out``; return one summary line per result."""
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out)
    model = load_demo_model(weights)
    lines = synthetic_figure(model, out)
    for item in real_images():
        lines += real_figure(model, item, out)
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m segfast.demo.figures", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--out", type=Path, default=Path("docs/images"), help="output folder")
    p.add_argument("--weights", type=Path, default=DEMO_WEIGHTS, help="demo model weights")
    args = p.parse_args(argv)
    for line in make_figures(args.out, args.weights):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
