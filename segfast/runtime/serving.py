"""What an HTTP segmentation service does with a request, independent of the server
that carries it (``segfast serve`` runs it on Ray Serve: :mod:`segfast.commands.serve`).

* :func:`decode_request` — encoded image bytes (PNG, JPEG, TIFF, BMP, WebP: anything
  FFmpeg decodes as one still image) → an H×W×3 uint8 frame in ``order``, checked
  before any pixel is decoded: an empty body, bytes that are not an image, an image
  over ``max_pixels`` or with a channel count the engine cannot take each raise
  :class:`BadRequest` with its HTTP status and a one-line reason.
* :class:`SegmentService` — a batch of frames → class masks at each frame's own size:
  the video runtime's preprocessing (resize to the engine's size, ÷255, mean/std),
  one :class:`~segfast.runtime.batching.BatchRunner` call for the batch, the engine's
  own mask semantics, nearest-neighbour back to the frame's size.
* :func:`encode_mask` — the response body: a PNG of class ids (8-bit gray; 16-bit
  above 256 classes) or JSON with the class areas and the mask run-length encoded.

Run-length encoding (JSON): the mask read row by row, as ``[[class, run], ...]`` pairs —
``{"height": H, "width": W, "order": "row-major", "runs": [[0, 812], [3, 14], ...]}``;
``sum(run) == H·W``. :func:`decode_rle` inverts it.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from segfast.errors import InputError
from segfast.runtime.batching import BatchRunner
from segfast.runtime.engine_io import EngineIO
from segfast.runtime.frames import MaskResizer, Preprocessor
from segfast.runtime.sources import require_av
from segfast.runtime.writers import encode_png

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "BadRequest",
    "SegmentService",
    "decode_request",
    "decode_rle",
    "encode_mask",
    "rle",
]

DEFAULT_MAX_PIXELS = 40_000_000  # 40 MP: a 6000×6000 photo passes, a decompression bomb not
FORMATS = ("png", "json")


class BadRequest(InputError):
    """A request the service refuses: ``status`` is its HTTP status code."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def decode_request(
    body: bytes, *, channels: int, max_pixels: int = DEFAULT_MAX_PIXELS, order: str = "bgr"
) -> np.ndarray:
    """Image bytes → H×W×3 uint8 frame in ``order`` for an engine of ``channels`` (1 or
    3); raises :class:`BadRequest` (see the module docstring)."""
    if not body:
        raise BadRequest(400, "empty body: POST the encoded image (PNG, JPEG, TIFF) as the body")
    av = require_av()
    try:
        container = av.open(io.BytesIO(body), mode="r")
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise BadRequest(415, f"not an image: FFmpeg cannot read the body ({exc})") from None
    try:
        if not container.streams.video:
            raise BadRequest(415, "not an image: the body holds no picture")
        stream = container.streams.video[0]
        cc = stream.codec_context
        w, h = int(cc.width or 0), int(cc.height or 0)
        if w * h > max_pixels:
            raise BadRequest(
                413, f"image is {w}×{h} = {w * h} pixels, over the limit of {max_pixels}"
            )
        if stream.frames > 1:
            raise BadRequest(415, f"the body holds {stream.frames} frames; POST one still image")
        try:
            frame = next(container.decode(stream))
        except (av.error.FFmpegError, OSError, ValueError, StopIteration) as exc:
            raise BadRequest(
                415, f"not an image: the picture cannot be decoded ({exc or 'no frame'})"
            ) from None
        if frame.width * frame.height > max_pixels:
            raise BadRequest(
                413, f"image is {frame.width}×{frame.height}, over the limit of {max_pixels} pixels"
            )
        pix = frame.format.name  # gray, gray16be, rgb24, rgba, yuvj420p, pal8, ya8...
        have = 3 if frame.format.has_palette else len(frame.format.components)  # alpha counts
        if have not in (1, 3) or (channels == 3 and have != 3):
            raise BadRequest(
                422,
                f"image has {have} channel(s) ({pix}); this engine takes "
                + ("3-channel colour images" if channels == 3 else "gray or colour images"),
            )
        if have == 1:  # a gray image for a one-channel engine: its luma is itself
            gray = frame.to_ndarray(format="gray")
            return np.repeat(gray[:, :, None], 3, axis=2)
        return frame.to_ndarray(format="bgr24" if order == "bgr" else "rgb24")
    finally:
        container.close()


def rle(mask: np.ndarray) -> list[list[int]]:
    """``[[class, run], ...]`` of an H×W mask read row by row."""
    flat = np.ascontiguousarray(mask).reshape(-1)
    if flat.size == 0:
        return []
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate([[0], change])
    runs = np.diff(np.concatenate([starts, [flat.size]]))
    return [[int(flat[s]), int(n)] for s, n in zip(starts, runs, strict=True)]


