"""Frame sources for the video pipeline, decoded by PyAV (FFmpeg).

:func:`open_source` turns a video file, a URL FFmpeg opens (``rtsp://``, ``http://``,
...), a directory of images, an image file, an H×W×3 uint8 array or an iterable of such
arrays into a :class:`Source`, whose ``items()`` yields, in order:

* :class:`Frame` — a decoded uint8 H×W×3 frame (BGR or RGB) with its pts and time base;
* :class:`Lost` — frames that could not be had: a packet the decoder rejected, a frame
  flagged corrupt or not convertible, video packets that never produced a frame (counted
  at the end: every frame and every rejected packet takes one index), an unreadable
  image;
* :class:`Audio` — an audio packet to copy into the output (video sources only).

A source that fails mid-way (a network stream dropping, a truncated file, a frame
iterable raising) stops yielding and says why in ``end_reason``; a live source
(a URL) that ends at all is reported there too.
"""

from __future__ import annotations

import abc
import os
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segfast.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
DEFAULT_FPS = Fraction(25)  # image sequences and iterables without a given fps
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def require_av() -> Any:
    """The ``av`` module (PyAV), or an ImportError saying how to install it."""
    try:
        import av
    except ImportError as exc:
        raise ImportError(
            "the video runtime needs PyAV: pip install av (or segfast[video])"
        ) from exc
    return av


@dataclass
class SourceInfo:
    """What a source is, known before the first frame."""

    kind: str  # "video" | "live" | "images" | "image" | "frames"
    name: str
    width: int | None = None
    height: int | None = None
    fps: Fraction | None = None
    time_base: Fraction | None = None
    frames: int | None = None  # total, where known
    audio: Any = None  # a PyAV audio stream to copy from, or None

    def describe(self) -> str:
        size = f", {self.width}×{self.height}" if self.width else ""
        fps = f", {float(self.fps):g} fps" if self.fps else ""
        n = f", {self.frames} frames" if self.frames else ""
        return f"{self.name} ({self.kind}{size}{fps}{n})"


@dataclass
class Frame:
    """A decoded frame."""

    index: int  # position in the source, counting every frame it delivered or lost
    image: np.ndarray  # H×W×3 uint8
    pts: int | None
    time_base: Fraction | None
    name: str | None  # file name, for image sources
    decode_s: float  # time spent decoding and converting it

    @property
    def time(self) -> float | None:
        if self.pts is None or self.time_base is None:
            return None
        return float(self.pts * self.time_base)


@dataclass
class Lost:
    """Frames a source lost: a packet the decoder rejected, a corrupt frame, an
    unreadable image."""

    count: int
    reason: str


@dataclass
class Audio:
    """A demuxed audio packet, to be copied as is."""

    packet: Any


class Source(abc.ABC):
    """A source of frames: ``info`` up front, then ``items()``; ``end_reason`` says why
    it ended early, if it did."""

    info: SourceInfo
    end_reason: str | None = None
    paced_by_itself = False  # live sources deliver frames in real time already

    @abc.abstractmethod
    def items(self, order: str) -> Iterator[Frame | Lost | Audio]:
        """Frames in ``order`` ("bgr"/"rgb"), lost frames and audio packets, in order."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release what the source holds (files, connections, generators)."""


