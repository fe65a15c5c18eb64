"""Per-frame tensor work of the video pipeline: a uint8 H×W×3 frame → the engine's
input (:class:`Preprocessor`), the engine-resolution mask → the frame's size
(:class:`MaskResizer`, nearest neighbour by pixel centres), a postprocessed mask checked
(:func:`check_mask`), and the mask blended into the frame (:class:`Overlayer`). The
fused Triton kernels run on CUDA, their PyTorch references on the CPU."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from segfast.errors import InputError
from segfast.runtime.engine_io import EngineIO

__all__ = [
    "MaskResizer",
    "Overlayer",
    "Preprocessor",
    "check_mask",
    "luma",
    "nearest_index",
    "palette_array",
]


def luma(frames: torch.Tensor, order: str) -> torch.Tensor:
    """uint8 [..., 3] → uint8 [...] ITU-R BT.601 luma, for one-channel engines."""
    w = (0.299, 0.587, 0.114) if order == "rgb" else (0.114, 0.587, 0.299)
    wt = torch.tensor(w, dtype=torch.float32, device=frames.device)
    return (frames.float() @ wt).round_().clamp_(0, 255).to(torch.uint8)


class Preprocessor:
    """uint8 H×W×3 frame → engine input [1, C, h, w], on the engine's device."""

    def __init__(
        self,
        io: EngineIO,
        size: tuple[int, int] | None,
        mean: tuple[float, ...] | None,
        std: tuple[float, ...] | None,
        order: str,
        custom: Callable[[torch.Tensor], torch.Tensor] | None,
        *,
        any_batch: bool = False,  # frames are batched by the caller (multi-stream)
    ) -> None:
        from segfast.kernels.preprocess import preprocess, preprocess_reference

        if io.batch is not None and io.batch != 1 and not any_batch:
            raise InputError(
                f"video runs one frame per call; this engine's batch is fixed at {io.batch} "
                f"(compile with batch 1 or a dynamic batch)"
            )
        if custom is None and io.channels not in (1, 3):
            raise InputError(
                f"frames have 3 colour channels (or 1 as luma); this engine takes "
                f"{io.channels}: pass preprocess= to build its input yourself"
            )
        if io.static_hw is not None and size is not None and tuple(size) != io.static_hw:
            raise InputError(
                f"size {size[0]}×{size[1]} differs from this static engine's input "
                f"{io.static_hw[0]}×{io.static_hw[1]}"
            )
        self.io = io
        self.size = io.static_hw or (tuple(size) if size is not None else None)
        c = io.channels
        self.mean = tuple(mean) if mean is not None else (0.0,) * c
        self.std = tuple(std) if std is not None else (1.0,) * c
        # One value for every channel, as --mean 0.5 says.
        self.mean = self.mean * c if len(self.mean) == 1 else self.mean
        self.std = self.std * c if len(self.std) == 1 else self.std
        if custom is None and (len(self.mean) != c or len(self.std) != c):
            raise InputError(
                f"mean and std need {c} value(s) for this engine, got {self.mean}, {self.std}"
            )
        self.order = order
        self.custom = custom
        self.fn = preprocess if io.device.type == "cuda" else preprocess_reference
        self.checked: tuple[int, int] | None = None

    def __call__(self, frame: torch.Tensor) -> torch.Tensor:
        # frame: [H, W, 3] uint8 on the engine's device
        h, w = int(frame.shape[0]), int(frame.shape[1])
        target = self.size or (h, w)
        if self.custom is None and self.checked != (h, w):
            self.io.check_hw(target, "the inference size")
            self.checked = (h, w)
        if self.custom is not None:
            x = self.custom(frame[None])
            if (
                not isinstance(x, torch.Tensor)
                or x.dim() != 4
                or tuple(x.shape[:2]) != (1, self.io.channels)
            ):
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise InputError(
                    f"preprocess returned {got}; the engine needs [1, {self.io.channels}, h, w]"
                )
            return x.to(self.io.input_dtype)
        src = luma(frame, self.order) if self.io.channels == 1 else frame
        return self.fn(
            src,
            size=None if target == (h, w) else target,
            mean=self.mean,
            std=self.std,
            input_order=self.order,
            dtype=self.io.input_dtype,
        )


