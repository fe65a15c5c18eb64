"""Several preprocessed inputs through one engine in as few calls as its batch allows
(:class:`BatchRunner`): shared by the multi-stream runtime and the HTTP service.

* a **batch-dynamic** engine runs up to ``max_batch`` inputs per call (capped by the
  top of its batch range; padded up to the bottom of it);
* a **static batch-1** engine runs one call per input;
* a **static batch-B** engine runs full calls of B, the last one padded with copies of
  its last input (the padding's outputs are discarded).

Inputs of different shapes (a dynamic engine fed at each frame's own size) never share
a call; the order of the results is the order of the inputs.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

from segfast.errors import InputError
from segfast.runtime.engine_io import EngineIO
from segfast.timing import sync

__all__ = ["BatchRunner"]


class BatchRunner:
    """Runs lists of [1, C, h, w] inputs through ``engine`` in batches (module docstring).

    ``calls`` counts the engine calls made at each batch size; ``mode`` says in one line
    how this engine batches.
    """

    def __init__(self, engine: Any, io: EngineIO, max_batch: int | None) -> None:
        if max_batch is not None and (
            isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1
        ):
            raise InputError(f"max_batch must be an integer ≥ 1, got {max_batch!r}")
        self.engine, self.io = engine, io
        lo, hi = io.batch_range
        if io.batch is None:  # dynamic
            self.max_batch = max(min(max_batch or hi, hi), 1)
            self.pad_to = lo
            self.mode = f"batch-dynamic engine: up to {self.max_batch} inputs per call"
        elif io.batch == 1:
            self.max_batch = self.pad_to = 1
            self.mode = (
                "static batch 1: one engine call per input (compile with a dynamic batch "
                "to batch them)"
            )
        else:
            self.max_batch = self.pad_to = io.batch
            self.mode = (
                f"static batch {io.batch}: each call padded to {io.batch} inputs (the "
                f"padding's outputs discarded)"
            )
        self.calls: Counter[int] = Counter()

    def run(
        self, xs: list[torch.Tensor], convert: Callable[[torch.Tensor], torch.Tensor]
    ) -> list[tuple[torch.Tensor, float, int]]:
        """For each input: (its row of ``convert(engine(batch))``, the seconds of the call
        it was in, that call's batch size); in input order."""
        out: list[Any] = [None] * len(xs)
        groups: dict[tuple[Any, ...], list[int]] = {}
        for k, x in enumerate(xs):
            groups.setdefault((tuple(x.shape), x.dtype), []).append(k)
        for members in groups.values():
            for start in range(0, len(members), self.max_batch):
                idx = members[start : start + self.max_batch]
                batch = [xs[k] for k in idx]
                while len(batch) < self.pad_to:
                    batch.append(batch[-1])
                t0 = time.perf_counter()
                y = convert(self.engine(torch.cat(batch) if len(batch) > 1 else batch[0]))
                sync(self.io.device)
                seconds = time.perf_counter() - t0
                self.calls[len(batch)] += 1
                for j, k in enumerate(idx):
                    out[k] = (y[j], seconds, len(batch))
        return out
