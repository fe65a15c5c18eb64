"""The model registry: ``create(name, ...)``, ``names()``, ``get_spec(name)``.

Each model module registers a :class:`ModelSpec` at import time. The spec keeps
the defaults, a *tiny* configuration for tests (fast on 2 CPU cores), the
standard benchmark size, and the published parameter count the full-size model
is checked against.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from segfast.errors import InputError

Task = Literal["segmentation", "generation", "discrimination"]


@dataclass(frozen=True)
class Reference:
    """A published parameter count and where it comes from."""

    params: int
    options: dict[str, Any]
    source: str
    # False when no published count exists and ``params`` is this implementation's
    # own (documented) formula: shown as such, never as a match to the literature.
    published: bool = True


@dataclass(frozen=True)
class ModelSpec:
    """How to build one registered model and what it is checked against."""

    name: str
    factory: Callable[..., nn.Module]
    task: Task
    description: str
    tiny: dict[str, Any] = field(default_factory=dict)
    # (H, W) for segmentation / discrimination; for generators, the output size.
    standard_size: tuple[int, int] = (512, 512)
    standard_batch: int = 1
    min_size: int = 1
    reference: Reference | None = None
    # Builds example inputs for a model of this spec: (model, batch, (H, W)) -> tuple.
    example_inputs: Callable[[nn.Module, int, tuple[int, int]], tuple[torch.Tensor, ...]] | None = (
        None
    )

    def options(self) -> list[str]:
        """Names of the keyword options the factory accepts."""
        sig = inspect.signature(self.factory)
        return [
            p.name
            for p in sig.parameters.values()
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]

    def make_inputs(
        self, model: nn.Module, batch: int = 1, size: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, ...]:
        """Random example inputs for ``model`` (built from this spec)."""
        size = size or self.standard_size
        if self.example_inputs is not None:
            return self.example_inputs(model, batch, size)
        in_ch = int(getattr(model, "in_channels", 3))
        return (torch.randn(batch, in_ch, *size),)


_REGISTRY: dict[str, ModelSpec] = {}
_ALIASES: dict[str, str] = {}


def register(spec: ModelSpec, aliases: tuple[str, ...] = ()) -> ModelSpec:
    """Add ``spec`` to the registry (model modules call this at import)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    for alias in aliases:
        _ALIASES[alias] = spec.name
    return spec


def _key(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    return _ALIASES.get(key, key)


def canonical_name(name: str) -> str:
    """The registered name of ``name`` (an alias or another spelling); :class:`InputError`
    naming the close matches and the known models for anything else."""
    if not isinstance(name, str):
        raise InputError(f"a model name must be a string, got {type(name).__name__}")
    key = _key(name)
    if key not in _REGISTRY:
        near = difflib.get_close_matches(key, [*_REGISTRY, *_ALIASES], n=5, cutoff=0.6)
        close = list(dict.fromkeys(_ALIASES.get(c, c) for c in near))[:3]
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        known = ", ".join(sorted(_REGISTRY))
        raise InputError(f"unknown model {name!r}; {hint}known models: {known}")
    return key


def get_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` registered under ``name`` (aliases accepted)."""
    return _REGISTRY[canonical_name(name)]


def find_spec(name: str) -> ModelSpec | None:
    """The spec of a zoo name, None for anything else (e.g. a ``module:factory`` reference)."""
    return _REGISTRY.get(_key(name)) if isinstance(name, str) else None


def names(task: Task | None = None) -> list[str]:
    """Registered model names, optionally only those of one ``task``."""
    return sorted(n for n, s in _REGISTRY.items() if task is None or s.task == task)


def create(
    name: str,
    num_classes: int | None = None,
    in_channels: int | None = None,
    *,
    tiny: bool = False,
    **options: Any,
) -> nn.Module:
    """Build a registered model.

    ``num_classes`` and ``in_channels`` are passed on when given; ``tiny=True``
    starts from the spec's tiny test configuration. Unknown options raise a
    ``TypeError`` that lists the ones the model takes.
    """
    spec = get_spec(name)
    kwargs: dict[str, Any] = dict(spec.tiny) if tiny else {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if in_channels is not None:
        kwargs["in_channels"] = in_channels
    kwargs.update(options)
    accepted = spec.options()
    unknown = sorted(k for k in kwargs if k not in accepted)
    if unknown:
        raise TypeError(
            f"{spec.name} got unknown option(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(accepted)}"
        )
    model = spec.factory(**kwargs)
    model.segfast_spec = {"name": spec.name, "options": kwargs}  # type: ignore[assignment]
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (shared ones counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