class AVSource(Source):
    """A video file or a live URL, demuxed and decoded by PyAV."""

    def __init__(self, url: str, *, live: bool, copy_audio: bool, open_timeout: float) -> None:
        av = require_av()
        self.paced_by_itself = live
        opts = {"rtsp_transport": "tcp"} if url.startswith("rtsp") else {}
        try:
            self._c = av.open(url, options=opts, timeout=(open_timeout, open_timeout))
        except (av.error.FFmpegError, OSError) as exc:
            raise InputError(f"cannot open video source {url!r}: {exc}") from exc
        if not self._c.streams.video:
            self._c.close()
            raise InputError(f"{url!r} has no video stream")
        self._v = self._c.streams.video[0]
        self._a = self._c.streams.audio[0] if copy_audio and self._c.streams.audio else None
        cc = self._v.codec_context
        fps = self._v.average_rate or self._v.guessed_rate
        self.info = SourceInfo(
            kind="live" if live else "video",
            name=url,
            width=cc.width or None,
            height=cc.height or None,
            fps=Fraction(fps) if fps else None,
            time_base=self._v.time_base,
            frames=self._v.frames or None,
            audio=self._a,
        )

    def items(self, order: str) -> Iterator[Frame | Lost | Audio]:
        av = require_av()
        fmt = "bgr24" if order == "bgr" else "rgb24"
        streams = [self._v] + ([self._a] if self._a is not None else [])
        packets = index = 0
        demux = self._c.demux(*streams)
        while True:
            try:
                packet = next(demux)
            except StopIteration:
                break
            except (av.error.FFmpegError, OSError) as exc:
                self.end_reason = f"{self.info.name}: {exc} (after {packets} video packets)"
                break
            if packet.stream.type == "audio":
                if packet.dts is not None and packet.size:
                    yield Audio(packet)
                continue
            if packet.size:
                packets += 1
            t0 = time.perf_counter()
            try:
                decoded = packet.decode()
            except av.error.FFmpegError as exc:
                yield Lost(1, f"packet {packets - 1}: {exc}")
                index += 1
                continue
            for f in decoded:
                if f.is_corrupt:
                    yield Lost(1, f"frame {index} (pts {f.pts}) is flagged corrupt")
                    index += 1
                    continue
                try:
                    img = f.to_ndarray(format=fmt)
                except (av.error.FFmpegError, ValueError) as exc:
                    yield Lost(1, f"frame {index} could not be converted: {exc}")
                    index += 1
                    continue
                yield Frame(index, img, f.pts, f.time_base, None, decode_s=time.perf_counter() - t0)
                index += 1
                t0 = time.perf_counter()
        # Packets the decoder accepted without ever returning a frame for them (every
        # frame and every rejected packet took one index).
        missing = packets - index
        if missing > 0:
            yield Lost(missing, f"{missing} video packet(s) produced no frame (damaged data)")
        if self.paced_by_itself and self.end_reason is None:
            self.end_reason = f"the live source {self.info.name} ended after {packets} packets"

    def close(self) -> None:
        self._c.close()


def decode_image(path: str | os.PathLike[str], fmt: str = "bgr24") -> np.ndarray:
    """The first frame of an image file as an array in PyAV ``fmt`` ("bgr24", "rgb24",
    "gray", ...)."""
    av = require_av()
    with av.open(str(path)) as c:
        frame = next(c.decode(video=0))
        return frame.to_ndarray(format=fmt)


class ImageSource(Source):
    """One image file or a directory of them (sorted by name), decoded by PyAV."""

    def __init__(self, paths: list[Path], name: str, kind: str, fps: Fraction) -> None:
        self._paths = paths
        self.info = SourceInfo(kind=kind, name=name, fps=fps, time_base=1 / fps, frames=len(paths))

    def items(self, order: str) -> Iterator[Frame | Lost | Audio]:
        av = require_av()
        fmt = "bgr24" if order == "bgr" else "rgb24"
        for i, p in enumerate(self._paths):
            t0 = time.perf_counter()
            try:
                img = decode_image(p, fmt)
            except (av.error.FFmpegError, OSError, StopIteration) as exc:
                yield Lost(1, f"{p.name}: unreadable image ({exc or 'no frame'})")
                continue
            yield Frame(i, img, i, self.info.time_base, p.name, time.perf_counter() - t0)

    def close(self) -> None:
        """Each image is closed once decoded: nothing stays open."""