def nearest_index(src: int, dst: int, device: torch.device) -> torch.Tensor:
    """Source indices of nearest-neighbour resampling by pixel centres, src → dst."""
    i = (torch.arange(dst, dtype=torch.float64) + 0.5) * (src / dst)
    return i.floor().long().clamp_(max=src - 1).to(device)


class MaskResizer:
    """Engine-resolution masks [h, w] → the frame's size [H, W] by nearest neighbour
    (pixel centres), on the mask's device; the index vectors are cached per size pair."""

    def __init__(self) -> None:
        self._index_of_nearest: dict[
            tuple[int, int, int, int], tuple[torch.Tensor, torch.Tensor]
        ] = {}

    def __call__(self, m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        # m: [h, w]; size: the frame's (H, W)
        H, W = size
        h, w = int(m.shape[0]), int(m.shape[1])
        if (h, w) == (H, W):
            return m
        key = (h, w, H, W)
        if key not in self._index_of_nearest:
            self._index_of_nearest[key] = (
                nearest_index(h, H, m.device),
                nearest_index(w, W, m.device),
            )
        iy, ix = self._index_of_nearest[key]
        return m[iy][:, ix]  # [H, W]


def check_mask(mask: Any, hw: tuple[int, int]) -> np.ndarray:
    """A postprocess function's result as an H×W integer mask (bool → uint8), or InputError."""
    if not isinstance(mask, np.ndarray) or tuple(mask.shape) != hw:
        got = tuple(mask.shape) if isinstance(mask, np.ndarray) else type(mask).__name__
        raise InputError(f"postprocess must return an H×W {hw} numpy mask, got {got}")
    if mask.dtype == np.bool_:
        return mask.astype(np.uint8)
    if mask.dtype in (np.uint8, np.int32, np.int64):
        return np.ascontiguousarray(mask)
    if np.issubdtype(mask.dtype, np.integer):
        return mask.astype(np.int64)
    raise InputError(f"postprocess must return an integer or bool mask, got {mask.dtype}")


def palette_array(palette: Any, k: int, order: str) -> torch.Tensor:
    """The overlay palette: K×3 uint8 colours in ``order`` (default: the VOC colour map
    for ``k`` classes, at least 2)."""
    from segfast.kernels.overlay import default_palette

    if palette is None:
        return default_palette(max(k, 2), order=order)
    p = torch.as_tensor(np.asarray(palette, dtype=np.uint8))
    if p.dim() != 2 or p.shape[1] != 3 or p.shape[0] < 1:
        raise InputError(f"palette must be K×3 uint8 colours, got shape {tuple(p.shape)}")
    return p


class Overlayer:
    """Blends a mask into its frame with ``palette`` at opacity ``alpha``: the fused
    kernel on a CUDA device (:func:`segfast.kernels.overlay.overlay`, on the device
    copies), its reference on the CPU (on the host arrays)."""

    def __init__(self, palette: torch.Tensor, alpha: float, device: torch.device) -> None:
        self.palette = palette
        self.alpha = alpha
        self.device = device
        self._palette_dev: torch.Tensor | None = None

    def __call__(
        self,
        image: np.ndarray,
        mask: np.ndarray,
        device_image: torch.Tensor,
        device_mask: torch.Tensor,
    ) -> np.ndarray:
        """H×W×3 uint8: ``image`` with ``mask`` blended in (``device_image`` and
        ``device_mask`` are the same on the engine's device)."""
        if self.device.type == "cuda":
            from segfast.kernels.overlay import overlay

            if self._palette_dev is None:
                self._palette_dev = self.palette.to(self.device)
            ov = overlay(device_image, device_mask, self._palette_dev, alpha=self.alpha)
        else:
            from segfast.kernels.overlay import overlay_reference

            ov = overlay_reference(
                torch.from_numpy(image), torch.from_numpy(mask), self.palette, alpha=self.alpha
            )
        return ov.cpu().numpy()
