"""Results and statistics of a video stream: one :class:`FrameResult` per processed
frame, and :class:`StreamStats` — the frame counters and per-stage latency samples
(:data:`STAGES`) with their percentiles and a plain-text report. How frames are
counted is described in :mod:`segfast.runtime.video`."""

from __future__ import annotations

import copy
import dataclasses
import threading
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

__all__ = ["STAGES", "FrameResult", "StreamStats"]

# The pipeline's stages, in the order the report lists them.
STAGES = ("decode", "queue", "preprocess", "infer", "postprocess", "overlay", "encode")


@dataclass
class FrameResult:
    """One processed frame."""

    index: int  # position in the source, counting every frame it delivered or lost
    pts: int | None  # presentation timestamp, in time_base units (the source's own)
    time_base: Fraction | None
    time: float | None  # pts · time_base, seconds
    name: str | None  # file name, for image sources
    image: np.ndarray  # the input frame, H×W×3 uint8, channel_order
    mask: np.ndarray  # H×W class ids at the frame's size, uint8 (int32 above 256 classes)
    overlay: np.ndarray | None  # H×W×3 uint8 frame with the mask blended in (output="overlay")
    timings: dict[str, float] = field(default_factory=dict)  # stage → milliseconds
    stream: int = 0  # which source, in a multi-stream run (the order they were given)


@dataclass
class StreamStats:
    """Counters and latency samples of one stream (see :mod:`segfast.runtime.video`)."""

    source: str = ""
    frames_in: int = 0
    frames_out: int = 0
    dropped: int = 0
    skipped: int = 0
    unfinished: int = 0
    wall_s: float = 0.0
    stages: dict[str, list[float]] = field(default_factory=dict)  # stage → seconds per frame
    latency: list[float] = field(default_factory=list)  # end to end, seconds per frame
    end_reason: str | None = None  # why the source ended early, if it did
    skip_reasons: list[str] = field(default_factory=list)  # the first few
    notes: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        """Add to counters thread-safely: ``stats.add(dropped=1)``."""
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def sample(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.stages.setdefault(stage, []).append(seconds)

    def skip(self, n: int, reason: str) -> None:
        with self._lock:
            self.skipped += n
            if len(self.skip_reasons) < 10:
                self.skip_reasons.append(reason)

    @property
    def fps(self) -> float:
        """Frames out per second of wall time."""
        return self.frames_out / self.wall_s if self.wall_s > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        """{stage: Summary} for every stage with samples, plus "end-to-end"."""
        from segfast.stats import summarize

        out = {s: summarize(v) for s, v in self.stages.items() if v}
        if self.latency:
            out["end-to-end"] = summarize(self.latency)
        return out

    def as_dict(self) -> dict[str, Any]:
        """Counters, notes, FPS and the latency summaries in ms (JSON-ready)."""
        skip = ("stages", "latency", "_lock")
        with self._lock:
            d = {
                f.name: copy.copy(getattr(self, f.name))
                for f in dataclasses.fields(self)
                if f.name not in skip
            }
        d["fps"] = self.fps
        d["latency_ms"] = {k: s.as_dict() for k, s in self.summary().items()}
        return d

    def report(self) -> str:
        """A plain-text table: counters, FPS, per-stage and end-to-end percentiles."""
        lines = [f"source: {self.source}"] if self.source else []
        lines.append(
            f"frames: in {self.frames_in}, out {self.frames_out}, dropped {self.dropped}, "
            f"skipped {self.skipped}"
            + (f", unfinished {self.unfinished}" if self.unfinished else "")
        )
        lines.append(f"wall {self.wall_s:.2f} s, {self.fps:.1f} frames/s out")
        summ = self.summary()
        if summ:
            lines.append(f"{'stage':12s} {'p50 ms':>8s} {'p90 ms':>8s} {'p99 ms':>8s} {'n':>6s}")
            for name in (*STAGES, "end-to-end"):
                if name in summ:
                    s = summ[name]
                    lines.append(
                        f"{name:12s} {s.p50_ms:8.2f} {s.p90_ms:8.2f} {s.p99_ms:8.2f} {s.n:6d}"
                    )
        for r in self.skip_reasons:
            lines.append(f"skipped: {r}")
        if self.end_reason:
            lines.append(f"source ended early: {self.end_reason}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)
