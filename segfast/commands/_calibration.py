"""Calibration inputs for the command line: ``--calibration FILE.npy`` (an N×C×H×W
array: N inputs) or ``--calibration DIR`` (every ``*.npy`` in it, sorted, each one
input C×H×W or 1×C×H×W). Images are not read here: an engine's inputs are already
preprocessed (normalised, in the model's channel order), and only the user knows how."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segfast.errors import InputError


def _load(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"--calibration: {path} is not a readable .npy array ({exc})") from exc


def load_calibration(path: str | Path) -> list[np.ndarray]:
    """The calibration inputs at ``path`` as a list of 1×C×H×W float arrays."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.npy"))
        if not files:
            raise InputError(f"--calibration: {p} holds no .npy files")
        arrays = [_load(f) for f in files]
        arrays = [a[None] if a.ndim == 3 else a for a in arrays]
    elif p.is_file():
        if p.suffix != ".npy":
            raise InputError(
                f"--calibration: {p} is not a .npy file (images need your preprocessing: save "
                "the model's input tensors with numpy.save)"
            )
        stacked = _load(p)
        if stacked.ndim != 4:
            raise InputError(
                f"--calibration: {p} must hold N×C×H×W inputs, got shape {stacked.shape}"
            )
        arrays = [stacked[i : i + 1] for i in range(stacked.shape[0])]
    else:
        raise InputError(f"--calibration: {p} does not exist")
    for a, name in zip(arrays, [str(p)] * len(arrays), strict=True):
        if a.ndim != 4 or not np.issubdtype(a.dtype, np.floating):
            raise InputError(
                f"--calibration: {name}: inputs must be float C×H×W / N×C×H×W, got "
                f"{a.dtype} {a.shape}"
            )
    return [np.ascontiguousarray(a, dtype=np.float32) for a in arrays]
