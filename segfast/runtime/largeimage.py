"""Images too large to hold: read a region at a time, write a mask a tile row at a time.

* :class:`TiffRegionReader` reads any rectangle of a TIFF's full-resolution image by
  decoding only the TIFF segments (tiles or strips) it covers — a whole-slide image of
  100 000 × 100 000 pixels is never decoded as a whole. The first image of the file is
  read: for a pyramidal TIFF (SubIFDs, or reduced-resolution pages) its level 0. Decoded
  segments are kept in a small LRU cache (``cache_bytes``, 64 MB by default), so the
  overlapping tiles of overlap-tile inference decode each segment about once a tile row.
  Codecs: what tifffile decodes without extra packages (none, deflate/zlib, LZMA,
  PackBits, ...); JPEG, JPEG 2000, LZW and the others need ``imagecodecs`` installed,
  and the error says so.
* :func:`open_large` opens a ``.tif``/``.tiff`` as a reader and a ``.npy`` as a
  read-only memmap; both feed :func:`segfast.runtime.tiling.segment_large`, which reads
  them tile by tile.
* :func:`write_tiled_tiff` writes an H×W mask as a tiled, deflate-compressed TIFF from a
  function that returns rows on demand, one TIFF tile row (256 rows) at a time, through
  a temporary file renamed into place.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from segfast._io import atomic_path
from segfast.errors import InputError

LARGE_SUFFIXES = (".tif", ".tiff", ".npy")
MASK_TILE = 256  # TIFF tile edge of written masks


def _tifffile() -> Any:
    try:
        import tifffile
    except ImportError as exc:  # pragma: no cover - tifffile ships with segfast[batch]
        raise ImportError("reading TIFF needs tifffile: pip install tifffile") from exc
    return tifffile


class TiffRegionReader:
    """Region reads from a TIFF's first full-resolution image (module docstring).

    ``shape`` is (H, W) or (H, W, S) (samples last), ``dtype`` the sample type;
    ``read(y0, y1, x0, x1)`` returns rows y0..y1 × columns x0..x1 as a new array.
    Thread-safe (one lock around the file and the cache).
    """

    def __init__(self, path: str | os.PathLike[str], *, cache_bytes: int = 64 << 20) -> None:
        tifffile = _tifffile()
        self.path = Path(path)
        try:
            self._tf = tifffile.TiffFile(str(self.path))
        except Exception as exc:  # tifffile raises TiffFileError, ValueError, OSError ...
            raise InputError(f"{self.path}: not a readable TIFF ({exc})") from exc
        try:
            self._open_page()
        except BaseException:
            self._tf.close()
            raise
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cached = 0
        self.cache_bytes = int(cache_bytes)
        self.segments_decoded = 0
        self._lock = threading.Lock()

    def _open_page(self) -> None:
        if not self._tf.series:
            raise InputError(f"{self.path}: the TIFF holds no image")
        series = self._tf.series[0]
        level = series.levels[0] if getattr(series, "levels", None) else series
        pages = level.pages
        if len(pages) != 1:
            raise InputError(
                f"{self.path}: its first image has {len(pages)} pages (shape "
                f"{tuple(level.shape)}); segfast reads one 2-D image per file — split the "
                f"stack into files"
            )
        page = pages[0]
        page = page.keyframe if hasattr(page, "keyframe") else page
        if page.planarconfig != 1 and len(page.shape) == 3:
            raise InputError(
                f"{self.path}: planar (separate-plane) samples are not supported; rewrite "
                f"it with contiguous samples (tifffile: planarconfig='contig')"
            )
        if len(page.shape) not in (2, 3) or getattr(page, "imagedepth", 1) != 1:
            raise InputError(f"{self.path}: expected a 2-D image, got shape {page.shape}")
        self._page = page
        self.shape: tuple[int, ...] = tuple(int(d) for d in page.shape)
        self.dtype = np.dtype(page.dtype)
        chunks, chunked = tuple(page.chunks), tuple(page.chunked)
        self._seg_h, self._seg_w = int(chunks[0]), int(chunks[1])
        self._nseg_y, self._nseg_x = int(chunked[0]), int(chunked[1])
        self._offsets = page.dataoffsets
        self._counts = page.databytecounts
        if len(self._offsets) != self._nseg_y * self._nseg_x:
            raise InputError(
                f"{self.path}: {len(self._offsets)} segments for a {self._nseg_y}×"
                f"{self._nseg_x} grid; this layout is not supported"
            )
        self.compression = str(getattr(page.compression, "name", page.compression))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def _segment(self, index: int) -> np.ndarray:
        """Segment ``index`` decoded: [seg_h, seg_w(, S)] (edge segments padded)."""
        hit = self._cache.get(index)
        if hit is not None:
            self._cache.move_to_end(index)
            return hit
        full = (self._seg_h, self._seg_w, *self.shape[2:])
        offset, count = int(self._offsets[index]), int(self._counts[index])
        if count == 0:  # a sparse file's missing segment reads as zeros (TIFF's rule)
            seg = np.zeros(full, self.dtype)
        else:
            fh = self._tf.filehandle
            fh.seek(offset)
            data = fh.read(count)
            if len(data) != count:
                raise InputError(
                    f"{self.path}: truncated — segment {index} needs {count} bytes at "
                    f"offset {offset}, the file holds {len(data)}"
                )
            try:
                decoded, _, _ = self._page.decode(data, index, jpegtables=self._page.jpegtables)
            except Exception as exc:
                hint = (
                    " (this codec needs imagecodecs: pip install imagecodecs)"
                    if "imagecodecs" in str(exc) or isinstance(exc, ImportError | KeyError)
                    else ""
                )
                raise InputError(
                    f"{self.path}: cannot decode segment {index} ({self.compression} "
                    f"compression): {exc}{hint}"
                ) from exc
            if decoded is None:
                raise InputError(f"{self.path}: segment {index} decodes to nothing")
            arr = np.asarray(decoded)
            per_row = self._seg_w * int(np.prod(self.shape[2:], dtype=np.int64))
            rows = arr.size // per_row
            if arr.size != rows * per_row or rows > self._seg_h:
                raise InputError(
                    f"{self.path}: segment {index} decodes to shape {arr.shape}, expected "
                    f"up to {full}"
                )
            arr = arr.reshape((rows, *full[1:]))
            if rows == self._seg_h:
                seg = arr
            else:  # the last strip of a striped file may be short
                seg = np.zeros(full, self.dtype)
                seg[:rows] = arr
        self._cache[index] = seg
        self._cached += seg.nbytes
        self.segments_decoded += 1
        while self._cached > self.cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached -= old.nbytes
        return seg

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Rows ``y0..y1`` × columns ``x0..x1`` (clipped to nothing outside the image:
        callers ask for in-image regions) as a new array."""
        h, w = self.shape[0], self.shape[1]
        if not (0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w):
            raise InputError(f"region rows {y0}..{y1} cols {x0}..{x1} outside {h}×{w}")
        out = np.empty((y1 - y0, x1 - x0, *self.shape[2:]), self.dtype)
        sh, sw = self._seg_h, self._seg_w
        with self._lock:
            for r in range(y0 // sh, (y1 - 1) // sh + 1):
                for c in range(x0 // sw, (x1 - 1) // sw + 1):
                    seg = self._segment(r * self._nseg_x + c)
                    ya, yb = max(y0, r * sh), min(y1, (r + 1) * sh, h)
                    xa, xb = max(x0, c * sw), min(x1, (c + 1) * sw, w)
                    out[ya - y0 : yb - y0, xa - x0 : xb - x0] = seg[
                        ya - r * sh : yb - r * sh, xa - c * sw : xb - c * sw
                    ]
        return out

    def close(self) -> None:
        self._cache.clear()
        self._cached = 0
        self._tf.close()

    def __enter__(self) -> TiffRegionReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"TiffRegionReader({str(self.path)!r}, shape={self.shape}, dtype={self.dtype}, "
            f"segments {self._seg_h}×{self._seg_w}, {self.compression})"
        )


def open_large(path: str | os.PathLike[str], *, cache_bytes: int = 64 << 20) -> Any:
    """A ``.tif``/``.tiff`` as a :class:`TiffRegionReader`, a ``.npy`` as a read-only
    memmap; both are read a region at a time by ``segment_large``."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".npy":
        try:
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
        except Exception as exc:
            raise InputError(f"{p}: not a readable .npy array ({exc})") from exc
        return arr
    if suffix in (".tif", ".tiff"):
        return TiffRegionReader(p, cache_bytes=cache_bytes)
    raise InputError(f"{p}: large images are .tif, .tiff or .npy, got {suffix or 'no suffix'}")


def write_tiled_tiff(
    path: str | os.PathLike[str],
    rows: Callable[[int, int], np.ndarray],
    height: int,
    width: int,
    dtype: Any,
    *,
    tile: int = MASK_TILE,
) -> Path:
    """Write an H×W single-channel image as a tiled, deflate-compressed TIFF.

    ``rows(y0, y1)`` returns rows y0..y1 (y1 − y0 ≤ ``tile``) as an array of
    ``(y1 − y0, width)``; it is called once per tile row, top to bottom, so only one
    tile row is held at a time. Written to a temporary file and renamed into place.
    """
    tifffile = _tifffile()
    dt = np.dtype(dtype)

    def tiles() -> Iterator[np.ndarray]:
        buf = np.zeros((tile, tile), dt)
        for y0 in range(0, height, tile):
            y1 = min(y0 + tile, height)
            block = np.asarray(rows(y0, y1))
            if block.shape != (y1 - y0, width):
                raise InputError(
                    f"rows({y0}, {y1}) returned shape {block.shape}, expected {(y1 - y0, width)}"
                )
            for x0 in range(0, width, tile):
                x1 = min(x0 + tile, width)
                buf[:] = 0
                buf[: y1 - y0, : x1 - x0] = block[:, x0:x1]
                yield buf.copy()

    final = Path(path)
    with atomic_path(final) as tmp:
        tifffile.imwrite(
            str(tmp), tiles(), shape=(height, width), dtype=dt, tile=(tile, tile),
            compression="zlib", photometric="minisblack",
        )  # fmt: skip
    return final