class IterableSource(Source):
    """Frames from any iterable of H×W×3 (or H×W) uint8 arrays, e.g. a camera reader;
    it delivers frames at its own pace (real-time mode does not pace it again). A first
    frame that is not one raises :class:`InputError` (the iterable is not what it should
    be); a later one (another dtype or channel count, empty, None) is skipped and counted
    with its reason, as a corrupt packet of a video is. The iterable raising ends it."""

    paced_by_itself = True

    def __init__(self, frames: Iterable[Any], fps: Fraction) -> None:
        self._it = iter(frames)
        self.info = SourceInfo(
            kind="frames", name=type(frames).__name__, fps=fps, time_base=1 / fps
        )

    def items(self, order: str) -> Iterator[Frame | Lost | Audio]:
        i = good = 0
        while True:
            t0 = time.perf_counter()
            try:
                f = next(self._it)
            except StopIteration:
                return
            except Exception as exc:  # a camera or reader failing mid-way ends the stream
                self.end_reason = f"the frame iterable raised {type(exc).__name__}: {exc}"
                return
            img = f.detach().cpu().numpy() if isinstance(f, torch.Tensor) else f
            try:
                image = check_frame(img, i)
            except InputError as exc:
                if not good:  # the first frame sets what the iterable yields: a misuse
                    raise
                yield Lost(1, str(exc))  # one bad frame later (a camera SDK's RGBA): skipped
            else:
                good += 1
                yield Frame(i, image, i, self.info.time_base, None, time.perf_counter() - t0)
            i += 1

    def close(self) -> None:
        """Close the iterable if it is a generator (runs its ``finally`` blocks)."""
        close = getattr(self._it, "close", None)
        if callable(close):
            close()


def check_frame(img: Any, i: int) -> np.ndarray:
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8:
        what = f"{type(img).__name__} {getattr(img, 'dtype', '')}".strip()
        raise InputError(f"frame {i} must be a uint8 numpy array or tensor, got {what}")
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] != 3:
        raise InputError(f"frame {i} must be H×W×3 (or H×W) uint8, got shape {img.shape}")
    if img.shape[0] == 0 or img.shape[1] == 0:
        raise InputError(f"frame {i} is empty (shape {img.shape})")
    if any(s < 0 for s in img.strides):  # a flip (bgr[..., ::-1]): torch takes no such view
        img = np.ascontiguousarray(img)
    return img


def open_source(
    source: Any, *, fps: float | Fraction | None = None, copy_audio: bool = True,
    open_timeout: float = 10.0,
) -> Source:  # fmt: skip
    """The source for a path, URL, directory, image, array or iterable of frames."""
    rate = Fraction(fps).limit_denominator(1001000) if fps is not None else DEFAULT_FPS
    if rate <= 0:
        raise InputError(f"fps must be positive, got {fps}")
    if isinstance(source, np.ndarray | torch.Tensor):
        img = source.detach().cpu().numpy() if isinstance(source, torch.Tensor) else source
        src = IterableSource([check_frame(img, 0)], rate)
        src.info.kind, src.info.name = "image", "array"
        return src
    if isinstance(source, str | os.PathLike):
        text = os.fspath(source)
        if _URL.match(text) and not text.startswith("file://"):
            return AVSource(text, live=True, copy_audio=copy_audio, open_timeout=open_timeout)
        path = Path(text)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise InputError(f"directory {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            return ImageSource(files, str(path), "images", rate)
        if not path.exists():
            raise InputError(f"input {path} does not exist")
        if path.suffix.lower() in IMAGE_SUFFIXES:
            return ImageSource([path], str(path), "image", rate)
        if fps is not None:
            raise InputError(
                f"fps applies to image and frame-iterable sources; the video {path} has its "
                f"own timestamps"
            )
        return AVSource(str(path), live=False, copy_audio=copy_audio, open_timeout=open_timeout)
    if isinstance(source, Iterable):
        return IterableSource(source, rate)
    raise InputError(
        f"source must be a path, URL, directory, image array or iterable of frames, "
        f"got {type(source).__name__}"
    )


def has_own_timestamps(source: Any) -> bool:
    """Whether ``source`` is a video file or URL (its frames carry their own times: an
    ``fps`` option does not apply to it)."""
    if not isinstance(source, str | os.PathLike):
        return False
    path = Path(os.fspath(source))
    return not path.is_dir() and path.suffix.lower() not in IMAGE_SUFFIXES


def probe_size(source: str | os.PathLike[str]) -> tuple[int, int]:
    """(height, width) of a path's or URL's first frame (the first readable image of a
    directory), e.g. to compile a static engine at the source's size."""
    src = open_source(source, copy_audio=False)
    try:
        if src.info.height and src.info.width:
            return src.info.height, src.info.width
        for item in src.items("bgr"):
            if isinstance(item, Frame):
                return int(item.image.shape[0]), int(item.image.shape[1])
        raise InputError(f"{os.fspath(source)} has no readable frame")
    finally:
        src.close()
