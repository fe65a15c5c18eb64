"""Many video sources through one engine: frames batched across streams, results routed
back per stream (:class:`MultiStream`, what ``segfast.stream(engine, [a, b, ...])``
returns).

Each source is a *lane*: a :class:`~segfast.runtime.stream.Stream` that runs its own
decode thread and its own postprocess + encode thread, with its own queues, writer and
:class:`~segfast.runtime.results.StreamStats` — everything a stream does alone except
inference. One batching thread serves all lanes::

    decode a ─▶ ┐                                  ┌─▶ postprocess + encode a ─▶ ┐
    decode b ─▶ ├─ each tick: up to max_batch ─▶ engine ─▶ postprocess + encode b ─▶ ├─▶ results
    decode c ─▶ ┘  waiting frames, fair order      └─▶ postprocess + encode c ─▶ ┘

* **A tick** takes whatever frames wait when the engine is free (no waiting to fill a
  batch: the latency of a lone frame is not traded for throughput): one frame per lane
  in turn, the lane that goes first rotating every tick, then a second round, and so on
  up to ``max_batch``. A lane with frames waiting is served within one tick.
* **Batching** by engine (:class:`~segfast.runtime.batching.BatchRunner`): a
  batch-dynamic engine runs each tick as one call (up to its batch range; frames of
  different inference sizes — a dynamic engine without ``size`` — run as one call per
  size); a static batch-1 engine runs one call per frame; a static batch-B engine runs
  full batches padded with copies of the last frame (the padding's outputs are
  discarded). ``batch_sizes`` counts the calls made at each batch size and the summary
  (``notes``) says which mode ran.
* **Real-time mode**: each lane paces its own source and drops *its own* oldest waiting
  frame when it falls behind; fair ticks keep one fast or busy source from starving the
  others.
* **Ends**: a source that ends or fails ends only its lane, with its reason in that
  lane's ``stats.end_reason`` (and a :class:`~segfast.runtime.stream.SourceEndedWarning`);
  the other lanes go on. An exception anywhere else stops every lane, each writer
  finalising its file, and is raised by the iterator.
* **Output**: every lane's results are exactly what it produces alone (same
  preprocessing, mask resizing, postprocessing and writer); ``FrameResult.stream`` says
  which source a result belongs to. Per-lane statistics in ``stats[i]``, their sum in
  ``total()``.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segfast.errors import InputError
from segfast.runtime._progress import Progress
from segfast.runtime.batching import BatchRunner
from segfast.runtime.channel import END, Channel, Handle, PipelineItem, Stopped, join_threads
from segfast.runtime.engine_io import EngineIO
from segfast.runtime.results import FrameResult, StreamStats
from segfast.runtime.sources import has_own_timestamps
from segfast.runtime.stream import StreamPipeline
from segfast.timing import sync

__all__ = ["MultiStream", "MultiStreamPipeline", "is_source_list", "lane_outputs"]


def is_source_list(source: Any) -> bool:
    """Whether ``source`` is several sources (a list or tuple of paths, URLs or frame
    iterables) rather than one (a list of frames is one source)."""
    if not isinstance(source, list | tuple) or not source:
        return False
    return not any(isinstance(s, np.ndarray | torch.Tensor) for s in source)


def lane_outputs(sources: Sequence[Any], out_dir: str | os.PathLike[str]) -> list[Path]:
    """Where each source's output goes in ``out_dir``: a video keeps its name (``.mp4``
    for URLs and frame iterables), an image directory or image becomes a directory of
    PNGs; clashing names get the stream index in front."""
    from segfast.runtime.sources import IMAGE_SUFFIXES

    out = Path(out_dir)
    names: list[str] = []
    for i, src in enumerate(sources):
        if isinstance(src, str | os.PathLike):
            text = os.fspath(src)
            p = Path(text.split("?")[0].rstrip("/"))
            stem = p.stem or f"stream{i}"
            is_dir = Path(text).is_dir() or text.endswith(("/", os.sep))
            if is_dir or p.suffix.lower() in IMAGE_SUFFIXES:
                names.append(stem)  # a directory of PNGs
            elif "://" in text:
                names.append(f"{stem}.mp4")
            else:
                names.append(f"{stem}{p.suffix or '.mp4'}")
        else:
            names.append(f"stream{i}.mp4")
    seen = Counter(names)
    return [out / (f"{i}-{n}" if seen[n] > 1 else n) for i, n in enumerate(names)]


class _LaneOut:
    """A lane's output queue as the lane sees it: its results go into the shared channel
    (tagged by the result's ``stream``), its close into one end marker of its own."""

    def __init__(self, merged: Channel, lane: int) -> None:
        self.merged = merged
        self.lane = lane

    def put(self, item: Any, *, drop_oldest: bool = False) -> Any:
        return self.merged.put(item)

    def close(self) -> None:
        with contextlib.suppress(Stopped):
            self.merged.put(_LaneEnd(self.lane))

    def abort(self) -> list[Any]:
        return self.merged.abort()


class _LaneEnd:
    def __init__(self, lane: int) -> None:
        self.lane = lane


class MultiStream(Handle):
    """The iterator :func:`segfast.stream` returns for several sources; see the module
    docstring. Iterate it for :class:`FrameResult` objects (``.stream`` is the source's
    index); use it as a context manager, iterate to the end or call :meth:`close` (a
    multi-stream dropped unclosed is closed then: :class:`~segfast.runtime.channel.Handle`).

    Args: as :func:`segfast.stream`, plus ``max_batch`` (frames per engine call, default
    the number of sources, capped by the engine's batch range) and ``writers`` (one per
    source: a path or writer object, or None). Options apply to every lane.
    """

    def __init__(self, engine: Any, sources: Sequence[Any], **options: Any) -> None:
        super().__init__(MultiStreamPipeline(engine, sources, **options))


class MultiStreamPipeline:
    """The lanes, the batching thread and the merged results of a :class:`MultiStream`."""

    def __init__(
        self,
        engine: Any,
        sources: Sequence[Any],
        *,
        max_batch: int | None = None,
        writers: Sequence[Any] | None = None,
        realtime: bool = False,
        queue_size: int = 4,
        progress: bool = False,
        **options: Any,
    ) -> None:
        sources = list(sources)
        if not sources:
            raise InputError("stream needs at least one source")
        if writers is not None and len(writers) != len(sources):
            raise InputError(
                f"{len(sources)} sources need {len(sources)} writers, got {len(writers)}"
            )
        if "stats" in options or "writer" in options:
            raise InputError("several sources take writers= (one per source), not writer=/stats=")
        self.io = EngineIO.of(engine)
        self.engine = engine
        self.runner = BatchRunner(engine, self.io, len(sources) if max_batch is None else max_batch)
        self.mode = self.runner.mode
        self.realtime = realtime
        self._bell = threading.Event()
        self._merged = Channel(queue_size * len(sources))
        self.lanes: list[StreamPipeline] = []
        try:
            for i, src in enumerate(sources):
                opts = dict(options)
                if has_own_timestamps(src):  # fps is for image and frame sources
                    opts.pop("fps", None)
                lane = StreamPipeline(
                    engine, src, realtime=realtime, queue_size=queue_size,
                    writer=None if writers is None else writers[i], _lane=i, **opts,
                )  # fmt: skip
                lane._q_in = Channel(queue_size, bell=self._bell)
                lane._q_out = _LaneOut(self._merged, i)
                self.lanes.append(lane)
        except BaseException:
            for lane in self.lanes:
                lane.close()
            raise
        for lane in self.lanes:
            lane.stats.notes.append(self.mode)
        self._progress_wanted = progress
        self._progress: Progress | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._open = len(sources)
        self._started = False
        self._closed = False
        self._join_deadline: float | None = None  # set when abandoned (channel.Handle)
        self._t0 = 0.0

    @property
    def batch_sizes(self) -> Counter[int]:
        """Engine calls made at each batch size."""
        return self.runner.calls

    @property
    def max_batch(self) -> int:
        return self.runner.max_batch

    @property
    def stats(self) -> list[StreamStats]:
        """Each lane's statistics, in source order."""
        return [lane.stats for lane in self.lanes]

    def total(self) -> StreamStats:
        """Every lane's counters and samples together (source ``"N streams"``)."""
        t = StreamStats(source=f"{len(self.lanes)} streams")
        for s in self.stats:
            t.add(
                frames_in=s.frames_in, frames_out=s.frames_out, dropped=s.dropped,
                skipped=s.skipped, unfinished=s.unfinished,
            )  # fmt: skip
            for stage, v in s.stages.items():
                t.stages.setdefault(stage, []).extend(v)
            t.latency.extend(s.latency)
            t.skip_reasons.extend(s.skip_reasons[: 10 - len(t.skip_reasons)])
        t.wall_s = max((s.wall_s for s in self.stats), default=0.0)
        t.notes.append(self.mode)
        t.notes.append(
            "engine calls by batch size: "
            + ", ".join(f"{b}×{n}" for b, n in sorted(self.batch_sizes.items()))
        )
        return t

    def report(self) -> str:
        """Every lane's report, then the total."""
        parts = [f"[stream {i}] {s.report()}" for i, s in enumerate(self.stats)]
        return "\n\n".join([*parts, f"[total] {self.total().report()}"])

    # -- lifecycle --------------------------------------------------------------------
    def _start(self) -> None:
        if self._started:
            return
        self._started = True
        self._t0 = time.perf_counter()
        frames = [lane.source.info.frames for lane in self.lanes]
        known = None if any(f is None for f in frames) else sum(frames)
        self._progress = Progress(self._progress_wanted, "frames", known)
        for lane in self.lanes:
            lane._start()
        self._thread = threading.Thread(target=self._batch_loop, name="segfast-batch", daemon=True)
        self._thread.start()

    def __iter__(self) -> MultiStreamPipeline:
        self._start()
        return self

    def __next__(self) -> FrameResult:
        if self._closed:
            raise StopIteration
        self._start()
        while True:
            try:
                item = self._merged.get() if self._open else END
            except Stopped:
                item = END
            except BaseException:
                self.close()
                raise
            if isinstance(item, _LaneEnd):
                self._open -= 1
                continue
            if item is END:
                self.close()  # re-raises a worker's exception
                raise StopIteration
            if self._progress is not None:
                t = sum(s.frames_out for s in self.stats)
                self._progress.update(
                    advance=1,
                    status=f"{t / max(time.perf_counter() - self._t0, 1e-9):.1f} fps "
                    f"dropped {sum(s.dropped for s in self.stats)}",
                )
            return item

    def __enter__(self) -> MultiStreamPipeline:
        self._start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every thread, finalise every writer and the statistics; re-raise the first
        exception a worker raised (the batcher's, else a lane's)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread is not None:
            for lane in self.lanes:  # wake the batcher if it waits on a lane's queue
                lane._q_mid.abort()
            join_threads([self._thread], self._join_deadline)
        first: BaseException | None = self._error
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            for lane in self.lanes:
                lane._join_deadline = self._join_deadline
                try:
                    lane.close()
                except BaseException as exc:  # one lane's failure: close the others first
                    first = first or exc
        if self._progress is not None:
            self._progress.close()
        if first is not None:
            self._error = None
            raise first

    def _fail(self, exc: BaseException) -> None:
        self._error = self._error or exc
        self._stop.set()
        self._merged.abort()
        for lane in self.lanes:
            lane._stop.set()
            for ch in (lane._q_in, lane._q_mid):
                ch.abort()

    # -- the batching thread ----------------------------------------------------------
    def _gather(
        self, active: list[int], turn: int, ended: list[int]
    ) -> list[tuple[int, PipelineItem]]:
        """Up to max_batch waiting frames, one per lane per round, the first lane rotating
        with ``turn``; lanes whose queue has ended leave ``active`` for ``ended`` (their
        mid queue is closed once this tick's frames are in it)."""
        n = len(active)
        order = [active[(turn + k) % n] for k in range(n)] if n else []
        got: list[tuple[int, PipelineItem]] = []
        more = True
        while more and len(got) < self.max_batch:
            more = False
            for i in order:
                if len(got) >= self.max_batch or i not in active:
                    continue
                item = self.lanes[i]._q_in.poll()
                if item is None:
                    continue
                if item is END:
                    active.remove(i)
                    ended.append(i)
                    continue
                got.append((i, item))
                more = True
        return got

    def _batch_loop(self) -> None:
        active = list(range(len(self.lanes)))
        turn = 0
        try:
            with torch.inference_mode():
                while active and not self._stop.is_set():
                    self._bell.clear()  # before polling: a put after this rings again
                    ended: list[int] = []
                    got = self._gather(active, turn, ended)
                    turn += 1
                    if got:
                        self._infer(got)
                        for i, item in got:
                            self.lanes[i]._q_mid.put(item)
                    for i in ended:  # after their last frames
                        self.lanes[i]._q_mid.close()
                    if not got and not ended:
                        self._bell.wait(0.05)
        except Stopped:
            pass
        except BaseException as exc:
            self._fail(exc)
        finally:
            for i in active:
                self.lanes[i]._q_mid.close()

    def _infer(self, got: list[tuple[int, PipelineItem]]) -> None:
        dev = self.io.device
        xs: list[torch.Tensor] = []
        for i, item in got:
            lane = self.lanes[i]
            t0 = time.perf_counter()
            lane._timing(item, "queue", t0 - item.arrival)
            frame = torch.from_numpy(item.frame.image).to(dev)  # [H, W, 3] uint8
            xs.append(lane.pre(frame))  # [1, C, h, w]
            item.device_frame = frame
            sync(dev)
            lane._timing(item, "preprocess", time.perf_counter() - t0)
        if self.lanes[0].foreground:  # every lane has the same options
            convert = lambda y: self.io.to_probs(y)[:, -1]  # noqa: E731
        else:
            convert = self.io.to_mask
        for (i, item), (mask, seconds, _) in zip(got, self.runner.run(xs, convert), strict=True):
            item.mask = mask
            self.lanes[i]._timing(item, "infer", seconds)
