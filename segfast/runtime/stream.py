"""One video stream's pipeline, :class:`Stream` (what :func:`segfast.runtime.video.stream`
returns for one source; see :mod:`segfast.runtime.video` for how it works). A
:class:`~segfast.runtime.multistream.MultiStream` runs several as lanes around one
batching thread."""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import numpy as np
import torch

from segfast.errors import InputError
from segfast.runtime._progress import Progress
from segfast.runtime.channel import END, Channel, Handle, PipelineItem, Stopped, join_threads
from segfast.runtime.engine_io import EngineIO
from segfast.runtime.frames import (
    MaskResizer,
    Overlayer,
    Preprocessor,
    check_mask,
    palette_array,
)
from segfast.runtime.results import FrameResult, StreamStats
from segfast.runtime.sources import DEFAULT_FPS, Audio, Lost, open_source
from segfast.runtime.writers import make_writer
from segfast.timing import sync

__all__ = ["CHANNEL_ORDERS", "OUTPUTS", "SourceEndedWarning", "Stream", "StreamPipeline"]

OUTPUTS = ("overlay", "mask")
CHANNEL_ORDERS = ("bgr", "rgb")


class SourceEndedWarning(UserWarning):
    """A source failed or disconnected before its end; the stream ended with what it had."""


class Stream(Handle):
    """The iterator :func:`stream` returns; see the module docstring.

    Iterate it for :class:`FrameResult` objects; ``stats`` fills as it runs. Use it as a
    context manager (or iterate to the end, or call :meth:`close`) so that the threads
    stop and the writer finalises its file; a stream dropped unclosed (a loop left with
    ``break``) is closed then (:class:`~segfast.runtime.channel.Handle`).
    """

    def __init__(self, engine: Any, source: Any, **options: Any) -> None:
        super().__init__(StreamPipeline(engine, source, **options))


