"""Writers for the video pipeline: a video file (:class:`VideoWriter`, PyAV) or PNG
images (:class:`ImageWriter`).

A writer is called by the pipeline's encode thread: ``begin(info, content, palette,
order)`` once before the first frame, ``write(result)`` per frame,
``write_audio(packet)`` for each demuxed audio packet, and ``close()`` exactly once at
the end — also after an error or an interrupt, so the file is always finalised.
``content`` is "overlay" (the overlay frames) or "mask".
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from segfast.errors import InputError
from segfast.runtime.sources import DEFAULT_FPS, SourceInfo, require_av

if TYPE_CHECKING:
    from segfast.runtime.results import FrameResult

# Video containers segfast writes, with the video codec it uses for each (first found).
VIDEO_CODECS: dict[str, tuple[str, ...]] = {
    ".mp4": ("libx264", "mpeg4"),
    ".m4v": ("libx264", "mpeg4"),
    ".mov": ("libx264", "mpeg4"),
    ".mkv": ("libx264", "mpeg4"),
    ".ts": ("libx264", "mpeg4"),
    ".avi": ("mpeg4",),
    ".webm": ("libvpx-vp9", "libvpx"),
}
# Audio codecs each container can hold as copied packets (None: any).
_AUDIO_CODECS: dict[str, frozenset[str] | None] = {
    ".mp4": frozenset({"aac", "mp3", "alac", "ac3", "eac3", "opus", "flac"}),
    ".m4v": frozenset({"aac", "mp3", "alac", "ac3", "eac3"}),
    ".mov": frozenset({"aac", "mp3", "alac", "ac3", "eac3", "pcm_s16le", "pcm_s24le"}),
    ".mkv": None,
    ".ts": frozenset({"aac", "mp3", "mp2", "ac3", "eac3", "opus"}),
    ".avi": frozenset({"mp3", "mp2", "ac3", "pcm_s16le"}),  # AAC in AVI plays poorly
    ".webm": frozenset({"opus", "vorbis"}),
}


class VideoWriter:
    """Encodes results into a video file (PyAV), keeping timestamps and copying audio.

    The codec follows the suffix (:data:`VIDEO_CODECS`: H.264 by libx264 in .mp4 / .mkv
    / .mov / .ts, MPEG-4 Part 2 in .avi, VP9 in .webm) unless ``codec`` names one.
    H.264 and MPEG-4 need even frame sizes in 4:2:0; odd-sized frames are encoded in 4:4:4
    by libx264 (High 4:4:4 profile, which some hardware players lack) and refused by MPEG-4.
    The file is written beside ``path`` and moved there by :meth:`close`, which always
    flushes the encoder and closes the container — the result plays even after an error.
    ``content`` "overlay" writes the overlay frames, "mask" the masks in palette colours.

    Frames keep their pts (rescaled to the stream's time base); a pts that does not rise
    is bumped by one tick. Matroska (.mkv, .webm) shifts all of a file's timestamps so
    none is negative, so a copied AAC track's priming (−1024 samples) moves the video's
    start by that much; MP4 keeps the source's times (an edit list absorbs the priming).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        codec: str | None = None,
        options: dict[str, str] | None = None,
        copy_audio: bool = True,
    ) -> None:
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in VIDEO_CODECS:
            raise InputError(
                f"output video {self.path} must end in one of {', '.join(VIDEO_CODECS)}"
            )
        av = require_av()
        if codec is None:
            for c in VIDEO_CODECS[suffix]:
                try:
                    av.codec.Codec(c, "w")
                except (av.error.FFmpegError, ValueError):
                    continue
                codec = c
                break
            else:
                raise InputError(f"no encoder for {suffix} in this FFmpeg: {VIDEO_CODECS[suffix]}")
        self.codec = codec
        self.options = dict(options) if options is not None else _default_options(codec)
        self.copy_audio = copy_audio
        self.notes: list[str] = []
        self.frames = 0
        self._container: Any = None
        self._video: Any = None
        self._audio: Any = None
        self._audio_pending: list[Any] = []
        self._tmp = self.path.with_name(f".{self.path.stem}.partial-{os.getpid()}{suffix}")
        self._info: SourceInfo | None = None
        self._content = "overlay"
        self._palette: np.ndarray | None = None
        self._order = "bgr"
        self._last_pts: int | None = None
        self._closed = False

    def begin(self, info: SourceInfo, content: str, palette: torch.Tensor, order: str) -> None:
        """Called once by the stream before the first frame."""
        self._info, self._content, self._order = info, content, order
        self._palette = palette.numpy()
        audio = info.audio
        if audio is not None and self.copy_audio:
            allowed = _AUDIO_CODECS[self.path.suffix.lower()]
            name = audio.codec_context.name
            if allowed is not None and name not in allowed:
                self.notes.append(
                    f"audio ({name}) not copied: {self.path.suffix} files cannot hold it "
                    f"(use .mkv to keep it)"
                )
                self.copy_audio = False
        elif audio is None:
            self.copy_audio = False

    def _open(self, width: int, height: int) -> None:
        av = require_av()
        info = self._info or SourceInfo(kind="frames", name="?")
        odd = width % 2 or height % 2
        if odd and self.codec != "libx264":
            raise InputError(
                f"{self.codec} cannot encode odd frame sizes ({width}×{height}); write .mp4 "
                f"or .mkv (libx264 encodes them in 4:4:4)"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._container = av.open(
            str(self._tmp), "w", format=_FORMATS.get(self.path.suffix.lower())
        )
        rate = info.fps or DEFAULT_FPS
        v = self._container.add_stream(self.codec, rate=rate)
        v.width, v.height = width, height
        v.pix_fmt = "yuv444p" if odd else "yuv420p"
        v.time_base = info.time_base or 1 / rate
        v.options = self.options
        self._video = v
        if self.copy_audio and info.audio is not None:
            self._audio = self._container.add_stream_from_template(info.audio)
            for p in self._audio_pending:
                self._mux_audio(p)
            self._audio_pending.clear()

    def _mux_audio(self, packet: Any) -> None:
        packet.stream = self._audio
        self._container.mux(packet)

    def write_audio(self, packet: Any) -> None:
        """Copy one demuxed audio packet (buffered until the first video frame)."""
        if not self.copy_audio:
            return
        if self._audio is None:
            self._audio_pending.append(packet)
        else:
            self._mux_audio(packet)

    def write(self, result: FrameResult) -> None:
        av = require_av()
        if self._content == "overlay":
            if result.overlay is None:
                raise InputError("VideoWriter content 'overlay' needs results with overlays")
            img = result.overlay
        else:
            assert self._palette is not None
            img = self._palette[np.clip(result.mask, 0, len(self._palette) - 1)]
        h, w = img.shape[:2]
        if self._container is None:
            self._open(w, h)
        elif (w, h) != (self._video.width, self._video.height):
            raise InputError(
                f"frame {result.index} is {w}×{h}, the video is "
                f"{self._video.width}×{self._video.height}; a video holds one frame size"
            )
        frame = av.VideoFrame.from_ndarray(
            np.ascontiguousarray(img), format="bgr24" if self._order == "bgr" else "rgb24"
        )
        pts, tb = result.pts, result.time_base
        if pts is None or tb is None:
            tb = self._video.time_base
            pts = round(
                result.index / ((self._info.fps if self._info else None) or DEFAULT_FPS) / tb
            )
        if tb != self._video.time_base:
            pts = round(pts * tb / self._video.time_base)
        if self._last_pts is not None and pts <= self._last_pts:
            pts = self._last_pts + 1  # the encoder needs rising timestamps
        self._last_pts = pts
        frame.pts, frame.time_base = pts, self._video.time_base
        for packet in self._video.encode(frame):
            self._container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        """Flush the encoder, close the container, move the file into place (idempotent).

        With no frame written, no file is left behind.
        """
        if self._closed:
            return
        self._closed = True
        if self._container is None:
            return
        try:
            if self.frames:
                for packet in self._video.encode(None):
                    self._container.mux(packet)
        finally:
            try:
                self._container.close()
            finally:
                if self.frames:
                    os.replace(self._tmp, self.path)
                else:  # opened, but no frame made it: leave nothing behind
                    self._tmp.unlink(missing_ok=True)


_FORMATS = {".mkv": "matroska", ".ts": "mpegts", ".webm": "webm", ".m4v": "mp4"}


def _default_options(codec: str) -> dict[str, str]:
    if codec == "libx264":
        return {"preset": "veryfast", "crf": "20"}  # real-time-capable on a CPU core
    if codec == "mpeg4":
        return {"qmax": "5"}  # caps the quantiser: the default 200 kb/s target blurs overlays
    if codec.startswith("libvpx"):
        return {"deadline": "realtime", "cpu-used": "8", "crf": "30", "b": "0"}
    return {}


class ImageWriter:
    """Writes one PNG per result into a directory (or to one file for one image).

    Names: the source image's stem + ".png", or ``frame_000123.png`` by source index.
    ``content`` "overlay": the overlay frame (RGB PNG); "mask": the class ids themselves
    as an 8-bit (16-bit above 256 classes) grayscale PNG, lossless.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.single = self.path.suffix.lower() == ".png"
        self.notes: list[str] = []
        self.frames = 0
        self._content = "overlay"
        self._order = "bgr"
        self.copy_audio = False

    def begin(self, info: SourceInfo, content: str, palette: torch.Tensor, order: str) -> None:
        self._content, self._order = content, order
        if self.single and info.kind != "image":
            raise InputError(
                f"output {self.path} is one .png file, but the source {info.name} has many "
                f"frames: give a directory"
            )
        if not self.single:
            self.path.mkdir(parents=True, exist_ok=True)
        if info.audio is not None:
            self.notes.append("audio not copied: the output is images")

    def write_audio(self, packet: Any) -> None:
        """Images have no audio track; packets are ignored (a note says so)."""

    def write(self, result: FrameResult) -> None:
        from segfast._io import atomic_path

        if self.single:
            target = self.path
        else:
            stem = Path(result.name).stem if result.name else f"frame_{result.index:06d}"
            target = self.path / f"{stem}.png"
        if self._content == "overlay":
            if result.overlay is None:
                raise InputError("ImageWriter content 'overlay' needs results with overlays")
            img = result.overlay[..., ::-1] if self._order == "bgr" else result.overlay
            data = encode_png(np.ascontiguousarray(img), "rgb24")
        else:
            m = result.mask
            if m.max(initial=0) > 255:
                data = encode_png(m.astype(">u2"), "gray16be")
            else:
                data = encode_png(m.astype(np.uint8), "gray")
        with atomic_path(target) as tmp:
            tmp.write_bytes(data)
        self.frames += 1

    def close(self) -> None:
        """Nothing to finalise: every PNG is complete when written."""


def encode_png(img: np.ndarray, pix_fmt: str) -> bytes:
    """A PNG file's bytes for an H×W (gray, gray16be) or H×W×3 (rgb24) image (FFmpeg's
    PNG encoder, through PyAV)."""
    av = require_av()
    cc = av.CodecContext.create("png", "w")
    cc.width, cc.height = int(img.shape[1]), int(img.shape[0])
    cc.pix_fmt = pix_fmt
    cc.time_base = Fraction(1, 1)
    frame = av.VideoFrame.from_ndarray(img, format=pix_fmt)
    return b"".join(bytes(p) for p in [*cc.encode(frame), *cc.encode(None)])


def make_writer(
    output_path: str | os.PathLike[str], *, copy_audio: bool = True
) -> VideoWriter | ImageWriter:
    """A :class:`VideoWriter` for a video suffix, else an :class:`ImageWriter` (a .png file
    or a directory)."""
    p = Path(output_path)
    if p.suffix.lower() in VIDEO_CODECS:
        return VideoWriter(p, copy_audio=copy_audio)
    if p.suffix and p.suffix.lower() != ".png":
        raise InputError(
            f"output {p} must be a video ({', '.join(VIDEO_CODECS)}), a .png file or a directory"
        )
    return ImageWriter(p)
