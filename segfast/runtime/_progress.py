"""A live progress line (rich) for the runtimes, or nothing when not asked for."""

from __future__ import annotations

from typing import Any


class Progress:
    """``progress=True``: a rich progress bar on stderr; ``False``: every call is a no-op.

    ``total=None`` shows a spinner and a count (live sources have no length).
    """

    def __init__(self, enabled: bool, description: str, total: int | None) -> None:
        self._bar: Any = None
        self._task: Any = None
        if not enabled:
            return
        try:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )
            from rich.progress import Progress as RichProgress
        except ImportError as exc:
            raise ImportError(
                "progress=True needs rich: pip install rich (or segfast[bench])"
            ) from exc
        columns = [
            SpinnerColumn() if total is None else BarColumn(),
            TextColumn("{task.description}"),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
        ]
        self._bar = RichProgress(*columns, console=Console(stderr=True), transient=False)
        self._task = self._bar.add_task(description, total=total, status="")
        self._bar.start()

    def update(self, advance: int = 0, status: str | None = None) -> None:
        if self._bar is None:
            return
        kw: dict[str, Any] = {"advance": advance}
        if status is not None:
            kw["status"] = status
        self._bar.update(self._task, **kw)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