class StreamPipeline:
    """One stream's threads, queues, source and writer (what a :class:`Stream` handle, or
    a :class:`~segfast.runtime.multistream.MultiStream` lane, runs)."""

    def __init__(
        self,
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
        _lane: int | None = None,  # this stream's index in a MultiStream (which batches)
    ) -> None:
        if output is not None and output not in OUTPUTS:
            raise InputError(f"output must be one of {OUTPUTS} or None, got {output!r}")
        if channel_order not in CHANNEL_ORDERS:
            raise InputError(
                f"channel_order must be one of {CHANNEL_ORDERS}, got {channel_order!r}"
            )
        if queue_size < 1:
            raise InputError(f"queue_size must be ≥ 1, got {queue_size}")
        if not 0.0 <= alpha <= 1.0:
            raise InputError(f"alpha must be in [0, 1], got {alpha}")
        if writer is not None and output is None:
            raise InputError("a writer needs output='overlay' or output='mask'")
        self.engine = engine
        self.io = EngineIO.of(engine)
        if postprocess_input not in ("mask", "foreground"):
            raise InputError(
                f"postprocess_input must be 'mask' or 'foreground', got {postprocess_input!r}"
            )
        self.foreground = postprocess_input == "foreground"
        if self.foreground:
            if postprocess is None:
                raise InputError("postprocess_input='foreground' needs a postprocess function")
            if self.io.output == "mask" or self.io.num_classes not in (1, 2):
                raise InputError(
                    f"postprocess_input='foreground' needs the foreground probability of a "
                    f"binary model: an engine with 1 or 2 classes and output 'probs' or "
                    f"'logits'; this one has {self.io.num_classes} class(es), output "
                    f"{self.io.output!r}"
                )
        self.lane = _lane
        self.pre = Preprocessor(
            self.io, size, mean, std, channel_order, preprocess, any_batch=_lane is not None
        )
        self.realtime = realtime
        self.output = output
        self.postprocess = postprocess
        self.alpha = alpha
        self.order = channel_order
        self.palette = palette_array(palette, self.io.num_classes or 2, channel_order)
        self._overlay = Overlayer(self.palette, alpha, self.io.device)
        self._resize_mask = MaskResizer()
        if isinstance(writer, str | os.PathLike):
            writer = make_writer(writer, copy_audio=copy_audio)
        self.writer = writer
        self.source = open_source(source, fps=fps, copy_audio=copy_audio and writer is not None)
        self.stats = stats if stats is not None else StreamStats()
        self.stats.source = self.source.info.describe()
        self._progress_wanted = progress
        self._progress: Progress | None = None
        self._q_in = Channel(queue_size)
        self._q_mid = Channel(queue_size)
        self._q_out = Channel(queue_size)
        self._audio: deque[Any] = deque()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._error_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._started = False
        self._closed = False
        self._join_deadline: float | None = None  # set when abandoned (channel.Handle)
        self._t0 = 0.0
        if self.writer is not None:
            try:
                self.writer.begin(self.source.info, output, self.palette, channel_order)
            except BaseException:
                self.source.close()
                raise

    # -- lifecycle --------------------------------------------------------------------
    def _start(self) -> None:
        if self._started:
            return
        self._started = True
        self._t0 = time.perf_counter()
        self._progress = Progress(self._progress_wanted, "frames", self.source.info.frames)
        stages = [("decode", self._decode_loop), ("encode", self._post_loop)]
        if self.lane is None:  # in a MultiStream one thread infers for every lane
            stages.insert(1, ("infer", self._infer_loop))
        for name, fn in stages:
            t = threading.Thread(target=fn, name=f"segfast-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def __iter__(self) -> StreamPipeline:
        self._start()
        return self

    def __next__(self) -> FrameResult:
        if self._closed:
            raise StopIteration
        self._start()
        try:
            item = self._q_out.get()
        except Stopped:
            item = END
        except BaseException:
            self.close()
            raise
        if item is END:
            self.close()  # re-raises a worker's exception
            raise StopIteration
        if self._progress is not None:
            s = self.stats
            self._progress.update(
                advance=1,
                status=f"dropped {s.dropped} skipped {s.skipped} "
                f"{s.frames_out / max(time.perf_counter() - self._t0, 1e-9):.1f} fps",
            )
        return item

    def __enter__(self) -> StreamPipeline:
        self._start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the threads, finalise the writer, complete ``stats``; re-raise the first
        exception a worker thread raised (once)."""
        if self._closed:
            return
        self._closed = True
        if self._started:
            self._stop.set()
            for ch in (self._q_in, self._q_mid, self._q_out):
                ch.abort()
            join_threads(self._threads, self._join_deadline)
        else:
            self.source.close()
            if self.writer is not None:
                self.writer.close()
        s = self.stats
        s.wall_s = time.perf_counter() - self._t0 if self._started else 0.0
        s.unfinished = s.frames_in - s.frames_out - s.dropped - s.skipped
        if self.writer is not None:
            s.notes.extend(n for n in getattr(self.writer, "notes", []) if n not in s.notes)
        if self._progress is not None:
            self._progress.close()
        if self.source.end_reason and s.end_reason is None:
            s.end_reason = self.source.end_reason
        if s.end_reason:
            warnings.warn(
                f"the source ended early: {s.end_reason}; {s.frames_out} frame(s) written",
                SourceEndedWarning,
                stacklevel=2,
            )

        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def _fail(self, exc: BaseException, drain: bool = False) -> None:
        """Record ``exc`` (raised by :meth:`close`) and stop every stage — or, with
        ``drain`` (the decode stage failing), let the later stages finish the frames
        already decoded first: the error ends the stream after their results."""
        with self._error_lock:
            if self._error is None:
                self._error = exc
        if drain:
            return
        self._stop.set()
        for ch in (self._q_in, self._q_mid, self._q_out):
            ch.abort()

    # -- stage 1: decode --------------------------------------------------------------
    def _decode_loop(self) -> None:
        s, src = self.stats, self.source
        pace = self.realtime and not src.paced_by_itself
        first_time: float | None = None
        start = time.perf_counter()
        try:
            for got in src.items(self.order):
                if self._stop.is_set():
                    break
                if isinstance(got, Audio):
                    self._audio.append(got.packet)
                    continue
                if isinstance(got, Lost):
                    s.add(frames_in=got.count)
                    s.skip(got.count, got.reason)
                    continue
                if pace:
                    t = got.time
                    if t is None:
                        t = float(got.index / (src.info.fps or DEFAULT_FPS))
                    first_time = t if first_time is None else first_time
                    delay = start + (t - first_time) - time.perf_counter()
                    if delay > 0 and self._stop.wait(delay):
                        break
                item = PipelineItem(got, arrival=time.perf_counter())
                self._timing(item, "decode", got.decode_s)
                s.add(frames_in=1)
                if self._q_in.put(item, drop_oldest=self.realtime) is not None:
                    s.add(dropped=1)
        except Stopped:
            pass
        except Exception as exc:  # the frames decoded so far still go through
            if self.lane is None:  # alone: raised after their results
                self._fail(exc, drain=True)
            else:  # a MultiStream's lane: it ends, with its reason; the others go on
                s.end_reason = s.end_reason or f"decoding failed: {type(exc).__name__}: {exc}"
        except BaseException as exc:
            self._fail(exc)
        finally:
            self._q_in.close()
            src.close()

    # -- stage 2: preprocess + infer --------------------------------------------------
    def _infer_loop(self) -> None:
        dev = self.io.device
        try:
            with torch.inference_mode():
                while (item := self._q_in.get()) is not END:
                    t0 = time.perf_counter()
                    self._timing(item, "queue", t0 - item.arrival)
                    frame = torch.from_numpy(item.frame.image).to(dev)  # [H, W, 3] uint8
                    x = self.pre(frame)  # [1, C, h, w]
                    sync(dev)
                    t1 = time.perf_counter()
                    self._timing(item, "preprocess", t1 - t0)
                    y = self.engine(x)
                    if self.foreground:  # [h, w] fp32 P(class K − 1): sigmoid / softmax[1]
                        item.mask = self.io.to_probs(y)[0, -1]
                    else:
                        item.mask = self.io.to_mask(y)[0]  # [h, w] on the device
                    sync(dev)
                    self._timing(item, "infer", time.perf_counter() - t1)
                    item.device_frame = frame
                    self._q_mid.put(item)
        except Stopped:
            pass
        except BaseException as exc:
            self._fail(exc)
        finally:
            self._q_mid.close()

    # -- stage 3: postprocess + overlay + encode --------------------------------------
    def _post_loop(self) -> None:
        w = self.writer
        try:
            with torch.inference_mode():
                while (item := self._q_mid.get()) is not END:
                    result = self._finish(item)
                    if w is not None:
                        t0 = time.perf_counter()
                        while self._audio:
                            w.write_audio(self._audio.popleft())
                        w.write(result)
                        self._timing(item, "encode", time.perf_counter() - t0)
                    latency = time.perf_counter() - item.arrival
                    result.timings["end-to-end"] = 1e3 * latency
                    with self.stats._lock:
                        self.stats.latency.append(latency)
                    self.stats.add(frames_out=1)
                    self._q_out.put(result)
        except Stopped:
            pass
        except BaseException as exc:
            self._fail(exc)
        finally:
            try:
                if w is not None:
                    while self._audio:
                        w.write_audio(self._audio.popleft())
                    w.close()
            except BaseException as exc:
                self._fail(exc)
            self._q_out.close()

    def _finish(self, item: PipelineItem) -> FrameResult:
        dev = self.io.device
        t0 = time.perf_counter()
        f = item.frame
        H, W = f.image.shape[:2]
        m = self._resize_mask(item.mask, (H, W))  # [h, w] → [H, W]
        mask = m.cpu().numpy()  # the mask, or the foreground probability
        if self.postprocess is not None:
            mask = check_mask(self.postprocess(mask), (H, W))
            m = torch.from_numpy(mask).to(dev)
        self._timing(item, "postprocess", time.perf_counter() - t0)
        over = None
        if self.output == "overlay":
            t1 = time.perf_counter()
            over = self._overlay(f.image, mask, item.device_frame, m)
            self._timing(item, "overlay", time.perf_counter() - t1)
        return FrameResult(
            index=f.index,
            pts=f.pts,
            time_base=f.time_base,
            time=f.time,
            name=f.name,
            image=f.image,
            mask=mask,
            overlay=over,
            timings=item.timings,
            stream=self.lane or 0,
        )

    def _timing(self, item: PipelineItem, stage: str, seconds: float) -> None:
        item.timings[stage] = 1e3 * seconds
        self.stats.sample(stage, seconds)