def decode_rle(data: dict[str, Any]) -> np.ndarray:
    """The H×W int64 mask of a JSON response (its ``height``, ``width``, ``runs``)."""
    values = [v for v, _ in data["runs"]]
    counts = [n for _, n in data["runs"]]
    return np.repeat(np.asarray(values, np.int64), counts).reshape(data["height"], data["width"])


def encode_mask(mask: np.ndarray, fmt: str = "png") -> tuple[bytes, str]:
    """(body, content type) of a response: a PNG of class ids, or JSON (class areas in
    pixels and the row-major run-length encoding)."""
    if fmt == "png":
        top = int(mask.max(initial=0))
        if top > 65535:
            raise InputError(f"class id {top} does not fit a 16-bit PNG: ask for format=json")
        if top > 255:
            img = mask.astype(np.uint16)
            return encode_png(img, "gray16be"), "image/png"
        return encode_png(mask.astype(np.uint8), "gray"), "image/png"
    if fmt == "json":
        classes, counts = np.unique(mask, return_counts=True)
        body = {
            "height": int(mask.shape[0]),
            "width": int(mask.shape[1]),
            "areas": {str(int(c)): int(n) for c, n in zip(classes, counts, strict=True)},
            "order": "row-major",
            "runs": rle(mask),
        }
        return json.dumps(body, separators=(",", ":")).encode(), "application/json"
    raise BadRequest(400, f"format must be one of {FORMATS}, got {fmt!r}")


@dataclass
class ServiceInfo:
    """What ``GET /healthz`` reports."""

    engine: str
    input: str
    output: str
    classes: int | None
    batching: str


class SegmentService:
    """Frames → masks with one engine, batched (module docstring). Thread-compatible
    but not thread-safe: one service per replica, called by one batch at a time."""

    def __init__(
        self,
        engine: Any,
        *,
        max_batch: int | None = None,
        size: tuple[int, int] | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        order: str = "bgr",
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.engine = engine
        self.io = EngineIO.of(engine)
        self.pre = Preprocessor(self.io, size, mean, std, order, None, any_batch=True)
        self.runner = BatchRunner(engine, self.io, max_batch)
        self.resize = MaskResizer()
        self.order = order
        self.max_pixels = max_pixels
        if self.io.channels not in (1, 3):
            raise InputError(
                f"the service takes images: engines with 1 or 3 input channels, this one "
                f"takes {self.io.channels}"
            )

    def info(self) -> ServiceInfo:
        shape = "×".join(str(d) for d in (self.io.channels, *(self.io.static_hw or ("H", "W"))))
        return ServiceInfo(
            engine=repr(self.engine),
            input=shape,
            output=self.io.output,
            classes=self.io.num_classes,
            batching=self.runner.mode,
        )

    def decode(self, body: bytes) -> np.ndarray:
        """The request's image, refused (422) when the engine cannot take its size — before
        it joins a batch, whose other requests it would fail."""
        frame = decode_request(
            body, channels=self.io.channels, max_pixels=self.max_pixels, order=self.order
        )
        hw = self.pre.size or (int(frame.shape[0]), int(frame.shape[1]))
        try:
            self.io.check_hw(hw, "the image size" if self.pre.size is None else "the input size")
        except InputError as exc:
            raise BadRequest(422, str(exc)) from exc
        return frame

    def segment(self, frames: list[np.ndarray]) -> list[np.ndarray | Exception]:
        """H×W×3 uint8 frames → H×W class masks (uint8; int32 above 256 classes), one
        batched pass. A batch that fails runs again frame by frame, so that a frame the
        engine refuses fails alone: its place holds the exception (:class:`BadRequest`
        422 for an :class:`InputError`), the others their masks."""
        if not frames:
            return []
        try:
            return list(self._segment(frames))
        except Exception:
            if len(frames) == 1:
                raise
        out: list[np.ndarray | Exception] = []
        for f in frames:
            try:
                out.extend(self._segment([f]))
            except InputError as exc:
                out.append(exc if isinstance(exc, BadRequest) else BadRequest(422, str(exc)))
            except Exception as exc:  # this frame's own failure; the others still answer
                out.append(exc)
        return out

    def _segment(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        dev = self.io.device
        with torch.inference_mode():
            xs = [self.pre(torch.from_numpy(np.ascontiguousarray(f)).to(dev)) for f in frames]
            results = self.runner.run(xs, self.io.to_mask)
            out = []
            for f, (m, _, _) in zip(frames, results, strict=True):
                out.append(self.resize(m, (int(f.shape[0]), int(f.shape[1]))).cpu().numpy())
        return out
