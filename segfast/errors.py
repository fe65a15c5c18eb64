"""Exceptions raised by segfast.

Every error names the argument or file at fault, what was expected and what came.
They subclass the built-in exception a caller would already catch (``ValueError``
for bad arguments, ``RuntimeError`` for environment problems), so existing
``except`` clauses keep working.
"""

from __future__ import annotations


class SegfastError(Exception):
    """Base class of every segfast error."""


class InputError(SegfastError, ValueError):
    """An input tensor, frame or argument does not fit (dtype, rank, shape, value)."""


class WeightsError(SegfastError, ValueError):
    """A weights file is unreadable, corrupt, or does not match the model."""


class EngineFileError(SegfastError, ValueError):
    """An engine file is truncated, tampered with, or built for another setup."""


class BackendUnavailable(SegfastError, RuntimeError):
    """A backend cannot run on this machine; the message says why."""


class UnsupportedModelError(SegfastError, ValueError):
    """A model contains something a compiler stage or exporter cannot handle."""


class SlowPrecisionWarning(UserWarning):
    """The requested precision has no fast path on this device: the engine is correct,
    but slower than fp32 (e.g. bf16 on a CPU without bf16 convolutions)."""
