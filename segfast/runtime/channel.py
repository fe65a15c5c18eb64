"""The bounded queue between the pipeline's worker threads: :class:`Channel`, the
:data:`END` marker it returns once closed and drained, the :class:`Stopped` exception
it raises once aborted, and :class:`PipelineItem`, the frame that travels through it."""

from __future__ import annotations

import contextlib
import threading
import time
import warnings
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from segfast.runtime.sources import Frame

__all__ = ["END", "Channel", "Handle", "PipelineItem", "Stopped", "join_threads"]


@dataclass
class PipelineItem:
    """A frame on its way through the pipeline."""

    frame: Frame
    arrival: float = 0.0  # perf_counter when it entered the pipeline
    timings: dict[str, float] = field(default_factory=dict)  # stage → ms
    mask: Any = None  # the engine-resolution mask (or foreground probability)
    device_frame: Any = None  # the frame on the engine's device


class Stopped(Exception):
    """A channel was aborted: the stream is shutting down."""


END = object()  # what Channel.get returns once the channel is closed and drained


class Channel:
    """A bounded FIFO between two threads; ``put(drop_oldest=True)`` evicts instead of
    waiting. ``close()`` ends it for the consumer once drained; ``abort()`` wakes
    everyone with :class:`Stopped` and returns what was left in it."""

    def __init__(self, size: int, bell: threading.Event | None = None) -> None:
        self._items: deque[Any] = deque()
        self._size = size
        self._cond = threading.Condition()
        self._closed = False
        self._aborted = False
        self._bell = bell  # set on every put and close: one consumer watching many channels

    def _ring(self) -> None:
        if self._bell is not None:
            self._bell.set()

    def put(self, item: Any, *, drop_oldest: bool = False) -> Any:
        """Append ``item``; return the evicted oldest item (drop_oldest), else None."""
        with self._cond:
            while len(self._items) >= self._size and not self._aborted:
                if drop_oldest:
                    old = self._items.popleft()
                    self._items.append(item)
                    self._cond.notify_all()
                    self._ring()
                    return old
                self._cond.wait(0.1)
            if self._aborted:
                raise Stopped
            self._items.append(item)
            self._cond.notify_all()
            self._ring()
            return None

    def poll(self) -> Any:
        """The next item without waiting: None when empty, ``END`` once closed and
        drained (items are never None)."""
        with self._cond:
            if self._aborted:
                raise Stopped
            if self._items:
                item = self._items.popleft()
                self._cond.notify_all()
                return item
            return END if self._closed else None

    def get(self) -> Any:
        """The next item, or ``END`` once closed and drained."""
        with self._cond:
            while not self._items and not self._closed and not self._aborted:
                self._cond.wait(0.1)  # a timed wait keeps Ctrl-C responsive
            if self._aborted:
                raise Stopped
            if self._items:
                item = self._items.popleft()
                self._cond.notify_all()
                return item
            return END

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            self._ring()

    def abort(self) -> list[Any]:
        with self._cond:
            self._aborted = True
            left = list(self._items)
            self._items.clear()
            self._cond.notify_all()
            self._ring()
            return left


class Handle:
    """What a user holds of a pipeline whose worker threads reference the pipeline: when
    the handle is dropped unclosed — ``for r in segfast.stream(...): ... break``, no
    ``with``, no ``close()`` — the pipeline is closed, so its threads stop, its source
    (a camera generator's ``finally``) closes and its writer finalises the file. The
    threads hold the pipeline, never the handle, so the handle's refcount says when the
    caller let go. Attributes are the pipeline's; iterating, ``with`` and ``close()`` as
    the pipeline's own.
    """

    _core: Any

    def __init__(self, core: Any) -> None:
        object.__setattr__(self, "_core", core)
        weakref.finalize(self, _abandon, core)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._core, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._core, name, value)

    def __iter__(self) -> Handle:
        self._core._start()
        return self

    def __next__(self) -> Any:
        return self._core.__next__()

    def __enter__(self) -> Handle:
        self._core._start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._core.close()

    def close(self) -> None:
        """Stop the threads, finalise the writer(s) and the statistics; re-raise the first
        exception a worker raised (once)."""
        self._core.close()


# How long closing an abandoned pipeline waits for its threads (a decode thread blocked
# in a camera read, say): they are daemon threads, so at worst they are left behind, as
# before handles existed, rather than hang the program (at exit, too).
ABANDON_WAIT_S = 5.0


def _abandon(core: Any) -> None:
    """Close a pipeline its caller let go of; its errors and warnings have nobody to
    reach (the caller left the loop), so they are dropped."""
    core._join_deadline = time.monotonic() + ABANDON_WAIT_S
    with contextlib.suppress(Exception), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        core.close()


def join_threads(threads: list[threading.Thread], deadline: float | None) -> None:
    """Wait for ``threads`` (in short joins: Ctrl-C stays responsive) until ``deadline``
    (``time.monotonic()``; None: for good), never for the calling thread itself (a
    finalizer the garbage collector ran on one of them)."""
    me = threading.current_thread()
    for t in threads:
        while t is not me and t.is_alive():
            if deadline is not None and time.monotonic() > deadline:
                return
            t.join(0.1)
