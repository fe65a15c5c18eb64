"""The demo: a small nuclei-segmentation U-Net trained here on generated images.

The inference contract, shared by training (:mod:`segfast.demo.train`), the
figures (:mod:`segfast.demo.figures`) and any caller:

* **input**: one grey-level image with *bright nuclei on a darker background*
  (a fluorescence nuclear stain; invert brightfield images first), any dtype and
  range, passed through :func:`normalize` — per-image percentiles
  (:data:`NORM_PERCENTILES`) mapped to 0 and 1 and clipped — then fed as a float32
  ``[N, 1, H, W]`` tensor; any H×W (the U-Net pads to a multiple of 16 inside);
* **output**: logits ``[N, 2, H, W]``; class 1 is "nucleus" (argmax, or softmax
  channel 1 as a probability).

The model was trained on nuclei of about 3 to 35 px radius (the generator's 3.5-28 px
times a 0.7-1.4× scale jitter); images with larger nuclei must be downscaled into
that range first (``skimage.data.cell()``'s 64 px cell breaks into fragments at full
size and is segmented cleanly at half size).

:func:`load_demo_model` builds the architecture recorded in the weights' JSON
card (``segfast/demo/weights/nuclei_unet.json``) and loads the committed
weights; :func:`predict_proba` runs the whole contract on one image.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segfast.errors import InputError, WeightsError

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
# The committed demo weights (fp32 safetensors) and their card (JSON) beside them.
DEMO_WEIGHTS = WEIGHTS_DIR / "nuclei_unet.safetensors"
# Percentiles of each image mapped to 0 and 1 by :func:`normalize`: the 1st is
# background in any field with fewer than ~99 % nuclei; 99.8 lets the brightest
# specks saturate instead of squashing the nuclei.
NORM_PERCENTILES = (1.0, 99.8)
CLASSES = ("background", "nucleus")


def card_path(weights: str | os.PathLike[str]) -> Path:
    """The JSON card that describes ``weights``: same name, ``.json`` suffix."""
    return Path(weights).with_suffix(".json")


def normalize(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """Per-image percentile normalisation: the model's input contract.

    ``image``: a 2-D grey-level array (any real dtype and range) or a batch
    ``[N, H, W]`` (each image normalised on its own). Returns float32 of the same
    shape with the :data:`NORM_PERCENTILES` percentiles at 0 and 1, clipped to
    [0, 1]. A constant image becomes all zeros. Colour images must be reduced to
    one channel first (e.g. the nuclear-stain channel).
    """
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    a = np.asarray(image)
    if a.ndim not in (2, 3):
        raise InputError(
            f"normalize expects a 2-D image [H, W] or a batch [N, H, W], got shape {a.shape}"
        )
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_) or np.iscomplexobj(a):
        raise InputError(f"normalize expects a real-valued image, got dtype {a.dtype}")
    a = a.astype(np.float32, copy=False)
    if not np.isfinite(a).all():
        raise InputError("normalize got an image with NaN or Inf values")
    axes = (-2, -1)
    lo, hi = np.percentile(a, NORM_PERCENTILES, axis=axes, keepdims=True)
    span = hi - lo
    out = np.where(span > 0, (a - lo) / np.where(span > 0, span, 1.0), 0.0)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def read_card(weights: str | os.PathLike[str] = DEMO_WEIGHTS) -> dict[str, Any]:
    """The JSON card written by :mod:`segfast.demo.train` beside ``weights``."""
    path = card_path(weights)
    if not path.is_file():
        raise WeightsError(
            f"no model card {path} beside {weights}; it records the architecture "
            f"(run `python -m segfast.demo.train --out {weights}` to make both)"
        )
    try:
        card = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise WeightsError(f"model card {path} is not valid JSON: {exc}") from exc
    if not isinstance(card, dict) or "architecture" not in card:
        raise WeightsError(f"model card {path} has no 'architecture' entry")
    return card


def load_demo_model(
    weights: str | os.PathLike[str] = DEMO_WEIGHTS, device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """The demo U-Net with ``weights`` loaded, in eval mode, as float32 on ``device``.

    The architecture (``segfast.models.create`` name and options) comes from the
    weights' card; the key and shape check of :func:`segfast.load_weights` catches
    a card that does not match the file.
    """
    from segfast import models
    from segfast.weights import load_weights

    card = read_card(weights)
    arch = dict(card["architecture"])
    name = arch.pop("name")
    model = models.create(name, **arch)
    load_weights(model, weights)
    return model.float().to(device).eval()


def predict_proba(
    model: torch.nn.Module, image: np.ndarray | torch.Tensor, *, device: str | torch.device = "cpu"
) -> np.ndarray:
    """Nucleus probability float32 ``[H, W]`` of one 2-D image under the contract above."""
    x = normalize(image)
    if x.ndim != 2:
        raise InputError(f"predict_proba expects one 2-D image, got shape {x.shape}")
    t = torch.from_numpy(x)[None, None].to(device)  # [1, 1, H, W]
    with torch.inference_mode():
        logits = model(t)  # [1, 2, H, W]
        return torch.softmax(logits.float(), dim=1)[0, 1].cpu().numpy()


__all__ = [
    "CLASSES",
    "DEMO_WEIGHTS",
    "NORM_PERCENTILES",
    "card_path",
    "load_demo_model",
    "normalize",
    "predict_proba",
    "read_card",
]
