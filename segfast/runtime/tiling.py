"""Overlap-tile inference for images larger than a network's input (Ronneberger et al.
2015, "U-Net", Fig. 2: "overlap-tile strategy", borders extrapolated by mirroring).

The image is cut into tiles of the engine's input size on a regular grid with stride
``tile − overlap``; each tile sees ``overlap / 2`` pixels of context on each side of the
region it is responsible for. At the image borders the missing context is the mirror
image of the border (reflection without repeating the edge pixel, numpy's and
PyTorch's ``"reflect"``; repeated for tiles wider than the image). Tiles go through
the engine in batches, and the per-tile results are joined by one of two blends:

* ``"crop"`` — each tile keeps only its centre (the tile minus ``overlap / 2`` on each
  side); the kept centres tile the image exactly. With a fully convolutional network
  whose receptive-field radius is at most ``overlap / 2`` this reproduces the
  whole-image result exactly away from the image border (the tests show it). Works with
  every engine output kind, masks included.
* ``"gaussian"`` — every tile's class probabilities (softmax, or sigmoid for one class)
  are weighted by a Gaussian window (σ = ``sigma`` × tile size, 1/8 by default as in
  nnU-Net) and summed; each pixel is divided by its total weight. Seams disappear, at
  the cost of blending in tile-edge predictions with small weights. Needs an engine that
  outputs logits or probabilities (a mask cannot be averaged).

Memory is bounded by a tile row, not by the image: the image (numpy array, ``np.memmap``
or torch tensor, uint8 / uint16 / float) is read tile by tile — a 10000×10000 uint8
memmap is never copied or converted to float as a whole. What is held besides the
result: one batch of tiles in and out of the engine (``batch`` × C × tile² input
values plus the engine's activations), and, for ``"gaussian"``, one band of
accumulated probabilities K × tile × (W + overlap) fp32 (2 classes, tile 512, a
10000-pixel-wide image: 41 MB); the Gaussian's weight sum is separable and kept as one
row and one column vector. The result is allocated in full — a uint8 H×W mask
(int32 above 256 classes), or fp32 K×H×W probabilities (4·K bytes a pixel: pass
``out=``, e.g. an ``np.memmap``, to keep them on disk).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from segfast.errors import InputError
from segfast.runtime._progress import Progress
from segfast.runtime.engine_io import EngineIO

BLENDS = ("gaussian", "crop")
OUTPUTS = ("mask", "probs")
DEFAULT_TILE = 512  # dynamic engines only; a static engine's tile is its input size
DEFAULT_BATCH = 4  # dynamic-batch engines only; a static engine's batch is its own
_FINALIZE_COLS = 256  # finished band rows are normalised this many columns at a time

Normalize = Callable[[torch.Tensor], torch.Tensor]

_SCALES: dict[Any, float] = {
    np.dtype(np.uint8): 1 / 255,
    np.dtype(np.uint16): 1 / 65535,
    np.dtype(np.float16): 1.0,
    np.dtype(np.float32): 1.0,
    np.dtype(np.float64): 1.0,
}


@dataclass(frozen=True)
class TileGrid:
    """Where the tiles of an H×W image lie (image coordinates; negative = mirrored).

    Tile ``(i, j)`` covers rows ``row0(i) .. row0(i) + th`` and columns
    ``col0(j) .. col0(j) + tw``; its centre (what ``"crop"`` keeps) is rows
    ``i·sy .. (i+1)·sy`` and columns ``j·sx .. (j+1)·sx``, clipped to the image.
    """

    height: int
    width: int
    th: int  # tile height, width
    tw: int
    oy: int  # overlap along y, x
    ox: int

    @property
    def sy(self) -> int:  # stride along y
        return self.th - self.oy

    @property
    def sx(self) -> int:
        return self.tw - self.ox

    @property
    def top(self) -> int:  # context above / left of a tile's centre
        return self.oy // 2

    @property
    def left(self) -> int:
        return self.ox // 2

    @property
    def rows(self) -> int:
        return -(-self.height // self.sy)

    @property
    def cols(self) -> int:
        return -(-self.width // self.sx)

    def row0(self, i: int) -> int:
        return i * self.sy - self.top

    def col0(self, j: int) -> int:
        return j * self.sx - self.left


def reflect_index(idx: np.ndarray, n: int) -> np.ndarray:
    """Map indices outside [0, n) into it by mirroring at the borders (edge not repeated,
    as ``np.pad(mode="reflect")``), repeatedly for indices far outside."""
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    m = np.mod(idx, period)
    return np.where(m >= n, period - m, m)


def gaussian_window(size: int, sigma: float) -> np.ndarray:
    """1-D Gaussian of ``size`` samples, σ = ``sigma``·size, peak 1, floored at 1e-6 so
    every pixel of a tile keeps a positive weight."""
    x = (np.arange(size, dtype=np.float64) - (size - 1) / 2) / (sigma * size)
    return np.maximum(np.exp(-0.5 * x * x), 1e-6)


def _weight_sum(n: int, starts: list[int], window: np.ndarray) -> np.ndarray:
    """Σ over tiles of the 1-D window, for each of the n image positions."""
    total = np.zeros(n, dtype=np.float64)
    for s in starts:
        lo, hi = max(s, 0), min(s + len(window), n)
        total[lo:hi] += window[lo - s : hi - s]
    return total


def scale_normalize(scale: float) -> Normalize:
    """``x · scale`` (e.g. 1/255)."""

    def normalize(x: torch.Tensor) -> torch.Tensor:
        return x * scale

    return normalize


def mean_std(
    mean: tuple[float, ...], std: tuple[float, ...], *, scale: float = 1 / 255
) -> Normalize:
    """``(x · scale − mean) / std`` per channel (mean/std in units of x · scale, e.g.
    ImageNet's (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225) for uint8 RGB)."""
    if len(mean) != len(std) or any(s == 0 for s in std):
        raise ValueError(f"mean and std must have equal lengths and std ≠ 0, got {mean}, {std}")
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def normalize(x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != len(mean):
            raise InputError(f"mean/std have {len(mean)} channels, the tiles {x.shape[1]}")
        return (x * scale - m.to(x.device)) / s.to(x.device)

    return normalize


def percentile_normalize(
    image: np.ndarray | torch.Tensor,
    low: float = 1.0,
    high: float = 99.8,
    *,
    max_samples: int = 1 << 20,
) -> Normalize:
    """``(x − p_low) / (p_high − p_low)`` with the image's percentiles (all channels
    together), as microscopy pipelines normalise (CSBDeep's ``normalize``).

    The percentiles come from a regular subsample of at most ~``max_samples`` pixels
    (every k-th row and column), so a memmapped image is not read in full.
    """
    if not 0.0 <= low < high <= 100.0:
        raise ValueError(f"need 0 ≤ low < high ≤ 100, got {low}, {high}")
    h, w = int(image.shape[0]), int(image.shape[1])
    step = max(1, math.ceil(math.sqrt(h * w / max_samples)))
    sample = image[::step, ::step]
    sample = sample.cpu().numpy() if isinstance(sample, torch.Tensor) else np.asarray(sample)
    lo, hi = (float(v) for v in np.percentile(sample.astype(np.float64), [low, high]))
    span = hi - lo if hi > lo else 1.0

    def normalize(x: torch.Tensor) -> torch.Tensor:
        return (x - lo) / span

    return normalize


class _Image:
    """The input image behind a uniform tile reader: numpy (memmaps included) or torch."""

    def __init__(self, image: Any, engine_channels: int) -> None:
        if isinstance(image, torch.Tensor):
            t = image.detach()
            if t.device.type == "cpu":
                self.data: Any = t.numpy()  # a view, no copy
            else:
                self.data = t
        elif isinstance(image, np.ndarray) or is_region_reader(image):
            self.data = image
        else:
            raise InputError(
                f"image must be a numpy array (memmaps included), a torch tensor or a "
                f"region reader (segfast.runtime.largeimage), got {type(image).__name__}"
            )
        shape = tuple(int(d) for d in self.data.shape)
        if len(shape) not in (2, 3):
            raise InputError(f"image must be H×W or H×W×C, got shape {shape}")
        if len(shape) == 3 and shape[2] > 4 and shape[0] <= 4:
            raise InputError(
                f"image must be H×W×C (channels last), got shape {shape}, which looks "
                f"channels-first: transpose it to H×W×C"
            )
        self.height, self.width = shape[0], shape[1]
        self.channels = shape[2] if len(shape) == 3 else 1
        if self.height < 1 or self.width < 1 or self.channels < 1:
            raise InputError(f"image must not be empty, got shape {shape}")
        dt = self._numpy_dtype()
        if dt not in _SCALES:
            raise InputError(
                f"image dtype must be uint8, uint16, float16, float32 or float64, got "
                f"{self.data.dtype}"
            )
        self.dtype = dt
        if self.channels != engine_channels and not (self.channels == 1 and engine_channels == 3):
            raise InputError(
                f"image has {self.channels} channel(s), the engine takes {engine_channels}"
                + (" (convert the image to grayscale first)" if engine_channels == 1 else "")
            )
        self.replicate = self.channels == 1 and engine_channels == 3

    def _numpy_dtype(self) -> np.dtype | None:
        if not isinstance(self.data, torch.Tensor):
            return np.dtype(self.data.dtype)
        names = {
            torch.uint8: np.uint8,
            torch.float16: np.float16,
            torch.float32: np.float32,
            torch.float64: np.float64,
        }
        if hasattr(torch, "uint16"):
            names[torch.uint16] = np.uint16
        dt = names.get(self.data.dtype)
        return np.dtype(dt) if dt is not None else None

    @property
    def device(self) -> torch.device:
        return self.data.device if isinstance(self.data, torch.Tensor) else torch.device("cpu")

    def take(self, ry: np.ndarray, rx: np.ndarray) -> Any:
        """Tile rows ``ry`` × columns ``rx`` (in-image indices) → th×tw[×C], a copy.

        Contiguous index ranges become slices (the common, interior case); a mirrored
        range is gathered. A column slice is taken first (a view) so that gathering rows
        of a memmap reads only the tile's columns.
        """
        d = self.data
        sy, sx = _as_slice(ry), _as_slice(rx)
        if is_region_reader(d):  # read the bounding box (mirrored rows lie inside it)
            y0, y1 = int(ry.min()), int(ry.max()) + 1
            x0, x1 = int(rx.min()), int(rx.max()) + 1
            box = d.read(y0, y1, x0, x1)
            if sy is not None and sx is not None:
                return box
            return box[np.ix_(ry - y0, rx - x0)]
        if isinstance(d, torch.Tensor):
            iy = sy if sy is not None else torch.as_tensor(ry, device=d.device)
            ix = sx if sx is not None else torch.as_tensor(rx, device=d.device)
            if sy is None and sx is None:
                return d[iy[:, None], ix[None, :]]
            return d[iy][:, ix] if sx is None else d[:, ix][iy]
        if sy is not None and sx is not None:
            return d[sy, sx]
        if sy is None and sx is None:
            return d[np.ix_(ry, rx)]
        return d[sy][:, rx] if sx is None else d[:, sx][ry]


def is_region_reader(obj: Any) -> bool:
    """Whether ``obj`` reads regions on demand: ``shape`` (H, W[, C]), ``dtype`` and
    ``read(y0, y1, x0, x1) -> ndarray`` (e.g. :class:`~segfast.runtime.largeimage.TiffRegionReader`)."""
    return (
        not isinstance(obj, np.ndarray | torch.Tensor)
        and callable(getattr(obj, "read", None))
        and hasattr(obj, "shape")
        and hasattr(obj, "dtype")
    )


def _as_slice(idx: np.ndarray) -> slice | None:
    """``idx`` as a slice when it is a run of consecutive indices, else None."""
    first = int(idx[0])
    if int(idx[-1]) - first == len(idx) - 1 and np.all(np.diff(idx) == 1):
        return slice(first, first + len(idx))
    return None


def _pair(v: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    if isinstance(v, int | np.integer):
        return int(v), int(v)
    if isinstance(v, tuple | list) and len(v) == 2 and all(isinstance(d, int) for d in v):
        return int(v[0]), int(v[1])
    raise InputError(f"{name} must be an int or (height, width), got {v!r}")


def _tile_size(io: EngineIO, tile: int | tuple[int, int] | None) -> tuple[int, int]:
    if io.static_hw is not None:
        if tile is not None and _pair(tile, "tile") != io.static_hw:
            got = _pair(tile, "tile")
            raise InputError(
                f"tile is {got[0]}×{got[1]}, but this static engine takes "
                f"{io.static_hw[0]}×{io.static_hw[1]} inputs: leave tile=None to use the "
                f"engine's size, or compile with dynamic=True"
            )
        return io.static_hw
    th, tw = _pair(tile if tile is not None else DEFAULT_TILE, "tile")
    if th < 1 or tw < 1:
        raise InputError(f"tile must be positive, got {th}×{tw}")
    io.check_hw((th, tw), "tile")
    return th, tw


def _batch_size(io: EngineIO, batch: int | None) -> int:
    if io.batch is not None:
        if batch is not None and batch != io.batch:
            raise InputError(
                f"batch is {batch}, but this engine's batch is fixed at {io.batch} (compile "
                f"with dynamic=['batch', ...] for other batches, or leave batch=None)"
            )
        return io.batch
    b = DEFAULT_BATCH if batch is None else int(batch)
    lo, hi = io.batch_range
    if not lo <= b <= hi:
        raise InputError(f"batch is {b}; this engine takes batches {lo}..{hi}")
    return b


def plan_tiles(
    height: int,
    width: int,
    tile: tuple[int, int],
    overlap: int | tuple[int, int],
) -> TileGrid:
    """The tile grid for an image, after checking 0 ≤ overlap < tile / 2."""
    oy, ox = _pair(overlap, "overlap")
    th, tw = tile
    for o, t, axis in ((oy, th, "height"), (ox, tw, "width")):
        if o < 0 or 2 * o >= t:
            raise InputError(
                f"overlap must be ≥ 0 and less than half the tile (tile {axis} {t}: "
                f"overlap < {(t + 1) // 2}), got {o}"
            )
    return TileGrid(height, width, th, tw, oy, ox)


def segment_large(
    engine: Any,
    image: np.ndarray | torch.Tensor,
    *,
    tile: int | tuple[int, int] | None = None,
    overlap: int | tuple[int, int] = 64,
    blend: str = "gaussian",
    batch: int | None = None,
    output: str = "mask",
    normalize: Normalize | None = None,
    threshold: float | None = None,
    sigma: float = 0.125,
    out: np.ndarray | None = None,
    progress: bool = False,
    tile_rows: tuple[int, int] | None = None,
) -> np.ndarray:
    """Segment an image of any size with the overlap-tile strategy (module docstring).

    Args:
        engine: a :class:`segfast.Engine` with one N×C×H×W input. A static engine's
            tiles are its input size; a dynamic one's are ``tile``.
        image: H×W or H×W×C (channels last, in the channel order the model expects),
            uint8 / uint16 / float, numpy (``np.memmap`` is read tile by tile) or torch
            (a CUDA tensor is tiled on its device). A one-channel image feeds a
            three-channel engine by repetition.
        tile: tile size (int or (h, w)); None: the static engine's size, or 512.
        overlap: pixels shared by neighbouring tiles (int or (y, x)), < tile / 2; each
            tile's centre gets ``overlap / 2`` pixels of context on every side.
        blend: "gaussian" (probabilities × a Gaussian window; needs a logits/probs
            engine) or "crop" (each tile's centre; any engine).
        batch: tiles per engine call; None: a static engine's batch, else 4.
        output: "mask" — uint8 H×W class ids (int32 above 256 classes; one-class models:
            probability > ``threshold``) — or "probs" — fp32 K×H×W probabilities
            (softmax, or sigmoid for one class).
        normalize: tiles → engine input. Called with float32 [B, C, th, tw] tiles (C =
            the engine's channels) in the image's units (0–255 for uint8) on the
            engine's device. It must act per pixel (no tile statistics), or the tiles
            disagree. Default: uint8 ÷ 255, uint16 ÷ 65535, float unchanged. See
            :func:`mean_std`, :func:`percentile_normalize`.
        threshold: one-class models' probability cut (default: the engine's).
        sigma: the Gaussian window's σ as a fraction of the tile size.
        out: an array to write the result into (H×W uint8/int32 for masks, K×H×W
            float16/float32 for probabilities), e.g. an ``np.memmap``.
        progress: show a progress bar (rich) over the tiles.
        tile_rows: ``(i0, i1)``: only tile rows i0..i1 of the grid (:func:`tile_grid`),
            ``blend="crop"`` only. The result is then image rows ``i0·sy ..
            min(i1·sy, H)`` — exactly those rows of the whole-image result, so bands of
            tile rows run anywhere (other processes, other machines) and stacked give
            the whole result. ``out`` takes the band's shape.

    Returns:
        ``out`` or a new array: the mask (H×W) or the probabilities (K×H×W); with
        ``tile_rows``, the band's rows of it.
    """
    io = EngineIO.of(engine)
    if threshold is not None:
        io = dataclasses.replace(io, threshold=float(threshold))
    if blend not in BLENDS:
        raise InputError(f"blend must be one of {BLENDS}, got {blend!r}")
    if output not in OUTPUTS:
        raise InputError(f"output must be one of {OUTPUTS}, got {output!r}")
    if io.output == "mask" and (blend == "gaussian" or output == "probs"):
        what = "gaussian blending averages probabilities" if blend == "gaussian" else None
        what = what or "output='probs' needs probabilities"
        raise InputError(
            f"{what}, but this engine outputs class masks: compile it with output='probs' "
            f"or output='logits'" + (", or use blend='crop'" if blend == "gaussian" else "")
        )
    if not sigma > 0:
        raise InputError(f"sigma must be positive, got {sigma}")
    img = _Image(image, io.channels)
    grid = plan_tiles(img.height, img.width, _tile_size(io, tile), overlap)
    rows = (0, grid.rows)
    if tile_rows is not None:
        if blend != "crop":
            raise InputError("tile_rows (a band of tile rows) needs blend='crop'")
        i0, i1 = (int(v) for v in tile_rows)
        if not 0 <= i0 < i1 <= grid.rows:
            raise InputError(
                f"tile_rows must satisfy 0 ≤ i0 < i1 ≤ {grid.rows} (the grid's tile rows), "
                f"got {tile_rows}"
            )
        rows = (i0, i1)
    nbatch = _batch_size(io, batch)
    if normalize is None:
        normalize = scale_normalize(_SCALES[img.dtype])
    runner = _TileRunner(engine, io, img, grid, nbatch, normalize)
    y_lo, y_hi = rows[0] * grid.sy, min(rows[1] * grid.sy, grid.height)
    result = _allocate(io, img, output, out, y_hi - y_lo)
    bar = Progress(progress, "tiles", (rows[1] - rows[0]) * grid.cols)
    try:
        with torch.inference_mode():
            if blend == "crop":
                _crop_blend(runner, grid, output, result, bar, rows)
            else:
                _gaussian_blend(runner, grid, output, result, sigma, bar)
    finally:
        bar.close()
    return result


def tile_grid(
    engine: Any,
    height: int,
    width: int,
    *,
    tile: int | tuple[int, int] | None = None,
    overlap: int | tuple[int, int] = 64,
) -> TileGrid:
    """The grid :func:`segment_large` uses for an H×W image with this engine (or its
    :class:`EngineIO`), to split the tile rows into bands (``tile_rows``)."""
    io = engine if isinstance(engine, EngineIO) else EngineIO.of(engine)
    return plan_tiles(int(height), int(width), _tile_size(io, tile), overlap)


def _allocate(
    io: EngineIO, img: _Image, output: str, out: np.ndarray | None, height: int
) -> np.ndarray:
    h, w = height, img.width
    if output == "mask":
        k = io.num_classes or 1
        dtype = np.dtype(np.uint8 if k <= 256 else np.int32)
        shape: tuple[int, ...] = (h, w)
        allowed = (np.dtype(np.uint8), np.dtype(np.int32)) if k <= 256 else (np.dtype(np.int32),)
    else:
        if io.num_classes is None:
            raise InputError("the engine does not record its number of classes")
        dtype = np.dtype(np.float32)
        shape = (io.num_classes, h, w)
        allowed = (np.dtype(np.float16), np.dtype(np.float32))
    if out is None:
        return np.empty(shape, dtype=dtype)
    if not isinstance(out, np.ndarray) or tuple(out.shape) != shape or out.dtype not in allowed:
        got = f"{out.dtype} {tuple(out.shape)}" if isinstance(out, np.ndarray) else type(out)
        raise InputError(
            f"out must be a numpy array of shape {shape} and dtype "
            f"{' or '.join(str(a) for a in allowed)}, got {got}"
        )
    return out


class _TileRunner:
    """Cuts tiles of one tile row, runs them through the engine in batches."""

    def __init__(
        self,
        engine: Any,
        io: EngineIO,
        img: _Image,
        grid: TileGrid,
        batch: int,
        normalize: Normalize,
    ) -> None:
        self.engine, self.io, self.img, self.grid = engine, io, img, grid
        self.batch, self.normalize = batch, normalize

    def _gather(self, ry: np.ndarray, js: list[int]) -> torch.Tensor:
        """Tiles (·, j) for j in ``js`` of the tile row with image rows ``ry``:
        [b, th, tw, C] in the image's dtype (uint16 widened to int32: torch has few
        uint16 kernels), on the image's device."""
        g, img = self.grid, self.img
        cols = [reflect_index(np.arange(g.col0(j), g.col0(j) + g.tw), img.width) for j in js]
        if isinstance(img.data, torch.Tensor):
            return torch.stack([img.take(ry, rx).reshape(g.th, g.tw, -1) for rx in cols])
        dtype = np.int32 if img.dtype == np.uint16 else img.dtype
        buf = np.empty((len(js), g.th, g.tw, img.channels), dtype=dtype)
        for k, rx in enumerate(cols):
            buf[k] = img.take(ry, rx).reshape(g.th, g.tw, img.channels)  # one copy
        return torch.from_numpy(buf)

    def row(self, i: int) -> Iterator[tuple[list[int], torch.Tensor]]:
        """Yield (column indices j, engine output for tiles (i, j)) batch by batch."""
        g, img = self.grid, self.img
        ry = reflect_index(np.arange(g.row0(i), g.row0(i) + g.th), img.height)
        for j0 in range(0, g.cols, self.batch):
            js = list(range(j0, min(j0 + self.batch, g.cols)))
            x = self._gather(ry, js)  # [b, th, tw, C_img]
            x = x.to(self.io.device).permute(0, 3, 1, 2).float()  # [b, C_img, th, tw]
            if self.img.replicate:
                x = x.expand(-1, 3, -1, -1)
            x = self.normalize(x)
            if tuple(x.shape) != (len(js), self.io.channels, g.th, g.tw):
                raise InputError(
                    f"normalize returned shape {tuple(x.shape)}, expected "
                    f"{(len(js), self.io.channels, g.th, g.tw)}"
                )
            pad = self.batch - len(js) if self.io.batch is not None else 0
            if pad:  # a static batch: fill it with copies of the last tile, drop them after
                x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
            x = x.to(self.io.input_dtype).contiguous()
            y = self.engine(x)[: len(js)]
            del x  # only one batch of inputs and outputs is alive at a time
            if tuple(y.shape[-2:]) != (g.th, g.tw):
                raise InputError(
                    f"the engine returned {tuple(y.shape)} for {g.th}×{g.tw} tiles; "
                    f"overlap-tile inference needs an output the size of the input"
                )
            yield js, y


def _write_mask(result: np.ndarray, rows: slice, cols: slice, mask: torch.Tensor) -> None:
    result[rows, cols] = mask.cpu().numpy()


def _crop_blend(
    runner: _TileRunner,
    g: TileGrid,
    output: str,
    result: np.ndarray,
    bar: Progress,
    rows: tuple[int, int],
) -> None:
    """Each tile writes its centre (clipped to the image) straight into the result,
    which holds image rows ``rows[0]·sy`` onwards (all of them for the whole grid)."""
    io = runner.io
    base = rows[0] * g.sy
    for i in range(*rows):
        y0, y1 = i * g.sy - base, min((i + 1) * g.sy, g.height) - base
        ty = slice(g.top, g.top + (y1 - y0))
        for js, y in runner.row(i):
            for k, j in enumerate(js):
                x0, x1 = j * g.sx, min((j + 1) * g.sx, g.width)
                tx = slice(g.left, g.left + (x1 - x0))
                if output == "mask":
                    m = io.to_mask(y[k : k + 1])[0, ty, tx]  # [h, w]
                    _write_mask(result, slice(y0, y1), slice(x0, x1), m)
                else:
                    p = io.to_probs(y[k : k + 1])[0, :, ty, tx]  # [K, h, w]
                    result[:, y0:y1, x0:x1] = p.cpu().numpy()
            bar.update(len(js))


def _gaussian_blend(
    runner: _TileRunner,
    g: TileGrid,
    output: str,
    result: np.ndarray,
    sigma: float,
    bar: Progress,
) -> None:
    """Σ probs·window over tiles, one band of tile rows at a time, ÷ Σ window."""
    io, dev = runner.io, runner.io.device
    wy, wx = gaussian_window(g.th, sigma), gaussian_window(g.tw, sigma)
    # The grid is a full product of row and column positions, so the total weight at
    # (y, x) is Σ_i wy(y − row0 i) · Σ_j wx(x − col0 j): two vectors, not an H×W map.
    sum_y = _weight_sum(g.height, [g.row0(i) for i in range(g.rows)], wy)
    sum_x = _weight_sum(g.width, [g.col0(j) for j in range(g.cols)], wx)
    sum_x_t = torch.as_tensor(sum_x, dtype=torch.float32, device=dev)  # [W]
    window = torch.as_tensor(np.outer(wy, wx), dtype=torch.float32, device=dev)  # [th, tw]
    band_w = (g.cols - 1) * g.sx + g.tw  # band column c ↔ image column c − left
    # [th, band_w, K] fp32 (classes last, like the channels-last outputs of the fused
    # backends), rows row0(i) .. row0(i) + th of the image.
    band: torch.Tensor | None = None
    for i in range(g.rows):
        for js, y in runner.row(i):
            p = (io.to_probs(y) * window).permute(0, 2, 3, 1)  # [b, th, tw, K]
            if band is None:
                band = torch.zeros(g.th, band_w, p.shape[3], dtype=torch.float32, device=dev)
            for k, j in enumerate(js):
                band[:, j * g.sx : j * g.sx + g.tw] += p[k]
            del p, y  # free this batch before the next one is computed
            bar.update(len(js))
        assert band is not None
        # Rows row0(i) .. row0(i) + sy get no more tiles (the last tile row: all of them).
        last = i == g.rows - 1
        done = g.th if last else g.sy
        r0 = g.row0(i)
        lo, hi = max(r0, 0), min(r0 + done, g.height)
        if hi > lo:
            sum_y_t = torch.as_tensor(sum_y[lo:hi], dtype=torch.float32, device=dev)
            # Column chunks keep the temporaries (rows × chunk × K) small next to the band.
            for c0 in range(0, g.width, _FINALIZE_COLS):
                c1 = min(c0 + _FINALIZE_COLS, g.width)
                acc = band[lo - r0 : hi - r0, g.left + c0 : g.left + c1]  # [rows, cols, K]
                weight = sum_y_t[:, None] * sum_x_t[None, c0:c1]  # [rows, cols]
                if output == "mask":
                    m = _mask_of_weighted(acc, weight, io.threshold)
                    _write_mask(result, slice(lo, hi), slice(c0, c1), m)
                else:
                    probs = (acc / weight[..., None]).permute(2, 0, 1)  # [K, rows, cols]
                    result[:, lo:hi, c0:c1] = probs.cpu().numpy()
        if not last:
            band[: g.th - g.sy] = band[g.sy :].clone()
            band[g.th - g.sy :] = 0


def _mask_of_weighted(acc: torch.Tensor, weight: torch.Tensor, threshold: float) -> torch.Tensor:
    """Class mask of Σ w·p (``acc`` [rows, cols, K]) with Σ w = ``weight`` [rows, cols].

    The division by a positive weight changes no argmax, so only one-class models
    (a threshold on the probability) need the weight. Two classes compare directly:
    ``argmax`` over a 2-long last dimension is ~20× slower on the CPU.
    """
    k = acc.shape[-1]
    if k == 1:
        return (acc[..., 0] > threshold * weight).to(torch.uint8)
    if k == 2:
        return (acc[..., 1] > acc[..., 0]).to(torch.uint8)  # ties → class 0, as argmax
    return acc.argmax(-1).to(torch.uint8 if k <= 256 else torch.int32)
