"""Real-time video segmentation: decode → preprocess + infer → postprocess + encode.

:func:`stream` runs an engine over a video file, a live stream (``rtsp://`` and
other URLs FFmpeg opens), a directory of images, a single image, or any iterable
of uint8 frames, and yields one :class:`FrameResult` per frame; :func:`run_video`
writes the results to a video file or an image directory.

Three worker threads joined by bounded queues (``queue_size`` items each)::

    decode (PyAV/FFmpeg) ─▶ preprocess + engine ─▶ mask resize, postprocess, overlay,
                                                    encode (PyAV) ─▶ results (the iterator)

* Frames are uint8 H×W×3 in ``channel_order`` ("bgr", as OpenCV, or "rgb").
  Preprocessing is one fused kernel on CUDA (:func:`segfast.kernels.preprocess.preprocess`:
  resize to the engine's input size, ÷255, mean/std, HWC → NCHW) and its PyTorch
  reference on the CPU (the Triton kernels run on the CPU only under the interpreter);
  the overlay likewise (:mod:`segfast.kernels.overlay`). Masks are resized back to the
  frame size by nearest neighbour (pixel centres: source index ⌊(i + ½)·h/H⌋).
* **Real-time mode** (``realtime=True``): a video file or an image sequence is released
  at its own pace (its timestamps, or ``fps``) as a camera would deliver it; a live
  stream (a URL) and a frame iterable (a camera reader) pace themselves. When inference
  falls behind and the decode queue is full, the *oldest* waiting frame is dropped and
  counted. Otherwise nothing is dropped: decoding waits for the slowest stage.
* **Accounting**: every frame the source delivers or loses is counted in
  ``frames_in``, and ends as exactly one of ``frames_out`` (processed, and written when
  there is a writer), ``dropped`` (real-time mode), ``skipped`` (a packet the decoder
  rejected or that yielded no frame, a frame flagged corrupt, an unreadable image) or
  ``unfinished`` (in flight when the stream was stopped early). After a stream has run
  to its end, ``frames_in == frames_out + dropped + skipped``. A frame iterable whose
  first frame is not an H×W×3 (or H×W) uint8 image raises :class:`InputError`; a later
  such frame is skipped with its reason, as a corrupt packet is.
* **Ends**: a source that fails mid-way (a dropped network stream, a truncated file)
  ends the stream cleanly — everything decoded so far is processed and written — and
  the reason is kept in ``stats.end_reason`` and issued as a :class:`SourceEndedWarning`.
  An exception in the decode stage ends the stream after the frames decoded before it
  (their results come first, then the exception). On an exception in any other stage, a
  ``KeyboardInterrupt`` in the consuming thread, ``close()``, or the stream dropped
  unclosed (a ``for`` loop over ``segfast.stream(...)`` left with ``break``), the threads
  stop, the source closes and the writer still flushes its encoder and closes the
  container, so the file holds every frame written so far and plays.
* **Timestamps and audio**: frames keep the source's pts and time base, and the written
  video uses them (dropped frames leave gaps: a variable frame rate). Audio packets are
  copied unchanged (no re-encoding) when the output container can hold the codec.
* **Statistics**: per-stage latency (decode, queue wait, preprocess, infer,
  postprocess, overlay, encode) and end-to-end latency (frame decoded → written), with
  p50/p90/p99 and frames per second (:class:`StreamStats`); live on a progress bar with
  ``progress=True``. On CUDA each stage is synchronised so its time is its own.

The pieces: :mod:`segfast.runtime.sources` (decoding), :mod:`segfast.runtime.frames`
(frame → engine input, mask → frame size, overlay), :mod:`segfast.runtime.channel` (the
queues), :mod:`segfast.runtime.results` (:class:`FrameResult`, :class:`StreamStats`) and
:mod:`segfast.runtime.writers` (encoding); this module runs them as threads.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segfast.errors import InputError
from segfast.runtime.multistream import MultiStream, is_source_list, lane_outputs
from segfast.runtime.results import FrameResult, StreamStats
from segfast.runtime.sources import SourceInfo, open_source, probe_size
from segfast.runtime.stream import CHANNEL_ORDERS, OUTPUTS, SourceEndedWarning, Stream
from segfast.runtime.writers import ImageWriter, VideoWriter, encode_png, make_writer

__all__ = [
    "CHANNEL_ORDERS",
    "OUTPUTS",
    "FrameResult",
    "ImageWriter",
    "MultiStream",
    "SourceEndedWarning",
    "SourceInfo",
    "Stream",
    "StreamStats",
    "VideoWriter",
    "encode_png",
    "make_writer",
    "open_source",
    "probe_size",
    "run_video",
    "stream",
]


def stream(
    engine: Any,
    source: Any,
    *,
    realtime: bool = False,
    queue_size: int = 4,
    output: str | None = "overlay",
    writer: Any = None,
    postprocess: Callable[[np.ndarray], np.ndarray] | None = None,
    postprocess_input: str = "mask",
    palette: Any = None,
    alpha: float = 0.5,
    progress: bool = False,
    stats: StreamStats | None = None,
    size: tuple[int, int] | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    channel_order: str = "bgr",
    fps: float | Fraction | None = None,
    copy_audio: bool = True,
    max_batch: int | None = None,
) -> Stream | MultiStream:
    """Segment every frame of ``source`` with ``engine``; an iterator of :class:`FrameResult`.

    Args:
        engine: a :class:`segfast.Engine` (one N×C×H×W input; batch 1 or dynamic).
        source: a video file, a URL FFmpeg opens (``rtsp://…``), a directory of images,
            an image file, an H×W×3 uint8 array, or an iterable of such arrays. A list
            of sources (paths, URLs, frame iterables — not a list of frames) runs them
            all through the one engine, frames batched across streams
            (:class:`~segfast.runtime.multistream.MultiStream`; ``result.stream`` is the
            source's index).
        max_batch: several sources only: frames per engine call (default: the number of
            sources; capped by the engine's batch range).
        realtime: pace file and image sources at their frame rate and drop the oldest
            waiting frame when inference falls behind (default False: drop nothing).
        queue_size: capacity of each of the three queues (≥ 1).
        output: "overlay" (results carry the overlay; a writer writes it), "mask" (a
            writer writes the mask: palette colours in videos, class ids in PNGs) or None.
        writer: None, a path (video suffix → :class:`VideoWriter`; a directory or .png →
            :class:`ImageWriter`), or a writer object with ``begin``, ``write``,
            ``write_audio`` and ``close``. Several sources: a directory (each source's
            output in it, named as :func:`~segfast.runtime.multistream.lane_outputs`
            says) or a list of one writer (or None) per source.
        postprocess: a function H×W mask → H×W mask (numpy) applied at the frame's size,
            e.g. ``lambda m: segfast.runtime.postprocess.apply(m, ops)``.
        postprocess_input: "mask" (default), or "foreground": ``postprocess`` gets the
            fp32 foreground probability of a binary model (sigmoid of its one class, or
            softmax class 1 of two; nearest-resized like masks) and returns the mask —
            e.g. an Otsu threshold. Needs a logits or probs engine.
        palette: K×3 uint8 colours in ``channel_order`` (default: the VOC colour map);
            class 0 is left uncoloured in overlays.
        alpha: overlay opacity in [0, 1].
        progress: a live progress bar (rich) with counters and FPS.
        stats: a :class:`StreamStats` to fill (default: a new one, ``.stats``).
        size: (h, w) to run a dynamic engine at (default: each frame's size); a static
            engine always runs at its own size.
        mean, std: normalisation after ÷255, one value per engine channel or one for
            all (default 0 and 1: inputs in [0, 1]). One-channel engines get the frame's
            BT.601 luma.
        preprocess: replaces the built-in preprocessing: uint8 [1, H, W, 3] frames on
            the engine's device → the engine's [1, C, h, w] input.
        channel_order: "bgr" (default) or "rgb" for frames, overlays and the palette.
        fps: frame rate of image and iterable sources (default 25): their timestamps,
            and the pace of image sources in real-time mode. Videos have their own.
        copy_audio: copy the source's audio into a video writer's output (when it can).

    Nothing runs until the stream is iterated (or entered as a context manager).
    """
    if is_source_list(source):
        if stats is not None:
            raise InputError("several sources: read each one's stats from .stats[i]")
        if writer is None or isinstance(writer, list | tuple):
            writers = writer
        elif isinstance(writer, str | os.PathLike):
            if Path(writer).suffix:
                raise InputError(
                    f"several sources write into a directory (one output each), got {writer}"
                )
            Path(writer).mkdir(parents=True, exist_ok=True)
            writers = lane_outputs(source, writer)
        else:
            raise InputError("several sources take a directory or a list of writers")
        return MultiStream(
            engine, source, max_batch=max_batch, writers=writers, realtime=realtime,
            queue_size=queue_size, progress=progress, output=output, postprocess=postprocess,
            postprocess_input=postprocess_input, palette=palette, alpha=alpha, size=size,
            mean=mean, std=std, preprocess=preprocess, channel_order=channel_order, fps=fps,
            copy_audio=copy_audio,
        )  # fmt: skip
    if max_batch is not None:
        raise InputError("max_batch applies to several sources (a list of them)")
    return Stream(
        engine,
        source,
        realtime=realtime,
        queue_size=queue_size,
        output=output,
        writer=writer,
        postprocess=postprocess,
        postprocess_input=postprocess_input,
        palette=palette,
        alpha=alpha,
        progress=progress,
        stats=stats,
        size=size,
        mean=mean,
        std=std,
        preprocess=preprocess,
        channel_order=channel_order,
        fps=fps,
        copy_audio=copy_audio,
    )


def run_video(
    engine: Any,
    input: Any,
    output_path: str | os.PathLike[str],
    *,
    on_result: Callable[[FrameResult], None] | None = None,
    **options: Any,
) -> StreamStats | list[StreamStats]:
    """Run :func:`stream` over ``input``, writing to ``output_path``; return the stats.

    ``output_path``: a video file (its suffix picks the codec, :class:`VideoWriter`), a
    directory (one PNG per frame) or a .png file (single-image input). ``on_result`` is
    called with each result in the calling thread. The output is finalised even when
    this raises (an exception, Ctrl-C). Several sources (a list): ``output_path`` is a
    directory holding each one's output, and the stats are a list, one per source
    (``stream(...).total()`` sums them).
    """
    if "writer" in options:
        raise InputError("run_video writes to output_path; pass writer= to stream() instead")
    with stream(engine, input, writer=output_path, **options) as s:
        for result in s:
            if on_result is not None:
                on_result(result)
    return s.stats
